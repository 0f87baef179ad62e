//! [`SqsSubscriber`]: long-polls a consumer group's queue, settles in batches, keeps the
//! messages it holds invisible to others.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName,
};
use futures::FutureExt;
use parking_lot::Mutex;
use tidemill_core::{
    AckFuture, Acknowledger, CancellationToken, ConnectionState, Delivery, DeliveryStream, Error,
    Message, Result, SubscribeOptions, Subscriber,
};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};

use crate::client::{self, Clients};
use crate::codec::{self, Received};
use crate::config::{AwsConfig, Mode};
use crate::record::SqsRecord;
use crate::resources::{self, Queue, Resources};
use crate::BROKER;

/// Consumes SQS queues: a consumer group's queue subscribed to the topic's SNS topic, a
/// private queue for a subscription without a group (deleted when the subscription ends),
/// or the topic's queue in [`Mode::Queues`].
///
/// - Each subscription long-polls with up to
///   [`concurrent_receives`](AwsConfig::concurrent_receives) `ReceiveMessage` calls and
///   holds at most [`prefetch`](AwsConfig::prefetch) unsettled messages.
/// - While it holds a message (buffered, in a handler, or held back behind an earlier one of
///   its key) it extends the message's visibility every third of
///   [`visibility_timeout`](AwsConfig::visibility_timeout), so no other consumer gets it;
///   messages of a consumer that died come back after the timeout.
/// - Ack deletes the message, nack makes it visible again at once, nack with a delay after
///   the delay (whole seconds, at most 12 h); acks and nacks are sent in batches of up to 10.
///   [`Delivery::attempt`] is SQS's `ApproximateReceiveCount`.
/// - FIFO: SQS hands out a message group's messages in order and holds the group back while
///   one is in flight; a subscription hands out one message per key at a time, and a nacked
///   message takes the ones held behind it back with it, so the key's order holds.
/// - Closing the subscriber (or dropping a stream) makes the messages it holds but never
///   handed out visible again at once; a long poll in flight at that moment finishes in the
///   background and gives back what it got.
#[derive(Clone)]
pub struct SqsSubscriber {
    inner: Arc<Inner>,
}

struct Inner {
    res: Arc<Resources>,
    closed: CancellationToken,
    inflight: Arc<Inflight>,
}

impl std::fmt::Debug for SqsSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsSubscriber")
            .field("address", &self.inner.res.config.address())
            .field("mode", &self.inner.res.config.mode)
            .field("fifo", &self.inner.res.config.fifo)
            .field("closed", &self.inner.closed.is_cancelled())
            .finish()
    }
}

impl SqsSubscriber {
    /// Loads the SDK configuration and checks the endpoint answers; fails within
    /// `connect_timeout` naming it when it does not.
    pub async fn connect(config: AwsConfig) -> Result<Self> {
        let clients = Clients::connect(&config).await?;
        Ok(SqsSubscriber {
            inner: Arc::new(Inner {
                res: Arc::new(Resources::new(clients, config)),
                closed: CancellationToken::new(),
                inflight: Arc::default(),
            }),
        })
    }

    /// The configuration this subscriber runs with.
    pub fn config(&self) -> &AwsConfig {
        &self.inner.res.config
    }

