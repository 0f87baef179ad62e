//! [`RedisSubscriber`]: consumer groups on the topic's stream.
//!
//! Each subscription is a consumer of its group (a private group when it has none). A task
//! per subscription reads new entries (`XREADGROUP … >`, on a connection of its own since
//! the read blocks), hands them out one per key at a time, keeps the entries it holds from
//! going idle, takes over entries other consumers left (`XAUTOCLAIM`), and when it ends
//! gives back what it did not hand out so another consumer takes it at once.
//!
//! Acks go through the subscription's ack writer, one `XACK` at a time: `ack()` books the
//! id with it and returns, and each `XACK` carries every id booked while the previous one
//! was out (a sequential handler's acks share one instead of paying a round trip each). A
//! booked entry stays held (counted against `prefetch`, kept fresh, not taken over again)
//! until its `XACK` is answered; its key's next entry goes out as soon as it is booked.

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
/// - An ack is `XACK`, written by the subscription's ack writer: `ack()` books it and
///   returns, and acks booked while one `XACK` is out go together in the next (one `XACK`
///   with many ids). A failed `XACK` is logged at `warn` level (topic, group, how many
///   ids); those entries stay pending and are taken over like any unacked entry.
///   [`Subscriber::close`] waits, up to `command_timeout`, for the acks booked before it
///   (a subscription whose stream is dropped writes them before giving entries back). A
///   nack hands the message out again at once (after its delay), with the server's delivery
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
    /// The ack writers of the subscriptions, for [`Subscriber::close`] to wait for the acks
    /// booked with them.
    writers: std::sync::Mutex<Vec<Writer>>,
}

/// A subscription's ack writer, as [`Subscriber::close`] reaches it.
struct Writer {
    /// Its channel, while deliveries (or the subscription) can still book acks.
    tx: mpsc::WeakUnboundedSender<AckCommand>,
    /// Cancelled when the writer has ended (everything sent to it written).
    ended: CancellationToken,
}

