//! Consuming from JetStream: durable pull consumers for consumer groups, ephemeral ones
//! for subscriptions without a group, a pull loop that survives reconnects and vanished
//! consumers, acks/naks/in-progress acks on the message's reply subject.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::{BatchConfig, Config as PullConfig};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::{Client, Subject};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use parking_lot::Mutex;
use slab::Slab;
use tidemill_core::{AckFuture, Acknowledger, Delivery, Error, Result};
use tokio::sync::watch;
use tokio::time::Sleep;
use tokio_stream::wrappers::WatchStream;
use tokio_util::task::TaskTracker;

use super::order::{Parked, Sequencer};
use super::{Streams, Target};
use crate::codec::{self, Identity, Origin};
use crate::config::{DeliverFrom, NatsConfig};
use crate::naming;
use crate::wire::{Inbox, Wire, WireMsg, WireSub};
use crate::BROKER;

pub(crate) const ACK: Bytes = Bytes::from_static(b"+ACK");
const NAK: Bytes = Bytes::from_static(b"-NAK");
const IN_PROGRESS: Bytes = Bytes::from_static(b"+WPI");
/// Pause before re-creating a consumer that vanished (or retrying after a failure).
const RECREATE_PAUSE: Duration = Duration::from_secs(1);
/// How long a finished subscription waits for the messages still on their way to it.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// A delivery the application holds: kept alive with in-progress acks.
struct Held {
    /// The delivery's reply subject (its ack subject), as received.
    reply: Bytes,
    /// The keeper's tick when it was handed out.
    since: u32,
}

/// What every subscription and delivery of one subscriber shares.
pub(crate) struct JsShared {
    /// Carries pull requests, deliveries, acks (see [`crate::wire`]).
    wire: Wire,
    identity: Identity,
    /// Subscriptions not ended yet, for `close` to release what they hold.
    slots: Mutex<Slab<Arc<Slot>>>,
    config: Arc<NatsConfig>,
    streams: Streams,
    api_prefix: String,
    reconnects: watch::Receiver<u64>,
    held: Mutex<Slab<Held>>,
    tick: AtomicU32,
    /// Background work (draining finished subscriptions) that `close` waits for.
    tasks: TaskTracker,
}

impl JsShared {
    fn hold(&self, reply: Bytes) -> usize {
        let since = self.tick.load(Ordering::Relaxed);
        self.held.lock().insert(Held { reply, since })
    }

    fn release(&self, slot: usize) {
        self.held.lock().try_remove(slot);
    }

    /// Whether anything still needs the connection: a subscription not ended yet, one
    /// handing back what it read ahead, or a delivery not settled yet (held or waiting for
    /// its turn).
    pub(crate) fn busy(&self) -> bool {
        self.slots
            .lock()
            .iter()
            .any(|(_, s)| s.sub.lock().is_some())
            || !self.tasks.is_empty()
            || !self.held.lock().is_empty()
    }
}

/// Sends in-progress acks for held deliveries every `ack_wait / 2`, so the server does not
/// redeliver them while the application works; stops extending a delivery after
/// `max_in_progress`, and stops altogether once the subscriber and all its deliveries are
/// gone.
async fn keep_alive(shared: Weak<JsShared>, every: Duration, ticks_max: u32) {
    let mut interval = tokio::time::interval(every);
    interval.tick().await;
    loop {
        interval.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let now = shared.tick.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let replies: Vec<Bytes> = shared
            .held
            .lock()
            .iter()
            .filter(|(_, h)| now.wrapping_sub(h.since) <= ticks_max)
            .map(|(_, h)| h.reply.clone())
            .collect();
        for reply in replies {
            if let Err(e) = shared.wire.publish(reply, None, None, IN_PROGRESS) {
                tracing::debug!(broker = BROKER, error = %e, "in-progress ack failed");
                break;
            }
        }
    }
}

/// The JetStream side of a [`NatsSubscriber`](crate::NatsSubscriber).
pub(crate) struct JsSubscriber {
    shared: Arc<JsShared>,
}

