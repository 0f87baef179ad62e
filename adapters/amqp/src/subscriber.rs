//! The subscriber: consumer groups as durable queues, subscriptions without a group as
//! exclusive queues, each consumed on its own channel and resumed after connection loss.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Consumer};
use tidemill_core::{
    AckFuture, Acknowledger, Delivery, DeliveryStream, Error, Native, Result, SubscribeOptions,
    Subscriber,
};
use tokio::time::Instant;

#[cfg(test)]
use crate::config::MAX_NAME_BYTES;
use crate::config::{AmqpConfig, QueueType};
use crate::confirm::{publish_batch, ConfirmChannel};
use crate::connection::{broker_error, is_transient, Connector};
#[cfg(test)]
use crate::convert::DELAY_QUEUE_MARKER;
use crate::convert::{
    decode, delay_queue_name, parked_properties, Encoded, Incoming, QueueContext,
};
use crate::native::AmqpEnvelope;
use crate::settle::{Settler, Ticket};
use crate::topology::{self, short, QueueKind};
use crate::BROKER;

/// The first pause before re-opening a lost subscription; doubles up to
/// `reconnect_backoff_max`.
const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// How many delivery attempts a subscriber remembers for redelivered messages.
const TRACKED_ATTEMPTS: usize = 10_000;

/// How long cancelling a consumer may take when its stream is dropped.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

/// Consumes messages from RabbitMQ (or another AMQP 0-9-1 broker).
///
/// - `subscribe(topic, group("g"))` consumes the durable queue of group `g`, bound to the
///   topic's exchange; every subscriber of the group competes for its messages, and the
///   queue keeps them while nobody consumes.
/// - `subscribe(topic, no group)` consumes an exclusive, auto-deleted queue of its own: it
///   sees every message published while it exists.
///
/// `subscribe` returns once the queue is declared, bound and consumed, so every message
/// published afterwards is delivered. Each subscription has its own channel with the
/// configured prefetch; deliveries are acknowledged (`basic.ack`) only when the
/// application acks them (acks that arrive together coalesced into `multiple` acks over
/// contiguous runs of acked delivery tags), and nacked with requeue (`basic.nack`) otherwise;
/// `nack_with_delay` parks the message in a delay queue (see the crate docs).
///
/// Every delivered message carries an [`AmqpEnvelope`] (exchange, routing key, typed
/// headers, every property) next to its string metadata, and its `attempt()` counts only
/// what the broker or the subscriber counted, never a header a producer set.
///
/// `close()` closes the connection, so RabbitMQ requeues at once everything the
/// subscriber held, also what sits prefetched in a stream nobody polls.
///
/// The subscriber owns one connection. When it is lost, every stream reports one error
/// item, then re-opens its channel, re-declares its queue and resumes consuming, retrying
/// with backoff until the broker is back; the stream never ends because of a connection
/// loss. Deliveries held across the loss can no longer be acked (the broker redelivers
/// them); their `ack` returns an error saying so.
///
/// Cloning is cheap and clones share the connection.
///
/// ```no_run
/// use futures::StreamExt;
/// use tidemill_amqp::{AmqpConfig, AmqpSubscriber};
/// use tidemill_core::{SubscribeOptions, Subscriber};
///
/// # async fn run() -> tidemill_core::Result<()> {
/// let subscriber = AmqpSubscriber::connect(AmqpConfig::new("amqp://guest:guest@localhost:5672/%2f")).await?;
/// let mut deliveries = subscriber.subscribe("orders", SubscribeOptions::group("billing")).await?;
/// while let Some(delivery) = deliveries.next().await {
///     let delivery = delivery?; // an error item: connection lost, the stream resumes by itself
///     println!("{}", delivery.message());
///     delivery.ack().await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AmqpSubscriber {
    inner: Arc<Inner>,
}

struct Inner {
    config: AmqpConfig,
    connector: Connector,
    /// Declares delay queues and re-publishes for `nack_with_delay`.
    control: ConfirmChannel,
    /// (queue, tracking id) → the attempt of its last delivery that was nacked, for classic
    /// queues (which only say "redelivered", not how often).
    attempts: parking_lot::Mutex<HashMap<AttemptKey, u32>>,
    /// The flush tasks writing booked acks; [`Subscriber::close`] lets them finish.
    acks: tokio_util::task::TaskTracker,
}

/// (queue, message uuid or content digest).
type AttemptKey = (Arc<str>, Arc<str>);

/// What a subscription consumes.
struct Spec {
    topic: String,
    exchange: String,
    /// The group's durable queue; `None` for an exclusive queue (named anew on each
    /// (re)connection).
    group_queue: Option<String>,
}

