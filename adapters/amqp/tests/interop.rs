//! Tidemill next to plain AMQP clients (lapin playing "another client") on the RabbitMQ of
//! brokers (`TIDEMILL_AMQP_URL`): what the subscriber makes of odd messages, a
//! pass-through hop that changes nothing, attempt counts a producer cannot fake, and the
//! uuid in Watermill's header or in `message_id`.

mod common;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tidemill_amqp::{
    AmqpConfig, AmqpEnvelope, AmqpPublisher, AmqpSubscriber, QueueType, UuidCarrier,
    WATERMILL_UUID_HEADER,
};
use tidemill_core::{
    Delivery, DeliveryStream, HandlerResult, Message, Publisher, Router, RouterConfig,
    SubscribeOptions, Subscriber,
};

/// The longest any single wait in these tests may take.
const WAIT: Duration = Duration::from_secs(30);

async fn next(stream: &mut DeliveryStream, what: &str) -> Delivery {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => panic!("no delivery within {WAIT:?} while waiting for {what}"),
            Ok(None) => panic!("the stream ended while waiting for {what}"),
            Ok(Some(Err(e))) => eprintln!("stream error (continuing): {e}"),
            Ok(Some(Ok(d))) => return d,
        }
    }
}

/// A plain lapin connection and a channel in confirm mode.
async fn raw_channel(url: &str) -> (Connection, Channel) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, channel)
}

/// Publishes like any AMQP client would, and waits for the confirm.
async fn raw_publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .unwrap_or_else(|e| panic!("plain publish to `{exchange}`: {e}"))
        .await
        .unwrap_or_else(|e| panic!("plain publish to `{exchange}` not confirmed: {e}"));
    assert!(
        matches!(confirm, lapin::Confirmation::Ack(None)),
        "the broker took the plain message: {confirm:?}"
    );
}

/// An exclusive queue bound to `topic`'s exchange (declared the way Tidemill declares it),
/// consumed without acks.
async fn raw_consumer(channel: &Channel, topic: &str) -> lapin::Consumer {
    channel
        .exchange_declare(
            topic.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let queue = format!("{topic}.plain");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            topic.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
}

async fn raw_next(consumer: &mut lapin::Consumer, what: &str) -> lapin::message::Delivery {
    tokio::time::timeout(WAIT, consumer.next())
        .await
        .unwrap_or_else(|_| panic!("the plain consumer got no {what} within {WAIT:?}"))
        .unwrap_or_else(|| panic!("the plain consumer ended before the {what}"))
        .unwrap_or_else(|e| panic!("the plain consumer failed before the {what}: {e}"))
}

fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(k.into(), v);
    }
    t
}

fn long(s: impl AsRef<[u8]>) -> AMQPValue {
    AMQPValue::LongString(s.as_ref().to_vec().into())
}

/// One odd message a plain client publishes, and what Tidemill's string view shows of it.
struct Case {
    name: &'static str,
    routing_key: &'static str,
    properties: BasicProperties,
    body: Vec<u8>,
    /// (metadata key, value) pairs the string view must hold.
    shown: Vec<(String, String)>,
    /// Metadata entries in total (the `case` header included).
    count: Option<usize>,
    /// The uuid Tidemill must report; `None`: a fresh one.
    uuid: Option<&'static str>,
}

