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
//! Each round measures raw and Tidemill on fresh topics (deleted at the end of the round),
//! alternating which goes first;
//! `TIDEMILL_BENCH_RUNS` rounds (default 3); the median rates and the median of the
//! per-round ratios are reported, with each variant's peak RSS: the process's `VmHWM`,
//! reset right before each timed section and read right after it, the largest over the
//! rounds (process-wide, so it includes what the bench itself holds). Environment:
//! `TIDEMILL_KAFKA_BROKERS` (default `127.0.0.1:9093`), `TIDEMILL_BENCH_MESSAGES` (N,
//! default 100,000), `TIDEMILL_BENCH_PARTITIONS` (default 1).

use std::hint::black_box;
use std::time::{Duration, Instant};
use tidemill_testkit::bench::{mib, record, PeakRss, Row};

use bytes::Bytes;
use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tidemill_core::{Message, Publisher, SubscribeOptions, Subscriber};
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

/// One timed run: its duration and the peak RSS (bytes) during it, where known.
type Run = (Duration, Option<u64>);

/// The runs of one variant over the rounds.
#[derive(Default)]
struct Runs {
    times: Vec<Duration>,
    /// The largest peak RSS of its runs.
    peak_rss: Option<u64>,
}

impl Runs {
    fn add(&mut self, (elapsed, peak): Run) {
        self.times.push(elapsed);
        self.peak_rss = self.peak_rss.max(peak);
    }
}

/// Publishes `n` records; with `uuid_header`, each carries a fresh uuid in the header
/// Tidemill uses, like a Tidemill message.
async fn publish_raw(producer: &FutureProducer, topic: &str, n: usize, uuid_header: bool) -> Run {
    let payload = [b'x'; PAYLOAD];
    PeakRss::reset();
    let started = Instant::now();
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
    (elapsed, PeakRss::read())
}

async fn publish_tidemill(publisher: &KafkaPublisher, topic: &str, n: usize) -> Run {
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    PeakRss::reset();
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let count = BATCH.min(n - sent);
        let batch: Vec<Message> = (0..count).map(|_| Message::new(payload.clone())).collect();
        publisher.publish(topic, batch).await.expect("publish");
        sent += count;
    }
    let elapsed = started.elapsed();
    (elapsed, PeakRss::read())
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
        started.get_or_insert_with(Instant::now);
        black_box(m.payload());
        consumer
            .store_offset_from_message(&m)
            .expect("store offset");
    }
    let elapsed = started.map(|s| s.elapsed()).unwrap_or_default();
    (elapsed, PeakRss::read())
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
        started.get_or_insert_with(Instant::now);
        black_box(d.message().payload());
        d.ack().await.expect("ack");
    }
    let elapsed = started.map(|s| s.elapsed()).unwrap_or_default();
    let peak = PeakRss::read();
    subscriber.close().await.expect("close");
    (elapsed, peak)
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
    println!(
        "         peak RSS MiB: raw rdkafka {}, tidemill {}",
        mib(raw.peak_rss),
        mib(tidemill.peak_rss)
    );
    let group = format!("kafka {what}");
    record(&Row::new(group.as_str(), "raw rdkafka", r).with_peak_rss(raw.peak_rss));
    record(
        &Row::new(group.as_str(), "tidemill-kafka", t)
            .with_peak_rss(tidemill.peak_rss)
            .with_note(format!(
                "median of {} rounds; median per-round ratio {ratio:.2}",
                ratios.len()
            )),
    );
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
        publisher.close().await.expect("close");
        delete_topics(&brokers, &[warm]).await;
    });
}
