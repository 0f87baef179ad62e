//! Raw `google-cloud-pubsub` vs Tidemill on the Pub/Sub emulator, same settings, same run.
//!
//! `make bench-googlecloud` (or `cargo bench -p tidemill-googlecloud --bench throughput`
//! with `PUBSUB_EMULATOR_HOST` set). Each round measures three sides, each on a fresh topic
//! with one subscription, in rotating order:
//!
//! - `raw`: the raw client publishing bare 100-byte payloads;
//! - `raw+uuid`: the raw client publishing the same bytes Tidemill puts on the wire (the
//!   payload plus a `tidemill-uuid` attribute holding a 36-character uuid);
//! - `tidemill`: `GoogleCloudPublisher` / `GoogleCloudSubscriber`.
//!
//! For each side (set-up outside the timed sections: topic, subscription, the per-topic
//! publisher; Tidemill's is built by publishing one message first, which the consume side
//! then counts):
//!
//! - publish: N messages of 100 bytes, in batches of 1,000 (raw: 1,000 `publish` futures
//!   awaited together; Tidemill: `publish(topic, batch)`), timed until every publish is
//!   confirmed; payloads and uuids are made before the clock starts, and turning them
//!   into the client's messages is timed on both sides (raw: `PubsubMessage` with its
//!   attributes; Tidemill: its encoding of a `Message`);
//! - consume: the N messages, from opening the stream until the N-th is received and
//!   acked (raw: `MessageStream::next` + `Handler::ack`; Tidemill: `DeliveryStream` +
//!   `Delivery::ack`).
//!
//! Every side uses the same client settings: batches of up to 100 messages / 1 MB / 10 ms,
//! streaming pull with 1,000 outstanding messages and 100 MiB, 60 s lease extension, ack
//! deadline 10 s. Reported: the median of the rounds' rates, and the median of the
//! rounds' own Tidemill/raw ratios (each round's sides run back to back, so a ratio is less
//! exposed to the load of the shared machine drifting between rounds), and each side's
//! peak RSS: the process's `VmHWM`, reset right before each timed section and read right
//! after it, the largest over the rounds (process-wide, so it includes what the bench itself
//! holds).
//!
//! Environment: `TIDEMILL_BENCH_MESSAGES` (N, default 20,000), `TIDEMILL_BENCH_ROUNDS`
//! (default 9), `TIDEMILL_BENCH_ONLY=raw|raw-uuid|tidemill` (one side only, for profiling).
//!
//! **Batch section** (after the above; `TIDEMILL_BENCH_BATCH=off` skips it, `only` runs it
//! alone; `TIDEMILL_BENCH_BATCH_MESSAGES`, default 20,000, `TIDEMILL_BENCH_BATCH_ROUNDS`,
//! default 5): N messages of 100 bytes are published (by `GoogleCloudPublisher`, untimed)
//! to a fresh topic whose group subscription exists, then consumed by one of three
//! variants, in rotating order within each round, each with flow control of 1,000
//! outstanding messages:
//!
//! - `raw batch`: the raw client's streaming pull read in chunks of what has arrived (up to
//!   500, `ready_chunks(500)` of the `MessageStream` as a `futures::Stream`), each message of a chunk acked with
//!   `Handler::ack` after the chunk was taken (the client gathers acks into Acknowledge
//!   RPCs of up to 1,000 ids every 100 ms);
//! - `tidemill single`: a `Router` handler of one message (default: sequential);
//! - `tidemill batch`: the same router with `.batch(500, 50 ms)`.
//!
//! Timed from opening the pull (raw) or starting the router (which subscribes) until the
//! N-th message was acked (raw) or handed to the handler (router: its ack follows at once;
//! neither side waits for the client's batched Acknowledge RPC). Reported per variant: the
//! median msg/s, the median CPU time of the whole process per message
//! (`/proc/self/task/*/schedstat`), the largest peak RSS, and the medians of the per-round
//! ratios batch / raw batch and batch / single.
//!
//! `TIDEMILL_BENCH_CALL_US` (default 0) makes each handler call wait that long, like a
//! database round trip: once per message for `tidemill single`, once per batch for
//! `tidemill batch` and once per chunk for `raw batch` (before its acks).

