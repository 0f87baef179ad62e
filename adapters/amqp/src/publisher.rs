//! The publisher: topics to exchanges, publisher confirms always on.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tidemill_core::{Error, Message, Publisher, Result};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::config::AmqpConfig;
use crate::confirm::{publish_batch, ConfirmChannel};
use crate::connection::{size_limit, Connector};
use crate::convert::{encode, Encoded};
use crate::topology::{self, short};
use crate::BROKER;

/// Publishes messages to RabbitMQ (or another AMQP 0-9-1 broker).
///
/// A topic is published to the exchange named after it (declared durable on first use
/// unless `declare_topology` is off). `publish` returns only after the broker confirmed
/// every message of the batch (publisher confirms); the batch is sent pipelined and the
/// confirms awaited together. Messages are persistent unless configured otherwise.
///
/// The publisher owns one connection and re-establishes it when it is lost: a publish
/// while the broker is unreachable waits (up to `publish_timeout`) for the connection to
/// come back. A publish whose messages were sent but not confirmed when the connection
/// broke fails; it never reports success for an unconfirmed message.
///
/// Cloning is cheap and clones share the connection.
///
/// ```no_run
/// use tidemill_amqp::{AmqpConfig, AmqpPublisher};
/// use tidemill_core::{Message, Publisher};
///
/// # async fn run() -> tidemill_core::Result<()> {
/// let publisher = AmqpPublisher::connect(AmqpConfig::new("amqp://guest:guest@localhost:5672/%2f")).await?;
/// publisher.publish("orders", vec![Message::new("tea"), Message::new("cake")]).await?;
/// publisher.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AmqpPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    config: AmqpConfig,
    connector: Connector,
    channel: ConfirmChannel,
    /// Exchanges declared (or checked) on the current channel.
    declared: parking_lot::Mutex<HashSet<String>>,
    closed: AtomicBool,
    in_flight: TaskTracker,
}

impl AmqpPublisher {
    /// Validates `config` and connects (one attempt, bounded by `connect_timeout`): an
    /// unreachable broker fails here with an error naming its address.
    pub async fn connect(config: AmqpConfig) -> Result<Self> {
        config.validate()?;
        let connector = Connector::new(&config)?;
        connector.connection().await?;
        Ok(AmqpPublisher {
            inner: Arc::new(Inner {
                config,
                connector,
                channel: ConfirmChannel::default(),
                declared: parking_lot::Mutex::new(HashSet::new()),
                closed: AtomicBool::new(false),
                in_flight: TaskTracker::new(),
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &AmqpConfig {
        &self.inner.config
    }

    async fn publish_encoded(
        &self,
        topic: &str,
        exchange: &str,
        mut batch: Vec<Encoded>,
        deadline: Instant,
    ) -> Result<()> {
        let inner = &*self.inner;
        let (channel, fresh) = inner.channel.get(&inner.connector, topic, deadline).await?;
        if fresh {
            inner.declared.lock().clear();
        }
        if !inner.declared.lock().contains(exchange) {
            topology::exchange(&channel, &inner.config, topic, exchange).await?;
            inner.declared.lock().insert(exchange.to_owned());
        }
        let exchange_name = short(topic, exchange)?;
        publish_batch(
            &channel,
            topic,
            &exchange_name,
            inner.config.mandatory,
            &mut batch,
        )
        .await
        .inspect_err(|_| {
            if !channel.status().connected() {
                inner.channel.discard(&channel);
            }
        })
    }
}

#[async_trait]
impl Publisher for AmqpPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        let inner = &*self.inner;
        // Registered before checking `closed`, so `close` waits for every publish that got
        // past the check.
        let _in_flight = inner.in_flight.token();
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::PublisherClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        if messages.is_empty() {
            return Ok(());
        }
        let exchange = inner.config.exchange_for(topic)?;
        let mut batch = Vec::with_capacity(messages.len());
        // The largest message, to name when the broker refuses one as too large.
        let mut largest: (usize, String) = (0, String::new());
        for message in messages {
            if message.payload().len() > largest.0 {
                largest = (message.payload().len(), message.uuid().to_owned());
            }
            if message.payload().len() > inner.config.max_message_size {
                return Err(Error::MessageTooLarge {
                    broker: BROKER,
                    topic: topic.to_owned(),
                    uuid: message.uuid().to_owned(),
                    size: message.payload().len(),
                    limit: inner.config.max_message_size,
                });
            }
            batch.push(encode(topic, message, inner.config.persistent)?);
        }
        let count = batch.len();
        let deadline = Instant::now() + inner.config.publish_timeout;
        match tokio::time::timeout_at(
            deadline,
            self.publish_encoded(topic, &exchange, batch, deadline),
        )
        .await
        {
            Ok(Err(Error::Broker { source, .. }))
                if source
                    .downcast_ref::<lapin::Error>()
                    .and_then(size_limit)
                    .is_some() =>
            {
                let limit = source
                    .downcast_ref::<lapin::Error>()
                    .and_then(size_limit)
                    .unwrap_or(inner.config.max_message_size);
                Err(Error::MessageTooLarge {
                    broker: BROKER,
                    topic: topic.to_owned(),
                    uuid: largest.1,
                    size: largest.0,
                    limit,
                })
            }
            Ok(result) => result,
            Err(_) => {
                // Whatever is still unconfirmed on this channel stays unknown: start afresh.
                if let Some(channel) = inner.channel.snapshot() {
                    inner.channel.discard(&channel);
                }
                Err(Error::transient(
                    BROKER,
                    topic,
                    format!("publish to exchange `{exchange}`"),
                    format!(
                        "{count} message(s) not confirmed within the publish timeout of {:?} (broker at {})",
                        inner.config.publish_timeout,
                        inner.connector.address()
                    ),
                ))
            }
        }
    }

    async fn close(&self) -> Result<()> {
        let inner = &*self.inner;
        inner.closed.store(true, Ordering::SeqCst);
        inner.in_flight.close();
        inner.in_flight.wait().await;
        inner.connector.close().await;
        Ok(())
    }
}

impl std::fmt::Debug for AmqpPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpPublisher")
            .field("address", &self.inner.connector.address())
            .field("closed", &self.inner.closed.load(Ordering::SeqCst))
            .finish()
    }
}