impl JsSubscriber {
    pub(crate) fn new(client: Client, wire: Wire, config: Arc<NatsConfig>) -> Self {
        let ctx = super::context(&client, &config);
        let reconnects = wire.connects();
        let every = (config.jetstream.ack_wait / 2).max(Duration::from_millis(500));
        let ticks_max = (config.jetstream.max_in_progress.as_secs_f64() / every.as_secs_f64())
            .ceil()
            .min(f64::from(u32::MAX / 2)) as u32;
        let shared = Arc::new(JsShared {
            api_prefix: config.jetstream.api_prefix(),
            streams: Streams::new(ctx, config.clone()),
            identity: Identity::new(config.uuid_header.clone()),
            wire,
            slots: Mutex::new(Slab::new()),
            config,
            reconnects,
            held: Mutex::new(Slab::new()),
            tick: AtomicU32::new(0),
            tasks: TaskTracker::new(),
        });
        tokio::spawn(keep_alive(Arc::downgrade(&shared), every, ticks_max));
        JsSubscriber { shared }
    }

    pub(crate) fn shared(&self) -> &Arc<JsShared> {
        &self.shared
    }

    /// Waits for the subscriptions that ended to hand back what they had read ahead.
    pub(crate) async fn wait_for_drains(&self, limit: Duration) {
        self.shared.tasks.close();
        let _ = tokio::time::timeout(limit, self.shared.tasks.wait()).await;
    }

    /// The durable consumer name of `group` on `topic`.
    pub(crate) async fn consumer_name(&self, topic: &str, group: &str) -> Result<String> {
        let target = self.shared.streams.target(topic).await?;
        Ok(group_consumer_name(&target, group))
    }

    /// Creates the topic's stream and, for a group, its durable consumer.
    pub(crate) async fn initialize(&self, topic: &str, group: Option<&str>) -> Result<()> {
        let target = self.shared.streams.target(topic).await?;
        if let Some(group) = group {
            create_consumer(&self.shared, &target, Some(group), None).await?;
        }
        Ok(())
    }

    /// Subscribes; returns once the consumer exists and the first pull request is on its
    /// way (after the inbox subscription, on the same connection), so every message
    /// published afterwards reaches this subscription.
    pub(crate) async fn subscribe(&self, topic: &str, group: Option<&str>) -> Result<PullStream> {
        let shared = &self.shared;
        let target = shared.streams.target(topic).await?;
        let consumer = create_consumer(shared, &target, group, None).await?;
        let inbox = format!("_INBOX.{}", uuid::Uuid::new_v4().simple());
        let sub = shared
            .wire
            .subscribe(&inbox, None, crate::wire::SUBSCRIPTION_CAPACITY);
        let js = &shared.config.jetstream;
        let batch = js.pull_batch;
        let request = serde_json::to_vec(&BatchConfig {
            batch,
            expires: Some(js.pull_expires),
            idle_heartbeat: js.idle_heartbeat,
            ..Default::default()
        })
        .map_err(|e| Error::permanent(BROKER, topic, "encode the pull request", e))?;
        let ctx = Arc::new(SubCtx {
            shared: shared.clone(),
            topic: topic.into(),
            phase: watch::Sender::new(Phase::Live),
        });
        let inbox_queue = sub.inbox().clone();
        let slot = Arc::new(Slot {
            sub: Mutex::new(Some(sub)),
            ctx: ctx.clone(),
            ephemeral: group.is_none(),
            names: Mutex::new((target.stream.clone(), consumer.clone())),
        });
        let key = shared.slots.lock().insert(slot.clone());
        let mut stream = PullStream {
            shared: shared.clone(),
            ctx,
            next_subject: next_subject(&shared.api_prefix, &target.stream, &consumer),
            target,
            group: group.map(str::to_owned),
            ephemeral: group.is_none(),
            consumer,
            inbox: Bytes::from(inbox),
            queue: inbox_queue,
            slot,
            slot_key: key,
            request: Bytes::from(request),
            batch,
            requested: 0,
            recreating: None,
            repull: None,
            served_while_recreating: false,
            pause: None,
            watchdog: Box::pin(tokio::time::sleep(watchdog_period(&shared.config))),
            activity: 0,
            armed_at: 0,
            reconnects: WatchStream::from_changes(shared.reconnects.clone()),
            last_sequence: 0,
            order: js.order_per_key.then(Sequencer::new),
            lag: tidemill_core::router::metrics_enabled().then(|| {
                metrics::gauge!(
                    tidemill_core::router::metric_names::CONSUMER_LAG,
                    "topic" => topic.to_owned(),
                    "group" => group.unwrap_or_default().to_owned(),
                )
            }),
        };
        stream.requested = batch;
        stream
            .pull()
            .map_err(|e| Error::transient(BROKER, topic, "send the first pull request", e))?;
        shared
            .wire
            .flush()
            .await
            .map_err(|e| Error::transient(BROKER, topic, "subscribe to the pull inbox", e))?;
        Ok(stream)
    }
}