use std::time::{Duration, Instant};

use futures::StreamExt;
use google_cloud_auth::credentials::anonymous::Builder as Anonymous;
use google_cloud_pubsub::client::{
    BasePublisher, Subscriber as RawSubscriber, SubscriptionAdmin, TopicAdmin,
};
use google_cloud_pubsub::model::Message as RawMessage;
use google_cloud_pubsub::subscriber::ShutdownBehavior;
use tidemill_core::{HandlerResult, Message, Publisher, Router, SubscribeOptions, Subscriber};
use tidemill_googlecloud::{GoogleCloudConfig, GoogleCloudPublisher, GoogleCloudSubscriber};
use tidemill_testkit::bench::{
    handler_call, median, mib, process_cpu, record, Clock, Consumed, HandledCounter, PeakRss, Row,
};

const PROJECT: &str = "tidemill-bench";
const PAYLOAD: usize = 100;
const BATCH: usize = 1_000;
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
    let Some(host) = std::env::var("PUBSUB_EMULATOR_HOST")
        .ok()
        .filter(|h| !h.is_empty())
    else {
        eprintln!("SKIP: PUBSUB_EMULATOR_HOST is not set (run `make bench-googlecloud`)");
        return Ok(());
    };
    let n = env_usize("TIDEMILL_BENCH_MESSAGES", 20_000);
    let rounds = env_usize("TIDEMILL_BENCH_ROUNDS", 9);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let batch = std::env::var("TIDEMILL_BENCH_BATCH").unwrap_or_default();
    let batch_n = env_usize("TIDEMILL_BENCH_BATCH_MESSAGES", 20_000);
    let batch_rounds = env_usize("TIDEMILL_BENCH_BATCH_ROUNDS", 5);
    runtime.block_on(async {
        if batch != "only" {
            run(host.clone(), n, rounds).await?;
        }
        if batch != "off" {
            run_batch(host, batch_n, batch_rounds).await?;
        }
        Ok(())
    })
}

#[derive(Default, Clone, Copy)]
struct Figures {
    publish: f64,
    consume: f64,
    /// Peak RSS (bytes) during the timed publish, where known.
    publish_rss: Option<u64>,
    /// Peak RSS (bytes) during the timed consume, where known.
    consume_rss: Option<u64>,
    /// CPU time of the process (every thread) per message during the timed publish (µs).
    publish_cpu: Option<f64>,
    /// The same during the timed consume.
    consume_cpu: Option<f64>,
}

/// CPU µs per message of the process since `since` (a [`process_cpu`] reading).
fn cpu_per_msg(n: usize, since: Option<Duration>) -> Option<f64> {
    Some(process_cpu()?.saturating_sub(since?).as_secs_f64() * 1e6 / n as f64)
}

