//! RabbitMQ-specific behaviour beyond the conformance suite: bad input, connection faults,
//! foreign messages, attempt counting, quorum dead-lettering, ordered mode, routing keys,
//! AMQP properties. Tests that need the broker skip unless `TIDEMILL_AMQP_URL` is set.

mod common;

use std::str::FromStr;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tidemill_amqp::{AmqpConfig, AmqpPublisher, AmqpSubscriber, ExchangeType, QueueType};
use tidemill_core::{
    Delivery, DeliveryStream, Error, Message, Publisher, SubscribeOptions, Subscriber,
};
use tidemill_testkit::fault_proxy::FaultProxy;

/// The longest any single wait in these tests may take.
const WAIT: Duration = Duration::from_secs(30);

/// How long a negative check ("nothing arrives") waits.
const QUIET: Duration = Duration::from_millis(500);

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

async fn nothing_within(stream: &mut DeliveryStream, quiet: Duration) -> bool {
    !matches!(
        tokio::time::timeout(quiet, stream.next()).await,
        Ok(Some(Ok(_)))
    )
}

async fn connect(config: &AmqpConfig) -> (AmqpPublisher, AmqpSubscriber) {
    let p = AmqpPublisher::connect(config.clone())
        .await
        .unwrap_or_else(|e| panic!("publisher: {e}"));
    let s = AmqpSubscriber::connect(config.clone())
        .await
        .unwrap_or_else(|e| panic!("subscriber: {e}"));
    (p, s)
}

#[tokio::test]
async fn an_unreachable_broker_fails_fast_naming_the_address() {
    // Nothing listens on port 1: the connection is refused.
    let config = AmqpConfig {
        connect_timeout: Duration::from_secs(5),
        ..AmqpConfig::new("amqp://app:s3cret@127.0.0.1:1/%2f")
    };
    let started = std::time::Instant::now();
    let err = AmqpPublisher::connect(config.clone()).await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("127.0.0.1:1"), "names the address: {text}");
    assert!(!text.contains("s3cret"), "never shows the password: {text}");
    assert!(err.is_transient());
    let err = AmqpSubscriber::connect(config).await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_silent_broker_times_out_naming_the_address() {
    // Accepts TCP connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let config = AmqpConfig {
        connect_timeout: Duration::from_millis(300),
        ..AmqpConfig::new(format!("amqp://guest:guest@{addr}/%2f"))
    };
    let err = AmqpSubscriber::connect(config).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Connect { .. }), "{text}");
    assert!(text.contains(&addr.to_string()), "{text}");
    assert!(text.contains("connect timeout"), "{text}");
    silent.abort();
}