    fn check_open(&self, topic: &str) -> Result<()> {
        if self.inner.closed.is_cancelled() {
            return Err(Error::SubscriberClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        Ok(())
    }
}

/// Which queue a subscription reads.
#[derive(Clone, Debug)]
enum Target {
    /// A consumer group's queue (or the topic's queue in queue mode).
    Group(String),
    /// A private queue of this subscription: its name.
    Private(String),
}

#[async_trait]
impl Subscriber for SqsSubscriber {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<DeliveryStream> {
        self.check_open(topic)?;
        let res = self.inner.res.clone();
        let target = match (options.consumer_group(), res.config.mode) {
            (Some(group), _) => Target::Group(group.to_owned()),
            (None, Mode::Queues) => Target::Group(String::new()),
            (None, Mode::Topics) => {
                let id = uuid::Uuid::now_v7().simple().to_string();
                let (name, prefix) = res.config.private_queue_name(topic, &id[id.len() - 12..]);
                res.remove_expired_private(topic, &prefix).await;
                Target::Private(name)
            }
        };
        let (queue, private_sub) = open(&res, topic, &target).await?;
        let end = self.inner.closed.child_token();
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let sub = Arc::new(Sub {
            res: res.clone(),
            topic: topic.to_owned(),
            target,
            queue: Mutex::new(queue.clone()),
            private_sub: Mutex::new(private_sub),
            state: Mutex::new(State::default()),
            permits: Semaphore::new(res.config.prefetch),
            ready_signal: Notify::new(),
            settle_tx,
            inflight: self.inner.inflight.clone(),
            end: end.clone(),
            gate: res.config.fifo && res.config.order_per_key,
            runtime: tokio::runtime::Handle::current(),
        });
        tokio::spawn(settle_loop(
            res.clone(),
            topic.to_owned(),
            queue,
            self.inner.inflight.clone(),
            settle_rx,
        ));
        for _ in 0..res.config.concurrent_receives {
            tokio::spawn(receive_loop(sub.clone()));
        }
        tokio::spawn(renew_loop(Arc::downgrade(&sub)));
        {
            // When the subscription ends (close, cancellation, stream dropped): give back
            // what it holds but never handed out.
            let sub = sub.clone();
            let cancel = options.cancellation().cloned();
            // Closing waits for this too (the give-back calls it queues).
            sub.inflight.add();
            tokio::spawn(async move {
                match cancel {
                    Some(c) => tokio::select! {
                        _ = sub.end.cancelled() => {}
                        _ = c.cancelled() => sub.end.cancel(),
                    },
                    None => sub.end.cancelled().await,
                }
                sub.release_unhanded();
                sub.inflight.done();
            });
        }
        let guard = end.drop_guard();
        let stream = futures::stream::unfold((sub, guard), |(sub, guard)| async move {
            loop {
                if sub.end.is_cancelled() {
                    return None;
                }
                let next = {
                    let mut state = sub.state.lock();
                    match state.errors.pop_front() {
                        Some(e) => Some(Err(e)),
                        None => state.ready.pop_front().map(Ok),
                    }
                };
                match next {
                    Some(Ok(p)) => {
                        tracing::trace!(topic = %sub.topic, uuid = p.message.uuid(), id = p.id, "handed out");
                        let delivery = sub.delivery(p);
                        return Some((Ok(delivery), (sub, guard)));
                    }
                    Some(Err(e)) => return Some((Err(e), (sub, guard))),
                    None => {}
                }
                tokio::select! {
                    _ = sub.ready_signal.notified() => {}
                    _ = sub.end.cancelled() => return None,
                }
            }
        });
        Ok(DeliveryStream::new(stream).with_options(&options))
    }

    /// Creates the group's queue subscribed to the topic (queue mode: the topic's queue);
    /// without a group nothing (a private queue exists only while subscribed).
    async fn initialize(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.check_open(topic)?;
        let res = &self.inner.res;
        match (options.consumer_group(), res.config.mode) {
            (Some(group), _) => res.group_queue(topic, group).await.map(|_| ()),
            (None, Mode::Queues) => res.group_queue(topic, "").await.map(|_| ()),
            (None, Mode::Topics) => Ok(()),
        }
    }

    /// Ends every stream, gives back what was received but never handed out, and waits
    /// (up to `command_timeout`) until the acks and nacks queued so far were sent.
    async fn close(&self) -> Result<()> {
        self.inner.closed.cancel();
        let deadline = self.inner.res.config.command_timeout;
        if tokio::time::timeout(deadline, self.inner.inflight.drained())
            .await
            .is_err()
        {
            tracing::warn!(
                ?deadline,
                "closing: acks still unsent after the command timeout; their messages come back after their visibility timeout"
            );
        }
        self.inner.res.state.set(ConnectionState::Closed);
        Ok(())
    }

    fn connection_state(&self) -> ConnectionState {
        self.inner.res.state.get()
    }
}

/// Creates (or looks up) the queue of `target`, and for a private queue its subscription.
async fn open(res: &Resources, topic: &str, target: &Target) -> Result<(Queue, Option<Arc<str>>)> {
    match target {
        Target::Group(group) => Ok((res.group_queue(topic, group).await?, None)),
        Target::Private(name) => {
            let arn = res.topic_arn(topic).await?;
            let queue = res.private_queue(topic, name).await?;
            match res.subscribe_queue(topic, &arn, &queue).await {
                Ok(sub) => Ok((queue, Some(sub))),
                Err(e) => {
                    res.delete_private(topic, &queue, None).await;
                    Err(e)
                }
            }
        }
    }
}

/// A received message not handed out yet.
struct Pending {
    id: u64,
    message: Message,
    attempt: Option<u32>,
    receipt: Arc<str>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Every message held (received, not settled): id → receipt handle and FIFO group.
    held: HashMap<u64, (Arc<str>, Option<Arc<str>>)>,
    /// Ready to hand out, in order.
    ready: VecDeque<Pending>,
    /// FIFO with order per key: groups with a message handed out, and the messages held
    /// back behind it.
    groups: HashMap<Arc<str>, VecDeque<Pending>>,
    /// Errors to put in the stream.
    errors: VecDeque<Error>,
}

/// One subscription, shared by its loops, its stream and its deliveries.
struct Sub {
    res: Arc<Resources>,
    topic: String,
    target: Target,
    queue: Mutex<Queue>,
    private_sub: Mutex<Option<Arc<str>>>,
    state: Mutex<State>,
    permits: Semaphore,
    ready_signal: Notify,
    settle_tx: mpsc::UnboundedSender<Settle>,
    inflight: Arc<Inflight>,
    end: CancellationToken,
    gate: bool,
    runtime: tokio::runtime::Handle,
}

impl Drop for Sub {
    fn drop(&mut self) {
        if let Target::Private(_) = self.target {
            let res = self.res.clone();
            let topic = std::mem::take(&mut self.topic);
            let queue = self.queue.lock().clone();
            let sub = self.private_sub.lock().take();
            self.runtime.spawn(async move {
                res.delete_private(&topic, &queue, sub.as_deref()).await;
            });
        }
    }
}

/// What becomes of a settled message's key group.
enum Outcome {
    Acked,
    /// Nacked (or the ack failed): the messages held behind it go back, visible after
    /// this many seconds.
    Returned(i32),
}

impl Sub {
    fn config(&self) -> &AwsConfig {
        &self.res.config
    }

    fn delivery(self: &Arc<Self>, p: Pending) -> Delivery {
        let acker = SqsAcker {
            sub: self.clone(),
            id: p.id,
            receipt: p.receipt,
            uuid: p.message.uuid().into(),
        };
        let delivery = Delivery::new(p.message, acker);
        match p.attempt {
            Some(a) => delivery.with_attempt(a),
            None => delivery,
        }
    }

    /// Takes in what a receive returned: held, then ready or held back behind its key.
    fn accept(&self, messages: &[aws_sdk_sqs::types::Message], queue_name: &str) {
        let empty = HashMap::new();
        let mut state = self.state.lock();
        let mut added = false;
        for m in messages {
            let Some(receipt) = m.receipt_handle() else {
                continue;
            };
            let (message, attempt) = codec::decode(Received {
                queue: queue_name,
                message_id: m.message_id().unwrap_or_default(),
                body: m.body().unwrap_or_default(),
                attributes: codec::sqs_attributes(m.message_attributes()),
                system: m.attributes().unwrap_or(&empty),
                unwrap_envelopes: self.config().unwrap_sns_envelopes,
            });
            let group: Option<Arc<str>> = self
                .gate
                .then(|| SqsRecord::of(&message).and_then(|r| r.message_group_id()))
                .flatten()
                .map(Arc::from);
            let id = state.next_id;
            state.next_id += 1;
            tracing::trace!(topic = %self.topic, uuid = message.uuid(), id, attempt, group = ?group, "received");
            let receipt: Arc<str> = receipt.into();
            state.held.insert(id, (receipt.clone(), group.clone()));
            let pending = Pending {
                id,
                message,
                attempt,
                receipt,
            };
            match group {
                Some(g) => match state.groups.get_mut(&g) {
                    Some(behind) => behind.push_back(pending),
                    None => {
                        state.groups.insert(g, VecDeque::new());
                        state.ready.push_back(pending);
                        added = true;
                    }
                },
                None => {
                    state.ready.push_back(pending);
                    added = true;
                }
            }
        }
        drop(state);
        if added {
            self.ready_signal.notify_one();
        }
    }

    /// Stops holding message `id` (no more visibility extensions): called before it is
    /// settled, so an extension cannot undo a nack.
    fn unhold(&self, id: u64) -> Option<Arc<str>> {
        self.state.lock().held.remove(&id).and_then(|(_, g)| g)
    }

    /// After a message of `group` was settled: hands out the next one of its group, or
    /// sends the ones held behind it back.
    fn finish(&self, group: Option<Arc<str>>, outcome: Outcome) {
        self.permits.add_permits(1);
        let Some(group) = group else {
            return;
        };
        let mut back = Vec::new();
        {
            let mut state = self.state.lock();
            let Some(behind) = state.groups.get_mut(&group) else {
                return;
            };
            match outcome {
                Outcome::Acked => match behind.pop_front() {
                    Some(next) => {
                        state.ready.push_back(next);
                        drop(state);
                        self.ready_signal.notify_one();
                        return;
                    }
                    None => {
                        state.groups.remove(&group);
                    }
                },
                Outcome::Returned(secs) => {
                    let behind = state.groups.remove(&group).unwrap_or_default();
                    for p in behind {
                        tracing::trace!(topic = %self.topic, uuid = p.message.uuid(), id = p.id, secs, "given back behind its key");
                        state.held.remove(&p.id);
                        back.push((p.receipt, secs));
                    }
                }
            }
        }
        if !back.is_empty() {
            self.permits.add_permits(back.len());
            self.give_back(back);
        }
    }

    /// Queues a settle call; it goes out with the next batch. Gives the reply back when
    /// the settle task has ended.
    fn send(&self, receipt: Arc<str>, op: Op, reply: Reply) -> std::result::Result<(), Reply> {
        self.inflight.add();
        self.settle_tx
            .send(Settle { receipt, op, reply })
            .map_err(|e| {
                self.inflight.done();
                e.0.reply
            })
    }

    /// Makes messages visible again after the given seconds, without handing them out (a
    /// failure is logged: they come back after their visibility timeout).
    fn give_back(&self, receipts: Vec<(Arc<str>, i32)>) {
        for (receipt, secs) in receipts {
            // A failure leaves the message to its visibility timeout, as a failed call does.
            let _ = self.send(receipt, Op::Visibility(secs), Reply::Quiet);
        }
    }

    /// At the end of the subscription: everything received but never handed out goes back
    /// at once (ready ones, and those held back behind their key).
    fn release_unhanded(&self) {
        let back: Vec<(Arc<str>, i32)> = {
            let mut state = self.state.lock();
            let mut pending: Vec<Pending> = state.ready.drain(..).collect();
            for (_, behind) in state.groups.iter_mut() {
                pending.extend(behind.drain(..));
            }
            for p in &pending {
                tracing::trace!(topic = %self.topic, uuid = p.message.uuid(), id = p.id, "given back: never handed out");
                state.held.remove(&p.id);
            }
            pending.into_iter().map(|p| (p.receipt, 0)).collect()
        };
        if !back.is_empty() {
            tracing::debug!(topic = %self.topic, messages = back.len(), "giving back messages never handed out");
            self.give_back(back);
        }
    }

    /// Makes the queue (and its subscription) exist again after the service said it does
    /// not.
    async fn recreate(&self) -> Result<()> {
        let name = self.queue.lock().name.clone();
        self.res.forget(&self.topic);
        self.res.forget_queue(&name);
        let (queue, sub) = open(&self.res, &self.topic, &self.target).await?;
        *self.queue.lock() = queue;
        if sub.is_some() {
            *self.private_sub.lock() = sub;
        }
        Ok(())
    }
}

struct SqsAcker {
    sub: Arc<Sub>,
    id: u64,
    receipt: Arc<str>,
    uuid: Arc<str>,
}

impl Acknowledger for SqsAcker {
    /// Queues the delete and returns: it goes out in the subscription's next
    /// `DeleteMessageBatch`, with the acks that arrive meanwhile. A delete that fails is
    /// logged and the message comes back after its visibility timeout (at least once);
    /// closing the subscriber waits for the queued deletes. On FIFO the key's next message
    /// is handed out only once the delete succeeded.
    fn ack(self: Box<Self>) -> AckFuture {
        tracing::trace!(topic = %self.sub.topic, uuid = %self.uuid, id = self.id, "ack");
        let group = self.sub.unhold(self.id);
        let reply = Reply::Acked {
            sub: self.sub.clone(),
            group,
            uuid: self.uuid.clone(),
        };
        match self.sub.send(self.receipt.clone(), Op::Delete, reply) {
            Ok(()) => AckFuture::ready(Ok(())),
            Err(reply) => {
                answer_reply(&self.sub.topic, reply, Err(SETTLE_ENDED.to_owned()));
                AckFuture::ready(Err(Error::transient(
                    BROKER,
                    &self.sub.topic,
                    format!("ack message {} (delete from the queue)", self.uuid),
                    SETTLE_ENDED,
                )))
            }
        }
    }

    /// Queues the visibility change at once; the future returns once it was made. The
    /// subscription's bookkeeping (the key's held-back messages, the prefetch slot) follows
    /// the answer whether or not the future is awaited.
    fn nack(self: Box<Self>, delay: Option<Duration>) -> AckFuture {
        let secs = delay.map_or(0, |d| {
            let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            s.min(43_200) as i32
        });
        tracing::trace!(topic = %self.sub.topic, uuid = %self.uuid, id = self.id, secs, "nack");
        let group = self.sub.unhold(self.id);
        let (waiter, rx) = oneshot::channel();
        let reply = Reply::Nacked {
            sub: self.sub.clone(),
            group,
            secs,
            waiter,
        };
        let failed = |sub: &Sub, uuid: &str, cause: String| {
            Error::transient(
                BROKER,
                &sub.topic,
                format!("nack message {uuid} (change its visibility)"),
                cause,
            )
        };
        if let Err(reply) = self
            .sub
            .send(self.receipt.clone(), Op::Visibility(secs), reply)
        {
            answer_reply(&self.sub.topic, reply, Err(SETTLE_ENDED.to_owned()));
            return AckFuture::ready(Err(failed(&self.sub, &self.uuid, SETTLE_ENDED.to_owned())));
        }
        AckFuture::boxed(async move {
            rx.await
                .unwrap_or_else(|_| Err(SETTLE_ENDED.to_owned()))
                .map_err(|cause| failed(&self.sub, &self.uuid, cause))
        })
    }
}

/// Why a settle call got no answer.
const SETTLE_ENDED: &str = "the subscription's settle task ended";

enum Op {
    Delete,
    Visibility(i32),
}

/// What to do with a settle call's result.
enum Reply {
    /// A nack: let the key's held-back messages go back, then tell whoever waits.
    Nacked {
        sub: Arc<Sub>,
        group: Option<Arc<str>>,
        secs: i32,
        waiter: oneshot::Sender<std::result::Result<(), String>>,
    },
    /// An ack that returned already: let the key's next message out (or, when the delete
    /// failed, give back the ones behind it); log a failure.
    Acked {
        sub: Arc<Sub>,
        group: Option<Arc<str>>,
        uuid: Arc<str>,
    },
    /// A message given back: log a failure.
    Quiet,
}

struct Settle {
    receipt: Arc<str>,
    op: Op,
    reply: Reply,
}

/// Settle calls queued and not answered yet, over all subscriptions of a subscriber
/// (closing waits for them).
#[derive(Default)]
struct Inflight {
    count: std::sync::atomic::AtomicUsize,
    idle: Notify,
}

impl Inflight {
    fn add(&self) {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    fn done(&self) {
        if self.count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            if self.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// Sends acks and nacks in batches of up to 10: one round of calls at a time, each round
/// taking everything queued while the previous one was out.
async fn settle_loop(
    res: Arc<Resources>,
    topic: String,
    queue: Queue,
    inflight: Arc<Inflight>,
    mut rx: mpsc::UnboundedReceiver<Settle>,
) {
    let mut buf = Vec::with_capacity(100);
    while rx.recv_many(&mut buf, 100).await > 0 {
        let (deletes, changes): (Vec<Settle>, Vec<Settle>) =
            buf.drain(..).partition(|s| matches!(s.op, Op::Delete));
        let calls = chunks(deletes)
            .into_iter()
            .map(|c| settle_batch(&res, &topic, &queue, c, true).boxed())
            .chain(
                chunks(changes)
                    .into_iter()
                    .map(|c| settle_batch(&res, &topic, &queue, c, false).boxed()),
            );
        for answered in futures::future::join_all(calls).await {
            for (settle, result) in answered {
                answer(&topic, settle, result);
                inflight.done();
            }
        }
    }
}

fn chunks(mut all: Vec<Settle>) -> Vec<Vec<Settle>> {
    let mut out = Vec::new();
    while !all.is_empty() {
        let rest = all.split_off(all.len().min(10));
        out.push(std::mem::replace(&mut all, rest));
    }
    out
}

fn answer(topic: &str, settle: Settle, result: std::result::Result<(), String>) {
    answer_reply(topic, settle.reply, result);
}

fn answer_reply(topic: &str, reply: Reply, result: std::result::Result<(), String>) {
    match reply {
        Reply::Nacked {
            sub,
            group,
            secs,
            waiter,
        } => {
            sub.finish(group, Outcome::Returned(secs));
            let _ = waiter.send(result);
        }
        Reply::Acked { sub, group, uuid } => {
            let outcome = match result {
                Ok(()) => Outcome::Acked,
                Err(e) => {
                    tracing::warn!(topic, uuid = %uuid, error = %e, "ack failed: the message could not be deleted and comes back after its visibility timeout");
                    Outcome::Returned(0)
                }
            };
            sub.finish(group, outcome);
        }
        Reply::Quiet => {
            if let Err(e) = result {
                tracing::debug!(topic, error = %e, "could not give a message back; it returns after its visibility timeout");
            }
        }
    }
}

type Answered = Vec<(Settle, std::result::Result<(), String>)>;

/// One `DeleteMessageBatch` (`delete`) or `ChangeMessageVisibilityBatch` of up to 10.
async fn settle_batch(
    res: &Resources,
    topic: &str,
    queue: &Queue,
    batch: Vec<Settle>,
    delete: bool,
) -> Answered {
    let sqs = &res.clients.sqs;
    let deadline = res.config.command_timeout;
    let result = if delete {
        let entries: Vec<_> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(s.receipt.as_ref())
                    .build()
                    .ok()
            })
            .collect();
        client::call(&res.state, deadline, || {
            sqs.delete_message_batch()
                .queue_url(queue.url.as_ref())
                .set_entries(Some(entries.clone()))
                .send()
        })
        .await
        .map(|out| failures(out.failed()))
    } else {
        let entries: Vec<_> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let secs = match s.op {
                    Op::Visibility(secs) => secs,
                    Op::Delete => 0,
                };
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(s.receipt.as_ref())
                    .visibility_timeout(secs)
                    .build()
                    .ok()
            })
            .collect();
        client::call(&res.state, deadline, || {
            sqs.change_message_visibility_batch()
                .queue_url(queue.url.as_ref())
                .set_entries(Some(entries.clone()))
                .send()
        })
        .await
        .map(|out| failures(out.failed()))
    };
    let (failed, call_error) = match result {
        Ok(failed) => (failed, None),
        Err(e) => {
            let what = if delete {
                "DeleteMessageBatch"
            } else {
                "ChangeMessageVisibilityBatch"
            };
            tracing::warn!(topic, queue = %queue.name, error = %e, "{what} failed");
            (HashMap::new(), Some(e.to_string()))
        }
    };
    batch
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let result = match (&call_error, failed.get(&i.to_string())) {
                (Some(e), _) | (None, Some(e)) => Err(e.clone()),
                (None, None) => Ok(()),
            };
            (s, result)
        })
        .collect()
}