impl Spec {
    fn new(config: &AmqpConfig, topic: &str, group: Option<&str>) -> Result<Self> {
        Ok(Spec {
            topic: topic.to_owned(),
            exchange: config.exchange_for(topic)?,
            group_queue: group
                .map(|g| config.group_queue_for(topic, g))
                .transpose()?,
        })
    }
}

impl AmqpSubscriber {
    /// Validates `config` and connects (one attempt, bounded by `connect_timeout`): an
    /// unreachable broker fails here with an error naming its address.
    pub async fn connect(config: AmqpConfig) -> Result<Self> {
        config.validate()?;
        let connector = Connector::new(&config)?;
        connector.connection().await?;
        Ok(AmqpSubscriber {
            inner: Arc::new(Inner {
                config,
                connector,
                control: ConfirmChannel::default(),
                attempts: parking_lot::Mutex::new(HashMap::new()),
                acks: tokio_util::task::TaskTracker::new(),
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &AmqpConfig {
        &self.inner.config
    }

    fn check_open(&self, topic: &str) -> Result<()> {
        if self.inner.connector.closed().is_cancelled() {
            return Err(Error::SubscriberClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Subscriber for AmqpSubscriber {
    /// The subscriber's connection (its subscriptions share it; a quarantined
    /// subscription's own connection is not counted): up until first used, then as lapin
    /// reports it.
    fn connection_state(&self) -> tidemill_core::ConnectionState {
        self.inner.connector.state(false)
    }

    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<DeliveryStream> {
        self.check_open(topic)?;
        let spec = Arc::new(Spec::new(
            &self.inner.config,
            topic,
            options.consumer_group(),
        )?);
        let (consumer, lease) = open(self.inner.clone(), spec.clone(), None).await?;
        let stream = Subscription {
            inner: self.inner.clone(),
            spec,
            state: State::Consuming { consumer, lease },
            backoff: Duration::ZERO,
            quarantine: None,
            leave_quarantine: false,
        };
        Ok(DeliveryStream::new(stream)
            .until_cancelled(self.inner.connector.closed().clone())
            .with_options(&options))
    }

    /// Declares the exchange and the group's durable queue and binds them, so messages
    /// published from now on are kept for the group. Without a group there is nothing to
    /// prepare (an exclusive queue only exists while it is consumed).
    async fn initialize(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.check_open(topic)?;
        let Some(group) = options.consumer_group() else {
            return Ok(());
        };
        let inner = &*self.inner;
        let spec = Spec::new(&inner.config, topic, Some(group))?;
        let queue = spec.group_queue.unwrap_or_default();
        let conn = inner.connector.connection().await?;
        within(&inner.config, topic, "initialize", async {
            let channel = conn
                .create_channel()
                .await
                .map_err(|e| broker_error(topic, "open a channel", e))?;
            topology::subscription(
                &channel,
                &inner.config,
                topic,
                &spec.exchange,
                &queue,
                QueueKind::Group,
            )
            .await?;
            if let Err(e) = channel.close(200, "OK".into()).await {
                tracing::debug!(broker = BROKER, error = %e, "closing a channel");
            }
            Ok(())
        })
        .await
    }

    /// Writes the acks booked so far (bounded by `connect_timeout`; what is not written
    /// is redelivered by the broker), then closes the connection.
    async fn close(&self) -> Result<()> {
        let acks = &self.inner.acks;
        acks.close();
        if tokio::time::timeout(self.inner.config.connect_timeout, acks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                broker = BROKER,
                "closing with acknowledgements not yet written; \
                the broker will redeliver those messages"
            );
        }
        self.inner.connector.close().await;
        Ok(())
    }
}

impl std::fmt::Debug for AmqpSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSubscriber")
            .field("address", &self.inner.connector.address())
            .field("closed", &self.inner.connector.closed().is_cancelled())
            .finish()
    }
}

/// Runs `fut`, failing with a transient error after `connect_timeout` (a broker that
/// accepts the connection but does not answer).
async fn within<T>(
    config: &AmqpConfig,
    topic: &str,
    what: &str,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(config.connect_timeout, fut).await {
        Ok(result) => result,
        Err(_) => Err(Error::transient(
            BROKER,
            topic,
            what,
            format!(
                "the broker did not answer within the connect timeout of {:?}",
                config.connect_timeout
            ),
        )),
    }
}

/// One consuming channel. Deliveries hold it, so it stays open (and their acks possible)
/// until the last of them is settled, even after their stream ended.
struct Lease {
    channel: Channel,
    /// Coalesces the acks of the channel's deliveries (see [`crate::settle`]).
    settler: Arc<Settler>,
    queue: Arc<str>,
    kind: QueueKind,
    spec: Arc<Spec>,
    inner: Arc<Inner>,
    /// The subscription's own connection while it is in quarantine, kept open while
    /// deliveries from it are held.
    _quarantine: Option<Arc<Quarantine>>,
}

/// A connection of one subscription's own, used after RabbitMQ sent it a message lapin
/// cannot read (a header name or short-string property that is not UTF-8; lapin then
/// drops the connection, and RabbitMQ redelivers the message on every new one). On its
/// own connection and with prefetch 1, the subscription's failures do not disturb the
/// subscriber's other subscriptions, and no other message of the queue is returned with
/// the unreadable one (which matters for a quorum queue's `delivery_limit`, the way to get
/// such a message out of the way). It closes when the subscription leaves quarantine (a
/// message was read again), ends, or the subscriber closes.
struct Quarantine {
    connector: Arc<Connector>,
    /// Fires when the quarantine is over (its last handle dropped).
    done: tokio_util::sync::CancellationToken,
}

impl Quarantine {
    fn start(inner: &Inner) -> Result<Arc<Self>> {
        let connector = Arc::new(Connector::new(&inner.config)?);
        let done = tokio_util::sync::CancellationToken::new();
        // Closes the connection when the quarantine is over or the subscriber closes (which
        // must release what this connection holds even if the stream is never polled).
        let closed = inner.connector.closed().clone();
        let (watched, over) = (connector.clone(), done.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                tokio::select! {
                    _ = closed.cancelled() => {}
                    _ = over.cancelled() => {}
                }
                watched.close().await;
            });
        }
        Ok(Arc::new(Quarantine { connector, done }))
    }
}

impl Drop for Quarantine {
    fn drop(&mut self) {
        self.done.cancel();
    }
}

/// Opens a channel, declares and binds the queue and starts consuming it: on the
/// subscriber's connection, or in quarantine on the subscription's own with prefetch 1.
async fn open(
    inner: Arc<Inner>,
    spec: Arc<Spec>,
    quarantine: Option<Arc<Quarantine>>,
) -> Result<(Consumer, Arc<Lease>)> {
    let topic = spec.topic.as_str();
    let config = &inner.config;
    if inner.connector.closed().is_cancelled() {
        return Err(Error::SubscriberClosed {
            broker: BROKER,
            topic: topic.to_owned(),
        });
    }
    let conn = match &quarantine {
        Some(q) => q.connector.connection().await?,
        None => inner.connector.connection().await?,
    };
    let prefetch = if quarantine.is_some() {
        1
    } else {
        config.effective_prefetch()
    };
    let (queue, kind) = match &spec.group_queue {
        Some(queue) => (queue.clone(), QueueKind::Group),
        None => (config.broadcast_queue_for(topic)?, QueueKind::Exclusive),
    };
    let (channel, consumer) = within(config, topic, "subscribe", async {
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| broker_error(topic, "open a channel", e))?;
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| broker_error(topic, "set the prefetch (basic.qos)", e))?;
        topology::subscription(&channel, config, topic, &spec.exchange, &queue, kind).await?;
        let consumer = channel
            .basic_consume(
                short(topic, &queue)?,
                ShortString::default(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| broker_error(topic, format!("consume queue `{queue}`"), e))?;
        Ok((channel, consumer))
    })
    .await?;
    tracing::debug!(broker = BROKER, topic, queue = %queue, "consuming");
    let lease = Arc::new(Lease {
        settler: Arc::new(Settler::new(channel.clone(), Arc::from(queue.as_str()))),
        channel,
        queue: Arc::from(queue),
        kind,
        spec,
        inner,
        _quarantine: quarantine,
    });
    Ok((consumer, lease))
}

enum State {
    Consuming {
        consumer: Consumer,
        lease: Arc<Lease>,
    },
    Reopening(BoxFuture<'static, Result<(Consumer, Arc<Lease>)>>),
    Waiting(Pin<Box<tokio::time::Sleep>>),
    Ended,
}

/// The stream of one subscription.
struct Subscription {
    inner: Arc<Inner>,
    spec: Arc<Spec>,
    state: State,
    /// The pause before the next re-open attempt; zero until one failed.
    backoff: Duration,
    /// Set after a message lapin cannot read (see [`Quarantine`]).
    quarantine: Option<Arc<Quarantine>>,
    /// A message was read in quarantine: back to the shared connection.
    leave_quarantine: bool,
}

impl Subscription {
    fn reopen(&self) -> State {
        State::Reopening(
            open(
                self.inner.clone(),
                self.spec.clone(),
                self.quarantine.clone(),
            )
            .boxed(),
        )
    }

    /// Leaves quarantine: stops the consumer on the subscription's own connection (held
    /// deliveries stay valid) and consumes on the subscriber's connection again.
    fn end_quarantine(&mut self) {
        self.leave_quarantine = false;
        if let State::Consuming { consumer, lease } =
            std::mem::replace(&mut self.state, State::Ended)
        {
            release(consumer, lease);
        }
        self.quarantine = None;
        tracing::info!(broker = BROKER, topic = %self.spec.topic,
            "a message was read again: the subscription leaves quarantine");
        self.state = self.reopen();
    }

    /// Re-opens at once after the first failure since a message arrived, then after
    /// pauses from 100 ms doubling up to `reconnect_backoff_max`.
    fn retry(&mut self) -> State {
        let pause = self.backoff;
        self.backoff = (pause * 2)
            .max(BACKOFF_MIN)
            .min(self.inner.config.reconnect_backoff_max);
        if pause.is_zero() {
            self.reopen()
        } else {
            State::Waiting(Box::pin(tokio::time::sleep(pause)))
        }
    }

    fn closed(&self) -> bool {
        self.inner.connector.closed().is_cancelled()
    }
}

impl Stream for Subscription {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.leave_quarantine {
            this.end_quarantine();
        }
        loop {
            match &mut this.state {
                State::Consuming { consumer, lease } => {
                    let lost = match consumer.poll_next_unpin(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Some(Ok(d))) => {
                            if d.acker.poisoned() {
                                // Buffered from a channel that has died since: it can no
                                // longer be acked, and the broker redelivers it anyway.
                                continue;
                            }
                            this.backoff = Duration::ZERO;
                            this.leave_quarantine = this.quarantine.is_some();
                            return Poll::Ready(Some(Ok(deliver(d, lease))));
                        }
                        Poll::Ready(Some(Err(e)))
                            if matches!(e.kind(), lapin::ErrorKind::ParsingError(_)) =>
                        {
                            if this.quarantine.is_none() {
                                match Quarantine::start(&this.inner) {
                                    Ok(q) => this.quarantine = Some(q),
                                    Err(err) => tracing::warn!(broker = BROKER, error = %err,
                                        "cannot set up a connection for the quarantine"),
                                }
                            }
                            Error::permanent(
                                BROKER,
                                &this.spec.topic,
                                format!("consume queue `{}`", lease.queue),
                                format!(
                                    "RabbitMQ sent a message the AMQP client cannot read (a \
                                     header name or short-string property that is not UTF-8?): \
                                     {e}. The connection drops and the broker redelivers it, so \
                                     it blocks the queue; the subscription retries on a \
                                     connection of its own with prefetch 1. Remove the message \
                                     from the queue, or let a quorum queue's delivery_limit \
                                     dead-letter it"
                                ),
                            )
                        }
                        Poll::Ready(Some(Err(e))) => broker_error(
                            &this.spec.topic,
                            format!("consume queue `{}`", lease.queue),
                            e,
                        ),
                        Poll::Ready(None) => Error::transient(
                            BROKER,
                            &this.spec.topic,
                            format!("consume queue `{}`", lease.queue),
                            "the consumer was cancelled by the broker (queue deleted?)",
                        ),
                    };
                    if this.closed() {
                        this.state = State::Ended;
                        return Poll::Ready(None);
                    }
                    tracing::warn!(broker = BROKER, topic = %this.spec.topic, error = %lost,
                        "subscription lost; re-opening it");
                    this.state = this.retry();
                    return Poll::Ready(Some(Err(lost)));
                }
                State::Reopening(fut) => match fut.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok((consumer, lease))) => {
                        tracing::info!(broker = BROKER, topic = %this.spec.topic,
                            queue = %lease.queue, "subscription resumed");
                        this.state = State::Consuming { consumer, lease };
                    }
                    Poll::Ready(Err(e)) => {
                        if this.closed() {
                            this.state = State::Ended;
                            return Poll::Ready(None);
                        }
                        tracing::debug!(broker = BROKER, topic = %this.spec.topic, error = %e,
                            retry_in = ?this.backoff, "re-opening the subscription failed");
                        this.state = this.retry();
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                State::Waiting(sleep) => {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.state = this.reopen();
                }
                State::Ended => return Poll::Ready(None),
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let State::Consuming { consumer, lease } =
            std::mem::replace(&mut self.state, State::Ended)
        {
            release(consumer, lease);
        }
    }
}

/// Stops consuming on `lease`'s channel. Without held deliveries, dropping the last handles
/// closes the channel and the broker requeues whatever was sent ahead; with held
/// deliveries the channel stays open for their acks, so the consumer is cancelled and what
/// it had received but not handed out is requeued.
fn release(consumer: Consumer, lease: Arc<Lease>) {
    if Arc::strong_count(&lease) == 1 {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(cancel_and_requeue(consumer, lease));
    }
}

async fn cancel_and_requeue(mut consumer: Consumer, lease: Arc<Lease>) {
    if !lease.channel.status().connected() {
        return;
    }
    let cancel = lease
        .channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default());
    match tokio::time::timeout(CANCEL_TIMEOUT, cancel).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(broker = BROKER, error = %e, "cancelling a consumer");
            return;
        }
        Err(_) => return,
    }
    // After cancel-ok nothing more arrives; what did arrive is buffered.
    while let Some(Some(Ok(delivery))) = consumer.next().now_or_never() {
        let requeue = BasicNackOptions {
            requeue: true,
            multiple: false,
        };
        if let Err(e) = delivery.acker.nack(requeue).await {
            tracing::debug!(broker = BROKER, error = %e, "requeueing a prefetched message");
        }
    }
}

/// Turns a lapin delivery into a Tidemill one.
fn deliver(d: lapin::message::Delivery, lease: &Arc<Lease>) -> Delivery {
    let lapin::message::Delivery {
        delivery_tag,
        exchange,
        routing_key,
        redelivered,
        properties,
        data,
        acker,
        ..
    } = d;
    lease.settler.deliver(delivery_tag);
    let config = &lease.inner.config;
    let ctx = QueueContext {
        queue: &lease.queue,
        quorum: lease.kind == QueueKind::Group && config.queue_type == QueueType::Quorum,
        carrier: &config.message_uuid,
    };
    let decoded = decode(
        &ctx,
        Incoming {
            exchange,
            routing_key,
            redelivered,
            delivery_tag,
            properties,
            data,
        },
    );
    let base = decoded.hop_attempt;
    let (attempt, tracked) = match decoded.delivery_count {
        Some(count) => (base.saturating_add(count).saturating_add(1), false),
        None if redelivered => {
            let seen = lease
                .inner
                .attempts
                .lock()
                .get(&(lease.queue.clone(), decoded.tracking.clone()))
                .copied();
            (
                seen.map_or(base.saturating_add(2), |a| a.saturating_add(1)),
                true,
            )
        }
        None => (base.saturating_add(1), false),
    };
    let native = decoded.message.native().cloned();
    let payload = decoded.message.payload().clone();
    let acker = AmqpAcker {
        acker,
        tag: delivery_tag,
        lease: lease.clone(),
        uuid: decoded.uuid,
        tracking: decoded.tracking,
        attempt,
        tracked,
        keyless: decoded.message.key().is_none(),
        native,
        payload,
    };
    // The count lives with the message: RabbitMQ's x-delivery-count (quorum queues) and the
    // count a parked message carries through its delay queue (every nack the router makes
    // is delayed), so it survives consumer restarts; only an immediate requeue (a dropped
    // delivery) on a classic queue is estimated in this process, as a lower bound. One
    // origin for every delivery of a queue, so the dead-letter layer counts one way.
    Delivery::new(decoded.message, acker).with_attempt(attempt)
}

/// Settles one delivery on the channel it arrived on.
struct AmqpAcker {
    acker: lapin::Acker,
    /// The delivery tag (per channel).
    tag: u64,
    lease: Arc<Lease>,
    uuid: Arc<str>,
    /// Identifies the message in `Inner::attempts`.
    tracking: Arc<str>,
    attempt: u32,
    /// Its attempt count may be in `Inner::attempts`.
    tracked: bool,
    /// The message has no key (in ordered mode a nack sends it to the back of the queue).
    keyless: bool,
    /// The message's envelope, which `nack_with_delay` parks in a delay queue.
    native: Option<Native>,
    payload: Bytes,
}

impl AmqpAcker {
    fn topic(&self) -> &str {
        &self.lease.spec.topic
    }

