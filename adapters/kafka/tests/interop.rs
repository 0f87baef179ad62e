//! Records from plain Kafka clients (rdkafka's `FutureProducer` and `BaseConsumer`, the
//! way any other Kafka client sees the topics) into and out of Tidemill: what the
//! subscriber shows of odd records (string view and `KafkaRecord`), a pass-through handler
//! that changes nothing (the plain consumer downstream sees the same bytes), delivery
//! attempts that no header can set, and Watermill's uuid header both ways.
//!
//! Against the Kafka-protocol broker of brokers (`TIDEMILL_KAFKA_BROKERS`); every
//! test skips without it.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tidemill_core::{
    Delivery, DeliveryStream, HandlerResult, Message, Publisher, Router, RouterConfig,
    SubscribeOptions, Subscriber,
};
use tidemill_kafka::{
    KafkaConfig, KafkaPublisher, KafkaRecord, KafkaSubscriber, KafkaTimestamp, Ordering,
};
use tidemill_testkit::unique_topic;

/// Generous bound for anything that should happen; never what a test relies on to pass.
const LIMIT: Duration = Duration::from_secs(60);
/// The "1 MB" payload.
const MIB: usize = 1 << 20;
/// Record size limit of the plain producer and the Tidemill publisher in these tests.
const MAX_BYTES: usize = 3_000_000;

fn brokers() -> Option<String> {
    match std::env::var("TIDEMILL_KAFKA_BROKERS") {
        Ok(b) => Some(b),
        Err(_) => {
            eprintln!("SKIP: TIDEMILL_KAFKA_BROKERS is not set (no broker to test against)");
            None
        }
    }
}

/// The test configuration; records are handed out in partition order (not only per key),
/// so they arrive in the order they were produced.
fn config(brokers: &str) -> KafkaConfig {
    let mut c = common::test_config(brokers);
    c.max_message_bytes = MAX_BYTES;
    // The topics the adapter creates take records that large too (Kafka's default limit
    // is 1 MiB + 12 bytes per record batch, less than the "1 MB" payload and its headers).
    c.topic_config
        .insert("max.message.bytes".into(), MAX_BYTES.to_string());
    c.ordering = Ordering::Partition;
    c
}

fn plain_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("message.max.bytes", MAX_BYTES.to_string())
        .create()
        .unwrap()
}

/// A record as a plain client writes or reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Plain {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Plain {
    fn new(key: Option<&[u8]>, value: Option<&[u8]>) -> Self {
        Plain {
            key: key.map(<[u8]>::to_vec),
            value: value.map(<[u8]>::to_vec),
            headers: Vec::new(),
        }
    }

    fn header(mut self, name: &str, value: Option<&[u8]>) -> Self {
        self.headers
            .push((name.to_owned(), value.map(<[u8]>::to_vec)));
        self
    }

    /// The headers without those named `name`.
    fn without(&self, name: &str) -> Plain {
        Plain {
            headers: self
                .headers
                .iter()
                .filter(|(n, _)| n != name)
                .cloned()
                .collect(),
            ..self.clone()
        }
    }

    fn of_record(r: &KafkaRecord) -> Plain {
        Plain {
            key: r.key().map(<[u8]>::to_vec),
            value: r.value().map(<[u8]>::to_vec),
            headers: r
                .headers()
                .map(|h| (h.name().to_owned(), h.value().map(<[u8]>::to_vec)))
                .collect(),
        }
    }

    /// Shortened for assertion messages (1 MB payloads).
    fn summary(&self) -> String {
        format!(
            "key {:?}, value {:?} bytes, {} headers",
            self.key,
            self.value.as_ref().map(Vec::len),
            self.headers.len()
        )
    }
}

async fn produce(p: &FutureProducer, topic: &str, r: &Plain) {
    let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
    for (name, value) in &r.headers {
        headers = headers.insert(Header {
            key: name,
            value: value.as_deref(),
        });
    }
    let mut record = FutureRecord::<[u8], [u8]>::to(topic)
        .partition(0)
        .headers(headers);
    if let Some(k) = &r.key {
        record = record.key(&k[..]);
    }
    if let Some(v) = &r.value {
        record = record.payload(&v[..]);
    }
    p.send(record, LIMIT)
        .await
        .map_err(|(e, _)| e)
        .unwrap_or_else(|e| panic!("the plain producer failed: {e}"));
}

