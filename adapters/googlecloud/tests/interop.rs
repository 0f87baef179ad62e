//! Foreign messages against the emulator (`PUBSUB_EMULATOR_HOST`), with google-cloud-pubsub's
//! own publisher and subscriber as the plain client: what a Tidemill subscriber sees of odd
//! input, a pass-through handler that leaves a message as the plain client sent it, an
//! attempt count no publisher can set, Watermill's uuid attribute both ways, and the
//! failure-destination guarantees (`retain_for`, `publish_mandatory`, delayed nacks).
//!
//! Every test skips (passing, with a note) when `PUBSUB_EMULATOR_HOST` is unset.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use google_cloud_auth::credentials::anonymous::Builder as Anonymous;
use google_cloud_pubsub::client::{Publisher as RawPublisher, SubscriptionAdmin, TopicAdmin};
use google_cloud_pubsub::model::Message as RawMessage;
use google_cloud_pubsub::subscriber::MessageStream as RawStream;
use tidemill_core::{
    DeliveryStream, Error, HandlerResult, Message, Publisher, Router, RouterConfig,
    SubscribeOptions, Subscriber,
};
use tidemill_googlecloud::{
    GoogleCloudConfig, GoogleCloudPublisher, GoogleCloudSubscriber, PubSubRecord,
    WATERMILL_UUID_ATTRIBUTE,
};
use tidemill_testkit::unique_topic;
use tokio::time::{timeout, Instant};

const PROJECT: &str = "tidemill-test";
/// Generous bound for anything that should happen (never reached when things work).
const LIMIT: Duration = Duration::from_secs(60);

fn emulator() -> Option<String> {
    match std::env::var("PUBSUB_EMULATOR_HOST") {
        Ok(host) if !host.is_empty() => Some(host),
        _ => {
            eprintln!("SKIP: PUBSUB_EMULATOR_HOST is not set (no emulator to test against)");
            None
        }
    }
}

fn path(topic: &str) -> String {
    format!("projects/{PROJECT}/topics/{topic}")
}

async fn raw_publisher(host: &str, topic: &str) -> RawPublisher {
    RawPublisher::builder(path(topic))
        .with_endpoint(format!("http://{host}"))
        .with_credentials(Anonymous::new().build())
        .build()
        .await
        .unwrap_or_else(|e| panic!("raw publisher: {e}"))
}

/// Publishes through the plain client; the message id.
async fn raw_publish(raw: &RawPublisher, msg: RawMessage) -> String {
    timeout(LIMIT, raw.publish(msg))
        .await
        .expect("raw publish timed out")
        .unwrap_or_else(|e| panic!("raw publish failed: {e}"))
}

/// A plain subscription on `topic` (created now) and its streaming pull.
async fn raw_subscription(host: &str, topic: &str, name: &str) -> RawStream {
    let admin = SubscriptionAdmin::builder()
        .with_endpoint(format!("http://{host}"))
        .with_credentials(Anonymous::new().build())
        .build()
        .await
        .unwrap_or_else(|e| panic!("subscription admin: {e}"));
    let topics = TopicAdmin::builder()
        .with_endpoint(format!("http://{host}"))
        .with_credentials(Anonymous::new().build())
        .build()
        .await
        .unwrap_or_else(|e| panic!("topic admin: {e}"));
    // The topic may exist already (AlreadyExists is fine).
    let _ = timeout(LIMIT, topics.create_topic().set_name(path(topic)).send()).await;
    let sub = format!("projects/{PROJECT}/subscriptions/{topic}.{name}");
    timeout(
        LIMIT,
        admin
            .create_subscription()
            .set_name(&sub)
            .set_topic(path(topic))
            .set_ack_deadline_seconds(60)
            .send(),
    )
    .await
    .expect("create subscription timed out")
    .unwrap_or_else(|e| panic!("create subscription: {e}"));
    let client = google_cloud_pubsub::client::Subscriber::builder()
        .with_endpoint(format!("http://{host}"))
        .with_credentials(Anonymous::new().build())
        .build()
        .await
        .unwrap_or_else(|e| panic!("raw subscriber: {e}"));
    client.subscribe(sub).build()
}

