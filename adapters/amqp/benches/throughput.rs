//! Raw `lapin` vs Tidemill on RabbitMQ, same settings, same run.
//!
//! `make bench-amqp` (or `cargo bench -p tidemill-amqp --bench throughput` with
//! `TIDEMILL_AMQP_URL` set). Every measurement uses a fresh connection and a fresh durable
//! fanout exchange with one durable queue bound to it (the topology Tidemill declares for a
//! consumer group):
//!
//! - publish: N messages of 100 bytes in batches of 1,000, persistent (delivery mode 2),
//!   each with a UUIDv7 `message-id`, on a channel in confirm mode; timed until every
//!   message of every batch is confirmed. Raw, two ways: `basic_publish(..).await` for
//!   each message of a batch, then the batch's confirms awaited together (lapin's
//!   documented pattern, "raw"), and all of a batch's `basic_publish` futures joined, then
//!   the confirms ("raw pipelined", what Tidemill does inside). Tidemill:
//!   `Publisher::publish(topic, batch)`.
//! - consume: the N messages a publish left in its queue, prefetch 128, manual acks; timed
//!   from starting the consumer until the N-th message is received and acked. Raw:
//!   `basic_consume` + `Consumer::next` + `Acker::ack` on the queue the "raw pipelined" run
//!   filled. Tidemill: `Subscriber::subscribe` (group) + `DeliveryStream::next` +
//!   `Delivery::ack` on the queue its own publish filled. Both queues were filled the same
//!   way (a batch's sends joined): how a queue was filled changes how fast anyone can drain
//!   it (a queue filled one awaited send at a time drained at 15-17k msg/s where a
//!   pipelined one drained at 11-13k on the test broker, whichever client read it), so the
//!   two consumers read like-filled queues.
//!
//! The order of the sides rotates from round to round. Reported: the median of the rounds'
//! rates, the median of the rounds' Tidemill/raw ratios (each round's sides run back to
//! back), the client's CPU time per message (all threads, from /proc), and
//! each side's peak RSS: the process's `VmHWM`, reset right before each timed section and
//! read right after it, the largest over the rounds (process-wide, so it includes what the
//! bench itself holds).
//!
//! - batch consume (issue 22): each round publishes N messages of 100 bytes once (Tidemill
//!   publisher, persistent, confirmed) to a fresh exchange with three group queues bound, so
//!   the three variants read like-filled queues, each with prefetch 1,000: (a) raw lapin in
//!   its natural batch mode: `basic_consume` + `Consumer::next`, one `basic.ack` with
//!   `multiple = true` per 500 deliveries (and one for the remainder); (b) the router with
//!   a single-message handler (default: sequential); (c) the router with
//!   `.batch(500, 50 ms)`. The handlers only read the payloads. Timed from the first
//!   delivery received to the N-th handled (raw: its ack written); the variants' order is
//!   reversed every other round. CPU is the process's (every thread), per message.
//!   `TIDEMILL_BENCH_BATCH_ONLY=1` runs only this section.
//!
//! Environment: `TIDEMILL_BENCH_MESSAGES` (N, default 50,000), `TIDEMILL_BENCH_ROUNDS`
//! (default 5).

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use tidemill_amqp::{AmqpConfig, AmqpPublisher, AmqpSubscriber};
use tidemill_core::router::BatchResult;
use tidemill_core::{
    DeliveryStream, HandlerResult, Message, Publisher, Router, SubscribeOptions, Subscriber,
};
use tidemill_testkit::bench::{
    broker_address, env_count, median, mib, process_cpu, record, PeakRss, Row,
};

const PAYLOAD: usize = 100;
const BATCH: usize = 1_000;
const PREFETCH: u16 = 128;
const GROUP: &str = "bench";
const LIMIT: Duration = Duration::from_secs(600);

mod common;
use common::BoxError;

fn main() -> Result<(), BoxError> {
    let Some(url) = broker_address("TIDEMILL_AMQP_URL", "bench-amqp") else {
        return Ok(());
    };
    let n = env_count("TIDEMILL_BENCH_MESSAGES", 50_000);
    let rounds = env_count("TIDEMILL_BENCH_ROUNDS", 5);
    let batch_only = std::env::var("TIDEMILL_BENCH_BATCH_ONLY").is_ok_and(|v| v == "1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        if !batch_only {
            run(url.clone(), n, rounds).await?;
        }
        batch_section(url, n, rounds).await
    })
}

