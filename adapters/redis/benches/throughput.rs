//! Raw `redis` (redis-rs) vs Tidemill on the Redis server of brokers, same settings, same
//! run.
//!
//! `make bench-redis` (or `cargo bench -p tidemill-redis --bench throughput` with
//! `TIDEMILL_REDIS_URL` set). N messages of 100 bytes. Both sides write the same entry: a
//! `tidemill-uuid` field (made before the clock starts on the raw side) and the payload.
//!
//! - publish: batches of 1,000, each one pipelined round trip of `XADD`s (raw: a
//!   `redis::pipe()` on a multiplexed connection; Tidemill: `Publisher::publish(topic,
//!   batch)`), from the first batch sent to the last reply;
//! - consume: a consumer group created at the stream's beginning, from subscribing until
//!   the N-th message is received and acked, each message acked (`XACK`) and the ack awaited
//!   before the next message, as a sequential handler does (raw: `XREADGROUP COUNT 64
//!   BLOCK` on a connection of its own, acks on a second one; Tidemill:
//!   `Subscriber::subscribe(topic, group)` + `Delivery::ack`, prefetch 64).
//!
//! Sides alternate which goes first; each round is printed, then the median msg/s, the
//! median of the per-round ratios Tidemill / raw, the process CPU per message and the peak
//! RSS (the process's `VmHWM`, reset before each timed section).
//!
//! Environment: `TIDEMILL_BENCH_MESSAGES` (N, default 50,000), `TIDEMILL_BENCH_ROUNDS`
//! (default 5).

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::Value;
use tidemill_core::{Message, Publisher, SubscribeOptions, Subscriber};
use tidemill_redis::{RedisConfig, RedisPublisher, RedisSubscriber, StartFrom};
use tidemill_testkit::bench::{median, mib, process_cpu, record, PeakRss, Row};

const PAYLOAD: usize = 100;
const BATCH: usize = 1_000;
const PREFETCH: usize = 64;
const LIMIT: Duration = Duration::from_secs(300);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

fn main() -> Result<(), BoxError> {
    let Some(url) = std::env::var("TIDEMILL_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!("SKIP: TIDEMILL_REDIS_URL is not set (run `make bench-redis`)");
        return Ok(());
    };
    let n = env_usize("TIDEMILL_BENCH_MESSAGES", 50_000);
    let rounds = env_usize("TIDEMILL_BENCH_ROUNDS", 5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(url, n, rounds))
}

/// One side's figures in one round.
#[derive(Default, Clone, Copy)]
struct Figures {
    publish: f64,
    consume: f64,
    publish_cpu_us: f64,
    consume_cpu_us: f64,
    publish_rss: Option<u64>,
    consume_rss: Option<u64>,
}

fn payload(i: usize) -> Bytes {
    let mut p = format!("{i:010}").into_bytes();
    p.resize(PAYLOAD, b'x');
    Bytes::from(p)
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Runs `f`, returning (msg/s, CPU µs per message, peak RSS).
async fn timed<F, Fut>(n: usize, f: F) -> Result<(f64, f64, Option<u64>), BoxError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), BoxError>>,
{
    PeakRss::reset();
    let cpu0 = process_cpu();
    let t0 = Instant::now();
    tokio::time::timeout(LIMIT, f()).await??;
    let took = t0.elapsed();
    let cpu = match (cpu0, process_cpu()) {
        (Some(a), Some(b)) => (b - a).as_secs_f64() * 1e6 / n as f64,
        _ => f64::NAN,
    };
    Ok((n as f64 / took.as_secs_f64(), cpu, PeakRss::read()))
}

async fn run(url: String, n: usize, rounds: usize) -> Result<(), BoxError> {
    println!("Redis at {url}: {n} messages of {PAYLOAD} bytes, {rounds} rounds (median reported)");
    let client = redis::Client::open(url.as_str())?;
    let mut config = RedisConfig::new(url.as_str());
    config.prefetch = PREFETCH;
    config.start_from = StartFrom::Beginning;
    let publisher = RedisPublisher::connect(config.clone()).await?;
    let subscriber = RedisSubscriber::connect(config).await?;
    let (mut raws, mut tms) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (r, t) = if round % 2 == 1 {
            let r = raw_round(&client, n).await?;
            (
                r,
                tidemill_round(&client, &publisher, &subscriber, n).await?,
            )
        } else {
            let t = tidemill_round(&client, &publisher, &subscriber, n).await?;
            (raw_round(&client, n).await?, t)
        };
        println!(
            "  round {round}: publish raw {:>8.0} tidemill {:>8.0} msg/s | consume raw {:>7.0} tidemill {:>7.0} msg/s | CPU µs/msg publish {:.1}/{:.1} consume {:.1}/{:.1}",
            r.publish, t.publish, r.consume, t.consume, r.publish_cpu_us, t.publish_cpu_us, r.consume_cpu_us, t.consume_cpu_us
        );
        raws.push(r);
        tms.push(t);
    }
    type Pick = fn(&Figures) -> f64;
    type Rss = fn(&Figures) -> Option<u64>;
    println!();
    println!("median of {rounds} rounds, {n} x {PAYLOAD} B   raw msg/s   tidemill msg/s   ratio   CPU µs/msg raw / tidemill   peak RSS MiB raw / tidemill");
    for (what, rate, cpu, rss) in [
        (
            "publish",
            (|f: &Figures| f.publish) as Pick,
            (|f: &Figures| f.publish_cpu_us) as Pick,
            (|f: &Figures| f.publish_rss) as Rss,
        ),
        (
            "consume",
            |f: &Figures| f.consume,
            |f: &Figures| f.consume_cpu_us,
            |f: &Figures| f.consume_rss,
        ),
    ] {
        let m = |v: &[Figures], g: Pick| median(&v.iter().map(g).collect::<Vec<_>>());
        let (r, t) = (m(&raws, rate), m(&tms, rate));
        let ratio = median(
            &raws
                .iter()
                .zip(&tms)
                .map(|(r, t)| rate(t) / rate(r))
                .collect::<Vec<_>>(),
        );
        let (rc, tc) = (m(&raws, cpu), m(&tms, cpu));
        let peak = |v: &[Figures]| v.iter().filter_map(rss).max();
        let (rr, tr) = (peak(&raws), peak(&tms));
        println!(
            "redis {what:<8}                  {r:>9.0}   {t:>14.0}   {ratio:>5.2}   {rc:>6.1} / {tc:<6.1}          {} / {}",
            mib(rr),
            mib(tr)
        );
        let group = format!("redis {what}");
        record(
            &Row::new(group.as_str(), "raw redis-rs", r)
                .with_peak_rss(rr)
                .with_note(format!("{rc:.1} µs CPU/msg")),
        );
        record(
            &Row::new(group.as_str(), "tidemill-redis", t)
                .with_peak_rss(tr)
                .with_note(format!(
                    "{tc:.1} µs CPU/msg; median of {rounds} rounds; median per-round ratio {ratio:.2}"
                )),
        );
    }
    publisher.close().await?;
    subscriber.close().await?;
    Ok(())
}