fn shown(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The odd inputs: typed headers of every AMQP field type RabbitMQ carries, every standard
/// property, binary and non-UTF-8 values, an empty header name, an 8 KB value, 200
/// headers, empty and 1 MB payloads, no `message_id`, a routing key, and both a uuid header
/// and a `message_id`.
fn cases(user: &str) -> Vec<Case> {
    let case = |name: &'static str, mut entries: Vec<(&str, AMQPValue)>| {
        entries.push(("case", long(name)));
        table(entries)
    };
    let every_type = case(
        "every-type",
        vec![
            ("bool", AMQPValue::Boolean(true)),
            ("i8", AMQPValue::ShortShortInt(-8)),
            ("u8", AMQPValue::ShortShortUInt(200)),
            ("i16", AMQPValue::ShortInt(-300)),
            ("u16", AMQPValue::ShortUInt(60_000)),
            ("i32", AMQPValue::LongInt(-70_000)),
            ("u32", AMQPValue::LongUInt(4_000_000_000)),
            ("i64", AMQPValue::LongLongInt(-9_000_000_000_000)),
            ("f32", AMQPValue::Float(1.5)),
            ("f64", AMQPValue::Double(2.25)),
            (
                "dec",
                AMQPValue::DecimalValue(DecimalValue {
                    scale: 2,
                    value: 1999,
                }),
            ),
            ("text", long("plain ✓")),
            (
                "array",
                AMQPValue::FieldArray(FieldArray::from(vec![
                    long("a"),
                    AMQPValue::LongInt(1),
                    AMQPValue::Boolean(false),
                ])),
            ),
            ("ts", AMQPValue::Timestamp(1_700_000_000)),
            (
                "table",
                AMQPValue::FieldTable(table(vec![
                    ("k", long("v")),
                    ("n", AMQPValue::LongLongInt(2)),
                ])),
            ),
            ("bytes", AMQPValue::ByteArray(vec![0u8, 1, 0xff].into())),
            ("void", AMQPValue::Void),
        ],
    );
    let mut two_hundred: Vec<(String, AMQPValue)> = (0..199)
        .map(|i| (format!("h{i:03}"), long(format!("v{i}"))))
        .collect();
    two_hundred.push(("case".into(), long("200-headers")));
    let two_hundred_table = {
        let mut t = FieldTable::default();
        for (k, v) in two_hundred {
            t.insert(k.as_str().into(), v);
        }
        t
    };
    let big_value = "x".repeat(8 * 1024);
    vec![
        Case {
            name: "every-type",
            routing_key: "",
            properties: BasicProperties::default()
                .with_message_id("every-type-1".into())
                .with_headers(every_type),
            body: b"typed".to_vec(),
            shown: shown(&[
                ("bool", "true"),
                ("i8", "-8"),
                ("u8", "200"),
                ("i16", "-300"),
                ("u16", "60000"),
                ("i32", "-70000"),
                ("u32", "4000000000"),
                ("i64", "-9000000000000"),
                ("f32", "1.5"),
                ("f64", "2.25"),
                ("dec", "19.99"),
                ("text", "plain ✓"),
                ("array", r#"["a",1,false]"#),
                ("ts", "1700000000"),
                ("table", r#"{"k":"v","n":2}"#),
                ("bytes.b64", "AAH/"),
                ("void", ""),
            ]),
            count: Some(18),
            uuid: Some("every-type-1"),
        },
        Case {
            name: "every-property",
            routing_key: "props.key",
            properties: BasicProperties::default()
                .with_content_type("application/json".into())
                .with_content_encoding("identity".into())
                .with_delivery_mode(1)
                .with_priority(7)
                .with_correlation_id("corr-9".into())
                .with_reply_to("replies".into())
                .with_expiration("600000".into())
                .with_message_id("order-1".into())
                .with_timestamp(1_700_000_001)
                .with_type("OrderPlaced".into())
                .with_user_id(user.into())
                .with_app_id("legacy-app".into())
                .with_headers(case("every-property", vec![])),
            body: br#"{"order":1}"#.to_vec(),
            shown: shown(&[
                ("amqp.content-type", "application/json"),
                ("amqp.content-encoding", "identity"),
                ("amqp.priority", "7"),
                ("amqp.correlation-id", "corr-9"),
                ("amqp.reply-to", "replies"),
                ("amqp.expiration", "600000"),
                ("amqp.timestamp", "1700000001"),
                ("amqp.type", "OrderPlaced"),
                ("amqp.user-id", user),
                ("amqp.app-id", "legacy-app"),
            ]),
            count: Some(11),
            uuid: Some("order-1"),
        },
        Case {
            name: "binary",
            routing_key: "",
            properties: BasicProperties::default().with_headers(case(
                "binary",
                vec![
                    ("trace", long([0xffu8, 0xfe, 0x00])),
                    ("trace.b64", long("a text header of that name")),
                    ("latin1", long(b"caf\xe9")),
                    ("blob", AMQPValue::ByteArray(vec![0x80u8, 0x81].into())),
                    ("utf8-bytes", AMQPValue::ByteArray(b"text".to_vec().into())),
                ],
            )),
            body: vec![0u8, 0xff, 0x7f],
            shown: shown(&[
                // The literal header keeps its name; the binary `trace` is in the envelope.
                ("trace.b64", "a text header of that name"),
                ("latin1.b64", "Y2Fm6Q=="),
                ("blob.b64", "gIE="),
                ("utf8-bytes", "text"),
            ]),
            count: Some(5),
            uuid: None,
        },
        Case {
            name: "empty-name",
            routing_key: "",
            properties: BasicProperties::default()
                .with_headers(case("empty-name", vec![("", long("nameless"))])),
            body: b"e".to_vec(),
            shown: shown(&[("", "nameless")]),
            count: Some(2),
            uuid: None,
        },
        Case {
            name: "8kb-value",
            routing_key: "",
            properties: BasicProperties::default()
                .with_headers(case("8kb-value", vec![("big", long(&big_value))])),
            body: b"b".to_vec(),
            shown: vec![("big".into(), big_value.clone())],
            count: Some(2),
            uuid: None,
        },
        Case {
            name: "200-headers",
            routing_key: "",
            properties: BasicProperties::default().with_headers(two_hundred_table),
            body: b"many".to_vec(),
            shown: shown(&[("h000", "v0"), ("h198", "v198")]),
            count: Some(200),
            uuid: None,
        },
        Case {
            name: "empty-payload",
            routing_key: "",
            properties: BasicProperties::default().with_headers(case("empty-payload", vec![])),
            body: Vec::new(),
            shown: Vec::new(),
            count: Some(1),
            uuid: None,
        },
        Case {
            name: "1mb-payload",
            routing_key: "",
            properties: BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(case("1mb-payload", vec![])),
            body: (0..1024 * 1024).map(|i| (i % 251) as u8).collect(),
            shown: Vec::new(),
            count: Some(1),
            uuid: None,
        },
        Case {
            name: "routing-key",
            routing_key: "eu.fr.orders",
            properties: BasicProperties::default().with_headers(case("routing-key", vec![])),
            body: b"routed".to_vec(),
            shown: Vec::new(),
            count: Some(1),
            uuid: None,
        },
        Case {
            name: "uuid-header-and-message-id",
            routing_key: "",
            properties: BasicProperties::default()
                .with_message_id("external-id-5".into())
                .with_headers(case(
                    "uuid-header-and-message-id",
                    vec![("tidemill-uuid", long("tm-uuid-5"))],
                )),
            body: b"both".to_vec(),
            shown: shown(&[("amqp.message-id", "external-id-5")]),
            count: Some(2),
            uuid: Some("tm-uuid-5"),
        },
    ]
}

fn case_of(headers: Option<&FieldTable>) -> String {
    match headers.and_then(|h| h.inner().get("case")) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("a delivery without its case header: {other:?}"),
    }
}

fn user_of(url: &str) -> String {
    AMQPUri::from_str(url)
        .unwrap_or_else(|e| panic!("{}: {e}", common::URL_ENV))
        .authority
        .userinfo
        .username
}

#[tokio::test]
async fn odd_messages_from_plain_clients_arrive_with_string_view_and_envelope() {
    let Some(url) = common::broker_url("odd_messages_from_plain_clients") else {
        return;
    };
    let topic = common::topic("odd");
    let s = AmqpSubscriber::connect(common::config(&url)).await.unwrap();
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let (_conn, raw) = raw_channel(&url).await;
    let cases = cases(&user_of(&url));
    for c in &cases {
        raw_publish(&raw, &topic, c.routing_key, &c.body, c.properties.clone()).await;
    }
    // Two identical messages without message_id: two uuids (the deduplicator must not
    // drop the second).
    let twin = BasicProperties::default().with_headers(table(vec![("case", long("twin"))]));
    raw_publish(&raw, &topic, "", b"twin", twin.clone()).await;
    raw_publish(&raw, &topic, "", b"twin", twin).await;

    let mut twins = Vec::new();
    let mut seen = BTreeMap::new();
    while seen.len() < cases.len() || twins.len() < 2 {
        let d = next(&mut stream, "the plain messages").await;
        let m = d.message().clone();
        let envelope = AmqpEnvelope::of(&m).expect("every delivery has an envelope");
        let name = case_of(envelope.headers());
        assert_eq!(d.attempt(), Some(1), "{name}: a first delivery");
        d.ack().await.unwrap();
        if name == "twin" {
            twins.push(m.uuid().to_owned());
            continue;
        }
        let c = cases
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("unexpected case {name}"));
        let md = m.metadata();
        assert_eq!(m.payload().as_ref(), c.body.as_slice(), "{name}: payload");
        for (k, v) in &c.shown {
            assert_eq!(
                md.get(k),
                Some(v.as_str()),
                "{name}: metadata `{k}` in {md:?}"
            );
        }
        if let Some(n) = c.count {
            assert_eq!(md.len(), n, "{name}: {md:?}");
        }
        match c.uuid {
            Some(uuid) => assert_eq!(m.uuid(), uuid, "{name}"),
            None => assert_eq!(m.uuid().len(), 36, "{name}: a generated uuid"),
        }
        assert_eq!(m.key(), None, "{name}: foreign messages have no key");
        // The envelope holds exactly what the producer sent.
        assert_eq!(envelope.properties(), &c.properties, "{name}: properties");
        assert_eq!(envelope.exchange(), topic, "{name}");
        assert_eq!(envelope.routing_key(), c.routing_key, "{name}");
        assert_eq!(envelope.queue(), format!("{topic}.g"), "{name}");
        assert!(!envelope.redelivered(), "{name}");
        assert_eq!(envelope.delivery_count(), None, "{name}");
        seen.insert(name, m.uuid().to_owned());
    }
    assert_ne!(
        twins[0], twins[1],
        "identical id-less messages get distinct uuids"
    );
    assert!(
        AmqpEnvelope::of(&Message::new("x")).is_none(),
        "only received messages have an envelope"
    );
}

