//! One subscription: a librdkafka consumer driven by a thread of its own, and the stream
//! that hands its messages out.
//!
//! The thread polls the consumer's event queue (rebalances, errors, commit results) and,
//! for each assigned partition, that partition's own message queue (librdkafka's
//! `split_partition_queue`), but only while the partition has room in the subscription's
//! buffer: a slow or blocked partition stops being read without pausing the others and
//! without librdkafka throwing away what it prefetched. The thread sleeps until librdkafka
//! signals a non-empty queue, an acknowledgement makes room, or a commit is due.
//!
//! Positions are resolved before a partition is assigned: the group's committed offset,
//! else the start position (`start_from`), which is then committed for the group at once
//! so that every later member continues from it. That makes `subscribe` effective when it
//! returns.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use parking_lot::{Condvar, Mutex};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use tidemill_core::{AckFuture, Acknowledger, Delivery, Error, Result};
use tokio::sync::oneshot;

use crate::client::{
    broker_error, broker_error_hiding, creation_error, log_error, log_line, Link, Statistics,
    Topics,
};
use crate::config::Secrets;
use crate::convert::{self, Identity};
use crate::record::{Arena, KafkaRecord};
use crate::state::{Ref, State, Wake};
use crate::{KafkaConfig, StartFrom, BROKER};

/// How long the poll thread sleeps when nothing signals it (housekeeping, partition
/// discovery, librdkafka events that arrived without a wake-up).
const TICK: Duration = Duration::from_millis(100);
/// The same while messages are flowing (something was received within [`ACTIVE`]). The
/// thread does not rely on librdkafka's queue wake-ups alone while busy: with only
/// [`TICK`], the bench against Tansu consumed about a fifth slower than raw rdkafka (the
/// thread evidently slept through fetches that arrived without a wake-up); with this it
/// keeps up.
const BUSY_TICK: Duration = Duration::from_millis(2);
/// How long after the last received message the poll thread keeps [`BUSY_TICK`].
const ACTIVE: Duration = Duration::from_secs(1);
/// Messages taken from one partition queue per round, so partitions take turns.
const BATCH: usize = 512;
/// Main-queue events (rebalances, commit results, log lines, errors) handled per round.
const MAIN_QUEUE_BATCH: usize = 1024;
/// Deliveries the stream takes from the shared state per lock.
const STREAM_BATCH: usize = 64;
/// How often a subscription without a group looks for partitions added to its topic.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(30);

/// Wakes the poll thread.
pub(crate) struct Wakeup {
    flag: Mutex<bool>,
    cv: Condvar,
}

impl Wakeup {
    fn new() -> Self {
        Wakeup {
            flag: Mutex::new(false),
            cv: Condvar::new(),
        }
    }

    pub(crate) fn notify(&self) {
        *self.flag.lock() = true;
        self.cv.notify_one();
    }

    fn wait(&self, timeout: Duration) {
        let mut flag = self.flag.lock();
        if !*flag {
            self.cv.wait_for(&mut flag, timeout);
        }
        *flag = false;
    }
}

/// What the poll thread, the stream, the acknowledgers and the subscriber share.
pub(crate) struct Shared {
    pub(crate) topic: String,
    pub(crate) group: Option<String>,
    /// The topic, shared by the records received.
    topic_arc: Arc<str>,
    /// Secret values of the configuration, hidden from logs.
    secrets: Arc<Secrets>,
    state: Mutex<State>,
    /// Counts revocations; changed while the state is locked. The stream checks what it
    /// holds (taken from the state, not handed out yet) against the state when this moved.
    revocations: AtomicU64,
    stop: AtomicBool,
    poller: Wakeup,
    /// The consumer's connection, as librdkafka reports it.
    pub(crate) link: Link,
    /// This subscription's share of the consumer lag gauge (when metrics are recorded).
    lag: Option<Lag>,
}

