//! Transactional outbox: messages written in your database transaction, relayed to any
//! broker by a [`Forwarder`].
//!
//! A service that writes to its database and publishes an event about the write has two
//! ways to get it wrong: publish and then fail to commit (an event for a write that never
//! happened), or commit and then fail to publish (a write nobody hears about). The outbox
//! closes both: [`Outbox::publish_in`] writes the messages into the database **in the same
//! transaction** as the business rows, so they commit or roll back together, and a
//! [`Forwarder`], running on a [`Router`], relays each committed message to the real
//! broker (Kafka, NATS, RabbitMQ, Pub/Sub, Redis, another PostgreSQL topic, anything
//! behind an `Arc<dyn Publisher>`).
//!
//! The outbox is one topic of the adapter's messages table ([`DEFAULT_TOPIC`] unless you
//! choose another, [`Outbox::with_topic`]). Each message keeps its uuid, metadata, key and
//! payload; the topic it is meant for travels in the reserved metadata entry
//! [`DESTINATION_TOPIC`], which the forwarder removes before publishing. This is the design
//! of Watermill's forwarder, with the destination in metadata instead of a JSON envelope,
//! so payloads are stored and relayed as they are.
//!
//! ```no_run
//! use std::sync::Arc;
//! use tidemill_core::{Message, Publisher, Router};
//! use tidemill_sql::outbox::{Forwarder, Outbox};
//! use tidemill_sql::{SqlConfig, SqlPublisher, SqlSubscriber};
//!
//! // `broker`: the publisher of the broker the events are for, e.g. a KafkaPublisher.
//! # async fn demo(broker: Arc<dyn Publisher>) -> Result<(), Box<dyn std::error::Error>> {
//! let config = SqlConfig::new("postgres://app:secret@127.0.0.1:5432/app");
//! let outbox = Outbox::new(SqlPublisher::connect(config.clone()).await?);
//!
//! // The forwarder: a handler that relays the outbox topic to the broker.
//! let router = Router::new();
//! Forwarder::new(SqlSubscriber::connect(config).await?, outbox.topic(), broker.clone())
//!     .register(&router)
//!     .await?;
//! let running = router.clone();
//! let run = tokio::spawn(async move { running.run().await });
//! router.running().await;
//!
//! // Business data and the event about it: one transaction.
//! let mut tx = outbox.pool().begin().await?;
//! sqlx::query("INSERT INTO orders (id, total) VALUES ($1, $2)")
//!     .bind("o-1")
//!     .bind(42_i64)
//!     .execute(&mut *tx)
//!     .await?;
//! outbox
//!     .publish_in(&mut tx, "orders", vec![Message::new(r#"{"id":"o-1"}"#).with_key("o-1")])
//!     .await?;
//! tx.commit().await?; // only now can the forwarder see the message
//!
//! // At shutdown: the router lets in-flight forwards finish (published, then acked).
//! router.close().await?;
//! run.await??;
//! broker.close().await?;
//! # Ok(()) }
//! ```
//!
//! # What is promised
//!
//! - **Nothing for a rollback, nothing lost for a commit.** Messages become visible to the
//!   forwarder when (and only if) the transaction that wrote them commits.
//! - **At least once.** The forwarder acks an outbox message only after the destination
//!   publisher confirmed it (`publish` returned `Ok`: Kafka delivery report, JetStream
//!   PubAck, RabbitMQ confirm, ...). A failed publish is retried after the router's growing
//!   delay; a forwarder that dies leaves its messages to the next one once their
//!   [`lease`](crate::SqlConfig::lease) runs out.
//! - **Order per key.** Messages with the same key reach the destination in the order they
//!   were committed (within one transaction, in the order of the `publish_in` calls); a
//!   failed one is retried before the next one with its key is forwarded. Different keys
//!   are forwarded in parallel (up to [`Forwarder::with_concurrency`]); messages without a
//!   key have no order among themselves unless the concurrency is 1. This needs
//!   [`order_per_key`](crate::SqlConfig::order_per_key) on (the default) in the
//!   forwarder's subscriber configuration.
//! - **Duplicates are possible**: a forwarder that crashes (or loses its database
//!   connection) after the destination confirmed a message but before the ack reached
//!   the database forwards that message again, with the same uuid. Pair the outbox with
//!   an idempotent consumer downstream: the [inbox](crate::inbox) or a deduplicator layer
//!   keyed by uuid.
//! - **Scheduled messages**: [`Outbox::publish_in_at`] with
//!   [`DeliverAt::At`]/[`DeliverAt::After`] keeps a message in the outbox until it is due
//!   (by the database server's clock); it reaches the destination within about the
//!   forwarder subscriber's [`poll_interval`](crate::SqlConfig::poll_interval) after that,
//!   on any broker, also those without native delayed delivery.
//! - **Messages written before any forwarder ran** are relayed: the forwarder's consumer
//!   group ([`DEFAULT_GROUP`]) starts at the beginning of the outbox topic.
//! - **Trace context** travels in metadata like everything else: inject it before
//!   `publish_in` (`tidemill_otel::inject_current(&mut msg)`) and the destination's
//!   consumers continue the writer's trace (the forwarder's router span joins it too).
//!
//! # Costs
//!
//! - Per message: one extra row written in your transaction (plus a `NOTIFY` at commit),
//!   and on the forwarder's side one fetch (shared by up to
//!   [`prefetch`](crate::SqlConfig::prefetch) messages), one publish to the destination
//!   and one ack statement (acks that finish together share one).
//! - Latency from commit to destination: the `NOTIFY` wake-up (milliseconds) plus the
//!   destination's publish; the forwarder's poll interval if a notification is lost.
//! - **Storage**: a forwarded row stays in the messages table (only its pending row goes)
//!   unless the forwarder's subscriber has a [`retention`](crate::SqlConfig::retention):
//!   set one (e.g. an hour) so relayed messages are deleted once every group acked them.
//! - **Order is commit order**: messages reach the destination in the order their
//!   transactions committed; a transaction left open holds back only its own messages.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use sqlx::postgres::PgPool;
use sqlx::PgConnection;
use tidemill_core::router::HandlerBuilder;
use tidemill_core::{
    permanent, BoxError, ConnectionState, Error, Message, Publisher, Result, Router, RouterError,
};
use tower::layer::util::Identity;
use tower::{Layer, Service};

