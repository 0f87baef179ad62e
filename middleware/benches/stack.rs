//! The reliability stack's overhead: retry + correlation id + recoverer + dead letter on a
//! handler that never fails, against the plain scenario (the same setup as core's `router`
//! bench: N messages of 100 bytes, published in batches of 1,000 by one publisher, timed
//! from the first publish to the N-th message handled).
//!
//! Rounds: after a warm-up, each round runs every scenario once, in rotating order, so load
//! from other processes hits all scenarios alike; the report gives medians over rounds and,
//! for the ratios, the median of each round's ratio to plain. Besides msg/s it reports the
//! CPU time of the whole process per message (all threads, from /proc), which other
//! processes on a shared machine disturb far less; its ratio is plain's CPU over the
//! scenario's (below 1: the scenario costs more).
//!
//! `BENCH_MESSAGES` sets N (default 1,000,000), `BENCH_RUNS` the rounds (default 9);
//! arguments name the scenarios to run besides `plain` (`stack`, `router-stack`),
//! `BENCH_NO_PLAIN=1` skips `plain` (for profiling one scenario);
//! `BENCH_ONLY=correlation|dead-letter|retry|recoverer` runs the `stack` scenario with that
//! one layer; `BENCH_DISTINCT_PAYLOADS=1` gives every message its own payload buffer.
//!
//! Run: `cargo bench -p tidemill-middleware --bench stack`

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidemill_testkit::bench::{median, process_cpu, record, Row};

use bytes::Bytes;
use tidemill_core::{HandlerResult, MemoryBroker, Message, Publisher, Router};
use tidemill_middleware::{CorrelationId, DeadLetter, Recoverer, Retry};
use tokio::sync::Notify;

