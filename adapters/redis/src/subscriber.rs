//! [`RedisSubscriber`]: consumer groups on the topic's stream.
//!
//! Each subscription is a consumer of its group (a private group when it has none). A task
//! per subscription reads new entries (`XREADGROUP … >`, on a connection of its own since
//! the read blocks), hands them out one per key at a time, keeps the entries it holds from
//! going idle, takes over entries other consumers left (`XAUTOCLAIM`), and when it ends
//! gives back what it did not hand out so another consumer takes it at once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::{Client, RedisError, Value};
use tidemill_core::{
    AckFuture, Acknowledger, CancellationToken, ConnectionState, Delivery, DeliveryStream, Error,
    Message, Result, SubscribeOptions, Subscriber,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tokio_util::time::DelayQueue;

use crate::codec;
use crate::config::{RedisConfig, StartFrom};
use crate::conn::{self, StateCell};
use crate::BROKER;

/// Subscribes to topics as consumers of Redis consumer groups.
///
/// - With a consumer group, the group's subscribers (in any process) compete for the
///   stream's entries; the group is created on first use, starting at
///   [`start_from`](RedisConfig::start_from).
/// - Without one, the subscription gets a private group of its own (`tidemill-<uuid>`),
///   deleted when it ends: it sees what is published while it exists.
/// - An ack is `XACK`; acks arriving while one `XACK` is out go together in the next (one
///   `XACK` with many ids), each resolving once the `XACK` carrying it was answered. A nack
///   hands the message out again at once (after its delay), with the server's delivery
///   count raised; the attempt a delivery reports is that count, so it holds across
///   restarts. Entries a consumer received and never settled (it crashed)
///   are taken over by the group's other subscriptions after
///   [`claim_idle`](RedisConfig::claim_idle); those a subscription gives back when it ends
///   are taken within [`claim_interval`](RedisConfig::claim_interval).
/// - Order per key ([`order_per_key`](RedisConfig::order_per_key)) holds within a
///   subscription: one message per key out at a time, a nacked one first again. With
///   several subscribers in a group, the group spreads a key's messages over them, and
///   entries taken over from a dead consumer arrive after newer ones.
///
/// Cloning is cheap; clones share the connection and the subscriptions.
#[derive(Clone)]
pub struct RedisSubscriber {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    client: Client,
    conn: ConnectionManager,
    closed: CancellationToken,
    tasks: TaskTracker,
    state: Arc<StateCell>,
}

impl std::fmt::Debug for RedisSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSubscriber")
            .field("server", &self.inner.config.address())
            .field("closed", &self.inner.closed.is_cancelled())
            .finish()
    }
}

impl RedisSubscriber {
    /// Connects to the server; fails within `connect_timeout` naming the address (without
    /// its password) when it cannot.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        let client = conn::client(&config)?;
        let conn = conn::manager(&client, &config).await?;
        Ok(RedisSubscriber {
            inner: Arc::new(Inner {
                config,
                client,
                conn,
                closed: CancellationToken::new(),
                tasks: TaskTracker::new(),
                state: Arc::default(),
            }),
        })
    }

    /// The configuration this subscriber runs with.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }
}

/// Creates consumer group `group` of `topic`'s stream (and the stream, when allowed);
/// an existing group is fine.
pub(crate) async fn create_group(
    conn: &mut ConnectionManager,
    config: &RedisConfig,
    topic: &str,
    group: &str,
    start: StartFrom,
    state: &StateCell,
) -> Result<()> {
    let stream = config.stream(topic);
    let mut cmd = redis::cmd("XGROUP");
    cmd.arg("CREATE").arg(&stream).arg(group).arg(match start {
        StartFrom::New => "$",
        StartFrom::Beginning => "0",
    });
    if config.create_streams {
        cmd.arg("MKSTREAM");
    }
    let result: Result<Value, _> = cmd.query_async(conn).await;
    conn::saw(state, &result);
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) if !config.create_streams && !conn::is_transient(&e) => Err(Error::permanent(
            BROKER,
            topic,
            format!("create consumer group `{group}`"),
            format!(
                "stream `{stream}` does not exist and create_streams is off: {} (server {})",
                conn::strip(&e, config),
                config.address()
            ),
        )),
        Err(e) => Err(conn::error(
            e,
            config,
            topic,
            &format!("create consumer group `{group}` (XGROUP CREATE)"),
        )),
    }
}