/// The next `n` messages of a plain subscription, acked.
async fn raw_receive(stream: &mut RawStream, n: usize) -> Vec<RawMessage> {
    let mut got = Vec::new();
    while got.len() < n {
        let (m, h) = timeout(LIMIT, stream.next())
            .await
            .unwrap_or_else(|_| panic!("plain subscriber: {} of {n} within {LIMIT:?}", got.len()))
            .expect("plain stream ended")
            .unwrap_or_else(|e| panic!("plain subscriber: {e}"));
        h.ack();
        got.push(m);
    }
    got
}

async fn next(stream: &mut DeliveryStream) -> tidemill_core::Delivery {
    loop {
        match timeout(LIMIT, stream.next()).await {
            Err(_) => panic!("no delivery within {LIMIT:?}"),
            Ok(None) => panic!("the stream ended"),
            Ok(Some(Err(e))) => eprintln!("stream error (continuing): {e}"),
            Ok(Some(Ok(d))) => return d,
        }
    }
}

fn attrs(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// One odd input and what the Tidemill subscriber must make of it.
struct Case {
    name: &'static str,
    data: Vec<u8>,
    attributes: HashMap<String, String>,
    ordering_key: &'static str,
    /// The uuid expected; `None`: the message id.
    uuid: Option<&'static str>,
    key: Option<Vec<u8>>,
    /// The metadata expected, exactly.
    metadata: BTreeMap<String, String>,
}

fn cases() -> Vec<Case> {
    let odd = attrs(&[
        ("with space", "a value with spaces"),
        ("dots.and:colons/slashes", "x"),
        ("ünïcødé-✓", "välüe ✓ 🚀"),
        ("UPPER", "MiXeD"),
        ("empty", ""),
        ("newline", "line 1\nline 2\r\n"),
        ("encoded-word", "=?utf-8?b?aGk=?="),
        ("trace.b64", "/wA="),
    ]);
    let hundred: HashMap<String, String> = (0..100)
        .map(|i| (format!("attr-{i:03}"), format!("value {i}")))
        .collect();
    let big_values: HashMap<String, String> = (0..3)
        .map(|i| {
            (
                format!("big-{i}"),
                char::from(b'a' + i).to_string().repeat(8 * 1024),
            )
        })
        .collect();
    let as_md = |m: &HashMap<String, String>| -> BTreeMap<String, String> {
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    vec![
        Case {
            name: "odd attribute names and values",
            data: b"odd".to_vec(),
            metadata: as_md(&odd),
            attributes: odd,
            ordering_key: "",
            uuid: None,
            key: None,
        },
        Case {
            name: "100 attributes",
            data: b"many".to_vec(),
            metadata: as_md(&hundred),
            attributes: hundred,
            ordering_key: "",
            uuid: None,
            key: None,
        },
        Case {
            // Real Pub/Sub refuses values over 1024 bytes; the emulator takes them.
            name: "8 KB attribute values",
            data: b"big values".to_vec(),
            metadata: as_md(&big_values),
            attributes: big_values,
            ordering_key: "",
            uuid: None,
            key: None,
        },
        Case {
            name: "empty payload, no attributes",
            data: Vec::new(),
            attributes: HashMap::new(),
            ordering_key: "",
            uuid: None,
            key: None,
            metadata: BTreeMap::new(),
        },
        Case {
            name: "9 MB binary payload",
            data: (0..9_000_000u32).map(|i| (i % 251) as u8).collect(),
            attributes: HashMap::new(),
            ordering_key: "",
            uuid: None,
            key: None,
            metadata: BTreeMap::new(),
        },
        Case {
            name: "ordering key",
            data: b"ordered".to_vec(),
            attributes: attrs(&[("source", "legacy")]),
            ordering_key: "acct-7",
            uuid: None,
            key: Some(b"acct-7".to_vec()),
            metadata: as_md(&attrs(&[("source", "legacy")])),
        },
        Case {
            // The ordering key is the key; the attribute stays metadata (nothing dropped).
            name: "ordering key and a tidemill-key attribute",
            data: b"both".to_vec(),
            attributes: attrs(&[("tidemill-key", "attr-key")]),
            ordering_key: "acct-8",
            uuid: None,
            key: Some(b"acct-8".to_vec()),
            metadata: as_md(&attrs(&[("tidemill-key", "attr-key")])),
        },
        Case {
            name: "attributes named like Tidemill's",
            data: b"lookalike".to_vec(),
            attributes: attrs(&[
                ("tidemill-uuid", "set-by-a-plain-client"),
                ("tidemill-key", "k-1"),
                ("tidemill-attempt", "9"),
                ("tidemill-key.b64x", "?"),
                ("_watermill_message_uuid", "wm-1"),
            ]),
            ordering_key: "",
            uuid: Some("set-by-a-plain-client"),
            key: Some(b"k-1".to_vec()),
            metadata: as_md(&attrs(&[
                ("tidemill-attempt", "9"),
                ("tidemill-key.b64x", "?"),
                ("_watermill_message_uuid", "wm-1"),
            ])),
        },
        Case {
            name: "a tidemill-key.b64 that is not base64",
            data: b"bad b64".to_vec(),
            attributes: attrs(&[("tidemill-key.b64", "not base64!")]),
            ordering_key: "",
            uuid: None,
            key: None,
            metadata: as_md(&attrs(&[("tidemill-key.b64", "not base64!")])),
        },
        Case {
            name: "an empty tidemill-uuid",
            data: b"empty uuid".to_vec(),
            attributes: attrs(&[("tidemill-uuid", "")]),
            ordering_key: "",
            uuid: None,
            key: None,
            metadata: as_md(&attrs(&[("tidemill-uuid", "")])),
        },
    ]
}

fn raw_message(case: &Case) -> RawMessage {
    let mut m = RawMessage::new()
        .set_data(case.data.clone())
        .set_attributes(case.attributes.clone());
    if !case.ordering_key.is_empty() {
        m = m.set_ordering_key(case.ordering_key);
    }
    m
}

#[tokio::test]
async fn plain_client_input_is_delivered_as_sent() {
    let Some(host) = emulator() else { return };
    let config = GoogleCloudConfig::emulator(PROJECT, &host);
    let topic = unique_topic("interop_in");
    let s = GoogleCloudSubscriber::connect(config).await.unwrap();
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let raw = raw_publisher(&host, &topic).await;
    let cases = cases();
    let mut ids = HashMap::new();
    for case in &cases {
        let id = raw_publish(&raw, raw_message(case)).await;
        ids.insert(case.data.clone(), (id, case));
    }
    let mut seen = HashSet::new();
    while seen.len() < cases.len() {
        let d = next(&mut stream).await;
        let m = d.message().clone();
        let Some((id, case)) = ids.get(m.payload().as_ref()) else {
            panic!("an unexpected payload of {} bytes", m.payload().len());
        };
        let name = case.name;
        assert!(seen.insert(name), "{name}: delivered twice");
        let uuid = case.uuid.unwrap_or(id.as_str());
        assert_eq!(m.uuid(), uuid, "{name}: uuid");
        assert_eq!(m.key().map(|k| k.to_vec()), case.key, "{name}: key");
        let metadata: BTreeMap<String, String> = m
            .metadata()
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(metadata, case.metadata, "{name}: metadata");
        assert_eq!(
            d.attempt(),
            None,
            "{name}: no delivery attempt without a policy"
        );
        let record = PubSubRecord::of(&m).unwrap_or_else(|| panic!("{name}: no record"));
        assert_eq!(record.message_id(), id, "{name}: message id");
        assert_eq!(record.attributes(), &case.attributes, "{name}: attributes");
        assert_eq!(
            record.ordering_key(),
            (!case.ordering_key.is_empty()).then_some(case.ordering_key),
            "{name}: ordering key"
        );
        assert!(record.publish_time().is_some(), "{name}: publish time");
        assert_eq!(record.delivery_attempt(), None);
        assert_eq!(record.topic(), path(&topic));
        assert!(record.subscription().ends_with(&format!("{topic}.g")));
        d.ack().await.unwrap();
    }
    s.close().await.unwrap();
}

/// A handler passing every message on unchanged: a plain subscriber of the output topic
/// sees what the plain publisher sent (data, attributes, ordering key), plus the uuid
/// attribute where the input had none. The publisher runs without `message_ordering`: an
/// input's ordering key is kept anyway.
#[tokio::test]
async fn a_pass_through_handler_changes_nothing_a_plain_consumer_sees() {
    let Some(host) = emulator() else { return };
    let config = GoogleCloudConfig::emulator(PROJECT, &host);
    let input = unique_topic("pass_in");
    let output = unique_topic("pass_out");
    let s = GoogleCloudSubscriber::connect(config.clone())
        .await
        .unwrap();
    let p = GoogleCloudPublisher::connect(config.clone()).await.unwrap();
    s.initialize(&input, &SubscribeOptions::group("relay"))
        .await
        .unwrap();
    let mut plain = raw_subscription(&host, &output, "plain").await;
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        ..RouterConfig::default()
    });
    router
        .add_handler("relay")
        .subscribe(s.clone(), &input)
        .group("relay")
        .publish(p.clone(), &output)
        .handler(|m: Message| async move { HandlerResult::Ok(m) })
        .await
        .unwrap();
    let running = {
        let router = router.clone();
        tokio::spawn(async move { router.run().await })
    };
    timeout(LIMIT, router.running()).await.expect("router runs");

    let raw = raw_publisher(&host, &input).await;
    let cases = cases();
    let mut sent = HashMap::new();
    for case in &cases {
        let id = raw_publish(&raw, raw_message(case)).await;
        sent.insert(case.data.clone(), (id, case));
    }
    let got = raw_receive(&mut plain, cases.len()).await;
    let mut names = HashSet::new();
    for m in got {
        let (id, case) = sent
            .get(m.data.as_ref())
            .unwrap_or_else(|| panic!("unexpected output of {} bytes", m.data.len()));
        assert!(names.insert(case.name), "{}: twice", case.name);
        assert_eq!(
            m.ordering_key, case.ordering_key,
            "{}: ordering key",
            case.name
        );
        let mut expected = case.attributes.clone();
        if expected.get("tidemill-uuid").is_none_or(|u| u.is_empty()) {
            // The only addition: the uuid the message had in Tidemill (its message id).
            expected.insert("tidemill-uuid".to_owned(), id.clone());
        }
        assert_eq!(m.attributes, expected, "{}: attributes", case.name);
    }
    router.close().await.unwrap();
    let _ = running.await;
    s.close().await.unwrap();
    p.close().await.unwrap();
}

