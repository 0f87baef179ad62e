//! What the reliability stack costs per message: retry + correlation id + recoverer + dead
//! letter on a handler that never fails, as handler-level layers (`stack`) and as
//! router-level layers (`router-stack`), against the same handler without layers
//! (`plain`); and the same three beside a handler that does realistic work, decoding a
//! 1 KB JSON payload with serde_json (`json-plain`, `json-stack`, `json-router-stack`).
//!
//! Setup as core's `router` bench: N messages published in batches of 1,000 by one
//! publisher on the in-memory broker, timed from the first publish to the N-th message
//! handled. After a warm-up, each round runs every scenario once, in rotating order, so load
//! from other processes falls on all of them alike. Reported, as medians over rounds:
//! msg/s, the CPU time of the whole process per message (all threads, from /proc), and
//! per round against its baseline (`plain`, or `json-plain`) the extra CPU per message
//! in ns and the throughput ratio. Budgets (issue 20): the handler-level stack at most
//! 150 ns/msg over plain, the router-level stack at most 300 ns/msg, and beside the JSON
//! handler both at least 0.95× its throughput (msg/s; the CPU ratio is shown beside it).
//!
//! Environment: `BENCH_MESSAGES` (N, default 1,000,000; the JSON scenarios run N/5),
//! `BENCH_RUNS` (rounds, default 9), `BENCH_ONLY=correlation|dead-letter|retry|recoverer`
//! (the `stack` scenarios with that one layer), `BENCH_DISTINCT_PAYLOADS=1` (every
//! counting message its own payload buffer; the JSON scenarios always have their own),
//! `BENCH_NO_PLAIN=1` (skip the baselines, for profiling). Arguments name the scenarios to
//! run besides the baselines.
//!
//! Run: `cargo bench -p tidemill-middleware --bench stack`

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tidemill_core::{HandlerResult, MemoryBroker, Message, Publisher, Router};
use tidemill_middleware::{CorrelationId, DeadLetter, Recoverer, Retry};
use tidemill_testkit::bench::{median, process_cpu, record, Row};
use tokio::sync::Notify;

const BATCH: usize = 1_000;
/// Rounds by default: per-round ratios of the stack to plain spread by several per cent on
/// a shared 2-core machine, so the median needs more rounds than core's router bench.
const RUNS: usize = 9;
/// Budgets from issue 20.
const HANDLER_LEVEL_BUDGET_NS: f64 = 150.0;
const ROUTER_LEVEL_BUDGET_NS: f64 = 300.0;
const REALISTIC_RATIO_BUDGET: f64 = 0.95;

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

/// The realistic payload: an order of about 1 KB as JSON.
#[derive(Serialize, Deserialize)]
struct Order {
    id: u64,
    customer: String,
    currency: String,
    items: Vec<Item>,
    shipping: Address,
    note: String,
}

#[derive(Serialize, Deserialize)]
struct Item {
    sku: String,
    quantity: u32,
    price_cents: u64,
}

#[derive(Serialize, Deserialize)]
struct Address {
    name: String,
    street: String,
    city: String,
    postcode: String,
    country: String,
}

