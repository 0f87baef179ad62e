//! Poison queue: unprocessable messages go to a topic of their own.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use tidemill_core::router::metric_names;
use tidemill_core::{is_permanent, BoxError, Message, Publisher};
use tokio::sync::OnceCell;
use tower::{Layer, Service};

use crate::headers;
use crate::util::{
    error_chain, handler_and_topic, timestamp, truncate, HandlerOutput, LayerFuture, OnError,
    OnFailure,
};

type Predicate = Arc<dyn Fn(&BoxError) -> bool + Send + Sync>;

/// The longest poison reason written into metadata (brokers limit header sizes).
const MAX_REASON: usize = 1_000;

/// Publishes a message whose handling failed with a permanent error (or any error, or
/// per a predicate) to a poison topic, then acks it, so it stops blocking or looping.
///
/// The poisoned message keeps its uuid, payload, key and metadata, plus
/// [`POISON_REASON`](headers::POISON_REASON) (the error with its sources),
/// [`POISON_HANDLER`](headers::POISON_HANDLER), [`POISON_TOPIC`](headers::POISON_TOPIC),
/// [`POISON_GROUP`](headers::POISON_GROUP) (when there is one) and
/// [`POISON_TIME`](headers::POISON_TIME). The input is acked only after the poison topic
/// confirmed the publish; if that publish fails, the handler fails with
/// [`PoisonPublishFailed`] and the input is nacked: never lost.
///
/// Each message's future keeps an `Arc` of the layer's configuration and a clone of the
/// input (its whole cost when the handler succeeds), so it poisons the same way whoever
/// polls it. A message consumed from the poison topic itself is never poisoned there
/// again: its error is passed on. The topic keeps what it receives for a consumer group
/// ([`retain_for`](PoisonQueue::retain_for)).
///
/// Errors it does not take pass through unchanged. Place it outside
/// [`Retry`](crate::Retry) and [`Recoverer`](crate::Recoverer) so that it sees their
/// final verdict.
///
/// ```
/// use tidemill_core::{permanent, HandlerResult, MemoryBroker, Message, Router};
/// use tidemill_middleware::PoisonQueue;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = MemoryBroker::new();
/// let router = Router::new();
/// let poison = PoisonQueue::new(broker.publisher(), "orders.poison");
/// router
///     .add_handler("orders")
///     .subscribe(broker.subscriber(), "orders")
///     .layer(poison.clone())
///     .handler(|msg: Message| async move {
///         let _order: u32 = std::str::from_utf8(msg.payload())?
///             .parse()
///             .map_err(permanent)?; // malformed: poisoned, not retried
///         HandlerResult::Ok(())
///     })
///     .await?;
/// // ... later: poison.poisoned() messages went to "orders.poison".
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PoisonQueue {
    publisher: Arc<dyn Publisher>,
    topic: Arc<str>,
    /// The consumer group the poison topic keeps messages for (see `retain_for`).
    retain: Option<Arc<str>>,
    retained: Arc<OnceCell<()>>,
    predicate: Predicate,
    poisoned: Arc<AtomicU64>,
}

/// Publishing to the poison topic failed; the input is nacked.
#[derive(Debug, thiserror::Error)]
#[error("cannot publish message {uuid} to poison topic `{topic}` ({publish_error}); handler error: {handler_error}")]
pub struct PoisonPublishFailed {
    /// The input's uuid.
    pub uuid: String,
    /// The poison topic.
    pub topic: String,
    /// Why the publish failed.
    #[source]
    pub publish_error: tidemill_core::Error,
    /// The handler error that made the message poison.
    pub handler_error: BoxError,
}

