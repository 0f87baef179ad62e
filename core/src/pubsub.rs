//! The publisher and subscriber traits every broker adapter implements.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures::stream::{BoxStream, Stream};
use tokio_util::sync::CancellationToken;

use crate::stop::StopWatch;
use crate::{Delivery, Error, Message, Result};

/// Publishes messages to topics.
///
/// `publish` returns `Ok` only once the broker has durably accepted every message (Kafka
/// delivery report with `acks=all`, RabbitMQ publisher confirm, JetStream PubAck, Pub/Sub
/// publish response; for the in-memory broker: enqueued for every subscription). On error,
/// some messages of the batch may have been accepted: retrying the whole batch is safe under
/// at-least-once delivery (consumers may see duplicates, never gaps).
///
/// Object safe: pick a broker at run time and pass `Arc<dyn Publisher>` around.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes `messages` to `topic`, in order.
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<()>;

    /// Publishes one message.
    async fn publish_one(&self, topic: &str, message: Message) -> Result<()> {
        self.publish(topic, vec![message]).await
    }

    /// Makes `topic` keep what is published to it from now on for consumer group `group`
    /// until that group consumes it, even if no member of the group ever subscribed yet:
    /// a durable queue bound to the topic (RabbitMQ), a subscription (Pub/Sub), a group
    /// queue (in-memory); log brokers (Kafka, NATS JetStream) keep messages anyway and
    /// only check that the topic can be written. Idempotent; failure destinations (dead
    /// letter, poison) call it before their first publish.
    ///
    /// The default fails: a publisher that cannot promise it must say so rather than let
    /// messages vanish.
    async fn retain_for(&self, topic: &str, group: &str) -> Result<()> {
        let _ = group;
        Err(Error::Unsupported {
            broker: "publisher",
            topic: topic.to_owned(),
            what: "keeping messages for a consumer group before it subscribes",
        })
    }

    /// Publishes like [`publish`](Publisher::publish), but fails with
    /// [`Error::Unroutable`] when the broker tells that nothing received a message (no
    /// queue bound: RabbitMQ's `mandatory` flag; no subscription: in-memory, Pub/Sub).
    /// Failure destinations publish this way, so a message is never acked into the void.
    /// The default is `publish` (right for log brokers, which keep every message).
    async fn publish_mandatory(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.publish(topic, messages).await
    }

    /// Flushes whatever is still in flight and releases the connection. Publishing afterwards
    /// fails with [`Error::PublisherClosed`](crate::Error::PublisherClosed). Idempotent.
    async fn close(&self) -> Result<()>;

    /// The state of the connection to the broker as the client knows it now (no round
    /// trip), for health checks ([`Router::health`](crate::Router::health)). The default,
    /// for clients that cannot tell, is [`ConnectionState::Connected`].
    fn connection_state(&self) -> ConnectionState {
        ConnectionState::Connected
    }
}

/// Subscribes to topics.
///
/// Object safe: pick a broker at run time and pass `Arc<dyn Subscriber>` around.
#[async_trait]
pub trait Subscriber: Send + Sync {
    /// Starts consuming `topic`. With no consumer group the subscription sees every message
    /// published while it exists; with a group, the group's subscribers compete and the group
    /// as a whole sees every message once (at least once).
    ///
    /// The stream ends when the subscriber is closed or the options' cancellation token
    /// fires; dropping the stream unsubscribes. Deliveries already handed out stay valid.
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<DeliveryStream>;

    /// Creates what a subscription needs (queue, consumer group, subscription) without
    /// consuming, so that messages published afterwards are kept for it. Brokers where a
    /// subscription only exists while consuming (Pub/Sub, AMQP queues) need this before the
    /// first publish; for others it does nothing.
    async fn initialize(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        let _ = (topic, options);
        Ok(())
    }

    /// Ends every stream of this subscriber and releases its connection. Idempotent.
    async fn close(&self) -> Result<()>;

    /// The state of the connection to the broker as the client knows it now (no round
    /// trip), for health checks ([`Router::health`](crate::Router::health)). The default,
    /// for clients that cannot tell, is [`ConnectionState::Connected`].
    fn connection_state(&self) -> ConnectionState {
        ConnectionState::Connected
    }
}

/// A client's connection to its broker, as [`Publisher::connection_state`] and
/// [`Subscriber::connection_state`] report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ConnectionState {
    /// Connected (or nothing to connect to, like the in-memory broker).
    Connected,
    /// Not connected now; the client is (re)connecting.
    Disconnected,
    /// Closed by the application.
    Closed,
}

impl ConnectionState {
    /// Whether messages can flow: [`Connected`](ConnectionState::Connected).
    pub fn is_up(self) -> bool {
        self == ConnectionState::Connected
    }
}

impl fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectionState::Connected => "connected",
            ConnectionState::Disconnected => "disconnected",
            ConnectionState::Closed => "closed",
        })
    }
}

/// A client's [`ConnectionState`] as its calls found it, shared between its tasks without a
/// lock, for [`Publisher::connection_state`] and [`Subscriber::connection_state`]. Once
/// [`Closed`](ConnectionState::Closed) it stays closed.
///
/// ```
/// use tidemill_core::{ConnectionState, ConnectionStateCell};
/// let cell = ConnectionStateCell::default();
/// assert_eq!(cell.get(), ConnectionState::Connected);
/// cell.set(ConnectionState::Disconnected);
/// cell.set(ConnectionState::Closed);
/// cell.set(ConnectionState::Connected);
/// assert_eq!(cell.get(), ConnectionState::Closed);
/// ```
#[derive(Debug, Default)]
pub struct ConnectionStateCell(AtomicU8);