/// The three ways of publishing measured.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Side {
    Raw,
    RawPipelined,
    Tidemill,
}

struct Bench {
    url: String,
    config: AmqpConfig,
    n: usize,
}

/// Messages per second, microseconds of client CPU per message, and the peak RSS (bytes)
/// during the timed section, where known.
type Measure = (f64, f64, Option<u64>);

async fn run(url: String, n: usize, rounds: usize) -> Result<(), BoxError> {
    let config = AmqpConfig {
        prefetch: PREFETCH,
        persistent: true,
        ..AmqpConfig::new(url.clone())
    };
    println!(
        "RabbitMQ: {n} messages of {PAYLOAD} bytes, batches of {BATCH}, persistent, publisher \
         confirms, prefetch {PREFETCH}, manual acks; {rounds} rounds, median"
    );
    // Warm-up: code paths, the broker's queue processes.
    let warm = Bench {
        url: url.clone(),
        config: config.clone(),
        n: (n / 10).max(1_000),
    };
    warm.round(0).await?;

    let bench = Bench { url, config, n };
    let mut rows: Vec<[Measure; 5]> = Vec::new();
    for round in 0..rounds {
        let row = bench.round(round).await?;
        println!(
            "  round {}: publish raw {:>6.0}, raw pipelined {:>6.0}, tidemill {:>6.0} msg/s; \
             consume raw {:>6.0}, tidemill {:>6.0} msg/s",
            round + 1,
            row[0].0,
            row[1].0,
            row[2].0,
            row[3].0,
            row[4].0
        );
        rows.push(row);
    }
    let rate = |i: usize| median(&rows.iter().map(|r| r[i].0).collect::<Vec<_>>());
    let cpu = |i: usize| median(&rows.iter().map(|r| r[i].1).collect::<Vec<_>>());
    // The largest peak RSS of a side over the rounds.
    let peak = |i: usize| rows.iter().filter_map(|r| r[i].2).max();
    // Each round's sides ran back to back, so their ratio is less exposed to the load of a
    // shared machine drifting between rounds than a ratio of medians.
    let ratio = |raw: usize, tm: usize| {
        median(&rows.iter().map(|r| r[tm].0 / r[raw].0).collect::<Vec<_>>())
    };
    println!();
    println!(
        "| | raw lapin (msg/s) | tidemill-amqp (msg/s) | tidemill / raw | client CPU per message, raw / tidemill | peak RSS MiB, raw / tidemill |"
    );
    println!("|---|---|---|---|---|---|");
    for (what, raw, tm) in [
        ("publish (raw: send awaited per message)", 0, 2),
        ("publish (raw: sends of a batch joined)", 1, 2),
        ("consume", 3, 4),
    ] {
        println!(
            "| {what} | {:.0} | {:.0} | {:.2}x | {:.1} µs / {:.1} µs | {} / {} |",
            rate(raw),
            rate(tm),
            ratio(raw, tm),
            cpu(raw),
            cpu(tm),
            mib(peak(raw)),
            mib(peak(tm))
        );
    }
    println!(
        "(msg/s: median of the rounds; ratio: median of the rounds' ratios; CPU: user + \
         system time of this process per message; peak RSS: of this process during the \
         timed section, the largest over the rounds)"
    );
    // Rows for `make bench` (BENCHMARKS.md); the first of a group is its baseline.
    let note = |raw: usize, tm: usize| {
        format!(
            "median of {rounds} rounds; tidemill/raw per round {:.2}x; CPU/msg {:.1} µs raw, {:.1} µs tidemill",
            ratio(raw, tm),
            cpu(raw),
            cpu(tm)
        )
    };
    let group = |what: &str| format!("rabbitmq {what} ({n} × {PAYLOAD} B, persistent, confirms)");
    record(
        &Row::new(
            group("publish"),
            "raw lapin, sends of a batch joined",
            rate(1),
        )
        .with_peak_rss(peak(1)),
    );
    record(
        &Row::new(
            group("publish"),
            "raw lapin, send awaited per message",
            rate(0),
        )
        .with_peak_rss(peak(0)),
    );
    record(
        &Row::new(group("publish"), "tidemill-amqp", rate(2))
            .with_peak_rss(peak(2))
            .with_note(note(1, 2)),
    );
    record(&Row::new(group("consume"), "raw lapin", rate(3)).with_peak_rss(peak(3)));
    record(
        &Row::new(group("consume"), "tidemill-amqp", rate(4))
            .with_peak_rss(peak(4))
            .with_note(note(3, 4)),
    );
    Ok(())
}

