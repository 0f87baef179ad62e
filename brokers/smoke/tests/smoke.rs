//! One message through each test broker, with the broker's own Rust client:
//! proof that brokers/ started something the adapters can talk to.
//!
//! Each test reads its broker's address variable (set by
//! brokers/with-brokers.sh, which `make test` runs under) and is
//! skipped, with a note on stderr, when the variable is unset.

use std::time::Duration;

use futures::StreamExt;
use tokio::time::timeout;

/// Generous bound for any single broker operation.
const LIMIT: Duration = Duration::from_secs(60);

fn addr(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            eprintln!("skipped: {var} is not set (run under brokers/with-brokers.sh)");
            None
        }
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn kafka_round_trip() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
    use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::ClientConfig;

    let Some(brokers) = addr("TIDEMILL_KAFKA_BROKERS") else {
        return;
    };
    let topic = unique("smoke");

    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let created = timeout(
        LIMIT,
        admin.create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        ),
    )
    .await
    .expect("create_topics timed out")
    .unwrap();
    for r in created {
        r.unwrap();
    }

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create()
        .unwrap();
    let headers = OwnedHeaders::new().insert(Header {
        key: "k",
        value: Some("v"),
    });
    timeout(
        LIMIT,
        producer.send(
            FutureRecord::to(&topic)
                .key("key")
                .payload("hello kafka")
                .headers(headers),
            Duration::from_secs(30),
        ),
    )
    .await
    .expect("produce timed out")
    .map_err(|(e, _)| e)
    .unwrap();

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", unique("smoke-group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let msg = timeout(LIMIT, consumer.recv())
        .await
        .expect("consume timed out")
        .unwrap();
    assert_eq!(msg.payload(), Some(&b"hello kafka"[..]));
    assert_eq!(msg.key(), Some(&b"key"[..]));
    let h = msg.headers().expect("headers lost").get(0);
    assert_eq!((h.key, h.value), ("k", Some(&b"v"[..])));
    consumer.commit_message(&msg, CommitMode::Sync).unwrap();
}

#[tokio::test]
async fn amqp_round_trip() {
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let Some(url) = addr("TIDEMILL_AMQP_URL") else {
        return;
    };
    let queue = unique("smoke");

    let conn = timeout(
        LIMIT,
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    .expect("connect timed out")
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();

    let mut headers = FieldTable::default();
    headers.insert("k".into(), AMQPValue::LongString("v".into()));
    let confirm = timeout(
        LIMIT,
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"hello amqp",
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        ),
    )
    .await
    .expect("publish timed out")
    .unwrap()
    .await
    .unwrap();
    assert!(confirm.is_ack(), "publish not confirmed: {confirm:?}");

    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "smoke".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = timeout(LIMIT, consumer.next())
        .await
        .expect("consume timed out")
        .expect("consumer ended")
        .unwrap();
    assert_eq!(delivery.data, b"hello amqp");
    let got = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("k").cloned());
    assert!(
        matches!(got, Some(AMQPValue::LongString(ref s)) if s.to_string() == "v"),
        "header lost: {got:?}"
    );
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test]
async fn nats_jetstream_round_trip() {
    use async_nats::jetstream::{self, consumer::pull, stream};

    let Some(url) = addr("TIDEMILL_NATS_URL") else {
        return;
    };
    let name = unique("SMOKE");
    let subject = format!("{name}.msg");

    let client = timeout(LIMIT, async_nats::connect(&url))
        .await
        .expect("connect timed out")
        .unwrap();
    let js = jetstream::new(client);
    let stream = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.>")],
            ..Default::default()
        })
        .await
        .unwrap();

    let mut headers = async_nats::HeaderMap::new();
    headers.insert("k", "v");
    let ack = timeout(
        LIMIT,
        js.publish_with_headers(subject.clone(), headers, "hello nats".into()),
    )
    .await
    .expect("publish timed out")
    .unwrap()
    .await
    .unwrap();
    assert_eq!(ack.stream, name);

    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("smoke".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let msg = timeout(LIMIT, messages.next())
        .await
        .expect("consume timed out")
        .expect("stream ended")
        .unwrap();
    assert_eq!(msg.payload.as_ref(), b"hello nats");
    assert_eq!(
        msg.headers
            .as_ref()
            .and_then(|h| h.get("k"))
            .map(|v| v.as_str()),
        Some("v")
    );
    msg.ack().await.unwrap();
    js.delete_stream(&name).await.unwrap();
}

#[tokio::test]
async fn pubsub_emulator_round_trip() {
    use google_cloud_auth::credentials::anonymous::Builder as Anonymous;
    use google_cloud_pubsub::client::{Publisher, Subscriber, SubscriptionAdmin, TopicAdmin};
    use google_cloud_pubsub::model::Message;

    let Some(host) = addr("PUBSUB_EMULATOR_HOST") else {
        return;
    };
    let endpoint = format!("http://{host}");
    let topic = format!("projects/tidemill-test/topics/{}", unique("smoke"));
    let subscription = format!("projects/tidemill-test/subscriptions/{}", unique("smoke"));

    // Admin calls go over REST/JSON, publish and pull over gRPC: the emulator
    // serves both on the same port.
    let topics = TopicAdmin::builder()
        .with_endpoint(&endpoint)
        .with_credentials(Anonymous::new().build())
        .build()
        .await
        .unwrap();
    let subs = SubscriptionAdmin::builder()
        .with_endpoint(&endpoint)
        .with_credentials(Anonymous::new().build())
        .build()
        .await
        .unwrap();
    timeout(LIMIT, topics.create_topic().set_name(&topic).send())
        .await
        .expect("create_topic timed out")
        .unwrap();
    timeout(
        LIMIT,
        subs.create_subscription()
            .set_name(&subscription)
            .set_topic(&topic)
            .set_ack_deadline_seconds(10)
            .send(),
    )
    .await
    .expect("create_subscription timed out")
    .unwrap();
    // An existing topic is reported as such (adapters rely on this for
    // idempotent auto-creation).
    let again = topics.create_topic().set_name(&topic).send().await;
    let err = again.expect_err("creating an existing topic succeeded");
    assert_eq!(
        err.status().map(|s| s.code),
        Some(google_cloud_gax::error::rpc::Code::AlreadyExists),
        "{err:?}"
    );

    let publisher = Publisher::builder(&topic)
        .with_endpoint(&endpoint)
        .with_credentials(Anonymous::new().build())
        .build()
        .await
        .unwrap();
    let id = timeout(
        LIMIT,
        publisher.publish(
            Message::new()
                .set_data("hello pubsub")
                .set_attributes([("k", "v")]),
        ),
    )
    .await
    .expect("publish timed out")
    .unwrap();
    assert!(!id.is_empty());

    let subscriber = Subscriber::builder()
        .with_endpoint(&endpoint)
        .with_credentials(Anonymous::new().build())
        .build()
        .await
        .unwrap();
    let mut stream = subscriber.subscribe(&subscription).build();
    let (msg, handler) = timeout(LIMIT, stream.next())
        .await
        .expect("pull timed out")
        .expect("stream ended")
        .unwrap();
    assert_eq!(msg.data.as_ref(), b"hello pubsub");
    assert_eq!(msg.attributes.get("k").map(String::as_str), Some("v"));
    handler.ack();

    timeout(
        LIMIT,
        subs.delete_subscription()
            .set_subscription(&subscription)
            .send(),
    )
    .await
    .expect("delete_subscription timed out")
    .unwrap();
    timeout(LIMIT, topics.delete_topic().set_topic(&topic).send())
        .await
        .expect("delete_topic timed out")
        .unwrap();
}