fn watchdog_period(config: &NatsConfig) -> Duration {
    config.jetstream.idle_heartbeat * 2 + Duration::from_secs(1)
}

fn next_subject(api_prefix: &str, stream: &str, consumer: &str) -> Subject {
    format!("{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}").into()
}

fn deliver_policy(from: DeliverFrom) -> DeliverPolicy {
    match from {
        DeliverFrom::All => DeliverPolicy::All,
        DeliverFrom::New => DeliverPolicy::New,
        DeliverFrom::Last => DeliverPolicy::Last,
    }
}

/// The durable consumer name of `group` on `target`.
pub(crate) fn group_consumer_name(target: &Target, group: &str) -> String {
    if target.dedicated {
        naming::derive_name(group)
    } else {
        naming::derive_name(&format!("{group}_{}", target.topic))
    }
}

fn consumer_error(target: &Target, what: &str, e: impl std::fmt::Display, retry: bool) -> Error {
    let context = format!("{what} on stream `{}`", target.stream);
    if retry {
        Error::transient(BROKER, target.topic.as_str(), context, e.to_string())
    } else {
        Error::permanent(BROKER, target.topic.as_str(), context, e.to_string())
    }
}

/// Creates (or updates) the consumer of `group` on `target`, or an ephemeral consumer for a
/// subscription without group (starting after `resume_after` when re-creating one). Returns
/// the consumer's name.
async fn create_consumer(
    shared: &JsShared,
    target: &Target,
    group: Option<&str>,
    resume_after: Option<u64>,
) -> Result<String> {
    create_consumer_on(&shared.streams, &shared.config, target, group, resume_after).await
}