#[async_trait]
impl Subscriber for RedisSubscriber {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<DeliveryStream> {
        let inner = &self.inner;
        if inner.closed.is_cancelled() {
            return Err(Error::SubscriberClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        let config = &inner.config;
        let (group, private) = match options.consumer_group() {
            Some(g) => (g.to_owned(), false),
            None => (format!("tidemill-{}", uuid::Uuid::new_v4().simple()), true),
        };
        // The reading connection first: a failure then leaves no private group behind.
        let (reader, reader_id) = open_reader(&inner.client, config).await?;
        let mut conn = inner.conn.clone();
        create_group(
            &mut conn,
            config,
            topic,
            &group,
            config.start_from,
            &inner.state,
        )
        .await?;
        let handoff = Arc::new(Handoff::default());
        handoff.lock().low_water = config.prefetch / 2;
        let shared = Arc::new(Shared {
            config: config.clone(),
            conn,
            handoff: handoff.clone(),
            stream: config.stream(topic),
            topic: topic.to_owned(),
            consumer: format!("{}-{}", config.consumer_name, uuid::Uuid::new_v4().simple()),
            group,
            private,
            state: inner.state.clone(),
            acks: Acks::default(),
        });
        if !private {
            shared.expire_consumers().await;
        }
        let shared_for_stream = shared.clone();
        let (events_tx, events) = mpsc::unbounded_channel();
        let events_for_stream = events_tx.clone();
        let pump = Pump {
            shared,
            client: inner.client.clone(),
            reader: Some(reader),
            reader_id,
            events_tx,
            handoff: handoff.clone(),
            delayed_due: HashMap::new(),
            scanning: false,
            recover_own: false,
        };
        let stop = inner.closed.child_token();
        let option_stop = options.cancellation().cloned();
        inner.tasks.spawn(pump.run(events, stop, option_stop));
        let stream = Deliveries {
            handoff,
            shared: shared_for_stream,
            events: events_for_stream,
        };
        Ok(DeliveryStream::new(stream).with_options(&options))
    }

    /// Creates the consumer group (and the stream), so that what is published from now on
    /// waits for the group's first subscriber. Nothing to do without a group.
    async fn initialize(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        let Some(group) = options.consumer_group() else {
            return Ok(());
        };
        let inner = &self.inner;
        if inner.closed.is_cancelled() {
            return Err(Error::SubscriberClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        let mut conn = inner.conn.clone();
        create_group(
            &mut conn,
            &inner.config,
            topic,
            group,
            inner.config.start_from,
            &inner.state,
        )
        .await
    }

    /// Ends every subscription: each gives back the entries it read but did not hand out
    /// (another consumer of the group takes them at once), private groups are deleted.
    /// Deliveries already handed out can still be settled.
    async fn close(&self) -> Result<()> {
        let inner = &self.inner;
        inner.closed.cancel();
        inner.tasks.close();
        // What a subscription's end may take: waking its read, the read, the sweep and
        // the give-back.
        let bound = inner.config.block + inner.config.command_timeout * 4;
        if tokio::time::timeout(bound, inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                broker = BROKER,
                "subscriptions did not finish giving back their entries within {bound:?}; \
                 the group takes them over after claim_idle"
            );
        }
        inner.state.set(ConnectionState::Closed);
        Ok(())
    }

    fn connection_state(&self) -> ConnectionState {
        self.inner.state.get()
    }
}

/// The entries of a subscription whose turn it is, shared by its task (which fills it)
/// and its stream (which takes one per poll). Nothing is handed out before the
/// application asks for it, so what it never takes is still here when the subscription
/// ends, and the task gives it back to the group.
#[derive(Default)]
struct Handoff {
    queue: std::sync::Mutex<Queue>,
    /// Wakes the task: the stream was dropped, or few enough entries are held to read more.
    notify: tokio::sync::Notify,
}

#[derive(Default)]
struct Queue {
    ready: VecDeque<Entry>,
    /// Handed out and not settled yet.
    handed: HashSet<Arc<str>>,
    /// Every entry held: ready, waiting, handed out, delayed.
    held: HashSet<Arc<str>>,
    /// A key is present while one of its entries is out (ready, handed out or delayed);
    /// the queue holds its successors.
    waiting: HashMap<Bytes, VecDeque<Entry>>,
    /// The task wants a wake-up once at most this many entries are held (to read more).
    low_water: usize,
    /// While a take-over scan runs: the ids settled meanwhile, which the scan may bring
    /// back (its reply left the server before the ack) and which must not go out again.
    settled_in_scan: Option<HashSet<Arc<str>>>,
    waker: Option<std::task::Waker>,
    /// The subscription ended: the stream ends.
    ended: bool,
    /// The stream was dropped.
    dropped: bool,
}

impl Handoff {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn dropped(&self) -> bool {
        self.lock().dropped
    }

    /// Makes `entry` ready, behind the others.
    fn push(&self, entry: Entry) {
        let mut queue = self.lock();
        queue.push(entry);
    }

    /// Takes in a newly read or taken-over entry; false when it is held already.
    fn admit(&self, entry: Entry) -> bool {
        let mut queue = self.lock();
        if !queue.held.insert(entry.id.clone()) {
            return false;
        }
        match &entry.key {
            Some(key) => match queue.waiting.get_mut(key) {
                Some(successors) => successors.push_back(entry),
                None => {
                    queue.waiting.insert(key.clone(), VecDeque::new());
                    queue.push(entry);
                }
            },
            None => queue.push(entry),
        }
        true
    }

    /// The entry is done with (acked, or gone): the next of its key may go. Wakes the task
    /// when it may read more.
    fn settle(&self, id: &Arc<str>, key: Option<&Bytes>) {
        let mut queue = self.lock();
        queue.handed.remove(id);
        if let Some(settled) = &mut queue.settled_in_scan {
            settled.insert(id.clone());
        }
        if !queue.held.remove(id) {
            return;
        }
        if let Some(key) = key {
            if let Some(successors) = queue.waiting.get_mut(key) {
                match successors.pop_front() {
                    Some(next) => queue.push(next),
                    None => {
                        queue.waiting.remove(key);
                    }
                }
            }
        }
        let wake = queue.held.len() == queue.low_water;
        drop(queue);
        if wake {
            self.notify.notify_one();
        }
    }

    /// A take-over scan starts: note what is settled until it ends.
    fn scan_started(&self) {
        self.lock().settled_in_scan = Some(HashSet::new());
    }

    /// The scan ended.
    fn scan_ended(&self) {
        self.lock().settled_in_scan = None;
    }

    /// Whether `id` was settled while the running scan was under way.
    fn settled_in_scan(&self, id: &Arc<str>) -> bool {
        self.lock()
            .settled_in_scan
            .as_ref()
            .is_some_and(|settled| settled.contains(id))
    }

    /// Notes that `id` is no longer out with the application (nacked).
    fn settled(&self, id: &Arc<str>) {
        self.lock().handed.remove(id);
    }

    fn held_len(&self) -> usize {
        self.lock().held.len()
    }

    fn held_ids(&self) -> Vec<Arc<str>> {
        self.lock().held.iter().cloned().collect()
    }

    /// Ends the stream; returns what was never handed out and the ids still out.
    fn end(&self) -> (Vec<Entry>, HashSet<Arc<str>>) {
        let mut queue = self.lock();
        queue.ended = true;
        if let Some(waker) = queue.waker.take() {
            waker.wake();
        }
        let mut never: Vec<Entry> = queue.ready.drain(..).collect();
        let waiting: Vec<Entry> = queue.waiting.drain().flat_map(|(_, q)| q).collect();
        never.extend(waiting);
        (never, queue.handed.clone())
    }
}

impl Queue {
    fn push(&mut self, entry: Entry) {
        self.ready.push_back(entry);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// The stream of one subscription.
struct Deliveries {
    handoff: Arc<Handoff>,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Event>,
}

impl futures::Stream for Deliveries {
    type Item = Result<Delivery>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let mut queue = self.handoff.lock();
        if queue.ended {
            return std::task::Poll::Ready(None);
        }
        let Some(entry) = queue.ready.pop_front() else {
            queue.waker = Some(cx.waker().clone());
            return std::task::Poll::Pending;
        };
        queue.handed.insert(entry.id.clone());
        drop(queue);
        let attempt = entry.attempt;
        let delivery = Delivery::new(
            entry.message.clone(),
            RedisAcker {
                shared: self.shared.clone(),
                events: self.events.clone(),
                entry,
            },
        )
        .with_attempt(attempt);
        std::task::Poll::Ready(Some(Ok(delivery)))
    }
}

impl Drop for Deliveries {
    fn drop(&mut self) {
        self.handoff.lock().dropped = true;
        self.handoff.notify.notify_one();
    }
}

/// What one subscription's task and its deliveries share.
struct Shared {
    config: RedisConfig,
    conn: ConnectionManager,
    /// The subscription's queue of entries.
    handoff: Arc<Handoff>,
    stream: String,
    topic: String,
    group: String,
    consumer: String,
    private: bool,
    state: Arc<StateCell>,
    /// Acks on their way to the server.
    acks: Acks,
}

/// Deletes consumer ARGV[2] of group ARGV[1] of stream KEYS[1] if it holds no entry.
const DELETE_IF_IDLE: &str =
    "if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then \
     return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end return -1";

/// How long ago a given-back entry was "delivered": far over any `claim_idle`, so the next
/// `XAUTOCLAIM` of any consumer takes it.
const GIVEN_BACK_IDLE: Duration = Duration::from_secs(30 * 24 * 3600);

impl Shared {
    /// Runs `cmd` (every command sent through here is idempotent), trying again after
    /// connection trouble until `command_timeout` is over: the connection reconnects by
    /// itself, and an ack should not fail because of one dropped connection.
    async fn query(&self, cmd: &redis::Cmd) -> Result<Value, RedisError> {
        conn::query_retrying(&self.conn, cmd, &self.config, &self.state).await
    }

    /// `XACK` of `ids` (at most [`MAX_ACK_IDS`]).
    async fn xack(&self, ids: &[Arc<str>]) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&self.stream).arg(&self.group);
        for id in ids {
            cmd.arg(&**id);
        }
        self.query(&cmd).await.map(drop)
    }

    fn error(&self, e: RedisError, context: &str) -> Error {
        conn::error(e, &self.config, &self.topic, context)
    }

    /// `XCLAIM` to this consumer with min-idle 0: `JUSTID` resets the entries' idle time
    /// (or sets it to `idle`) without counting a delivery; without it the delivery count
    /// goes up and the entries come back.
    fn xclaim(&self, ids: &[Arc<str>], idle: Option<Duration>, just_id: bool) -> redis::Cmd {
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(0);
        for id in ids {
            cmd.arg(&**id);
        }
        if let Some(idle) = idle {
            cmd.arg("IDLE").arg(idle.as_millis() as u64);
        }
        if just_id {
            cmd.arg("JUSTID");
        }
        cmd
    }

    /// Gives entries back to the group: any consumer's next scan takes them once they have
    /// been idle for `claim_idle` (at once with the default `after`).
    async fn give_back(&self, ids: &[Arc<str>], after: Duration) {
        if ids.is_empty() || self.private {
            return;
        }
        let claim_idle = self.config.claim_idle;
        let idle = if after.is_zero() {
            GIVEN_BACK_IDLE
        } else {
            claim_idle.saturating_sub(after)
        };
        if after > claim_idle {
            // Kept fresh (nobody takes them over) until claim_idle before the end of the
            // delay, then left to go idle.
            let until = Instant::now() + (after - claim_idle);
            let beat = (claim_idle / 3).max(Duration::from_millis(50));
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                tokio::time::sleep(left.min(beat)).await;
                for chunk in ids.chunks(1000) {
                    let _ = self.query(&self.xclaim(chunk, None, true)).await;
                }
            }
        }
        tracing::debug!(broker = BROKER, topic = %self.topic, group = %self.group, consumer = %self.consumer, ?ids, "giving entries back");
        for chunk in ids.chunks(1000) {
            if let Err(e) = self.query(&self.xclaim(chunk, Some(idle), true)).await {
                tracing::warn!(
                    broker = BROKER,
                    topic = %self.topic,
                    group = %self.group,
                    error = %conn::strip(&e, &self.config),
                    "could not give {} entries back to the group; it takes them over after \
                     claim_idle",
                    chunk.len()
                );
            }
        }
    }

