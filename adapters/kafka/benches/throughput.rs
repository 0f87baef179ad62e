//! Raw rdkafka vs tidemill-kafka on the same broker, in the same run (`make bench-kafka`).
//!
//! - **publish**: N messages of 100 bytes in batches of 1,000; raw: `FutureProducer::
//!   send_result` for each record of a batch, then await every delivery future; Tidemill:
//!   `KafkaPublisher::publish(topic, batch)`. Same producer settings (idempotent,
//!   `acks=all`, librdkafka defaults otherwise). A Tidemill record carries its uuid in a
//!   header (`tidemill-uuid`), so raw is measured twice: bare records, and records with the
//!   same uuid header (the same records on the wire; the headline ratio).
//! - **consume**: N records of 100 bytes written by the raw producer (no headers: Tansu
//!   0.6 looks headers up without an index, so fetching records with headers gets slower
//!   the more headers the broker holds, for both clients alike), each side in a fresh
//!   consumer group from the start of the topic; raw: `StreamConsumer::recv` and
//!   `store_offset_from_message` for each record with auto-commit (at-least-once, like an
//!   ack); Tidemill: `KafkaSubscriber::subscribe(group)`, `ack()` each delivery. Timed
//!   from the first record to the N-th (the group join is not part of it).
//!
//! - **batch consume** (issue 22): N records of 100 bytes written by the raw producer (no
//!   headers), consumed in fresh groups from the start of one topic by (a) raw rdkafka in
//!   its natural batch mode: a `StreamConsumer::recv` loop gathering 500 records, then one
//!   async commit of the last one's offset, and so on; (b) the router with a
//!   single-message handler (default: sequential); (c) the router with
//!   `.batch(500, 50 ms)`. The handlers only read the payloads. Timed from the first record
//!   received to the N-th handled; CPU is the process's (every thread), per message.
//!   `TIDEMILL_BENCH_CALL_US` makes each handler call (per message, or per batch) wait
//!   that long, like a database round trip (default 0).
//!   `TIDEMILL_BENCH_BATCH_ONLY=1` runs only this section; `TIDEMILL_BENCH_BATCH_VARIANTS`
//!   (e.g. `batch` or `raw,single`) only some of its variants (to profile one), the
//!   others then report no figures.
//!
//! Each round measures raw and Tidemill on fresh topics (deleted at the end of the round),
//! alternating which goes first;
//! `TIDEMILL_BENCH_RUNS` rounds (default 3); the median rates and the median of the
//! per-round ratios are reported, with each variant's peak RSS: the process's `VmHWM`,
//! reset right before each timed section and read right after it, the largest over the
//! rounds (process-wide, so it includes what the bench itself holds). Environment:
//! `TIDEMILL_KAFKA_BROKERS` (default `127.0.0.1:9093`), `TIDEMILL_BENCH_MESSAGES` (N,
//! default 100,000), `TIDEMILL_BENCH_PARTITIONS` (default 1).

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tidemill_testkit::bench::{mib, process_cpu, record, PeakRss, Row};

use bytes::Bytes;
use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tidemill_core::router::BatchResult;
use tidemill_core::{
    DeliveryStream, HandlerResult, Message, Publisher, Result, Router, SubscribeOptions, Subscriber,
};
use tidemill_kafka::{KafkaConfig, KafkaPublisher, KafkaSubscriber, StartFrom};

const BATCH: usize = 1_000;
const PAYLOAD: usize = 100;
/// A consumer that receives nothing for this long has stalled: the bench fails.
const STALL: Duration = Duration::from_secs(30);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn unique(prefix: &str) -> String {
    format!("bench-{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// The producer settings of `KafkaConfig::default()` (see `KafkaConfig`'s docs).
fn raw_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000")
        .set("message.max.bytes", "1000000")
        .create()
        .expect("raw producer")
}

async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    for r in admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic")
    {
        r.expect("create topic");
    }
}

/// Deletes the bench's topics, so that repeated runs do not fill the test broker.
async fn delete_topics(brokers: &str, topics: &[String]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    if let Err(e) = admin.delete_topics(&names, &opts).await {
        eprintln!("deleting the bench topics failed: {e}");
    }
}