#[tokio::test]
async fn a_pass_through_hop_leaves_plain_messages_byte_identical() {
    let Some(url) = common::broker_url("a_pass_through_hop") else {
        return;
    };
    let input = common::topic("relay-in");
    let output = common::topic("relay-out");
    let config = common::config(&url);
    let s = AmqpSubscriber::connect(config.clone()).await.unwrap();
    let p = AmqpPublisher::connect(config).await.unwrap();
    s.initialize(&input, &SubscribeOptions::group("relay"))
        .await
        .unwrap();
    let (_conn, raw) = raw_channel(&url).await;
    let mut plain = raw_consumer(&raw, &output).await;

    // The handler fails each message once (so it also takes a trip through a delay queue)
    // and then passes it on unchanged.
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        ..RouterConfig::default()
    });
    let uuids = Arc::new(parking_lot::Mutex::new(BTreeMap::new()));
    let seen = uuids.clone();
    router
        .add_handler("relay")
        .subscribe(s.clone(), &input)
        .group("relay")
        .publish(p.clone(), &output)
        .handler(move |m: Message| {
            let attempt = m.context().and_then(|c| c.attempt());
            let name = AmqpEnvelope::of(&m).map(|e| case_of(e.headers()));
            if let Some(name) = name {
                // The uuid of each attempt: the delay queue trip must not change it.
                seen.lock()
                    .entry(name)
                    .or_insert_with(Vec::new)
                    .push((attempt, m.uuid().to_owned()));
            }
            async move {
                if attempt == Some(1) {
                    return Err("fail once".into());
                }
                HandlerResult::Ok(m)
            }
        })
        .await
        .unwrap();
    let running = router.clone();
    let run = tokio::spawn(async move { running.run().await });
    tokio::time::timeout(WAIT, router.running()).await.unwrap();

    let cases = cases(&user_of(&url));
    for c in &cases {
        raw_publish(&raw, &input, c.routing_key, &c.body, c.properties.clone()).await;
    }
    let mut done = 0;
    while done < cases.len() {
        let out = raw_next(&mut plain, "relayed message").await;
        let name = case_of(out.properties.headers().as_ref());
        let c = cases.iter().find(|c| c.name == name).unwrap();
        assert_eq!(out.data, c.body, "{name}: body");
        assert_eq!(
            out.routing_key.as_str(),
            c.routing_key,
            "{name}: routing key"
        );
        assert_eq!(out.exchange.as_str(), output, "{name}");
        // Everything as the producer sent it, typed headers, delivery mode and all, apart
        // from the uuid header Tidemill adds to a message that carried no id.
        let mut headers = out
            .properties
            .headers()
            .clone()
            .unwrap_or_default()
            .inner()
            .clone();
        let carries_id = c.properties.message_id().is_some()
            || c.properties
                .headers()
                .as_ref()
                .is_some_and(|h| h.contains_key("tidemill-uuid"));
        let handled = uuids.lock().get(&name).cloned().unwrap();
        assert_eq!(
            handled.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
            vec![Some(1), Some(2)],
            "{name}: failed once, passed on after its delayed redelivery"
        );
        assert_eq!(
            handled[0].1, handled[1].1,
            "{name}: one uuid for both attempts"
        );
        if !carries_id {
            let uuid = handled[1].1.clone();
            assert_eq!(
                headers.remove("tidemill-uuid"),
                Some(long(uuid.as_bytes())),
                "{name}: the uuid it was handled under"
            );
        }
        let got = out
            .properties
            .clone()
            .with_headers(FieldTable::from(headers));
        assert_eq!(got, c.properties, "{name}: properties");
        done += 1;
    }
    router.close().await.unwrap();
    run.await.unwrap().unwrap();
    for c in [p.close().await, s.close().await] {
        c.unwrap();
    }
}