    /// Takes `entry` back for redelivery (delivery count + 1): true, or false when the
    /// entry is gone (acked elsewhere, trimmed, group deleted).
    async fn take_again(&self, entry: &Entry) -> Result<bool, Error> {
        match self
            .query(&self.xclaim(std::slice::from_ref(&entry.id), None, false))
            .await
        {
            Ok(reply) => Ok(!conn::entries(reply).is_empty()),
            Err(e) if conn::is_nogroup(&e) => Ok(false),
            Err(e) => Err(self.error(e, "nack (XCLAIM)")),
        }
    }

    /// Removes consumers of the group that hold nothing and were idle past
    /// `consumer_expiry` (what ended subscriptions leave behind).
    async fn expire_consumers(&self) {
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("CONSUMERS").arg(&self.stream).arg(&self.group);
        let Ok(reply) = self.query(&cmd).await else {
            return;
        };
        let prefix = format!("{}-", self.config.consumer_name);
        let expiry = self.config.consumer_expiry.as_millis() as u64;
        for (name, pending, idle) in conn::consumers_reply(reply) {
            if pending == 0 && idle > expiry && name.starts_with(&prefix) {
                // Checked and deleted in one step: a consumer that read entries since the
                // XINFO above keeps them (deleting it would drop them from the group).
                let mut del = redis::cmd("EVAL");
                del.arg(DELETE_IF_IDLE)
                    .arg(1)
                    .arg(&self.stream)
                    .arg(&self.group)
                    .arg(&name);
                let _ = self.query(&del).await;
            }
        }
    }