/// An attempt count is never read from attributes: a plain publisher setting Tidemill's,
/// RabbitMQ's or Pub/Sub's own names gets no attempt (the emulator has no dead-letter
/// policies, so Pub/Sub reports none), before and after a redelivery.
#[tokio::test]
async fn a_publisher_cannot_set_the_attempt() {
    let Some(host) = emulator() else { return };
    let config = GoogleCloudConfig::emulator(PROJECT, &host);
    let topic = unique_topic("attempt_spoof");
    let s = GoogleCloudSubscriber::connect(config).await.unwrap();
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let raw = raw_publisher(&host, &topic).await;
    let spoof = [
        ("tidemill-attempt", "9"),
        ("x-delivery-count", "7"),
        ("delivery_attempt", "5"),
        ("deliveryAttempt", "4"),
    ];
    raw_publish(
        &raw,
        RawMessage::new()
            .set_data("spoofed")
            .set_attributes(attrs(&spoof)),
    )
    .await;
    let first = next(&mut stream).await;
    assert_eq!(first.attempt(), None);
    for (k, v) in spoof {
        assert_eq!(
            first.message().metadata().get(k),
            Some(v),
            "{k} is plain metadata"
        );
    }
    first.nack().await.unwrap();
    let again = next(&mut stream).await;
    assert_eq!(again.message().payload().as_ref(), b"spoofed");
    assert_eq!(again.attempt(), None);
    again.ack().await.unwrap();
    s.close().await.unwrap();
}