#[tokio::test]
async fn producers_cannot_fake_the_attempt_count() {
    let Some(url) = common::broker_url("producers_cannot_fake_the_attempt_count") else {
        return;
    };
    let (_conn, raw) = raw_channel(&url).await;
    for queue_type in [QueueType::Classic, QueueType::Quorum] {
        let topic = common::topic("spoof");
        let config = AmqpConfig {
            queue_type,
            ..common::config(&url)
        };
        let s = AmqpSubscriber::connect(config).await.unwrap();
        let mut stream = s
            .subscribe(&topic, SubscribeOptions::group("g"))
            .await
            .unwrap();
        let queue = format!("{topic}.g");
        // Everything a producer could set: an old-style attempt header, a delivery count, a
        // forged redelivery record and a forged x-death naming the delay queue.
        let forged_hop = AMQPValue::FieldTable(table(vec![
            ("attempt", AMQPValue::LongLongInt(9)),
            ("uuid", long("forged")),
        ]));
        let forged_death =
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(table(vec![
                ("queue", long(format!("{queue}.tidemill-delay-1024ms"))),
                ("reason", long("expired")),
                ("count", AMQPValue::LongLongInt(9)),
            ]))]));
        let headers = table(vec![
            ("tidemill-attempt", AMQPValue::LongInt(9)),
            ("x-delivery-count", AMQPValue::LongInt(7)),
            ("tidemill-redelivery", forged_hop.clone()),
            ("x-death", forged_death),
        ]);
        raw_publish(
            &raw,
            &topic,
            "",
            b"via the exchange",
            BasicProperties::default()
                .with_message_id("spoof-1".into())
                .with_headers(headers),
        )
        .await;
        // Straight into the group's queue through the default exchange, the way a delay
        // queue sends messages back (without the x-death RabbitMQ writes then).
        raw_publish(
            &raw,
            "",
            &queue,
            b"via the default exchange",
            BasicProperties::default()
                .with_message_id("spoof-2".into())
                .with_headers(table(vec![
                    ("tidemill-redelivery", forged_hop),
                    ("x-delivery-count", AMQPValue::LongInt(7)),
                ])),
        )
        .await;
        let mut firsts = BTreeMap::new();
        while firsts.len() < 2 {
            let d = next(&mut stream, "a spoofed message").await;
            assert_eq!(
                d.attempt(),
                Some(1),
                "{queue_type:?}: {} is a first delivery",
                d.message().uuid()
            );
            let md = d.message().metadata();
            assert_eq!(
                md.get("x-delivery-count"),
                Some("7"),
                "kept as metadata: {md:?}"
            );
            assert!(md.contains_key("tidemill-redelivery"), "{md:?}");
            assert_ne!(d.message().uuid(), "forged");
            firsts.insert(d.message().uuid().to_owned(), ());
            d.nack().await.unwrap();
        }
        // The redeliveries count from the broker's (quorum) or the subscriber's (classic)
        // count, not from the headers.
        for _ in 0..2 {
            let d = next(&mut stream, "a redelivery").await;
            assert_eq!(
                d.attempt(),
                Some(2),
                "{queue_type:?}: {}",
                d.message().uuid()
            );
            d.nack_with_delay(Duration::from_millis(50)).await.unwrap();
        }
        for _ in 0..2 {
            let d = next(&mut stream, "a delayed redelivery").await;
            assert_eq!(
                d.attempt(),
                Some(3),
                "{queue_type:?}: {}",
                d.message().uuid()
            );
            assert!(firsts.contains_key(d.message().uuid()));
            d.ack().await.unwrap();
        }
        s.close().await.unwrap();
    }
}

