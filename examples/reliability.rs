//! The recommended reliability stack on the in-memory broker, and what happens to each
//! kind of failure. Run: `cargo run --example reliability`
//!
//! - `order-ok`: handled at once;
//! - `order-flaky`: fails twice, succeeds on the third in-process retry;
//! - `order-stuck`: always fails (transient): retried in-process, redelivered with a
//!   growing delay, dead-lettered after 3 deliveries;
//! - `order-garbage`: a permanent error: poisoned at once, never retried.
//!
//! The program checks that every order ended where it should and exits non-zero otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tidemill::middleware::{
    headers, Backoff, CorrelationId, DeadLetter, DelayedRedelivery, PoisonQueue, Recoverer, Retry,
};
use tidemill::{permanent, HandlerResult, MemoryBroker, Message, Publisher, Router};
use tokio::sync::mpsc;

/// Where an order ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Handled,
    DeadLettered,
    Poisoned,
}

const ORDERS: [&str; 4] = ["order-ok", "order-flaky", "order-stuck", "order-garbage"];
const MAX_ATTEMPTS: u32 = 3;
const MAX_DELIVERIES: u32 = 3;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut outcomes) = mpsc::unbounded_channel::<(String, Outcome)>();
    let retried: Arc<Mutex<BTreeSet<String>>> = Arc::default();

    // Outermost first: a failure travels from the handler outwards.
    let dead_letter =
        DeadLetter::new(broker.publisher(), "orders.dead").max_deliveries(MAX_DELIVERIES);
    let poison = PoisonQueue::new(broker.publisher(), "orders.poison");
    let on_retry = retried.clone();
    router
        .layer(CorrelationId::new())
        .layer(dead_letter.clone())
        .layer(poison.clone())
        .layer(DelayedRedelivery::new(Backoff::new(Duration::from_millis(
            100,
        ))))
        .layer(
            Retry::new()
                .max_attempts(MAX_ATTEMPTS)
                .backoff(Backoff::new(Duration::from_millis(20)))
                .on_retry(move |e| {
                    let order = String::from_utf8_lossy(e.message.payload()).into_owned();
                    println!(
                        "retried  {order} (delivery {}, attempt {} failed: {}; next attempt in {:?})",
                        e.message.context().and_then(|c| c.attempt()).unwrap_or(1),
                        e.attempt,
                        e.error,
                        e.delay
                    );
                    on_retry
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(order);
                }),
        )
        .layer(Recoverer::new());

    let calls: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let seen = calls.clone();
    let handled = tx.clone();
    router
        .add_handler("orders")
        .subscribe(broker.subscriber(), "orders")
        .group("orders")
        .handler(move |msg: Message| {
            let order = String::from_utf8_lossy(msg.payload()).into_owned();
            let n = {
                let mut calls = seen.lock().unwrap_or_else(PoisonError::into_inner);
                let n = calls.entry(order.clone()).or_default();
                *n += 1;
                *n
            };
            let handled = handled.clone();
            async move {
                match order.as_str() {
                    "order-flaky" if n < 3 => Err("inventory service timed out".into()),
                    "order-stuck" => Err("payment provider unavailable".into()),
                    "order-garbage" => Err(permanent("payload is not a valid order")),
                    _ => {
                        println!("handled  {order} (call {n})");
                        let _ = handled.send((order, Outcome::Handled));
                        HandlerResult::Ok(())
                    }
                }
            }
        })
        .await?;

    // Watch the dead-letter and poison topics.
    for (outcome, topic) in [
        (Outcome::DeadLettered, "orders.dead"),
        (Outcome::Poisoned, "orders.poison"),
    ] {
        let tx = tx.clone();
        router
            .add_handler(format!("watch-{topic}"))
            .subscribe(broker.subscriber(), topic)
            .handler(move |m: Message| {
                let order = String::from_utf8_lossy(m.payload()).into_owned();
                let md = m.metadata();
                if outcome == Outcome::DeadLettered {
                    println!(
                        "dead     {order} after {} deliveries (last error: {})",
                        md.get(headers::DEAD_LETTER_DELIVERIES).unwrap_or("?"),
                        md.get(headers::DEAD_LETTER_REASON).unwrap_or("?"),
                    );
                } else {
                    println!(
                        "poisoned {order} ({}, handler {}, topic {})",
                        md.get(headers::POISON_REASON).unwrap_or("?"),
                        md.get(headers::POISON_HANDLER).unwrap_or("?"),
                        md.get(headers::POISON_TOPIC).unwrap_or("?"),
                    );
                }
                let _ = tx.send((order, outcome));
                async { HandlerResult::Ok(()) }
            })
            .await?;
    }
    drop(tx);

    let running = router.clone();
    let run = tokio::spawn(async move { running.run().await });
    router.running().await;

    let publisher = broker.publisher();
    for order in ORDERS {
        publisher.publish_one("orders", Message::new(order)).await?;
    }
    let mut ended: BTreeMap<String, Outcome> = BTreeMap::new();
    while ended.len() < ORDERS.len() {
        match tokio::time::timeout(Duration::from_secs(30), outcomes.recv()).await {
            Ok(Some((order, outcome))) => {
                if let Some(before) = ended.insert(order.clone(), outcome) {
                    return Err(format!("{order} ended twice: {before:?}, then {outcome:?}").into());
                }
            }
            _ => return Err(format!("not every order ended within 30 s: {ended:?}").into()),
        }
    }
    router.close().await?;
    run.await??;

    let calls = calls.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let retried = retried
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    println!(
        "summary: retried {retried:?}; dead-lettered {}, poisoned {}; handler calls {calls:?}",
        dead_letter.dead_lettered(),
        poison.poisoned(),
    );

    // Check the outcome: each order where it belongs, after the expected number of calls.
    let expected = [
        ("order-ok", Outcome::Handled, 1),
        ("order-flaky", Outcome::Handled, 3),
        (
            "order-stuck",
            Outcome::DeadLettered,
            MAX_ATTEMPTS * MAX_DELIVERIES,
        ),
        ("order-garbage", Outcome::Poisoned, 1),
    ];
    let mut wrong = Vec::new();
    for (order, outcome, n) in expected {
        if ended.get(order) != Some(&outcome) {
            wrong.push(format!(
                "{order} ended {:?}, expected {outcome:?}",
                ended.get(order)
            ));
        }
        if calls.get(order) != Some(&n) {
            wrong.push(format!(
                "{order}: {:?} handler calls, expected {n}",
                calls.get(order)
            ));
        }
    }
    let expected_retried: BTreeSet<String> = ["order-flaky", "order-stuck"]
        .into_iter()
        .map(String::from)
        .collect();
    if retried != expected_retried {
        wrong.push(format!(
            "retried {retried:?}, expected {expected_retried:?}"
        ));
    }
    if dead_letter.dead_lettered() != 1 || poison.poisoned() != 1 {
        wrong.push(format!(
            "{} dead-lettered and {} poisoned, expected 1 and 1",
            dead_letter.dead_lettered(),
            poison.poisoned()
        ));
    }
    if !wrong.is_empty() {
        return Err(format!("unexpected outcome: {}", wrong.join("; ")).into());
    }
    println!("ok: every order ended where it should");
    Ok(())
}
