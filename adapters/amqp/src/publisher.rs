//! The publisher: topics to exchanges, publisher confirms always on.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tidemill_core::{Error, Message, Publisher, Result};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::config::AmqpConfig;
use crate::confirm::{publish_batch, ConfirmChannel, Returned};
use crate::connection::{broker_error, size_limit, Connector};
use crate::convert::{encode, returned_uuid, Encoded};
use crate::topology::{self, short, QueueKind};
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
/// `publish_mandatory` (and `publish` with [`mandatory`](AmqpConfig::mandatory) on) publish
/// with AMQP's `mandatory` flag on a channel of their own, one batch at a time, and fail
/// with `Error::Unroutable` when RabbitMQ returns a message (no queue bound to the
/// exchange, or no binding matches). `retain_for(topic, group)` declares the group's
/// durable queue and binds it, exactly as a subscription of that group would.
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
    /// The channel of mandatory publishes; the lock makes one batch at a time use it, so
    /// every `basic.return` on it belongs to that batch.
    mandatory: ConfirmChannel,
    mandatory_lock: tokio::sync::Mutex<HashSet<String>>,
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
                mandatory: ConfirmChannel::default(),
                mandatory_lock: tokio::sync::Mutex::new(HashSet::new()),
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
        mandatory: bool,
    ) -> Result<()> {
        let inner = &*self.inner;
        let exchange_name = short(topic, exchange)?;
        if !mandatory {
            let (channel, fresh) = inner.channel.get(&inner.connector, topic, deadline).await?;
            if fresh {
                inner.declared.lock().clear();
            }
            if !inner.declared.lock().contains(exchange) {
                topology::exchange(&channel, &inner.config, topic, exchange).await?;
                inner.declared.lock().insert(exchange.to_owned());
            }
            // A batch that failed retires its channel, also one still open: after a nack
            // (RabbitMQ 3.10 nacks every later publish on a channel whose quorum-queue
            // client started while the queue's leader was on a node that died), or with
            // confirms still outstanding. The next batch opens a fresh channel.
            let mut retire = Retire {
                cache: &inner.channel,
                channel: Some(channel.clone()),
            };
            publish_batch(&channel, topic, &exchange_name, false, &mut batch).await?;
            retire.channel = None;
            return Ok(());
        }
        let mut declared = inner.mandatory_lock.lock().await;
        let (channel, fresh) = inner
            .mandatory
            .get(&inner.connector, topic, deadline)
            .await?;
        if fresh {
            declared.clear();
        }
        if !declared.contains(exchange) {
            topology::exchange(&channel, &inner.config, topic, exchange).await?;
            declared.insert(exchange.to_owned());
        }
        // Should this future be dropped midway (the publish timeout), returns of this batch
        // may still come: the channel must not serve another batch. The guard, dropped
        // before the lock, retires it.
        let mut retire = Retire {
            cache: &inner.mandatory,
            channel: Some(channel.clone()),
        };
        let returned = publish_batch(&channel, topic, &exchange_name, true, &mut batch)
            .await
            .inspect_err(|_| {
                if !channel.status().connected() {
                    inner.mandatory.discard(&channel);
                }
            })?;
        retire.channel = None;
        drop(retire);
        drop(declared);
        match returned.into_iter().next() {
            None => Ok(()),
            Some(Returned {
                uuid,
                properties,
                reason,
            }) => {
                let uuid = returned_uuid(&properties, &inner.config.message_uuid)
                    .unwrap_or_else(|| uuid.to_string());
                tracing::debug!(broker = BROKER, topic, exchange, uuid = %uuid, reason = %reason,
                    "the broker returned a mandatory message");
                Err(Error::Unroutable {
                    broker: BROKER,
                    topic: topic.to_owned(),
                    uuid,
                })
            }
        }
    }

    async fn send(&self, topic: &str, messages: Vec<Message>, mandatory: bool) -> Result<()> {
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
            batch.push(encode(
                topic,
                message,
                inner.config.persistent,
                &inner.config.message_uuid,
            )?);
        }
        let count = batch.len();
        let deadline = Instant::now() + inner.config.publish_timeout;
        match tokio::time::timeout_at(
            deadline,
            self.publish_encoded(topic, &exchange, batch, deadline, mandatory),
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
                let cached = if mandatory {
                    &inner.mandatory
                } else {
                    &inner.channel
                };
                if let Some(channel) = cached.snapshot() {
                    cached.discard(&channel);
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
}

/// Retires a channel whose batch failed or was abandoned: forgets it and closes it.
struct Retire<'a> {
    cache: &'a ConfirmChannel,
    channel: Option<lapin::Channel>,
}

impl Drop for Retire<'_> {
    fn drop(&mut self) {
        let Some(channel) = self.channel.take() else {
            return;
        };
        self.cache.discard(&channel);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = channel.close(200, "OK".into()).await {
                    tracing::debug!(broker = BROKER, error = %e, "closing an abandoned channel");
                }
            });
        }
    }
}

#[async_trait]
impl Publisher for AmqpPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.send(topic, messages, self.inner.config.mandatory)
            .await
    }

    /// Publishes with the `mandatory` flag: a message no queue receives is returned by
    /// RabbitMQ and fails the call with `Error::Unroutable` naming the topic and the
    /// message (the exchange is in the debug log).
    async fn publish_mandatory(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.send(topic, messages, true).await
    }

    /// Down after a failed attempt to connect until one succeeds (the publisher reconnects
    /// when it next publishes: a lost connection not used since counts as up).
    fn connection_state(&self) -> tidemill_core::ConnectionState {
        self.inner.connector.state(true)
    }

    /// Declares the topic's exchange and group `group`'s durable queue (with the configured
    /// queue type and arguments) and binds them, exactly as `subscribe(topic, group)` would:
    /// the queue keeps what is published from now on until a subscriber of the group takes
    /// it. With `declare_topology` off it only checks that they exist.
    async fn retain_for(&self, topic: &str, group: &str) -> Result<()> {
        let inner = &*self.inner;
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::PublisherClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        let exchange = inner.config.exchange_for(topic)?;
        let queue = inner.config.group_queue_for(topic, group)?;
        let deadline = Instant::now() + inner.config.publish_timeout;
        let work = async {
            let conn = inner.connector.connection_until(Some(deadline)).await?;
            // A channel of its own: a failed declaration closes it.
            let channel = conn
                .create_channel()
                .await
                .map_err(|e| broker_error(topic, "open a channel", e))?;
            let result = topology::subscription(
                &channel,
                &inner.config,
                topic,
                &exchange,
                &queue,
                QueueKind::Group,
            )
            .await;
            if channel.status().connected() {
                if let Err(e) = channel.close(200, "OK".into()).await {
                    tracing::debug!(broker = BROKER, error = %e, "closing a channel");
                }
            }
            result
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(result) => result,
            Err(_) => Err(Error::transient(
                BROKER,
                topic,
                format!("retain messages for group `{group}` (queue `{queue}`)"),
                format!(
                    "the broker did not answer within the publish timeout of {:?}",
                    inner.config.publish_timeout
                ),
            )),
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
