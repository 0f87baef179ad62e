//! The embedded in-memory broker: Tidemill's default backend, not a test double.
//!
//! - **Broadcast and groups.** A subscription without a consumer group gets its own queue and
//!   sees every message published while it exists. Subscriptions sharing a group share one
//!   queue and compete for its messages; the group's queue outlives its subscribers (for the
//!   life of the broker), so a group keeps receiving across subscriber restarts.
//! - **Order per key.** Messages with the same key are handed out one at a time, in publish
//!   order: the next one only after the previous one is acked, also across nacks. Messages
//!   without a key flow as fast as consumers take them.
//! - **Redelivery.** A nacked (or dropped) delivery is handed out again before anything
//!   else, after its delay if one was asked for; the delivery attempt counts up from 1.
//! - **Backpressure.** Each queue holds at most [`MemoryConfig::capacity`] messages (waiting
//!   plus in flight). When a subscriber is slow and its queue is full, `publish` waits until
//!   the subscriber catches up, so memory stays flat however fast publishers are. A
//!   subscriber that never acks therefore eventually stalls publishers of its topic.
//! - **No subscribers.** Messages published to a topic nobody subscribes to are discarded,
//!   unless [`MemoryConfig::retention`] keeps the last N per topic for new subscriptions to
//!   replay. [`Subscriber::initialize`] creates a group's queue ahead of publishing.
//!
//! ```
//! use tidemill_core::{MemoryBroker, Message, Publisher, SubscribeOptions, Subscriber};
//! use futures::StreamExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> tidemill_core::Result<()> {
//! let broker = MemoryBroker::new();
//! let (publisher, subscriber) = (broker.publisher(), broker.subscriber());
//! let mut stream = subscriber.subscribe("greetings", SubscribeOptions::new()).await?;
//! publisher.publish_one("greetings", Message::new("hello")).await?;
//! let delivery = stream.next().await.expect("stream open")?;
//! assert_eq!(delivery.message().payload().as_ref(), b"hello");
//! delivery.ack().await?;
//! # Ok(()) }
//! ```

mod queue;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{DeliveryStream, Error, Message, Publisher, Result, SubscribeOptions, Subscriber};
use queue::{deliver, Entry, Queue};

const BROKER: &str = "memory";

/// How many ready messages a consumer takes from its queue per lock (its local prefetch).
const TAKE_BATCH: usize = 64;

/// Configuration of the in-memory broker.
///
/// Deserializing refuses what would not mean what it says: a `capacity` of 0 (a queue holds
/// at least one message), negative numbers, numbers beyond `usize` and unknown fields are
/// errors, never silently adjusted. [`MemoryConfig::validate`] checks a value built in code.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Maximum messages a subscription's queue holds (waiting + in flight) before publishers
    /// wait: from 1 ([`MemoryConfig::MIN_CAPACITY`]) to `usize::MAX`. Default 16,384.
    #[serde(deserialize_with = "capacity")]
    pub capacity: usize,
    /// How many of the most recent messages per topic are kept and replayed to every new
    /// subscription (and new consumer group). Default 0: none.
    pub retention: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            capacity: 16_384,
            retention: 0,
        }
    }
}

impl MemoryConfig {
    /// The smallest [`capacity`](Self::capacity): a queue holds at least one message.
    pub const MIN_CAPACITY: usize = 1;

    /// Checks every field: an error naming the field and its allowed range when one is out
    /// of it (a `capacity` of 0).
    ///
    /// ```
    /// use tidemill_core::MemoryConfig;
    ///
    /// assert!(MemoryConfig::default().validate().is_ok());
    /// let err = MemoryConfig { capacity: 0, retention: 0 }.validate().unwrap_err();
    /// assert!(err.to_string().contains("capacity must be an integer from 1 to"), "{err}");
    /// ```
    pub fn validate(&self) -> Result<()> {
        if self.capacity < Self::MIN_CAPACITY {
            return Err(Error::config(
                BROKER,
                format!(
                    "capacity must be an integer from {} to {}, got {}",
                    Self::MIN_CAPACITY,
                    usize::MAX,
                    self.capacity
                ),
            ));
        }
        Ok(())
    }
}