async fn run(host: String, n: usize, rounds: usize) -> Result<(), BoxError> {
    println!(
        "Pub/Sub emulator at {host}: {n} messages of {PAYLOAD} bytes, batches of {BATCH}, {rounds} rounds"
    );
    let mut raw = Raw::connect(&host).await?;
    let config = GoogleCloudConfig::emulator(PROJECT, &host);
    let tm = Tidemill {
        publisher: GoogleCloudPublisher::connect(config.clone()).await?,
        subscriber: GoogleCloudSubscriber::connect(config).await?,
    };
    // Profiling aid: run one side only (`raw`, `raw-uuid` or `tidemill`).
    if let Ok(only) = std::env::var("TIDEMILL_BENCH_ONLY") {
        for round in 1..=rounds {
            raw.with_uuid = only == "raw-uuid";
            let f = if only.starts_with("raw") {
                raw.round(n).await?
            } else {
                tm.round(n, &raw).await?
            };
            println!(
                "round {round} ({only}): publish {:.0} msg/s, consume {:.0} msg/s",
                f.publish, f.consume
            );
        }
        return Ok(());
    }
    // Three sides per round, the order rotating: the raw client with bare payloads, the
    // raw client with the same bytes on the wire as Tidemill (payload + a `tidemill-uuid`
    // attribute), and Tidemill.
    let mut rows: Vec<[Figures; 3]> = Vec::new();
    for round in 0..rounds {
        let mut figures = [Figures::default(); 3];
        for k in 0..3 {
            let side = (round + k) % 3;
            figures[side] = match side {
                0 | 1 => {
                    raw.with_uuid = side == 1;
                    raw.round(n).await?
                }
                _ => tm.round(n, &raw).await?,
            };
        }
        println!(
            "round {}: publish {:>7.0} / {:>7.0} / {:>7.0} msg/s | consume {:>7.0} / {:>7.0} / {:>7.0} msg/s   (raw / raw+uuid / tidemill)",
            round + 1,
            figures[0].publish,
            figures[1].publish,
            figures[2].publish,
            figures[0].consume,
            figures[1].consume,
            figures[2].consume,
        );
        rows.push(figures);
    }
    let rate = |side: usize, get: fn(&Figures) -> f64| {
        median(&rows.iter().map(|r| get(&r[side])).collect::<Vec<_>>())
    };
    let ratio = |base: usize, get: fn(&Figures) -> f64| {
        median(
            &rows
                .iter()
                .map(|r| get(&r[2]) / get(&r[base]))
                .collect::<Vec<_>>(),
        )
    };
    // The largest peak RSS of a side over the rounds.
    let peak = |side: usize, get: fn(&Figures) -> Option<u64>| {
        rows.iter().filter_map(|r| get(&r[side])).max()
    };
    let publish: fn(&Figures) -> f64 = |f| f.publish;
    let consume: fn(&Figures) -> f64 = |f| f.consume;
    let publish_rss: fn(&Figures) -> Option<u64> = |f| f.publish_rss;
    let consume_rss: fn(&Figures) -> Option<u64> = |f| f.consume_rss;
    let groups = [
        ("publish", publish, publish_rss),
        ("consume", consume, consume_rss),
    ];
    // Median CPU µs per message of a side, where measured.
    let cpu = |side: usize, what: &str| {
        let us: Vec<f64> = rows
            .iter()
            .filter_map(|r| match what {
                "publish" => r[side].publish_cpu,
                _ => r[side].consume_cpu,
            })
            .collect();
        (!us.is_empty()).then(|| median(&us))
    };
    let us = |c: Option<f64>| c.map_or_else(|| "n/a".to_owned(), |c| format!("{c:.2}"));
    println!();
    println!(
        "| {n} x {PAYLOAD} B | raw (msg/s) | raw+uuid (msg/s) | tidemill (msg/s) | tidemill / raw+uuid | tidemill / raw | CPU µs/msg raw / raw+uuid / tidemill | peak RSS MiB raw / raw+uuid / tidemill |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (what, get, rss) in groups {
        println!(
            "| {what} | {:.0} | {:.0} | {:.0} | {:.2}x | {:.2}x | {} / {} / {} | {} / {} / {} |",
            rate(0, get),
            rate(1, get),
            rate(2, get),
            ratio(1, get),
            ratio(0, get),
            us(cpu(0, what)),
            us(cpu(1, what)),
            us(cpu(2, what)),
            mib(peak(0, rss)),
            mib(peak(1, rss)),
            mib(peak(2, rss))
        );
    }
    println!(
        "(msg/s: median of the {rounds} rounds; ratios: median of the rounds' own ratios; peak \
         RSS: of this process during the timed section, the largest over the rounds)"
    );
    // Rows for `make bench` (BENCHMARKS.md); the first of a group is its baseline.
    for (what, get, rss) in groups {
        let (b, s, t) = (rate(0, get), rate(1, get), rate(2, get));
        let group = format!("pubsub emulator {what} ({n} × {PAYLOAD} B)");
        record(
            &Row::new(&group, "raw google-cloud-pubsub", b)
                .with_peak_rss(peak(0, rss))
                .with_note(format!("CPU {} µs/msg", us(cpu(0, what)))),
        );
        record(
            &Row::new(&group, "raw google-cloud-pubsub + uuid attribute", s)
                .with_peak_rss(peak(1, rss))
                .with_note(format!("CPU {} µs/msg", us(cpu(1, what)))),
        );
        record(
            &Row::new(&group, "tidemill-googlecloud", t)
                .with_peak_rss(peak(2, rss))
                .with_note(format!(
                "CPU {} µs/msg; median of {rounds} rounds; tidemill/raw per round {:.2}x, tidemill/raw+uuid (same bytes on the wire) {:.2}x",
                us(cpu(2, what)),
                ratio(0, get),
                ratio(1, get)
            )),
        );
    }
    tm.publisher.close().await?;
    tm.subscriber.close().await?;
    Ok(())
}