/// With `uuid_attribute` set to Watermill's: a Watermill message's uuid is read from
/// `_watermill_message_uuid`, and what Tidemill publishes carries its uuid there (and no
/// `tidemill-uuid`).
#[tokio::test]
async fn watermill_uuids_both_ways() {
    let Some(host) = emulator() else { return };
    let config = GoogleCloudConfig {
        uuid_attribute: WATERMILL_UUID_ATTRIBUTE.to_owned(),
        ..GoogleCloudConfig::emulator(PROJECT, &host)
    };
    // Watermill → Tidemill.
    let topic = unique_topic("watermill_in");
    let s = GoogleCloudSubscriber::connect(config.clone())
        .await
        .unwrap();
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let raw = raw_publisher(&host, &topic).await;
    let wm_uuid = "3f1a6c1e-6d2b-4c1e-9c7a-1b2c3d4e5f60";
    raw_publish(
        &raw,
        RawMessage::new()
            .set_data("from watermill")
            .set_attributes(attrs(&[
                (WATERMILL_UUID_ATTRIBUTE, wm_uuid),
                ("name", "OrderPlaced"),
            ])),
    )
    .await;
    let d = next(&mut stream).await;
    assert_eq!(d.message().uuid(), wm_uuid);
    assert_eq!(d.message().metadata().get("name"), Some("OrderPlaced"));
    assert_eq!(
        d.message().metadata().len(),
        1,
        "{:?}",
        d.message().metadata()
    );
    d.ack().await.unwrap();

    // Tidemill → Watermill.
    let out = unique_topic("watermill_out");
    let mut plain = raw_subscription(&host, &out, "watermill").await;
    let p = GoogleCloudPublisher::connect(config).await.unwrap();
    let msg = Message::new("to watermill").with_metadata("name", "OrderShipped");
    p.publish_one(&out, msg.clone()).await.unwrap();
    let got = raw_receive(&mut plain, 1).await;
    assert_eq!(
        got[0].attributes,
        attrs(&[
            (WATERMILL_UUID_ATTRIBUTE, msg.uuid()),
            ("name", "OrderShipped")
        ])
    );
    s.close().await.unwrap();
    p.close().await.unwrap();
}

