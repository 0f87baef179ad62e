//! Dead letter after N deliveries, on every backend.

use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use moka::sync::Cache;
use parking_lot::Mutex;
use tidemill_core::router::{metric_names, redeliver_after, redelivery_delay};
use tidemill_core::{AttemptOrigin, BoxError, Message, Publisher};
use tokio::sync::OnceCell;
use tower::{Layer, Service};

use crate::headers;
use crate::util::{
    epoch_millis, error_chain, from_epoch_millis, handler_and_topic, timestamp, truncate,
    HandlerOutput, LayerFuture, OnError, OnFailure,
};

/// The longest error text kept per failed delivery.
const MAX_ERROR: usize = 300;
/// The longest reason written into the dead-letter message.
const MAX_REASON: usize = 1_000;
/// How many messages' failure histories are remembered in-process (broker counting).
const HISTORY_CAPACITY: u64 = 10_000;
/// How long the newest durably counted copy of a message is remembered: long enough for a
/// broker to redeliver an earlier copy whose ack was lost, short enough that a message an
/// operator sends again later is handled as new.
const COPY_TTL: Duration = Duration::from_secs(300);
/// How long an in-process failure history is remembered.
const HISTORY_TTL: Duration = Duration::from_secs(3_600);

/// How [`DeadLetter`] counts the deliveries of a message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Counting {
    /// The broker's delivery attempt where the broker keeps one
    /// ([`MessageContext::attempt`](tidemill_core::MessageContext::attempt) with
    /// [`AttemptOrigin::Broker`]), otherwise [`Republish`](Counting::Republish) (also where
    /// the subscriber counts attempts only in process, which a restart resets). The
    /// default.
    #[default]
    Auto,
    /// Always the delivery attempt, whoever counts it (an in-process count resets when the
    /// consumer restarts); a delivery without one counts as the first.
    Broker,
    /// Durable counting by the layer itself, for brokers without a delivery count (Kafka,
    /// the Pub/Sub emulator, RabbitMQ classic queues): a failed message is republished with
    /// its failure count in its metadata, and the original is acked only once the broker
    /// confirmed the copy. The count lives in the broker, so it survives consumer restarts.
    Republish,
}

