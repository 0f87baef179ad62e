//! `make bench-memory`: router throughput and peak memory on the in-memory broker.
//!
//! Scenarios (N messages of 100 bytes, published in batches of 1,000 by one publisher):
//! - plain:  one consumer-only handler on "in" counts messages;
//! - hop:    a handler republishes each message as a new message to "out", a consumer
//!   handler on "out" counts;
//! - layers: plain with three layers (tower's timeout and two pass-through layers).
//!
//! Each figure is the median of three runs, each timed from the first publish to the N-th
//! message handled. Peak RSS is
//! the process's high-water mark during the scenario (reset between scenarios through
//! /proc/self/clear_refs). Set `BENCH_MESSAGES` to change N (default 1,000,000).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tidemill_testkit::bench::{record, PeakRss, Row};

use bytes::Bytes;
use tidemill_core::{HandlerResult, MemoryBroker, Message, Publisher, Router};
use tokio::sync::Notify;
use tower::{Layer, Service};

const BATCH: usize = 1_000;
/// Measured runs per scenario; the median is reported.
const RUNS: usize = 3;

/// Counts handled messages and signals when the target is reached.
#[derive(Clone)]
struct Counter {
    count: Arc<AtomicUsize>,
    target: usize,
    done: Arc<Notify>,
}

impl Counter {
    fn new(target: usize) -> Self {
        Counter {
            count: Arc::new(AtomicUsize::new(0)),
            target,
            done: Arc::new(Notify::new()),
        }
    }

    fn hit(&self) {
        if self.count.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            self.done.notify_one();
        }
    }
}

/// A layer that does nothing but forward, standing in for a user's own middleware.
#[derive(Clone)]
struct PassThrough;

impl<S> Layer<S> for PassThrough {
    type Service = PassThroughService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        PassThroughService(inner)
    }
}

struct PassThroughService<S>(S);

impl<S: Service<Message>> Service<Message> for PassThroughService<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, msg: Message) -> S::Future {
        self.0.call(msg)
    }
}

#[derive(Clone, Copy, Debug)]
enum Scenario {
    Plain,
    Hop,
    Layers,
}

async fn run(scenario: Scenario, n: usize) -> Duration {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let counter = Counter::new(n);
    let count = {
        let counter = counter.clone();
        move |_m: Message| {
            counter.hit();
            async { HandlerResult::Ok(()) }
        }
    };
    let result = match scenario {
        Scenario::Plain => {
            router
                .add_handler("count")
                .subscribe(broker.subscriber(), "in")
                .handler(count)
                .await
        }
        Scenario::Layers => {
            router
                .add_handler("count")
                .subscribe(broker.subscriber(), "in")
                .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(30)))
                .layer(PassThrough)
                .layer(PassThrough)
                .handler(count)
                .await
        }
        Scenario::Hop => {
            let hop = router
                .add_handler("hop")
                .subscribe(broker.subscriber(), "in")
                .publish(broker.publisher(), "out")
                .handler(|m: Message| async move {
                    HandlerResult::Ok(Message::new(m.payload().clone()))
                })
                .await;
            match hop {
                Ok(()) => {
                    router
                        .add_handler("count")
                        .subscribe(broker.subscriber(), "out")
                        .handler(count)
                        .await
                }
                Err(e) => Err(e),
            }
        }
    };
    result.unwrap_or_else(|e| panic!("adding handlers failed: {e}"));
    let running = router.clone();
    let run = tokio::spawn(async move { running.run().await });
    router.running().await;

    let payload = Bytes::from(vec![b'x'; 100]);
    let publisher = broker.publisher();
    let started = Instant::now();
    let publishing = tokio::spawn(async move {
        let mut left = n;
        while left > 0 {
            let batch = left.min(BATCH);
            let msgs: Vec<Message> = (0..batch).map(|_| Message::new(payload.clone())).collect();
            publisher
                .publish("in", msgs)
                .await
                .unwrap_or_else(|e| panic!("publish failed: {e}"));
            left -= batch;
        }
    });
    counter.done.notified().await;
    let elapsed = started.elapsed();
    publishing
        .await
        .unwrap_or_else(|e| panic!("publisher task failed: {e}"));
    router
        .close()
        .await
        .unwrap_or_else(|e| panic!("close failed: {e}"));
    let _ = run.await;
    elapsed
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument filters scenarios by name.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot build the runtime: {e}"));
    println!(
        "router on the in-memory broker: {n} messages of 100 bytes, batches of {BATCH}, median of {RUNS} runs, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<8} {:>14} {:>12} {:>14}",
        "scenario", "msg/s", "seconds", "peak RSS MiB"
    );
    let mut plain_rate = None;
    for scenario in [Scenario::Plain, Scenario::Hop, Scenario::Layers] {
        let name = format!("{scenario:?}").to_lowercase();
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        // Warm-up run (allocator, page faults), then the median of three measured runs.
        runtime.block_on(run(scenario, n / 10));
        PeakRss::reset();
        let mut runs: Vec<Duration> = (0..RUNS)
            .map(|_| runtime.block_on(run(scenario, n)))
            .collect();
        runs.sort();
        let elapsed = runs[RUNS / 2];
        let rate = n as f64 / elapsed.as_secs_f64();
        let peak = PeakRss::read();
        let rss = peak.map_or(f64::NAN, |b| b as f64 / (1024.0 * 1024.0));
        let ratio = match (scenario, plain_rate) {
            (Scenario::Layers, Some(plain)) => format!("  ({:.2}x plain)", rate / plain),
            _ => String::new(),
        };
        println!(
            "{name:<8} {rate:>14.0} {:>12.3} {rss:>14.1}{ratio}",
            elapsed.as_secs_f64()
        );
        record(
            &Row::new("in-memory router", &name, rate)
                .with_peak_rss(peak)
                .with_note(format!("N = {n}, median of {RUNS}")),
        );
        if let Scenario::Plain = scenario {
            plain_rate = Some(rate);
        }
    }
}
