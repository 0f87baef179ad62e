//! [`KafkaPublisher`]: an idempotent librdkafka producer with `acks=all`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tidemill_core::{Error, Message, Publisher, Result};
use tokio::sync::RwLock;

use crate::client::{blocking, broker_error, check_topic_name, creation_error, LogContext, Topics};
use crate::convert;
use crate::{KafkaConfig, BROKER};

/// Publishes messages to Kafka topics.
///
/// One librdkafka producer (idempotent, `acks=all`) shared by every clone; librdkafka
/// batches what is published concurrently. `publish` sends the whole batch, then waits
/// for the delivery report of every message: it returns `Ok` only once every in-sync
/// replica has every message. A message's key is the Kafka record key, so the default
/// partitioner keeps every key on one partition, in publish order.
///
/// ```no_run
/// use tidemill_core::{Message, Publisher};
/// use tidemill_kafka::{KafkaConfig, KafkaPublisher};
///
/// # async fn run() -> tidemill_core::Result<()> {
/// let publisher = KafkaPublisher::connect(KafkaConfig::new("127.0.0.1:9092")).await?;
/// publisher
///     .publish("orders", vec![Message::new("tea").with_key("customer-7")])
///     .await?;
/// publisher.close().await?; // later publishes fail with Error::PublisherClosed
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct KafkaPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    producer: FutureProducer<LogContext>,
    topics: Topics,
    /// `true` once closed. Publishes hold it shared while they run, so `close` waits for
    /// them and later publishes see it set.
    closed: RwLock<bool>,
}

impl KafkaPublisher {
    /// Creates the producer and checks that the brokers answer within
    /// `config.connect_timeout` (an `Error::Connect` naming `config.brokers` otherwise).
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        config.validate()?;
        let producer: FutureProducer<LogContext> = config
            .producer_client()
            .create_with_context(LogContext)
            .map_err(|e| creation_error("producer", e))?;
        let topics = Topics::connect(&config).await?;
        Ok(KafkaPublisher {
            inner: Arc::new(Inner {
                config,
                producer,
                topics,
                closed: RwLock::new(false),
            }),
        })
    }

    /// The configuration this publisher was created with.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// Creates `topic` if it does not exist (with `partitions` and `replication_factor`
    /// from the configuration), or fails naming it when `create_topics` is off. `publish`
    /// does this by itself the first time it sees a topic.
    pub async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.inner.topics.ensure(topic).await
    }

    fn publish_error(&self, topic: &str, uuid: &str, size: usize, error: KafkaError) -> Error {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
                Error::MessageTooLarge {
                    broker: BROKER,
                    topic: topic.to_owned(),
                    uuid: uuid.to_owned(),
                    size,
                    limit: self.inner.config.max_message_bytes,
                }
            }
            Some(RDKafkaErrorCode::MessageTimedOut) => Error::transient(
                BROKER,
                topic,
                format!(
                    "publish message {uuid} (not confirmed by {} within publish_timeout {:?})",
                    self.inner.config.brokers, self.inner.config.publish_timeout
                ),
                error,
            ),
            _ => broker_error(topic, format!("publish message {uuid}"), error),
        }
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        let closed = self.inner.closed.read().await;
        if *closed {
            return Err(Error::PublisherClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        check_topic_name(topic)?;
        if messages.is_empty() {
            return Ok(());
        }
        self.inner.topics.ensure(topic).await?;
        let limit = self.inner.config.max_message_bytes;
        for m in &messages {
            let size =
                convert::encoded_size(m.uuid(), m.metadata(), m.payload(), m.key().map(|k| &k[..]));
            if size > limit {
                return Err(Error::MessageTooLarge {
                    broker: BROKER,
                    topic: topic.to_owned(),
                    uuid: m.uuid().to_owned(),
                    size,
                    limit,
                });
            }
        }
        let producer = &self.inner.producer;
        let mut pending = Vec::with_capacity(messages.len());
        for m in messages {
            let (uuid, metadata, payload, key) = m.into_parts();
            let size = convert::encoded_size(&uuid, &metadata, &payload, key.as_deref());
            let mut record = FutureRecord::to(topic)
                .payload(&payload[..])
                .headers(convert::headers(&uuid, &metadata));
            if let Some(k) = &key {
                record = record.key(&k[..]);
            }
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push((uuid, size, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        // librdkafka's queue is full: wait for deliveries to make room.
                        record = r;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => return Err(self.publish_error(topic, &uuid, size, e)),
                }
            }
        }
        let mut first_error = None;
        for (uuid, size, delivery) in pending {
            let failure = match delivery.await {
                Ok(Ok(_)) => continue,
                Ok(Err((e, _))) => self.publish_error(topic, &uuid, size, e),
                Err(_) => Error::transient(
                    BROKER,
                    topic,
                    format!("publish message {uuid}"),
                    "the producer was dropped before the delivery report",
                ),
            };
            first_error.get_or_insert(failure);
        }
        drop(closed);
        match first_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    async fn close(&self) -> Result<()> {
        let mut closed = self.inner.closed.write().await;
        if *closed {
            return Ok(());
        }
        *closed = true;
        drop(closed);
        // Every publish has had its delivery reports; flush what librdkafka may still hold.
        let producer = self.inner.producer.clone();
        let timeout = self.inner.config.close_timeout;
        match blocking(move || producer.flush(timeout)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(broker_error("", "flush on close", e)),
            Err(e) => Err(Error::transient(BROKER, "", "flush on close", e)),
        }
    }
}