/// Reads `n` records of `topic` (partition 0, from the start) with a plain consumer.
fn consume_plain(brokers: &str, topic: &str, n: usize) -> Vec<Plain> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_topic("plain"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + LIMIT;
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "the plain consumer read {} of {n} records",
            out.len()
        );
        let Some(r) = c.poll(Duration::from_millis(100)) else {
            continue;
        };
        let r = r.unwrap_or_else(|e| panic!("the plain consumer failed: {e}"));
        out.push(Plain {
            key: r.key().map(<[u8]>::to_vec),
            value: r.payload().map(<[u8]>::to_vec),
            headers: r
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    out
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

/// One odd record and what the Tidemill subscriber must show of it.
struct Case {
    name: &'static str,
    record: Plain,
    /// The metadata (string view), exactly.
    metadata: Vec<(String, String)>,
    /// The uuid, when a header gives it (else derived from topic, partition, offset).
    uuid: Option<&'static str>,
}

fn text(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn cases() -> Vec<Case> {
    let eight_kb = "x".repeat(8 * 1024);
    let mut many = Plain::new(Some(b"many"), Some(b"200 headers"));
    let mut many_md = Vec::new();
    for i in 0..200 {
        let (k, v) = (format!("h{i:03}"), format!("value {i}"));
        many = many.header(&k, Some(v.as_bytes()));
        many_md.push((k, v));
    }
    many_md.sort();
    vec![
        Case {
            name: "non-UTF-8 header value",
            record: Plain::new(Some(b"k"), Some(b"v")).header("bin", Some(&[0xff, 0xfe, 0x00])),
            metadata: text(&[("bin.b64", "//4A")]),
            uuid: None,
        },
        Case {
            name: "binary `trace` and text `trace.b64`",
            record: Plain::new(Some(b"k"), Some(b"v"))
                .header("trace", Some(&[0x00, 0xff, 0x10]))
                .header("trace.b64", Some(b"a text header of its own")),
            // The real header keeps its name; the binary one is in the record only.
            metadata: text(&[("trace.b64", "a text header of its own")]),
            uuid: None,
        },
        Case {
            name: "duplicate header names",
            record: Plain::new(Some(b"k"), Some(b"v"))
                .header("dup", Some(b"first"))
                .header("other", Some(b"x"))
                .header("dup", Some(b"second"))
                .header("dup", Some(b"third")),
            metadata: text(&[("dup", "third"), ("other", "x")]),
            uuid: None,
        },
        Case {
            name: "empty header name",
            record: Plain::new(Some(b"k"), Some(b"v")).header("", Some(b"nameless")),
            metadata: text(&[("", "nameless")]),
            uuid: None,
        },
        Case {
            name: "header without value and header with an empty value",
            record: Plain::new(Some(b"k"), Some(b"v"))
                .header("null", None)
                .header("empty", Some(b"")),
            metadata: text(&[("empty", ""), ("null", "")]),
            uuid: None,
        },
        Case {
            name: "8 KB header value",
            record: Plain::new(Some(b"k"), Some(b"v")).header("big", Some(eight_kb.as_bytes())),
            metadata: vec![("big".into(), eight_kb.clone())],
            uuid: None,
        },
        Case {
            name: "200 headers",
            record: many,
            metadata: many_md,
            uuid: None,
        },
        Case {
            name: "empty payload",
            record: Plain::new(Some(b"k"), Some(b"")),
            metadata: vec![],
            uuid: None,
        },
        Case {
            name: "1 MB payload",
            record: Plain::new(Some(b"k"), Some(&vec![0xa5; MIB])),
            metadata: vec![],
            uuid: None,
        },
        Case {
            name: "tombstone",
            record: Plain::new(Some(b"deleted-key"), None).header("why", Some(b"gone")),
            metadata: text(&[("why", "gone")]),
            uuid: None,
        },
        Case {
            name: "null key",
            record: Plain::new(None, Some(b"keyless")),
            metadata: vec![],
            uuid: None,
        },
        Case {
            name: "empty key",
            record: Plain::new(Some(b""), Some(b"empty key")),
            metadata: vec![],
            uuid: None,
        },
        Case {
            name: "binary key and payload",
            record: Plain::new(Some(&[0x00, 0xfe]), Some(&[0xff, 0x00, 0x80])),
            metadata: vec![],
            uuid: None,
        },
        Case {
            name: "a uuid header set by the producer",
            record: Plain::new(Some(b"k"), Some(b"v"))
                .header("tidemill-uuid", Some(b"order-1-created"))
                .header("kind", Some(b"created")),
            metadata: text(&[("kind", "created")]),
            uuid: Some("order-1-created"),
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_records_from_a_plain_producer_are_delivered_faithfully() {
    let Some(brokers) = brokers() else { return };
    let c = config(&brokers);
    let topic = unique_topic("odd");
    let s = KafkaSubscriber::connect(c).await.unwrap();
    let mut stream = s.subscribe(&topic, SubscribeOptions::new()).await.unwrap();
    let plain = plain_producer(&brokers);
    let cases = cases();
    for case in &cases {
        produce(&plain, &topic, &case.record).await;
    }
    let mut last_offset = -1;
    for case in &cases {
        let d = next(&mut stream, case.name).await;
        let m = d.message();
        let r = KafkaRecord::of(m).unwrap_or_else(|| panic!("{}: no KafkaRecord", case.name));
        // The record, exactly as the producer wrote it.
        let got = Plain::of_record(r);
        assert!(
            got == case.record,
            "{}: the record is {}, expected {}",
            case.name,
            got.summary(),
            case.record.summary()
        );
        assert_eq!(r.topic(), topic, "{}", case.name);
        assert_eq!(r.partition(), 0, "{}", case.name);
        assert!(r.offset() > last_offset, "{}: offsets ascend", case.name);
        last_offset = r.offset();
        assert!(
            matches!(r.timestamp(), KafkaTimestamp::CreateTime(ms) if ms > 0),
            "{}: {:?}",
            case.name,
            r.timestamp()
        );
        assert_eq!(
            r.is_tombstone(),
            case.record.value.is_none(),
            "{}",
            case.name
        );
        // The message: payload, key, metadata (string view), uuid.
        assert_eq!(
            m.payload().as_ref(),
            case.record.value.as_deref().unwrap_or_default(),
            "{}: payload",
            case.name
        );
        assert_eq!(
            m.key().map(|k| k.to_vec()),
            case.record.key,
            "{}: key",
            case.name
        );
        let metadata: Vec<(String, String)> = m
            .metadata()
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert!(
            metadata == case.metadata,
            "{}: metadata {:?} (first 3), expected {:?}",
            case.name,
            &metadata[..metadata.len().min(3)],
            &case.metadata[..case.metadata.len().min(3)],
        );
        match case.uuid {
            Some(u) => assert_eq!(m.uuid(), u, "{}", case.name),
            None => assert_eq!(m.uuid().len(), 36, "{}: a derived uuid", case.name),
        }
        assert_eq!(d.attempt(), Some(1), "{}", case.name);
        d.ack().await.unwrap();
    }
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_through_handler_republishes_records_byte_for_byte() {
    let Some(brokers) = brokers() else { return };
    let c = config(&brokers);
    let (input, output) = (unique_topic("pass-in"), unique_topic("pass-out"));
    let p = KafkaPublisher::connect(c.clone()).await.unwrap();
    let s = KafkaSubscriber::connect(c.clone()).await.unwrap();
    let opts = SubscribeOptions::group("pass");
    s.initialize(&input, &opts).await.unwrap();
    p.ensure_topic(&output).await.unwrap();
    let plain = plain_producer(&brokers);
    let records: Vec<Plain> = cases().into_iter().map(|c| c.record).collect();
    for r in &records {
        produce(&plain, &input, r).await;
    }
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        ..RouterConfig::default()
    });
    router
        .add_handler("pass-through")
        .subscribe(s.clone(), &input)
        .group("pass")
        .publish(p.clone(), &output)
        .handler(|m: Message| async move { HandlerResult::Ok(m) })
        .await
        .unwrap();
    let run = {
        let r = router.clone();
        tokio::spawn(async move { r.run().await })
    };
    router.running().await;
    let (b, t, n) = (brokers.clone(), output.clone(), records.len());
    let got = tokio::task::spawn_blocking(move || consume_plain(&b, &t, n))
        .await
        .unwrap();
    router.close().await.unwrap();
    run.await.unwrap().unwrap();
    for (sent, got) in records.iter().zip(&got) {
        let uuids: Vec<&Option<Vec<u8>>> = got
            .headers
            .iter()
            .filter(|(n, _)| n == "tidemill-uuid")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(uuids.len(), 1, "one uuid header: {}", got.summary());
        let stripped = got.without("tidemill-uuid");
        let expected = sent.without("tidemill-uuid");
        assert!(
            stripped == expected,
            "byte-identical apart from the uuid header: got {}, sent {} (headers {:?} vs {:?})",
            got.summary(),
            sent.summary(),
            &stripped.headers[..stripped.headers.len().min(4)],
            &expected.headers[..expected.headers.len().min(4)],
        );
        if sent.headers.iter().any(|(n, _)| n == "tidemill-uuid") {
            assert!(got == sent, "a record with a uuid header passes unchanged");
        }
    }
    for c in [p.close().await, s.close().await] {
        c.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_header_sets_the_delivery_attempt() {
    let Some(brokers) = brokers() else { return };
    let c = config(&brokers);
    let topic = unique_topic("attempt");
    let s = KafkaSubscriber::connect(c).await.unwrap();
    let opts = SubscribeOptions::group("attempts");
    s.initialize(&topic, &opts).await.unwrap();
    let spoofed = Plain::new(Some(b"k"), Some(b"spoofed"))
        .header("tidemill-attempt", Some(b"9"))
        .header("x-delivery-count", Some(b"7"))
        .header("attempt", Some(b"5"))
        .header("tidemill-delivery-attempt", Some(b"3"));
    produce(&plain_producer(&brokers), &topic, &spoofed).await;
    let mut stream = s.subscribe(&topic, opts).await.unwrap();
    let first = next(&mut stream, "the spoofed record").await;
    assert_eq!(first.attempt(), Some(1), "the first delivery is attempt 1");
    assert_eq!(
        first.message().metadata().get("tidemill-attempt"),
        Some("9"),
        "the header is an ordinary header"
    );
    first.nack().await.unwrap();
    let second = next(&mut stream, "the redelivery").await;
    assert_eq!(second.attempt(), Some(2));
    second.ack().await.unwrap();
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermill_uuid_header_both_ways() {
    let Some(brokers) = brokers() else { return };
    let mut c = config(&brokers);
    c.uuid_header = "_watermill_message_uuid".into();
    let topic = unique_topic("watermill");
    // From a Watermill service (here its wire format from a plain producer).
    let s = KafkaSubscriber::connect(c.clone()).await.unwrap();
    let mut watermill_side = s.subscribe(&topic, SubscribeOptions::new()).await.unwrap();
    let default = KafkaSubscriber::connect(config(&brokers)).await.unwrap();
    let mut default_side = default
        .subscribe(&topic, SubscribeOptions::new())
        .await
        .unwrap();
    let from_watermill = Plain::new(None, Some(b"{\"order\":1}"))
        .header("_watermill_message_uuid", Some(b"0b5c4a2e-wm-1"))
        .header("name", Some(b"OrderPlaced"));
    produce(&plain_producer(&brokers), &topic, &from_watermill).await;
    let m = next(&mut watermill_side, "the Watermill message").await;
    assert_eq!(m.message().uuid(), "0b5c4a2e-wm-1");
    assert_eq!(m.message().metadata().get("name"), Some("OrderPlaced"));
    assert!(
        m.message()
            .metadata()
            .get("_watermill_message_uuid")
            .is_none(),
        "the identity header is not metadata"
    );
    let d = next(&mut default_side, "the same, default configuration").await;
    assert_ne!(
        d.message().uuid(),
        "0b5c4a2e-wm-1",
        "not read unless configured"
    );
    assert_eq!(
        d.message().metadata().get("_watermill_message_uuid"),
        Some("0b5c4a2e-wm-1")
    );

    // To a Watermill service: the uuid under its header, and no Tidemill header.
    let out = unique_topic("to-watermill");
    let p = KafkaPublisher::connect(c.clone()).await.unwrap();
    p.publish_one(
        &out,
        Message::with_uuid("tm-uuid-7", "payload").with_metadata("name", "OrderShipped"),
    )
    .await
    .unwrap();
    let (b, t) = (brokers.clone(), out.clone());
    let got = tokio::task::spawn_blocking(move || consume_plain(&b, &t, 1))
        .await
        .unwrap();
    assert_eq!(
        got[0].headers,
        vec![
            (
                "_watermill_message_uuid".to_owned(),
                Some(b"tm-uuid-7".to_vec())
            ),
            ("name".to_owned(), Some(b"OrderShipped".to_vec())),
        ]
    );

    // Tidemill's header by default, Watermill's read as well when asked.
    let mut both = config(&brokers);
    both.uuid_read_headers = vec!["_watermill_message_uuid".into()];
    let s2 = KafkaSubscriber::connect(both).await.unwrap();
    let topic2 = unique_topic("watermill-read");
    let mut stream = s2
        .subscribe(&topic2, SubscribeOptions::new())
        .await
        .unwrap();
    produce(&plain_producer(&brokers), &topic2, &from_watermill).await;
    let m = next(&mut stream, "the Watermill message, read as a fallback").await;
    assert_eq!(m.message().uuid(), "0b5c4a2e-wm-1");
    for c in [
        s.close().await,
        default.close().await,
        s2.close().await,
        p.close().await,
    ] {
        c.unwrap();
    }
}