/// `publish_mandatory` refuses a topic without subscriptions (Pub/Sub would drop the
/// message); after `retain_for` the topic keeps messages for the group, consumed later.
#[tokio::test]
async fn mandatory_publishes_need_a_subscription_and_retain_for_makes_one() {
    let Some(host) = emulator() else { return };
    let config = GoogleCloudConfig::emulator(PROJECT, &host);
    let topic = unique_topic("mandatory");
    let p = GoogleCloudPublisher::connect(config.clone()).await.unwrap();
    let lost = Message::new("nobody listens");
    let err = p
        .publish_mandatory(&topic, vec![lost.clone()])
        .await
        .expect_err("a topic without subscriptions drops messages");
    match &err {
        Error::Unroutable { topic: t, uuid, .. } => {
            assert!(t.ends_with(&topic), "{err}");
            assert_eq!(uuid, lost.uuid());
        }
        other => panic!("expected Unroutable, got {other:?}"),
    }
    assert!(err.to_string().contains(&topic), "{err}");

    p.retain_for(&topic, "keepers").await.unwrap();
    p.retain_for(&topic, "keepers").await.unwrap(); // idempotent
    let kept = Message::new("kept").with_metadata("k", "v");
    p.publish_mandatory(&topic, vec![kept.clone()])
        .await
        .unwrap();
    // Only now does the group subscribe: the message waited for it.
    let s = GoogleCloudSubscriber::connect(config).await.unwrap();
    assert_eq!(
        s.subscription_name(&topic, "keepers").unwrap(),
        format!("projects/{PROJECT}/subscriptions/{topic}.keepers")
    );
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("keepers"))
        .await
        .unwrap();
    let d = next(&mut stream).await;
    assert_eq!(d.message(), &kept);
    d.ack().await.unwrap();
    s.close().await.unwrap();
    p.close().await.unwrap();
}