/// [`create_consumer`] with what it needs spelled out (publishers use it for
/// `retain_for`).
pub(crate) async fn create_consumer_on(
    streams: &Streams,
    config: &NatsConfig,
    target: &Target,
    group: Option<&str>,
    resume_after: Option<u64>,
) -> Result<String> {
    let nats_config = config;
    let js = &nats_config.jetstream;
    let mut config = PullConfig {
        ack_policy: AckPolicy::Explicit,
        ack_wait: js.ack_wait,
        max_deliver: js.max_deliver.unwrap_or(-1),
        max_ack_pending: js.max_ack_pending,
        filter_subject: target.subject.to_string(),
        ..Default::default()
    };
    let name = match group {
        Some(group) => {
            let name = group_consumer_name(target, group);
            config.durable_name = Some(name.clone());
            config.name = Some(name.clone());
            config.deliver_policy = deliver_policy(js.group_deliver);
            config.description = Some(format!("tidemill-nats group `{group}`"));
            name
        }
        None => {
            let name = format!("tm-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
            config.name = Some(name.clone());
            config.inactive_threshold = js.inactive_threshold;
            config.deliver_policy = match resume_after {
                Some(seq) => DeliverPolicy::ByStartSequence {
                    start_sequence: seq + 1,
                },
                None => deliver_policy(js.subscription_deliver),
            };
            config.description = Some("tidemill-nats subscription".to_owned());
            name
        }
    };
    let ctx = streams.context();
    match ctx
        .create_consumer_on_stream(config, target.stream.as_str())
        .await
    {
        Ok(_) => Ok(name),
        Err(e) => {
            let retry = match e.kind() {
                ConsumerErrorKind::TimedOut | ConsumerErrorKind::Request => true,
                ConsumerErrorKind::JetStream(ref je) => je.code() >= 500,
                _ => false,
            };
            if group.is_some() && matches!(e.kind(), ConsumerErrorKind::JetStream(_)) {
                // An existing consumer whose settings cannot be changed (e.g. its start
                // position): use it as it is.
                let existing: std::result::Result<
                    async_nats::jetstream::consumer::Consumer<PullConfig>,
                    _,
                > = ctx
                    .get_consumer_from_stream(name.as_str(), target.stream.as_str())
                    .await;
                if existing.is_ok() {
                    tracing::warn!(
                        broker = BROKER,
                        topic = %target.topic,
                        consumer = %name,
                        error = %e,
                        "the group's consumer exists with other settings; using it as it is"
                    );
                    return Ok(name);
                }
            }
            Err(consumer_error(
                target,
                &format!("create consumer `{name}`"),
                e,
                retry,
            ))
        }
    }
}

/// Re-creates a vanished consumer (or finds that it exists after all).
async fn recreate_consumer(
    shared: Arc<JsShared>,
    topic: String,
    group: Option<String>,
    current: String,
    resume_after: Option<u64>,
) -> Result<(Arc<Target>, String)> {
    shared.streams.forget(&topic);
    let target = shared.streams.target(&topic).await?;
    let ctx = shared.streams.context();
    let found: std::result::Result<async_nats::jetstream::consumer::Consumer<PullConfig>, _> = ctx
        .get_consumer_from_stream(current.as_str(), target.stream.as_str())
        .await;
    match found {
        Ok(_) => return Ok((target, current)),
        Err(e) => match e.kind() {
            ConsumerErrorKind::JetStream(je)
                if je.error_code() == async_nats::jetstream::ErrorCode::CONSUMER_NOT_FOUND => {}
            _ => {
                return Err(consumer_error(
                    &target,
                    &format!("look up consumer `{current}`"),
                    e,
                    true,
                ))
            }
        },
    }
    let name = create_consumer(&shared, &target, group.as_deref(), resume_after).await?;
    tracing::info!(broker = BROKER, topic = %target.topic, consumer = %name, "re-created the consumer");
    Ok((target, name))
}

/// The payload of a nak, with the redelivery delay if any.
pub(crate) fn nak_payload(delay: Option<Duration>) -> Bytes {
    match delay {
        None => NAK,
        Some(d) => Bytes::from(format!("-NAK {{\"delay\":{}}}", d.as_nanos())),
    }
}

/// Where a subscription is in its life, for its naks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Pulling.
    Live,
    /// Dropped; its inbox is not unsubscribed yet.
    Ending,
    /// Its inbox is unsubscribed: the server no longer sends into its pull requests.
    Unsubscribed,
}

/// Per subscription: what its acknowledgers need.
pub(crate) struct SubCtx {
    shared: Arc<JsShared>,
    topic: Box<str>,
    phase: watch::Sender<Phase>,
}

impl SubCtx {
    /// Waits (bounded) while the subscription is between its end and the unsubscription of
    /// its inbox: a nak the server handled in that gap would redeliver the message into
    /// the ended subscription's pull requests, where nobody reads it, and it would come
    /// back only after `ack_wait`.
    async fn until_not_ending(&self) {
        let mut phase = self.phase.subscribe();
        if *phase.borrow_and_update() == Phase::Ending {
            let _ =
                tokio::time::timeout(DRAIN_LIMIT, phase.wait_for(|p| *p != Phase::Ending)).await;
        }
    }