/// Moves a message to a dead-letter topic once it failed on `max_deliveries` deliveries,
/// with its history in the metadata; earlier failures are redelivered as usual.
///
/// **Counting** (see [`Counting`]): by default the broker's delivery attempt, where the
/// broker has one (in-memory, NATS JetStream, RabbitMQ quorum queues, Pub/Sub with a
/// dead-letter policy). Elsewhere the layer counts durably: it republishes the failed
/// message with [`FAILURES`](headers::FAILURES) (and whose count it is) to the topic it
/// came from (or [`retry_topic`](DeadLetter::retry_topic)), and acks the original only
/// after the copy is confirmed; if that publish fails, the original is nacked. Nothing is
/// lost, and the count survives restarts. A delay asked for by
/// [`DelayedRedelivery`](crate::DelayedRedelivery) (or any
/// [`redeliver_after`](tidemill_core::router::redeliver_after) error) travels with the copy
/// in [`NOT_BEFORE`](headers::NOT_BEFORE): the copy is nacked with the remaining delay
/// until it is due.
///
/// Trade-offs of durable counting: the copy goes behind the messages published after the
/// original (per-key order is lost for the failing message), and every subscription of the
/// source topic receives the copy. Dead-letter layers of other consumer groups (or, without
/// groups, other handlers) recognise a copy that is not theirs and ack it without handling
/// it; other consumers of the topic see it as a new message. Give each consumer group its
/// own `retry_topic` (and subscribe the same group to it) when that matters. When the
/// broker redelivers an earlier copy after a newer one was published (its ack was lost),
/// the layer acks that stale delivery unhandled if this process published the newer copy
/// in the last five minutes; across processes such a copy starts a second count (and can
/// lead to a second dead-letter record). The counting headers are trusted as they come: a
/// producer that writes them itself shortens the count.
///
/// **The dead-letter message** keeps the uuid, payload, key and metadata of the input and
/// gets [`DEAD_LETTER_REASON`](headers::DEAD_LETTER_REASON) (the last error),
/// `DEAD_LETTER_HANDLER`, `_TOPIC`, `_GROUP`, `_TIME`, `_DELIVERIES`, `_COUNTING` and, per
/// failed delivery `n` as far as known, `tidemill-dead-letter-error-n` = `TIME ERROR`. The
/// input is acked once the dead-letter topic confirmed the publish, and nacked if it fails.
///
/// Each message's future keeps an `Arc` of the layer's configuration and a clone of the
/// input (its whole cost when the handler succeeds), so it dead-letters the same way
/// whoever polls it, also after its service is gone. A message consumed from the
/// dead-letter topic itself is never dead-lettered there again: its error is passed on.
///
/// Place it outside [`PoisonQueue`](crate::PoisonQueue), [`DelayedRedelivery`] and
/// [`Retry`](crate::Retry): it counts what reaches the broker. With broker counting, every
/// delivery counts, including ones nacked by a circuit breaker outside it.
///
/// [`DelayedRedelivery`]: crate::DelayedRedelivery
///
/// ```
/// use tidemill_core::{HandlerResult, MemoryBroker, Message, Router};
/// use tidemill_middleware::{Counting, DeadLetter};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = MemoryBroker::new();
/// let router = Router::new();
/// router.layer(
///     DeadLetter::new(broker.publisher(), "dead-letters")
///         .max_deliveries(5)
///         .counting(Counting::Auto),
/// );
/// router
///     .add_handler("payments")
///     .subscribe(broker.subscriber(), "payments")
///     .group("payments")
///     .handler(|_msg: Message| async move { HandlerResult::Ok(()) })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DeadLetter {
    inner: Arc<Config>,
}

#[derive(Clone)]
struct Config {
    publisher: Arc<dyn Publisher>,
    topic: Arc<str>,
    /// The consumer group the dead-letter topic keeps messages for (see `retain_for`).
    retain: Option<Arc<str>>,
    retained: Arc<OnceCell<()>>,
    max_deliveries: u32,
    counting: Counting,
    retry_topic: Option<Arc<str>>,
    /// The consumer groups `retry_topic` was made to keep messages for (see `retain_for`).
    retry_retained: Arc<Mutex<HashSet<Arc<str>>>>,
    history: Cache<String, Arc<Vec<(u32, String)>>>,
    /// Durable counting: the latest count this process republished (or dead-lettered) per
    /// handler and uuid, so a stale delivery of an earlier copy (its ack was lost, or the
    /// broker redelivered it meanwhile) is acked instead of starting a second count.
    copies: Cache<u64, u32>,
    /// Whether `copies` ever held anything (no lookup per message until then).
    copied_any: Arc<AtomicBool>,
    stats: Arc<Stats>,
}

#[derive(Default)]
struct Stats {
    dead_lettered: AtomicU64,
    republished: AtomicU64,
    skipped: AtomicU64,
}

/// Publishing to the dead-letter (or retry) topic failed; the input is nacked.
#[derive(Debug, thiserror::Error)]
#[error("cannot publish message {uuid} to {purpose} topic `{topic}` ({publish_error}); handler error: {handler_error}")]
pub struct DeadLetterPublishFailed {
    /// The input's uuid.
    pub uuid: String,
    /// `dead-letter` or `retry`.
    pub purpose: &'static str,
    /// The topic the publish went to.
    pub topic: String,
    /// Why the publish failed.
    #[source]
    pub publish_error: tidemill_core::Error,
    /// The handler error.
    pub handler_error: BoxError,
}

/// A durably counted copy is not due yet (a delay travels with it); it is nacked for the
/// remaining time.
#[derive(Debug, thiserror::Error)]
#[error("message {uuid} is not due for another {remaining:?} (delayed redelivery)")]
pub struct NotYetDue {
    /// The message's uuid.
    pub uuid: String,
    /// Time left.
    pub remaining: Duration,
}