fn topic(side: Side) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("bench-{side:?}-{}", &id[..12]).to_lowercase()
}

fn queue(topic: &str) -> String {
    format!("{topic}.{GROUP}")
}

/// Persistent, with a fresh UUIDv7 message-id: what Tidemill puts on the wire.
fn raw_properties() -> BasicProperties {
    let id = uuid::Uuid::now_v7().hyphenated().to_string();
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(id))
}

fn rate(n: usize, started: Instant) -> f64 {
    n as f64 / started.elapsed().as_secs_f64()
}

/// CPU time this process has used so far (all threads; zero where unavailable).
fn cpu_time() -> Duration {
    process_cpu().unwrap_or_default()
}

/// Microseconds of client CPU per message since `cpu_before`.
fn cpu_per_message(n: usize, cpu_before: Duration) -> f64 {
    (cpu_time() - cpu_before).as_secs_f64() * 1e6 / n as f64
}

impl Bench {
    /// One round: the three publishes (order rotating), then the two consumes (order
    /// alternating). Returns [raw, raw pipelined, tidemill publish, raw, tidemill consume].
    async fn round(&self, round: usize) -> Result<[Measure; 5], BoxError> {
        let mut sides = [Side::Raw, Side::RawPipelined, Side::Tidemill];
        sides.rotate_left(round % 3);
        let mut topics = Vec::new();
        let mut row = [(0.0, 0.0, None); 5];
        for side in sides {
            let topic = topic(side);
            self.declare(&topic).await?;
            row[side as usize] = match side {
                Side::Tidemill => self.tidemill_publish(&topic).await?,
                _ => self.raw_publish(&topic, side == Side::RawPipelined).await?,
            };
            topics.push((side, topic));
        }
        let topic_of = |side: Side| {
            topics
                .iter()
                .find(|(s, _)| *s == side)
                .map(|(_, t)| t.clone())
                .unwrap_or_default()
        };
        if round.is_multiple_of(2) {
            row[3] = self.raw_consume(&topic_of(Side::RawPipelined)).await?;
            row[4] = self.tidemill_consume(&topic_of(Side::Tidemill)).await?;
        } else {
            row[4] = self.tidemill_consume(&topic_of(Side::Tidemill)).await?;
            row[3] = self.raw_consume(&topic_of(Side::RawPipelined)).await?;
        }
        let conn = Connection::connect(&self.url, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        for (_, topic) in &topics {
            channel
                .queue_delete(queue(topic).as_str().into(), QueueDeleteOptions::default())
                .await?;
            channel
                .exchange_delete(topic.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        conn.close(200, "OK".into()).await?;
        Ok(row)
    }

    /// The exchange and the group's queue, as Tidemill declares them (not timed).
    async fn declare(&self, topic: &str) -> Result<(), BoxError> {
        let setup = AmqpSubscriber::connect(self.config.clone()).await?;
        setup
            .initialize(topic, &SubscribeOptions::group(GROUP))
            .await?;
        setup.close().await?;
        Ok(())
    }

    async fn raw_publish(&self, exchange: &str, pipelined: bool) -> Result<Measure, BoxError> {
        let conn = Connection::connect(&self.url, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let payload: Vec<u8> = (0..PAYLOAD).map(|i| (i % 251) as u8).collect();
        PeakRss::reset();
        let (started, cpu) = (Instant::now(), cpu_time());
        let publish_all = async {
            let mut sent = 0;
            while sent < self.n {
                let count = BATCH.min(self.n - sent);
                let send = || {
                    channel.basic_publish(
                        exchange.into(),
                        "".into(),
                        BasicPublishOptions::default(),
                        &payload,
                        raw_properties(),
                    )
                };
                let confirms = if pipelined {
                    futures::future::try_join_all((0..count).map(|_| send())).await?
                } else {
                    let mut confirms = Vec::with_capacity(count);
                    for _ in 0..count {
                        confirms.push(send().await?);
                    }
                    confirms
                };
                for confirmation in futures::future::join_all(confirms).await {
                    match confirmation? {
                        Confirmation::Ack(None) => {}
                        other => return Err(format!("not confirmed: {other:?}").into()),
                    }
                }
                sent += count;
            }
            Ok::<(), BoxError>(())
        };
        tokio::time::timeout(LIMIT, publish_all).await??;
        let (rate, cpu) = (rate(self.n, started), cpu_per_message(self.n, cpu));
        let measure = (rate, cpu, PeakRss::read());
        conn.close(200, "OK".into()).await?;
        Ok(measure)
    }

    async fn tidemill_publish(&self, topic: &str) -> Result<Measure, BoxError> {
        let publisher = AmqpPublisher::connect(self.config.clone()).await?;
        let payload =
            bytes::Bytes::from((0..PAYLOAD).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        PeakRss::reset();
        let (started, cpu) = (Instant::now(), cpu_time());
        let publish_all = async {
            let mut sent = 0;
            while sent < self.n {
                let count = BATCH.min(self.n - sent);
                let batch = (0..count).map(|_| Message::new(payload.clone())).collect();
                publisher.publish(topic, batch).await?;
                sent += count;
            }
            Ok::<(), BoxError>(())
        };
        tokio::time::timeout(LIMIT, publish_all).await??;
        let (rate, cpu) = (rate(self.n, started), cpu_per_message(self.n, cpu));
        let measure = (rate, cpu, PeakRss::read());
        publisher.close().await?;
        Ok(measure)
    }

    async fn raw_consume(&self, topic: &str) -> Result<Measure, BoxError> {
        let conn = Connection::connect(&self.url, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        PeakRss::reset();
        let (started, cpu) = (Instant::now(), cpu_time());
        let mut consumer = channel
            .basic_consume(
                queue(topic).as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consume = async {
            for _ in 0..self.n {
                let delivery = consumer.next().await.ok_or("consumer ended")??;
                delivery.ack(BasicAckOptions::default()).await?;
            }
            Ok::<(), BoxError>(())
        };
        tokio::time::timeout(LIMIT, consume).await??;
        let (rate, cpu) = (rate(self.n, started), cpu_per_message(self.n, cpu));
        let measure = (rate, cpu, PeakRss::read());
        drop(consumer);
        conn.close(200, "OK".into()).await?;
        Ok(measure)
    }

    async fn tidemill_consume(&self, topic: &str) -> Result<Measure, BoxError> {
        let subscriber = AmqpSubscriber::connect(self.config.clone()).await?;
        PeakRss::reset();
        let (started, cpu) = (Instant::now(), cpu_time());
        let mut stream = subscriber
            .subscribe(topic, SubscribeOptions::group(GROUP))
            .await?;
        let consume = async {
            for _ in 0..self.n {
                let delivery = stream.next().await.ok_or("stream ended")??;
                delivery.ack().await?;
            }
            Ok::<(), BoxError>(())
        };
        tokio::time::timeout(LIMIT, consume).await??;
        let (rate, cpu) = (rate(self.n, started), cpu_per_message(self.n, cpu));
        let measure = (rate, cpu, PeakRss::read());
        drop(stream);
        subscriber.close().await?;
        Ok(measure)
    }
}

/// Deliveries per raw `multiple` ack and per batch handler call.
const CONSUME_BATCH: usize = 500;
/// The batch handler's `max_wait`.
const CONSUME_WAIT: Duration = Duration::from_millis(50);
/// Prefetch of every variant of the batch section: room for the router's 2 × 500 in flight.
const BATCH_PREFETCH: u16 = 1_000;
/// A consumer that receives nothing for this long has stalled: the bench fails.
const STALL: Duration = Duration::from_secs(60);

/// The batch section's variants, in the order of their group queues.
const VARIANTS: [&str; 3] = ["raw", "single", "batch"];

/// One timed consume run of the batch section.
#[derive(Clone, Copy)]
struct Consumed {
    elapsed: Duration,
    /// CPU time of the process over `elapsed`, where known.
    cpu: Option<Duration>,
    peak_rss: Option<u64>,
}

/// Where a timed consume run is: started at its first delivery, done at the N-th handled.
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

/// An `AmqpSubscriber` that starts the clock of a [`Progress`] at the first delivery its
/// stream hands out (as the raw side starts at its first delivery).
struct Clocked {
    inner: AmqpSubscriber,
    progress: Arc<Progress>,
}

#[async_trait::async_trait]
impl Subscriber for Clocked {
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> tidemill_core::Result<DeliveryStream> {
        let progress = self.progress.clone();
        let stream = self.inner.subscribe(topic, options).await?;
        Ok(DeliveryStream::new(
            stream.inspect(move |_| progress.start()),
        ))
    }

    async fn close(&self) -> tidemill_core::Result<()> {
        self.inner.close().await
    }
}

/// (a) raw lapin: prefetch [`BATCH_PREFETCH`], one `basic.ack` with `multiple = true` per
/// [`CONSUME_BATCH`] deliveries.
async fn consume_raw_batches(url: &str, topic: &str, n: usize) -> Result<Consumed, BoxError> {
    let (conn, mut consumer) =
        common::raw_consumer(url, &format!("{topic}.raw"), BATCH_PREFETCH).await?;
    let progress = Progress::new(n);
    let consume = async {
        let mut pending = 0;
        for received in 1..=n {
            let delivery = tokio::time::timeout(STALL, consumer.next())
                .await
                .map_err(|_| format!("raw: delivery {received} of {n} not within {STALL:?}"))?
                .ok_or("consumer ended")??;
            progress.start();
            black_box(&delivery.data);
            pending += 1;
            if pending == CONSUME_BATCH || received == n {
                delivery.ack(BasicAckOptions { multiple: true }).await?;
                progress.handled(pending);
                pending = 0;
            }
        }
        Ok::<(), BoxError>(())
    };
    consume.await?;
    let result = progress.finish();
    drop(consumer);
    conn.close(200, "OK".into()).await?;
    Ok(result)
}

/// (b) and (c): the router, with a single-message handler or with a batch handler.
async fn consume_router(
    config: &AmqpConfig,
    topic: &str,
    n: usize,
    batch: bool,
) -> Result<Consumed, BoxError> {
    let progress = Progress::new(n);
    let subscriber = AmqpSubscriber::connect(config.clone()).await?;
    let clocked = Clocked {
        inner: subscriber.clone(),
        progress: progress.clone(),
    };
    let router = Router::new();
    let handler = router
        .add_handler("bench")
        .subscribe(clocked, topic)
        .group(if batch { "batch" } else { "single" });
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
                    p.handled(msgs.len());
                    HandlerResult::Ok(BatchResult::ok())
                }
            })
            .await?;
    } else {
        handler
            .handler(move |m: Message| {
                let p = p.clone();
                async move {
                    black_box(m.payload());
                    p.handled(1);
                    HandlerResult::Ok(())
                }
            })
            .await?;
    }
    let run = {
        let r = router.clone();
        tokio::spawn(async move { r.run().await })
    };
    let done = progress.done.notified();
    if progress.handled.load(AtomicOrdering::Acquire) < n {
        tokio::time::timeout(STALL * 10, done)
            .await
            .map_err(|_| format!("router: {n} messages not handled within {:?}", STALL * 10))?;
    }
    let result = progress.finish();
    router.close().await?;
    run.await??;
    subscriber.close().await?;
    Ok(result)
}

/// The batch section's runs of one variant.
#[derive(Default)]
struct BatchRuns(Vec<Consumed>);

impl BatchRuns {
    fn rate(&self, n: usize) -> f64 {
        let rates: Vec<f64> = self
            .0
            .iter()
            .map(|c| n as f64 / c.elapsed.as_secs_f64())
            .collect();
        median(&rates)
    }

    fn cpu_us(&self, n: usize) -> f64 {
        let us: Vec<f64> = self
            .0
            .iter()
            .filter_map(|c| c.cpu)
            .map(|c| c.as_secs_f64() * 1e6 / n as f64)
            .collect();
        median(&us)
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
        (median(&ratios), ratios)
    }
}

/// The batch section: `rounds` rounds, each publishing `n` messages once into three group
/// queues of a fresh exchange, then the three variants in turn (the order reversed every
/// other round).
async fn batch_section(url: String, n: usize, rounds: usize) -> Result<(), BoxError> {
    let config = AmqpConfig {
        prefetch: BATCH_PREFETCH,
        persistent: true,
        ..AmqpConfig::new(url.clone())
    };
    println!();
    println!(
        "RabbitMQ batch consume: {n} messages of {PAYLOAD} bytes (persistent), prefetch \
         {BATCH_PREFETCH}, {CONSUME_BATCH} per batch, max_wait {CONSUME_WAIT:?}; {rounds} rounds, median"
    );
    let publisher = AmqpPublisher::connect(config.clone()).await?;
    let setup = AmqpSubscriber::connect(config.clone()).await?;
    let (mut raw, mut single, mut batch) = (
        BatchRuns::default(),
        BatchRuns::default(),
        BatchRuns::default(),
    );
    for round in 0..rounds {
        let topic =
            common::filled_topic(&publisher, &setup, "bench-batch", &VARIANTS, n, PAYLOAD).await?;
        let mut order = [0, 1, 2];
        if round % 2 == 1 {
            order.reverse();
        }
        for variant in order {
            match variant {
                0 => raw.0.push(consume_raw_batches(&url, &topic, n).await?),
                1 => single
                    .0
                    .push(consume_router(&config, &topic, n, false).await?),
                _ => batch
                    .0
                    .push(consume_router(&config, &topic, n, true).await?),
            }
        }
        println!(
            "  round {}: raw batch {:>6.0}, router single {:>6.0}, router batch {:>6.0} msg/s",
            round + 1,
            n as f64 / raw.0[round].elapsed.as_secs_f64(),
            n as f64 / single.0[round].elapsed.as_secs_f64(),
            n as f64 / batch.0[round].elapsed.as_secs_f64(),
        );
        common::delete_topic(&url, &topic, &VARIANTS).await?;
    }
    publisher.close().await?;
    setup.close().await?;
    let (vs_raw, vs_raw_rounds) = batch.ratio_to(&raw);
    let (vs_single, vs_single_rounds) = batch.ratio_to(&single);
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!();
    println!("| variant | msg/s | CPU µs/msg | peak RSS MiB |");
    println!("|---|---|---|---|");
    let raw_name = format!("raw lapin (multiple ack per {CONSUME_BATCH})");
    let batch_name = format!("router, .batch({CONSUME_BATCH}, {CONSUME_WAIT:?})");
    let rows = [
        (raw_name.as_str(), &raw),
        ("router, single-message handler", &single),
        (batch_name.as_str(), &batch),
    ];
    for (name, runs) in rows {
        println!(
            "| {name} | {:.0} | {:.1} | {} |",
            runs.rate(n),
            runs.cpu_us(n),
            mib(runs.peak_rss())
        );
    }
    println!(
        "batch / raw batch {vs_raw:.2} (per round: {}); batch / single-message {vs_single:.2} (per round: {})",
        fmt(&vs_raw_rounds),
        fmt(&vs_single_rounds)
    );
    let group = format!("rabbitmq batch consume ({n} × {PAYLOAD} B, prefetch {BATCH_PREFETCH})");
    for (i, (name, runs)) in rows.into_iter().enumerate() {
        let cpu = format!("CPU {:.1} µs/msg", runs.cpu_us(n));
        let note = match i {
            2 => format!(
                "{cpu}; median of {} rounds; per-round ratio to raw batch {vs_raw:.2}, to single-message {vs_single:.2}",
                runs.0.len()
            ),
            _ => cpu,
        };
        record(
            &Row::new(group.clone(), name, runs.rate(n))
                .with_peak_rss(runs.peak_rss())
                .with_note(note),
        );
    }
    Ok(())
}