/// Deserializes [`MemoryConfig::capacity`]: an integer from 1 to `usize::MAX`; the error
/// says that range for 0, negative and too large numbers alike.
fn capacity<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<usize, D::Error> {
    use serde::de::{Unexpected, Visitor};
    use std::fmt;

    struct Capacity;

    impl Capacity {
        fn check<E: serde::de::Error>(
            self,
            n: u128,
            unexp: Unexpected<'_>,
        ) -> std::result::Result<usize, E> {
            usize::try_from(n)
                .ok()
                .filter(|n| *n >= MemoryConfig::MIN_CAPACITY)
                .ok_or_else(|| E::invalid_value(unexp, &self))
        }
    }

    impl<'de> Visitor<'de> for Capacity {
        type Value = usize;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "an integer from {} to {}",
                MemoryConfig::MIN_CAPACITY,
                usize::MAX
            )
        }

        fn visit_u64<E: serde::de::Error>(self, n: u64) -> std::result::Result<usize, E> {
            self.check(n.into(), Unexpected::Unsigned(n))
        }

        fn visit_u128<E: serde::de::Error>(self, n: u128) -> std::result::Result<usize, E> {
            self.check(n, Unexpected::Other("a larger integer"))
        }

        fn visit_i64<E: serde::de::Error>(self, n: i64) -> std::result::Result<usize, E> {
            match u64::try_from(n) {
                Ok(u) => self.visit_u64(u),
                Err(_) => Err(E::invalid_value(Unexpected::Signed(n), &self)),
            }
        }

        fn visit_i128<E: serde::de::Error>(self, n: i128) -> std::result::Result<usize, E> {
            match u128::try_from(n) {
                Ok(u) => self.visit_u128(u),
                Err(_) => Err(E::invalid_value(
                    Unexpected::Other("a negative integer"),
                    &self,
                )),
            }
        }
    }

    deserializer.deserialize_u64(Capacity)
}

#[cfg(test)]
mod config_tests {
    use super::MemoryConfig;
    use serde::de::value::{Error, MapDeserializer};
    use serde::de::IntoDeserializer;
    use serde::Deserialize;

    fn one<V: IntoDeserializer<'static, Error>>(
        key: &'static str,
        value: V,
    ) -> Result<MemoryConfig, Error> {
        MemoryConfig::deserialize(MapDeserializer::new(std::iter::once((key, value))))
    }

    #[test]
    fn capacity_zero_negative_and_fractional_are_refused_with_the_range() {
        let range = format!("expected an integer from 1 to {}", usize::MAX);
        for err in [
            one("capacity", 0u64).unwrap_err(),
            one("capacity", -5i64).unwrap_err(),
            one("capacity", u128::MAX).unwrap_err(),
            one("capacity", 1.5f64).unwrap_err(),
        ] {
            assert!(err.to_string().contains(&range), "{err}");
        }
        assert_eq!(one("capacity", 3u64).unwrap().capacity, 3);
        assert_eq!(one("retention", 0u64).unwrap(), MemoryConfig::default());
        assert!(one("capacty", 3u64).is_err());
    }
}

/// The in-memory broker. Cheap to clone; clones share topics and queues.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    config: MemoryConfig,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
}

#[derive(Default)]
struct Topic {
    state: Mutex<TopicState>,
    /// Every queue of the topic (broadcast and groups), rebuilt whenever one is added or
    /// removed, so publishing takes no lock on the topic's state when nothing is retained.
    targets: RwLock<Arc<[Arc<Queue>]>>,
}

impl Topic {
    /// Rebuilds the publish targets; call with `state` locked after changing its queues.
    fn refresh_targets(&self, state: &TopicState) {
        let all: Arc<[Arc<Queue>]> = state
            .broadcast
            .iter()
            .chain(state.groups.values())
            .cloned()
            .collect();
        *self.targets.write() = all;
    }
}