#[tokio::test]
async fn uuids_travel_in_watermill_header_and_message_id_both_ways() {
    let Some(url) = common::broker_url("uuids_travel_in_watermill_header") else {
        return;
    };
    let (_conn, raw) = raw_channel(&url).await;

    // Watermill → Tidemill: a message as Watermill's AMQP marshaler writes it.
    let topic = common::topic("watermill-in");
    let watermill = AmqpConfig {
        message_uuid: UuidCarrier::Watermill,
        ..common::config(&url)
    };
    let s = AmqpSubscriber::connect(watermill.clone()).await.unwrap();
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    raw_publish(
        &raw,
        &topic,
        "",
        b"{\"id\":1}",
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(table(vec![
                (WATERMILL_UUID_HEADER, long("wm-uuid-1")),
                ("name", long("OrderPlaced")),
            ])),
    )
    .await;
    let d = next(&mut stream, "the Watermill message").await;
    assert_eq!(d.message().uuid(), "wm-uuid-1");
    let md = d.message().metadata();
    assert_eq!(md.get("name"), Some("OrderPlaced"));
    assert_eq!(
        md.len(),
        1,
        "the uuid header is the uuid, not metadata: {md:?}"
    );
    d.ack().await.unwrap();

    // Tidemill → Watermill: the uuid in `_watermill_message_uuid`, metadata as string
    // headers, persistent, and no other id.
    let topic = common::topic("watermill-out");
    let mut plain = raw_consumer(&raw, &topic).await;
    let p = AmqpPublisher::connect(watermill).await.unwrap();
    p.publish_one(
        &topic,
        Message::with_uuid("tm-uuid-2", "{\"id\":2}").with_metadata("name", "OrderShipped"),
    )
    .await
    .unwrap();
    let out = raw_next(&mut plain, "the Tidemill message").await;
    let headers = out.properties.headers().clone().unwrap_or_default();
    assert_eq!(
        headers.inner().get(WATERMILL_UUID_HEADER),
        Some(&long("tm-uuid-2"))
    );
    assert_eq!(headers.inner().get("name"), Some(&long("OrderShipped")));
    assert_eq!(headers.inner().len(), 2, "{headers:?}");
    assert_eq!(out.properties.message_id(), &None);
    assert_eq!(out.properties.delivery_mode(), &Some(2));
    p.close().await.unwrap();
    s.close().await.unwrap();

    // `message_id` as it is: read from it and written to it, no uuid header.
    let topic = common::topic("message-id");
    let by_id = AmqpConfig {
        message_uuid: UuidCarrier::MessageId,
        ..common::config(&url)
    };
    let s = AmqpSubscriber::connect(by_id.clone()).await.unwrap();
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let mut plain = raw_consumer(&raw, &topic).await;
    raw_publish(
        &raw,
        &topic,
        "",
        b"plain",
        BasicProperties::default().with_message_id("order-1-created".into()),
    )
    .await;
    let d = next(&mut stream, "the message with an id").await;
    assert_eq!(d.message().uuid(), "order-1-created");
    assert!(d.message().metadata().is_empty());
    d.ack().await.unwrap();
    let _ = raw_next(
        &mut plain,
        "the plain message (seen by the plain queue too)",
    )
    .await;
    let p = AmqpPublisher::connect(by_id).await.unwrap();
    p.publish_one(&topic, Message::with_uuid("order-2-created", "x"))
        .await
        .unwrap();
    let out = raw_next(&mut plain, "the Tidemill message").await;
    assert_eq!(
        out.properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str),
        Some("order-2-created")
    );
    assert_eq!(out.properties.headers(), &None, "no uuid header");
    let d = next(&mut stream, "the Tidemill message").await;
    assert_eq!(d.message().uuid(), "order-2-created");
    d.ack().await.unwrap();
    p.close().await.unwrap();
    s.close().await.unwrap();
}