fn payload(i: usize) -> Vec<u8> {
    let mut p = format!("{i:010}").into_bytes();
    p.resize(PAYLOAD, b'x');
    p
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// The raw client, set up like the adapter.
struct Raw {
    /// Carry the same `tidemill-uuid` attribute as Tidemill's messages.
    with_uuid: bool,
    endpoint: String,
    topics: TopicAdmin,
    subscriptions: SubscriptionAdmin,
    base: BasePublisher,
    subscriber: RawSubscriber,
}

impl Raw {
    async fn connect(host: &str) -> Result<Raw, BoxError> {
        let endpoint = format!("http://{host}");
        Ok(Raw {
            with_uuid: false,
            topics: TopicAdmin::builder()
                .with_endpoint(&endpoint)
                .with_credentials(Anonymous::new().build())
                .build()
                .await?,
            subscriptions: SubscriptionAdmin::builder()
                .with_endpoint(&endpoint)
                .with_credentials(Anonymous::new().build())
                .build()
                .await?,
            base: BasePublisher::builder()
                .with_endpoint(&endpoint)
                .with_credentials(Anonymous::new().build())
                .build()
                .await?,
            subscriber: RawSubscriber::builder()
                .with_endpoint(&endpoint)
                .with_credentials(Anonymous::new().build())
                .build()
                .await?,
            endpoint,
        })
    }

    async fn round(&self, n: usize) -> Result<Figures, BoxError> {
        let topic = format!("projects/{PROJECT}/topics/{}", unique("raw"));
        let sub = format!("projects/{PROJECT}/subscriptions/{}", unique("raw"));
        self.topics.create_topic().set_name(&topic).send().await?;
        self.subscriptions
            .create_subscription()
            .set_name(&sub)
            .set_topic(&topic)
            .set_ack_deadline_seconds(10)
            .send()
            .await?;
        let publisher = self
            .base
            .publisher(topic.clone())
            .set_message_count_threshold(100_u32)
            .set_byte_threshold(1_000_000_u32)
            .set_delay_threshold(Duration::from_millis(10))
            .build();
        // Payloads and uuids are made outside the timed section, as Tidemill's messages are;
        // turning them into the client's messages is timed, as Tidemill's encoding is.
        let batches: Vec<Vec<(Vec<u8>, Option<String>)>> = (0..n)
            .collect::<Vec<_>>()
            .chunks(BATCH)
            .map(|c| {
                c.iter()
                    .map(|i| {
                        let uuid = self.with_uuid.then(|| uuid::Uuid::now_v7().to_string());
                        (payload(*i), uuid)
                    })
                    .collect()
            })
            .collect();
        PeakRss::reset();
        let cpu0 = process_cpu();
        let started = Instant::now();
        for batch in batches {
            let futures: Vec<_> = batch
                .into_iter()
                .map(|(data, uuid)| {
                    let m = RawMessage::new().set_data(data);
                    let m = match uuid {
                        Some(uuid) => m.set_attributes([("tidemill-uuid", uuid)]),
                        None => m,
                    };
                    publisher.publish(m)
                })
                .collect();
            for r in futures::future::join_all(futures).await {
                r?;
            }
        }
        let publish = rate(n, started.elapsed());
        let publish_cpu = cpu_per_msg(n, cpu0);
        let publish_rss = PeakRss::read();

        PeakRss::reset();
        let cpu0 = process_cpu();
        let started = Instant::now();
        let mut stream = self
            .subscriber
            .subscribe(&sub)
            .set_max_outstanding_messages(1000)
            .set_max_outstanding_bytes(100 * 1024 * 1024)
            .set_max_lease_extension(Duration::from_secs(60))
            .set_shutdown_behavior(ShutdownBehavior::WaitForProcessing)
            .build();
        let mut received = 0;
        while received < n {
            let item = tokio::time::timeout(LIMIT, stream.next())
                .await
                .map_err(|_| format!("raw: stalled after {received} of {n} ({})", self.endpoint))?;
            let (_m, h) = item.ok_or("raw: stream ended")??;
            h.ack();
            received += 1;
        }
        let consume = rate(n, started.elapsed());
        let consume_cpu = cpu_per_msg(n, cpu0);
        let consume_rss = PeakRss::read();
        drop(stream);
        self.subscriptions
            .delete_subscription()
            .set_subscription(&sub)
            .send()
            .await?;
        self.topics.delete_topic().set_topic(&topic).send().await?;
        Ok(Figures {
            publish,
            consume,
            publish_rss,
            consume_rss,
            publish_cpu,
            consume_cpu,
        })
    }
}

struct Tidemill {
    publisher: GoogleCloudPublisher,
    subscriber: GoogleCloudSubscriber,
}

impl Tidemill {
    async fn round(&self, n: usize, raw: &Raw) -> Result<Figures, BoxError> {
        let topic = unique("tm");
        let group = SubscribeOptions::group("bench");
        self.subscriber.initialize(&topic, &group).await?;
        // Messages (payload and uuid) are made outside the timed section, as the raw side's are.
        let batches: Vec<Vec<Message>> = (0..n)
            .collect::<Vec<_>>()
            .chunks(BATCH)
            .map(|c| c.iter().map(|i| Message::new(payload(*i))).collect())
            .collect();
        // Set-up outside the timed section, as for the raw client (which creates its topic
        // and builds its per-topic publisher first): one message makes the publisher check
        // the topic and build its per-topic batching publisher.
        self.publisher
            .publish_one(&topic, Message::new(payload(n)))
            .await?;
        PeakRss::reset();
        let cpu0 = process_cpu();
        let started = Instant::now();
        for batch in batches {
            self.publisher.publish(&topic, batch).await?;
        }
        let publish = rate(n, started.elapsed());
        let publish_cpu = cpu_per_msg(n, cpu0);
        let publish_rss = PeakRss::read();

        // Likewise `subscribe` makes sure topic and subscription exist before the clock
        // starts (the raw client created its subscription beforehand); the streaming pull
        // opens on the first read, on both sides.
        let mut stream = self.subscriber.subscribe(&topic, group).await?;
        PeakRss::reset();
        let cpu0 = process_cpu();
        let started = Instant::now();
        let n = n + 1; // with the set-up message
        let mut received = 0;
        while received < n {
            let item = tokio::time::timeout(LIMIT, stream.next())
                .await
                .map_err(|_| format!("tidemill: stalled after {received} of {n}"))?;
            let d = item.ok_or("tidemill: stream ended")??;
            d.ack().await?;
            received += 1;
        }
        let consume = rate(n, started.elapsed());
        let consume_cpu = cpu_per_msg(n, cpu0);
        let consume_rss = PeakRss::read();
        drop(stream);
        let sub = self.subscriber.subscription_name(&topic, "bench")?;
        raw.subscriptions
            .delete_subscription()
            .set_subscription(sub)
            .send()
            .await?;
        raw.topics
            .delete_topic()
            .set_topic(format!("projects/{PROJECT}/topics/{topic}"))
            .send()
            .await?;
        Ok(Figures {
            publish,
            consume,
            publish_rss,
            consume_rss,
            publish_cpu,
            consume_cpu,
        })
    }
}

/// Largest batch of the batch section (raw chunks, router batches).
const BATCH_MAX: usize = 500;
/// The router batch's `max_wait`.
const BATCH_WAIT: Duration = Duration::from_millis(50);
/// Flow control of every variant of the batch section: unsettled messages per stream.
const OUTSTANDING: u64 = 1_000;

const VARIANTS: [&str; 3] = [
    "raw google-cloud-pubsub, chunks of up to 500 (ready_chunks)",
    "tidemill router, single-message handler",
    "tidemill router, .batch(500, 50ms)",
];

async fn run_batch(host: String, n: usize, rounds: usize) -> Result<(), BoxError> {
    println!();
    println!(
        "Batch section: {n} pre-published messages of {PAYLOAD} bytes, {OUTSTANDING} outstanding, {rounds} rounds"
    );
    let raw = Raw::connect(&host).await?;
    let mut config = GoogleCloudConfig::emulator(PROJECT, &host);
    config.max_outstanding_messages = OUTSTANDING;
    let bench = BatchBench {
        publisher: GoogleCloudPublisher::connect(config.clone()).await?,
        admin: GoogleCloudSubscriber::connect(config.clone()).await?,
        config,
        raw,
    };
    let mut rows: Vec<[Consumed; 3]> = Vec::new();
    for round in 0..rounds {
        let mut figures = [Consumed::default(); 3];
        for k in 0..3 {
            let variant = (round + k) % 3;
            figures[variant] = bench.round(variant, n).await?;
        }
        println!(
            "round {}: consume {:>7.0} / {:>7.0} / {:>7.0} msg/s   (raw batch / tidemill single / tidemill batch)",
            round + 1,
            figures[0].rate,
            figures[1].rate,
            figures[2].rate,
        );
        rows.push(figures);
    }
    let rate_of = |v: usize| median(&rows.iter().map(|r| r[v].rate).collect::<Vec<_>>());
    let cpu_of = |v: usize| {
        let cpu: Vec<f64> = rows.iter().filter_map(|r| r[v].cpu_us).collect();
        (!cpu.is_empty()).then(|| median(&cpu))
    };
    let rss_of = |v: usize| rows.iter().filter_map(|r| r[v].rss).max();
    let ratio = |a: usize, b: usize| {
        median(
            &rows
                .iter()
                .map(|r| r[a].rate / r[b].rate)
                .collect::<Vec<_>>(),
        )
    };
    let fmt_cpu = |c: Option<f64>| c.map_or("n/a".to_owned(), |c| format!("{c:.1}"));
    println!();
    println!("| batch consume, {n} x {PAYLOAD} B | msg/s | CPU µs/msg | peak RSS MiB |");
    println!("|---|---|---|---|");
    for (v, name) in VARIANTS.iter().enumerate() {
        println!(
            "| {name} | {:.0} | {} | {} |",
            rate_of(v),
            fmt_cpu(cpu_of(v)),
            mib(rss_of(v))
        );
    }
    let (vs_raw, vs_single) = (ratio(2, 0), ratio(2, 1));
    println!(
        "batch / raw batch {vs_raw:.2}x, batch / single {vs_single:.2}x (medians of the per-round ratios; \
         msg/s and CPU: medians of {rounds} rounds; peak RSS: the largest)"
    );
    let call_us = std::env::var("TIDEMILL_BENCH_CALL_US").unwrap_or_else(|_| "0".into());
    let group =
        format!("pubsub emulator batch consume ({n} × {PAYLOAD} B, {call_us} µs per handler call)");
    for (v, name) in VARIANTS.iter().enumerate() {
        let mut note = cpu_of(v).map_or(String::new(), |c| format!("{c:.1} µs CPU/msg; "));
        note.push_str(&format!("median of {rounds} rounds"));
        if v == 2 {
            note.push_str(&format!(
                "; per round batch/raw batch {vs_raw:.2}x, batch/single {vs_single:.2}x"
            ));
        }
        record(
            &Row::new(&group, *name, rate_of(v))
                .with_peak_rss(rss_of(v))
                .with_note(note),
        );
    }
    bench.publisher.close().await?;
    bench.admin.close().await?;
    Ok(())
}

struct BatchBench {
    config: GoogleCloudConfig,
    publisher: GoogleCloudPublisher,
    /// Creates topics and subscriptions (the routers get subscribers of their own: closing
    /// a router closes its subscribers).
    admin: GoogleCloudSubscriber,
    raw: Raw,
}

impl BatchBench {
    /// A fresh topic with its `bench` subscription, holding `n` messages.
    async fn prepare(&self, n: usize) -> Result<String, BoxError> {
        let topic = unique("batch");
        self.admin
            .initialize(&topic, &SubscribeOptions::group("bench"))
            .await?;
        let messages: Vec<Message> = (0..n).map(|i| Message::new(payload(i))).collect();
        for chunk in messages.chunks(BATCH) {
            self.publisher.publish(&topic, chunk.to_vec()).await?;
        }
        Ok(topic)
    }

    async fn round(&self, variant: usize, n: usize) -> Result<Consumed, BoxError> {
        let topic = self.prepare(n).await?;
        let figures = match variant {
            0 => self.raw_batch(&topic, n).await?,
            v => self.router(&topic, n, v == 2).await?,
        };
        let sub = self.admin.subscription_name(&topic, "bench")?;
        self.raw
            .subscriptions
            .delete_subscription()
            .set_subscription(sub)
            .send()
            .await?;
        self.raw
            .topics
            .delete_topic()
            .set_topic(format!("projects/{PROJECT}/topics/{topic}"))
            .send()
            .await?;
        Ok(figures)
    }

    async fn raw_batch(&self, topic: &str, n: usize) -> Result<Consumed, BoxError> {
        let sub = self.admin.subscription_name(topic, "bench")?;
        let clock = Clock::start();
        let stream = self
            .raw
            .subscriber
            .subscribe(&sub)
            .set_max_outstanding_messages(OUTSTANDING as i64)
            .set_max_outstanding_bytes(100 * 1024 * 1024)
            .set_max_lease_extension(Duration::from_secs(60))
            .set_shutdown_behavior(ShutdownBehavior::WaitForProcessing)
            .build();
        // `MessageStream::into_stream` (behind the client's `unstable-stream` feature),
        // written out.
        let mut chunks = Box::pin(futures::stream::unfold(stream, |mut s| async move {
            s.next().await.map(|item| (item, s))
        }))
        .ready_chunks(BATCH_MAX);
        let mut received = 0;
        while received < n {
            let chunk = tokio::time::timeout(LIMIT, chunks.next())
                .await
                .map_err(|_| format!("raw batch: stalled after {received} of {n}"))?
                .ok_or("raw batch: stream ended")?;
            let mut handlers = Vec::with_capacity(chunk.len());
            for item in chunk {
                let (_m, h) = item?;
                handlers.push(h);
            }
            handler_call().await;
            received += handlers.len();
            for h in handlers {
                h.ack();
            }
        }
        let figures = clock.stop(n);
        drop(chunks);
        Ok(figures)
    }

    async fn router(&self, topic: &str, n: usize, batch: bool) -> Result<Consumed, BoxError> {
        let subscriber = GoogleCloudSubscriber::connect(self.config.clone()).await?;
        let router = Router::new();
        let counter = HandledCounter::new(n);
        let handler = router
            .add_handler("bench")
            .subscribe(subscriber, topic)
            .group("bench");
        let c = counter.clone();
        if batch {
            handler
                .batch(BATCH_MAX, BATCH_WAIT)
                .handler(move |messages: Vec<Message>| {
                    let (c, k) = (c.clone(), messages.len());
                    async move {
                        handler_call().await;
                        c.add(k);
                    }
                })
                .await?;
        } else {
            handler
                .handler(move |_m: Message| {
                    let c = c.clone();
                    async move {
                        handler_call().await;
                        c.add(1);
                        HandlerResult::Ok(())
                    }
                })
                .await?;
        }
        let clock = Clock::start();
        let running = router.clone();
        let task = tokio::spawn(async move { running.run().await });
        tokio::time::timeout(LIMIT, counter.done.notified())
            .await
            .map_err(|_| {
                format!(
                    "tidemill (batch: {batch}): stalled after {} of {n}",
                    counter.seen()
                )
            })?;
        let figures = clock.stop(n);
        router.close().await?;
        task.await??;
        Ok(figures)
    }
}