/// The failed entries of a batch call, by id.
fn failures(failed: &[aws_sdk_sqs::types::BatchResultErrorEntry]) -> HashMap<String, String> {
    failed
        .iter()
        .map(|f| {
            (
                f.id().to_owned(),
                format!("{}: {}", f.code(), f.message().unwrap_or("no detail")),
            )
        })
        .collect()
}

/// Long-polls the queue while the subscription lasts and has room.
async fn receive_loop(sub: Arc<Sub>) {
    let config = sub.config().clone();
    let wait = config.wait_time.as_secs().min(20) as i32;
    let deadline = config.wait_time + config.command_timeout;
    let mut pause = Duration::from_millis(100);
    let mut reported = false;
    loop {
        // Ask for a full receive's worth when the subscription has room for it (a
        // receive of 1–2 messages costs as much as one of 10), else for what fits.
        let want = (config.prefetch / config.concurrent_receives).clamp(1, 10) as u32;
        let permits = tokio::select! {
            biased;
            _ = sub.end.cancelled() => return,
            p = sub.permits.acquire_many(want) => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        permits.forget();
        let mut n = want as usize;
        while n < 10 {
            match sub.permits.try_acquire() {
                Ok(p) => {
                    p.forget();
                    n += 1;
                }
                Err(_) => break,
            }
        }
        let queue = sub.queue.lock().clone();
        let sqs = &sub.res.clients.sqs;
        let result = client::call(&sub.res.state, deadline, || {
            sqs.receive_message()
                .queue_url(queue.url.as_ref())
                .max_number_of_messages(n as i32)
                .wait_time_seconds(wait)
                .visibility_timeout(config.visibility_secs())
                .message_attribute_names("All")
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send()
        })
        .await;
        match result {
            Ok(out) => {
                pause = Duration::from_millis(100);
                reported = false;
                let messages = out.messages();
                sub.permits.add_permits(n - messages.len().min(n));
                if messages.is_empty() {
                    continue;
                }
                sub.accept(messages, &queue.name);
                if sub.end.is_cancelled() {
                    // Ended while this receive was in flight: give back what it got.
                    sub.release_unhanded();
                    return;
                }
            }
            Err(e) => {
                sub.permits.add_permits(n);
                if sub.end.is_cancelled() {
                    return;
                }
                if resources::missing(&e) && config.create_resources {
                    tracing::warn!(topic = %sub.topic, queue = %queue.name, error = %e, "queue missing; creating it again");
                    if let Err(e) = sub.recreate().await {
                        tracing::warn!(topic = %sub.topic, error = %e, "could not create the queue again");
                    }
                } else if e.transient() {
                    tracing::warn!(topic = %sub.topic, queue = %queue.name, error = %e, "receive failed; retrying");
                } else {
                    tracing::error!(topic = %sub.topic, queue = %queue.name, error = %e, "receive failed");
                    if !reported {
                        reported = true;
                        let err = e.into_error(
                            &sub.topic,
                            format!("receive from SQS queue `{}`", queue.name),
                        );
                        sub.report(err);
                    }
                }
                tokio::select! {
                    _ = sub.end.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

impl Sub {
    /// Puts an error in the stream (the next item the application reads).
    fn report(&self, err: Error) {
        self.state.lock().errors.push_back(err);
        self.ready_signal.notify_one();
    }
}

/// Extends the visibility of every message the subscription holds, every third of the
/// visibility timeout, for as long as the subscription (or one of its deliveries) lives.
async fn renew_loop(sub: Weak<Sub>) {
    let (every, secs) = match sub.upgrade() {
        Some(s) => (
            s.config().visibility_timeout / 3,
            s.config().visibility_secs(),
        ),
        None => return,
    };
    let mut last_beat = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let Some(sub) = sub.upgrade() else {
            return;
        };
        if matches!(sub.target, Target::Private(_))
            && last_beat.elapsed() >= sub.config().private_queue_expiry / 4
        {
            last_beat = tokio::time::Instant::now();
            let queue = sub.queue.lock().clone();
            sub.res.heartbeat(&sub.topic, &queue).await;
        }
        let receipts: Vec<Arc<str>> = sub
            .state
            .lock()
            .held
            .values()
            .map(|(r, _)| r.clone())
            .collect();
        if receipts.is_empty() {
            continue;
        }
        let queue = sub.queue.lock().clone();
        for chunk in receipts.chunks(10) {
            let entries: Vec<_> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r.as_ref())
                        .visibility_timeout(secs)
                        .build()
                        .ok()
                })
                .collect();
            let sqs = &sub.res.clients.sqs;
            if let Err(e) = client::call(&sub.res.state, sub.config().command_timeout, || {
                sqs.change_message_visibility_batch()
                    .queue_url(queue.url.as_ref())
                    .set_entries(Some(entries.clone()))
                    .send()
            })
            .await
            {
                tracing::warn!(topic = %sub.topic, queue = %queue.name, error = %e, "could not extend the visibility of held messages");
            }
        }
    }
}