impl Writer {
    /// Resolves once what was booked with the writer so far is written (or failed and was
    /// logged).
    async fn written(self) {
        if let Some(tx) = self.tx.upgrade() {
            let (done, rx) = oneshot::channel();
            if tx.send(AckCommand::Flush(done)).is_ok() {
                drop(tx);
                let _ = rx.await;
                return;
            }
        }
        // Nobody can book more: the writer ends once it wrote what it holds.
        self.ended.cancelled().await;
    }
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
                writers: std::sync::Mutex::default(),
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
        });
        if !private {
            shared.expire_consumers().await;
        }
        let (acks, acks_rx) = mpsc::unbounded_channel();
        let ended = CancellationToken::new();
        {
            let mut writers = inner
                .writers
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            writers.retain(|w| !w.ended.is_cancelled());
            writers.push(Writer {
                tx: acks.downgrade(),
                ended: ended.clone(),
            });
        }
        let writer = write_acks(shared.clone(), acks_rx);
        tokio::spawn(async move {
            let _ended = ended.drop_guard();
            writer.await;
        });
        let shared_for_stream = shared.clone();
        let (events_tx, events) = mpsc::unbounded_channel();
        let events_for_stream = events_tx.clone();
        let pump = Pump {
            shared,
            client: inner.client.clone(),
            reader: Some(reader),
            reader_id,
            events_tx,
            acks: acks.clone(),
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
            acks,
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

    /// Ends every subscription: each writes the acks booked so far, then gives back the
    /// entries it read but did not hand out (another consumer of the group takes them at
    /// once); private groups are deleted. Then waits, up to `command_timeout`, for the acks
    /// booked since; what could not be written is logged, and those entries stay pending
    /// (the group takes them over after `claim_idle`). Deliveries already handed out can
    /// still be settled.
    async fn close(&self) -> Result<()> {
        let inner = &self.inner;
        inner.closed.cancel();
        inner.tasks.close();
        // What a subscription's end may take: waking its read, the read, writing its
        // booked acks, the sweep and the give-back.
        let bound = inner.config.block + inner.config.command_timeout * 5;
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
        let writers: Vec<Writer> = inner
            .writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .drain(..)
            .collect();
        let all = futures::future::join_all(writers.into_iter().map(Writer::written));
        if tokio::time::timeout(inner.config.command_timeout, all)
            .await
            .is_err()
        {
            tracing::warn!(
                broker = BROKER,
                server = %inner.config.address(),
                timeout = ?inner.config.command_timeout,
                "closing with acknowledgements not yet written; those entries stay pending \
                 and the group takes them over after claim_idle"
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
    /// Handed out and not settled yet (an acked one until its `XACK` is answered).
    handed: HashSet<Arc<str>>,
    /// Every entry held: ready, waiting, handed out (acked ones until their `XACK` is
    /// answered), delayed.
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

    /// The entry is done with (gone): the next of its key may go. Wakes the task when it
    /// may read more.
    fn settle(&self, id: &Arc<str>, key: Option<&Bytes>) {
        let mut queue = self.lock();
        if let Some(key) = key.filter(|_| queue.held.contains(id)) {
            queue.release(key);
        }
        let wake = queue.forget(std::slice::from_ref(id));
        drop(queue);
        if wake {
            self.notify.notify_one();
        }
    }

    /// The ack of `id` was booked: the next entry of its key may go. The entry stays held
    /// (and out) until its `XACK` is answered ([`Handoff::written`]).
    fn booked(&self, id: &Arc<str>, key: Option<&Bytes>) {
        let Some(key) = key else { return };
        let mut queue = self.lock();
        if queue.held.contains(id) {
            queue.release(key);
        }
    }

    /// The `XACK` carrying `ids` was answered (or given up): they are no longer held.
    /// Wakes the task when it may read more.
    fn written(&self, ids: &[Arc<str>]) {
        let wake = self.lock().forget(ids);
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
    /// The entry of `key` that was out is done with: its next one goes out.
    fn release(&mut self, key: &Bytes) {
        if let Some(successors) = self.waiting.get_mut(key) {
            match successors.pop_front() {
                Some(next) => self.push(next),
                None => {
                    self.waiting.remove(key);
                }
            }
        }
    }

    /// `ids` are no longer held (noted for a running take-over scan); true when few enough
    /// are held now for the task to read more.
    fn forget(&mut self, ids: &[Arc<str>]) -> bool {
        let before = self.held.len();
        for id in ids {
            self.handed.remove(id);
            if let Some(settled) = &mut self.settled_in_scan {
                settled.insert(id.clone());
            }
            self.held.remove(id);
        }
        before > self.low_water && self.held.len() <= self.low_water
    }

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
    /// The subscription's ack writer.
    acks: mpsc::UnboundedSender<AckCommand>,
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
                acks: self.acks.clone(),
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
    /// The subscription's ack writer, to write what is booked before the task ends.
    acks: mpsc::UnboundedSender<AckCommand>,
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
        if !shared.private {
            // The acks booked so far first (an entry booked and not written yet is still
            // pending, and counted as out, so it is not given back).
            let (tx, rx) = oneshot::channel();
            if self.acks.send(AckCommand::Flush(tx)).is_ok()
                && tokio::time::timeout(shared.config.command_timeout, rx)
                    .await
                    .is_err()
            {
                tracing::warn!(broker = BROKER, topic = %shared.topic, group = %shared.group, "acknowledgements not written within command_timeout as the subscription ends; they are still being written");
            }
        }
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

/// What a subscription's ack writer receives.
enum AckCommand {
    /// A booked ack of the entry with this id.
    Ack(Arc<str>),
    /// Answered once everything sent before it was written (or failed and was logged).
    Flush(oneshot::Sender<()>),
}

/// The ack writer of one subscription: writes booked acks one `XACK` at a time, each taking
/// every ack booked while the previous one was out (up to [`MAX_ACK_IDS`]), so a burst of
/// acks (a batch handler's) or a sequential handler's stream of them costs a few round
/// trips, not one each. After each `XACK` its entries are no longer held. A failed `XACK`
/// (after the retries of `command_timeout`) is logged; its entries stay pending in the
/// group and are taken over after `claim_idle`, as any unacked entry. Ends once the
/// subscription's task and every delivery are gone and everything sent was written.
async fn write_acks(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<AckCommand>) {
    let mut ids: Vec<Arc<str>> = Vec::new();
    let mut flushes = Vec::new();
    while let Some(first) = rx.recv().await {
        // Let the tasks ready to run go first: acks settled together (a batch's) join.
        tokio::task::yield_now().await;
        let mut next = Some(first);
        while let Some(command) = next {
            match command {
                AckCommand::Ack(id) => ids.push(id),
                AckCommand::Flush(done) => flushes.push(done),
            }
            next = if ids.len() < MAX_ACK_IDS {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !ids.is_empty() {
            tracing::trace!(broker = BROKER, topic = %shared.topic, group = %shared.group, count = ids.len(), "acking entries in one XACK");
            match shared.xack(&ids).await {
                Ok(()) => {}
                // The private group was deleted as its subscription ended: nothing to ack.
                Err(e) if shared.private && conn::is_nogroup(&e) => {}
                Err(e) => tracing::warn!(
                    broker = BROKER,
                    topic = %shared.topic,
                    group = %shared.group,
                    stream = %shared.stream,
                    count = ids.len(),
                    error = %conn::strip(&e, &shared.config),
                    "XACK failed: those acks are lost and the entries stay pending; the \
                     group takes them over after claim_idle and delivers them again"
                ),
            }
            shared.handoff.written(&ids);
            ids.clear();
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Settles one delivery.
struct RedisAcker {
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Event>,
    /// The subscription's ack writer.
    acks: mpsc::UnboundedSender<AckCommand>,
    entry: Entry,
}

impl Acknowledger for RedisAcker {
    /// Books the ack with the subscription's ack writer and returns: the writer sends it in
    /// the next `XACK` (with the acks booked meanwhile). The entry's key's next entry may
    /// go out at once; the entry itself stays held until the `XACK` is answered. A failed
    /// `XACK` is logged at `warn` level and the entry is delivered again (taken over after
    /// `claim_idle`); [`Subscriber::close`] waits for booked acks. Fails at once only when
    /// the writer has ended (its runtime shut down).
    fn ack(self: Box<Self>) -> AckFuture {
        let RedisAcker {
            shared,
            acks,
            entry,
            ..
        } = *self;
        shared.handoff.booked(&entry.id, entry.key.as_ref());
        match acks.send(AckCommand::Ack(entry.id)) {
            Ok(()) => AckFuture::ready(Ok(())),
            Err(mpsc::error::SendError(command)) => {
                let id = match command {
                    AckCommand::Ack(id) => id,
                    AckCommand::Flush(_) => unreachable!("an ack was sent"),
                };
                shared.handoff.written(std::slice::from_ref(&id));
                AckFuture::ready(Err(Error::transient(
                    BROKER,
                    shared.topic.clone(),
                    format!(
                        "ack entry {id} (XACK on stream `{}`, group `{}`)",
                        shared.stream, shared.group
                    ),
                    "the subscription's ack writer has ended (its runtime shut down); the \
                     entry stays pending and the group takes it over after claim_idle",
                )))
            }
        }
    }

    fn nack(self: Box<Self>, delay: Option<Duration>) -> AckFuture {
        let RedisAcker {
            shared,
            events,
            entry,
            ..
        } = *self;
        let guard = Settling {
            shared: shared.clone(),
            events,
            entry: Some(entry),
        };
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

/// An entry whose nack is under way. When the future doing it is dropped before it
/// finished, the entry is not stranded: it is handed out again after `claim_interval`.
struct Settling {
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Event>,
    entry: Option<Entry>,
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
        let event = Event::Later(entry, self.shared.config.claim_interval);
        if let Err(mpsc::error::SendError(event)) = self.events.send(event) {
            spawn_give_back(self.shared.clone(), event);
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