fn order_json() -> Bytes {
    let order = Order {
        id: 4_711_000_123,
        customer: "customer-0042-acme-industries".into(),
        currency: "EUR".into(),
        items: (0..12)
            .map(|i| Item {
                sku: format!("SKU-{i:04}-BLUE-XL"),
                quantity: i + 1,
                price_cents: 1_999 + u64::from(i) * 150,
            })
            .collect(),
        shipping: Address {
            name: "Ada Lovelace".into(),
            street: "12 Analytical Engine Lane".into(),
            city: "London".into(),
            postcode: "NW1 6XE".into(),
            country: "GB".into(),
        },
        note: "Leave the parcel with the neighbours if nobody answers the door.".into(),
    };
    let mut json = serde_json::to_vec(&order).unwrap_or_else(|e| panic!("encode: {e}"));
    // Pad the note to 1 KB of JSON.
    let missing = 1_024usize.saturating_sub(json.len());
    let mut padded = order;
    padded.note.push_str(&" ".repeat(missing));
    json = serde_json::to_vec(&padded).unwrap_or_else(|e| panic!("encode: {e}"));
    assert_eq!(json.len(), 1_024, "the JSON payload is 1 KB");
    Bytes::from(json)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Layers {
    /// No layers.
    Plain,
    /// Retry + correlation id + recoverer + dead letter, as handler-level layers.
    Stack,
    /// The same four at router level (each wraps a boxed handler).
    RouterStack,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Work {
    /// The handler counts (core's plain scenario): what the layers cost shows in full.
    Count,
    /// The handler decodes the 1 KB JSON order.
    Json,
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    name: &'static str,
    layers: Layers,
    work: Work,
}

impl Scenario {
    fn is_baseline(&self) -> bool {
        self.layers == Layers::Plain
    }
}

const SCENARIOS: [Scenario; 6] = [
    Scenario {
        name: "plain",
        layers: Layers::Plain,
        work: Work::Count,
    },
    Scenario {
        name: "stack",
        layers: Layers::Stack,
        work: Work::Count,
    },
    Scenario {
        name: "router-stack",
        layers: Layers::RouterStack,
        work: Work::Count,
    },
    Scenario {
        name: "json-plain",
        layers: Layers::Plain,
        work: Work::Json,
    },
    Scenario {
        name: "json-stack",
        layers: Layers::Stack,
        work: Work::Json,
    },
    Scenario {
        name: "json-router-stack",
        layers: Layers::RouterStack,
        work: Work::Json,
    },
];

async fn add_handler<F, Fut>(router: &Router, broker: &MemoryBroker, layers: Layers, handler: F)
where
    F: Fn(Message) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = HandlerResult> + Send + 'static,
{
    let builder = router
        .add_handler("work")
        .subscribe(broker.subscriber(), "in");
    let dead_letter = DeadLetter::new(broker.publisher(), "dead").max_deliveries(5);
    let result = match layers {
        Layers::Plain => builder.handler(handler).await,
        Layers::Stack => match std::env::var("BENCH_ONLY").ok().as_deref() {
            // One layer alone, to see what each costs.
            Some("correlation") => builder.layer(CorrelationId::new()).handler(handler).await,
            Some("dead-letter") => builder.layer(dead_letter).handler(handler).await,
            Some("retry") => builder.layer(Retry::new()).handler(handler).await,
            Some("recoverer") => builder.layer(Recoverer::new()).handler(handler).await,
            _ => {
                builder
                    .layer(CorrelationId::new())
                    .layer(dead_letter)
                    .layer(Retry::new())
                    .layer(Recoverer::new())
                    .handler(handler)
                    .await
            }
        },
        Layers::RouterStack => {
            router
                .layer(CorrelationId::new())
                .layer(dead_letter)
                .layer(Retry::new())
                .layer(Recoverer::new());
            builder.handler(handler).await
        }
    };
    result.unwrap_or_else(|e| panic!("adding the handler failed: {e}"));
}

async fn run(scenario: Scenario, n: usize) -> Duration {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let counter = Counter::new(n);
    match scenario.work {
        Work::Count => {
            let counter = counter.clone();
            let count = move |_m: Message| {
                counter.hit();
                async { HandlerResult::Ok(()) }
            };
            add_handler(&router, &broker, scenario.layers, count).await;
        }
        Work::Json => {
            let counter = counter.clone();
            let decode = move |m: Message| {
                let order = serde_json::from_slice::<Order>(m.payload());
                let result = match order {
                    Ok(order) => {
                        std::hint::black_box(&order);
                        Ok(())
                    }
                    Err(e) => Err(e.into()),
                };
                counter.hit();
                async move { result }
            };
            add_handler(&router, &broker, scenario.layers, decode).await;
        }
    }
    let running = router.clone();
    let run = tokio::spawn(async move { running.run().await });
    router.running().await;

    // Counting scenarios share one 100-byte payload buffer by default, like core's bench
    // (BENCH_DISTINCT_PAYLOADS=1 gives each message its own); JSON messages each have their
    // own copy, as received messages do.
    let (payload, distinct) = match scenario.work {
        Work::Count => (
            Bytes::from(vec![b'x'; 100]),
            std::env::var("BENCH_DISTINCT_PAYLOADS").is_ok_and(|v| v == "1"),
        ),
        Work::Json => (order_json(), true),
    };
    let publisher = broker.publisher();
    let started = Instant::now();
    let publishing = tokio::spawn(async move {
        let mut left = n;
        while left > 0 {
            let batch = left.min(BATCH);
            let msgs: Vec<Message> = if distinct {
                (0..batch)
                    .map(|_| Message::new(Bytes::copy_from_slice(&payload)))
                    .collect()
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
            "{}: stalled at {} of {n} messages for 120 s (the in-memory broker stopped delivering)",
            scenario.name,
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

/// One measured run: msg/s and CPU µs per message (NaN where /proc is unavailable).
fn measure(runtime: &tokio::runtime::Runtime, scenario: Scenario, n: usize) -> (f64, f64) {
    let cpu_before = process_cpu();
    let elapsed = runtime.block_on(run(scenario, n));
    let cpu = match (cpu_before, process_cpu()) {
        (Some(before), Some(after)) => after.checked_sub(before),
        _ => None,
    };
    (
        n as f64 / elapsed.as_secs_f64(),
        cpu.map_or(f64::NAN, |c| c.as_secs_f64() * 1e6 / n as f64),
    )
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v| v > 0)
}

/// One scenario's measurements, a value per round.
struct Series {
    scenario: Scenario,
    messages: usize,
    rates: Vec<f64>,
    cpus: Vec<f64>,
}

/// A scenario against its baseline, medians of the per-round figures.
struct Versus {
    rate_ratio: f64,
    cpu_ratio: f64,
    extra_ns: f64,
}

fn versus(s: &Series, base: &Series) -> Versus {
    let per_round =
        |f: &dyn Fn(usize) -> f64| median(&(0..s.rates.len()).map(f).collect::<Vec<_>>());
    Versus {
        rate_ratio: per_round(&|r| s.rates[r] / base.rates[r]),
        cpu_ratio: per_round(&|r| base.cpus[r] / s.cpus[r]),
        extra_ns: per_round(&|r| (s.cpus[r] - base.cpus[r]) * 1e3),
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "within budget"
    } else {
        "OVER BUDGET"
    }
}

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n = env_usize("BENCH_MESSAGES").unwrap_or(1_000_000);
    let runs = env_usize("BENCH_RUNS").unwrap_or(RUNS);
    let no_plain = std::env::var("BENCH_NO_PLAIN").is_ok_and(|v| v == "1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot build the runtime: {e}"));
    // Baselines run (unless BENCH_NO_PLAIN=1) whenever a scenario of their kind runs; the
    // others when no filter is given or one names them exactly.
    let wanted = |s: &Scenario| filter.is_empty() || filter.iter().any(|f| f == s.name);
    let mut series: Vec<Series> = SCENARIOS
        .iter()
        .filter(|s| {
            if s.is_baseline() {
                !no_plain
                    && SCENARIOS
                        .iter()
                        .any(|o| o.work == s.work && !o.is_baseline() && wanted(o))
            } else {
                wanted(s)
            }
        })
        .map(|&scenario| Series {
            scenario,
            messages: match scenario.work {
                Work::Count => n,
                Work::Json => (n / 5).max(1),
            },
            rates: Vec::new(),
            cpus: Vec::new(),
        })
        .collect();
    println!(
        "middleware stack on the in-memory broker: {n} messages (JSON scenarios {}), batches of {BATCH}, {runs} rounds, {} cores",
        (n / 5).max(1),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "stack = retry + correlation id + recoverer + dead letter{}; each round runs every scenario once, in rotating order; \
         figures are medians over rounds, comparisons medians of each round's against its baseline",
        std::env::var("BENCH_ONLY").map_or(String::new(), |only| format!(" (BENCH_ONLY={only}: that layer alone at handler level)"))
    );
    for s in &series {
        runtime.block_on(run(s.scenario, (s.messages / 10).max(1))); // warm-up
    }
    for round in 0..runs {
        let count = series.len();
        for k in 0..count {
            let s = &mut series[(round + k) % count];
            let (rate, cpu) = measure(&runtime, s.scenario, s.messages);
            s.rates.push(rate);
            s.cpus.push(cpu);
        }
    }
    let baseline = |work: Work| {
        series
            .iter()
            .find(|s| s.scenario.work == work && s.scenario.is_baseline())
    };
    println!();
    println!(
        "{:<18} {:>12} {:>11} {:>13} {:>16}",
        "scenario", "msg/s", "vs baseline", "CPU ns/msg", "extra ns/msg"
    );
    let mut budgets = Vec::new();
    for s in &series {
        let rate = median(&s.rates);
        let cpu_ns = median(&s.cpus) * 1e3;
        let group = match s.scenario.work {
            Work::Count => "middleware stack",
            Work::Json => "middleware stack, 1 KB JSON handler",
        };
        let mut note = format!("CPU {cpu_ns:.0} ns/msg, median of {runs} rounds");
        match baseline(s.scenario.work).filter(|_| !s.scenario.is_baseline()) {
            Some(base) => {
                let v = versus(s, base);
                println!(
                    "{:<18} {rate:>12.0} {:>10.2}x {cpu_ns:>13.0} {:>+16.0}",
                    s.scenario.name, v.rate_ratio, v.extra_ns
                );
                note.push_str(&format!(
                    "; {:+.0} ns/msg over {}, {:.2}x its msg/s, CPU ratio {:.2}x",
                    v.extra_ns, base.scenario.name, v.rate_ratio, v.cpu_ratio
                ));
                budgets.push((s.scenario, v));
            }
            None => println!(
                "{:<18} {rate:>12.0} {:>11} {cpu_ns:>13.0} {:>16}",
                s.scenario.name, "", ""
            ),
        }
        record(&Row::new(group, s.scenario.name, rate).with_note(note));
    }
    println!();
    println!("budgets (issue 20):");
    for (scenario, v) in &budgets {
        match (scenario.work, scenario.layers) {
            (Work::Count, Layers::Stack) => println!(
                "  handler-level stack: {:+.0} ns/msg of CPU over plain (budget <= {HANDLER_LEVEL_BUDGET_NS:.0}): {}",
                v.extra_ns,
                verdict(v.extra_ns <= HANDLER_LEVEL_BUDGET_NS)
            ),
            (Work::Count, Layers::RouterStack) => println!(
                "  router-level stack:  {:+.0} ns/msg of CPU over plain (budget <= {ROUTER_LEVEL_BUDGET_NS:.0}): {}",
                v.extra_ns,
                verdict(v.extra_ns <= ROUTER_LEVEL_BUDGET_NS)
            ),
            (Work::Json, layers) => println!(
                "  1 KB JSON handler, {}: {:.2}x json-plain's msg/s (budget >= {REALISTIC_RATIO_BUDGET:.2}x): {}; CPU ratio {:.2}x ({:+.0} ns/msg)",
                if layers == Layers::Stack { "handler-level stack" } else { "router-level stack" },
                v.rate_ratio,
                verdict(v.rate_ratio >= REALISTIC_RATIO_BUDGET),
                v.cpu_ratio,
                v.extra_ns,
            ),
            _ => {}
        }
    }
    if budgets.is_empty() {
        println!("  (no layered scenario ran)");
    }
}