/// Publishes one message whose headers table has a name that is not UTF-8, speaking AMQP
/// over TCP directly: RabbitMQ accepts it (AMQP short strings are bytes), but no client
/// library that insists on UTF-8 (lapin among them) can write it — or read it.
async fn publish_unreadable(url: &str, exchange: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        f.extend_from_slice(payload);
        f.push(0xce);
        f
    }
    fn short(b: &[u8]) -> Vec<u8> {
        let mut v = vec![u8::try_from(b.len()).unwrap()];
        v.extend_from_slice(b);
        v
    }
    fn long(b: &[u8]) -> Vec<u8> {
        let mut v = u32::try_from(b.len()).unwrap().to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    }
    fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
        let mut v = class.to_be_bytes().to_vec();
        v.extend_from_slice(&id.to_be_bytes());
        v.extend_from_slice(args);
        v
    }
    async fn read_frame(s: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut header = [0u8; 7];
        s.read_exact(&mut header).await.unwrap();
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        let mut body = vec![0u8; size + 1];
        s.read_exact(&mut body).await.unwrap();
        body.truncate(size);
        body
    }

    let uri = AMQPUri::from_str(url).unwrap();
    let mut s = tokio::net::TcpStream::connect(common::host_port(url))
        .await
        .unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    read_frame(&mut s).await; // connection.start
    let user = &uri.authority.userinfo;
    let response = format!("\0{}\0{}", user.username, user.password);
    let mut start_ok = 0u32.to_be_bytes().to_vec(); // empty client properties
    start_ok.extend(short(b"PLAIN"));
    start_ok.extend(long(response.as_bytes()));
    start_ok.extend(short(b"en_US"));
    s.write_all(&frame(1, 0, &method(10, 11, &start_ok)))
        .await
        .unwrap();
    let tune = read_frame(&mut s).await;
    let mut tune_ok = tune[4..10].to_vec(); // channel-max, frame-max as offered
    tune_ok.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
    s.write_all(&frame(1, 0, &method(10, 31, &tune_ok)))
        .await
        .unwrap();
    let vhost = uri.vhost.as_bytes();
    let mut open = short(vhost);
    open.extend(short(b""));
    open.push(0);
    s.write_all(&frame(1, 0, &method(10, 40, &open)))
        .await
        .unwrap();
    read_frame(&mut s).await; // open-ok
    s.write_all(&frame(1, 1, &method(20, 10, &short(b""))))
        .await
        .unwrap();
    read_frame(&mut s).await; // channel.open-ok
    let mut publish = 0u16.to_be_bytes().to_vec();
    publish.extend(short(exchange.as_bytes()));
    publish.extend(short(b""));
    publish.push(0);
    s.write_all(&frame(1, 1, &method(60, 40, &publish)))
        .await
        .unwrap();
    let body = b"unreadable";
    let mut table = short(b"bad-\xff-name");
    table.push(b'S');
    table.extend(long(b"v"));
    let mut header = 60u16.to_be_bytes().to_vec();
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(&0x2000u16.to_be_bytes()); // headers only
    header.extend(long(&table));
    s.write_all(&frame(2, 1, &header)).await.unwrap();
    s.write_all(&frame(3, 1, body)).await.unwrap();
    // connection.close; its close-ok tells everything before it was processed.
    let mut close = 200u16.to_be_bytes().to_vec();
    close.extend(short(b"bye"));
    close.extend_from_slice(&[0, 0, 0, 0]);
    s.write_all(&frame(1, 0, &method(10, 50, &close)))
        .await
        .unwrap();
    let close_ok = read_frame(&mut s).await;
    assert_eq!(&close_ok[..4], &[0, 10, 0, 51], "connection.close-ok");
}

