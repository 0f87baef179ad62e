//! Raw `lapin` vs Tidemill on RabbitMQ, same settings, same run.
//!
//! `make bench-amqp` (or `cargo bench -p tidemill-amqp --bench throughput` with
//! `TIDEMILL_AMQP_URL` set). Each round, for each side, on a fresh durable fanout exchange
//! with one durable queue bound to it:
//!
//! - publish: N messages of 100 bytes in batches of 1,000, persistent (delivery mode 2),
//!   each with a UUIDv7 `message-id`, on a channel in confirm mode; timed until every
//!   message of every batch is confirmed. Raw, two ways: `basic_publish(..).await` for
//!   each message of the batch, then all the batch's confirms awaited together (lapin's
//!   documented pattern, "raw"), and all of the batch's `basic_publish` futures joined,
//!   then all confirms ("raw pipelined", what Tidemill does inside). Tidemill:
//!   `Publisher::publish(topic, batch)`.
//! - consume: the N messages already in the queue, prefetch 128, manual acks; timed from
//!   starting the consumer until the N-th message is received and acked. Raw:
//!   `basic_consume` + `Consumer::next` + `Acker::ack`. Tidemill: `Subscriber::subscribe`
//!   with a consumer group + `DeliveryStream::next` + `Delivery::ack`.
//!
//! Sides alternate which goes first; the median of the rounds is reported.
//!
//! Environment: `TIDEMILL_BENCH_MESSAGES` (N, default 50,000), `TIDEMILL_BENCH_ROUNDS`
//! (default 5).

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tidemill_amqp::{AmqpConfig, AmqpPublisher, AmqpSubscriber};
use tidemill_core::{Message, Publisher, SubscribeOptions, Subscriber};

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

#[derive(Default, Clone, Copy)]
struct Figures {
    publish: f64,
    /// Raw only: publishing with every send of a batch joined.
    publish_pipelined: f64,
    consume: f64,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

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
    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    // Warm-up: connections, code paths, the broker's queue processes.
    let warm = (n / 10).max(1_000);
    raw_round(&conn, &url, warm).await?;
    tidemill_round(&conn, &config, warm).await?;

    let mut raw = Vec::new();
    let mut tidemill = Vec::new();
    for round in 0..rounds {
        if round % 2 == 0 {
            raw.push(raw_round(&conn, &url, n).await?);
            tidemill.push(tidemill_round(&conn, &config, n).await?);
        } else {
            tidemill.push(tidemill_round(&conn, &config, n).await?);
            raw.push(raw_round(&conn, &url, n).await?);
        }
        let (r, t) = (raw[round], tidemill[round]);
        println!(
            "  round {}: publish raw {:>7.0}, raw pipelined {:>7.0}, tidemill {:>7.0} msg/s; \
             consume raw {:>7.0}, tidemill {:>7.0} msg/s",
            round + 1,
            r.publish,
            r.publish_pipelined,
            t.publish,
            r.consume,
            t.consume
        );
    }
    let med = |xs: &[Figures], f: fn(&Figures) -> f64| median(xs.iter().map(f).collect());
    let raw_publish = med(&raw, |f| f.publish);
    let raw_pipelined = med(&raw, |f| f.publish_pipelined);
    let raw_consume = med(&raw, |f| f.consume);
    let tm_publish = med(&tidemill, |f| f.publish);
    let tm_consume = med(&tidemill, |f| f.consume);
    println!();
    println!("| | raw lapin (msg/s) | tidemill-amqp (msg/s) | tidemill / raw |");
    println!("|---|---|---|---|");
    println!(
        "| publish (raw: send awaited per message) | {raw_publish:.0} | {tm_publish:.0} | {:.2}x |",
        tm_publish / raw_publish
    );
    println!(
        "| publish (raw: sends of a batch joined) | {raw_pipelined:.0} | {tm_publish:.0} | {:.2}x |",
        tm_publish / raw_pipelined
    );
    println!(
        "| consume | {raw_consume:.0} | {tm_consume:.0} | {:.2}x |",
        tm_consume / raw_consume
    );
    Ok(())
}