impl DeadLetter {
    /// Dead-letters to `topic` through `publisher` after 5 failed deliveries, counting
    /// with [`Counting::Auto`].
    pub fn new(publisher: impl Publisher + 'static, topic: impl AsRef<str>) -> Self {
        let topic: Arc<str> = Arc::from(topic.as_ref());
        DeadLetter {
            inner: Arc::new(Config {
                publisher: Arc::new(publisher),
                retain: Some(topic.clone()),
                retained: Arc::default(),
                topic,
                max_deliveries: 5,
                counting: Counting::Auto,
                retry_topic: None,
                retry_retained: Arc::default(),
                history: Cache::builder()
                    .max_capacity(HISTORY_CAPACITY)
                    .time_to_live(HISTORY_TTL)
                    .build(),
                copies: Cache::builder()
                    .max_capacity(HISTORY_CAPACITY)
                    .time_to_live(COPY_TTL)
                    .build(),
                copied_any: Arc::default(),
                stats: Arc::default(),
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.inner));
        self
    }

    /// Dead-letters on the `n`-th failed delivery (at least 1).
    pub fn max_deliveries(self, n: u32) -> Self {
        self.with(|c| c.max_deliveries = n.max(1))
    }

    /// The consumer group the dead-letter topic keeps messages for until it consumes them
    /// (default: the topic's name). Before its first publish the layer makes sure of it
    /// ([`Publisher::retain_for`]: a durable queue on RabbitMQ, a subscription on Pub/Sub,
    /// a group queue in memory; Kafka and JetStream keep messages anyway), so dead letters
    /// published while nobody consumes the topic are kept. Consume the topic with this
    /// group to read them.
    pub fn retain_for(self, group: impl AsRef<str>) -> Self {
        let group: Arc<str> = Arc::from(group.as_ref());
        self.with(|c| {
            c.retain = Some(group);
            c.retained = Arc::default();
        })
    }

    /// Publishes without making sure a consumer group keeps the messages: only for topics
    /// that are known to keep them another way (a queue declared by hand, a log broker).
    /// Publishes still fail when the broker reports that nothing received them.
    pub fn without_retention(self) -> Self {
        self.with(|c| {
            c.retain = None;
            c.retained = Arc::default();
        })
    }

    /// How deliveries are counted.
    pub fn counting(self, counting: Counting) -> Self {
        self.with(|c| c.counting = counting)
    }

    /// With durable counting, republish failed messages to `topic` instead of the topic
    /// they came from. The same consumer group must consume `topic` too (e.g. a second
    /// handler with the same service and group). Unless [`without_retention`] was called,
    /// the layer first makes `topic` keep messages for the failed handler's group
    /// (`retain_for`, once per group), so a copy published before that handler subscribed
    /// waits for it; a copy that nothing receives fails the publish, and the original is
    /// nacked. Kafka cannot do that for a group that is consuming other topics (its offsets
    /// cannot be set from outside while it has members; the layer logs a warning): there,
    /// subscribe the retry handler before failures can happen, or have the group start a
    /// topic it never consumed from the earliest offset.
    ///
    /// [`without_retention`]: DeadLetter::without_retention
    pub fn retry_topic(self, topic: impl AsRef<str>) -> Self {
        let topic: Arc<str> = Arc::from(topic.as_ref());
        self.with(|c| {
            c.retry_topic = Some(topic);
            c.retry_retained = Arc::default();
        })
    }

    /// How many messages went to the dead-letter topic.
    pub fn dead_lettered(&self) -> u64 {
        self.inner.stats.dead_lettered.load(Ordering::Relaxed)
    }

    /// How many failed messages were republished for durable counting.
    pub fn republished(&self) -> u64 {
        self.inner.stats.republished.load(Ordering::Relaxed)
    }

    /// How many durably counted copies belonging to another handler were acked unhandled.
    pub fn skipped(&self) -> u64 {
        self.inner.stats.skipped.load(Ordering::Relaxed)
    }

    /// The dead-letter topic.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }
}

impl fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("topic", &self.inner.topic)
            .field("retain_for", &self.inner.retain)
            .field("max_deliveries", &self.inner.max_deliveries)
            .field("counting", &self.inner.counting)
            .field("retry_topic", &self.inner.retry_topic)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for DeadLetter {
    type Service = DeadLetterService<S>;

    fn layer(&self, inner: S) -> DeadLetterService<S> {
        DeadLetterService {
            inner,
            config: self.inner.clone(),
        }
    }
}

/// The service made by [`DeadLetter`].
#[derive(Clone)]
pub struct DeadLetterService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: fmt::Debug> fmt::Debug for DeadLetterService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterService")
            .field("inner", &self.inner)
            .field("topic", &self.config.topic)
            .finish_non_exhaustive()
    }
}