use crate::config::StartFrom;
use crate::publisher::DeliverAt;
use crate::schema::{self, Tables};
use crate::{SqlPublisher, SqlSubscriber, BROKER};

/// The reserved metadata entry naming an outbox message's destination topic. The
/// [`Outbox`] sets it (replacing any value the message had) and the [`Forwarder`] removes
/// it before publishing.
pub const DESTINATION_TOPIC: &str = "tidemill-outbox-topic";

/// The outbox topic of [`Outbox::new`]: `tidemill_outbox`.
pub const DEFAULT_TOPIC: &str = "tidemill_outbox";

/// The consumer group of [`Forwarder::new`]: `tidemill-forwarder`. Forwarders of one
/// outbox topic with the same group share its messages (run several for availability).
pub const DEFAULT_GROUP: &str = "tidemill-forwarder";

/// Messages one forwarder publishes at the same time by default (different keys).
pub const DEFAULT_CONCURRENCY: usize = 16;

/// Writes messages for any broker into the outbox topic, in your transaction.
///
/// Cheap to clone (clones share the publisher's pool). The [`Publisher`] implementation
/// writes in a transaction of its own (when there is no business write to pair with, but
/// the database should hold the message until the broker takes it); `close` closes the
/// underlying [`SqlPublisher`], for every clone.
#[derive(Clone)]
pub struct Outbox {
    publisher: SqlPublisher,
    topic: Arc<str>,
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("topic", &self.topic)
            .field("publisher", &self.publisher)
            .finish()
    }
}

impl Outbox {
    /// An outbox writing through `publisher` into [`DEFAULT_TOPIC`].
    pub fn new(publisher: SqlPublisher) -> Self {
        Outbox {
            publisher,
            topic: Arc::from(DEFAULT_TOPIC),
        }
    }