impl PoisonQueue {
    /// Poisons messages whose handler failed with a permanent error
    /// ([`tidemill_core::is_permanent`]), publishing them to `topic` through `publisher`.
    pub fn new(publisher: impl Publisher + 'static, topic: impl AsRef<str>) -> Self {
        let topic: Arc<str> = Arc::from(topic.as_ref());
        PoisonQueue {
            publisher: Arc::new(publisher),
            retain: Some(topic.clone()),
            retained: Arc::default(),
            topic,
            predicate: Arc::new(|e: &BoxError| is_permanent(e.as_ref())),
            poisoned: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The consumer group the poison topic keeps messages for until it consumes them
    /// (default: the topic's name). Before its first publish the layer makes sure of it
    /// ([`Publisher::retain_for`]), so poisoned messages published while nobody consumes
    /// the topic are kept. Consume the topic with this group to read them.
    pub fn retain_for(mut self, group: impl AsRef<str>) -> Self {
        self.retain = Some(Arc::from(group.as_ref()));
        self.retained = Arc::default();
        self
    }

    /// Publishes without making sure a consumer group keeps the messages: only for topics
    /// that are known to keep them another way. Publishes still fail when the broker
    /// reports that nothing received them.
    pub fn without_retention(mut self) -> Self {
        self.retain = None;
        self.retained = Arc::default();
        self
    }

    /// Makes sure the poison topic keeps what is published to it (once per layer).
    async fn ensure_retained(&self) -> Result<(), tidemill_core::Error> {
        let Some(group) = &self.retain else {
            return Ok(());
        };
        self.retained
            .get_or_try_init(|| self.publisher.retain_for(&self.topic, group))
            .await
            .map(|_| ())
    }

    /// Poisons every failed message.
    pub fn all_errors(self) -> Self {
        self.when(|_| true)
    }

    /// Poisons messages whose error satisfies `predicate`.
    pub fn when(mut self, predicate: impl Fn(&BoxError) -> bool + Send + Sync + 'static) -> Self {
        self.predicate = Arc::new(predicate);
        self
    }

    /// How many messages this layer (and its clones) poisoned so far.
    pub fn poisoned(&self) -> u64 {
        self.poisoned.load(Ordering::Relaxed)
    }

    /// The poison topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

impl fmt::Debug for PoisonQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoisonQueue")
            .field("topic", &self.topic)
            .field("retain_for", &self.retain)
            .field("poisoned", &self.poisoned())
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for PoisonQueue {
    type Service = PoisonQueueService<S>;

    fn layer(&self, inner: S) -> PoisonQueueService<S> {
        PoisonQueueService {
            inner,
            config: Arc::new(self.clone()),
        }
    }
}

/// The service made by [`PoisonQueue`].
#[derive(Clone, Debug)]
pub struct PoisonQueueService<S> {
    inner: S,
    config: Arc<PoisonQueue>,
}

impl<S> Service<Message> for PoisonQueueService<S>
where
    S: Service<Message, Response = Vec<Message>>,
    S::Error: Into<BoxError>,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = LayerFuture<S::Future, PoisonFailure>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let failure = PoisonFailure {
            config: self.config.clone(),
            input: msg.clone(),
        };
        LayerFuture::from(OnError::new(self.inner.call(msg), failure))
    }
}

/// The error path of [`PoisonQueue`].
pub struct PoisonFailure {
    config: Arc<PoisonQueue>,
    input: Message,
}

impl OnFailure for PoisonFailure {
    fn fail(self, error: BoxError) -> futures::future::BoxFuture<'static, HandlerOutput> {
        let PoisonFailure { config, input } = self;
        Box::pin(async move {
            if !(config.predicate)(&error) {
                return Err(error);
            }
            let (handler, topic, group) = handler_and_topic(&input);
            if topic == *config.topic {
                // Consumed from the poison topic itself: poisoning it there again would
                // feed the topic its own failures forever.
                tracing::warn!(
                    uuid = input.uuid(),
                    handler = %handler,
                    poison_topic = %config.topic,
                    "a message consumed from the poison topic failed; not poisoning it onto \
                     the same topic (it is redelivered with the router's backoff)"
                );
                return Err(error);
            }
            let reason = truncate(error_chain(error.as_ref()), MAX_REASON);
            let mut poisoned = input.clone();
            let md = poisoned.metadata_mut();
            md.set(headers::POISON_REASON, &reason);
            md.set(headers::POISON_HANDLER, &handler);
            md.set(headers::POISON_TOPIC, &topic);
            if let Some(group) = &group {
                md.set(headers::POISON_GROUP, group);
            }
            md.set(headers::POISON_TIME, timestamp(SystemTime::now()));
            let published = match config.ensure_retained().await {
                Ok(()) => {
                    config
                        .publisher
                        .publish_mandatory(&config.topic, vec![poisoned])
                        .await
                }
                Err(e) => Err(e),
            };
            match published {
                Ok(()) => {
                    config.poisoned.fetch_add(1, Ordering::Relaxed);
                    crate::util::count(metric_names::POISONED, &input);
                    tracing::warn!(
                        uuid = input.uuid(),
                        poison_topic = %config.topic,
                        %reason,
                        "message poisoned; acking it"
                    );
                    Ok(Vec::new())
                }
                Err(publish_error) => {
                    tracing::error!(
                        uuid = input.uuid(),
                        poison_topic = %config.topic,
                        error = %publish_error,
                        "cannot publish to the poison topic; nacking"
                    );
                    Err(Box::new(PoisonPublishFailed {
                        uuid: input.uuid().to_owned(),
                        topic: config.topic.to_string(),
                        publish_error,
                        handler_error: error,
                    }) as BoxError)
                }
            }
        })
    }
}