/// A delivery nacked with a delay is not redelivered before the delay, while other
/// messages keep flowing; closing the subscriber releases it at once to another member.
#[tokio::test]
async fn nack_with_delay_holds_only_that_message_and_close_releases_it() {
    let Some(host) = emulator() else { return };
    let config = GoogleCloudConfig::emulator(PROJECT, &host);
    let topic = unique_topic("delayed_nack");
    let group = SubscribeOptions::group("g");
    let p = GoogleCloudPublisher::connect(config.clone()).await.unwrap();
    let s = GoogleCloudSubscriber::connect(config.clone())
        .await
        .unwrap();
    let mut stream = s.subscribe(&topic, group.clone()).await.unwrap();
    let failing = Message::new("failing");
    p.publish_one(&topic, failing.clone()).await.unwrap();
    let d = next(&mut stream).await;
    assert_eq!(d.message(), &failing);
    let delay = Duration::from_secs(5);
    let nacked = Instant::now();
    d.nack_with_delay(delay).await.unwrap();
    // Other messages flow meanwhile.
    let others: Vec<Message> = (0..20)
        .map(|i| Message::new(format!("other {i}")))
        .collect();
    p.publish(&topic, others.clone()).await.unwrap();
    let mut pending: HashSet<String> = others.iter().map(|m| m.uuid().to_owned()).collect();
    let mut redelivered_at = None;
    let mut flowed = 0;
    while !pending.is_empty() || redelivered_at.is_none() {
        let d = next(&mut stream).await;
        if d.message().uuid() == failing.uuid() {
            redelivered_at = Some(nacked.elapsed());
        } else {
            if redelivered_at.is_none() {
                flowed += 1;
            }
            pending.remove(d.message().uuid());
        }
        d.ack().await.unwrap();
    }
    let after = redelivered_at.unwrap();
    eprintln!("redelivered after {after:?}; {flowed} other messages handled before");
    assert!(
        after >= delay,
        "redelivered after {after:?}, before the {delay:?} delay"
    );

    // A long delay, then the subscriber closes: another member gets the message at once.
    let held = Message::new("held for long");
    p.publish_one(&topic, held.clone()).await.unwrap();
    let d = next(&mut stream).await;
    assert_eq!(d.message(), &held);
    d.nack_with_delay(Duration::from_secs(3600)).await.unwrap();
    s.close().await.unwrap();
    let s2 = GoogleCloudSubscriber::connect(config).await.unwrap();
    let mut other = s2.subscribe(&topic, group).await.unwrap();
    let released = Instant::now();
    let d = next(&mut other).await;
    assert_eq!(d.message(), &held);
    eprintln!("released after close in {:?}", released.elapsed());
    d.ack().await.unwrap();
    s2.close().await.unwrap();
    p.close().await.unwrap();
}