    /// Writes into `topic` instead (e.g. one outbox per service sharing a database); the
    /// forwarder must read the same topic.
    pub fn with_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Arc::from(topic.into());
        self
    }

    /// The outbox topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The publisher writing the outbox rows.
    pub fn publisher(&self) -> &SqlPublisher {
        &self.publisher
    }

    /// The publisher's connection pool, to begin the transactions you pass to
    /// [`publish_in`](Self::publish_in).
    pub fn pool(&self) -> &PgPool {
        self.publisher.pool()
    }

    /// Writes `messages` for topic `destination` into the outbox, in the caller's
    /// transaction (or connection): the forwarder sees them once it commits, never if it
    /// rolls back. Uuid, metadata, key and payload are kept as they are.
    ///
    /// Fails (writing nothing) when `destination` is empty or is the outbox topic itself,
    /// or for what [`SqlPublisher::publish_in`] refuses (a message over
    /// [`max_message_bytes`](crate::SqlConfig::max_message_bytes), NUL characters); an
    /// error of the statement leaves the transaction aborted, as any failed statement
    /// does in PostgreSQL.
    pub async fn publish_in(
        &self,
        conn: &mut PgConnection,
        destination: &str,
        messages: Vec<Message>,
    ) -> Result<()> {
        self.publish_in_at(conn, destination, messages, DeliverAt::Now)
            .await
    }

    /// [`publish_in`](Self::publish_in), with the messages forwarded only once `when` has
    /// come (by the database server's clock): scheduled messages for any broker.
    pub async fn publish_in_at(
        &self,
        conn: &mut PgConnection,
        destination: &str,
        messages: Vec<Message>,
        when: DeliverAt,
    ) -> Result<()> {
        let messages = self.wrap(destination, messages)?;
        self.publisher
            .publish_in_at(conn, &self.topic, messages, when)
            .await
            .map_err(|e| for_destination(e, destination))
    }

    /// Writes `messages` for `destination` into the outbox in a transaction of its own
    /// (retrying a lost connection like [`SqlPublisher::publish_at`]), forwarded once
    /// `when` has come.
    pub async fn publish_at(
        &self,
        destination: &str,
        messages: Vec<Message>,
        when: DeliverAt,
    ) -> Result<()> {
        let messages = self.wrap(destination, messages)?;
        self.publisher
            .publish_at(&self.topic, messages, when)
            .await
            .map_err(|e| for_destination(e, destination))
    }

    /// The messages with their destination in [`DESTINATION_TOPIC`].
    fn wrap(&self, destination: &str, messages: Vec<Message>) -> Result<Vec<Message>> {
        let refuse = |why: String| {
            Err(Error::permanent(
                BROKER,
                self.topic.to_string(),
                "write to the outbox",
                why,
            ))
        };
        if destination.is_empty() {
            return refuse("the destination topic is empty".to_owned());
        }
        if destination == &*self.topic {
            return refuse(format!(
                "the destination topic `{destination}` is the outbox topic itself: the \
                 forwarder would relay its messages to itself forever"
            ));
        }
        Ok(messages
            .into_iter()
            .map(|mut m| {
                m.set_context(None);
                m.metadata_mut().set(DESTINATION_TOPIC, destination);
                m
            })
            .collect())
    }
}

/// `e` with the destination topic named in its context.
fn for_destination(e: Error, destination: &str) -> Error {
    match e {
        Error::Broker {
            broker,
            topic,
            context,
            transient,
            source,
        } => Error::Broker {
            broker,
            topic,
            context: format!("{context}, in the outbox for topic `{destination}`"),
            transient,
            source,
        },
        other => other,
    }
}

#[async_trait]
impl Publisher for Outbox {
    /// Writes `messages` for `topic` into the outbox in a transaction of its own.
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.publish_at(topic, messages, DeliverAt::Now).await
    }

    async fn close(&self) -> Result<()> {
        self.publisher.close().await
    }

    fn connection_state(&self) -> ConnectionState {
        self.publisher.connection_state()
    }
}