    // The methods take the box, so settling moves a pointer, not the acknowledger.
    /// `basic.ack`, coalesced with the acks of other deliveries of the channel (see
    /// [`crate::settle`]): booked for the channel's flush task, which writes it (and logs a
    /// failed write, after which the broker redelivers the message), and ready at once.
    /// A tag the book does not hold is acked on its own, in a task of the subscriber.
    /// Without a tokio runtime to run tasks on, the ack writes the book itself and resolves
    /// once the frame carrying it was written.
    fn ack_now(self: Box<Self>) -> AckFuture {
        if self.acker.poisoned() {
            return AckFuture::ready(Err(self.channel_closed()));
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return AckFuture::boxed(self.ack_waiting());
        };
        match self.lease.settler.ack(self.tag) {
            Ticket::Booked(flush) => {
                if let Some(flush) = flush {
                    // The task holds the lease: the channel (and a quarantine's
                    // connection) stays open until the frames are written.
                    let lease = self.lease.clone();
                    self.lease.inner.acks.spawn_on(
                        async move {
                            flush.run().await;
                            drop(lease);
                        },
                        &runtime,
                    );
                }
                AckFuture::ready(self.acked(Ok(())))
            }
            _ => self.settle_in_task(|acker| async move {
                let outcome = acker.ack_alone().await;
                acker.acked(outcome)
            }),
        }
    }