#[tokio::test]
async fn an_unreadable_message_is_quarantined_and_dead_lettered_by_a_quorum_queue() {
    let Some(url) = common::broker_url("an_unreadable_message_is_quarantined") else {
        return;
    };
    let topic = common::topic("unreadable");
    let other = common::topic("bystander");
    let dead = common::topic("unreadable-dead");
    let base = common::config(&url);
    let (_conn, raw) = raw_channel(&url).await;
    let collector = AmqpSubscriber::connect(base.clone()).await.unwrap();
    collector
        .initialize(&dead, &SubscribeOptions::group("kept"))
        .await
        .unwrap();
    let config = AmqpConfig {
        queue_type: QueueType::Quorum,
        delivery_limit: Some(2),
        dead_letter_exchange: Some(dead.clone()),
        ..base.clone()
    };
    let s = AmqpSubscriber::connect(config.clone()).await.unwrap();
    let p = AmqpPublisher::connect(config).await.unwrap();
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    // Another subscription of the same subscriber (same connection).
    let mut bystander = s
        .subscribe(&other, SubscribeOptions::group("g"))
        .await
        .unwrap();
    publish_unreadable(&url, &topic).await;
    let good = Message::new("good");
    p.publish_one(&topic, good.clone()).await.unwrap();

    // Error items while the unreadable message comes back, then the good one: the quorum
    // queue dead-letters the unreadable message past its delivery limit, and the good one
    // (only ever held back, never returned with it in quarantine) is delivered.
    let mut errors = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    let d = loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => panic!("no delivery within {WAIT:?} ({errors} errors)"),
            Ok(None) => panic!("stream ended"),
            Ok(Some(Err(e))) => {
                assert!(e.to_string().contains("cannot read"), "{e}");
                errors += 1;
            }
            Ok(Some(Ok(d))) => break d,
        }
    };
    assert_eq!(d.message().uuid(), good.uuid());
    d.ack().await.unwrap();
    assert!(errors >= 1, "the unreadable message was seen");
    // It was kept aside, not lost (no AMQP client can read it, so count it). The quorum
    // queue dead-letters on its own, after it took the message out: the copy reaches the
    // dead-letter queue a moment after the good message may have been delivered.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let kept = raw
            .queue_declare(
                format!("{dead}.kept").as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        if kept.message_count() == 1 || tokio::time::Instant::now() >= deadline {
            assert_eq!(kept.message_count(), 1, "dead-lettered within {WAIT:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Out of quarantine, the subscription carries on; the bystander lost its connection
    // once (the first time), not on every redelivery.
    let after = Message::new("after");
    p.publish_one(&topic, after.clone()).await.unwrap();
    let d = next(&mut stream, "a message after the quarantine").await;
    assert_eq!(d.message().uuid(), after.uuid());
    d.ack().await.unwrap();
    let m = Message::new("bystander");
    p.publish_one(&other, m.clone()).await.unwrap();
    let mut bystander_errors = 0;
    loop {
        match tokio::time::timeout(WAIT, bystander.next()).await {
            Ok(Some(Ok(d))) => {
                assert_eq!(d.message().uuid(), m.uuid());
                d.ack().await.unwrap();
                break;
            }
            Ok(Some(Err(_))) => bystander_errors += 1,
            other => panic!("bystander: {other:?}"),
        }
    }
    assert!(
        bystander_errors <= 1,
        "{bystander_errors} errors on the bystander"
    );
    s.close().await.unwrap();
    p.close().await.unwrap();
    collector.close().await.unwrap();
}