#[derive(Default)]
struct TopicState {
    broadcast: Vec<Arc<Queue>>,
    groups: HashMap<String, Arc<Queue>>,
    retained: VecDeque<Message>,
}

impl Shared {
    fn topic(&self, name: &str) -> Arc<Topic> {
        if let Some(t) = self.topics.read().get(name) {
            return t.clone();
        }
        self.topics
            .write()
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    fn new_queue(&self, retained: &VecDeque<Message>) -> Arc<Queue> {
        let queue = Queue::new(self.config.capacity);
        queue.replay(retained.iter().cloned());
        queue
    }
}

impl MemoryBroker {
    /// A broker with the default configuration.
    pub fn new() -> Self {
        Self::default()
    }

    /// A broker with `config`.
    ///
    /// # Panics
    ///
    /// When `config` is invalid ([`MemoryConfig::validate`]: a `capacity` of 0), naming the
    /// field; [`try_with_config`](Self::try_with_config) returns the error instead.
    pub fn with_config(config: MemoryConfig) -> Self {
        match Self::try_with_config(config) {
            Ok(broker) => broker,
            Err(e) => panic!("{e}"),
        }
    }

    /// A broker with `config`, or the error [`MemoryConfig::validate`] finds in it.
    pub fn try_with_config(config: MemoryConfig) -> Result<Self> {
        config.validate()?;
        Ok(MemoryBroker {
            shared: Arc::new(Shared {
                config,
                topics: RwLock::default(),
            }),
        })
    }

    /// The broker's configuration.
    pub fn config(&self) -> &MemoryConfig {
        &self.shared.config
    }

    /// A new publisher handle.
    pub fn publisher(&self) -> MemoryPublisher {
        MemoryPublisher {
            shared: self.shared.clone(),
            state: Arc::new(PublisherState::default()),
        }
    }

    /// A new subscriber handle.
    pub fn subscriber(&self) -> MemorySubscriber {
        MemorySubscriber {
            shared: self.shared.clone(),
            closing: CancellationToken::new(),
            consumers: Arc::default(),
        }
    }

    #[cfg(test)]
    pub(crate) fn debug_dump(&self) -> String {
        let topics = self.shared.topics.read();
        let mut out = String::new();
        for (name, topic) in topics.iter() {
            for q in topic.targets.read().iter() {
                out.push_str(&format!("{name}: {}\n", q.debug_state()));
            }
        }
        out
    }

    /// How many messages consumer group `group` of `topic` holds (waiting, in flight or
    /// delayed); `None` if the group does not exist.
    pub fn group_backlog(&self, topic: &str, group: &str) -> Option<usize> {
        let topic = self.shared.topics.read().get(topic)?.clone();
        let state = topic.state.lock();
        state.groups.get(group).map(|q| q.len())
    }
}

/// Publishes to a [`MemoryBroker`]. Cheap to clone; clones share the closed state.
#[derive(Clone)]
pub struct MemoryPublisher {
    shared: Arc<Shared>,
    state: Arc<PublisherState>,
}

#[derive(Default)]
struct PublisherState {
    closed: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// Decrements the in-flight count even if a publish future is dropped midway.
struct InFlight<'a>(&'a PublisherState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[async_trait]
impl Publisher for MemoryPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.publish_to(topic, messages, false).await
    }

    /// Creates consumer group `group` of `topic` (a queue that keeps what is published
    /// until the group consumes it, for the life of the broker).
    async fn retain_for(&self, topic: &str, group: &str) -> Result<()> {
        self.check_open(topic)?;
        self.shared.ensure_group(topic, group);
        Ok(())
    }

    /// Fails with [`Error::Unroutable`] when no subscription or group receives the topic.
    /// [`MemoryConfig::retention`] does not count: its ring keeps the last messages only
    /// until later publishes push them out; [`retain_for`](Publisher::retain_for) makes a
    /// group that keeps them all.
    async fn publish_mandatory(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.publish_to(topic, messages, true).await
    }