    /// Sends `payload` (`+ACK`, `-NAK`, ...) on a delivery's reply subject, after taking it
    /// out of the in-progress registry.
    pub(crate) fn settle(
        self: &Arc<Self>,
        reply: Option<Bytes>,
        slot: Option<usize>,
        payload: Bytes,
        what: &'static str,
    ) -> AckFuture {
        if let Some(slot) = slot {
            self.shared.release(slot);
        }
        let Some(reply) = reply else {
            return AckFuture::ready(Ok(()));
        };
        let send = move |ctx: &SubCtx, reply: Bytes, payload: Bytes| {
            ctx.shared
                .wire
                .publish(reply, None, None, payload)
                .map_err(|e| Error::transient(BROKER, &*ctx.topic, what, e))
        };
        if payload == ACK || *self.phase.borrow() != Phase::Ending {
            return AckFuture::ready(send(self, reply, payload));
        }
        let ctx = self.clone();
        AckFuture::boxed(async move {
            ctx.until_not_ending().await;
            send(&ctx, reply, payload)
        })
    }
}

/// Settles one JetStream delivery (without key, or with `order_per_key` off) on its reply
/// subject.
struct JsAcker {
    ctx: Arc<SubCtx>,
    /// The delivery's reply subject, as received.
    reply: Option<Bytes>,
    slot: Option<usize>,
}

impl Acknowledger for JsAcker {
    fn ack(self: Box<Self>) -> AckFuture {
        self.ctx.settle(self.reply, self.slot, ACK, "ack")
    }

    fn nack(self: Box<Self>, delay: Option<Duration>) -> AckFuture {
        let what = if delay.is_some() {
            "nack with delay"
        } else {
            "nack"
        };
        self.ctx
            .settle(self.reply, self.slot, nak_payload(delay), what)
    }
}

/// A consumer being re-created: its topic's target and its name.
type Recreating = BoxFuture<'static, Result<(Arc<Target>, String)>>;

/// What `close` needs to end a subscription that is neither polled nor dropped.
pub(crate) struct Slot {
    /// The inbox subscription, until the subscription ends.
    sub: Mutex<Option<WireSub>>,
    ctx: Arc<SubCtx>,
    ephemeral: bool,
    /// Stream and consumer (a re-created consumer changes them).
    names: Mutex<(String, String)>,
}

impl JsShared {
    /// Ends every subscription: unsubscribes their inboxes and gives back what they
    /// received and did not hand out (their streams end when next polled).
    pub(crate) fn release_all(self: &Arc<Self>) {
        let slots: Vec<Arc<Slot>> = self.slots.lock().iter().map(|(_, s)| s.clone()).collect();
        for slot in slots {
            release(self, &slot, Vec::new());
        }
    }
}