/// A subscription's share of `tidemill_consumer_lag_messages{topic, group}`: the sum,
/// over its assigned partitions, of the high watermark minus the partition's commit point
/// (every offset below it acked). Set from each librdkafka statistics report; added to
/// what other subscriptions of the same topic and group in the process report, and taken
/// back when the subscription ends.
struct Lag {
    gauge: metrics::Gauge,
    /// What this subscription added to the gauge; `None` once it ended.
    reported: Mutex<Option<f64>>,
}

impl Lag {
    /// The handle, taken on the caller's thread (a thread-local recorder counts too), or
    /// `None` when no recorder is installed.
    fn new(topic: &str, group: Option<&str>) -> Option<Lag> {
        tidemill_core::router::metrics_enabled().then(|| Lag {
            gauge: metrics::gauge!(
                tidemill_core::router::metric_names::CONSUMER_LAG,
                "topic" => topic.to_owned(),
                "group" => group.unwrap_or_default().to_owned(),
            ),
            reported: Mutex::new(Some(0.0)),
        })
    }

    fn set(&self, lag: f64) {
        let mut reported = self.reported.lock();
        if let Some(before) = *reported {
            if lag != before {
                self.gauge.increment(lag - before);
                *reported = Some(lag);
            }
        }
    }

    /// The subscription ended: takes its share back, for good.
    fn end(&self) {
        self.set(0.0);
        *self.reported.lock() = None;
    }
}

impl Shared {
    fn new(topic: &str, group: Option<&str>, config: &KafkaConfig) -> Self {
        Shared {
            topic: topic.to_owned(),
            group: group.map(str::to_owned),
            topic_arc: Arc::from(topic),
            secrets: config.secrets(),
            state: Mutex::new(State::new(
                config.ordering,
                config.max_buffered_per_partition,
                config.commit_every,
                Identity::new(config),
            )),
            revocations: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            poller: Wakeup::new(),
            link: Link::default(),
            lag: if config.statistics_interval.is_zero() {
                None
            } else {
                Lag::new(topic, group)
            },
        }
    }

    /// Takes note of a librdkafka statistics report: the connection state, and the lag
    /// of the assigned partitions.
    fn statistics(&self, json: &[u8]) {
        let Some(stats) = Statistics::parse(json) else {
            return;
        };
        self.link.statistics(&stats);
        if let Some(lag) = &self.lag {
            let high = stats.high_watermarks(&self.topic);
            let points = self.state.lock().commit_points();
            let total: i64 = points
                .into_iter()
                .filter_map(|(p, point)| high.get(&p).map(|h| (h - point).max(0)))
                .sum();
            lag.set(total as f64);
        }
    }

    /// Ends the subscription now (subscriber closed): the stream ends, the thread commits
    /// what was acked and leaves.
    pub(crate) fn stop(&self) {
        self.stop.store(true, AtomicOrdering::Release);
        let waker = self.state.lock().stream_waker.take();
        if let Some(w) = waker {
            w.wake();
        }
        self.poller.notify();
    }

    fn stopped(&self) -> bool {
        self.stop.load(AtomicOrdering::Acquire)
    }

    fn settle(&self, f: impl FnOnce(&mut State) -> Wake) {
        let (wake, waker) = {
            let mut s = self.state.lock();
            let wake = f(&mut s);
            let waker = if wake.stream {
                s.stream_waker.take()
            } else {
                None
            };
            (wake, waker)
        };
        if let Some(w) = waker {
            w.wake();
        }
        if wake.poller {
            self.poller.notify();
        }
    }

