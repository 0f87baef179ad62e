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
//!   every message is received and acked, each message acked and the ack awaited before
//!   the next message, as a sequential handler does (raw: `XREADGROUP COUNT 64 BLOCK` on a
//!   connection of its own, one `XACK` per message on a second one, the clock stopping at
//!   the N-th `XACK`'s answer; Tidemill: `Subscriber::subscribe(topic, group)` +
//!   `Delivery::ack`, prefetch 64: `ack()` returns once the ack is booked, so the clock
//!   stops after the N-th ack returned, once `XPENDING` of the group shows nothing pending,
//!   polled every 1 ms on a connection opened before the clock starts).
//!
//! Sides alternate which goes first; each round is printed, then the median msg/s, the
//! median of the per-round ratios Tidemill / raw, the process CPU per message and the peak
//! RSS (the process's `VmHWM`, reset before each timed section).
//!
//! Then the batch section: N entries published beforehand (through Tidemill, untimed), then
//! consumed by a consumer group of their own (from the stream's beginning) by
//!
//! - (a) raw redis-rs in its natural batch mode: `XREADGROUP COUNT 500 BLOCK`, then one
//!   `XACK` with the 500 ids, awaited before the next read;
//! - (b) the Tidemill router with a single-message handler (default: sequential);
//! - (c) the router with `.batch(500, 50 ms)`;
//!
//! both router variants on a subscriber with `prefetch` 1,000 (so the batch handler's 1,000
//! messages can be in flight). Each run is timed from its first message received to the
//! N-th acked (the raw side's last `XACK` answered; for the router, after the handler saw
//! the N-th message, until `XPENDING` of its group shows nothing pending, polled every
//! 1 ms). Variants rotate which goes first each round; the same figures are printed.
//!
//! Environment: `TIDEMILL_BENCH_MESSAGES` (N, default 50,000), `TIDEMILL_BENCH_ROUNDS`
//! (default 5), `TIDEMILL_BENCH_SECTION` (`batch` runs only the batch section),
//! `TIDEMILL_BENCH_PREFETCH` (the router subscriber's prefetch in the batch section, default
//! 1,000).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::Value;
use tidemill_core::router::BatchResult;
use tidemill_core::{
    DeliveryStream, HandlerResult, Message, Publisher, Router, SubscribeOptions, Subscriber,
};
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
    if std::env::var("TIDEMILL_BENCH_SECTION").as_deref() == Ok("batch") {
        return batch_section(&client, &url, n, rounds).await;
    }
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
    batch_section(&client, &url, n, rounds).await
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
    let mut conn = client.get_multiplexed_async_connection().await?;
    let (consume, consume_cpu_us, consume_rss) = timed(n, || {
        let topic = &topic;
        let conn = &mut conn;
        async move {
            let mut stream = subscriber
                .subscribe(topic, SubscribeOptions::group("g"))
                .await?;
            for _ in 0..n {
                let d = stream.next().await.ok_or("stream ended")??;
                d.ack().await?;
            }
            // An ack returns once booked: done when the group has nothing pending.
            wait_none_pending(conn, topic, "g").await
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

/// Entries per raw read and ack, and the batch handler's `max_messages`.
const CONSUME_BATCH: usize = 500;
/// The batch handler's `max_wait`.
const CONSUME_WAIT: Duration = Duration::from_millis(50);
/// The router subscriber's prefetch in the batch section: two batches in flight.
const BATCH_PREFETCH: usize = 1_000;

/// The batch section's variants, in the order their columns are printed.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Raw,
    Single,
    Batch,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Raw, Variant::Single, Variant::Batch];

    fn name(self) -> &'static str {
        match self {
            Variant::Raw => "raw redis-rs (XREADGROUP COUNT 500 + one XACK)",
            Variant::Single => "tidemill router, single-message handler",
            Variant::Batch => "tidemill router, batch(500, 50 ms)",
        }
    }
}

/// One timed consume run of the batch section: (msg/s, CPU µs per message, peak RSS).
type Run = (f64, f64, Option<u64>);

/// Where a timed consume run is: started at its first message, done at the N-th acked.
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
        self.started.get_or_init(|| (Instant::now(), process_cpu()));
    }

    fn handled(&self, k: usize) {
        if self.handled.fetch_add(k, Ordering::AcqRel) + k >= self.n {
            self.done.notify_one();
        }
    }

    fn finish(&self) -> Run {
        let (t0, cpu0) = *self.started.get().expect("started");
        let took = t0.elapsed();
        let cpu = match (cpu0, process_cpu()) {
            (Some(a), Some(b)) => (b - a).as_secs_f64() * 1e6 / self.n as f64,
            _ => f64::NAN,
        };
        (self.n as f64 / took.as_secs_f64(), cpu, PeakRss::read())
    }
}

