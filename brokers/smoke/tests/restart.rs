//! `brokers/brokers.sh restart NAME` keeps each broker's data: write
//! through the broker's own client, restart the broker, read it back.
//!
//! Skipped when the broker's address variable is unset, or when the broker
//! is external (the script then refuses to restart it, exit status 3). The
//! Pub/Sub emulator is in memory and is not tested here: a restart loses
//! everything by design.
//!
//! Restarting a broker breaks every other test using it, so these tests are
//! `#[ignore]`d: `make test` runs the ignored tests after the others, one at
//! a time (`cargo test -- --ignored --test-threads 1`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::timeout;

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

/// Restarts a broker through the script; `false` if it is external.
async fn restart(name: &str) -> bool {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../brokers.sh");
    let name = name.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .arg(script)
            .arg("restart")
            .arg(&name)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    // Through the test harness, so that it is captured like other output.
    eprint!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.code() == Some(3) {
        eprintln!("skipped: the broker is external, not restarted");
        return false;
    }
    assert!(
        out.status.success(),
        "brokers.sh restart failed: {}",
        out.status
    );
    true
}

#[tokio::test]
#[ignore = "restarts a shared broker: run alone (make test does)"]
async fn kafka_keeps_messages_and_committed_offsets() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
    use rdkafka::message::Message;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::ClientConfig;

    let Some(brokers) = addr("TIDEMILL_KAFKA_BROKERS") else {
        return;
    };
    let topic = unique("restart");
    let group = unique("restart-group");
    let consumer = |brokers: &str| -> StreamConsumer {
        let c: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", &group)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        c.subscribe(&[&topic]).unwrap();
        c
    };

    {
        let admin: AdminClient<_> = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        for r in admin
            .create_topics(
                &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .unwrap()
        {
            r.unwrap();
        }
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("acks", "all")
            .create()
            .unwrap();
        for payload in ["one", "two"] {
            producer
                .send(
                    FutureRecord::<(), _>::to(&topic).payload(payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
        // Consume and commit the first message only.
        let c = consumer(&brokers);
        let m = timeout(LIMIT, c.recv()).await.unwrap().unwrap();
        assert_eq!(m.payload(), Some(&b"one"[..]));
        c.commit_message(&m, CommitMode::Sync).unwrap();
    }

    if !restart("kafka").await {
        return;
    }

    // Same group: resumes after the committed offset.
    let c = consumer(&brokers);
    let m = timeout(LIMIT, c.recv())
        .await
        .expect("nothing consumed after the restart")
        .unwrap();
    assert_eq!(m.payload(), Some(&b"two"[..]));
}

#[tokio::test]
#[ignore = "restarts a shared broker: run alone (make test does)"]
async fn rabbitmq_keeps_durable_queues_and_persistent_messages() {
    use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
    use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let Some(url) = addr("TIDEMILL_AMQP_URL") else {
        return;
    };
    let queue = unique("restart");
    {
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
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
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                b"kept",
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
        conn.close(200, "bye".into()).await.unwrap();
    }

    if !restart("rabbitmq").await {
        return;
    }

    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let got = ch
        .basic_get(queue.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("the persistent message was lost in the restart");
    assert_eq!(got.delivery.data, b"kept");
    got.delivery.ack(BasicAckOptions::default()).await.unwrap();
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test]
#[ignore = "restarts a shared broker: run alone (make test does)"]
async fn nats_keeps_jetstream_streams() {
    use async_nats::jetstream::{self, consumer::pull, stream};

    let Some(url) = addr("TIDEMILL_NATS_URL") else {
        return;
    };
    let name = unique("RESTART");
    {
        let js = jetstream::new(async_nats::connect(&url).await.unwrap());
        js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.>")],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
        js.publish(format!("{name}.x"), "kept".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    if !restart("nats").await {
        return;
    }

    let js = jetstream::new(async_nats::connect(&url).await.unwrap());
    let stream = timeout(LIMIT, js.get_stream(&name))
        .await
        .unwrap()
        .expect("stream lost in the restart");
    let consumer = stream
        .create_consumer(pull::Config::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let msg = timeout(LIMIT, messages.next())
        .await
        .expect("nothing consumed after the restart")
        .unwrap()
        .unwrap();
    assert_eq!(msg.payload.as_ref(), b"kept");
    msg.ack().await.unwrap();
    js.delete_stream(&name).await.unwrap();
}