async fn del(client: &redis::Client, stream: &str) -> Result<(), BoxError> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: Value = redis::cmd("DEL").arg(stream).query_async(&mut conn).await?;
    Ok(())
}

async fn raw_round(client: &redis::Client, n: usize) -> Result<Figures, BoxError> {
    let stream = unique("bench-raw");
    let mut conn = client.get_multiplexed_async_connection().await?;
    // The same fields Tidemill writes; ids made before the clock starts.
    let uuids: Vec<String> = (0..n)
        .map(|_| tidemill_core::new_uuid().to_string())
        .collect();
    let payloads: Vec<Bytes> = (0..n).map(payload).collect();
    let (publish, publish_cpu_us, publish_rss) = timed(n, || {
        let (conn, stream) = (&mut conn, &stream);
        let (uuids, payloads) = (&uuids, &payloads);
        async move {
            for start in (0..n).step_by(BATCH) {
                let mut pipe = redis::pipe();
                for i in start..(start + BATCH).min(n) {
                    pipe.cmd("XADD")
                        .arg(stream)
                        .arg("*")
                        .arg("tidemill-uuid")
                        .arg(&uuids[i])
                        .arg("payload")
                        .arg(&payloads[i][..]);
                }
                let _: Vec<Value> = pipe.query_async(conn).await?;
            }
            Ok(())
        }
    })
    .await?;
    let _: Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("0")
        .query_async(&mut conn)
        .await?;
    let (consume, consume_cpu_us, consume_rss) = timed(n, || {
        let stream = stream.clone();
        async move {
            let mut reader: MultiplexedConnection = client
                .get_multiplexed_async_connection_with_config(
                    &redis::AsyncConnectionConfig::new().set_response_timeout(None),
                )
                .await?;
            let mut acks = client.get_multiplexed_async_connection().await?;
            let mut done = 0;
            while done < n {
                let reply: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("g")
                    .arg("c")
                    .arg("COUNT")
                    .arg(PREFETCH)
                    .arg("BLOCK")
                    .arg(2000)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(">")
                    .query_async(&mut reader)
                    .await?;
                for id in ids(reply) {
                    let _: Value = redis::cmd("XACK")
                        .arg(&stream)
                        .arg("g")
                        .arg(&id)
                        .query_async(&mut acks)
                        .await?;
                    done += 1;
                }
            }
            Ok(())
        }
    })
    .await?;
    del(client, &stream).await?;
    Ok(Figures {
        publish,
        consume,
        publish_cpu_us,
        consume_cpu_us,
        publish_rss,
        consume_rss,
    })
}

/// The entry ids of an `XREADGROUP` reply (one stream).
fn ids(reply: Value) -> Vec<Vec<u8>> {
    let Value::Array(streams) = reply else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for s in streams {
        let Value::Array(mut parts) = s else { continue };
        if parts.len() < 2 {
            continue;
        }
        let Value::Array(entries) = parts.remove(1) else {
            continue;
        };
        for e in entries {
            if let Value::Array(mut e) = e {
                if let Value::BulkString(id) = e.swap_remove(0) {
                    out.push(id);
                }
            }
        }
    }
    out
}

async fn tidemill_round(
    client: &redis::Client,
    publisher: &RedisPublisher,
    subscriber: &RedisSubscriber,
    n: usize,
) -> Result<Figures, BoxError> {
    let topic = unique("bench-tidemill");
    let messages: Vec<Message> = (0..n).map(|i| Message::new(payload(i))).collect();
    let (publish, publish_cpu_us, publish_rss) = timed(n, || {
        let topic = &topic;
        async move {
            let mut messages = messages;
            while !messages.is_empty() {
                let rest = messages.split_off(BATCH.min(messages.len()));
                publisher.publish(topic, messages).await?;
                messages = rest;
            }
            Ok(())
        }
    })
    .await?;
    let (consume, consume_cpu_us, consume_rss) = timed(n, || {
        let topic = &topic;
        async move {
            let mut stream = subscriber
                .subscribe(topic, SubscribeOptions::group("g"))
                .await?;
            for _ in 0..n {
                let d = stream.next().await.ok_or("stream ended")??;
                d.ack().await?;
            }
            Ok(())
        }
    })
    .await?;
    del(client, &topic).await?;
    Ok(Figures {
        publish,
        consume,
        publish_cpu_us,
        consume_cpu_us,
        publish_rss,
        consume_rss,
    })
}
