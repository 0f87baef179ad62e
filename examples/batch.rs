//! A batch handler on any broker: meter readings written to a store 100 at a time.
//!
//! Run: `cargo run --features middleware --example batch` (in-memory broker), or on a real
//! broker: `TIDEMILL_BROKER=kafka://127.0.0.1:9092 cargo run --features kafka,middleware
//! --example batch` (any URL `tidemill::BrokerConfig::from_url` accepts, with its feature).
//!
//! - 1,000 readings are published; 10 of them are not numbers.
//! - The `store` handler takes up to 100 readings per call (or what arrived within 50 ms)
//!   and writes the good ones in one "insert"; a reading that is not a number fails on its
//!   own with a permanent error, so the poison-queue layer moves it (alone) to the poison
//!   topic while the rest of its batch is acked.
//! - The store is busy once: that call fails as a whole, and its readings come back (after
//!   the router's redelivery delay) to a later batch.
//!
//! Topics and consumer groups carry a per-run suffix, so leftovers on persistent brokers do
//! not disturb a rerun. The program checks its outcome and exits non-zero if it is wrong.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tidemill::middleware::PoisonQueue;
use tidemill::router::BatchResult;
use tidemill::{permanent, BrokerConfig, HandlerResult, Message, Router};

const READINGS: usize = 1_000;
const BAD_EVERY: usize = 100;

/// The "database": reading id → value, and how many inserts it took.
#[derive(Default)]
struct Store {
    rows: Mutex<BTreeMap<String, f64>>,
    inserts: AtomicUsize,
    largest: AtomicUsize,
    busy_once: AtomicBool,
}

impl Store {
    /// Writes rows in one statement; the first call reports the store busy.
    fn insert(&self, rows: Vec<(String, f64)>) -> Result<(), &'static str> {
        if !self.busy_once.swap(true, Ordering::SeqCst) {
            return Err("store busy: too many connections");
        }
        self.inserts.fetch_add(1, Ordering::Relaxed);
        self.largest.fetch_max(rows.len(), Ordering::Relaxed);
        let mut table = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        table.extend(rows);
        Ok(())
    }

    fn len(&self) -> usize {
        self.rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let outcome = tokio::time::timeout(Duration::from_secs(60), run())
        .await
        .unwrap_or_else(|_| Err("did not finish within 60 s".into()));
    match outcome {
        Ok(()) => {
            println!("OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("batch example FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let config = BrokerConfig::from_env()?;
    println!("broker: {:?}", config.kind());
    let broker = config.connect().await?;
    let (publisher, subscriber) = (broker.publisher.clone(), broker.subscriber.clone());
    let run_id = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let topic = format!("readings-{run_id}");
    let store = Arc::new(Store::default());

    // --- the example's core -------------------------------------------------------------
    let router = Router::new();
    let poison = PoisonQueue::new(publisher.clone(), format!("{topic}.poison"));
    let db = store.clone();
    router
        .add_handler("store")
        .subscribe(subscriber.clone(), &topic)
        .group(format!("store-{run_id}"))
        .layer(poison.clone())
        .batch(100, Duration::from_millis(50))
        .handler(move |readings: Vec<Message>| {
            let mut result = BatchResult::ok();
            let mut rows = Vec::with_capacity(readings.len());
            let mut positions = Vec::with_capacity(readings.len());
            for (i, reading) in readings.iter().enumerate() {
                match std::str::from_utf8(reading.payload())
                    .ok()
                    .and_then(|s| s.parse::<f64>().ok())
                {
                    Some(value) => {
                        rows.push((reading.uuid().to_owned(), value));
                        positions.push(i);
                    }
                    None => {
                        result.fail(i, permanent("a reading must be a number"));
                    }
                }
            }
            let db = db.clone();
            async move {
                // One insert for the whole batch; if it fails, its readings come back.
                if let Err(e) = db.insert(rows) {
                    result.fail_each(positions, e);
                }
                HandlerResult::Ok(result)
            }
        })
        .await?;
    // --- end of the core ----------------------------------------------------------------

    let running = router.clone();
    let router_task = tokio::spawn(async move { running.run().await });
    tokio::time::timeout(Duration::from_secs(30), router.running())
        .await
        .map_err(|_| "the router did not start within 30 s")?;

    let readings: Vec<Message> = (0..READINGS)
        .map(|i| {
            if i % BAD_EVERY == 7 {
                Message::new(format!("sensor {i} offline"))
            } else {
                Message::new(format!("{}.5", i % 40))
            }
        })
        .collect();
    for chunk in readings.chunks(250) {
        publisher.publish(&topic, chunk.to_vec()).await?;
    }
    let bad = READINGS / BAD_EVERY;
    let good = READINGS - bad;
    println!("published {READINGS} readings ({bad} not numbers)");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    while (store.len() < good || (poison.poisoned() as usize) < bad)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    router.close().await?;
    router_task.await??;

    let inserts = store.inserts.load(Ordering::Relaxed);
    let largest = store.largest.load(Ordering::Relaxed);
    println!(
        "summary: {} rows stored in {inserts} inserts (largest {largest}), {} poisoned",
        store.len(),
        poison.poisoned()
    );
    let mut wrong = Vec::new();
    if store.len() != good {
        wrong.push(format!("{} of {good} good readings stored", store.len()));
    }
    if poison.poisoned() as usize != bad {
        wrong.push(format!(
            "{} of {bad} bad readings poisoned",
            poison.poisoned()
        ));
    }
    if largest > 100 {
        wrong.push(format!(
            "an insert of {largest} rows (batches hold at most 100)"
        ));
    }
    if inserts >= good {
        wrong.push(format!("{inserts} inserts for {good} rows: no batching"));
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; ").into())
    }
}