#[tokio::test]
async fn malformed_configuration_is_refused_naming_the_option() {
    let err = serde_json::from_str::<AmqpConfig>(r#"{"url": "amqp://x", "prefech": 1}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("prefech"), "{err}");
    let err = AmqpPublisher::connect(AmqpConfig::new("http://not-amqp"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("url"), "{err}");
    let config = AmqpConfig {
        group_queue_name: "shared".into(),
        ..AmqpConfig::default()
    };
    let err = AmqpSubscriber::connect(config).await.unwrap_err();
    assert!(err.to_string().contains("group_queue_name"), "{err}");
}

#[tokio::test]
async fn oversized_messages_are_refused_naming_the_limit() {
    let Some(url) = common::broker_url("oversized_messages_are_refused_naming_the_limit") else {
        return;
    };
    let topic = common::topic("too-large");
    // Checked by the publisher against the configured limit, before sending.
    let config = AmqpConfig {
        max_message_size: 1024,
        ..common::config(&url)
    };
    let (p, _s) = connect(&config).await;
    let big = Message::new(vec![7u8; 1025]);
    let err = p.publish_one(&topic, big.clone()).await.unwrap_err();
    match &err {
        Error::MessageTooLarge {
            size, limit, uuid, ..
        } => {
            assert_eq!((*size, *limit), (1025, 1024));
            assert_eq!(uuid, big.uuid());
        }
        other => panic!("expected MessageTooLarge, got {other}"),
    }
    assert!(err.to_string().contains("1024") && err.to_string().contains(&topic));
    p.publish_one(&topic, Message::new(vec![7u8; 1024]))
        .await
        .unwrap_or_else(|e| panic!("a message at the limit is fine: {e}"));

    // Refused by RabbitMQ itself (max_message_size, 128 MiB by default) when the
    // configured limit is higher: the broker's limit is reported.
    let config = AmqpConfig {
        max_message_size: usize::MAX,
        ..common::config(&url)
    };
    let (p, _s) = connect(&config).await;
    let huge = Message::new(vec![0u8; tidemill_amqp::RABBITMQ_MAX_MESSAGE_BYTES + 1]);
    let err = p.publish_one(&topic, huge.clone()).await.unwrap_err();
    match &err {
        Error::MessageTooLarge { limit, uuid, .. } => {
            assert_eq!(*limit, tidemill_amqp::RABBITMQ_MAX_MESSAGE_BYTES);
            assert_eq!(uuid, huge.uuid());
        }
        other => panic!("expected MessageTooLarge from the broker, got {other}"),
    }
    // The publisher carries on (on a new channel).
    p.publish_one(&topic, Message::new("small"))
        .await
        .unwrap_or_else(|e| panic!("publishing after a refused message: {e}"));
}

#[tokio::test]
async fn publishing_after_close_fails_naming_the_topic() {
    let Some(url) = common::broker_url("publishing_after_close_fails_naming_the_topic") else {
        return;
    };
    let (p, s) = connect(&common::config(&url)).await;
    p.close().await.unwrap();
    p.close().await.unwrap(); // idempotent
    let err = p
        .publish_one("orders", Message::new("late"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PublisherClosed { .. }), "{err}");
    assert!(err.to_string().contains("`orders`"), "{err}");
    s.close().await.unwrap();
    let err = s
        .subscribe("orders", SubscribeOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SubscriberClosed { .. }), "{err}");
}

#[tokio::test]
async fn a_publish_cut_off_before_its_confirm_fails_and_never_claims_success() {
    let Some(url) = common::broker_url("a_publish_cut_off_before_its_confirm_fails") else {
        return;
    };
    let topic = common::topic("unconfirmed");
    let proxy = FaultProxy::start(common::host_port(&url).as_str())
        .await
        .unwrap();
    let config = common::config(&common::via(&url, proxy.addr()));
    let (p, s) = connect(&config).await;
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("check"))
        .await
        .unwrap();
    p.publish_one(&topic, Message::new("warm-up"))
        .await
        .unwrap();
    next(&mut stream, "warm-up").await.ack().await.unwrap();

    // The broker goes silent: the message is written but no confirm can come back.
    proxy.stall();
    let m = Message::new("in flight");
    let publishing = {
        let (p, topic, m) = (p.clone(), topic.clone(), m.clone());
        tokio::spawn(async move { p.publish_one(&topic, m).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    proxy.resume();
    let result = tokio::time::timeout(WAIT, publishing)
        .await
        .expect("the publish returns once the connection is cut")
        .unwrap();
    match result {
        Err(e) => {
            eprintln!("the cut-off publish failed (expected): {e}");
            assert!(e.is_transient(), "a connection loss is transient: {e}");
        }
        // Only possible if the publish went out on a new connection after the cut; then
        // the broker has it.
        Ok(()) => {
            eprintln!("the publish went out after the cut, on a new connection");
            let d = next(&mut stream, "the confirmed message").await;
            assert_eq!(d.message().uuid(), m.uuid());
        }
    }
    // The same publisher works again.
    let after = Message::new("after");
    p.publish_one(&topic, after.clone()).await.unwrap();
    loop {
        let d = next(&mut stream, "the message after the cut").await;
        let done = d.message().uuid() == after.uuid();
        d.ack().await.unwrap();
        if done {
            break;
        }
    }
}

#[tokio::test]
async fn a_publish_that_is_never_confirmed_times_out_with_an_error() {
    let Some(url) = common::broker_url("a_publish_that_is_never_confirmed_times_out") else {
        return;
    };
    let topic = common::topic("never-confirmed");
    let proxy = FaultProxy::start(common::host_port(&url).as_str())
        .await
        .unwrap();
    let config = AmqpConfig {
        publish_timeout: Duration::from_millis(500),
        ..common::config(&common::via(&url, proxy.addr()))
    };
    let p = AmqpPublisher::connect(config).await.unwrap();
    p.publish_one(&topic, Message::new("declares the exchange"))
        .await
        .unwrap();
    proxy.stall();
    let err = p
        .publish_one(&topic, Message::new("stuck"))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("not confirmed"), "{err}");
    proxy.resume();
}

#[tokio::test]
async fn mandatory_publishing_reports_messages_no_queue_takes() {
    let Some(url) = common::broker_url("mandatory_publishing_reports_unroutable_messages") else {
        return;
    };
    let topic = common::topic("mandatory");
    let config = AmqpConfig {
        mandatory: true,
        ..common::config(&url)
    };
    let (p, s) = connect(&config).await;
    let nobody = Message::new("nobody");
    let err = p.publish_one(&topic, nobody.clone()).await.unwrap_err();
    match &err {
        Error::Unroutable { topic: t, uuid, .. } => {
            assert_eq!((t.as_str(), uuid.as_str()), (topic.as_str(), nobody.uuid()));
        }
        other => panic!("expected Unroutable, got {other}"),
    }
    assert!(err.to_string().contains(&topic), "{err}");
    // With a queue bound the same publish succeeds.
    s.initialize(&topic, &SubscribeOptions::group("g"))
        .await
        .unwrap();
    p.publish_one(&topic, Message::new("somebody"))
        .await
        .unwrap();
}

#[tokio::test]
async fn missing_exchanges_and_queues_are_named_when_declaring_is_off() {
    let Some(url) = common::broker_url("missing_topology_is_named") else {
        return;
    };
    let topic = common::topic("undeclared");
    let config = AmqpConfig {
        declare_topology: false,
        ..common::config(&url)
    };
    let (p, s) = connect(&config).await;
    let err = p.publish_one(&topic, Message::new("x")).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("exchange `{topic}` does not exist")),
        "{text}"
    );
    assert!(!err.is_transient());
    let err = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&topic), "{err}");

    // Once the exchange exists, a missing group queue is named.
    let (declaring_p, _) = connect(&common::config(&url)).await;
    declaring_p
        .publish_one(&topic, Message::new("creates the exchange"))
        .await
        .unwrap();
    let err = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("queue `{topic}.g` does not exist")),
        "{text}"
    );
    // The publisher works now, and a subscription without a group declares its own queue.
    p.publish_one(&topic, Message::new("fine")).await.unwrap();
    let mut stream = s.subscribe(&topic, SubscribeOptions::new()).await.unwrap();
    let m = Message::new("seen");
    p.publish_one(&topic, m.clone()).await.unwrap();
    assert_eq!(next(&mut stream, "m").await.message().uuid(), m.uuid());
}