    fn report(&self, error: Error) {
        let waker = {
            let mut s = self.state.lock();
            s.report(error);
            s.stream_waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Settles one delivery in the subscription's state. Settling is local and immediate; the
/// offsets of acked messages are committed by the poll thread.
struct KafkaAcker {
    shared: Arc<Shared>,
    at: Ref,
}

impl Acknowledger for KafkaAcker {
    fn ack(self: Box<Self>) -> AckFuture {
        let at = self.at;
        self.shared.settle(|s| s.ack(at));
        AckFuture::ready(Ok(()))
    }

    fn nack(self: Box<Self>, delay: Option<Duration>) -> AckFuture {
        let at = self.at;
        self.shared.settle(|s| s.nack(at, delay, Instant::now()));
        AckFuture::ready(Ok(()))
    }
}

/// The stream of a subscription. Dropping it lets the thread finish once the deliveries
/// still out are settled (bounded by `drain_timeout`).
pub(crate) struct SubscriptionStream {
    shared: Arc<Shared>,
    /// Taken from the state, not handed out yet.
    buffer: VecDeque<(Ref, Delivery)>,
    /// [`Shared::revocations`] when `buffer` was last checked against the state.
    revocations: u64,
    sleep: Pin<Box<tokio::time::Sleep>>,
    taken: Vec<(Ref, tidemill_core::Message, u32)>,
}

impl SubscriptionStream {
    fn new(shared: Arc<Shared>) -> Self {
        SubscriptionStream {
            shared,
            buffer: VecDeque::new(),
            revocations: 0,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            taken: Vec::new(),
        }
    }
}

impl Stream for SubscriptionStream {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.shared.stopped() {
                // Closed: what was taken but not handed out goes back (nacked).
                this.buffer.clear();
                return Poll::Ready(None);
            }
            if !this.buffer.is_empty()
                && this.shared.revocations.load(AtomicOrdering::Acquire) != this.revocations
            {
                // Partitions were revoked since these were taken: what belongs to them is
                // no longer this consumer's to hand out (their new owner reads them again;
                // handing them out here would only make duplicates). Dropped, they settle
                // as nacks, which a revoked partition ignores.
                let mut stale = Vec::new();
                {
                    let s = this.shared.state.lock();
                    this.revocations = this.shared.revocations.load(AtomicOrdering::Acquire);
                    let (out, revoked): (VecDeque<_>, VecDeque<_>) =
                        std::mem::take(&mut this.buffer)
                            .into_iter()
                            .partition(|entry: &(Ref, Delivery)| s.is_out(entry.0));
                    this.buffer = out;
                    stale.extend(revoked);
                }
                // Dropped without the lock: a dropped delivery settles (as a nack).
                drop(stale);
            }
            if let Some((_, d)) = this.buffer.pop_front() {
                return Poll::Ready(Some(Ok(d)));
            }
            let (error, deadline, ended) = {
                let mut s = this.shared.state.lock();
                this.revocations = this.shared.revocations.load(AtomicOrdering::Acquire);
                if s.ended {
                    (None, None, true)
                } else if let Some(e) = s.take_error() {
                    (Some(e), None, false)
                } else {
                    s.take(STREAM_BATCH, Instant::now(), &mut this.taken);
                    if this.taken.is_empty() {
                        match &s.stream_waker {
                            Some(w) if w.will_wake(cx.waker()) => {}
                            _ => s.stream_waker = Some(cx.waker().clone()),
                        }
                    }
                    (None, s.next_deadline(), false)
                }
            };
            if ended {
                return Poll::Ready(None);
            }
            if let Some(e) = error {
                return Poll::Ready(Some(Err(e)));
            }
            if !this.taken.is_empty() {
                for (at, message, attempt) in this.taken.drain(..) {
                    let acker = KafkaAcker {
                        shared: this.shared.clone(),
                        at,
                    };
                    this.buffer.push_back((
                        at,
                        Delivery::new(message, acker).with_process_attempt(attempt),
                    ));
                }
                continue;
            }
            if let Some(at) = deadline {
                this.sleep
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(at));
                if this.sleep.as_mut().poll(cx).is_ready() {
                    continue;
                }
            }
            return Poll::Pending;
        }
    }
}

impl Drop for SubscriptionStream {
    fn drop(&mut self) {
        // Deliveries taken but not handed out go back (nacked) first.
        self.buffer.clear();
        self.shared.state.lock().draining = true;
        self.shared.poller.notify();
    }
}