/// Unsubscribes `slot`'s inbox (if not done yet), takes in what the server still sends to
/// it, and naks that and `waiting` so the server redelivers at once; deletes the
/// consumer of a subscription without group.
fn release(shared: &Arc<JsShared>, slot: &Arc<Slot>, waiting: Vec<Parked>) {
    let sub = slot.sub.lock().take();
    let runtime = tokio::runtime::Handle::try_current();
    let ephemeral = slot.ephemeral;
    let naks = move |shared: &JsShared, waiting: Vec<Parked>| {
        for parked in waiting {
            if let Some(slot) = parked.slot {
                shared.release(slot);
            }
            if let (Some(reply), false) = (parked.reply, ephemeral) {
                let _ = shared.wire.publish(reply, None, None, NAK);
            }
        }
    };
    let (sub, runtime) = match (sub, runtime) {
        (Some(sub), Ok(runtime)) => (sub, runtime),
        (None, Ok(runtime)) if !waiting.is_empty() => {
            // Released before (by `close`): nak once the inbox is unsubscribed.
            let (shared, ctx) = (shared.clone(), slot.ctx.clone());
            runtime.spawn(async move {
                ctx.until_not_ending().await;
                naks(&shared, waiting);
            });
            return;
        }
        _ => {
            if *slot.ctx.phase.borrow() == Phase::Live {
                slot.ctx.phase.send_replace(Phase::Unsubscribed);
            }
            naks(shared, waiting);
            return;
        }
    };
    slot.ctx.phase.send_replace(Phase::Ending);
    let (shared, slot) = (shared.clone(), slot.clone());
    let tracker = shared.tasks.clone();
    runtime.spawn(tracker.track_future(async move {
        // The UNSUB goes out before any nak, on the same connection, and the drain waits
        // for the server to have handled it: every message the server sent before is in
        // the inbox, and a nakked message is not redelivered into this subscription's
        // outstanding pull requests (nobody is interested in their inbox any more).
        let read_ahead = sub.drain(DRAIN_LIMIT).await;
        slot.ctx.phase.send_replace(Phase::Unsubscribed);
        naks(&shared, waiting);
        if !slot.ephemeral {
            for msg in read_ahead {
                if let (Some(reply), true) = (msg.reply.clone(), is_delivery(&msg)) {
                    let _ = shared.wire.publish(reply, None, None, NAK);
                }
            }
        }
        let _ = shared.wire.flush().await;
        if slot.ephemeral {
            let (stream, consumer) = slot.names.lock().clone();
            let _ = shared
                .streams
                .context()
                .delete_consumer_from_stream(consumer.as_str(), stream.as_str())
                .await;
        }
    }));
}

/// Whether `msg` is a stored message (it has a JetStream ack subject), as opposed to a
/// status message of the server (heartbeat, timeout, ...). A stored message may carry a
/// status line of its own (its publisher wrote one): it is still a message.
fn is_delivery(msg: &WireMsg) -> bool {
    msg.reply
        .as_deref()
        .is_some_and(|r| r.starts_with(b"$JS.ACK."))
        || msg.status().is_none()
}

/// The deliveries of one JetStream subscription: a pull loop polled by the application.
pub(crate) struct PullStream {
    shared: Arc<JsShared>,
    ctx: Arc<SubCtx>,
    target: Arc<Target>,
    group: Option<String>,
    ephemeral: bool,
    consumer: String,
    next_subject: Subject,
    inbox: Bytes,
    /// What the inbox received (shared with the connection and with `close`).
    queue: Arc<Inbox>,
    slot: Arc<Slot>,
    slot_key: usize,
    /// The serialized pull request.
    request: Bytes,
    batch: usize,
    /// Messages requested and not received yet (an estimate; reset when pulls are lost).
    requested: usize,
    recreating: Option<Recreating>,
    /// While `recreating` waits: when to pull again. In a cluster the lookups wait for a
    /// leader election (the JetStream API answers only once the groups have leaders
    /// again, or after `request_timeout`), while the consumer's new leader serves pulls
    /// as soon as it is elected.
    repull: Option<Pin<Box<Sleep>>>,
    /// A message arrived while `recreating` ran: the consumer serves pulls again, so a
    /// lookup that failed meanwhile (timed out during the election) is no news.
    served_while_recreating: bool,
    /// Wait before re-creating the consumer.
    pause: Option<Pin<Box<Sleep>>>,
    /// Fires when nothing (not even a heartbeat) arrived for a while.
    watchdog: Pin<Box<Sleep>>,
    activity: u64,
    armed_at: u64,
    reconnects: WatchStream<u64>,
    last_sequence: u64,
    /// Per-key sequencing, when `order_per_key` is on.
    order: Option<Sequencer>,
    /// `tidemill_consumer_lag_messages{topic, group}`: the consumer's pending count as the
    /// server tells it with each delivery; `None` without a metrics recorder.
    lag: Option<metrics::Gauge>,
}

impl PullStream {
    /// Sends a pull request (queued on the connection).
    fn pull(&self) -> std::io::Result<()> {
        self.shared.wire.publish(
            Bytes::copy_from_slice(self.next_subject.as_bytes()),
            Some(self.inbox.clone()),
            None,
            self.request.clone(),
        )
    }

