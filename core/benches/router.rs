//! `make bench-memory`: router throughput and peak memory on the in-memory broker.
//!
//! Scenarios (N messages of 100 bytes, published in batches of 1,000 by one publisher):
//! - plain:  one consumer-only handler on "in" counts messages;
//! - hop:    a handler republishes each message as a new message to "out", a consumer
//!   handler on "out" counts;
//! - layers: plain with three layers (tower's timeout and two pass-through layers);
//! - state:  plain written with extractors: the counter as the handler's `State`, cloned
//!   per message, and the `Message`.
//! - batch:  plain as a batch handler (`.batch(500, 50 ms)`): counts each batch's messages.
//!
//! Rounds: after a warm-up, each round runs every scenario once, in rotating order, so load
//! from other processes hits all scenarios alike. Each run is timed from the first publish
//! to the N-th message handled; the report gives the median over rounds and, for layers,
//! the median of each round's ratio to plain. Peak RSS is the process's high-water mark
//! during a run (reset before each through /proc/self/clear_refs), the highest over the
//! scenario's runs. Besides msg/s it reports the CPU time of the whole process per message
//! (all threads, from /proc), and for layers plain's CPU over its own: it shows what the
//! layers cost even when msg/s does not (a handler that waits for its publisher has time to
//! spare for them).
//! `BENCH_MESSAGES` sets N (default 1,000,000), `BENCH_RUNS` the rounds (default 5);
//! arguments filter scenarios by name.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tidemill_testkit::bench::{median, process_cpu, record, PeakRss, Row};

use bytes::Bytes;
use tidemill_core::extract::State;
use tidemill_core::{HandlerResult, MemoryBroker, Message, Publisher, Router};
use tokio::sync::Notify;
use tower::{Layer, Service};

const BATCH: usize = 1_000;
/// Measured rounds by default (`BENCH_RUNS` changes it); medians over rounds are reported.
const RUNS: usize = 5;

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
    State,
    Batch,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Plain => "plain",
            Scenario::Hop => "hop",
            Scenario::Layers => "layers",
            Scenario::State => "state",
            Scenario::Batch => "batch",
        }
    }
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
        Scenario::State => {
            router
                .add_handler("count")
                .subscribe(broker.subscriber(), "in")
                .state(counter.clone())
                .handler(|State(c): State<Counter>, _m: Message| async move { c.hit() })
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
        Scenario::Batch => {
            let counter = counter.clone();
            router
                .add_handler("count")
                .subscribe(broker.subscriber(), "in")
                .batch(500, Duration::from_millis(50))
                .handler(move |msgs: Vec<Message>| {
                    for _ in &msgs {
                        counter.hit();
                    }
                    async {}
                })
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
    let rounds: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(RUNS);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot build the runtime: {e}"));
    let scenarios: Vec<Scenario> = [
        Scenario::Plain,
        Scenario::Hop,
        Scenario::Layers,
        Scenario::State,
        Scenario::Batch,
    ]
    .into_iter()
    .filter(|s| filter.is_empty() || filter.iter().any(|f| s.name().contains(f.as_str())))
    .collect();
    println!(
        "router on the in-memory broker: {n} messages of 100 bytes, batches of {BATCH}, {rounds} rounds, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "each round runs every scenario once, in rotating order; figures are medians over rounds, \
         the layers, state and batch ratios the median of each round's scenario/plain"
    );
    // Warm-up runs (allocator, page faults), then the measured rounds.
    for &scenario in &scenarios {
        runtime.block_on(run(scenario, n / 10));
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); scenarios.len()];
    // CPU µs per message of the whole process (all threads), per round.
    let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); scenarios.len()];
    let mut peaks: Vec<Option<u64>> = vec![None; scenarios.len()];
    for round in 0..rounds {
        for k in 0..scenarios.len() {
            let i = (round + k) % scenarios.len();
            PeakRss::reset();
            let cpu_before = process_cpu();
            let elapsed = runtime.block_on(run(scenarios[i], n));
            let cpu = match (cpu_before, process_cpu()) {
                (Some(before), Some(after)) => after.checked_sub(before),
                _ => None,
            };
            rates[i].push(n as f64 / elapsed.as_secs_f64());
            cpus[i].push(cpu.map_or(f64::NAN, |c| c.as_secs_f64() * 1e6 / n as f64));
            peaks[i] = peaks[i].max(PeakRss::read());
        }
    }
    println!(
        "{:<8} {:>14} {:>12} {:>14} {:>12}",
        "scenario", "msg/s", "seconds", "peak RSS MiB", "CPU µs/msg"
    );
    let plain = scenarios.iter().position(|s| matches!(s, Scenario::Plain));
    // The median of each round's ratio to plain (`invert`: plain's value over the scenario's).
    let per_round = |values: &[Vec<f64>], i: usize, p: usize, invert: bool| {
        let ratios: Vec<f64> = values[i]
            .iter()
            .zip(&values[p])
            .map(|(x, base)| if invert { base / x } else { x / base })
            .collect();
        median(&ratios)
    };
    for (i, scenario) in scenarios.iter().enumerate() {
        let name = scenario.name();
        let rate = median(&rates[i]);
        let cpu = median(&cpus[i]);
        let rss = peaks[i].map_or(f64::NAN, |b| b as f64 / (1024.0 * 1024.0));
        let ratios = match (scenario, plain) {
            (Scenario::Layers | Scenario::State | Scenario::Batch, Some(p)) => {
                Some((per_round(&rates, i, p, false), per_round(&cpus, i, p, true)))
            }
            _ => None,
        };
        let shown = ratios.map_or(String::new(), |(r, c)| {
            format!("  ({r:.2}x plain; CPU: plain's / this {c:.2}x)")
        });
        println!(
            "{name:<8} {rate:>14.0} {:>12.3} {rss:>14.1} {cpu:>12.3}{shown}",
            n as f64 / rate
        );
        let mut note = format!("N = {n}, median of {rounds} rounds; CPU {cpu:.3} µs/msg");
        if let Some((r, c)) = ratios {
            note.push_str(&format!("; per-round ratio {r:.2}x, CPU ratio {c:.2}x"));
        }
        record(
            &Row::new("in-memory router", name, rate)
                .with_peak_rss(peaks[i])
                .with_note(note),
        );
    }
}