/// A raw lapin connection, for playing another client.
async fn raw_channel(url: &str) -> (Connection, lapin::Channel) {
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

#[tokio::test]
async fn messages_from_other_clients_get_fresh_uuids_and_keep_binary_headers() {
    let Some(url) = common::broker_url("foreign_messages") else {
        return;
    };
    let topic = common::topic("foreign");
    let (_p, s) = connect(&common::config(&url)).await;
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let (_conn, raw) = raw_channel(&url).await;
    let mut headers = FieldTable::default();
    headers.insert(
        "trace".into(),
        AMQPValue::LongString(vec![0xffu8, 0x00, 0x01].into()),
    );
    headers.insert("count".into(), AMQPValue::LongInt(42));
    headers.insert("text".into(), AMQPValue::LongString("plain".into()));
    let payload = [0u8, 0xff, 0x10, b'x'];
    raw.basic_publish(
        topic.as_str().into(),
        "some.routing.key".into(),
        BasicPublishOptions::default(),
        &payload,
        BasicProperties::default()
            .with_headers(headers)
            .with_content_type("application/octet-stream".into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let first = next(&mut stream, "the foreign message").await;
    let uuid = first.message().uuid().to_owned();
    assert_eq!(uuid.len(), 36, "a uuid: {uuid}");
    assert_eq!(first.message().payload().as_ref(), &payload);
    let md = first.message().metadata();
    assert_eq!(md.get("trace.b64"), Some("/wAB"), "{md:?}");
    assert_eq!(md.get("count"), Some("42"));
    assert_eq!(md.get("text"), Some("plain"));
    assert_eq!(
        md.get("amqp.content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(first.message().key(), None);
    assert_eq!(first.attempt(), Some(1));
    first.nack().await.unwrap();
    let again = next(&mut stream, "the redelivery").await;
    // Without message_id or uuid header nothing identifies the message: each delivery
    // gets a fresh uuid (documented), though the attempt count follows it.
    assert_ne!(again.message().uuid(), uuid);
    assert_eq!(again.message().payload().as_ref(), &payload);
    assert_eq!(again.attempt(), Some(2));
    again.ack().await.unwrap();
}

#[tokio::test]
async fn tidemill_messages_use_native_amqp_properties() {
    let Some(url) = common::broker_url("native_properties") else {
        return;
    };
    let topic = common::topic("native");
    let (p, s) = connect(&common::config(&url)).await;
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    // Another client's queue on the same exchange sees what Tidemill put on the wire.
    let (_conn, raw) = raw_channel(&url).await;
    let queue = format!("{topic}.raw");
    raw.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    raw.queue_bind(
        queue.as_str().into(),
        topic.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut raw_consumer = raw
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
        .unwrap();

    let m = Message::new("{\"tea\": 1}")
        .with_metadata("amqp.content-type", "application/json")
        .with_metadata("amqp.correlation-id", "req-7")
        .with_metadata("amqp.priority", 4)
        .with_metadata("amqp.timestamp", 1_700_000_000u64)
        .with_metadata("tenant", "acme")
        .with_key("customer-42");
    p.publish_one(&topic, m.clone()).await.unwrap();

    let got = next(&mut stream, "m").await;
    assert_eq!(
        got.message(),
        &m,
        "uuid, metadata, payload and key round-trip"
    );
    got.ack().await.unwrap();

    let wire = tokio::time::timeout(WAIT, raw_consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let props = &wire.properties;
    let text = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
    assert_eq!(text(props.message_id()).as_deref(), Some(m.uuid()));
    assert_eq!(
        text(props.content_type()).as_deref(),
        Some("application/json")
    );
    assert_eq!(text(props.correlation_id()).as_deref(), Some("req-7"));
    assert_eq!(props.priority(), &Some(4));
    assert_eq!(props.timestamp(), &Some(1_700_000_000));
    assert_eq!(props.delivery_mode(), &Some(2), "persistent");
    assert_eq!(wire.routing_key.as_str(), "customer-42");
    let headers = props.headers().clone().unwrap_or_default();
    assert_eq!(
        headers.inner().get("tenant"),
        Some(&AMQPValue::LongString("acme".into()))
    );
    assert_eq!(
        headers.inner().get("tidemill-key"),
        Some(&AMQPValue::LongString("customer-42".into()))
    );
}

#[tokio::test]
async fn classic_queues_count_attempts_across_nacks_and_delays() {
    let Some(url) = common::broker_url("classic_attempts") else {
        return;
    };
    let topic = common::topic("attempts");
    let (p, s) = connect(&common::config(&url)).await;
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let m = Message::new("flaky").with_metadata("k", "v");
    p.publish_one(&topic, m.clone()).await.unwrap();
    for attempt in 1..=3 {
        let d = next(&mut stream, "a delivery").await;
        assert_eq!(d.message(), &m);
        assert_eq!(d.attempt(), Some(attempt));
        d.nack().await.unwrap();
    }
    let d = next(&mut stream, "the fourth delivery").await;
    assert_eq!(d.attempt(), Some(4));
    d.nack_with_delay(Duration::from_millis(200)).await.unwrap();
    let d = next(&mut stream, "the delayed delivery").await;
    assert_eq!(d.message(), &m, "a delayed redelivery is the same message");
    assert_eq!(d.attempt(), Some(5));
    d.ack().await.unwrap();
    assert!(nothing_within(&mut stream, QUIET).await);
}

#[tokio::test]
async fn quorum_queues_count_deliveries_and_dead_letter_past_the_limit() {
    let Some(url) = common::broker_url("quorum_dead_letter") else {
        return;
    };
    let topic = common::topic("quorum");
    let dead = common::topic("quorum-dead");
    let base = common::config(&url);
    let (p, s) = connect(&base).await;
    // The dead-letter exchange is the exchange of topic `dead`; a group there collects.
    let mut dead_stream = s
        .subscribe(&dead, SubscribeOptions::group("collector"))
        .await
        .unwrap();
    let config = AmqpConfig {
        queue_type: QueueType::Quorum,
        delivery_limit: Some(1),
        dead_letter_exchange: Some(dead.clone()),
        ..base
    };
    let quorum = AmqpSubscriber::connect(config).await.unwrap();
    let mut stream = quorum
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let m = Message::new("poison").with_metadata("why", "test");
    p.publish_one(&topic, m.clone()).await.unwrap();
    for attempt in 1..=2 {
        let d = next(&mut stream, "a delivery").await;
        assert_eq!(d.message(), &m, "x-delivery-count is not metadata");
        assert_eq!(d.attempt(), Some(attempt));
        d.nack().await.unwrap();
    }
    let d = next(&mut dead_stream, "the dead-lettered message").await;
    assert_eq!(d.message().uuid(), m.uuid());
    assert_eq!(d.message().payload(), m.payload());
    assert!(
        d.message().metadata().get("x-death").is_some(),
        "the broker's dead-letter trace is kept: {:?}",
        d.message().metadata()
    );
    d.ack().await.unwrap();
    assert!(
        nothing_within(&mut stream, QUIET).await,
        "not redelivered past the limit"
    );
}

/// A publisher, and a subscriber in ordered mode with its stream of group `g` on `topic`.
async fn ordered_group(url: &str, topic: &str) -> (AmqpPublisher, AmqpSubscriber, DeliveryStream) {
    let config = AmqpConfig {
        ordered: true,
        ..common::config(url)
    };
    let (p, s) = connect(&config).await;
    let stream = s
        .subscribe(topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    (p, s, stream)
}

#[tokio::test]
async fn ordered_mode_sends_nacked_messages_without_a_key_to_the_back() {
    let Some(url) = common::broker_url("ordered_keyless") else {
        return;
    };
    let topic = common::topic("ordered");
    let (p, _s, mut stream) = ordered_group(&url, &topic).await;
    let a = Message::new("a");
    let b = Message::new("b");
    let k1 = Message::new("k1").with_key("k");
    let k2 = Message::new("k2").with_key("k");
    p.publish(&topic, vec![a.clone(), b.clone(), k1.clone(), k2.clone()])
        .await
        .unwrap();
    let d = next(&mut stream, "a").await;
    assert_eq!(d.message().uuid(), a.uuid());
    assert!(nothing_within(&mut stream, QUIET).await, "one at a time");
    d.nack().await.unwrap();
    // `a` has no key: it went to the back, behind k2.
    let d = next(&mut stream, "b").await;
    assert_eq!(d.message().uuid(), b.uuid());
    d.ack().await.unwrap();
    let d = next(&mut stream, "k1").await;
    assert_eq!(d.message().uuid(), k1.uuid());
    d.nack().await.unwrap();
    // `k1` has a key: it comes back before `k2`.
    let d = next(&mut stream, "k1 again").await;
    assert_eq!(d.message().uuid(), k1.uuid());
    assert_eq!(d.attempt(), Some(2));
    d.ack().await.unwrap();
    let d = next(&mut stream, "k2").await;
    assert_eq!(d.message().uuid(), k2.uuid());
    d.ack().await.unwrap();
    let d = next(&mut stream, "a, last").await;
    assert_eq!(d.message(), &a);
    assert_eq!(d.attempt(), Some(2));
    d.ack().await.unwrap();
}

/// A caller that gives up on a settlement (a timeout, a cancelled task) drops its future
/// before it ran: the ack or nack still happens. In ordered mode (one message at a time)
/// a lost one would stall the queue for as long as the channel stays open.
#[tokio::test]
async fn settlements_whose_futures_are_dropped_still_happen() {
    let Some(url) = common::broker_url("dropped_settlements") else {
        return;
    };
    let topic = common::topic("dropped_settle");
    let (p, s, mut stream) = ordered_group(&url, &topic).await;
    let k1 = Message::new("k1").with_key("k");
    let k2 = Message::new("k2").with_key("k");
    let a = Message::new("a");
    let b = Message::new("b");
    p.publish(&topic, vec![k1.clone(), k2.clone(), a.clone(), b.clone()])
        .await
        .unwrap();
    // Each settlement below goes through the handle, whose futures run nothing until
    // polled (a dropped `Delivery::nack()` future would nack through the handle's drop).
    let drop_settlement = |d: Delivery, ack: bool| {
        let (_, handle) = d.into_parts();
        drop(if ack { handle.ack() } else { handle.nack() });
    };
    let d = next(&mut stream, "k1").await;
    assert_eq!(d.message().uuid(), k1.uuid());
    drop_settlement(d, false);
    let d = next(&mut stream, "k1 again, after its dropped nack").await;
    assert_eq!(d.message().uuid(), k1.uuid());
    drop_settlement(d, true);
    let d = next(&mut stream, "k2, after k1's dropped ack").await;
    assert_eq!(d.message().uuid(), k2.uuid());
    drop_settlement(d, true);
    let d = next(&mut stream, "a").await;
    assert_eq!(d.message().uuid(), a.uuid());
    // No key: a nack re-publishes it to the back of the queue (behind b), then acks it.
    drop_settlement(d, false);
    let d = next(&mut stream, "b, after a's dropped nack").await;
    assert_eq!(d.message().uuid(), b.uuid());
    d.ack().await.unwrap();
    let d = next(&mut stream, "a, from the back").await;
    assert_eq!(d.message().uuid(), a.uuid());
    d.ack().await.unwrap();
    assert!(
        nothing_within(&mut stream, QUIET).await,
        "each message once more at most"
    );
    s.close().await.unwrap();
}

#[tokio::test]
async fn topic_exchanges_route_by_message_key() {
    let Some(url) = common::broker_url("topic_exchange_routing") else {
        return;
    };
    let topic = common::topic("routed");
    let config = AmqpConfig {
        exchange_type: ExchangeType::Topic,
        binding_key: "eu.#".into(),
        ..common::config(&url)
    };
    let (p, s) = connect(&config).await;
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("europe"))
        .await
        .unwrap();
    let fr = Message::new("fr").with_key("eu.fr.paris");
    let ny = Message::new("ny").with_key("us.ny");
    p.publish(&topic, vec![ny, fr.clone()]).await.unwrap();
    let d = next(&mut stream, "the European message").await;
    assert_eq!(d.message(), &fr);
    d.ack().await.unwrap();
    assert!(
        nothing_within(&mut stream, QUIET).await,
        "us.ny is not bound"
    );
}

#[tokio::test]
async fn a_dropped_stream_hands_prefetched_messages_to_the_group_and_held_ones_stay_ackable() {
    let Some(url) = common::broker_url("dropped_stream") else {
        return;
    };
    let topic = common::topic("dropped");
    let (p, s1) = connect(&common::config(&url)).await;
    let s2 = AmqpSubscriber::connect(common::config(&url)).await.unwrap();
    let group = SubscribeOptions::group("g");
    s1.initialize(&topic, &group).await.unwrap();
    let msgs: Vec<Message> = (0..5).map(|i| Message::new(format!("m{i}"))).collect();
    p.publish(&topic, msgs.clone()).await.unwrap();
    let mut first = s1.subscribe(&topic, group.clone()).await.unwrap();
    let held = next(&mut first, "one message").await;
    assert_eq!(held.message().uuid(), msgs[0].uuid());
    // The other four were sent ahead (prefetch 128); dropping the stream returns them.
    drop(first);
    let mut second = s2.subscribe(&topic, group).await.unwrap();
    let mut got = Vec::new();
    for _ in 1..5 {
        let d = next(&mut second, "a message returned by the dropped stream").await;
        got.push(d.message().uuid().to_owned());
        d.ack().await.unwrap();
    }
    let want: Vec<String> = msgs[1..].iter().map(|m| m.uuid().to_owned()).collect();
    got.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(got, want_sorted);
    // The held delivery outlives its stream.
    held.ack().await.unwrap();
    assert!(
        nothing_within(&mut second, QUIET).await,
        "the acked message is gone"
    );
}

#[tokio::test]
async fn closing_the_subscriber_ends_streams_and_later_acks_say_why() {
    let Some(url) = common::broker_url("close_subscriber") else {
        return;
    };
    let topic = common::topic("closing");
    let (p, s) = connect(&common::config(&url)).await;
    let mut a = s.subscribe(&topic, SubscribeOptions::new()).await.unwrap();
    let mut b = s
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    p.publish_one(&topic, Message::new("x")).await.unwrap();
    let held = next(&mut a, "x").await;
    s.close().await.unwrap();
    for stream in [&mut a, &mut b] {
        let ended = tokio::time::timeout(WAIT, async {
            while let Some(item) = stream.next().await {
                if let Ok(d) = item {
                    let _ = d.nack().await;
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the stream ends after close");
    }
    let err = held.ack().await.unwrap_err();
    assert!(err.to_string().contains("redeliver"), "{err}");
    // The group's queue kept the message for the next subscriber.
    let s2 = AmqpSubscriber::connect(common::config(&url)).await.unwrap();
    let mut c = s2
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    next(&mut c, "x for the group").await.ack().await.unwrap();
}

#[tokio::test]
async fn failure_destinations_are_retained_and_mandatory_publishes_say_unroutable() {
    let Some(url) = common::broker_url("retain_and_mandatory") else {
        return;
    };
    let topic = common::topic("retained");
    let (p, s) = connect(&common::config(&url)).await;
    let lost = Message::new("nobody listens");
    let err = p
        .publish_mandatory(&topic, vec![lost.clone()])
        .await
        .unwrap_err();
    match &err {
        Error::Unroutable { topic: t, uuid, .. } => {
            assert_eq!((t.as_str(), uuid.as_str()), (topic.as_str(), lost.uuid()));
        }
        other => panic!("expected Unroutable, got {other}"),
    }
    // Retained for group "audit": kept although nobody subscribed yet.
    p.retain_for(&topic, "audit").await.unwrap();
    p.retain_for(&topic, "audit").await.unwrap(); // idempotent
    let kept: Vec<Message> = (0..3).map(|i| Message::new(format!("kept {i}"))).collect();
    p.publish_mandatory(&topic, kept.clone()).await.unwrap();
    let mut stream = s
        .subscribe(&topic, SubscribeOptions::group("audit"))
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..kept.len() {
        let d = next(&mut stream, "a retained message").await;
        got.push(d.message().uuid().to_owned());
        d.ack().await.unwrap();
    }
    let mut want: Vec<String> = kept.iter().map(|m| m.uuid().to_owned()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert!(
        nothing_within(&mut stream, QUIET).await,
        "the lost one is lost"
    );
}

#[tokio::test]
async fn a_returned_message_fails_its_own_batch_and_names_itself() {
    let Some(url) = common::broker_url("returned_message_names_itself") else {
        return;
    };
    // A topic exchange where only `ok.*` keys reach a queue.
    let config = AmqpConfig {
        exchange_type: ExchangeType::Topic,
        binding_key: "ok.*".into(),
        ..common::config(&url)
    };
    let (p, s) = connect(&config).await;
    let topic = common::topic("mixed");
    p.retain_for(&topic, "g").await.unwrap();
    let stray = Message::new("stray").with_key("bad.2");
    let batch = vec![
        Message::new("a").with_key("ok.1"),
        stray.clone(),
        Message::new("b").with_key("ok.3"),
    ];
    let err = p.publish_mandatory(&topic, batch).await.unwrap_err();
    match &err {
        Error::Unroutable { uuid, .. } => assert_eq!(uuid, stray.uuid()),
        other => panic!("expected Unroutable, got {other}"),
    }
    // Concurrent mandatory publishes, routable and not, never get each other's returns.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let p = p.clone();
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            let key = if i % 2 == 0 { "ok.x" } else { "nope.x" };
            let m = Message::new(format!("m{i}")).with_key(key);
            (
                i,
                m.uuid().to_owned(),
                p.publish_mandatory(&topic, vec![m]).await,
            )
        }));
    }
    for task in tasks {
        let (i, uuid, result) = task.await.unwrap();
        match (i % 2 == 0, result) {
            (true, Ok(())) => {}
            (false, Err(Error::Unroutable { uuid: returned, .. })) => assert_eq!(returned, uuid),
            (routable, other) => panic!("message {i} (routable: {routable}): {other:?}"),
        }
    }
    // Plain publishes on the shared channel are unaffected.
    p.publish(&topic, vec![Message::new("dropped").with_key("nope.y")])
        .await
        .unwrap();
    drop(s);
}

#[tokio::test]
async fn ordered_mode_holds_a_keyed_message_in_place_for_its_delay() {
    let Some(url) = common::broker_url("ordered_keyed_delay") else {
        return;
    };
    let topic = common::topic("ordered-delay");
    let (p, _s, mut stream) = ordered_group(&url, &topic).await;
    let k1 = Message::new("k1").with_key("k");
    let k2 = Message::new("k2").with_key("k");
    p.publish(&topic, vec![k1.clone(), k2.clone()])
        .await
        .unwrap();
    let d = next(&mut stream, "k1").await;
    assert_eq!(d.message().uuid(), k1.uuid());
    let delay = Duration::from_millis(400);
    let nacked = std::time::Instant::now();
    d.nack_with_delay(delay).await.unwrap();
    assert!(nacked.elapsed() < delay, "nack_with_delay returns at once");
    // Nothing overtakes k1: it comes back first, after its delay.
    let again = next(&mut stream, "k1 again").await;
    assert!(
        nacked.elapsed() >= delay,
        "redelivered after {:?}",
        nacked.elapsed()
    );
    assert_eq!(again.message(), &k1);
    assert_eq!(again.attempt(), Some(2));
    again.ack().await.unwrap();
    let d = next(&mut stream, "k2").await;
    assert_eq!(d.message().uuid(), k2.uuid());
    d.ack().await.unwrap();
}

#[tokio::test]
async fn delayed_redelivery_works_without_a_group() {
    let Some(url) = common::broker_url("delay_without_group") else {
        return;
    };
    let topic = common::topic("delay-broadcast");
    let (p, s) = connect(&common::config(&url)).await;
    let mut stream = s.subscribe(&topic, SubscribeOptions::new()).await.unwrap();
    let m = Message::new("later").with_metadata("k", "v");
    p.publish_one(&topic, m.clone()).await.unwrap();
    let d = next(&mut stream, "m").await;
    let nacked = std::time::Instant::now();
    d.nack_with_delay(Duration::from_millis(300)).await.unwrap();
    let again = next(&mut stream, "m again").await;
    assert!(nacked.elapsed() >= Duration::from_millis(300));
    assert_eq!(again.message(), &m);
    assert_eq!(again.attempt(), Some(2));
    again.ack().await.unwrap();
}

#[tokio::test]
async fn passwords_stay_out_of_errors_and_debug_output() {
    let hosts = [
        "amqp://user:hunter2@nonexistent.invalid:5672/%2f",
        "amqp://user:hunter2@127.0.0.1:1/%2f",
    ];
    for url in hosts {
        let config = AmqpConfig {
            connect_timeout: Duration::from_secs(5),
            ..AmqpConfig::new(url)
        };
        assert!(!format!("{config:?}").contains("hunter2"));
        let err = AmqpPublisher::connect(config.clone()).await.unwrap_err();
        let text = format!("{err} / {err:?}");
        assert!(!text.contains("hunter2"), "{text}");
        let err = AmqpSubscriber::connect(config).await.unwrap_err();
        let text = format!("{err} / {err:?}");
        assert!(!text.contains("hunter2"), "{text}");
    }
    // A wrong password against the real broker.
    let Some(url) = common::broker_url("passwords_stay_out_of_errors") else {
        return;
    };
    let uri = lapin::uri::AMQPUri::from_str(&url).unwrap();
    let wrong = format!(
        "amqp://{}:hunter2@{}/%2f",
        uri.authority.userinfo.username,
        common::host_port(&url)
    );
    let err = AmqpPublisher::connect(AmqpConfig::new(wrong.as_str()))
        .await
        .unwrap_err();
    let text = format!("{err} / {err:?}");
    assert!(!text.contains("hunter2"), "{text}");
    eprintln!("a wrong password: {err}");
}

/// Acks that arrive together are coalesced into `multiple` acks per channel
/// (src/settle.rs); this checks what must hold whatever was coalesced: every acked message
/// is gone, a held (unsettled) or nacked message below acked ones is not acknowledged with
/// them (it comes back when nacked; acking it by mistake would make its nack an unknown
/// delivery tag and close the channel), and every ack future reports success.
#[tokio::test]
async fn acks_arriving_together_settle_exactly_the_acked_messages() {
    let Some(url) = common::broker_url("coalesced_acks") else {
        return;
    };
    let topic = common::topic("coalesced");
    let config = AmqpConfig {
        prefetch: 1_000,
        ..common::config(&url)
    };
    let (p, s) = connect(&config).await;
    let group = SubscribeOptions::group("g");
    s.initialize(&topic, &group).await.unwrap();
    let msgs: Vec<Message> = (0..600).map(|i| Message::new(format!("m{i}"))).collect();
    p.publish(&topic, msgs.clone()).await.unwrap();
    let mut stream = s.subscribe(&topic, group.clone()).await.unwrap();
    let mut first = Vec::new();
    for _ in 0..500 {
        first.push(next(&mut stream, "the first 500").await);
    }
    let uuid = |d: &Delivery| d.message().uuid().to_owned();
    // Held across the acks: index 10 (low in the run) and 300; nacked among them: 100.
    let held_a = first.remove(300);
    let nacked = first.remove(100);
    let held_b = first.remove(10);
    let back: Vec<String> = [&held_b, &nacked, &held_a]
        .iter()
        .map(|d| uuid(d))
        .collect();
    let acks = first.into_iter().map(|d| d.ack());
    let (results, nack) = futures::join!(futures::future::join_all(acks), nacked.nack());
    for r in results {
        r.unwrap();
    }
    nack.unwrap();
    held_a.nack().await.unwrap();
    held_b.nack().await.unwrap();
    // What comes next: the 100 not yet read and the three nacked ones, each once.
    let mut got = Vec::new();
    let mut pending = Vec::new();
    for _ in 0..103 {
        let d = next(&mut stream, "the rest and the nacked ones").await;
        got.push(uuid(&d));
        pending.push(d.ack());
    }
    for r in futures::future::join_all(pending).await {
        r.unwrap();
    }
    let mut want: Vec<String> = msgs[500..].iter().map(|m| m.uuid().to_owned()).collect();
    want.extend(back);
    got.sort();
    want.sort();
    assert_eq!(
        got, want,
        "exactly the unread and the nacked messages come back"
    );
    assert!(nothing_within(&mut stream, QUIET).await, "nothing else");
    // Every ack reached the broker: a new subscriber of the group gets nothing back once
    // this one's connection (and whatever it held) is gone.
    drop(stream);
    s.close().await.unwrap();
    let s2 = AmqpSubscriber::connect(config.clone()).await.unwrap();
    let mut again = s2.subscribe(&topic, group).await.unwrap();
    assert!(nothing_within(&mut again, QUIET).await, "no ack was lost");
}

/// `ack()` books the ack for the channel's writer and returns at once, so a sequential
/// consumer's acks go out together; `close()` lets the writer finish first: every message
/// acked before it stays acked (a sentinel published afterwards is the first thing the
/// group gets again).
#[tokio::test]
async fn acks_booked_before_close_reach_the_broker() {
    let Some(url) = common::broker_url("booked_acks") else {
        return;
    };
    let topic = common::topic("booked");
    let config = AmqpConfig {
        prefetch: 50,
        ..common::config(&url)
    };
    let (p, s) = connect(&config).await;
    let group = SubscribeOptions::group("g");
    s.initialize(&topic, &group).await.unwrap();
    let msgs: Vec<Message> = (0..300).map(|i| Message::new(format!("m{i}"))).collect();
    p.publish(&topic, msgs.clone()).await.unwrap();
    let mut stream = s.subscribe(&topic, group.clone()).await.unwrap();
    for m in &msgs {
        let d = next(&mut stream, "the next message").await;
        assert_eq!(d.message().uuid(), m.uuid(), "in order");
        d.ack().await.unwrap();
    }
    drop(stream);
    s.close().await.unwrap();
    let s2 = AmqpSubscriber::connect(config).await.unwrap();
    let mut again = s2.subscribe(&topic, group).await.unwrap();
    let sentinel = Message::new("sentinel");
    p.publish_one(&topic, sentinel.clone()).await.unwrap();
    let d = next(&mut again, "the sentinel").await;
    assert_eq!(
        d.message().payload(),
        sentinel.payload(),
        "no acked message came back"
    );
    d.ack().await.unwrap();
    s2.close().await.unwrap();
}