/// The consumer's callbacks: rebalances, commit results, logs.
pub(crate) struct SubContext {
    shared: Arc<Shared>,
    start_from: StartFrom,
    request_timeout: Duration,
    consumer: OnceLock<Weak<BaseConsumer<SubContext>>>,
    queues: Mutex<BTreeMap<i32, PartitionQueue<SubContext>>>,
    ready: Mutex<Option<oneshot::Sender<Result<()>>>>,
    /// Events of the main queue handled by a callback (log lines, rebalances, commit
    /// results). rdkafka's `poll` answers `None` both for an empty queue and for an event
    /// it handled through a callback; this count tells the two apart, so the poll thread
    /// drains every queued event at once instead of one per sleep.
    consumed: AtomicU64,
}

impl SubContext {
    fn consumed(&self) -> u64 {
        self.consumed.load(AtomicOrdering::Relaxed)
    }

    fn count_event(&self) {
        self.consumed.fetch_add(1, AtomicOrdering::Relaxed);
    }
}

impl ClientContext for SubContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.count_event();
        log_line(&self.shared.secrets, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.shared.link.error(&error);
        log_error(&self.shared.secrets, &error, reason);
    }

    fn stats_raw(&self, statistics: &[u8]) {
        self.count_event();
        self.shared.statistics(statistics);
    }
}

impl ConsumerContext for SubContext {
    fn rebalance(
        &self,
        base: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.count_event();
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.shared.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.assign(base, &partitions, true)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.revoke(base, &partitions, tpl)
            }
            other => {
                tracing::warn!(topic = %self.shared.topic, group = ?self.shared.group,
                    error = ?other, "rebalance failed; dropping the assignment");
                let all = self.shared.state.lock().assigned();
                self.revoke(base, &all, tpl);
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        self.count_event();
        if let Err(e) = &result {
            tracing::warn!(topic = %self.shared.topic, group = ?self.shared.group, error = %e,
                "committing offsets failed; retrying with the next commit");
        }
        let mut s = self.shared.state.lock();
        for e in offsets.elements_for_topic(&self.shared.topic) {
            if let Offset::Offset(o) = e.offset() {
                s.committed(e.partition(), o, result.is_ok() && e.error().is_ok());
            }
        }
    }
}

impl SubContext {
    /// Where each partition starts (see [`resolve_positions`]); with `pin`, the start
    /// positions of partitions the group had no offset for are committed for the group at
    /// once. `None`: unknown (librdkafka then decides).
    fn positions(
        &self,
        base: &BaseConsumer<Self>,
        partitions: &[i32],
        pin: bool,
    ) -> HashMap<i32, Option<i64>> {
        let topic = &self.shared.topic;
        match resolve_positions(
            base,
            topic,
            partitions,
            self.start_from,
            self.request_timeout,
            pin,
        ) {
            Ok((starts, pins)) => {
                if pin && pins.count() > 0 {
                    if let Err(e) = base.commit(&pins, CommitMode::Sync) {
                        tracing::warn!(%topic, group = ?self.shared.group, error = %e,
                            "cannot commit the start positions of the group");
                    }
                }
                starts.into_iter().map(|(p, o)| (p, Some(o))).collect()
            }
            Err(e) => {
                tracing::warn!(%topic, group = ?self.shared.group, error = %e,
                    "cannot resolve start positions; librdkafka resolves them");
                partitions.iter().map(|p| (*p, None)).collect()
            }
        }
    }