    /// Delivery counts of `ids` (pending for this group), by id.
    async fn delivery_counts(&self, ids: &[Arc<str>]) -> HashMap<String, u64> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("XPENDING")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&**id)
                .arg(&**id)
                .arg(1);
        }
        let mut conn = self.conn.clone();
        let replies: Vec<Value> = match pipe.query_async(&mut conn).await {
            Ok(r) => r,
            Err(_) => return HashMap::new(),
        };
        replies
            .into_iter()
            .flat_map(conn::pending_reply)
            .map(|(id, _, _, count)| (id, count))
            .collect()
    }

    /// Takes over entries for this consumer: those idle past `claim_idle` (with `own`,
    /// instead this consumer's own pending entries not in `held`, e.g. read by a request
    /// whose reply a broken connection lost). At most `count`.
    async fn scan(&self, count: usize, own: bool, held: Vec<Arc<str>>) -> Vec<Entry> {
        let mut raw = Vec::new();
        if own {
            let mut cmd = redis::cmd("XPENDING");
            cmd.arg(&self.stream)
                .arg(&self.group)
                .arg("-")
                .arg("+")
                .arg(count + held.len())
                .arg(&self.consumer);
            let Ok(reply) = self.query(&cmd).await else {
                return Vec::new();
            };
            let held: HashSet<&str> = held.iter().map(|h| &**h).collect();
            let ids: Vec<Arc<str>> = conn::pending_reply(reply)
                .into_iter()
                .filter(|(id, ..)| !held.contains(id.as_str()))
                .take(count)
                .map(|(id, ..)| Arc::from(id))
                .collect();
            if ids.is_empty() {
                return Vec::new();
            }
            if let Ok(reply) = self.query(&self.xclaim(&ids, None, false)).await {
                raw = conn::entries(reply);
            }
        } else {
            let mut cursor = "0-0".to_owned();
            for _ in 0..8 {
                let mut cmd = redis::cmd("XAUTOCLAIM");
                cmd.arg(&self.stream)
                    .arg(&self.group)
                    .arg(&self.consumer)
                    .arg(self.config.claim_idle.as_millis() as u64)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(count - raw.len());
                let reply = match self.query(&cmd).await {
                    Ok(reply) => reply,
                    Err(e) => {
                        tracing::debug!(broker = BROKER, topic = %self.topic, error = %conn::strip(&e, &self.config), "XAUTOCLAIM failed");
                        break;
                    }
                };
                let deleted = match &reply {
                    Value::Array(parts) => parts
                        .get(2)
                        .map(|d| match d {
                            Value::Array(ids) => ids.len(),
                            _ => 0,
                        })
                        .unwrap_or(0),
                    _ => 0,
                };
                if deleted > 0 {
                    tracing::error!(
                        broker = BROKER,
                        topic = %self.topic,
                        group = %self.group,
                        "{deleted} entries were trimmed from stream `{}` before the group \
                         settled them: those messages are lost (see max_len / max_age)",
                        self.stream
                    );
                }
                let (next, taken) = conn::autoclaim_reply(reply);
                raw.extend(taken);
                cursor = next;
                if cursor == "0-0" || raw.len() >= count {
                    break;
                }
            }
        }
        let raw: Vec<(String, codec::Fields)> = raw
            .into_iter()
            .filter_map(|(id, fields)| Some((id, fields?)))
            .collect();
        if raw.is_empty() {
            return Vec::new();
        }
        let ids: Vec<Arc<str>> = raw.iter().map(|(id, _)| Arc::from(id.as_str())).collect();
        tracing::debug!(broker = BROKER, topic = %self.topic, group = %self.group, consumer = %self.consumer, ?ids, own, "took entries over");
        let counts = self.delivery_counts(&ids).await;
        raw.into_iter()
            .zip(ids)
            .map(|((id, fields), arc_id)| {
                let attempt = counts.get(&id).copied().unwrap_or(2).max(1);
                self.entry(
                    arc_id,
                    &id,
                    fields,
                    u32::try_from(attempt).unwrap_or(u32::MAX),
                )
            })
            .collect()
    }

    fn entry(&self, id: Arc<str>, raw_id: &str, fields: codec::Fields, attempt: u32) -> Entry {
        let message = codec::decode(&self.stream, raw_id, fields, &self.config.payload_field);
        let key = if self.config.order_per_key {
            message.key().cloned()
        } else {
            None
        };
        Entry {
            id,
            message,
            key,
            attempt,
        }
    }
}