/// What the layer knows about one delivery, for its error path.
struct Delivery {
    handler: String,
    topic: String,
    group: Option<String>,
    /// Failed deliveries recorded durably before this one.
    prior: u32,
    /// Counted by the broker (true) or by republishing (false).
    by_broker: bool,
    /// This delivery's number.
    number: u32,
}

/// The error path of [`DeadLetter`]: what the layer keeps per message on the success path
/// (the delivery count is worked out from the input when it is needed).
pub struct DeadLetterFailure {
    config: Arc<Config>,
    input: Message,
}

impl OnFailure for DeadLetterFailure {
    fn fail(self, error: BoxError) -> futures::future::BoxFuture<'static, HandlerOutput> {
        let DeadLetterFailure { config, input } = self;
        let (handler, topic, group) = handler_and_topic(&input);
        if topic == *config.topic {
            // Consumed from the dead-letter topic itself (a watcher under the same stack):
            // dead-lettering it there again would feed the topic its own failures forever.
            tracing::warn!(
                uuid = input.uuid(),
                handler = %handler,
                dead_letter_topic = %config.topic,
                "a message consumed from the dead-letter topic failed; not dead-lettering it \
                 onto the same topic (it is redelivered with the router's backoff)"
            );
            return Box::pin(std::future::ready(Err(error)));
        }
        // Not another consumer's copy (the call acked those unhandled): ours, or uncounted.
        let prior = match owned(&input) {
            Some(true) => recorded_failures(&input),
            _ => 0,
        };
        let (by_broker, number) = config.delivery_number(&input, prior);
        let delivery = Delivery {
            handler,
            topic,
            group,
            prior,
            by_broker,
            number,
        };
        Box::pin(DeadLetter { inner: config }.failed(input, delivery, error))
    }
}

/// Whether the durable-count headers of `msg` belong to this handler on this topic:
/// `Some(true)` ours, `Some(false)` another consumer's copy, `None` no such headers (or a
/// message forwarded from another topic: its counts do not apply here).
#[inline(never)]
fn owner(msg: &Message, handler: &str, topic: &str, group: Option<&str>) -> Option<bool> {
    let md = msg.metadata();
    let copy_topic = md.get(headers::FAILURES_TOPIC)?;
    if copy_topic != topic {
        return None;
    }
    let copy_group = md.get(headers::FAILURES_GROUP);
    let ours = match group {
        Some(g) => copy_group == Some(g),
        None => copy_group.is_none() && md.get(headers::FAILURES_HANDLER) == Some(handler),
    };
    Some(ours)
}

/// [`owner`] for the handler that received `msg`; `None` outside a router. Counting headers
/// live in metadata: nothing to look up without any.
#[inline]
fn owned(msg: &Message) -> Option<bool> {
    if msg.metadata().is_empty() {
        return None;
    }
    let info = msg.context()?.handler();
    owner(msg, &info.name, &info.topic, info.group.as_deref())
}

