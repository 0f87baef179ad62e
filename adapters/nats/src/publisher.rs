//! [`NatsPublisher`]: Tidemill's `Publisher` on NATS.

use std::sync::Arc;

use async_trait::async_trait;
use tidemill_core::{Error, Message, Publisher, Result};
use tokio::sync::RwLock;

use crate::config::{NatsConfig, NatsMode};
use crate::connection;
use crate::core_nats::CorePublisher;
use crate::js::publisher::JsPublisher;
use crate::BROKER;

/// Publishes to NATS: to JetStream (awaiting each message's PubAck) or, in core mode, to
/// plain subjects (awaiting the server's processing). Cheap to clone; clones share one
/// connection.
///
/// ```no_run
/// use tidemill_core::{Message, Publisher};
/// use tidemill_nats::{NatsConfig, NatsPublisher};
///
/// # async fn run() -> tidemill_core::Result<()> {
/// let publisher = NatsPublisher::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
/// // Returns once the stream stored both messages (creating the stream `orders` if needed).
/// publisher
///     .publish("orders", vec![Message::new("tea").with_key("cust-1"), Message::new("cake")])
///     .await?;
/// publisher.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    config: Arc<NatsConfig>,
    mode: Mode,
    /// `true` once closed. Every publish holds a read lock while it runs, so `close` (which
    /// takes the write lock) waits for the publishes in progress and no publish starts after.
    closed: RwLock<bool>,
}

enum Mode {
    JetStream(Box<JsPublisher>),
    Core(Box<CorePublisher>),
}

impl NatsPublisher {
    /// Connects to the server(s) in `config` (its own connection), failing with
    /// `Error::Connect` naming the address within `connect_timeout`, or `Error::Config` when
    /// the configuration is invalid.
    pub async fn connect(config: NatsConfig) -> Result<Self> {
        let conn = connection::connect(&config).await?;
        let config = Arc::new(config);
        let mode = match config.mode {
            NatsMode::JetStream => Mode::JetStream(Box::new(JsPublisher::new(
                conn.client.clone(),
                conn.reconnects.clone(),
                config.clone(),
            ))),
            NatsMode::Core => Mode::Core(Box::new(CorePublisher::new(
                conn.client.clone(),
                config.clone(),
            ))),
        };
        Ok(NatsPublisher {
            inner: Arc::new(Inner {
                client: conn.client,
                config,
                mode,
                closed: RwLock::new(false),
            }),
        })
    }

    /// The underlying `async-nats` client, for what Tidemill does not cover (its connection
    /// state, statistics, or NATS features of its own).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The configuration this publisher was created with.
    pub fn config(&self) -> &NatsConfig {
        &self.inner.config
    }
}

#[async_trait]
impl Publisher for NatsPublisher {
    /// async-nats' view of the connection (it reconnects by itself).
    fn connection_state(&self) -> tidemill_core::ConnectionState {
        match self.inner.closed.try_read() {
            Ok(closed) if !*closed => {}
            _ => return tidemill_core::ConnectionState::Closed,
        }
        match self.inner.client.connection_state() {
            async_nats::connection::State::Connected => tidemill_core::ConnectionState::Connected,
            _ => tidemill_core::ConnectionState::Disconnected,
        }
    }

    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        let closed = self.inner.closed.read().await;
        if *closed {
            return Err(Error::PublisherClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        let result = match &self.inner.mode {
            Mode::JetStream(p) => p.publish(topic, &messages).await,
            Mode::Core(p) => p.publish(topic, &messages).await,
        };
        drop(closed);
        result
    }

    /// JetStream: makes sure the topic's stream exists (created as a publish would create
    /// it) and creates the durable consumer of `group`, the one a later subscriber of the
    /// group uses, so it receives every message published from now on. Core NATS keeps
    /// nothing: `Error::Unsupported`.
    async fn retain_for(&self, topic: &str, group: &str) -> Result<()> {
        let closed = self.inner.closed.read().await;
        if *closed {
            return Err(Error::PublisherClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        match &self.inner.mode {
            Mode::JetStream(p) => p.retain_for(topic, group).await,
            Mode::Core(_) => Err(Error::Unsupported {
                broker: BROKER,
                topic: topic.to_owned(),
                what: "keeping messages for a consumer group in core NATS mode (core NATS \
                       stores nothing and delivers at most once; use JetStream mode)",
            }),
        }
    }

    /// JetStream: a PubAck means the stream stored the message; fails with
    /// `Error::Unroutable` when no stream captures the topic (and `create_streams` is
    /// off) or its stream has `interest` retention and no consumer. Core NATS cannot tell
    /// whether anyone received a message: `Error::Unsupported`.
    async fn publish_mandatory(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        let closed = self.inner.closed.read().await;
        if *closed {
            return Err(Error::PublisherClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        match &self.inner.mode {
            Mode::JetStream(p) => p.publish_mandatory(topic, &messages).await,
            Mode::Core(_) => Err(Error::Unsupported {
                broker: BROKER,
                topic: topic.to_owned(),
                what: "a mandatory publish in core NATS mode (nothing tells whether any \
                       subscriber received it; use JetStream mode)",
            }),
        }
    }

    async fn close(&self) -> Result<()> {
        let mut closed = self.inner.closed.write().await;
        if *closed {
            return Ok(());
        }
        *closed = true;
        match &self.inner.mode {
            Mode::JetStream(p) => p.close().await,
            Mode::Core(p) => p.close().await,
        }
        // Every publish has returned (confirmed or failed); nothing is left in flight.
        if let Err(e) = self.inner.client.drain().await {
            tracing::debug!(broker = BROKER, error = %e, "closing the connection");
        }
        Ok(())
    }
}