/// A `RedisSubscriber` that starts a [`Progress`]'s clock at the first delivery its stream
/// hands out (as the raw side starts at its first reply: subscribing is not timed).
struct Clocked {
    inner: RedisSubscriber,
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

async fn batch_section(
    client: &redis::Client,
    url: &str,
    n: usize,
    rounds: usize,
) -> Result<(), BoxError> {
    let mut config = RedisConfig::new(url);
    config.prefetch = env_usize("TIDEMILL_BENCH_PREFETCH", BATCH_PREFETCH);
    println!();
    println!(
        "batch section: {n} pre-published entries of {PAYLOAD} bytes per variant, {rounds} rounds, router prefetch {}",
        config.prefetch
    );
    config.start_from = StartFrom::Beginning;
    let publisher = RedisPublisher::connect(config.clone()).await?;
    let mut runs: Vec<[Run; 3]> = Vec::new();
    for round in 0..rounds {
        let topic = unique("bench-batch");
        let messages: Vec<Message> = (0..n).map(|i| Message::new(payload(i))).collect();
        for chunk in messages.chunks(BATCH) {
            publisher.publish(&topic, chunk.to_vec()).await?;
        }
        let mut results = [(0.0, 0.0, None); 3];
        let mut order = Variant::ALL;
        order.rotate_left(round % 3);
        for variant in order {
            PeakRss::reset();
            let run = tokio::time::timeout(LIMIT, async {
                match variant {
                    Variant::Raw => raw_batches(client, &topic, n).await,
                    Variant::Single => router_consume(client, &config, &topic, n, false).await,
                    Variant::Batch => router_consume(client, &config, &topic, n, true).await,
                }
            })
            .await??;
            let at = Variant::ALL
                .iter()
                .position(|v| *v == variant)
                .expect("listed");
            results[at] = run;
        }
        println!(
            "  round {}: raw batch {:>7.0} | single {:>7.0} | batch {:>7.0} msg/s | CPU µs/msg {:.1} / {:.1} / {:.1}",
            round + 1,
            results[0].0,
            results[1].0,
            results[2].0,
            results[0].1,
            results[1].1,
            results[2].1
        );
        runs.push(results);
        del(client, &topic).await?;
    }
    publisher.close().await?;
    println!();
    println!(
        "median of {rounds} rounds, {n} x {PAYLOAD} B              msg/s   ÷ raw batch (median per round)   CPU µs/msg   peak RSS MiB"
    );
    for (at, variant) in Variant::ALL.into_iter().enumerate() {
        let rate = median(&runs.iter().map(|r| r[at].0).collect::<Vec<_>>());
        let ratio = median(&runs.iter().map(|r| r[at].0 / r[0].0).collect::<Vec<_>>());
        let cpu = median(&runs.iter().map(|r| r[at].1).collect::<Vec<_>>());
        let rss = runs.iter().filter_map(|r| r[at].2).max();
        println!(
            "{:<48} {rate:>9.0}   {ratio:>5.2}   {cpu:>6.1}   {}",
            variant.name(),
            mib(rss)
        );
        let mut note = format!("{cpu:.1} µs CPU/msg; median of {rounds} rounds");
        if variant != Variant::Raw {
            note.push_str(&format!("; median per-round ratio to raw batch {ratio:.2}"));
        }
        record(
            &Row::new("redis batch consume", variant.name(), rate)
                .with_peak_rss(rss)
                .with_note(note),
        );
    }
    Ok(())
}

/// (a) raw redis-rs: `XREADGROUP COUNT 500`, then one `XACK` of the 500 ids.
async fn raw_batches(client: &redis::Client, stream: &str, n: usize) -> Result<Run, BoxError> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("raw")
        .arg("0")
        .query_async(&mut conn)
        .await?;
    let mut reader: MultiplexedConnection = client
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await?;
    let progress = Progress::new(n);
    let mut done = 0;
    while done < n {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("raw")
            .arg("c")
            .arg("COUNT")
            .arg(CONSUME_BATCH)
            .arg("BLOCK")
            .arg(2000)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut reader)
            .await?;
        progress.start();
        let ids = ids(reply);
        if ids.is_empty() {
            continue;
        }
        let mut ack = redis::cmd("XACK");
        ack.arg(stream).arg("raw");
        for id in &ids {
            ack.arg(id);
        }
        let _: Value = ack.query_async(&mut conn).await?;
        done += ids.len();
    }
    Ok(progress.finish())
}

/// Returns once `XPENDING` of `group` on stream `topic` shows nothing pending (polled every
/// 1 ms).
async fn wait_none_pending(
    conn: &mut MultiplexedConnection,
    topic: &str,
    group: &str,
) -> Result<(), BoxError> {
    loop {
        let summary: Value = redis::cmd("XPENDING")
            .arg(topic)
            .arg(group)
            .query_async(conn)
            .await?;
        if matches!(&summary, Value::Array(parts) if parts.first() == Some(&Value::Int(0))) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// (b) and (c): the router, with a single-message handler or a batch handler.
async fn router_consume(
    client: &redis::Client,
    config: &RedisConfig,
    topic: &str,
    n: usize,
    batch: bool,
) -> Result<Run, BoxError> {
    let group = if batch { "batch" } else { "single" };
    let mut conn = client.get_multiplexed_async_connection().await?;
    let progress = Progress::new(n);
    let subscriber = RedisSubscriber::connect(config.clone()).await?;
    let clocked = Clocked {
        inner: subscriber.clone(),
        progress: progress.clone(),
    };
    let router = Router::new();
    let handler = router
        .add_handler("bench")
        .subscribe(clocked, topic)
        .group(group);
    let p = progress.clone();
    if batch {
        handler
            .batch(CONSUME_BATCH, CONSUME_WAIT)
            .handler(move |msgs: Vec<Message>| {
                let p = p.clone();
                async move {
                    for m in &msgs {
                        std::hint::black_box(m.payload());
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
                    std::hint::black_box(m.payload());
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
    if progress.handled.load(Ordering::Acquire) < n {
        done.await;
    }
    // Handled is not acked yet: wait for the group's last acks.
    wait_none_pending(&mut conn, topic, group).await?;
    let result = progress.finish();
    router.close().await?;
    run.await??;
    subscriber.close().await?;
    Ok(result)
}