impl<S> Service<Message> for DeadLetterService<S>
where
    S: Service<Message, Response = Vec<Message>>,
    S::Error: Into<BoxError>,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = LayerFuture<S::Future, DeadLetterFailure>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, msg: Message) -> Self::Future {
        match owned(&msg) {
            Some(false) => {
                self.config.stats.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    uuid = msg.uuid(),
                    "a retry copy of another consumer; acking it unhandled"
                );
                return OnError::done(Ok(Vec::new())).into();
            }
            Some(true) => {
                let md = msg.metadata();
                let due = md.get_as::<u64>(headers::NOT_BEFORE).ok().flatten();
                if let Some(due) = due {
                    let due = from_epoch_millis(due);
                    if let Ok(remaining) = due.duration_since(SystemTime::now()) {
                        if !remaining.is_zero() {
                            let err = NotYetDue {
                                uuid: msg.uuid().to_owned(),
                                remaining,
                            };
                            return OnError::done(Err(redeliver_after(remaining, err))).into();
                        }
                    }
                }
            }
            None => {}
        }
        if self.config.copied_any.load(Ordering::Relaxed) && self.config.is_stale(&msg) {
            self.config.stats.skipped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                uuid = msg.uuid(),
                "an earlier copy of a durably counted message (a newer one was published); \
                 acking it unhandled"
            );
            return OnError::done(Ok(Vec::new())).into();
        }
        let failure = DeadLetterFailure {
            config: self.config.clone(),
            input: msg.clone(),
        };
        LayerFuture::from(OnError::new(self.inner.call(msg), failure))
    }
}

