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
//! Environment: `TIDEMILL_BENCH_MESSAGES` (N, default 50,000), `TIDEMILL_BENCH_ROUNDS`
//! (default 5).

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use tidemill_amqp::{AmqpConfig, AmqpPublisher, AmqpSubscriber};
use tidemill_core::{Message, Publisher, SubscribeOptions, Subscriber};
use tidemill_testkit::bench::{median, mib, process_cpu, record, PeakRss, Row};

const PAYLOAD: usize = 100;
const BATCH: usize = 1_000;
const PREFETCH: u16 = 128;
const GROUP: &str = "bench";
const LIMIT: Duration = Duration::from_secs(600);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

fn main() -> Result<(), BoxError> {
    let Some(url) = std::env::var("TIDEMILL_AMQP_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!("SKIP: TIDEMILL_AMQP_URL is not set (run `make bench-amqp`)");
        return Ok(());
    };
    let n = env_usize("TIDEMILL_BENCH_MESSAGES", 50_000);
    let rounds = env_usize("TIDEMILL_BENCH_ROUNDS", 5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(url, n, rounds))
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
            "| {what} | {:.0} | {:.0} | {:.2}x | {:.0} µs / {:.0} µs | {} / {} |",
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
            "median of {rounds} rounds; tidemill/raw per round {:.2}x; CPU/msg {:.0} µs raw, {:.0} µs tidemill",
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
