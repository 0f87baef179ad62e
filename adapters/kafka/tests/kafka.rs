//! What the Kafka adapter promises beyond the conformance suite, checked against the
//! Kafka-protocol broker of brokers (`TIDEMILL_KAFKA_BROKERS`; tests that need it skip
//! without it) and, where Kafka's own view matters (committed offsets, partitions,
//! headers), with rdkafka directly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tidemill_core::{
    Delivery, DeliveryStream, Error, HandlerResult, Message, Publisher, Router, SubscribeOptions,
    Subscriber,
};
use tidemill_kafka::{KafkaConfig, KafkaPublisher, KafkaSubscriber, Ordering, StartFrom};
use tidemill_testkit::unique_topic;

/// Generous bound for anything that should happen; never what a test relies on to pass.
const LIMIT: Duration = Duration::from_secs(60);
/// How long a negative check ("nothing arrives") watches.
const QUIET: Duration = Duration::from_millis(700);

fn brokers() -> Option<String> {
    match std::env::var("TIDEMILL_KAFKA_BROKERS") {
        Ok(b) => Some(b),
        Err(_) => {
            eprintln!("SKIP: TIDEMILL_KAFKA_BROKERS is not set (no broker to test against)");
            None
        }
    }
}

fn config(brokers: &str) -> KafkaConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut c = KafkaConfig::new(brokers);
    c.group_prefix = format!("{}.", unique_topic("group"));
    c
}

/// A port nothing listens on.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr.to_string()
}

async fn next(stream: &mut DeliveryStream, what: &str) -> Delivery {
    let deadline = Instant::now() + LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Err(_) => panic!("{what}: nothing within {LIMIT:?}"),
            Ok(None) => panic!("{what}: the stream ended"),
            Ok(Some(Err(e))) => eprintln!("{what}: stream error (continuing): {e}"),
            Ok(Some(Ok(d))) => return d,
        }
    }
}

async fn quiet(stream: &mut DeliveryStream) -> Option<Delivery> {
    match tokio::time::timeout(QUIET, stream.next()).await {
        Ok(Some(Ok(d))) => Some(d),
        _ => None,
    }
}

fn payload(d: &Delivery) -> String {
    String::from_utf8_lossy(d.message().payload()).into_owned()
}

async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let res = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    for r in res {
        r.unwrap();
    }
}

fn raw_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .create()
        .unwrap()
}