/// Relays the outbox topic to a destination publisher: a router handler.
///
/// Each outbox message is published to the topic in its [`DESTINATION_TOPIC`] entry
/// (removed first; uuid, other metadata, key and payload as written) and acked only once
/// the destination confirmed it. See the [module docs](self) for what is promised.
///
/// - **Router**: [`register`](Self::register) adds it as handler [`name`](Self::name)
///   (consumer group [`DEFAULT_GROUP`], [`DEFAULT_CONCURRENCY`] messages in flight, keys in
///   order). It runs, stops and shuts down with the router: at `close` the router stops
///   taking outbox messages and lets the forwards in flight finish (each acked after its
///   publish was confirmed). The router closes the [`SqlSubscriber`] at shutdown, not the
///   destination publisher (close that yourself after the router closed).
/// - **Failures**: a failed publish fails the handler (the destination's error, wrapped
///   in [`ForwardError::Publish`]): the router retries it after its growing delay, and a
///   permanent one (e.g. a message over the destination's size limit) goes to a poison
///   queue if you add one ([`register_with`](Self::register_with)). A message without a
///   destination entry (written to the outbox topic directly) fails permanently with
///   [`ForwardError::MissingDestination`]: poisoned with that reason when there is a
///   poison layer, otherwise redelivered with the router's growing delay.
///
/// ```no_run
/// # async fn demo(
/// #     subscriber: tidemill_sql::SqlSubscriber,
/// #     broker: std::sync::Arc<dyn tidemill_core::Publisher>,
/// #     router: tidemill_core::Router,
/// # ) -> Result<(), Box<dyn std::error::Error>> {
/// use tidemill_sql::outbox::{Forwarder, DEFAULT_TOPIC};
///
/// // With a poison queue for what cannot be forwarded (tidemill-middleware):
/// // .register_with(&router, |h| h.layer(PoisonQueue::new(sql_publisher, "outbox.poison")))
/// Forwarder::new(subscriber, DEFAULT_TOPIC, broker)
///     .with_concurrency(64)
///     .register(&router)
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Forwarder {
    subscriber: SqlSubscriber,
    topic: String,
    destination: Arc<dyn Publisher>,
    group: String,
    name: String,
    concurrency: usize,
    mandatory: bool,
}

impl fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forwarder")
            .field("name", &self.name)
            .field("outbox_topic", &self.topic)
            .field("group", &self.group)
            .field("concurrency", &self.concurrency)
            .field("mandatory", &self.mandatory)
            .field("subscriber", &self.subscriber)
            .finish()
    }
}

impl Forwarder {
    /// A forwarder of `outbox_topic` (read through `subscriber`) to `destination`, as
    /// handler `tidemill-forwarder:<outbox_topic>` in group [`DEFAULT_GROUP`].
    pub fn new(
        subscriber: SqlSubscriber,
        outbox_topic: impl Into<String>,
        destination: Arc<dyn Publisher>,
    ) -> Self {
        let topic = outbox_topic.into();
        Forwarder {
            subscriber,
            name: format!("tidemill-forwarder:{topic}"),
            topic,
            destination,
            group: DEFAULT_GROUP.to_owned(),
            concurrency: DEFAULT_CONCURRENCY,
            mandatory: false,
        }
    }

    /// Consumes the outbox in consumer group `group` instead. A group that does not exist
    /// yet starts at the beginning of the outbox topic: it forwards every message the
    /// table still holds for it.
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// The handler's name in the router (unique within it).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Up to `n` messages forwarded at the same time (default [`DEFAULT_CONCURRENCY`]);
    /// messages with the same key one after another. 1 forwards in commit order.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Publishes with [`Publisher::publish_mandatory`]: a message that nothing at the
    /// destination receives (RabbitMQ: no queue bound; in-memory, Pub/Sub: no
    /// subscription) fails with [`Error::Unroutable`] and stays in the outbox, retried
    /// with the router's growing delay, instead of being acked into the void. Default off:
    /// the forwarder publishes as your code would have published without the outbox (log
    /// brokers keep every message either way).
    pub fn with_mandatory(mut self, mandatory: bool) -> Self {
        self.mandatory = mandatory;
        self
    }

