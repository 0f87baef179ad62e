//! [`NatsSubscriber`]: Tidemill's `Subscriber` on NATS.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tidemill_core::{
    CancellationToken, DeliveryStream, Error, Result, SubscribeOptions, Subscriber,
};

use crate::config::{NatsConfig, NatsMode};
use crate::connection;
use crate::core_nats::CoreSubscriber;
use crate::js::subscriber::JsSubscriber;
use crate::wire::Wire;
use crate::BROKER;

/// How long `close` waits for finished subscriptions to hand back what they read ahead.
const CLOSE_DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Subscribes to NATS: JetStream pull consumers (a durable consumer per consumer group) or,
/// in core mode, plain and queue subscriptions. Each subscriber has two connections shared
/// by its subscriptions: async-nats for JetStream management, and one of the adapter's own
/// that receives the deliveries with their header bytes as sent (see the crate docs,
/// "Messages from other clients"); cheap to clone.
///
/// ```no_run
/// use futures::StreamExt;
/// use tidemill_core::{SubscribeOptions, Subscriber};
/// use tidemill_nats::{NatsConfig, NatsSubscriber};
///
/// # async fn run() -> tidemill_core::Result<()> {
/// let subscriber = NatsSubscriber::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
/// let mut deliveries = subscriber.subscribe("orders", SubscribeOptions::group("billing")).await?;
/// while let Some(delivery) = deliveries.next().await {
///     let delivery = delivery?;
///     println!("{} (attempt {:?})", delivery.message(), delivery.attempt());
///     delivery.ack().await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsSubscriber {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    /// Receives the deliveries (see the `wire` module).
    wire: Wire,
    config: Arc<NatsConfig>,
    mode: Mode,
    closed: AtomicBool,
    /// Ends every stream of this subscriber.
    stop: CancellationToken,
}

enum Mode {
    JetStream(JsSubscriber),
    Core(CoreSubscriber),
}

impl NatsSubscriber {
    /// Connects to the server(s) in `config` (its own connection), failing with
    /// `Error::Connect` naming the address within `connect_timeout`, or `Error::Config` when
    /// the configuration is invalid.
    pub async fn connect(config: NatsConfig) -> Result<Self> {
        let conn = connection::connect(&config).await?;
        let config = Arc::new(config);
        let wire = connection::connect_wire(&config).await?;
        let mode = match config.mode {
            NatsMode::JetStream => Mode::JetStream(JsSubscriber::new(
                conn.client.clone(),
                wire.clone(),
                config.clone(),
            )),
            NatsMode::Core => Mode::Core(CoreSubscriber::new(wire.clone(), config.clone())),
        };
        Ok(NatsSubscriber {
            inner: Arc::new(Inner {
                client: conn.client,
                wire,
                config,
                mode,
                closed: AtomicBool::new(false),
                stop: CancellationToken::new(),
            }),
        })
    }

    /// The underlying `async-nats` client, for what Tidemill does not cover (its connection
    /// state, statistics, or NATS features of its own). Tidemill uses it for JetStream
    /// management (streams, consumers); deliveries arrive on a second connection of the
    /// subscriber's own, which keeps header bytes exactly as received (async-nats cannot
    /// receive every header a NATS client can send).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// How many times the delivery connection connected (1 after `connect`; each
    /// reconnect adds one, once its subscriptions are re-established).
    pub fn delivery_connects(&self) -> u64 {
        *self.inner.wire.connects().borrow()
    }

    /// Returns once the server processed everything the delivery connection sent before
    /// (its subscriptions included).
    pub async fn flush(&self) -> Result<()> {
        self.inner
            .wire
            .flush()
            .await
            .map_err(|e| Error::transient(BROKER, "", "flush the delivery connection", e))
    }

    /// The configuration this subscriber was created with.
    pub fn config(&self) -> &NatsConfig {
        &self.inner.config
    }

    /// The name of the durable JetStream consumer a consumer group of `topic` uses (creating
    /// the topic's stream if needed): `group` itself (made a valid consumer name) when the
    /// topic has a stream of its own, `{group}_{topic}` when it shares a stream.
    ///
    /// Fails in core NATS mode, which has no consumers.
    pub async fn consumer_name(&self, topic: &str, group: &str) -> Result<String> {
        match &self.inner.mode {
            Mode::JetStream(s) => s.consumer_name(topic, group).await,
            Mode::Core(_) => Err(Error::config(
                BROKER,
                "core NATS mode has no JetStream consumers (`mode` is `core`)",
            )),
        }
    }

    fn check_open(&self, topic: &str) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::SubscriberClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Subscriber for NatsSubscriber {
    /// Up while both connections are: the delivery connection and async-nats' (JetStream
    /// API requests); both reconnect by themselves.
    fn connection_state(&self) -> tidemill_core::ConnectionState {
        if self.inner.closed.load(std::sync::atomic::Ordering::Acquire) {
            return tidemill_core::ConnectionState::Closed;
        }
        let client = self.inner.client.connection_state();
        if self.inner.wire.is_up() && client == async_nats::connection::State::Connected {
            tidemill_core::ConnectionState::Connected
        } else {
            tidemill_core::ConnectionState::Disconnected
        }
    }

    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<DeliveryStream> {
        self.check_open(topic)?;
        let group = options.consumer_group();
        let stream = match &self.inner.mode {
            Mode::JetStream(s) => DeliveryStream::new(s.subscribe(topic, group).await?),
            Mode::Core(s) => DeliveryStream::new(s.subscribe(topic, group).await?),
        };
        Ok(stream
            .until_cancelled(self.inner.stop.clone())
            .with_options(&options))
    }

    async fn initialize(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.check_open(topic)?;
        match &self.inner.mode {
            Mode::JetStream(s) => s.initialize(topic, options.consumer_group()).await,
            // Nothing to create: core NATS keeps nothing for absent subscribers.
            Mode::Core(_) => Ok(()),
        }
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.stop.cancel();
        match &self.inner.mode {
            Mode::JetStream(s) => {
                // What the subscriptions received and did not hand out goes back first,
                // whether or not their streams are polled again.
                s.shared().release_all();
                s.wait_for_drains(CLOSE_DRAIN_LIMIT).await;
                // Deliveries the application still holds keep the connection until they
                // are settled (or their in-progress time runs out).
                let shared = s.shared().clone();
                let client = self.inner.client.clone();
                let wire = self.inner.wire.clone();
                let limit = self.inner.config.jetstream.max_in_progress;
                tokio::spawn(async move {
                    let started = tokio::time::Instant::now();
                    while shared.busy() && started.elapsed() < limit {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let _ = wire.flush().await;
                    wire.close();
                    if let Err(e) = client.drain().await {
                        tracing::debug!(broker = BROKER, error = %e, "closing the connection");
                    }
                });
            }
            Mode::Core(_) => {
                self.inner.wire.close();
                if let Err(e) = self.inner.client.drain().await {
                    tracing::debug!(broker = BROKER, error = %e, "closing the connection");
                }
            }
        }
        Ok(())
    }
}