/// An entry this subscription holds.
struct Entry {
    id: Arc<str>,
    message: Message,
    /// The key it is ordered by (none without `order_per_key`).
    key: Option<Bytes>,
    attempt: u32,
}

impl Entry {
    fn key(&self) -> Option<Bytes> {
        self.key.clone()
    }
}

/// What deliveries and helper tasks tell the subscription's task.
enum Event {
    /// The entry is done with (acked, or gone): the next of its key may go.
    Settled { id: Arc<str>, key: Option<Bytes> },
    /// Hand the entry out again now (before the next of its key, which waits for it).
    Again(Entry),
    /// Hand the entry out again after the delay.
    Later(Entry, Duration),
    /// Entries taken over by a scan.
    Claimed(Vec<Entry>),
    /// A scan finished.
    ScanDone,
}

struct Pump {
    shared: Arc<Shared>,
    client: Client,
    /// The connection for blocking reads (none while reconnecting).
    reader: Option<MultiplexedConnection>,
    /// The reading connection's `CLIENT ID`, to unblock its read when the task ends.
    reader_id: Option<i64>,
    events_tx: mpsc::UnboundedSender<Event>,
    /// Entries whose turn it is, and those handed out, shared with the stream.
    handoff: Arc<Handoff>,
    /// When each delayed entry is due (the entries wait in the task's `DelayQueue`).
    delayed_due: HashMap<Arc<str>, Instant>,
    scanning: bool,
    /// After a reconnect: look for own pending entries a lost reply carried.
    recover_own: bool,
}

type ReadFuture = BoxFuture<'static, Result<Value, RedisError>>;