async fn raw_send(p: &FutureProducer, topic: &str, partition: i32, payload: &str) {
    p.send(
        FutureRecord::<(), _>::to(topic)
            .partition(partition)
            .payload(payload),
        LIMIT,
    )
    .await
    .map_err(|(e, _)| e)
    .unwrap();
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

/// Waits until the group's committed offset of `partition` is `want`.
async fn await_committed(brokers: &str, group_id: &str, topic: &str, partition: i32, want: i64) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let (b, g, t) = (brokers.to_owned(), group_id.to_owned(), topic.to_owned());
        let now = tokio::task::spawn_blocking(move || committed(&b, &g, &t, partition))
            .await
            .unwrap();
        if now == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "committed offset of partition {partition} stayed {now:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_unreachable_broker_fails_within_the_timeout_naming_the_address() {
    let addr = closed_port();
    let mut c = KafkaConfig::new(&addr);
    c.connect_timeout = Duration::from_secs(2);
    let started = Instant::now();
    let err = match KafkaPublisher::connect(c.clone()).await {
        Ok(_) => panic!("connecting to {addr} must fail"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(err.to_string().contains(&addr), "names the address: {err}");
    assert!(err.is_transient());
    let err = match KafkaSubscriber::connect(c).await {
        Ok(_) => panic!("connecting to {addr} must fail"),
        Err(e) => e,
    };
    assert!(err.to_string().contains(&addr), "names the address: {err}");
    // Two connects of 2 s each; the bound is generous, it only rules out a hang.
    assert!(started.elapsed() < LIMIT, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn malformed_configuration_is_refused_before_connecting() {
    let addr = closed_port();
    let mut c = KafkaConfig::new(&addr);
    c.properties.insert("no.such.property".into(), "1".into());
    let err = match KafkaPublisher::connect(c.clone()).await {
        Ok(_) => panic!("an unknown librdkafka property must be refused"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("no.such.property"), "{err}");
    let err = match KafkaSubscriber::connect(c).await {
        Ok(_) => panic!("an unknown librdkafka property must be refused"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("no.such.property"), "{err}");

    let mut c = KafkaConfig::new(&addr);
    c.consumer_properties
        .insert("group.id".into(), "sneaky".into());
    let err = match KafkaSubscriber::connect(c).await {
        Ok(_) => panic!("a reserved property must be refused"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("group.id"), "{err}");

    let err = serde_json::from_str::<KafkaConfig>(r#"{"brokers": 9092}"#).unwrap_err();
    assert!(err.to_string().contains("invalid type"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_is_refused_naming_the_limit() {
    let Some(brokers) = brokers() else { return };
    let mut c = config(&brokers);
    c.max_message_bytes = 10_000;
    let topic = unique_topic("too-large");
    let p = KafkaPublisher::connect(c.clone()).await.unwrap();
    let s = KafkaSubscriber::connect(c).await.unwrap();
    let mut stream = s.subscribe(&topic, SubscribeOptions::new()).await.unwrap();
    let small = Message::new("fits");
    let big = Message::new(vec![7u8; 10_001]);
    let err = p
        .publish(&topic, vec![small.clone(), big.clone()])
        .await
        .unwrap_err();
    match &err {
        Error::MessageTooLarge {
            uuid, limit, size, ..
        } => {
            assert_eq!(uuid, big.uuid());
            assert_eq!(*limit, 10_000);
            assert!(*size > 10_000);
        }
        other => panic!("expected MessageTooLarge, got {other}"),
    }
    assert!(err.to_string().contains("10000"), "{err}");
    assert!(err.to_string().contains(&topic), "{err}");
    assert!(
        quiet(&mut stream).await.is_none(),
        "a refused batch is not published at all"
    );
    p.publish(&topic, vec![small.clone()]).await.unwrap();
    assert_eq!(next(&mut stream, "small").await.message(), &small);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topics_are_an_error_when_creation_is_off() {
    let Some(brokers) = brokers() else { return };
    let mut c = config(&brokers);
    c.create_topics = false;
    let topic = unique_topic("missing");
    let p = KafkaPublisher::connect(c.clone()).await.unwrap();
    let err = p.publish_one(&topic, Message::new("x")).await.unwrap_err();
    assert!(err.to_string().contains(&topic), "{err}");
    assert!(err.to_string().contains("create_topics"), "{err}");
    assert!(!err.is_transient());
    let s = KafkaSubscriber::connect(c).await.unwrap();
    let err = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&topic), "{err}");
    let err = p
        .publish_one("bad topic!", Message::new("x"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("bad topic!"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_topics_get_the_configured_partitions_and_keys_stay_on_one() {
    let Some(brokers) = brokers() else { return };
    let mut c = config(&brokers);
    c.partitions = 4;
    let topic = unique_topic("partitions");
    let p = KafkaPublisher::connect(c).await.unwrap();
    let mut msgs = Vec::new();
    for i in 0..40 {
        msgs.push(Message::new(format!("m{i}")).with_key(format!("key-{}", i % 8)));
    }
    p.publish(&topic, msgs.clone()).await.unwrap();

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", unique_topic("raw"))
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .unwrap();
    assert_eq!(md.topics()[0].partitions().len(), 4);
    let mut tpl = TopicPartitionList::new();
    for part in 0..4 {
        tpl.add_partition_offset(&topic, part, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut partition_of: HashMap<Vec<u8>, i32> = HashMap::new();
    let mut seen = 0;
    let deadline = Instant::now() + LIMIT;
    while seen < msgs.len() {
        assert!(Instant::now() < deadline, "only {seen} records read back");
        use rdkafka::message::Message as _;
        let Some(r) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let r = r.unwrap();
        seen += 1;
        let key = r.key().unwrap().to_vec();
        let prev = partition_of.insert(key.clone(), r.partition());
        assert!(
            prev.is_none_or(|p| p == r.partition()),
            "key {:?} on two partitions",
            String::from_utf8_lossy(&key)
        );
        let headers = r.headers().expect("headers");
        assert_eq!(headers.get(0).key, "tidemill-uuid");
    }
    let used: std::collections::HashSet<i32> = partition_of.values().copied().collect();
    assert!(
        used.len() > 1,
        "8 keys spread over the 4 partitions: {partition_of:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_from_other_clients_get_stable_uuids_and_keep_binary_headers() {
    let Some(brokers) = brokers() else { return };
    let c = config(&brokers);
    let topic = unique_topic("foreign");
    let s = KafkaSubscriber::connect(c).await.unwrap();
    let mut a = s.subscribe(&topic, SubscribeOptions::new()).await.unwrap();
    let mut b = s.subscribe(&topic, SubscribeOptions::new()).await.unwrap();
    let raw = raw_producer(&brokers);
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "trace",
            value: Some(&[0xffu8, 0x00, 0x01][..]),
        })
        .insert(Header {
            key: "content-type",
            value: Some("text/plain"),
        })
        .insert(Header::<&[u8]> {
            key: "flag",
            value: None,
        });
    raw.send(
        FutureRecord::to(&topic)
            .key(&[0x00u8, 0xfe][..])
            .payload(&[1u8, 2, 3][..])
            .headers(headers),
        LIMIT,
    )
    .await
    .map_err(|(e, _)| e)
    .unwrap();
    raw.send(FutureRecord::<(), ()>::to(&topic), LIMIT)
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let first = next(&mut a, "the foreign record").await;
    let m = first.message().clone();
    assert_eq!(m.uuid().len(), 36, "a uuid is derived: {}", m.uuid());
    assert_eq!(m.payload().as_ref(), &[1, 2, 3]);
    assert_eq!(m.key().map(|k| k.to_vec()), Some(vec![0x00, 0xfe]));
    assert_eq!(m.metadata().get("trace.b64"), Some("/wAB"));
    assert_eq!(m.metadata().get("content-type"), Some("text/plain"));
    assert_eq!(m.metadata().get("flag"), Some(""));
    assert_eq!(
        next(&mut b, "the same record elsewhere")
            .await
            .message()
            .uuid(),
        m.uuid(),
        "every subscription derives the same uuid"
    );
    let tombstone = next(&mut a, "the record without value").await;
    assert!(tombstone.message().payload().is_empty());
    assert!(tombstone.message().metadata().is_empty());
    assert_ne!(tombstone.message().uuid(), m.uuid());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_offsets_are_committed_contiguously() {
    let Some(brokers) = brokers() else { return };
    let mut c = config(&brokers);
    c.commit_interval = Duration::from_millis(100);
    let group_id = format!("{}ledger", c.group_prefix);
    let topic = unique_topic("contiguous");
    let p = KafkaPublisher::connect(c.clone()).await.unwrap();
    let s = KafkaSubscriber::connect(c.clone()).await.unwrap();
    let opts = SubscribeOptions::group("ledger");
    s.initialize(&topic, &opts).await.unwrap();
    await_committed(&brokers, &group_id, &topic, 0, 0).await; // initialize pinned the start

    let msgs: Vec<Message> = (0..5).map(|i| Message::new(format!("m{i}"))).collect();
    p.publish(&topic, msgs.clone()).await.unwrap();
    let mut stream = s.subscribe(&topic, opts.clone()).await.unwrap();
    let mut held = Vec::new();
    for i in 0..5 {
        let d = next(&mut stream, "m0..m4").await;
        assert_eq!(payload(&d), format!("m{i}"));
        held.push(d);
    }
    // Ack m1..m4 but not m0: nothing may be committed.
    let m0 = held.remove(0);
    for d in held {
        d.ack().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // several commit intervals
    assert_eq!(committed(&brokers, &group_id, &topic, 0), Some(0));
    // Acking m0 completes the prefix: offset 5 is committed (periodically, not on close).
    m0.ack().await.unwrap();
    await_committed(&brokers, &group_id, &topic, 0, 5).await;

    // A nack holds the commit point back too, and the message comes again.
    p.publish(&topic, vec![Message::new("m5"), Message::new("m6")])
        .await
        .unwrap();
    let m5 = next(&mut stream, "m5").await;
    let m6 = next(&mut stream, "m6").await;
    assert_eq!((payload(&m5), payload(&m6)), ("m5".into(), "m6".into()));
    m6.ack().await.unwrap();
    m5.nack().await.unwrap();
    let again = next(&mut stream, "m5 again").await;
    assert_eq!(payload(&again), "m5");
    assert_eq!(again.attempt(), Some(2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(committed(&brokers, &group_id, &topic, 0), Some(5));
    again.ack().await.unwrap();
    await_committed(&brokers, &group_id, &topic, 0, 7).await;
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_commits_only_what_was_acked_and_the_next_member_resumes_there() {
    let Some(brokers) = brokers() else { return };
    let c = config(&brokers);
    let topic = unique_topic("resume");
    let p = KafkaPublisher::connect(c.clone()).await.unwrap();
    let opts = SubscribeOptions::group("resume");
    let s = KafkaSubscriber::connect(c.clone()).await.unwrap();
    s.initialize(&topic, &opts).await.unwrap();
    let msgs: Vec<Message> = (0..4).map(|i| Message::new(format!("m{i}"))).collect();
    p.publish(&topic, msgs).await.unwrap();
    let mut stream = s.subscribe(&topic, opts.clone()).await.unwrap();
    let m0 = next(&mut stream, "m0").await;
    let m1 = next(&mut stream, "m1").await;
    let m2 = next(&mut stream, "m2").await;
    m0.ack().await.unwrap();
    m2.ack().await.unwrap(); // m1 held: only m0 counts
    s.close().await.unwrap();
    assert!(
        tokio::time::timeout(LIMIT, stream.next())
            .await
            .unwrap()
            .is_none(),
        "the stream ends on close"
    );
    m1.ack().await.unwrap(); // after close: valid, but commits nothing

    let s = KafkaSubscriber::connect(c).await.unwrap();
    let mut stream = s.subscribe(&topic, opts).await.unwrap();
    let first = next(&mut stream, "the first unacked message").await;
    assert_eq!(
        payload(&first),
        "m1",
        "resumes at the first unacked message"
    );
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_partition_is_not_committed_by_its_old_owner() {
    let Some(brokers) = brokers() else { return };
    let mut c = config(&brokers);
    c.commit_interval = Duration::from_millis(100);
    let group_id = format!("{}rebalanced", c.group_prefix);
    let topic = unique_topic("revoke");
    let p = KafkaPublisher::connect(c.clone()).await.unwrap();
    let opts = SubscribeOptions::group("rebalanced");
    let first = KafkaSubscriber::connect(c.clone()).await.unwrap();
    let mut one = first.subscribe(&topic, opts.clone()).await.unwrap();
    p.publish_one(&topic, Message::new("m0")).await.unwrap();
    let held = next(&mut one, "m0 on the first member").await;

    // A second member joins: the group rebalances (every partition is revoked first).
    let second = KafkaSubscriber::connect(c.clone()).await.unwrap();
    let mut two = second.subscribe(&topic, opts).await.unwrap();
    held.ack().await.unwrap(); // too late: the partition was revoked meanwhile
    tokio::time::sleep(Duration::from_millis(500)).await; // several commit intervals
    assert_eq!(
        committed(&brokers, &group_id, &topic, 0),
        Some(0),
        "the old owner's ack after revocation is not committed"
    );
    // The partition's owner now (either member) receives m0 again.
    let again = tokio::select! {
        d = next(&mut one, "m0 again") => d,
        d = next(&mut two, "m0 again") => d,
    };
    assert_eq!(payload(&again), "m0");
    again.ack().await.unwrap();
    await_committed(&brokers, &group_id, &topic, 0, 1).await;
    first.close().await.unwrap();
    second.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_with_delay_holds_back_only_its_key() {
    let Some(brokers) = brokers() else { return };
    let c = config(&brokers);
    let topic = unique_topic("delay-key");
    let p = KafkaPublisher::connect(c.clone()).await.unwrap();
    let s = KafkaSubscriber::connect(c).await.unwrap();
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    p.publish(
        &topic,
        vec![
            Message::new("a1").with_key("a"),
            Message::new("a2").with_key("a"),
        ],
    )
    .await
    .unwrap();
    let a1 = next(&mut stream, "a1").await;
    let delay = Duration::from_secs(2);
    let nacked_at = Instant::now();
    a1.nack_with_delay(delay).await.unwrap();
    // Same partition, other key (and no key): delivered meanwhile.
    p.publish(
        &topic,
        vec![Message::new("b1").with_key("b"), Message::new("none")],
    )
    .await
    .unwrap();
    let b1 = next(&mut stream, "b1 while a1 waits").await;
    assert_eq!(payload(&b1), "b1");
    let none = next(&mut stream, "the keyless one while a1 waits").await;
    assert_eq!(payload(&none), "none");
    b1.ack().await.unwrap();
    none.ack().await.unwrap();
    let again = next(&mut stream, "a1 after its delay").await;
    assert_eq!(payload(&again), "a1", "a2 does not overtake a1");
    assert!(nacked_at.elapsed() + Duration::from_millis(50) >= delay);
    again.ack().await.unwrap();
    assert_eq!(payload(&next(&mut stream, "a2").await), "a2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_ordering_serializes_messages_without_keys() {
    let Some(brokers) = brokers() else { return };
    let mut c = config(&brokers);
    c.ordering = Ordering::Partition;
    let topic = unique_topic("partition-order");
    let p = KafkaPublisher::connect(c.clone()).await.unwrap();
    let s = KafkaSubscriber::connect(c).await.unwrap();
    let mut stream = s.subscribe(&topic, SubscribeOptions::new()).await.unwrap();
    p.publish(
        &topic,
        vec![Message::new("x1"), Message::new("x2").with_key("k")],
    )
    .await
    .unwrap();
    let x1 = next(&mut stream, "x1").await;
    assert!(
        quiet(&mut stream).await.is_none(),
        "x2 waits for x1 although their keys differ"
    );
    x1.nack().await.unwrap();
    assert_eq!(payload(&next(&mut stream, "x1 again").await), "x1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_partition_stops_only_itself() {
    let Some(brokers) = brokers() else { return };
    let mut c = config(&brokers);
    c.max_buffered_per_partition = 5;
    c.start_from = StartFrom::Earliest;
    let topic = unique_topic("backpressure");
    create_topic(&brokers, &topic, 2).await;
    let raw = raw_producer(&brokers);
    for i in 0..20 {
        raw_send(&raw, &topic, 0, &format!("p0-{i}")).await;
    }
    for i in 0..5 {
        raw_send(&raw, &topic, 1, &format!("p1-{i}")).await;
    }
    let s = KafkaSubscriber::connect(c).await.unwrap();
    let mut stream = s.subscribe(&topic, SubscribeOptions::new()).await.unwrap();
    let mut held = Vec::new();
    let mut p1 = 0;
    while held.len() < 5 || p1 < 5 {
        let d = next(&mut stream, "the first five of each partition").await;
        if payload(&d).starts_with("p1-") {
            p1 += 1;
            d.ack().await.unwrap();
        } else {
            held.push(d);
        }
    }
    assert!(
        quiet(&mut stream).await.is_none(),
        "partition 0 holds 5 unacked messages: no more of it until acks make room"
    );
    let held_names: Vec<String> = held.iter().map(payload).collect();
    assert_eq!(
        held_names,
        (0..5).map(|i| format!("p0-{i}")).collect::<Vec<_>>()
    );
    for d in held {
        d.ack().await.unwrap();
    }
    for i in 5..20 {
        let d = next(&mut stream, "the rest of partition 0").await;
        assert_eq!(payload(&d), format!("p0-{i}"));
        d.ack().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_processes_keys_in_parallel_and_each_key_in_order() {
    let Some(brokers) = brokers() else { return };
    let c = config(&brokers);
    let topic = unique_topic("router");
    let p = KafkaPublisher::connect(c.clone()).await.unwrap();
    let s = KafkaSubscriber::connect(c).await.unwrap();
    s.initialize(&topic, &SubscribeOptions::group("workers"))
        .await
        .unwrap();

    let keys = 4;
    let per_key = 5;
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let seen: Arc<parking_lot::Mutex<HashMap<String, Vec<usize>>>> = Arc::default();
    // The first message of every key waits until all keys are being handled at once:
    // with the keys processed one after another this never happens (and the test fails
    // at its time limit); with parallel processing it happens at once.
    let all_in = Arc::new(tokio::sync::Barrier::new(keys));
    let router = Router::new();
    let handler = {
        let (running, peak, seen, all_in) =
            (running.clone(), peak.clone(), seen.clone(), all_in.clone());
        move |m: Message| {
            let (running, peak, seen, all_in) =
                (running.clone(), peak.clone(), seen.clone(), all_in.clone());
            async move {
                let now = running.fetch_add(1, AtomicOrdering::SeqCst) + 1;
                peak.fetch_max(now, AtomicOrdering::SeqCst);
                let key = m.key_str().unwrap_or_default().to_owned();
                let seq: usize = m
                    .metadata()
                    .get_as("seq")
                    .ok()
                    .flatten()
                    .unwrap_or(usize::MAX);
                if seq == 0 {
                    all_in.wait().await;
                }
                seen.lock().entry(key).or_default().push(seq);
                running.fetch_sub(1, AtomicOrdering::SeqCst);
                HandlerResult::Ok(())
            }
        }
    };
    router
        .add_handler("parallel")
        .subscribe(s.clone(), &topic)
        .group("workers")
        .concurrency(8)
        .handler(handler)
        .await
        .unwrap();
    let run = {
        let r = router.clone();
        tokio::spawn(async move { r.run().await })
    };
    router.running().await;
    let mut msgs = Vec::new();
    for seq in 0..per_key {
        for k in 0..keys {
            msgs.push(
                Message::new(format!("k{k}-{seq}"))
                    .with_key(format!("k{k}"))
                    .with_metadata("seq", seq),
            );
        }
    }
    p.publish(&topic, msgs).await.unwrap();
    let deadline = Instant::now() + LIMIT;
    while seen.lock().values().map(Vec::len).sum::<usize>() < keys * per_key {
        assert!(
            Instant::now() < deadline,
            "not all handled: {:?}",
            seen.lock()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    router.close().await.unwrap();
    run.await.unwrap().unwrap();
    assert!(peak.load(AtomicOrdering::SeqCst) >= keys);
    for (key, seqs) in seen.lock().iter() {
        assert_eq!(seqs, &(0..per_key).collect::<Vec<_>>(), "order of {key}");
    }
}

/// The high watermark of `partition`: how many records the broker holds (from offset 0).
fn high_watermark(brokers: &str, topic: &str, partition: i32) -> i64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    c.fetch_watermarks(topic, partition, LIMIT).unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_nack_holds_its_record_and_the_commit_point_and_writes_nothing() {
    let Some(brokers) = brokers() else { return };
    let mut c = config(&brokers);
    c.commit_interval = Duration::from_millis(100);
    let group_id = format!("{}held", c.group_prefix);
    let topic = unique_topic("held");
    let p = KafkaPublisher::connect(c.clone()).await.unwrap();
    let s = KafkaSubscriber::connect(c).await.unwrap();
    let opts = SubscribeOptions::group("held");
    s.initialize(&topic, &opts).await.unwrap();
    p.publish(
        &topic,
        vec![
            Message::new("a1").with_key("a"),
            Message::new("a2").with_key("a"),
            Message::new("b1").with_key("b"),
            Message::new("b2").with_key("b"),
            Message::new("n1"),
        ],
    )
    .await
    .unwrap();
    let mut stream = s.subscribe(&topic, opts).await.unwrap();
    let mut first = HashMap::new();
    for _ in 0..3 {
        let d = next(&mut stream, "the heads of a, b and the keyless one").await;
        first.insert(payload(&d), d);
    }
    let mut names: Vec<&String> = first.keys().collect();
    names.sort();
    assert_eq!(names, ["a1", "b1", "n1"]);
    let delay = Duration::from_secs(3);
    let nacked_at = Instant::now();
    first
        .remove("a1")
        .unwrap()
        .nack_with_delay(delay)
        .await
        .unwrap();
    for (_, d) in first {
        d.ack().await.unwrap();
    }
    let b2 = next(&mut stream, "b2 while a1 is held").await;
    assert_eq!(payload(&b2), "b2");
    b2.ack().await.unwrap();
    assert!(
        quiet(&mut stream).await.is_none(),
        "a2 waits behind the held a1"
    );
    tokio::time::sleep(Duration::from_millis(500)).await; // several commit intervals
    assert_eq!(
        committed(&brokers, &group_id, &topic, 0),
        Some(0),
        "the commit point stays at the held record"
    );
    assert_eq!(
        high_watermark(&brokers, &topic, 0),
        5,
        "a nack writes nothing to the broker"
    );
    let again = next(&mut stream, "a1 after its delay").await;
    assert_eq!(payload(&again), "a1");
    assert_eq!(again.attempt(), Some(2));
    assert!(nacked_at.elapsed() + Duration::from_millis(50) >= delay);
    again.ack().await.unwrap();
    let a2 = next(&mut stream, "a2").await;
    assert_eq!(payload(&a2), "a2");
    assert_eq!(a2.attempt(), Some(1));
    a2.ack().await.unwrap();
    await_committed(&brokers, &group_id, &topic, 0, 5).await;
    assert_eq!(high_watermark(&brokers, &topic, 0), 5);
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_hands_unpolled_records_to_the_other_member() {
    let Some(brokers) = brokers() else { return };
    let c = config(&brokers);
    let topic = unique_topic("handover");
    create_topic(&brokers, &topic, 2).await;
    let opts = SubscribeOptions::group("handover");
    let first = KafkaSubscriber::connect(c.clone()).await.unwrap();
    first.initialize(&topic, &opts).await.unwrap();
    let _never_polled = first.subscribe(&topic, opts.clone()).await.unwrap();
    let second = KafkaSubscriber::connect(c).await.unwrap();
    // Joining rebalances the group: one partition each.
    let mut stream = second.subscribe(&topic, opts).await.unwrap();
    let raw = raw_producer(&brokers);
    for part in 0..2 {
        for i in 0..3 {
            raw_send(&raw, &topic, part, &format!("p{part}-{i}")).await;
        }
    }
    let mut own = Vec::new();
    for _ in 0..3 {
        let d = next(&mut stream, "the second member's partition").await;
        own.push(payload(&d));
        d.ack().await.unwrap();
    }
    let mine = own[0][..2].to_owned();
    assert!(own.iter().all(|n| n.starts_with(&mine)), "{own:?}");
    // Let the first member take its partition's records into its buffer, unpolled.
    tokio::time::sleep(QUIET).await;
    let closed_at = Instant::now();
    first.close().await.unwrap();
    let close_took = closed_at.elapsed();
    let mut handed = Vec::new();
    for _ in 0..3 {
        let d = next(&mut stream, "the closed member's records").await;
        handed.push(payload(&d));
        d.ack().await.unwrap();
    }
    eprintln!(
        "handover: close took {close_took:?}; the other member had the records {:?} after close began",
        closed_at.elapsed()
    );
    let other = if mine == "p0" { "p1" } else { "p0" };
    assert_eq!(
        handed,
        (0..3).map(|i| format!("{other}-{i}")).collect::<Vec<_>>()
    );
    second.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_for_keeps_messages_for_a_group_that_never_subscribed() {
    let Some(brokers) = brokers() else { return };
    let c = config(&brokers); // start_from = latest
    let topic = unique_topic("retain");
    let p = KafkaPublisher::connect(c.clone()).await.unwrap();
    p.retain_for(&topic, "late").await.unwrap();
    p.retain_for(&topic, "late").await.unwrap(); // idempotent
    let sent = vec![Message::new("kept 1"), Message::new("kept 2")];
    p.publish_mandatory(&topic, sent.clone()).await.unwrap();
    let s = KafkaSubscriber::connect(c.clone()).await.unwrap();
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("late"))
        .await
        .unwrap();
    for m in &sent {
        let d = next(
            &mut stream,
            "a message published before the group subscribed",
        )
        .await;
        assert_eq!(d.message().uuid(), m.uuid());
        d.ack().await.unwrap();
    }
    s.close().await.unwrap();

    let mut strict = c;
    strict.create_topics = false;
    let p2 = KafkaPublisher::connect(strict).await.unwrap();
    let missing = unique_topic("retain-missing");
    let err = p2.retain_for(&missing, "g").await.unwrap_err();
    assert!(err.to_string().contains(&missing), "{err}");
    assert!(err.to_string().contains("create_topics"), "{err}");
    let err = p.retain_for(&topic, "").await.unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    p.close().await.unwrap();
    let err = p.retain_for(&topic, "late").await.unwrap_err();
    assert!(matches!(err, Error::PublisherClosed { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_seed_addresses_find_the_reachable_broker() {
    let Some(brokers) = brokers() else { return };
    // An address nothing answers on, before and after the real one: bootstrap uses the
    // list as a list (librdkafka tries the seeds in random order).
    for seeds in [
        format!("{},{brokers}", closed_port()),
        format!("{brokers},{}", closed_port()),
    ] {
        let c = config(&seeds);
        let topic = unique_topic("seeds");
        let p = KafkaPublisher::connect(c.clone()).await.unwrap();
        let s = KafkaSubscriber::connect(c).await.unwrap();
        let opts = SubscribeOptions::group("seeds");
        s.initialize(&topic, &opts).await.unwrap();
        let mut stream = s.subscribe(&topic, opts).await.unwrap();
        p.publish_one(&topic, Message::new("through the seed list"))
            .await
            .unwrap();
        let d = next(&mut stream, &format!("the message with seeds {seeds}")).await;
        assert_eq!(payload(&d), "through the seed list");
        d.ack().await.unwrap();
        s.close().await.unwrap();
        p.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_every_commits_before_the_interval() {
    let Some(brokers) = brokers() else { return };
    let mut c = config(&brokers);
    c.commit_interval = Duration::from_secs(3600); // never, within the test
    c.commit_every = 5;
    let group_id = format!("{}batches", c.group_prefix);
    let topic = unique_topic("commit-every");
    let p = KafkaPublisher::connect(c.clone()).await.unwrap();
    let s = KafkaSubscriber::connect(c).await.unwrap();
    let opts = SubscribeOptions::group("batches");
    s.initialize(&topic, &opts).await.unwrap();
    await_committed(&brokers, &group_id, &topic, 0, 0).await;
    let msgs: Vec<Message> = (0..12).map(|i| Message::new(format!("m{i}"))).collect();
    p.publish(&topic, msgs).await.unwrap();
    let mut stream = s.subscribe(&topic, opts).await.unwrap();
    for i in 0..12 {
        let d = next(&mut stream, "m0..m11").await;
        assert_eq!(payload(&d), format!("m{i}"));
        d.ack().await.unwrap();
        if i == 4 || i == 9 {
            // The fifth ack since the last commit commits at once. (Waiting for it before
            // the next ack: otherwise the poll thread, woken by the fifth, may already see
            // the next acks and commit those too.)
            await_committed(&brokers, &group_id, &topic, 0, i as i64 + 1).await;
        }
    }
    // Two acks wait for the interval (or the close).
    tokio::time::sleep(QUIET).await;
    assert_eq!(committed(&brokers, &group_id, &topic, 0), Some(10));
    s.close().await.unwrap();
    assert_eq!(committed(&brokers, &group_id, &topic, 0), Some(12));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_hands_out_nothing_of_revoked_partitions() {
    let Some(brokers) = brokers() else { return };
    let mut c = config(&brokers);
    c.start_from = StartFrom::Earliest;
    let topic = unique_topic("rebalance-dups");
    create_topic(&brokers, &topic, 2).await;
    let raw = raw_producer(&brokers);
    for part in 0..2 {
        for i in 0..20 {
            raw_send(&raw, &topic, part, &format!("p{part}-{i}")).await;
        }
    }
    let opts = SubscribeOptions::group("rebalance-dups");
    let first = KafkaSubscriber::connect(c.clone()).await.unwrap();
    let mut one = first.subscribe(&topic, opts.clone()).await.unwrap();
    // The first member takes what it has received (both partitions) at its first poll
    // and hands out one; the rest waits in the stream.
    let held = next(&mut one, "the first member's first message").await;
    let held_name = payload(&held);
    tokio::time::sleep(QUIET).await;
    // A second member joins: every partition is revoked, then one goes to each.
    let second = KafkaSubscriber::connect(c).await.unwrap();
    let mut two = second.subscribe(&topic, opts).await.unwrap();
    held.ack().await.unwrap(); // too late to count: it comes again to its new owner
    let mut seen: HashMap<String, usize> = HashMap::new();
    while seen.len() < 40 {
        let d = tokio::select! {
            d = next(&mut one, "the records") => d,
            d = next(&mut two, "the records") => d,
        };
        *seen.entry(payload(&d)).or_default() += 1;
        d.ack().await.unwrap();
    }
    // Anything more would be a duplicate.
    let mut late = Vec::new();
    while let Some(d) = tokio::select! {
        d = quiet(&mut one) => d,
        d = quiet(&mut two) => d,
    } {
        late.push(payload(&d));
        d.ack().await.unwrap();
    }
    let twice: Vec<_> = seen
        .iter()
        .filter(|(name, n)| **n > 1 && **name != held_name)
        .collect();
    assert!(
        twice.is_empty() && late.is_empty(),
        "records handed out again besides the one out at the rebalance ({held_name}): {twice:?}, {late:?}"
    );
    first.close().await.unwrap();
    second.close().await.unwrap();
}