    /// Gives `partition` its own message queue (once per consumer; it stays split across
    /// reassignments).
    fn split(&self, partition: i32) {
        let mut queues = self.queues.lock();
        if queues.contains_key(&partition) {
            return;
        }
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return; // closing; messages would arrive on the main queue, which is polled too
        };
        if let Some(mut q) = consumer.split_partition_queue(&self.shared.topic, partition) {
            let shared = self.shared.clone();
            q.set_nonempty_callback(move || shared.poller.notify());
            queues.insert(partition, q);
        }
    }

    /// Assigns `partitions` at their resolved positions.
    fn assign(&self, base: &BaseConsumer<Self>, partitions: &[i32], group: bool) {
        let topic = &self.shared.topic;
        let starts = self.positions(base, partitions, group);
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            self.split(p);
            let offset = match starts.get(&p).copied().flatten() {
                Some(o) => Offset::Offset(o),
                None => Offset::Stored,
            };
            let _ = tpl.add_partition_offset(topic, p, offset);
        }
        // Subscriptions without a group add partitions later (discovery): incrementally.
        let result =
            if matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative) || !group {
                base.incremental_assign(&tpl)
            } else {
                base.assign(&tpl)
            };
        if let Err(e) = result {
            tracing::warn!(%topic, error = %e, "assigning partitions failed");
            self.shared
                .report(broker_error(topic, "assign partitions", e));
        }
        {
            let mut s = self.shared.state.lock();
            // A partition assigned again without a revocation starts over too.
            self.shared.revocations.fetch_add(1, AtomicOrdering::AcqRel);
            for &p in partitions {
                s.assign(p, starts.get(&p).copied().flatten());
            }
        }
        tracing::debug!(%topic, group = ?self.shared.group, ?starts, "partitions assigned");
        if let Some(tx) = self.ready.lock().take() {
            let _ = tx.send(Ok(()));
        }
        self.shared.poller.notify();
    }

    /// Drops `partitions`: commits what was acked of them (unless the assignment was
    /// lost), then unassigns. Their deliveries still out become stale.
    fn revoke(&self, base: &BaseConsumer<Self>, partitions: &[i32], tpl: &TopicPartitionList) {
        let topic = &self.shared.topic;
        let commits: Vec<(i32, i64)> = {
            let mut s = self.shared.state.lock();
            self.shared.revocations.fetch_add(1, AtomicOrdering::AcqRel);
            partitions
                .iter()
                .filter_map(|&p| s.revoke(p).map(|o| (p, o)))
                .collect()
        };
        if self.shared.group.is_some() && !commits.is_empty() && !base.assignment_lost() {
            commit_sync(base, topic, &commits);
        }
        let result = if matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative) {
            base.incremental_unassign(tpl)
        } else {
            base.unassign()
        };
        if let Err(e) = result {
            tracing::warn!(%topic, error = %e, "unassigning partitions failed");
        }
        tracing::debug!(%topic, group = ?self.shared.group, ?partitions, "partitions revoked");
        self.shared.poller.notify();
    }
}

/// The start position of each of `partitions`: the committed offset of the consumer's
/// group (when `committed`), else the low or high watermark by `start_from`. Also returns
/// the partitions that had no committed offset, at their start positions.
pub(crate) fn resolve_positions<C: ConsumerContext>(
    base: &BaseConsumer<C>,
    topic: &str,
    partitions: &[i32],
    start_from: StartFrom,
    timeout: Duration,
    committed: bool,
) -> KafkaResult<(HashMap<i32, i64>, TopicPartitionList)> {
    let offsets = if committed {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(topic, *p);
        }
        Some(base.committed_offsets(tpl, timeout)?)
    } else {
        None
    };
    let mut starts = HashMap::new();
    let mut fresh = TopicPartitionList::new();
    for &p in partitions {
        let elem = offsets.as_ref().and_then(|c| c.find_partition(topic, p));
        if let Some(e) = &elem {
            // A partition the coordinator could not answer for (e.g. still loading its
            // offsets after a restart) is not a partition without a committed offset:
            // taking it for one would pin (commit) the start position over the real one.
            e.error()?;
        }
        let known = elem.and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        });
        let start = match known {
            Some(o) => o,
            None => {
                let (low, high) = base.fetch_watermarks(topic, p, timeout)?;
                let o = match start_from {
                    StartFrom::Latest => high,
                    StartFrom::Earliest => low,
                };
                fresh.add_partition_offset(topic, p, Offset::Offset(o))?;
                o
            }
        };
        starts.insert(p, start);
    }
    Ok((starts, fresh))
}

fn commit_sync(base: &BaseConsumer<SubContext>, topic: &str, commits: &[(i32, i64)]) {
    tracing::debug!(%topic, ?commits, sync = true, "committing acked offsets");
    let mut tpl = TopicPartitionList::new();
    for (p, o) in commits {
        let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*o));
    }
    if let Err(e) = base.commit(&tpl, CommitMode::Sync) {
        tracing::warn!(%topic, error = %e, ?commits,
            "committing offsets failed; those messages will be delivered again");
    }
}