const BATCH: usize = 1_000;
/// Measured rounds by default (`BENCH_RUNS` changes it); medians over rounds are reported.
/// Nine, not five like core's router bench: on the 2-core development machine the stack's
/// per-round ratio to plain spreads from 0.84x to 1.06x around a median of about 0.95x (30
/// rounds), so the median of five rounds moved by several per cent between invocations.
/// A round of all three scenarios takes about 2 s.
const RUNS: usize = 9;

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

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scenario {
    /// One consumer handler counts (core's plain scenario).
    Plain,
    /// The same handler under retry + correlation id + recoverer + dead letter, as
    /// handler-level layers.
    Stack,
    /// The same four layers at router level (each wraps a boxed handler).
    RouterStack,
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
    let builder = router
        .add_handler("count")
        .subscribe(broker.subscriber(), "in");
    let dead_letter = DeadLetter::new(broker.publisher(), "dead").max_deliveries(5);
    let result = match scenario {
        Scenario::Plain => builder.handler(count).await,
        Scenario::Stack => match std::env::var("BENCH_ONLY").ok().as_deref() {
            // One layer alone, to see what each costs.
            Some("correlation") => builder.layer(CorrelationId::new()).handler(count).await,
            Some("dead-letter") => builder.layer(dead_letter).handler(count).await,
            Some("retry") => builder.layer(Retry::new()).handler(count).await,
            Some("recoverer") => builder.layer(Recoverer::new()).handler(count).await,
            _ => {
                builder
                    .layer(CorrelationId::new())
                    .layer(dead_letter)
                    .layer(Retry::new())
                    .layer(Recoverer::new())
                    .handler(count)
                    .await
            }
        },
        Scenario::RouterStack => {
            router
                .layer(CorrelationId::new())
                .layer(dead_letter)
                .layer(Retry::new())
                .layer(Recoverer::new());
            builder.handler(count).await
        }
    };
    result.unwrap_or_else(|e| panic!("adding the handler failed: {e}"));
    let running = router.clone();
    let run = tokio::spawn(async move { running.run().await });
    router.running().await;

    let payload = Bytes::from(vec![b'x'; 100]);
    // Like core's bench, every message shares one payload buffer by default; layers that
    // keep a copy of the input then contend on its reference count across threads, which
    // real payloads (one buffer per message) do not. BENCH_DISTINCT_PAYLOADS=1 gives each
    // message its own buffer.
    let distinct = std::env::var("BENCH_DISTINCT_PAYLOADS").is_ok_and(|v| v == "1");
    let publisher = broker.publisher();
    let started = Instant::now();
    let publishing = tokio::spawn(async move {
        let mut left = n;
        while left > 0 {
            let batch = left.min(BATCH);
            let msgs: Vec<Message> = if distinct {
                (0..batch).map(|_| Message::new(payload.to_vec())).collect()
            } else {
                (0..batch).map(|_| Message::new(payload.clone())).collect()
            };
            publisher
                .publish("in", msgs)
                .await
                .unwrap_or_else(|e| panic!("publish failed: {e}"));
            left -= batch;
        }
    });
    if tokio::time::timeout(Duration::from_secs(120), counter.done.notified())
        .await
        .is_err()
    {
        panic!(
            "{scenario:?}: stalled at {} of {n} messages for 120 s (the in-memory broker stopped delivering)",
            counter.count.load(Ordering::Relaxed)
        );
    }
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

/// One measured run: wall-clock time and CPU time of the whole process.
fn measure(
    runtime: &tokio::runtime::Runtime,
    scenario: Scenario,
    n: usize,
) -> (Duration, Option<Duration>) {
    let cpu_before = process_cpu();
    let elapsed = runtime.block_on(run(scenario, n));
    let cpu = match (cpu_before, process_cpu()) {
        (Some(before), Some(after)) => after.checked_sub(before),
        _ => None,
    };
    (elapsed, cpu)
}

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(RUNS);
    let no_plain = std::env::var("BENCH_NO_PLAIN").is_ok_and(|v| v == "1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot build the runtime: {e}"));
    // Plain always runs (the ratios need it) unless BENCH_NO_PLAIN=1 (for profiling one
    // scenario); the others run when no filter is given or one names them exactly.
    let scenarios: Vec<(Scenario, &str)> = [
        (Scenario::Plain, "plain"),
        (Scenario::Stack, "stack"),
        (Scenario::RouterStack, "router-stack"),
    ]
    .into_iter()
    .filter(|(scenario, name)| match scenario {
        Scenario::Plain => !no_plain,
        _ => filter.is_empty() || filter.iter().any(|f| f == name),
    })
    .collect();
    println!(
        "middleware stack on the in-memory broker: {n} messages of 100 bytes, batches of {BATCH}, {runs} rounds, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "each round runs every scenario once, in rotating order; figures are medians over rounds, \
         ratios the median of each round's ratio to plain"
    );
    for &(scenario, _) in &scenarios {
        runtime.block_on(run(scenario, n / 10)); // warm-up
    }
    // Per scenario: msg/s and CPU µs per message, one entry per round.
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); scenarios.len()];
    let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); scenarios.len()];
    for round in 0..runs {
        for k in 0..scenarios.len() {
            let i = (round + k) % scenarios.len();
            let (elapsed, cpu) = measure(&runtime, scenarios[i].0, n);
            rates[i].push(n as f64 / elapsed.as_secs_f64());
            cpus[i].push(cpu.map_or(f64::NAN, |c| c.as_secs_f64() * 1e6 / n as f64));
        }
    }
    let plain = scenarios.iter().position(|(s, _)| *s == Scenario::Plain);
    println!(
        "{:<13} {:>12} {:>10} {:>14} {:>10}",
        "scenario", "msg/s", "vs plain", "CPU µs/msg", "vs plain"
    );
    for (i, (_, name)) in scenarios.iter().enumerate() {
        let ratio = |values: &[Vec<f64>], invert: bool| match plain {
            Some(p) if p != i => {
                let ratios: Vec<f64> = values[i]
                    .iter()
                    .zip(&values[p])
                    .map(|(x, base)| if invert { base / x } else { x / base })
                    .collect();
                let r = median(&ratios);
                format!("{r:.2}x")
            }
            _ => String::new(),
        };
        let (rate, rate_ratio) = (median(&rates[i]), ratio(&rates, false));
        let (cpu, cpu_ratio) = (median(&cpus[i]), ratio(&cpus, true));
        println!("{name:<13} {rate:>12.0} {rate_ratio:>10} {cpu:>14.3} {cpu_ratio:>10}");
        let mut note = format!("CPU {cpu:.3} µs/msg, median of {runs} rounds");
        if !rate_ratio.is_empty() {
            note.push_str(&format!(
                "; per-round ratio {rate_ratio}, CPU ratio {cpu_ratio}"
            ));
        }
        record(&Row::new("middleware stack", *name, rate).with_note(note));
    }
}