    /// The handler's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The outbox topic.
    pub fn outbox_topic(&self) -> &str {
        &self.topic
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Messages forwarded at the same time at most.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// The forwarding service alone, for a handler you build yourself (subscribe to the
    /// outbox topic in the forwarder's group after [`prepare`](Self::prepare)).
    pub fn service(&self) -> ForwardService {
        ForwardService {
            destination: Arc::clone(&self.destination),
            outbox_topic: Arc::from(self.topic.as_str()),
            mandatory: self.mandatory,
        }
    }

    /// Creates the forwarder's consumer group on the outbox topic, starting at its
    /// beginning, unless it exists ([`register`](Self::register) does this first). Uses one
    /// short-lived connection with the subscriber's configuration.
    pub async fn prepare(&self) -> Result<()> {
        let mut config = self.subscriber.config().clone();
        if !config.order_per_key {
            tracing::warn!(
                outbox_topic = %self.topic,
                "the forwarder's subscriber has order_per_key off: a message that fails may \
                 be overtaken by a later one with its key"
            );
        }
        config.max_connections = 1;
        // The subscriber created (or checked) the schema when it connected; running its DDL
        // again would wait behind every open transaction that wrote to the messages table.
        config.create_schema = false;
        let pool = schema::connect(&config, "forwarder").await?;
        let tables = Tables::new(&config.table_prefix);
        let result = crate::subscriber::ensure_group(
            &pool,
            &tables,
            &self.topic,
            &self.group,
            StartFrom::Beginning,
            None,
        )
        .await
        .map_err(|e| {
            schema::error(
                e,
                &config,
                &self.topic,
                "create the forwarder's consumer group",
            )
        });
        pool.close().await;
        result
    }

    /// Adds the forwarder to `router` (see [`register_with`](Self::register_with)).
    pub async fn register(&self, router: &Router) -> Result<(), RouterError> {
        self.register_with(router, |handler| handler).await
    }

    /// Adds the forwarder to `router` after creating its consumer group
    /// ([`prepare`](Self::prepare)), with `configure` adding handler-level layers (a
    /// poison queue, a circuit breaker for the destination, ...) to the handler the
    /// forwarder set up (subscription, group, concurrency). If the router runs, the
    /// forwarder starts before this returns.
    ///
    /// ```no_run
    /// # async fn demo(
    /// #     subscriber: tidemill_sql::SqlSubscriber,
    /// #     broker: std::sync::Arc<dyn tidemill_core::Publisher>,
    /// #     router: tidemill_core::Router,
    /// # ) -> Result<(), Box<dyn std::error::Error>> {
    /// use tidemill_sql::outbox::{Forwarder, DEFAULT_TOPIC};
    ///
    /// Forwarder::new(subscriber, DEFAULT_TOPIC, broker)
    ///     .register_with(&router, |handler| handler.concurrency(1)) // commit order
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn register_with<'r, L>(
        &self,
        router: &'r Router,
        configure: impl FnOnce(HandlerBuilder<'r, Identity>) -> HandlerBuilder<'r, L>,
    ) -> Result<(), RouterError>
    where
        L: Layer<ForwardService>,
        L::Service: Service<Message, Response = Vec<Message>> + Send + 'static,
        <L::Service as Service<Message>>::Error: Into<BoxError>,
        <L::Service as Service<Message>>::Future: Send + 'static,
    {
        self.prepare()
            .await
            .map_err(|source| RouterError::Subscribe {
                handler: self.name.clone(),
                topic: self.topic.clone(),
                source: Box::new(source),
            })?;
        let handler = router
            .add_handler(self.name.clone())
            .subscribe(self.subscriber.clone(), self.topic.clone())
            .group(self.group.clone())
            .concurrency(self.concurrency);
        configure(handler).service(self.service()).await
    }
}

/// The forwarder's tower service: publishes an outbox message to its destination and
/// returns nothing to publish (the router acks the input once this succeeded).
#[derive(Clone)]
pub struct ForwardService {
    destination: Arc<dyn Publisher>,
    outbox_topic: Arc<str>,
    mandatory: bool,
}

impl fmt::Debug for ForwardService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForwardService")
            .field("outbox_topic", &self.outbox_topic)
            .field("mandatory", &self.mandatory)
            .finish_non_exhaustive()
    }
}

impl Service<Message> for ForwardService {
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Vec<Message>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let destination = Arc::clone(&self.destination);
        let outbox_topic = Arc::clone(&self.outbox_topic);
        let mandatory = self.mandatory;
        Box::pin(async move {
            forward(&*destination, &outbox_topic, msg, mandatory).await?;
            Ok(Vec::new())
        })
    }
}

