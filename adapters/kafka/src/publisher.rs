//! [`KafkaPublisher`]: an idempotent librdkafka producer with `acks=all`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tidemill_core::{Error, Message, Publisher, Result};
use tokio::sync::RwLock;

use crate::client::{
    blocking, broker_error, broker_error_hiding, check_topic_name, creation_error, Link,
    LogContext, Topics,
};
use crate::convert::{self, Encoded, Identity};
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
    identity: Arc<Identity>,
    producer: FutureProducer<LogContext>,
    /// The producer's connection, as librdkafka reports it.
    link: Arc<Link>,
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
        let context = LogContext::new(&config);
        let producer: FutureProducer<LogContext> = config
            .producer_client()
            .create_with_context(context.clone())
            .map_err(|e| creation_error(&context.secrets, "producer", e))?;
        let topics = Topics::connect(&config).await?;
        Ok(KafkaPublisher {
            inner: Arc::new(Inner {
                identity: Identity::new(&config),
                config,
                producer,
                link: context.link,
                topics,
                closed: RwLock::new(false),
            }),
        })
    }

    /// The configuration this publisher was created with.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    async fn check_open(&self, topic: &str) -> Result<()> {
        if *self.inner.closed.read().await {
            return Err(Error::PublisherClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        Ok(())
    }

    /// Creates `topic` if it does not exist (with `partitions` and `replication_factor`
    /// from the configuration), or fails naming it when `create_topics` is off. `publish`
    /// does this by itself the first time it sees a topic.
    pub async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.inner.topics.ensure(topic).await
    }

    fn publish_error(&self, topic: &str, uuid: &str, size: usize, error: KafkaError) -> Error {
        let secrets = self.inner.topics.secrets();
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
                Error::permanent(
                    BROKER,
                    topic,
                    format!("publish message {uuid}"),
                    format!(
                        "the broker refused the record ({size} bytes of value, key and headers) \
                         as too large: its `message.max.bytes` or the topic's \
                         `max.message.bytes` is lower than the adapter's `max_message_bytes` \
                         ({}): {error}",
                        self.inner.config.max_message_bytes
                    ),
                )
            }
            Some(RDKafkaErrorCode::MessageTimedOut) => Error::transient(
                BROKER,
                topic,
                format!(
                    "publish message {uuid} (not confirmed by {} within publish_timeout {:?})",
                    self.inner.config.brokers_display(),
                    self.inner.config.publish_timeout
                ),
                error,
            ),
            _ => broker_error_hiding(secrets, topic, format!("publish message {uuid}"), error),
        }
    }

    /// The error for a message over the adapter's own limit, `max_message_bytes`.
    fn too_large(&self, topic: &str, uuid: &str, size: usize) -> Error {
        Error::MessageTooLarge {
            broker: BROKER,
            topic: topic.to_owned(),
            uuid: uuid.to_owned(),
            size,
            limit: self.inner.config.max_message_bytes,
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
        let encoded: Vec<Encoded> = messages
            .into_iter()
            .map(|m| convert::encode(m, &self.inner.identity))
            .collect();
        if let Some(e) = encoded.iter().find(|e| e.size > limit) {
            return Err(self.too_large(topic, &e.uuid, e.size));
        }
        let producer = &self.inner.producer;
        let mut pending = Vec::with_capacity(encoded.len());
        for e in encoded {
            let Encoded {
                uuid,
                headers,
                key,
                payload,
                size,
            } = e;
            let mut record = FutureRecord::to(topic).headers(headers);
            if let Some(p) = &payload {
                record = record.payload(&p[..]);
            }
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
                    Err((
                        KafkaError::MessageProduction(
                            RDKafkaErrorCode::MessageSizeTooLarge
                            | RDKafkaErrorCode::InvalidMessageSize,
                        ),
                        _,
                    )) => {
                        // librdkafka's own check (with the record overhead it adds) of
                        // `message.max.bytes`, which is `max_message_bytes`.
                        return Err(self.too_large(topic, &uuid, size));
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

    /// Creates `topic` if needed (see [`create_topics`](KafkaConfig::create_topics)) and
    /// commits start positions for consumer group `group` where it has none, as
    /// [`KafkaSubscriber::initialize`](crate::KafkaSubscriber) does: the group then
    /// receives everything published from now on although no member subscribed yet (the
    /// topic's retention still applies). Kafka keeps every record anyway; without the
    /// start positions, a group starting with `start_from = latest` would skip what was
    /// published before it first subscribed.
    async fn retain_for(&self, topic: &str, group: &str) -> Result<()> {
        self.check_open(topic).await?;
        check_topic_name(topic)?;
        if group.is_empty() {
            return Err(Error::permanent(
                BROKER,
                topic,
                "retain messages for a group",
                "the consumer group name is empty",
            ));
        }
        self.inner.topics.ensure(topic).await?;
        self.inner
            .topics
            .pin_group(topic, group, "retain messages for a group")
            .await
    }

    /// The same as [`publish`](Publisher::publish): Kafka keeps every record it
    /// acknowledged, whoever consumes the topic, so a confirmed publish is never lost for
    /// lack of a consumer.
    async fn publish_mandatory(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.publish(topic, messages).await
    }

    /// The producer's connection as librdkafka reports it, without a round trip:
    /// disconnected from its `AllBrokersDown` error (every broker connection lost) until
    /// a statistics report (every [`statistics_interval`](KafkaConfig::statistics_interval))
    /// shows a broker connection up again; closed once `close` began. Always connected
    /// when `statistics_interval` is zero.
    fn connection_state(&self) -> tidemill_core::ConnectionState {
        let closing = match self.inner.closed.try_read() {
            Ok(closed) => *closed,
            // Only `close` takes (or waits for) the write lock.
            Err(_) => true,
        };
        if closing {
            return tidemill_core::ConnectionState::Closed;
        }
        if self.inner.config.statistics_interval.is_zero() {
            return tidemill_core::ConnectionState::Connected;
        }
        self.inner.link.state()
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