/// A running subscription as the subscriber sees it.
pub(crate) struct Running {
    pub(crate) shared: Arc<Shared>,
    pub(crate) done: oneshot::Receiver<()>,
}

/// Starts a subscription to `topic` (which exists) and returns once it is effective.
pub(crate) async fn start(
    config: &KafkaConfig,
    topics: &Topics,
    topic: &str,
    group: Option<&str>,
) -> Result<(SubscriptionStream, Running)> {
    let shared = Arc::new(Shared::new(topic, group, config));
    // A subscription without a group reads every partition directly: it joins no group
    // and commits nothing, but librdkafka wants a group id to assign partitions.
    let group_id = match group {
        Some(g) => config.group_id(g),
        None => config.group_id(&format!(
            "{}-{}",
            config.client_id,
            uuid::Uuid::new_v4().simple()
        )),
    };
    let direct = match group {
        Some(_) => None,
        None => Some(topics.partitions(topic).await?.ok_or_else(|| {
            Error::permanent(BROKER, topic, "subscribe", "the topic does not exist")
        })?),
    };
    let (ready_tx, ready_rx) = oneshot::channel();
    let context = SubContext {
        shared: shared.clone(),
        start_from: config.start_from,
        request_timeout: config.request_timeout,
        consumer: OnceLock::new(),
        queues: Mutex::new(BTreeMap::new()),
        ready: Mutex::new(Some(ready_tx)),
        consumed: AtomicU64::new(0),
    };
    let mut consumer: BaseConsumer<SubContext> = config
        .consumer_client(&group_id)
        .set("statistics.interval.ms", config.statistics_millis())
        .create_with_context(context)
        .map_err(|e| creation_error(&shared.secrets, "consumer", e))?;
    let wake = shared.clone();
    consumer.set_nonempty_callback(move || wake.poller.notify());
    let consumer = Arc::new(consumer);
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));

    let (done_tx, done_rx) = oneshot::channel();
    let settings = Settings {
        commit_interval: config.commit_interval,
        drain_timeout: config.drain_timeout,
        request_timeout: config.request_timeout,
    };
    std::thread::Builder::new()
        .name(format!("tidemill-kafka {topic}"))
        .spawn(move || {
            run(consumer, direct, settings);
            let _ = done_tx.send(());
        })
        .map_err(|e| Error::transient(BROKER, topic, "start the consumer thread", e))?;

    let what = match group {
        Some(g) => format!("subscribe (group `{g}`)"),
        None => "subscribe".to_owned(),
    };
    match tokio::time::timeout(config.subscribe_timeout, ready_rx).await {
        Ok(Ok(Ok(()))) => Ok((
            SubscriptionStream::new(shared.clone()),
            Running {
                shared,
                done: done_rx,
            },
        )),
        Ok(Ok(Err(e))) => {
            shared.stop();
            Err(e)
        }
        Ok(Err(_)) => Err(Error::transient(
            BROKER,
            topic,
            what,
            "the consumer stopped before its partitions were assigned",
        )),
        Err(_) => {
            shared.stop();
            Err(Error::transient(
                BROKER,
                topic,
                what,
                format!(
                    "no partitions assigned within {:?} (brokers {})",
                    config.subscribe_timeout,
                    config.brokers_display()
                ),
            ))
        }
    }
}

struct Settings {
    commit_interval: Duration,
    drain_timeout: Duration,
    request_timeout: Duration,
}