/// Publishes `msg` to its destination without the reserved entry.
async fn forward(
    destination: &dyn Publisher,
    outbox_topic: &str,
    msg: Message,
    mandatory: bool,
) -> Result<(), BoxError> {
    let topic = match msg.metadata().get(DESTINATION_TOPIC) {
        Some(topic) if !topic.is_empty() => topic.to_owned(),
        _ => {
            return Err(permanent(ForwardError::MissingDestination {
                uuid: msg.uuid().to_owned(),
                outbox_topic: outbox_topic.to_owned(),
            }))
        }
    };
    let uuid = msg.uuid().to_owned();
    let mut out = msg.detached();
    out.metadata_mut().remove(DESTINATION_TOPIC);
    // The row's record describes the outbox, not this message's destination.
    out.set_native(None);
    let published = if mandatory {
        destination.publish_mandatory(&topic, vec![out]).await
    } else {
        destination.publish(&topic, vec![out]).await
    };
    published.map_err(|source| {
        Box::new(ForwardError::Publish {
            uuid: uuid.clone(),
            outbox_topic: outbox_topic.to_owned(),
            destination: topic.clone(),
            source,
        }) as BoxError
    })?;
    tracing::trace!(%uuid, outbox_topic, destination = %topic, "forwarded");
    Ok(())
}

/// Why the forwarder could not forward a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// The message has no (or an empty) [`DESTINATION_TOPIC`] entry: it was written to the
    /// outbox topic directly, not through [`Outbox`]. Permanent (marked with
    /// [`tidemill_core::permanent`]).
    #[error(
        "{BROKER} outbox `{outbox_topic}`: message {uuid} has no `{DESTINATION_TOPIC}` \
         metadata entry naming its destination topic (written to the outbox topic \
         directly instead of through tidemill_sql::outbox::Outbox?): it cannot be \
         forwarded"
    )]
    MissingDestination {
        /// The message's uuid.
        uuid: String,
        /// The outbox topic it was read from.
        outbox_topic: String,
    },
    /// The destination publisher failed; permanent if its error is
    /// ([`Error::is_transient`]).
    #[error(
        "{BROKER} outbox `{outbox_topic}`: forwarding message {uuid} to topic \
         `{destination}` failed: {source}"
    )]
    Publish {
        /// The message's uuid.
        uuid: String,
        /// The outbox topic it was read from.
        outbox_topic: String,
        /// The topic it was for.
        destination: String,
        /// The destination publisher's error (names its broker).
        #[source]
        source: Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemill_core::{is_permanent, MemoryBroker, Subscriber};

    #[tokio::test]
    async fn forward_strips_the_destination_and_keeps_the_rest() {
        let broker = MemoryBroker::new();
        let mut stream = broker
            .subscriber()
            .subscribe("orders", Default::default())
            .await
            .unwrap();
        let msg = Message::with_uuid("u-1", "payload")
            .with_metadata("a", "b")
            .with_metadata(DESTINATION_TOPIC, "orders")
            .with_key("k");
        forward(&broker.publisher(), "outbox", msg, false)
            .await
            .unwrap();
        let got = futures::StreamExt::next(&mut stream)
            .await
            .unwrap()
            .unwrap();
        let m = got.message();
        assert_eq!(m.uuid(), "u-1");
        assert_eq!(m.payload().as_ref(), b"payload");
        assert_eq!(m.key_str(), Some("k"));
        assert_eq!(m.metadata().get("a"), Some("b"));
        assert_eq!(m.metadata().get(DESTINATION_TOPIC), None);
    }

    #[tokio::test]
    async fn missing_destination_is_permanent_and_says_why() {
        let broker = MemoryBroker::new();
        let err = forward(
            &broker.publisher(),
            "outbox",
            Message::with_uuid("u-2", "x"),
            false,
        )
        .await
        .unwrap_err();
        assert!(is_permanent(err.as_ref()));
        let text = err.to_string();
        assert!(
            text.contains(DESTINATION_TOPIC) && text.contains("u-2"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn destination_errors_keep_their_kind() {
        // Mandatory, and nothing subscribes to the topic: the in-memory broker says
        // unroutable (transient).
        let broker = MemoryBroker::new();
        let msg = Message::new("x").with_metadata(DESTINATION_TOPIC, "nowhere");
        let err = forward(&broker.publisher(), "outbox", msg, true)
            .await
            .unwrap_err();
        assert!(!is_permanent(err.as_ref()), "{err}");
        assert!(err.to_string().contains("nowhere"), "{err}");
        // A closed destination publisher is a permanent failure.
        let publisher = broker.publisher();
        publisher.close().await.unwrap();
        let msg = Message::new("x").with_metadata(DESTINATION_TOPIC, "nowhere");
        let err = forward(&publisher, "outbox", msg, false).await.unwrap_err();
        assert!(is_permanent(err.as_ref()), "{err}");
    }
}