/// One timed run: its duration, the peak RSS (bytes) during it and the CPU time of the
/// process (every thread) over it, where known.
type Run = (Duration, Option<u64>, Option<Duration>);

/// The runs of one variant over the rounds.
#[derive(Default)]
struct Runs {
    times: Vec<Duration>,
    /// The largest peak RSS of its runs.
    peak_rss: Option<u64>,
    cpu: Vec<Duration>,
}

impl Runs {
    fn add(&mut self, (elapsed, peak, cpu): Run) {
        self.times.push(elapsed);
        self.peak_rss = self.peak_rss.max(peak);
        self.cpu.extend(cpu);
    }

    /// The median CPU time per message (µs) over the runs, where measured.
    fn cpu_us(&self, n: usize) -> Option<f64> {
        (!self.cpu.is_empty()).then(|| median(self.cpu.clone()).as_secs_f64() * 1e6 / n as f64)
    }
}

/// CPU time of the process since `since`, where known.
fn cpu_since(since: Option<Duration>) -> Option<Duration> {
    Some(process_cpu()?.saturating_sub(since?))
}

/// Publishes `n` records; with `uuid_header`, each carries a fresh uuid in the header
/// Tidemill uses, like a Tidemill message.
async fn publish_raw(producer: &FutureProducer, topic: &str, n: usize, uuid_header: bool) -> Run {
    let payload = [b'x'; PAYLOAD];
    PeakRss::reset();
    let (started, cpu) = (Instant::now(), process_cpu());
    let mut sent = 0;
    while sent < n {
        let count = BATCH.min(n - sent);
        let mut pending = Vec::with_capacity(count);
        for _ in 0..count {
            let mut record = FutureRecord::<(), [u8]>::to(topic).payload(&payload[..]);
            if uuid_header {
                let id = uuid::Uuid::new_v4().hyphenated().to_string();
                record = record.headers(OwnedHeaders::new_with_capacity(1).insert(Header {
                    key: "tidemill-uuid",
                    value: Some(&id),
                }));
            }
            loop {
                match producer.send_result(record) {
                    Ok(f) => {
                        pending.push(f);
                        break;
                    }
                    Err((_, r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }
        for f in pending {
            f.await
                .expect("delivery future")
                .map_err(|(e, _)| e)
                .expect("delivery");
        }
        sent += count;
    }
    let elapsed = started.elapsed();
    (elapsed, PeakRss::read(), cpu_since(cpu))
}

async fn publish_tidemill(publisher: &KafkaPublisher, topic: &str, n: usize) -> Run {
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    PeakRss::reset();
    let (started, cpu) = (Instant::now(), process_cpu());
    let mut sent = 0;
    while sent < n {
        let count = BATCH.min(n - sent);
        let batch: Vec<Message> = (0..count).map(|_| Message::new(payload.clone())).collect();
        publisher.publish(topic, batch).await.expect("publish");
        sent += count;
    }
    let elapsed = started.elapsed();
    (elapsed, PeakRss::read(), cpu_since(cpu))
}

async fn consume_raw(brokers: &str, topic: &str, n: usize) -> Run {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("raw"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .create()
        .expect("raw consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    PeakRss::reset();
    let mut started = None;
    for i in 0..n {
        let m = tokio::time::timeout(STALL, consumer.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("raw consumer: record {i} of {n} not received within {STALL:?}")
            })
            .expect("record");
        started.get_or_insert_with(|| (Instant::now(), process_cpu()));
        black_box(m.payload());
        consumer
            .store_offset_from_message(&m)
            .expect("store offset");
    }
    let elapsed = started.map(|s| s.0.elapsed()).unwrap_or_default();
    (
        elapsed,
        PeakRss::read(),
        started.and_then(|s| cpu_since(s.1)),
    )
}

async fn consume_tidemill(config: &KafkaConfig, topic: &str, n: usize) -> Run {
    let subscriber = KafkaSubscriber::connect(config.clone())
        .await
        .expect("subscriber");
    let mut stream = subscriber
        .subscribe(topic, SubscribeOptions::group(unique("tidemill")))
        .await
        .expect("subscribe");
    PeakRss::reset();
    let mut started = None;
    for i in 0..n {
        let d = tokio::time::timeout(STALL, stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!("tidemill: delivery {i} of {n} not received within {STALL:?}")
            })
            .expect("stream open")
            .expect("delivery");
        started.get_or_insert_with(|| (Instant::now(), process_cpu()));
        black_box(d.message().payload());
        d.ack().await.expect("ack");
    }
    let elapsed = started.map(|s| s.0.elapsed()).unwrap_or_default();
    let cpu = started.and_then(|s| cpu_since(s.1));
    let peak = PeakRss::read();
    subscriber.close().await.expect("close");
    (elapsed, peak, cpu)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// Prints the median rates and the median of the per-round ratios (raw and Tidemill of
/// one round ran back to back, so their ratio is less affected by a busy machine).
fn report(what: &str, n: usize, raw: &Runs, tidemill: &Runs) {
    let (r, t) = (
        rate(n, median(raw.times.clone())),
        rate(n, median(tidemill.times.clone())),
    );
    let mut ratios: Vec<f64> = raw
        .times
        .iter()
        .zip(&tidemill.times)
        .map(|(r, t)| r.as_secs_f64() / t.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    let rounds: Vec<String> = ratios.iter().map(|x| format!("{x:.2}")).collect();
    let ratio = ratios[ratios.len() / 2];
    println!(
        "{what:<8} raw rdkafka {r:>10.0} msg/s   tidemill {t:>10.0} msg/s   ratio {ratio:.2} (per round: {})",
        rounds.join(" ")
    );
    let us = |c: Option<f64>| c.map_or_else(|| "n/a".to_owned(), |c| format!("{c:.2}"));
    let (raw_cpu, tm_cpu) = (raw.cpu_us(n), tidemill.cpu_us(n));
    println!(
        "         CPU µs/msg: raw rdkafka {}, tidemill {}; peak RSS MiB: raw rdkafka {}, tidemill {}",
        us(raw_cpu),
        us(tm_cpu),
        mib(raw.peak_rss),
        mib(tidemill.peak_rss)
    );
    let group = format!("kafka {what}");
    record(
        &Row::new(group.as_str(), "raw rdkafka", r)
            .with_peak_rss(raw.peak_rss)
            .with_note(format!("CPU {} µs/msg", us(raw_cpu))),
    );
    record(
        &Row::new(group.as_str(), "tidemill-kafka", t)
            .with_peak_rss(tidemill.peak_rss)
            .with_note(format!(
                "CPU {} µs/msg; median of {} rounds; median per-round ratio {ratio:.2}",
                us(tm_cpu),
                ratios.len()
            )),
    );
}

/// Records per raw batch and per batch handler call.
const CONSUME_BATCH: usize = 500;
/// The batch handler's `max_wait`.
const CONSUME_WAIT: Duration = Duration::from_millis(50);

/// What one handler call (a message, or a batch) waits for, like a database round trip:
/// `TIDEMILL_BENCH_CALL_US` microseconds (default 0: nothing; tokio's timer rounds up
/// to whole milliseconds).
async fn call() {
    static CALL: OnceLock<Duration> = OnceLock::new();
    let wait = *CALL.get_or_init(|| Duration::from_micros(env_or("TIDEMILL_BENCH_CALL_US", 0)));
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}

/// One timed consume run of the batch section.
#[derive(Clone, Copy)]
struct Consumed {
    elapsed: Duration,
    /// CPU time of the process over `elapsed`, where known.
    cpu: Option<Duration>,
    peak_rss: Option<u64>,
}

/// Where a timed consume run is: started at its first record, done at the N-th handled.
struct Progress {
    n: usize,
    handled: AtomicUsize,
    started: OnceLock<(Instant, Option<Duration>)>,
    done: tokio::sync::Notify,
}

impl Progress {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Progress {
            n,
            handled: AtomicUsize::new(0),
            started: OnceLock::new(),
            done: tokio::sync::Notify::new(),
        })
    }

    fn start(&self) {
        self.started.get_or_init(|| {
            PeakRss::reset();
            (Instant::now(), process_cpu())
        });
    }

    fn handled(&self, k: usize) {
        if self.handled.fetch_add(k, AtomicOrdering::AcqRel) + k == self.n {
            self.done.notify_one();
        }
    }

    fn finish(&self) -> Consumed {
        let (t0, cpu0) = *self.started.get().expect("started");
        let elapsed = t0.elapsed();
        let cpu = match (cpu0, process_cpu()) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        Consumed {
            elapsed,
            cpu,
            peak_rss: PeakRss::read(),
        }
    }
}

/// A `KafkaSubscriber` that starts the clock of a [`Progress`] at the first delivery its
/// stream hands out (as the raw side starts at its first record: the group join is not
/// part of a run).
struct Clocked {
    inner: KafkaSubscriber,
    progress: Arc<Progress>,
}

#[async_trait::async_trait]
impl Subscriber for Clocked {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<DeliveryStream> {
        let progress = self.progress.clone();
        let stream = self.inner.subscribe(topic, options).await?;
        Ok(DeliveryStream::new(
            stream.inspect(move |_| progress.start()),
        ))
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

/// (a) raw rdkafka, batches of [`CONSUME_BATCH`] records, one async commit per batch.
async fn consume_raw_batches(brokers: &str, topic: &str, n: usize) -> Consumed {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("raw-batch"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("raw consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let progress = Progress::new(n);
    let mut batch = Vec::with_capacity(CONSUME_BATCH);
    let mut received = 0;
    while received < n {
        let m = tokio::time::timeout(STALL, consumer.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("raw consumer: record {received} of {n} not received within {STALL:?}")
            })
            .expect("record");
        progress.start();
        received += 1;
        batch.push(m);
        if batch.len() == CONSUME_BATCH || received == n {
            for m in &batch {
                black_box(m.payload());
            }
            call().await;
            let last = batch.last().expect("a record");
            consumer
                .commit_message(last, CommitMode::Async)
                .expect("commit");
            progress.handled(batch.len());
            batch.clear();
        }
    }
    progress.finish()
}

/// (b) and (c): the router, with a single-message handler or with a batch handler.
async fn consume_router(config: &KafkaConfig, topic: &str, n: usize, batch: bool) -> Consumed {
    let progress = Progress::new(n);
    let subscriber = KafkaSubscriber::connect(config.clone())
        .await
        .expect("subscriber");
    let clocked = Clocked {
        inner: subscriber.clone(),
        progress: progress.clone(),
    };
    let router = Router::new();
    let handler = router
        .add_handler("bench")
        .subscribe(clocked, topic)
        .group(unique(if batch { "batch" } else { "single" }));
    let p = progress.clone();
    if batch {
        handler
            .batch(CONSUME_BATCH, CONSUME_WAIT)
            .handler(move |msgs: Vec<Message>| {
                let p = p.clone();
                async move {
                    for m in &msgs {
                        black_box(m.payload());
                    }
                    call().await;
                    p.handled(msgs.len());
                    HandlerResult::Ok(BatchResult::ok())
                }
            })
            .await
            .expect("batch handler");
    } else {
        handler
            .handler(move |m: Message| {
                let p = p.clone();
                async move {
                    black_box(m.payload());
                    call().await;
                    p.handled(1);
                    HandlerResult::Ok(())
                }
            })
            .await
            .expect("handler");
    }
    let run = {
        let r = router.clone();
        tokio::spawn(async move { r.run().await })
    };
    let done = progress.done.notified();
    if progress.handled.load(AtomicOrdering::Acquire) < n {
        tokio::time::timeout(STALL * 10, done)
            .await
            .unwrap_or_else(|_| panic!("router: {n} messages not handled within {:?}", STALL * 10));
    }
    let result = progress.finish();
    router.close().await.expect("close the router");
    run.await.expect("router task").expect("router");
    subscriber.close().await.expect("close");
    result
}

/// The batch section's runs of one variant.
#[derive(Default)]
struct BatchRuns(Vec<Consumed>);

impl BatchRuns {
    fn rate(&self, n: usize) -> f64 {
        let rates: Vec<f64> = self.0.iter().map(|c| rate(n, c.elapsed)).collect();
        tidemill_testkit::bench::median(&rates)
    }

    fn cpu_us(&self, n: usize) -> f64 {
        let us: Vec<f64> = self
            .0
            .iter()
            .filter_map(|c| c.cpu)
            .map(|c| c.as_secs_f64() * 1e6 / n as f64)
            .collect();
        tidemill_testkit::bench::median(&us)
    }

    fn peak_rss(&self) -> Option<u64> {
        self.0.iter().filter_map(|c| c.peak_rss).max()
    }

    /// The median of the per-round ratios of this variant's rate to `other`'s.
    fn ratio_to(&self, other: &BatchRuns) -> (f64, Vec<f64>) {
        let ratios: Vec<f64> = self
            .0
            .iter()
            .zip(&other.0)
            .map(|(a, b)| b.elapsed.as_secs_f64() / a.elapsed.as_secs_f64())
            .collect();
        (tidemill_testkit::bench::median(&ratios), ratios)
    }
}

/// The batch section: `runs` rounds, each on a fresh topic of `n` records, the three
/// variants in turn (the order reversed every other round).
async fn batch_section(
    brokers: &str,
    config: &KafkaConfig,
    producer: &FutureProducer,
    n: usize,
    runs: usize,
    partitions: i32,
) {
    let (mut raw, mut single, mut batch) = (
        BatchRuns::default(),
        BatchRuns::default(),
        BatchRuns::default(),
    );
    // For profiling one variant at a time: e.g. `TIDEMILL_BENCH_BATCH_VARIANTS=batch`.
    let only = std::env::var("TIDEMILL_BENCH_BATCH_VARIANTS").unwrap_or_default();
    let only: Vec<&str> = only.split(',').filter(|v| !v.is_empty()).collect();
    for round in 0..runs {
        let topic = unique("batch");
        create_topic(brokers, &topic, partitions).await;
        publish_raw(producer, &topic, n, false).await;
        let mut order = [0, 1, 2];
        if round % 2 == 1 {
            order.reverse();
        }
        for variant in order {
            if !only.is_empty() && !only.contains(&["raw", "single", "batch"][variant]) {
                continue;
            }
            match variant {
                0 => raw.0.push(consume_raw_batches(brokers, &topic, n).await),
                1 => single
                    .0
                    .push(consume_router(config, &topic, n, false).await),
                _ => batch.0.push(consume_router(config, &topic, n, true).await),
            }
        }
        delete_topics(brokers, &[topic]).await;
    }
    let (vs_raw, vs_raw_rounds) = batch.ratio_to(&raw);
    let (vs_single, vs_single_rounds) = batch.ratio_to(&single);
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let call_us: u64 = env_or("TIDEMILL_BENCH_CALL_US", 0);
    println!(
        "batch consume ({CONSUME_BATCH} per batch, max_wait {CONSUME_WAIT:?}, {call_us} µs per handler call):"
    );
    println!(
        "         {:<44} {:>10} {:>12} {:>14}",
        "variant", "msg/s", "CPU µs/msg", "peak RSS MiB"
    );
    let rows = [
        ("raw rdkafka (recv, async commit per 500)", &raw),
        ("router, single-message handler", &single),
        ("router, .batch(500, 50ms)", &batch),
    ];
    for (name, runs) in rows {
        println!(
            "         {name:<44} {:>10.0} {:>12.2} {:>14}",
            runs.rate(n),
            runs.cpu_us(n),
            mib(runs.peak_rss())
        );
    }
    println!(
        "         batch / raw batch {vs_raw:.2} (per round: {}); batch / single-message {vs_single:.2} (per round: {})",
        fmt(&vs_raw_rounds),
        fmt(&vs_single_rounds)
    );
    let group = match call_us {
        0 => "kafka batch consume".to_owned(),
        us => format!("kafka batch consume, {us} µs per handler call"),
    };
    for (i, (name, runs)) in rows.into_iter().enumerate() {
        let mut row = Row::new(group.as_str(), name, runs.rate(n)).with_peak_rss(runs.peak_rss());
        let cpu = format!("CPU {:.2} µs/msg", runs.cpu_us(n));
        row = row.with_note(match i {
            2 => format!(
                "{cpu}; median of {} rounds; per-round ratio to raw batch {vs_raw:.2}, to single-message {vs_single:.2}",
                runs.0.len()
            ),
            _ => cpu,
        });
        record(&row);
    }
}

fn main() {
    let brokers =
        std::env::var("TIDEMILL_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9093".into());
    let n: usize = env_or("TIDEMILL_BENCH_MESSAGES", 100_000);
    let runs: usize = env_or("TIDEMILL_BENCH_RUNS", 3).max(1);
    let partitions: i32 = env_or("TIDEMILL_BENCH_PARTITIONS", 1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        println!(
            "kafka throughput: {n} messages of {PAYLOAD} bytes, batches of {BATCH}, {partitions} partition(s), median of {runs} runs, brokers {brokers}"
        );
        let mut config = KafkaConfig::new(&brokers);
        config.partitions = partitions;
        config.start_from = StartFrom::Earliest;
        let publisher = KafkaPublisher::connect(config.clone())
            .await
            .expect("cannot reach the broker (make bench-kafka starts it)");
        let producer = raw_producer(&brokers);

        // Warm-up: connections, metadata, topic creation paths.
        let warm = unique("warmup");
        create_topic(&brokers, &warm, partitions).await;
        publish_raw(&producer, &warm, BATCH, true).await;
        publish_tidemill(&publisher, &warm, BATCH).await;

        if std::env::var("TIDEMILL_BENCH_BATCH_ONLY").is_ok_and(|v| v == "1") {
            batch_section(&brokers, &config, &producer, n, runs, partitions).await;
            publisher.close().await.expect("close");
            delete_topics(&brokers, &[warm]).await;
            return;
        }
        let (mut bare, mut raw_pub, mut tm_pub) =
            (Runs::default(), Runs::default(), Runs::default());
        let (mut raw_con, mut tm_con) = (Runs::default(), Runs::default());
        for round in 0..runs {
            let raw_first = round % 2 == 0;
            // 1. Bare records (no headers), consumed by both sides (see the module docs)
            //    before any records with headers of this round exist.
            let bare_topic = unique("bare");
            create_topic(&brokers, &bare_topic, partitions).await;
            bare.add(publish_raw(&producer, &bare_topic, n, false).await);
            if raw_first {
                raw_con.add(consume_raw(&brokers, &bare_topic, n).await);
                tm_con.add(consume_tidemill(&config, &bare_topic, n).await);
            } else {
                tm_con.add(consume_tidemill(&config, &bare_topic, n).await);
                raw_con.add(consume_raw(&brokers, &bare_topic, n).await);
            }
            // 2. The same records with a uuid header, raw and through Tidemill.
            let raw_topic = unique("raw");
            create_topic(&brokers, &raw_topic, partitions).await;
            let tm_topic = unique("tidemill");
            publisher.ensure_topic(&tm_topic).await.expect("topic");
            if raw_first {
                raw_pub.add(publish_raw(&producer, &raw_topic, n, true).await);
                tm_pub.add(publish_tidemill(&publisher, &tm_topic, n).await);
            } else {
                tm_pub.add(publish_tidemill(&publisher, &tm_topic, n).await);
                raw_pub.add(publish_raw(&producer, &raw_topic, n, true).await);
            }
            // 3. Their records go (with their header rows) before the next round consumes.
            delete_topics(&brokers, &[bare_topic, raw_topic, tm_topic]).await;
        }
        report("publish", n, &raw_pub, &tm_pub);
        let (bare_time, tm_pub_time) = (median(bare.times), median(tm_pub.times));
        println!(
            "         (raw rdkafka without the uuid header {:>10.0} msg/s, peak RSS MiB {}; tidemill / that = {:.2})",
            rate(n, bare_time),
            mib(bare.peak_rss),
            rate(n, tm_pub_time) / rate(n, bare_time)
        );
        report("consume", n, &raw_con, &tm_con);
        batch_section(&brokers, &config, &producer, n, runs, partitions).await;
        publisher.close().await.expect("close");
        delete_topics(&brokers, &[warm]).await;
    });
}