impl Pump {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
        stop: CancellationToken,
        option_stop: Option<CancellationToken>,
    ) {
        let mut delayed: DelayQueue<Entry> = DelayQueue::new();
        let config = self.shared.config.clone();
        let option_stopped = async {
            match &option_stop {
                Some(t) => t.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(option_stopped);
        let mut reading: Option<ReadFuture> = None;
        let mut claim_tick = tokio::time::interval(config.claim_interval);
        claim_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let beat = (config.claim_idle / 3).max(Duration::from_millis(50));
        let mut heartbeat = tokio::time::interval_at(Instant::now() + beat, beat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry_at: Option<Instant> = None;
        let mut backoff = Duration::from_millis(100);
        let mut outage_logged = false;
        loop {
            // Read when at most half the prefetch is held, up to the full prefetch: one
            // read per batch, not one per settled message.
            let held = self.handoff.held_len();
            if reading.is_none() && retry_at.is_none() && held <= config.prefetch / 2 {
                if let Some(conn) = self.reader.clone() {
                    reading = Some(self.read(conn, config.prefetch - held));
                }
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = &mut option_stopped => break,
                _ = self.handoff.notify.notified() => {
                    if self.handoff.dropped() {
                        break;
                    }
                }
                Some(event) = events.recv() => {
                    if let Some((entry, delay)) = self.on_event(event) {
                        delayed.insert(entry, delay);
                    }
                }
                result = async { reading.as_mut().expect("guarded").await }, if reading.is_some() => {
                    reading = None;
                    match result {
                        Ok(reply) => {
                            backoff = Duration::from_millis(100);
                            if outage_logged {
                                tracing::info!(broker = BROKER, topic = %self.shared.topic, "reading again after reconnecting");
                                outage_logged = false;
                            }
                            for (id, fields) in conn::read_reply(reply) {
                                let Some(fields) = fields else { continue };
                                let entry = self.shared.entry(Arc::from(id.as_str()), &id, fields, 1);
                                self.admit(entry);
                            }
                        }
                        Err(e) => {
                            if conn::is_nogroup(&e) {
                                tracing::warn!(
                                    broker = BROKER,
                                    topic = %self.shared.topic,
                                    group = %self.shared.group,
                                    "consumer group or stream `{}` disappeared (deleted, or the server lost its data); creating it again from the stream's beginning",
                                    self.shared.stream
                                );
                                let mut conn = self.shared.conn.clone();
                                if let Err(err) = create_group(&mut conn, &config, &self.shared.topic, &self.shared.group, StartFrom::Beginning, &self.shared.state).await {
                                    tracing::warn!(broker = BROKER, topic = %self.shared.topic, error = %err, "could not create the group again; retrying");
                                    retry_at = Some(Instant::now() + backoff);
                                    backoff = (backoff * 2).min(Duration::from_secs(5));
                                }
                            } else {
                                if !outage_logged {
                                    tracing::warn!(
                                        broker = BROKER,
                                        topic = %self.shared.topic,
                                        error = %conn::strip(&e, &config),
                                        "reading stream `{}` failed; reconnecting",
                                        self.shared.stream
                                    );
                                    outage_logged = true;
                                }
                                if conn::is_transient(&e) {
                                    self.reader = None;
                                    self.shared.state.set(ConnectionState::Disconnected);
                                }
                                retry_at = Some(Instant::now() + backoff);
                                backoff = (backoff * 2).min(Duration::from_secs(5));
                            }
                        }
                    }
                }
                Some(expired) = delayed.next(), if !delayed.is_empty() => {
                    let entry = expired.into_inner();
                    self.delayed_due.remove(&entry.id);
                    self.spawn_take_again(entry);
                }
                _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {
                    retry_at = None;
                    if self.reader.is_none() {
                        match open_reader(&self.client, &config).await {
                            Ok((conn, id)) => {
                                self.reader = Some(conn);
                                self.reader_id = id;
                                self.shared.state.set(ConnectionState::Connected);
                                self.recover_own = true;
                            }
                            Err(_) => {
                                retry_at = Some(Instant::now() + backoff);
                                backoff = (backoff * 2).min(Duration::from_secs(5));
                            }
                        }
                    }
                }
                _ = claim_tick.tick() => self.spawn_scan(),
                _ = heartbeat.tick() => self.spawn_heartbeat(),
            }
        }
        if let Some(read) = reading.take() {
            // A read in flight may take entries for this consumer: wake it (it returns at
            // once) and keep what it brings, so it is given back with the rest.
            if let Some(id) = self.reader_id {
                let mut unblock = redis::cmd("CLIENT");
                unblock.arg("UNBLOCK").arg(id);
                let _ = self.shared.query(&unblock).await;
            }
            let bound = config.block + config.command_timeout;
            if let Ok(Ok(reply)) = tokio::time::timeout(bound, read).await {
                for (id, fields) in conn::read_reply(reply) {
                    let Some(fields) = fields else { continue };
                    let entry = self.shared.entry(Arc::from(id.as_str()), &id, fields, 1);
                    self.admit(entry);
                }
            }
        }
        self.reader = None;
        drop(delayed); // their due times are in delayed_due
        self.finish(events).await;
    }

    fn read(&self, mut conn: MultiplexedConnection, count: usize) -> ReadFuture {
        let s = &self.shared;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&s.group)
            .arg(&s.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(s.config.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&s.stream)
            .arg(">");
        async move { cmd.query_async(&mut conn).await }.boxed()
    }

    fn admit(&mut self, entry: Entry) {
        // False when already held (a scan raced with a read).
        let _ = self.handoff.admit(entry);
    }

    /// Applies `event`; returns an entry to hand out again after a delay.
    fn on_event(&mut self, event: Event) -> Option<(Entry, Duration)> {
        match event {
            Event::Settled { id, key } => self.handoff.settle(&id, key.as_ref()),
            Event::Again(entry) => {
                // Behind what is ready: its key's successors wait for it anyway, and other
                // messages are not starved by one nacked over and over.
                self.handoff.settled(&entry.id);
                self.handoff.push(entry);
            }
            Event::Later(entry, delay) => {
                self.handoff.settled(&entry.id);
                self.delayed_due
                    .insert(entry.id.clone(), Instant::now() + delay);
                return Some((entry, delay));
            }
            Event::Claimed(entries) => {
                for entry in entries {
                    if !self.handoff.settled_in_scan(&entry.id) {
                        self.admit(entry);
                    }
                }
            }
            Event::ScanDone => {
                self.scanning = false;
                self.handoff.scan_ended();
            }
        }
        None
    }

    fn spawn_take_again(&self, mut entry: Entry) {
        let (shared, events) = (self.shared.clone(), self.events_tx.clone());
        tokio::spawn(async move {
            let event = match shared.take_again(&entry).await {
                Ok(true) => {
                    entry.attempt = entry.attempt.saturating_add(1);
                    Event::Again(entry)
                }
                Ok(false) => Event::Settled {
                    key: entry.key(),
                    id: entry.id,
                },
                Err(err) => {
                    tracing::warn!(broker = BROKER, error = %err, "redelivery failed; trying again");
                    Event::Later(entry, shared.config.claim_interval)
                }
            };
            if let Err(mpsc::error::SendError(event)) = events.send(event) {
                give_back_event(&shared, event).await;
            }
        });
    }

    fn spawn_scan(&mut self) {
        let room = self
            .shared
            .config
            .prefetch
            .saturating_sub(self.handoff.held_len());
        if self.scanning || room == 0 {
            return;
        }
        self.scanning = true;
        self.handoff.scan_started();
        let own = std::mem::take(&mut self.recover_own);
        let held: Vec<Arc<str>> = if own {
            self.handoff.held_ids()
        } else {
            Vec::new()
        };
        let (shared, events) = (self.shared.clone(), self.events_tx.clone());
        tokio::spawn(async move {
            let mut taken = shared.scan(room, own, held).await;
            if own && taken.len() < room {
                taken.extend(shared.scan(room - taken.len(), false, Vec::new()).await);
            }
            if !taken.is_empty() {
                if let Err(mpsc::error::SendError(event)) = events.send(Event::Claimed(taken)) {
                    give_back_event(&shared, event).await;
                }
            }
            let _ = events.send(Event::ScanDone);
        });
    }

    fn spawn_heartbeat(&self) {
        let ids = self.handoff.held_ids();
        if ids.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            for chunk in ids.chunks(1000) {
                if let Err(e) = shared.query(&shared.xclaim(chunk, None, true)).await {
                    tracing::debug!(broker = BROKER, error = %conn::strip(&e, &shared.config), "keeping held entries fresh failed");
                }
            }
        });
    }

    /// Gives back what was not handed out; deletes a private group.
    async fn finish(mut self, mut events: mpsc::UnboundedReceiver<Event>) {
        events.close();
        while let Ok(event) = events.try_recv() {
            // A delayed one lands in delayed_due.
            let _ = self.on_event(event);
        }
        // From here on a delivery still out gives its entry back itself when settled.
        let (ready, handed) = self.handoff.end();
        let shared = self.shared.clone();
        if shared.private {
            let mut cmd = redis::cmd("XGROUP");
            cmd.arg("DESTROY").arg(&shared.stream).arg(&shared.group);
            let destroyed =
                tokio::time::timeout(shared.config.command_timeout, shared.query(&cmd)).await;
            if !matches!(destroyed, Ok(Ok(_))) {
                tracing::warn!(broker = BROKER, topic = %shared.topic, "could not delete private consumer group `{}`", shared.group);
            }
            return;
        }
        let mut now: Vec<Arc<str>> = Vec::new();
        let mut later: Vec<(Arc<str>, Duration)> = Vec::new();
        now.extend(ready.into_iter().map(|e| e.id));
        let now_at = Instant::now();
        for (id, due) in self.delayed_due.drain() {
            later.push((id, due.saturating_duration_since(now_at)));
        }
        // Entries a read in flight took for this consumer, which never arrived here.
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(&shared.stream)
            .arg(&shared.group)
            .arg("-")
            .arg("+")
            .arg(10_000)
            .arg(&shared.consumer);
        if let Ok(Ok(reply)) =
            tokio::time::timeout(shared.config.command_timeout, shared.query(&cmd)).await
        {
            let known: HashSet<Arc<str>> = now
                .iter()
                .cloned()
                .chain(later.iter().map(|(i, _)| i.clone()))
                .collect();
            for (id, ..) in conn::pending_reply(reply) {
                let id: Arc<str> = Arc::from(id.as_str());
                if !handed.contains(&id) && !known.contains(&id) {
                    now.push(id);
                }
            }
        }
        // Delayed entries go back when their delay is over (detached: a delay may be long).
        for (id, after) in later {
            let shared = shared.clone();
            tokio::spawn(async move {
                let after = after.max(Duration::from_millis(1));
                shared.give_back(std::slice::from_ref(&id), after).await;
            });
        }
        let give_back = shared.give_back(&now, Duration::ZERO);
        if tokio::time::timeout(shared.config.command_timeout, give_back)
            .await
            .is_err()
        {
            tracing::warn!(broker = BROKER, topic = %shared.topic, "giving entries back timed out; the group takes them over after claim_idle");
        }
    }
}

