//! What the amqp benches share: a fresh topic whose group queues are filled with the same
//! messages (so every variant reads a like-filled queue), and its removal.

use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, Consumer};
use tidemill_amqp::{AmqpPublisher, AmqpSubscriber};
use tidemill_core::{Message, Publisher, SubscribeOptions, Subscriber};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Messages per publish call when filling.
const FILL_BATCH: usize = 1_000;

/// Untimed: the broker finishes writing what it just accepted (the first reader of a
/// just-filled queue ran 2-4x slower than the next one without this pause).
const SETTLE_PAUSE: Duration = Duration::from_secs(3);

/// A fresh topic `<prefix>-<id>` with one durable queue per group bound to it, filled with
/// `n` persistent messages of `payload_len` bytes (published by Tidemill, confirmed), after
/// a pause for the broker to settle.
pub async fn filled_topic(
    publisher: &AmqpPublisher,
    setup: &AmqpSubscriber,
    prefix: &str,
    groups: &[&str],
    n: usize,
    payload_len: usize,
) -> Result<String, BoxError> {
    let topic = format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    for group in groups {
        setup
            .initialize(&topic, &SubscribeOptions::group(*group))
            .await?;
    }
    let payload = bytes::Bytes::from(
        (0..payload_len)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let mut sent = 0;
    while sent < n {
        let count = FILL_BATCH.min(n - sent);
        let msgs = (0..count).map(|_| Message::new(payload.clone())).collect();
        publisher.publish(&topic, msgs).await?;
        sent += count;
    }
    tokio::time::sleep(SETTLE_PAUSE).await;
    Ok(topic)
}

/// Deletes `topic`'s group queues and its exchange.
pub async fn delete_topic(url: &str, topic: &str, groups: &[&str]) -> Result<(), BoxError> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    for group in groups {
        channel
            .queue_delete(
                format!("{topic}.{group}").as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await?;
    }
    channel
        .exchange_delete(topic.into(), ExchangeDeleteOptions::default())
        .await?;
    conn.close(200, "OK".into()).await?;
    Ok(())
}

/// Raw lapin consuming `queue` on a connection of its own with manual acks and `prefetch`
/// (the connection is returned to be closed when done).
pub async fn raw_consumer(
    url: &str,
    queue: &str,
    prefetch: u16,
) -> Result<(Connection, Consumer), BoxError> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((conn, consumer))
}