/// The poll thread.
fn run(consumer: Arc<BaseConsumer<SubContext>>, direct: Option<Vec<i32>>, settings: Settings) {
    let ctx = consumer.context().clone();
    let shared = ctx.shared.clone();
    let topic = shared.topic.clone();
    let group = shared.group.is_some();
    match &direct {
        None => {
            if let Err(e) = consumer.subscribe(&[&topic]) {
                fail_start(&ctx, broker_error(&topic, "subscribe", e));
                finish(consumer, false);
                return;
            }
        }
        Some(partitions) => ctx.assign(&consumer, partitions, false),
    }
    let mut known: Vec<i32> = direct.clone().unwrap_or_default();
    let mut next_commit = Instant::now() + settings.commit_interval;
    let mut next_discovery = Instant::now() + DISCOVERY_INTERVAL;
    let mut drain_deadline: Option<Instant> = None;
    let mut last_received: Option<Instant> = None;
    let mut batch: Vec<(i64, KafkaRecord)> = Vec::new();
    let mut arena = Arena::new();
    loop {
        // Events: rebalances (run their callbacks here), errors, commit results, log
        // lines, and messages that reached the main queue before their partition was
        // split. All of them, unless a flood keeps coming (then the next round goes on).
        for _ in 0..MAIN_QUEUE_BATCH {
            let before = ctx.consumed();
            match consumer.poll(Duration::ZERO) {
                // Handled by a callback: there may be more.
                None if ctx.consumed() != before => {}
                None => break,
                Some(Ok(m)) => {
                    let p = m.partition();
                    let record = convert::record(&m, &shared.topic_arc, &mut arena);
                    let offset = m.offset();
                    drop(m);
                    push(&shared, p, vec![(offset, record)]);
                    last_received = Some(Instant::now());
                }
                Some(Err(e)) => report_consumer_error(&shared, e),
            }
        }
        if shared.stopped() {
            break;
        }
        let now = Instant::now();
        let (draining, in_flight, commit_due) = {
            let s = shared.state.lock();
            (s.draining, s.in_flight(), s.commit_due())
        };
        if draining {
            if in_flight == 0 || drain_deadline.is_some_and(|d| now >= d) {
                break;
            }
            drain_deadline.get_or_insert(now + settings.drain_timeout);
        }
        let mut more = false;
        if !draining {
            let rooms: Vec<(i32, usize)> = {
                let s = shared.state.lock();
                s.assigned()
                    .into_iter()
                    .map(|p| (p, s.room(p)))
                    .filter(|(_, room)| *room > 0)
                    .collect()
            };
            let queues = ctx.queues.lock();
            for (p, room) in rooms {
                let Some(q) = queues.get(&p) else { continue };
                let n = room.min(BATCH);
                // One allocation for what this round takes (it moves on to the state).
                batch.reserve(n);
                for _ in 0..n {
                    match q.poll(Duration::ZERO) {
                        None => break,
                        Some(Ok(m)) => {
                            let record = convert::record(&m, &shared.topic_arc, &mut arena);
                            batch.push((m.offset(), record));
                        }
                        Some(Err(e)) => report_consumer_error(&shared, e),
                    }
                }
                if batch.len() == n {
                    more = true;
                }
                if !batch.is_empty() {
                    last_received = Some(now);
                    push(&shared, p, std::mem::take(&mut batch));
                }
            }
        }
        if group && (now >= next_commit || commit_due) {
            let commits = shared.state.lock().commits();
            if !commits.is_empty() {
                // One request for every partition whose acked prefix grew since the last
                // commit, however many acks that took (a batch handler's 500 acks of one
                // partition are one offset here).
                tracing::debug!(%topic, ?commits, sync = false, "committing acked offsets");
                let mut tpl = TopicPartitionList::new();
                for (p, o) in &commits {
                    let _ = tpl.add_partition_offset(&topic, *p, Offset::Offset(*o));
                }
                if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                    tracing::warn!(%topic, error = %e, "cannot start a commit; retrying");
                    let mut s = shared.state.lock();
                    for (p, o) in commits {
                        s.committed(p, o, false);
                    }
                }
            }
            next_commit = now + settings.commit_interval;
        }
        if direct.is_some() && now >= next_discovery {
            discover(&consumer, &ctx, &mut known, settings.request_timeout);
            next_discovery = Instant::now() + DISCOVERY_INTERVAL;
        }
        if !more {
            let busy = last_received.is_some_and(|t| now.saturating_duration_since(t) < ACTIVE);
            let mut wait = if busy { BUSY_TICK } else { TICK };
            if group {
                wait = wait.min(next_commit.saturating_duration_since(Instant::now()));
            }
            shared.poller.wait(wait.max(Duration::from_millis(1)));
        }
    }
    // Commit what was acked, then leave.
    let commits = {
        let mut s = shared.state.lock();
        let c = s.end();
        if let Some(w) = s.stream_waker.take() {
            w.wake();
        }
        c
    };
    if group && !commits.is_empty() {
        commit_sync(&consumer, &topic, &commits);
    }
    finish(consumer, group);
}