    /// The ack without a runtime: the caller's future writes the book.
    async fn ack_waiting(self: Box<Self>) -> Result<()> {
        let outcome = match self.lease.settler.ack_and_wait(self.tag) {
            Ticket::Waiting { done, flush } => {
                if let Some(flush) = flush {
                    flush.run().await;
                }
                match done.await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        return Err(Error::transient(
                            BROKER,
                            self.topic(),
                            self.context("ack"),
                            "the acknowledgement was abandoned before it was sent; the \
                             broker will redeliver the message",
                        ))
                    }
                }
            }
            _ => self.ack_alone().await,
        };
        self.acked(outcome)
    }

    /// After an ack's frame was booked or written: forgets the attempt count kept for the
    /// message, or names the failure.
    fn acked(&self, outcome: std::result::Result<(), lapin::Error>) -> Result<()> {
        match outcome {
            Ok(()) => {
                if self.tracked {
                    self.lease
                        .inner
                        .attempts
                        .lock()
                        .remove(&(self.lease.queue.clone(), self.tracking.clone()));
                }
                Ok(())
            }
            Err(_) if self.acker.poisoned() => Err(self.channel_closed()),
            Err(e) => Err(broker_error(self.topic(), self.context("ack"), e)),
        }
    }

    /// Runs a settlement that takes round trips as a task of the subscriber (closing
    /// waits for it), so it completes even when the caller drops the returned future:
    /// an acknowledger dropped unsettled would leave the message unacked on a channel
    /// that stays open, never redelivered, holding a prefetch slot (with `ordered`, the
    /// only one) and keeping later acks from being coalesced past its tag. Without a
    /// tokio runtime the returned future does the work.
    fn settle_in_task<F, Fut>(self: Box<Self>, work: F) -> AckFuture
    where
        F: FnOnce(Box<Self>) -> Fut,
        Fut: std::future::Future<Output = Result<()>> + Send + 'static,
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return AckFuture::boxed(work(self));
        };
        let topic = self.lease.spec.topic.clone();
        let context = self.context("settle");
        let task = self.lease.inner.acks.clone().spawn_on(work(self), &runtime);
        AckFuture::boxed(async move {
            task.await.unwrap_or_else(|e| {
                Err(Error::transient(
                    BROKER,
                    &topic,
                    context,
                    format!(
                        "the settling task ended early ({e}); the broker redelivers the message"
                    ),
                ))
            })
        })
    }

    /// A tag the book does not hold, acked on its own.
    async fn ack_alone(&self) -> std::result::Result<(), lapin::Error> {
        match self.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(lapin::ErrorKind::InvalidChannelState(
                lapin::ChannelState::Closed,
                "basic.ack",
            )
            .into()),
            Err(e) => Err(e),
        }
    }

    /// "`what` message <uuid> (queue `<queue>`)".
    fn context(&self, what: &str) -> String {
        format!(
            "{what} message {} (queue `{}`)",
            self.uuid, self.lease.queue
        )
    }

    fn channel_closed(&self) -> Error {
        Error::transient(
            BROKER,
            self.topic(),
            self.context("ack"),
            "its channel was closed (connection lost or subscriber closed); the broker \
             will redeliver it",
        )
    }

    /// `basic.nack` with requeue. On a channel that is gone the broker has requeued the
    /// message already, which is what a nack asks for.
    async fn requeue(self: Box<Self>) -> Result<()> {
        self.remember_attempt();
        let options = BasicNackOptions {
            requeue: true,
            multiple: false,
        };
        let result = self.acker.nack(options).await;
        // Written (or failed): acks of higher tags may now be coalesced past it.
        self.lease.settler.settled(self.tag);
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_transient(&e) => {
                tracing::debug!(broker = BROKER, uuid = %self.uuid, error = %e,
                    "nack on a lost channel; the broker requeues the message itself");
                Ok(())
            }
            Err(e) => Err(broker_error(self.topic(), self.context("nack"), e)),
        }
    }

    fn remember_attempt(&self) {
        let mut attempts = self.lease.inner.attempts.lock();
        if attempts.len() >= TRACKED_ATTEMPTS {
            // Forget one: its next delivery then reports a lower bound (2).
            if let Some(k) = attempts.keys().next().cloned() {
                attempts.remove(&k);
            }
        }
        attempts.insert(
            (self.lease.queue.clone(), self.tracking.clone()),
            self.attempt,
        );
    }

    /// Keeps the message (unsettled, so with prefetch 1 nothing overtakes it) for `delay`,
    /// then requeues it to the head of its queue: `nack_with_delay` of a keyed message in
    /// ordered mode. Returns at once; closing the subscriber ends the wait (the broker then
    /// requeues the message itself).
    fn hold(self: Box<Self>, delay: Duration) -> AckFuture {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return AckFuture::boxed(self.requeue());
        };
        let closed = self.lease.inner.connector.closed().clone();
        runtime.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {
                    if let Err(e) = self.requeue().await {
                        tracing::warn!(broker = BROKER, error = %e,
                            "requeueing a message after its delay failed; the broker \
                             redelivers it when the channel closes");
                    }
                }
                _ = closed.cancelled() => {}
            }
        });
        AckFuture::ready(Ok(()))
    }

    /// Parks a copy in the delay queue for `delay` (zero: straight back to the end of this
    /// queue), which dead-letters it back to this queue when the delay has passed, waits
    /// for the confirm, then acks the original. If that fails the original is nacked
    /// (requeued) and the error returned.
    async fn park(self: Box<Self>, delay: Duration) -> Result<()> {
        let envelope = self.native.as_ref().and_then(Native::get::<AmqpEnvelope>);
        let scheduled = match envelope {
            Some(envelope) => {
                let properties = parked_properties(envelope, &self.uuid, self.attempt);
                self.lease
                    .inner
                    .park(&self.lease, properties, &self.payload, &self.uuid, delay)
                    .await
            }
            None => Err(Error::permanent(
                BROKER,
                self.topic(),
                format!("nack_with_delay of message {}", self.uuid),
                "the delivery lost its AMQP envelope",
            )),
        };
        match scheduled {
            Ok(()) => {
                let uuid = self.uuid.clone();
                if let Err(e) = self.ack_now().await {
                    tracing::warn!(broker = BROKER, uuid = %uuid, error = %e,
                        "the delayed copy is scheduled but the original could not be acked; \
                         it will be delivered twice");
                }
                Ok(())
            }
            Err(e) => {
                let _ = self.requeue().await;
                Err(e)
            }
        }
    }
}