impl ConnectionStateCell {
    /// The state now.
    pub fn get(&self) -> ConnectionState {
        match self.0.load(Ordering::Relaxed) {
            0 => ConnectionState::Connected,
            1 => ConnectionState::Disconnected,
            _ => ConnectionState::Closed,
        }
    }

    /// Records `state`, unless the cell says closed already.
    pub fn set(&self, state: ConnectionState) {
        let v = match state {
            ConnectionState::Connected => 0,
            ConnectionState::Disconnected => 1,
            ConnectionState::Closed => 2,
        };
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                (old != 2).then_some(v)
            });
    }
}

#[async_trait]
impl<P: Publisher + ?Sized> Publisher for Arc<P> {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        (**self).publish(topic, messages).await
    }
    async fn publish_one(&self, topic: &str, message: Message) -> Result<()> {
        (**self).publish_one(topic, message).await
    }
    async fn retain_for(&self, topic: &str, group: &str) -> Result<()> {
        (**self).retain_for(topic, group).await
    }
    async fn publish_mandatory(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        (**self).publish_mandatory(topic, messages).await
    }
    async fn close(&self) -> Result<()> {
        (**self).close().await
    }
    fn connection_state(&self) -> ConnectionState {
        (**self).connection_state()
    }
}

#[async_trait]
impl<S: Subscriber + ?Sized> Subscriber for Arc<S> {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<DeliveryStream> {
        (**self).subscribe(topic, options).await
    }
    async fn initialize(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        (**self).initialize(topic, options).await
    }
    async fn close(&self) -> Result<()> {
        (**self).close().await
    }
    fn connection_state(&self) -> ConnectionState {
        (**self).connection_state()
    }
}

/// Options for [`Subscriber::subscribe`].
///
/// ```
/// use tidemill_core::SubscribeOptions;
/// let opts = SubscribeOptions::group("billing");
/// assert_eq!(opts.consumer_group(), Some("billing"));
/// assert_eq!(SubscribeOptions::new().consumer_group(), None);
/// ```
#[derive(Clone, Default)]
pub struct SubscribeOptions {
    group: Option<String>,
    cancel: Option<CancellationToken>,
}

impl SubscribeOptions {
    /// No consumer group: the subscription sees every message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Subscribe as a member of consumer group `name`.
    pub fn group(name: impl Into<String>) -> Self {
        Self::new().with_group(Some(name.into()))
    }

    /// Sets or clears the consumer group.
    pub fn with_group(mut self, group: Option<String>) -> Self {
        self.group = group;
        self
    }

    /// Ends the subscription's stream when `token` is cancelled.
    pub fn with_cancellation(mut self, token: CancellationToken) -> Self {
        self.cancel = Some(token);
        self
    }

    /// The consumer group, if any.
    pub fn consumer_group(&self) -> Option<&str> {
        self.group.as_deref()
    }

    /// The cancellation token, if any.
    pub fn cancellation(&self) -> Option<&CancellationToken> {
        self.cancel.as_ref()
    }
}

impl fmt::Debug for SubscribeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscribeOptions")
            .field("group", &self.group)
            .field("cancellable", &self.cancel.is_some())
            .finish()
    }
}

/// The stream of deliveries returned by [`Subscriber::subscribe`].
///
/// Items are `Err` for failures the subscriber reports without ending the stream (it keeps
/// reconnecting); the stream ends when the subscription is closed or cancelled.
pub struct DeliveryStream {
    inner: Option<BoxStream<'static, Result<Delivery>>>,
    /// Checked before every item: a cheap check (see [`StopWatch`]).
    stops: Vec<StopWatch>,
}

impl DeliveryStream {
    /// Wraps an adapter's stream.
    pub fn new(stream: impl Stream<Item = Result<Delivery>> + Send + 'static) -> Self {
        DeliveryStream {
            inner: Some(Box::pin(stream)),
            stops: Vec::new(),
        }
    }

    /// Ends the stream (dropping the adapter's stream) once `token` is cancelled.
    pub fn until_cancelled(mut self, token: CancellationToken) -> Self {
        self.stops.push(StopWatch::new(token));
        self
    }

    /// Applies the cancellation token from `options`, if any.
    pub fn with_options(self, options: &SubscribeOptions) -> Self {
        match options.cancellation() {
            Some(token) => self.until_cancelled(token.clone()),
            None => self,
        }
    }
}

impl Stream for DeliveryStream {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.inner.is_none() {
            return Poll::Ready(None);
        }
        if this.stops.iter_mut().any(|s| s.poll_stopped(cx).is_ready()) {
            this.inner = None;
            this.stops.clear();
            return Poll::Ready(None);
        }
        let polled = match this.inner.as_mut() {
            Some(inner) => inner.as_mut().poll_next(cx),
            None => Poll::Ready(None),
        };
        if let Poll::Ready(None) = polled {
            this.inner = None;
        }
        polled
    }
}

impl fmt::Debug for DeliveryStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliveryStream")
            .field("ended", &self.inner.is_none())
            .finish()
    }
}