/// A connection for blocking reads, and its client id.
async fn open_reader(
    client: &Client,
    config: &RedisConfig,
) -> Result<(MultiplexedConnection, Option<i64>)> {
    let mut conn = conn::reading(client, config).await?;
    let id: Option<i64> = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await
        .ok();
    Ok((conn, id))
}

/// Gives back the entry carried by an event nobody will receive.
async fn give_back_event(shared: &Shared, event: Event) {
    match event {
        Event::Again(entry) => shared.give_back(&[entry.id], Duration::ZERO).await,
        Event::Later(entry, delay) => shared.give_back(&[entry.id], delay).await,
        Event::Claimed(entries) => {
            let ids: Vec<Arc<str>> = entries.into_iter().map(|e| e.id).collect();
            shared.give_back(&ids, Duration::ZERO).await;
        }
        Event::Settled { .. } | Event::ScanDone => {}
    }
}

/// Most ids one `XACK` carries.
const MAX_ACK_IDS: usize = 1000;

/// The acks of one subscription on their way to the server. One `XACK` is out at a time;
/// acks arriving meanwhile wait and go together in the next one (a batch handler settles
/// hundreds at once), so a burst of acks costs a few round trips, not one each.
///
/// - The ack that finds no `XACK` out sends it, inline, after letting the tasks ready to
///   run go first (so the acks of a batch, settled together, join it): its own id and those
///   that queued meanwhile. A sequential handler's ack costs what it did before: one
///   `XACK`, no task.
/// - When that `XACK` is answered, or its future is dropped, the acks that queued meanwhile
///   are handed to a task that sends them (up to [`MAX_ACK_IDS`] per `XACK`) until none is
///   left; whoever holds the turn is a [`Sending`], whose drop passes it on.
/// - Each ack resolves once the `XACK` carrying its id was answered, with that answer. Only
///   ids whose deliveries were acked go in; nacks never pass through here.
#[derive(Default)]
struct Acks {
    state: std::sync::Mutex<AckState>,
}

#[derive(Default)]
struct AckState {
    /// An `XACK` is out (then the one sending it, or the task, sends what waits next).
    sending: bool,
    /// Acked ids waiting for the next `XACK`, each with the ack waiting for its answer.
    /// Not empty only while `sending`.
    waiting: Vec<(Arc<str>, AckReply)>,
}

/// Where the answer to the `XACK` carrying a waiting ack goes.
type AckReply = oneshot::Sender<Result<(), RedisError>>;

/// The `XACK` that was to carry an ack was dropped unsent (its task was cancelled).
struct Abandoned;

impl Acks {
    fn lock(&self) -> std::sync::MutexGuard<'_, AckState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Acknowledges `id`: the server's answer to the `XACK` that carried it.
    async fn ack(shared: &Arc<Shared>, id: Arc<str>) -> Result<Result<(), RedisError>, Abandoned> {
        let waiting = {
            let mut state = shared.acks.lock();
            if state.sending {
                let (tx, rx) = oneshot::channel();
                state.waiting.push((id.clone(), tx));
                Some(rx)
            } else {
                state.sending = true;
                None
            }
        };
        match waiting {
            Some(rx) => rx.await.map_err(|_| Abandoned),
            None => {
                let turn = Sending {
                    shared: shared.clone(),
                    done: false,
                };
                // Let the tasks ready to run go first: acks settled together (a batch's)
                // then join this one.
                tokio::task::yield_now().await;
                let joined: Vec<_> = {
                    let mut state = shared.acks.lock();
                    let n = state.waiting.len().min(MAX_ACK_IDS - 1);
                    state.waiting.drain(..n).collect()
                };
                let mut ids = Vec::with_capacity(joined.len() + 1);
                ids.push(id);
                let replies: Vec<AckReply> = joined
                    .into_iter()
                    .map(|(id, reply)| {
                        ids.push(id);
                        reply
                    })
                    .collect();
                let result = shared.xack(&ids).await;
                for reply in replies {
                    let _ = reply.send(result.clone());
                }
                drop(turn);
                Ok(result)
            }
        }
    }

