//! How a batch handler's settlements reach Kafka, against the Kafka-protocol broker of
//! brokers (`TIDEMILL_KAFKA_BROKERS`; the tests skip without it): the acks of a batch
//! are committed as one offset (the end of the partition's acked prefix), a nacked
//! message in the middle of a batch holds its partition's commit point, and the group's
//! next member resumes right there.
//!
//! The commit requests the adapter makes are counted from its `committing acked offsets`
//! debug event (one per commit request, with the offsets it carries); what the broker
//! holds is read with rdkafka directly. Related checks with single deliveries are in
//! `tests/kafka.rs` (`acked_offsets_are_committed_contiguously`,
//! `closing_commits_only_what_was_acked_and_the_next_member_resumes_there`,
//! `commit_every_commits_before_the_interval`).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tidemill_core::router::{redeliver_after, BatchResult};
use tidemill_core::{HandlerResult, Message, Publisher, Router, SubscribeOptions, Subscriber};
use tidemill_kafka::{KafkaConfig, KafkaPublisher, KafkaRecord, KafkaSubscriber};
use tidemill_testkit::unique_topic;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{filter, EnvFilter, Layer};

/// Generous bound for anything that should happen; never what a test relies on to pass.
const LIMIT: Duration = Duration::from_secs(60);
/// Messages published for a batch.
const N: usize = 500;

fn brokers() -> Option<String> {
    match std::env::var("TIDEMILL_KAFKA_BROKERS") {
        Ok(b) => Some(b),
        Err(_) => {
            eprintln!("SKIP: TIDEMILL_KAFKA_BROKERS is not set (no broker to test against)");
            None
        }
    }
}

/// The commit requests the adapter made: (topic, offsets as `[(partition, offset), ..]`).
#[derive(Default)]
struct CommitLog(Mutex<Vec<(String, String)>>);

impl CommitLog {
    /// The offsets of each commit request for `topic`, in order.
    fn of(&self, topic: &str) -> Vec<String> {
        self.0
            .lock()
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, c)| c.clone())
            .collect()
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    topic: String,
    commits: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        match field.name() {
            "message" => self.message = text,
            "topic" => self.topic = text,
            "commits" => self.commits = text,
            _ => {}
        }
    }
}

struct CountCommits(Arc<CommitLog>);

impl<S: tracing::Subscriber> Layer<S> for CountCommits {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        if f.message == "committing acked offsets" {
            self.0 .0.lock().push((f.topic, f.commits));
        }
    }
}

/// The process-wide commit log (the consumer threads log outside any test's scope), with
/// the usual test output (`RUST_LOG`) beside it.
fn commit_log() -> Arc<CommitLog> {
    static LOG: OnceLock<Arc<CommitLog>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(CommitLog::default());
        let _ = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(EnvFilter::from_default_env()),
            )
            .with(CountCommits(log.clone()).with_filter(
                filter::Targets::new().with_target("tidemill_kafka", tracing::Level::DEBUG),
            ))
            .try_init();
        log
    })
    .clone()
}

fn config(brokers: &str) -> KafkaConfig {
    let mut c = KafkaConfig::new(brokers);
    c.group_prefix = format!("{}.", unique_topic("group"));
    c
}

/// The group's committed offset of `partition`, as Kafka has it (`None`: nothing
/// committed).
fn committed(brokers: &str, group_id: &str, topic: &str, partition: i32) -> Option<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group_id)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let got = c.committed_offsets(tpl, LIMIT).unwrap();
    match got.find_partition(topic, partition).map(|e| e.offset()) {
        Some(Offset::Offset(o)) => Some(o),
        _ => None,
    }
}

/// Waits until the group's committed offset of partition 0 is `want`.
async fn await_committed(brokers: &str, group_id: &str, topic: &str, want: i64) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let (b, g, t) = (brokers.to_owned(), group_id.to_owned(), topic.to_owned());
        let now = tokio::task::spawn_blocking(move || committed(&b, &g, &t, 0))
            .await
            .unwrap();
        if now == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "committed offset stayed {now:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `batches` hold `n` messages in all.