    fn rearm_watchdog(&mut self) {
        let deadline = tokio::time::Instant::now() + watchdog_period(&self.shared.config);
        self.watchdog.as_mut().reset(deadline);
        self.armed_at = self.activity;
    }

    fn start_recreate(&mut self) {
        if self.recreating.is_some() {
            return;
        }
        self.requested = 0;
        self.served_while_recreating = false;
        let resume_after = (self.ephemeral && self.last_sequence > 0).then_some(self.last_sequence);
        self.recreating = Some(
            recreate_consumer(
                self.shared.clone(),
                self.target.topic.clone(),
                self.group.clone(),
                self.consumer.clone(),
                resume_after,
            )
            .boxed(),
        );
    }

    /// A received message: its delivery, or `None` when it waits for its key's turn.
    fn accept(&mut self, msg: WireMsg) -> Option<Delivery> {
        // The reply subject as received (no copy); only a UTF-8 one counts, as before.
        let reply: Option<Bytes> = msg.reply_str().and(msg.reply.clone());
        let ack = reply
            .as_deref()
            .and_then(|r| std::str::from_utf8(r).ok())
            .and_then(codec::parse_ack_subject);
        // The server's own count of deliveries; nothing in the message is trusted for it.
        let delivered = ack.as_ref().map_or(1, |a| a.delivered);
        if let Some(a) = &ack {
            if a.stream_sequence > self.last_sequence {
                self.last_sequence = a.stream_sequence;
            }
            if let Some(lag) = &self.lag {
                lag.set(a.pending as f64);
            }
        }
        let message = codec::decode(
            msg,
            Origin::Stream {
                stream: &self.target.stream,
                ack,
            },
            &self.shared.identity,
        );
        let slot = reply.as_ref().map(|r| self.shared.hold(r.clone()));
        let attempt = u32::try_from(delivered).unwrap_or(u32::MAX);
        if let Some(order) = self.order.as_mut() {
            if let Some(key) = message.key().cloned() {
                let parked = Parked {
                    message,
                    reply,
                    slot,
                    attempt,
                };
                return order
                    .admit(key, parked)
                    .map(|p| order.delivery(&self.ctx, p));
            }
        }
        let acker = JsAcker {
            ctx: self.ctx.clone(),
            reply,
            slot,
        };
        Some(Delivery::new(message, acker).with_attempt(attempt))
    }
}

/// `Nats-Pending-Messages` of a pull status message: what the server will no longer send.
fn pending_messages(msg: &WireMsg) -> Option<usize> {
    let block = msg.headers.as_ref()?;
    let (_, headers) = codec::parse_header_block(block);
    let h = headers
        .iter()
        .find(|h| h.name() == b"Nats-Pending-Messages")?;
    h.value_str()?.parse().ok()
}