    async fn close(&self) -> Result<()> {
        self.state.closed.store(true, Ordering::Release);
        // Wait for publishes already under way (they may be waiting on backpressure).
        loop {
            let idle = self.state.idle.notified();
            if self.state.in_flight.load(Ordering::Acquire) == 0 {
                return Ok(());
            }
            idle.await;
        }
    }
}

impl MemoryPublisher {
    fn check_open(&self, topic: &str) -> Result<()> {
        if self.state.closed.load(Ordering::Acquire) {
            return Err(Error::PublisherClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        Ok(())
    }

    async fn publish_to(&self, topic: &str, messages: Vec<Message>, mandatory: bool) -> Result<()> {
        self.state.in_flight.fetch_add(1, Ordering::AcqRel);
        let _in_flight = InFlight(&self.state);
        self.check_open(topic)?;
        let topic_ref = self.shared.topic(topic);
        let retention = self.shared.config.retention;
        let targets = if retention > 0 {
            // Retain and snapshot under one lock, so a new subscription either replays a
            // message or receives it live, never both and never neither.
            let mut state = topic_ref.state.lock();
            let targets = topic_ref.targets.read().clone();
            // The ring keeps the last messages for subscriptions to come until later
            // publishes push them out: it does not keep a mandatory publish, which then
            // fails and retains nothing.
            if !(mandatory && targets.is_empty()) {
                for m in messages.iter().rev().take(retention).rev() {
                    if state.retained.len() == retention {
                        state.retained.pop_front();
                    }
                    state.retained.push_back(m.clone());
                }
            }
            targets
        } else {
            topic_ref.targets.read().clone()
        };
        if targets.is_empty() {
            if let (true, Some(first)) = (mandatory, messages.first()) {
                return Err(Error::Unroutable {
                    broker: BROKER,
                    topic: topic.to_owned(),
                    uuid: first.uuid().to_owned(),
                });
            }
            tracing::trace!(topic, count = messages.len(), "memory: no subscribers");
            return Ok(());
        }
        let last = targets.len() - 1;
        for queue in &targets[..last] {
            queue.push_all(messages.iter().cloned()).await;
        }
        targets[last].push_all(messages).await;
        Ok(())
    }
}

/// Subscribes to a [`MemoryBroker`].
#[derive(Clone)]
pub struct MemorySubscriber {
    shared: Arc<Shared>,
    closing: CancellationToken,
    /// The reading ends of this subscriber's streams, so that `close` releases what they
    /// hold even when nobody polls or drops them.
    consumers: Arc<Mutex<Vec<Weak<Reader>>>>,
}

impl MemorySubscriber {
    fn check_open(&self, topic: &str) -> Result<()> {
        if self.closing.is_cancelled() {
            return Err(Error::SubscriberClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Subscriber for MemorySubscriber {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<DeliveryStream> {
        self.check_open(topic)?;
        let topic_ref = self.shared.topic(topic);
        let consumer = {
            let mut state = topic_ref.state.lock();
            match options.consumer_group() {
                None => {
                    let queue = self.shared.new_queue(&state.retained);
                    state.broadcast.push(queue.clone());
                    topic_ref.refresh_targets(&state);
                    Consumer::new(queue, Some(topic_ref.clone()))
                }
                Some(group) => {
                    let queue = match state.groups.get(group) {
                        Some(q) => q.clone(),
                        None => {
                            let q = self.shared.new_queue(&state.retained);
                            state.groups.insert(group.to_owned(), q.clone());
                            topic_ref.refresh_targets(&state);
                            q
                        }
                    };
                    Consumer::new(queue, None)
                }
            }
        };
        {
            let mut consumers = self.consumers.lock();
            consumers.retain(|c| c.strong_count() > 0);
            consumers.push(Arc::downgrade(&consumer.reader));
        }
        // Closed between the check above and the registration: release at once.
        if self.closing.is_cancelled() {
            consumer.reader.release();
        }
        let stream = futures::stream::unfold(consumer, |mut consumer| async move {
            let delivery = consumer.next().await?;
            Some((Ok(delivery), consumer))
        });
        Ok(DeliveryStream::new(stream)
            .until_cancelled(self.closing.clone())
            .with_options(&options))
    }

    async fn initialize(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.check_open(topic)?;
        if let Some(group) = options.consumer_group() {
            self.shared.ensure_group(topic, group);
        }
        Ok(())
    }

    /// Ends every stream of this subscriber and gives back what they took but did not hand
    /// out yet (to their consumer group's other members), whether or not the streams are
    /// still polled or dropped.
    async fn close(&self) -> Result<()> {
        self.closing.cancel();
        let consumers = std::mem::take(&mut *self.consumers.lock());
        for reader in consumers.iter().filter_map(Weak::upgrade) {
            reader.release();
        }
        Ok(())
    }
}

impl Shared {
    /// Creates consumer group `group` of `topic` if it does not exist.
    fn ensure_group(&self, topic: &str, group: &str) {
        let topic_ref = self.topic(topic);
        let mut state = topic_ref.state.lock();
        if !state.groups.contains_key(group) {
            let q = self.new_queue(&state.retained);
            state.groups.insert(group.to_owned(), q);
            topic_ref.refresh_targets(&state);
        }
    }
}

/// What a subscription's reading end holds: its queue and the entries it took from the
/// queue (its local prefetch) but did not hand out yet.
struct Reader {
    queue: Arc<Queue>,
    prefetch: Mutex<Prefetch>,
    /// Set for broadcast subscriptions, whose queue lives only as long as the consumer.
    owner: Mutex<Option<Arc<Topic>>>,
}

#[derive(Default)]
struct Prefetch {
    entries: VecDeque<Entry>,
    /// Released: the subscriber closed (or the stream was dropped); take nothing more.
    released: bool,
}

impl Reader {
    /// Gives back what was taken and not handed out; a broadcast subscription's queue
    /// leaves its topic (nobody else would ever read it).
    fn release(&self) {
        {
            let mut prefetch = self.prefetch.lock();
            prefetch.released = true;
            self.queue.untake(&mut prefetch.entries);
        }
        if let Some(topic) = self.owner.lock().take() {
            let mut state = topic.state.lock();
            state.broadcast.retain(|q| !Arc::ptr_eq(q, &self.queue));
            topic.refresh_targets(&state);
            drop(state);
            self.queue.close();
        }
    }
}

/// One subscription's reading end. Dropping it returns prefetched messages to the queue and,
/// for a broadcast subscription, removes the queue from its topic.
struct Consumer {
    reader: Arc<Reader>,
    /// Where `take` puts entries before they move to the shared prefetch.
    scratch: VecDeque<Entry>,
}

impl Consumer {
    fn new(queue: Arc<Queue>, owner: Option<Arc<Topic>>) -> Self {
        Consumer {
            reader: Arc::new(Reader {
                queue,
                prefetch: Mutex::new(Prefetch {
                    entries: VecDeque::with_capacity(TAKE_BATCH),
                    released: false,
                }),
                owner: Mutex::new(owner),
            }),
            scratch: VecDeque::with_capacity(TAKE_BATCH),
        }
    }

    async fn next(&mut self) -> Option<crate::Delivery> {
        // This stream never waits while messages are ready (redeliveries included): spend
        // tokio's cooperative budget so a hot consumer cannot starve its runtime thread.
        tokio::task::consume_budget().await;
        loop {
            {
                let mut prefetch = self.reader.prefetch.lock();
                if prefetch.released {
                    return None;
                }
                if let Some(entry) = prefetch.entries.pop_front() {
                    drop(prefetch);
                    return Some(deliver(&self.reader.queue, entry));
                }
            }
            if !self.reader.queue.take(&mut self.scratch, TAKE_BATCH).await {
                return None;
            }
            let mut prefetch = self.reader.prefetch.lock();
            if prefetch.released {
                self.reader.queue.untake(&mut self.scratch);
                return None;
            }
            prefetch.entries.append(&mut self.scratch);
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.reader.release();
    }
}

#[cfg(test)]
mod tests;
