//! `make run`: a small order pipeline through the router on the embedded in-memory broker.
//!
//! orders ──► enrich (adds prices; one order fails once and is redelivered) ──► orders.priced
//!        ──► invoice (consumer-only: prints and totals)
//!
//! No services needed: everything runs in this process.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemill::{HandlerResult, MemoryBroker, Message, Publisher, Router};
use tokio::sync::mpsc;

const ORDERS: [(&str, &str, u32); 5] = [
    ("ord-1", "tea", 2),
    ("ord-2", "coffee", 1),
    ("ord-3", "cocoa", 3),
    ("ord-4", "tea", 5),
    ("ord-5", "mate", 1),
];

fn unit_price(item: &str) -> Option<u32> {
    match item {
        "tea" => Some(350),
        "coffee" => Some(420),
        "cocoa" => Some(390),
        "mate" => Some(480),
        _ => None,
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let started = Instant::now();
    let broker = MemoryBroker::new();
    let router = Router::new();
    let failures = Arc::new(AtomicU32::new(0));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, u32, u32)>();

    let failed = failures.clone();
    router
        .add_handler("enrich")
        .subscribe(broker.subscriber(), "orders")
        .group("enrich")
        .publish(broker.publisher(), "orders.priced")
        .handler(move |order: Message| {
            let failed = failed.clone();
            async move {
                let id = order.metadata().get("order-id").unwrap_or("?").to_owned();
                let item = std::str::from_utf8(order.payload())?.to_owned();
                let attempt = order.context().and_then(|c| c.attempt()).unwrap_or(1);
                if id == "ord-3" && attempt == 1 {
                    failed.fetch_add(1, Ordering::SeqCst);
                    println!("  enrich   {id}: price service timed out (attempt {attempt}) -> nack, will be redelivered");
                    return Err("price service timed out".into());
                }
                let price = unit_price(&item).ok_or_else(|| format!("unknown item {item}"))?;
                println!("  enrich   {id}: {item} costs {price} cents (attempt {attempt})");
                HandlerResult::Ok(
                    Message::new(order.payload().clone())
                        .with_metadata_map(order.metadata().clone())
                        .with_metadata("unit-price", price),
                )
            }
        })
        .await?;

    router
        .add_handler("invoice")
        .subscribe(broker.subscriber(), "orders.priced")
        .group("invoice")
        .handler(move |priced: Message| {
            let done = done_tx.clone();
            async move {
                let md = priced.metadata();
                let id = md.get("order-id").unwrap_or("?").to_owned();
                let qty: u32 = md.get_as("quantity")?.unwrap_or(1);
                let price: u32 = md.get_as("unit-price")?.unwrap_or(0);
                println!("  invoice  {id}: {qty} x {price} = {} cents", qty * price);
                let _ = done.send((id, qty, price));
                HandlerResult::Ok(())
            }
        })
        .await?;

    let running = router.clone();
    let run = tokio::spawn(async move { running.run().await });
    router.running().await;

    println!("Tidemill demo: order pipeline on the in-memory broker");
    println!("publishing {} orders to `orders`", ORDERS.len());
    let publisher = broker.publisher();
    for (id, item, qty) in ORDERS {
        let order = Message::new(item)
            .with_key(id)
            .with_metadata("order-id", id)
            .with_metadata("quantity", qty);
        publisher.publish_one("orders", order).await?;
    }

    let mut invoiced = Vec::new();
    while invoiced.len() < ORDERS.len() {
        match tokio::time::timeout(Duration::from_secs(5), done_rx.recv()).await {
            Ok(Some(line)) => invoiced.push(line),
            _ => return Err("the pipeline stalled".into()),
        }
    }
    router.close().await?;
    run.await??;

    let total: u32 = invoiced.iter().map(|(_, q, p)| q * p).sum();
    println!();
    println!("summary");
    println!("  orders published:   {}", ORDERS.len());
    println!("  orders invoiced:    {}", invoiced.len());
    println!(
        "  failed attempts:    {} (redelivered and then processed)",
        failures.load(Ordering::SeqCst)
    );
    println!("  invoice total:      {total} cents");
    println!("  router closed cleanly in {:?}", started.elapsed());
    Ok(())
}