impl Stream for PullStream {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(order) = this.order.as_mut() {
                if let Some(parked) = order.poll_ready(cx) {
                    return Poll::Ready(Some(Ok(order.delivery(&this.ctx, parked))));
                }
            }
            // Reconnected: pull requests made before are gone with the old connection.
            while let Poll::Ready(Some(_)) = this.reconnects.poll_next_unpin(cx) {
                this.requested = 0;
            }
            if let Some(pause) = this.pause.as_mut() {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.pause = None;
                this.start_recreate();
            }
            // Pulls go out when too few messages are requested; while a re-creation runs,
            // once per `RECREATE_PAUSE` (each pull then may meet "no responders" again).
            let mut may_pull = true;
            if let Some(fut) = this.recreating.as_mut() {
                match fut.as_mut().poll(cx) {
                    Poll::Pending => {
                        let tick = this
                            .repull
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep(RECREATE_PAUSE)));
                        if tick.as_mut().poll(cx).is_ready() {
                            this.repull = None;
                            this.requested = 0;
                        } else {
                            may_pull = false;
                        }
                    }
                    Poll::Ready(Ok((target, consumer))) => {
                        this.recreating = None;
                        this.repull = None;
                        this.next_subject =
                            next_subject(&this.shared.api_prefix, &target.stream, &consumer);
                        *this.slot.names.lock() = (target.stream.clone(), consumer.clone());
                        this.target = target;
                        this.consumer = consumer;
                        this.requested = 0;
                        this.rearm_watchdog();
                    }
                    Poll::Ready(Err(e)) if this.served_while_recreating => {
                        this.recreating = None;
                        this.repull = None;
                        tracing::debug!(broker = BROKER, topic = %this.target.topic, error = %e, "consumer lookup failed, but the consumer serves pulls again");
                    }
                    Poll::Ready(Err(e)) => {
                        this.recreating = None;
                        this.repull = None;
                        this.pause = Some(Box::pin(tokio::time::sleep(RECREATE_PAUSE)));
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
            if this.slot.sub.lock().is_none() {
                // Released by `close`.
                return Poll::Ready(None);
            }
            if may_pull && this.requested <= this.batch / 2 {
                this.requested += this.batch;
                if let Err(e) = this.pull() {
                    this.requested = this.requested.saturating_sub(this.batch);
                    tracing::debug!(broker = BROKER, topic = %this.target.topic, error = %e, "pull request failed");
                }
            }
            match this.queue.poll_next(cx) {
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(msg)) => {
                    this.activity = this.activity.wrapping_add(1);
                    if is_delivery(&msg) {
                        this.requested = this.requested.saturating_sub(1);
                        if this.recreating.is_some() {
                            this.served_while_recreating = true;
                        }
                        if let Some(delivery) = this.accept(msg) {
                            return Poll::Ready(Some(Ok(delivery)));
                        }
                        continue;
                    }
                    match msg.status() {
                        // Idle heartbeat; no messages (no_wait).
                        Some(100) | Some(404) => {}
                        // Request timeout, or terminated (batch or bytes exceeded, consumer
                        // deleted, leadership change).
                        Some(408) | Some(409) => {
                            if msg.description() == Some("Consumer Deleted") {
                                tracing::warn!(broker = BROKER, topic = %this.target.topic, consumer = %this.consumer, "consumer deleted");
                                this.start_recreate();
                                continue;
                            }
                            match pending_messages(&msg) {
                                Some(n) => this.requested = this.requested.saturating_sub(n),
                                None => this.requested = 0,
                            }
                        }
                        Some(503) => {
                            // Nobody serves the consumer: it (or its stream) vanished, or
                            // JetStream is not ready yet (a restart).
                            tracing::debug!(broker = BROKER, topic = %this.target.topic, consumer = %this.consumer, "no responders for the pull request");
                            this.requested = 0;
                            if this.recreating.is_none() && this.pause.is_none() {
                                this.pause = Some(Box::pin(tokio::time::sleep(RECREATE_PAUSE)));
                            }
                        }
                        other => {
                            tracing::debug!(broker = BROKER, topic = %this.target.topic, status = ?other, description = ?msg.description(), "pull status");
                            this.requested = 0;
                        }
                    }
                }
                Poll::Pending => {
                    if this.watchdog.as_mut().poll(cx).is_ready() {
                        let idle = this.activity == this.armed_at;
                        this.rearm_watchdog();
                        if idle {
                            // No message and no heartbeat: the pull requests are lost.
                            tracing::debug!(broker = BROKER, topic = %this.target.topic, "no heartbeat; pulling again");
                            this.requested = 0;
                        }
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for PullStream {
    /// Hands back what the subscription read ahead: unsubscribes (letting messages already
    /// on their way arrive), naks them so they are redelivered at once instead of after
    /// `ack_wait`, and deletes the consumer of a subscription without group.
    fn drop(&mut self) {
        let waiting = self
            .order
            .as_mut()
            .map(Sequencer::take_waiting)
            .unwrap_or_default();
        self.shared.slots.lock().try_remove(self.slot_key);
        release(&self.shared, &self.slot, waiting);
    }
}