    /// Sends the waiting acks, one `XACK` after the other, until none is left.
    async fn send_waiting(mut turn: Sending) {
        let shared = turn.shared.clone();
        loop {
            let batch: Vec<_> = {
                let mut state = shared.acks.lock();
                if state.waiting.is_empty() {
                    state.sending = false;
                    turn.done = true;
                    return;
                }
                let n = state.waiting.len().min(MAX_ACK_IDS);
                state.waiting.drain(..n).collect()
            };
            let (ids, replies): (Vec<Arc<str>>, Vec<_>) = batch.into_iter().unzip();
            tracing::trace!(broker = BROKER, topic = %shared.topic, group = %shared.group, count = ids.len(), "acking entries in one XACK");
            let result = shared.xack(&ids).await;
            for reply in replies {
                // An ack no longer waiting (its future was dropped) needs no answer.
                let _ = reply.send(result.clone());
            }
        }
    }
}

/// The turn to send `XACK`s. Dropped (its `XACK` answered, or its future given up), it
/// passes the turn on: to a task sending what waits, or to nobody when nothing does.
struct Sending {
    shared: Arc<Shared>,
    /// The turn was given up already (nothing waited).
    done: bool,
}

impl Drop for Sending {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut state = self.shared.acks.lock();
        if state.waiting.is_empty() {
            state.sending = false;
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                drop(state);
                let turn = Sending {
                    shared: self.shared.clone(),
                    done: false,
                };
                runtime.spawn(Acks::send_waiting(turn));
            }
            Err(_) => {
                // No runtime to send them from: the waiting acks fail (their entries stay
                // pending; the group takes them over after claim_idle).
                state.sending = false;
                let abandoned = std::mem::take(&mut state.waiting);
                drop(state);
                tracing::warn!(
                    broker = BROKER,
                    topic = %self.shared.topic,
                    "{} acks could not be sent outside a tokio runtime",
                    abandoned.len()
                );
            }
        }
    }
}

/// Settles one delivery.
struct RedisAcker {
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Event>,
    entry: Entry,
}

impl RedisAcker {
    /// The subscription's state, and a guard holding the entry until it is settled.
    fn settling(self, nack: bool) -> (Arc<Shared>, Settling) {
        let RedisAcker {
            shared,
            events,
            entry,
        } = self;
        let guard = Settling {
            shared: shared.clone(),
            events,
            entry: Some(entry),
            nack,
        };
        (shared, guard)
    }
}

impl Acknowledger for RedisAcker {
    fn ack(self: Box<Self>) -> AckFuture {
        let (shared, guard) = (*self).settling(false);
        AckFuture::boxed(async move {
            let mut guard = guard;
            let result = Acks::ack(&shared, guard.entry().id.clone()).await;
            let entry = guard.done();
            // Settled here, not through the task: no wake-up of it per message.
            shared.handoff.settle(&entry.id, entry.key.as_ref());
            let context = || {
                format!(
                    "ack entry {} (XACK on stream `{}`, group `{}`)",
                    entry.id, shared.stream, shared.group
                )
            };
            match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) if shared.private && conn::is_nogroup(&e) => Ok(()),
                Ok(Err(e)) => Err(shared.error(e, &context())),
                Err(Abandoned) => Err(Error::transient(
                    BROKER,
                    shared.topic.clone(),
                    context(),
                    "the XACK that was to carry it was abandoned (the runtime is shutting \
                     down); the entry stays pending and the group takes it over after \
                     claim_idle",
                )),
            }
        })
    }

    fn nack(self: Box<Self>, delay: Option<Duration>) -> AckFuture {
        let (shared, guard) = (*self).settling(true);
        AckFuture::boxed(async move {
            let mut guard = guard;
            if let Some(delay) = delay.filter(|d| !d.is_zero()) {
                let entry = guard.done();
                if let Err(mpsc::error::SendError(event)) =
                    guard.events.send(Event::Later(entry, delay))
                {
                    spawn_give_back(shared, event);
                }
                return Ok(());
            }
            if guard.events.is_closed() {
                let entry = guard.done();
                spawn_give_back(shared, Event::Again(entry));
                return Ok(());
            }
            // On failure the guard hands the entry to the subscription to try again; the
            // caller hears of the failure.
            let claimed = shared.take_again(guard.entry()).await?;
            let mut entry = guard.done();
            if !claimed {
                shared.handoff.settle(&entry.id, entry.key.as_ref());
                return Ok(());
            }
            entry.attempt = entry.attempt.saturating_add(1);
            if let Err(mpsc::error::SendError(event)) = guard.events.send(Event::Again(entry)) {
                spawn_give_back(shared, event);
            }
            Ok(())
        })
    }
}

/// An entry whose ack or nack is under way. When the future doing it is dropped before it
/// finished, the entry is not stranded: after an ack the subscription lets go of it (it is
/// still pending in Redis unless the `XACK` got through, so the group takes it over after
/// `claim_idle`), after a nack it is handed out again after `claim_interval`.
struct Settling {
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Event>,
    entry: Option<Entry>,
    nack: bool,
}

impl Settling {
    fn entry(&self) -> &Entry {
        self.entry.as_ref().expect("present until done")
    }

    fn done(&mut self) -> Entry {
        self.entry.take().expect("done once")
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        let Some(entry) = self.entry.take() else {
            return;
        };
        if self.nack {
            let event = Event::Later(entry, self.shared.config.claim_interval);
            if let Err(mpsc::error::SendError(event)) = self.events.send(event) {
                spawn_give_back(self.shared.clone(), event);
            }
        } else {
            self.shared.handoff.settle(&entry.id, entry.key.as_ref());
        }
    }
}

/// Gives back the entry an event carries, in a task of its own (a delayed one may wait).
fn spawn_give_back(shared: Arc<Shared>, event: Event) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move { give_back_event(&shared, event).await });
        }
        Err(_) => tracing::warn!(
            broker = BROKER,
            topic = %shared.topic,
            "an entry was settled outside a tokio runtime; the group takes it over after \
             claim_idle"
        ),
    }
}