fn topic(side: &str) -> String {
    format!(
        "bench-{side}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

fn payload() -> Vec<u8> {
    (0..PAYLOAD).map(|i| (i % 251) as u8).collect()
}

/// Persistent, with a fresh UUIDv7 message-id: what Tidemill puts on the wire.
fn raw_properties() -> BasicProperties {
    let id = uuid::Uuid::now_v7().hyphenated().to_string();
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(id))
}

async fn raw_publish(
    channel: &Channel,
    exchange: &str,
    payload: &[u8],
    n: usize,
    pipelined: bool,
) -> Result<(), BoxError> {
    let mut sent = 0;
    while sent < n {
        let count = BATCH.min(n - sent);
        let send = || {
            channel.basic_publish(
                exchange.into(),
                "".into(),
                BasicPublishOptions::default(),
                payload,
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
    Ok(())
}

async fn raw_round(conn: &Connection, url: &str, n: usize) -> Result<Figures, BoxError> {
    let topic = topic("raw");
    let queue = format!("{topic}.{GROUP}");
    // The same topology Tidemill declares.
    let setup = AmqpSubscriber::connect(AmqpConfig::new(url)).await?;
    setup
        .initialize(&topic, &SubscribeOptions::group(GROUP))
        .await?;
    setup.close().await?;

    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let payload = payload();
    let started = Instant::now();
    tokio::time::timeout(LIMIT, raw_publish(&channel, &topic, &payload, n, true)).await??;
    let publish_pipelined = n as f64 / started.elapsed().as_secs_f64();
    channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    let started = Instant::now();
    tokio::time::timeout(LIMIT, raw_publish(&channel, &topic, &payload, n, false)).await??;
    let publish = n as f64 / started.elapsed().as_secs_f64();

    let consumer_channel = conn.create_channel().await?;
    consumer_channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;
    let started = Instant::now();
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consume = async {
        for _ in 0..n {
            let delivery = consumer.next().await.ok_or("consumer ended")??;
            delivery.ack(BasicAckOptions::default()).await?;
        }
        Ok::<(), BoxError>(())
    };
    tokio::time::timeout(LIMIT, consume).await??;
    let consume = n as f64 / started.elapsed().as_secs_f64();
    drop(consumer);
    cleanup(&channel, &topic, &queue).await?;
    Ok(Figures {
        publish,
        publish_pipelined,
        consume,
    })
}

async fn tidemill_round(
    conn: &Connection,
    config: &AmqpConfig,
    n: usize,
) -> Result<Figures, BoxError> {
    let topic = topic("tidemill");
    let queue = format!("{topic}.{GROUP}");
    let publisher = AmqpPublisher::connect(config.clone()).await?;
    let subscriber = AmqpSubscriber::connect(config.clone()).await?;
    subscriber
        .initialize(&topic, &SubscribeOptions::group(GROUP))
        .await?;
    let payload = bytes::Bytes::from(payload());
    let batches: Vec<Vec<Message>> = (0..n)
        .step_by(BATCH)
        .map(|start| {
            (start..(start + BATCH).min(n))
                .map(|_| Message::new(payload.clone()))
                .collect()
        })
        .collect();
    let started = Instant::now();
    let publish_all = async {
        for batch in batches {
            publisher.publish(&topic, batch).await?;
        }
        Ok::<(), BoxError>(())
    };
    tokio::time::timeout(LIMIT, publish_all).await??;
    let publish = n as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut stream = subscriber
        .subscribe(&topic, SubscribeOptions::group(GROUP))
        .await?;
    let consume = async {
        for _ in 0..n {
            let delivery = stream.next().await.ok_or("stream ended")??;
            delivery.ack().await?;
        }
        Ok::<(), BoxError>(())
    };
    tokio::time::timeout(LIMIT, consume).await??;
    let consume = n as f64 / started.elapsed().as_secs_f64();
    drop(stream);
    subscriber.close().await?;
    publisher.close().await?;
    let channel = conn.create_channel().await?;
    cleanup(&channel, &topic, &queue).await?;
    Ok(Figures {
        publish,
        publish_pipelined: publish,
        consume,
    })
}

async fn cleanup(channel: &Channel, exchange: &str, queue: &str) -> Result<(), BoxError> {
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    channel
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await?;
    Ok(())
}