impl Acknowledger for AmqpAcker {
    fn ack(self: Box<Self>) -> AckFuture {
        self.ack_now()
    }

    /// Nacks run as tasks of the subscriber (see `settle_in_task`): the returned future
    /// only waits for the outcome, and dropping it does not stop the nack.
    fn nack(self: Box<Self>, delay: Option<Duration>) -> AckFuture {
        let ordered = self.lease.inner.config.ordered;
        let park = match delay.filter(|d| !d.is_zero()) {
            // Order per key: nothing of the queue may overtake the message.
            Some(delay) if ordered && !self.keyless => return self.hold(delay),
            Some(delay) => Some(delay),
            None if ordered && self.keyless => Some(Duration::ZERO),
            None => None,
        };
        match park {
            Some(delay) => self.settle_in_task(move |acker| acker.park(delay)),
            None => self.settle_in_task(|acker| acker.requeue()),
        }
    }
}

impl Inner {
    /// Publishes a parked copy of a delivery to the delay queue for `delay` of `lease`'s
    /// queue (declaring it, which also keeps it from expiring) and waits for the broker's
    /// confirm.
    async fn park(
        &self,
        lease: &Lease,
        properties: BasicProperties,
        payload: &Bytes,
        uuid: &str,
        delay: Duration,
    ) -> Result<()> {
        let topic = lease.spec.topic.as_str();
        let context = || {
            if delay.is_zero() {
                format!("nack (re-publish to the back of the queue) of message {uuid}")
            } else {
                format!("nack_with_delay({delay:?}) of message {uuid}")
            }
        };
        let (name, options, arguments) = delay_queue(lease, delay)
            .map_err(|why| Error::permanent(BROKER, topic, context(), why))?;
        let deadline = Instant::now() + self.config.publish_timeout;
        let work = async {
            let (channel, _) = self.control.get(&self.connector, topic, deadline).await?;
            let result = async {
                channel
                    .queue_declare(short(topic, &name)?, options, arguments)
                    .await
                    .map_err(|e| broker_error(topic, format!("declare delay queue `{name}`"), e))?;
                let mut batch = [Encoded {
                    routing_key: short(topic, &name)?,
                    properties,
                    payload: payload.clone(),
                    uuid: Arc::from(uuid),
                }];
                publish_batch(&channel, topic, &ShortString::default(), false, &mut batch)
                    .await
                    .map(drop)
            }
            .await;
            if result.is_err() && !channel.status().connected() {
                self.control.discard(&channel);
            }
            result
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(result) => result.map_err(|e| match e {
                Error::Broker {
                    broker,
                    topic,
                    context: what,
                    transient,
                    source,
                } => Error::Broker {
                    broker,
                    topic,
                    context: format!("{}: {what}", context()),
                    transient,
                    source,
                },
                other => other,
            }),
            Err(_) => Err(Error::transient(
                BROKER,
                topic,
                context(),
                format!(
                    "not confirmed within the publish timeout of {:?}",
                    self.config.publish_timeout
                ),
            )),
        }
    }
}