/// The failed deliveries a durably counted copy records (0 without the header).
fn recorded_failures(msg: &Message) -> u32 {
    msg.metadata()
        .get_as::<u32>(headers::FAILURES)
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// The key of `copies` for `uuid` handled by `handler`.
fn copy_key(handler: &str, uuid: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (handler, uuid).hash(&mut hasher);
    hasher.finish()
}

impl Config {
    /// Whether `msg` is a delivery of a durably counted message older than the newest copy
    /// this process published of it (or after it was dead-lettered).
    #[cold]
    fn is_stale(&self, msg: &Message) -> bool {
        let Some(ctx) = msg.context() else {
            return false;
        };
        let Some(latest) = self.copies.get(&copy_key(&ctx.handler().name, msg.uuid())) else {
            return false;
        };
        let prior = match owned(msg) {
            Some(true) => recorded_failures(msg),
            _ => 0,
        };
        prior < latest
    }

    /// Records that this process published the copy counting `number` failures.
    fn copied(&self, handler: &str, uuid: &str, number: u32) {
        self.copies.insert(copy_key(handler, uuid), number);
        self.copied_any.store(true, Ordering::Relaxed);
    }

    /// Whether the broker counts this delivery, and its number (`prior` failures recorded
    /// durably before it).
    fn delivery_number(&self, msg: &Message, prior: u32) -> (bool, u32) {
        let broker_attempt = msg.context().and_then(|c| c.attempt());
        let by_broker = match self.counting {
            Counting::Broker => true,
            Counting::Republish => false,
            // A count the subscriber keeps in process starts again after a restart: a
            // message whose consumer restarts often would never be dead-lettered.
            Counting::Auto => {
                broker_attempt.is_some()
                    && msg
                        .context()
                        .is_some_and(|c| c.attempt_origin() == AttemptOrigin::Broker)
            }
        };
        let number = if by_broker {
            prior + broker_attempt.unwrap_or(1)
        } else {
            prior + 1
        };
        (by_broker, number)
    }
}

/// The highest `n` of the `tidemill-dead-letter-error-n` entries `md` carries (0: none).
fn last_history_entry(md: &tidemill_core::Metadata) -> u32 {
    md.iter()
        .filter_map(|(k, _)| k.strip_prefix(headers::DEAD_LETTER_ERROR_PREFIX))
        .filter_map(|n| n.parse::<u32>().ok())
        .max()
        .unwrap_or(0)
}

impl DeadLetter {
    /// Makes sure a separate retry topic keeps the copies for the failed handler's group
    /// (once per group; the source topic keeps them already: the group consumes it). When
    /// the broker cannot (Kafka cannot pin an active group's offsets from outside), says so
    /// and carries on: the mandatory publish still fails where nothing would receive the
    /// copy.
    async fn retain_retry(&self, target: &str, group: Option<&str>) {
        let (Some(_), Some(group), Some(_)) = (&self.inner.retry_topic, group, &self.inner.retain)
        else {
            return;
        };
        if self.inner.retry_retained.lock().contains(group) {
            return;
        }
        match self.inner.publisher.retain_for(target, group).await {
            Ok(()) => {
                tracing::debug!(topic = %target, group, "retry topic retains messages for the group");
                self.inner.retry_retained.lock().insert(Arc::from(group));
            }
            Err(e) => tracing::warn!(
                topic = %target,
                group,
                error = %e,
                "cannot make the retry topic keep messages for the group; copies published \
                 before the group first subscribes to it may not reach it"
            ),
        }
    }

    /// Makes sure the dead-letter topic keeps what is published to it (once per layer).
    async fn retain(&self) -> Result<(), tidemill_core::Error> {
        let Some(group) = self.inner.retain.clone() else {
            return Ok(());
        };
        let config = self.inner.clone();
        self.inner
            .retained
            .get_or_try_init(|| async move {
                config.publisher.retain_for(&config.topic, &group).await?;
                tracing::debug!(topic = %config.topic, group = %group, "dead-letter topic retains messages for the group");
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// Deals with a failed delivery: dead-letter, republish, or pass the error on (nack).
    async fn failed(
        self,
        input: Message,
        d: Delivery,
        error: BoxError,
    ) -> Result<Vec<Message>, BoxError> {
        let now = SystemTime::now();
        let entry = format!(
            "{} {}",
            timestamp(now),
            truncate(error_chain(error.as_ref()), MAX_ERROR)
        );
        let history_key = format!("{}\u{0}{}", d.handler, input.uuid());
        if d.number >= self.inner.max_deliveries {
            let mut history: Vec<(u32, String)> = Vec::new();
            if d.by_broker {
                if let Some(h) = self.inner.history.get(&history_key) {
                    history.extend(h.iter().cloned());
                }
            } else {
                for n in 1..=d.prior {
                    if let Some(e) = input
                        .metadata()
                        .get(&format!("{}{n}", headers::FAILURE_PREFIX))
                    {
                        history.push((n, e.to_owned()));
                    }
                }
            }
            history.push((d.number, entry));
            return self.dead_letter(input, d, error, history).await;
        }
        if d.by_broker {
            let mut history = self
                .inner
                .history
                .get(&history_key)
                .map(|h| (*h).clone())
                .unwrap_or_default();
            history.push((d.number, entry));
            self.inner.history.insert(history_key, Arc::new(history));
            return Err(error);
        }
        // Durable counting: republish with the new count, then ack the original.
        let target = self
            .inner
            .retry_topic
            .clone()
            .unwrap_or_else(|| Arc::from(d.topic.as_str()));
        let mut copy = input.clone();
        let md = copy.metadata_mut();
        md.set(headers::FAILURES, d.number);
        md.set(headers::FAILURES_HANDLER, &d.handler);
        md.set(headers::FAILURES_TOPIC, &*target);
        match &d.group {
            Some(g) => md.set(headers::FAILURES_GROUP, g),
            None => {
                md.remove(headers::FAILURES_GROUP);
            }
        }
        md.set(format!("{}{}", headers::FAILURE_PREFIX, d.number), &entry);
        match redelivery_delay(error.as_ref()) {
            Some(delay) => md.set(headers::NOT_BEFORE, epoch_millis(now + delay)),
            None => {
                md.remove(headers::NOT_BEFORE);
            }
        }
        self.retain_retry(&target, d.group.as_deref()).await;
        // Mandatory: a copy nothing receives would be lost with the original acked.
        match self
            .inner
            .publisher
            .publish_mandatory(&target, vec![copy])
            .await
        {
            Ok(()) => {
                self.inner.copied(&d.handler, input.uuid(), d.number);
                self.inner.stats.republished.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    uuid = input.uuid(),
                    failures = d.number,
                    max = self.inner.max_deliveries,
                    retry_topic = %target,
                    error = %error_chain(error.as_ref()),
                    "handler failed; republished with the failure count (durable counting)"
                );
                Ok(Vec::new())
            }
            Err(publish_error) => Err(Box::new(DeadLetterPublishFailed {
                uuid: input.uuid().to_owned(),
                purpose: "retry",
                topic: target.to_string(),
                publish_error,
                handler_error: error,
            })),
        }
    }

    async fn dead_letter(
        self,
        input: Message,
        d: Delivery,
        error: BoxError,
        history: Vec<(u32, String)>,
    ) -> Result<Vec<Message>, BoxError> {
        let mut dead = input.clone();
        let md = dead.metadata_mut();
        // The counting headers become the dead-letter history.
        for key in [
            headers::FAILURES,
            headers::FAILURES_HANDLER,
            headers::FAILURES_TOPIC,
            headers::FAILURES_GROUP,
            headers::NOT_BEFORE,
        ] {
            md.remove(key);
        }
        for n in 1..=d.number {
            md.remove(&format!("{}{n}", headers::FAILURE_PREFIX));
        }
        let reason = truncate(error_chain(error.as_ref()), MAX_REASON);
        md.set(headers::DEAD_LETTER_REASON, &reason);
        md.set(headers::DEAD_LETTER_HANDLER, &d.handler);
        md.set(headers::DEAD_LETTER_TOPIC, &d.topic);
        if let Some(g) = &d.group {
            md.set(headers::DEAD_LETTER_GROUP, g);
        }
        md.set(headers::DEAD_LETTER_TIME, timestamp(SystemTime::now()));
        md.set(headers::DEAD_LETTER_DELIVERIES, d.number);
        md.set(
            headers::DEAD_LETTER_COUNTING,
            if d.by_broker { "broker" } else { "republish" },
        );
        // A message dead-lettered before (and sent back by hand, say) keeps its earlier
        // history: this round's entries come after the ones it carries.
        let earlier = last_history_entry(md);
        for (i, (_, entry)) in history.iter().enumerate() {
            let n = earlier + 1 + u32::try_from(i).unwrap_or(u32::MAX);
            md.set(format!("{}{n}", headers::DEAD_LETTER_ERROR_PREFIX), entry);
        }
        let published = match self.retain().await {
            Ok(()) => {
                self.inner
                    .publisher
                    .publish_mandatory(&self.inner.topic, vec![dead])
                    .await
            }
            Err(e) => Err(e),
        };
        match published {
            Ok(()) => {
                self.inner
                    .stats
                    .dead_lettered
                    .fetch_add(1, Ordering::Relaxed);
                crate::util::count(metric_names::DEAD_LETTERED, &input);
                self.inner
                    .history
                    .invalidate(&format!("{}\u{0}{}", d.handler, input.uuid()));
                tracing::warn!(
                    uuid = input.uuid(),
                    deliveries = d.number,
                    dead_letter_topic = %self.inner.topic,
                    %reason,
                    "message dead-lettered; acking it"
                );
                Ok(Vec::new())
            }
            Err(publish_error) => {
                tracing::error!(
                    uuid = input.uuid(),
                    dead_letter_topic = %self.inner.topic,
                    error = %publish_error,
                    "cannot publish to the dead-letter topic; nacking"
                );
                Err(Box::new(DeadLetterPublishFailed {
                    uuid: input.uuid().to_owned(),
                    purpose: "dead-letter",
                    topic: self.inner.topic.to_string(),
                    publish_error,
                    handler_error: error,
                }))
            }
        }
    }
}
