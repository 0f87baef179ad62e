//! `cargo bench -p tidemill-otel --bench router`: what tracing and metrics cost per message
//! in the router on the in-memory broker, against the plain router in the same run.
//!
//! Scenarios (N messages of 100 bytes, published in batches of 1,000, one consumer-only
//! handler counts them):
//! - plain:    no tracer, no metrics recorder, no tracing subscriber (the default);
//! - off:      `OtelTracer`, tracing-opentelemetry's layer with sampling off (no exporter),
//!   a Prometheus recorder, an `InstrumentedPublisher` (so every message carries a
//!   `traceparent` the router extracts);
//! - sampled:  the same with every span sampled into the in-memory exporter (emptied after
//!   each run).
//!
//! Each scenario runs on a 2-thread runtime of its own whose threads have the scenario's
//! tracing subscriber and metrics recorder as their defaults, so the plain runtime has
//! none. Rounds run every scenario once in rotating order; the report gives the median CPU
//! time per message of the whole process and the median of each round's extra CPU over
//! plain. Budgets (issue 21): off ≤ 300 ns/msg, sampled ≤ 1.5 µs/msg over plain.
//! `BENCH_MESSAGES` sets N (default 200,000), `BENCH_RUNS` the rounds (default 5).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, Sampler, SdkTracerProvider};
use tidemill_core::{HandlerResult, MemoryBroker, Message, Publisher, Router, RouterConfig};
use tidemill_otel::{InstrumentedPublisher, OtelTracer};
use tidemill_testkit::bench::{median, process_cpu, record, Row};
use tokio::runtime::Runtime;
use tokio::sync::Notify;
use tracing_subscriber::layer::SubscriberExt;

const BATCH: usize = 1_000;

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    Plain,
    Off,
    Sampled,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Plain => "plain",
            Scenario::Off => "off",
            Scenario::Sampled => "sampled",
        }
    }
}

/// A runtime whose threads default to `dispatch` and `recorder` (none for plain).
fn runtime(
    observed: Option<(tracing::Dispatch, &'static (dyn metrics::Recorder + Sync))>,
) -> Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    if let Some((dispatch, recorder)) = observed {
        builder.on_thread_start(move || {
            // The runtime's threads live as long as the bench: keep the defaults set.
            std::mem::forget(tracing::dispatcher::set_default(&dispatch));
            std::mem::forget(metrics::set_default_local_recorder(recorder));
        });
    }
    builder
        .build()
        .unwrap_or_else(|e| panic!("cannot build a runtime: {e}"))
}

fn observed(sampler: Sampler, exporter: Option<InMemorySpanExporter>) -> Runtime {
    let mut provider = SdkTracerProvider::builder().with_sampler(sampler);
    if let Some(exporter) = exporter {
        provider = provider.with_simple_exporter(exporter);
    }
    let provider = provider.build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("bench")));
    let recorder: &'static (dyn metrics::Recorder + Sync) = Box::leak(Box::new(
        metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder(),
    ));
    runtime(Some((tracing::Dispatch::new(subscriber), recorder)))
}

async fn run(scenario: Scenario, n: usize) -> Duration {
    let broker = MemoryBroker::new();
    let mut config = RouterConfig::default();
    let publisher: Arc<dyn Publisher> = if scenario == Scenario::Plain {
        Arc::new(broker.publisher())
    } else {
        config = config.with_tracer(OtelTracer::new());
        Arc::new(InstrumentedPublisher::new(broker.publisher()))
    };
    let router = Router::with_config(config);
    let count = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    {
        let (count, done) = (count.clone(), done.clone());
        router
            .add_handler("count")
            .subscribe(broker.subscriber(), "in")
            .handler(move |_m: Message| {
                if count.fetch_add(1, Ordering::Relaxed) + 1 == n {
                    done.notify_one();
                }
                async { HandlerResult::Ok(()) }
            })
            .await
            .unwrap_or_else(|e| panic!("adding the handler failed: {e}"));
    }
    let running = router.clone();
    let run = tokio::spawn(async move { running.run().await });
    router.running().await;
    let payload = Bytes::from(vec![b'x'; 100]);
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
    done.notified().await;
    let elapsed = started.elapsed();
    let _ = publishing.await;
    router
        .close()
        .await
        .unwrap_or_else(|e| panic!("close failed: {e}"));
    let _ = run.await;
    elapsed
}

fn main() {
    let n: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let rounds: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(5);
    let exporter = InMemorySpanExporter::default();
    let scenarios = [Scenario::Plain, Scenario::Off, Scenario::Sampled];
    let runtimes = [
        runtime(None),
        observed(Sampler::AlwaysOff, None),
        observed(Sampler::AlwaysOn, Some(exporter.clone())),
    ];
    println!(
        "router with tracing and metrics on the in-memory broker: {n} messages of 100 bytes, \
         batches of {BATCH}, {rounds} rounds, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let measure = |i: usize, n: usize| {
        let before = process_cpu();
        let elapsed = runtimes[i].block_on(run(scenarios[i], n));
        let cpu = match (before, process_cpu()) {
            (Some(b), Some(a)) => a.checked_sub(b),
            _ => None,
        };
        exporter.reset();
        (
            n as f64 / elapsed.as_secs_f64(),
            cpu.map_or(f64::NAN, |c| c.as_secs_f64() * 1e9 / n as f64),
        )
    };
    for i in 0..scenarios.len() {
        measure(i, n / 10);
    }
    let mut rates = vec![Vec::new(); scenarios.len()];
    let mut cpus = vec![Vec::new(); scenarios.len()];
    for round in 0..rounds {
        for k in 0..scenarios.len() {
            let i = (round + k) % scenarios.len();
            let (rate, cpu) = measure(i, n);
            rates[i].push(rate);
            cpus[i].push(cpu);
        }
    }
    println!(
        "{:<8} {:>12} {:>12} {:>16}",
        "scenario", "msg/s", "CPU ns/msg", "extra ns/msg"
    );
    for (i, s) in scenarios.iter().enumerate() {
        let extra: Vec<f64> = cpus[i].iter().zip(&cpus[0]).map(|(x, p)| x - p).collect();
        let extra = median(&extra);
        let (rate, cpu) = (median(&rates[i]), median(&cpus[i]));
        let budget = match s {
            Scenario::Plain => String::new(),
            Scenario::Off => "  (budget 300)".to_owned(),
            Scenario::Sampled => "  (budget 1500)".to_owned(),
        };
        println!(
            "{:<8} {rate:>12.0} {cpu:>12.0} {:>16}{budget}",
            s.name(),
            if i == 0 {
                "-".to_owned()
            } else {
                format!("{extra:+.0}")
            }
        );
        record(
            &Row::new("in-memory router, observability", s.name(), rate).with_note(format!(
                "N = {n}, median of {rounds} rounds; CPU {cpu:.0} ns/msg, {extra:+.0} ns/msg over plain"
            )),
        );
    }
}