/// Adds partitions that appeared since the subscription started (subscriptions without a
/// group; a group's assignment follows the topic by itself). New partitions are read from
/// their start: everything in them was published after the subscription began.
fn discover(
    consumer: &Arc<BaseConsumer<SubContext>>,
    ctx: &SubContext,
    known: &mut Vec<i32>,
    timeout: Duration,
) {
    let topic = &ctx.shared.topic;
    let md = match consumer.fetch_metadata(Some(topic), timeout) {
        Ok(md) => md,
        Err(e) => {
            tracing::debug!(%topic, error = %e, "partition discovery failed; trying later");
            return;
        }
    };
    let Ok(Some(now)) = crate::client::partitions_of(&md, topic) else {
        return;
    };
    let added: Vec<i32> = now.into_iter().filter(|p| !known.contains(p)).collect();
    if added.is_empty() {
        return;
    }
    tracing::info!(%topic, ?added, "new partitions; reading them from their start");
    let mut tpl = TopicPartitionList::new();
    for &p in &added {
        ctx.split(p);
        let _ = tpl.add_partition_offset(topic, p, Offset::Beginning);
    }
    if let Err(e) = consumer.incremental_assign(&tpl) {
        tracing::warn!(%topic, error = %e, "assigning new partitions failed; trying later");
        return;
    }
    {
        let mut s = ctx.shared.state.lock();
        for &p in &added {
            s.assign(p, None);
        }
    }
    known.extend(added);
}

fn push(shared: &Shared, partition: i32, messages: Vec<(i64, KafkaRecord)>) {
    let waker = {
        let mut s = shared.state.lock();
        if s.push(partition, messages) {
            s.stream_waker.take()
        } else {
            None
        }
    };
    if let Some(w) = waker {
        w.wake();
    }
}

fn report_consumer_error(shared: &Shared, error: KafkaError) {
    log_error(&shared.secrets, &error, "consumer error");
    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::BrokerTransportFailure) {
        // One connection lost (a broker restarting, a seed address that does not answer):
        // librdkafka reconnects, or reads through another broker; logged, not a stream
        // error. `AllBrokersDown` still is.
        return;
    }
    let fatal = matches!(error, KafkaError::MessageConsumptionFatal(_));
    shared.report(broker_error_hiding(
        &shared.secrets,
        &shared.topic,
        "consume",
        error,
    ));
    if fatal {
        shared.stop();
    }
}

fn fail_start(ctx: &SubContext, error: Error) {
    match ctx.ready.lock().take() {
        Some(tx) => {
            let _ = tx.send(Err(error));
        }
        None => ctx.shared.report(error),
    }
}

/// Releases the consumer: the partition queues first (they hold the consumer), then the
/// consumer itself, which leaves its group.
fn finish(consumer: Arc<BaseConsumer<SubContext>>, group: bool) {
    let ctx = consumer.context().clone();
    ctx.shared.state.lock().ended = true;
    ctx.shared.link.retire();
    if let Some(w) = ctx.shared.state.lock().stream_waker.take() {
        w.wake();
    }
    ctx.queues.lock().clear();
    if group {
        consumer.unsubscribe();
    }
    if let Some(tx) = ctx.ready.lock().take() {
        let _ = tx.send(Err(Error::transient(
            BROKER,
            &ctx.shared.topic,
            "subscribe",
            "the subscription ended before it was effective",
        )));
    }
    drop(consumer);
    if let Some(lag) = &ctx.shared.lag {
        lag.end();
    }
}