/// The delay queue for `delay` on `lease`'s queue: its name, declare options and arguments
/// (message TTL: `delay` rounded up to the [delay ladder](ladder_ms); dead-lettering back to
/// the queue through the default exchange).
fn delay_queue(
    lease: &Lease,
    delay: Duration,
) -> std::result::Result<(String, QueueDeclareOptions, FieldTable), String> {
    let ms = ladder_ms(delay.as_millis())
        .ok_or_else(|| format!("delays are limited to {} ms (AMQP message TTL)", u32::MAX))?;
    let name = delay_queue_name(&lease.queue, ms);
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(i64::from(ms)),
    );
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(lease.queue.as_bytes().into()),
    );
    // Unused (not declared again) for twice the delay plus a minute: gone, and every
    // message in it expired. Each park declares it again.
    arguments.insert(
        "x-expires".into(),
        AMQPValue::LongLongInt(2 * i64::from(ms) + 60_000),
    );
    let options = match lease.kind {
        QueueKind::Group => QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        QueueKind::Exclusive => QueueDeclareOptions {
            exclusive: true,
            ..QueueDeclareOptions::default()
        },
    };
    Ok((name, options, arguments))
}

/// The delay ladder: `ms` rounded up to the next of 0 ms and ⌈2^(k/4)⌉ ms (1, 2, 3, 4, 5,
/// 6, 7, 8, 10, 12, 14, 16, 20, ..., 1024, 1218, 1449, 1723, 2048, ...): at most 19 %
/// (and 1 ms) more. Arbitrary (e.g. jittered) delays thus share few delay queues: four per doubling,
/// 38 for the router's default redelivery delays (100 ms to 60 s). `None` above the largest
/// AMQP message TTL (`u32::MAX` ms).
pub(crate) fn ladder_ms(ms: u128) -> Option<u32> {
    if ms > u128::from(u32::MAX) {
        return None;
    }
    if ms == 0 {
        return Some(0);
    }
    // ⌈2^(k/4)⌉ for the smallest k that reaches `ms`; the float estimate of k is corrected
    // by stepping (f64 is exact enough around these magnitudes, but do not rely on it).
    let step = |k: i32| -> u128 { 2f64.powf(f64::from(k) / 4.0).ceil() as u128 };
    let mut k = (4.0 * (ms as f64).log2()).floor() as i32;
    while k > 0 && step(k - 1) >= ms {
        k -= 1;
    }
    while step(k) < ms {
        k += 1;
    }
    Some(u32::try_from(step(k)).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_the_ladder() {
        for (ms, rounded) in [
            (0, 0),
            (1, 1),
            (2, 2),
            (3, 3),
            (100, 108),
            (108, 108),
            (109, 128),
            (1000, 1024),
            (1024, 1024),
            (1025, 1218),
            (30_000, 32_768),
        ] {
            assert_eq!(ladder_ms(ms), Some(rounded), "{ms}");
        }
        assert_eq!(ladder_ms(u128::from(u32::MAX)), Some(u32::MAX));
        assert_eq!(ladder_ms(u128::from(u32::MAX) + 1), None);
        for ms in (1..100_000u128).step_by(7) {
            let r = u128::from(ladder_ms(ms).unwrap());
            assert!(r >= ms && r * 100 <= ms * 119 + 100, "{ms} → {r}");
        }
    }

    #[test]
    fn the_default_redelivery_delays_use_few_delay_queues() {
        // The router's default: 100 ms doubling to 30 s, jittered up to twice that.
        let distinct: std::collections::BTreeSet<u32> = (100..=60_000u128)
            .map(|ms| ladder_ms(ms).unwrap())
            .collect();
        assert!(distinct.len() <= 40, "{} delay queues", distinct.len());
    }

    #[test]
    fn delay_queue_names_fit_amqp() {
        assert_eq!(
            delay_queue_name("orders.billing", 1500),
            "orders.billing.tidemill-delay-1500ms"
        );
        let long = "q".repeat(250);
        let name = delay_queue_name(&long, 1000);
        assert!(name.len() <= MAX_NAME_BYTES, "{name}");
        assert!(name.contains(DELAY_QUEUE_MARKER));
        assert_eq!(name, delay_queue_name(&long, 1000), "stable");
    }
}
