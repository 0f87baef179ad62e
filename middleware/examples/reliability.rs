//! The recommended reliability stack on the in-memory broker, and what happens to each
//! kind of failure. Run: `cargo run -p tidemill-middleware --example reliability`
//!
//! - `order-ok`: handled at once;
//! - `order-flaky`: fails twice, succeeds on the third in-process retry;
//! - `order-stuck`: always fails (transient): retried in-process, redelivered with a
//!   growing delay, dead-lettered after 3 deliveries;
//! - `order-garbage`: a permanent error: poisoned at once, never retried.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tidemill_core::{permanent, HandlerResult, MemoryBroker, Message, Publisher, Router};
use tidemill_middleware::{
    headers, Backoff, CorrelationId, DeadLetter, DelayedRedelivery, PoisonQueue, Recoverer, Retry,
};
use tokio::sync::mpsc;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = MemoryBroker::new();
    let router = Router::new();

    // Outermost first: a failure travels from the handler outwards.
    let dead_letter = DeadLetter::new(broker.publisher(), "orders.dead").max_deliveries(3);
    let poison = PoisonQueue::new(broker.publisher(), "orders.poison");
    router
        .layer(CorrelationId::new())
        .layer(dead_letter.clone())
        .layer(poison.clone())
        .layer(DelayedRedelivery::new(Backoff::new(Duration::from_millis(
            100,
        ))))
        .layer(
            Retry::new()
                .max_attempts(3)
                .backoff(Backoff::new(Duration::from_millis(20)))
                .on_retry(|e| {
                    println!(
                        "retry    {} (delivery {}, attempt {} failed: {}; next attempt in {:?})",
                        String::from_utf8_lossy(e.message.payload()),
                        e.message.context().and_then(|c| c.attempt()).unwrap_or(1),
                        e.attempt,
                        e.error,
                        e.delay
                    )
                }),
        )
        .layer(Recoverer::new());

    let calls: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let seen = calls.clone();
    router
        .add_handler("orders")
        .subscribe(broker.subscriber(), "orders")
        .group("orders")
        .handler(move |msg: Message| {
            let order = String::from_utf8_lossy(msg.payload()).into_owned();
            let n = {
                let mut calls = seen.lock();
                let n = calls.entry(order.clone()).or_default();
                *n += 1;
                *n
            };
            async move {
                match order.as_str() {
                    "order-flaky" if n < 3 => Err("inventory service timed out".into()),
                    "order-stuck" => Err("payment provider unavailable".into()),
                    "order-garbage" => Err(permanent("payload is not a valid order")),
                    _ => {
                        println!("handled  {order} (call {n})");
                        HandlerResult::Ok(())
                    }
                }
            }
        })
        .await?;

    // Watch the dead-letter and poison topics.
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    for (name, topic) in [("dead", "orders.dead"), ("poison", "orders.poison")] {
        let tx = tx.clone();
        router
            .add_handler(format!("watch-{name}"))
            .subscribe(broker.subscriber(), topic)
            .handler(move |m: Message| {
                let md = m.metadata();
                let line = match name {
                    "dead" => format!(
                        "dead     {} after {} deliveries (last error: {})",
                        String::from_utf8_lossy(m.payload()),
                        md.get(headers::DEAD_LETTER_DELIVERIES).unwrap_or("?"),
                        md.get(headers::DEAD_LETTER_REASON).unwrap_or("?"),
                    ),
                    _ => format!(
                        "poisoned {} ({}, handler {}, topic {})",
                        String::from_utf8_lossy(m.payload()),
                        md.get(headers::POISON_REASON).unwrap_or("?"),
                        md.get(headers::POISON_HANDLER).unwrap_or("?"),
                        md.get(headers::POISON_TOPIC).unwrap_or("?"),
                    ),
                };
                let _ = tx.send(line);
                async { HandlerResult::Ok(()) }
            })
            .await?;
    }

    let running = router.clone();
    let run = tokio::spawn(async move { running.run().await });
    router.running().await;

    let publisher = broker.publisher();
    for order in ["order-ok", "order-flaky", "order-stuck", "order-garbage"] {
        publisher.publish_one("orders", Message::new(order)).await?;
    }
    for _ in 0..2 {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(line)) => println!("{line}"),
            _ => return Err("the dead letter and the poisoned message did not arrive".into()),
        }
    }
    println!(
        "summary: {} dead-lettered, {} poisoned; handler calls: {:?}",
        dead_letter.dead_lettered(),
        poison.poisoned(),
        {
            let mut c: Vec<_> = calls.lock().iter().map(|(k, v)| (k.clone(), *v)).collect();
            c.sort();
            c
        }
    );
    router.close().await?;
    run.await??;
    Ok(())
}