async fn await_handled(batches: &Mutex<Vec<Vec<i64>>>, n: usize) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let got: usize = batches.lock().iter().map(Vec::len).sum();
        if got >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{got} of {n} messages handled within {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn offset(m: &Message) -> i64 {
    KafkaRecord::of(m).expect("a Kafka record").offset()
}

/// A group initialized on a fresh topic, with `N` keyless messages `m0..` at offsets
/// `0..N` of partition 0.
async fn topic_with_messages(c: &KafkaConfig, name: &str, group: &str) -> String {
    let topic = unique_topic(name);
    let s = KafkaSubscriber::connect(c.clone()).await.unwrap();
    s.initialize(&topic, &SubscribeOptions::group(group))
        .await
        .unwrap();
    s.close().await.unwrap();
    let p = KafkaPublisher::connect(c.clone()).await.unwrap();
    let msgs: Vec<Message> = (0..N).map(|i| Message::new(format!("m{i}"))).collect();
    p.publish(&topic, msgs).await.unwrap();
    p.close().await.unwrap();
    topic
}

/// Runs a batch handler (`max` messages, `wait`) on `topic` in `group` until `n` messages
/// were handled, then closes it. `fail` picks the messages to nack (with a delay longer
/// than the test). Returns each batch's offsets.
async fn run_batches(
    c: &KafkaConfig,
    topic: &str,
    group: &str,
    (max, wait): (usize, Duration),
    n: usize,
    fail: fn(&Message) -> bool,
) -> Vec<Vec<i64>> {
    let batches: Arc<Mutex<Vec<Vec<i64>>>> = Arc::default();
    let s = KafkaSubscriber::connect(c.clone()).await.unwrap();
    let router = Router::new();
    let seen = batches.clone();
    router
        .add_handler("batches")
        .subscribe(s.clone(), topic)
        .group(group)
        .batch(max, wait)
        .handler(move |msgs: Vec<Message>| {
            let seen = seen.clone();
            async move {
                let mut result = BatchResult::ok();
                for (i, m) in msgs.iter().enumerate() {
                    if fail(m) {
                        result.fail(i, redeliver_after(Duration::from_secs(3600), "held"));
                    }
                }
                seen.lock().push(msgs.iter().map(offset).collect());
                HandlerResult::Ok(result)
            }
        })
        .await
        .unwrap();
    let run = {
        let r = router.clone();
        tokio::spawn(async move { r.run().await })
    };
    await_handled(&batches, n).await;
    router.close().await.unwrap();
    run.await.unwrap().unwrap();
    s.close().await.unwrap();
    let out = batches.lock().clone();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acks_of_a_batch_are_committed_once() {
    let Some(brokers) = brokers() else { return };
    let log = commit_log();
    let mut c = config(&brokers);
    // Commits only when 500 acks wait (or on close): the interval never comes.
    c.commit_interval = Duration::from_secs(3600);
    c.commit_every = N;
    let group_id = format!("{}store", c.group_prefix);
    let topic = topic_with_messages(&c, "batch-commit", "store").await;
    await_committed(&brokers, &group_id, &topic, 0).await; // initialize pinned the start

    let batches = run_batches(&c, &topic, "store", (N, LIMIT), N, |_| false).await;
    assert_eq!(
        batches,
        vec![(0..N as i64).collect::<Vec<_>>()],
        "one batch of {N}, in offset order"
    );
    assert_eq!(
        committed(&brokers, &group_id, &topic, 0),
        Some(N as i64),
        "the batch's offsets are committed"
    );
    assert_eq!(
        log.of(&topic),
        [format!("[(0, {N})]")],
        "{N} acks make one commit request, of the end of the acked prefix (none more on close)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_in_a_batch_holds_the_commit_point_and_the_next_member_resumes_there() {
    let Some(brokers) = brokers() else { return };
    let log = commit_log();
    let mut c = config(&brokers);
    // The only commit while the first member runs comes with the 499th ack: every
    // settlement of the batch but the nack of m200 is in by then.
    c.commit_interval = Duration::from_secs(3600);
    c.commit_every = N - 1;
    let group_id = format!("{}store", c.group_prefix);
    let topic = topic_with_messages(&c, "batch-nack", "store").await;
    await_committed(&brokers, &group_id, &topic, 0).await;

    let held = |m: &Message| &m.payload()[..] == b"m200";
    let batches = run_batches(&c, &topic, "store", (N, LIMIT), N, held).await;
    assert_eq!(batches.len(), 1, "one batch of {N}");
    assert_eq!(
        committed(&brokers, &group_id, &topic, 0),
        Some(200),
        "m200 (nacked) holds the commit point although m201..m499 were acked"
    );
    assert_eq!(
        log.of(&topic),
        ["[(0, 200)]"],
        "one commit request, nothing past the nacked m200 (and nothing more on close)"
    );

    // The group's next member starts at m200; m201..m499, acked but not committed, come
    // again (at least once).
    let later = run_batches(
        &c,
        &topic,
        "store",
        (N, Duration::from_millis(200)),
        N - 200,
        |_| false,
    )
    .await;
    let mut offsets: Vec<i64> = later.concat();
    assert_eq!(offsets.first(), Some(&200), "resumes at m200");
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(offsets, (200..N as i64).collect::<Vec<_>>());
    assert_eq!(committed(&brokers, &group_id, &topic, 0), Some(N as i64));
}
