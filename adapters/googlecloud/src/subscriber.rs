//! The subscriber: one Pub/Sub subscription per (topic, group), consumed by a streaming pull.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;
use futures::Stream;
use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::error::AckError;
use google_cloud_pubsub::model::Message as PubsubMessage;
use google_cloud_pubsub::subscriber::handler::Handler;
use google_cloud_pubsub::subscriber::{MessageStream, ShutdownBehavior};
use parking_lot::Mutex;
use tidemill_core::{
    AckFuture, Acknowledger, CancellationToken, Delivery, DeliveryStream, Error, Result,
    SubscribeOptions, Subscriber,
};
use tokio_util::sync::DropGuard;
use tokio_util::task::TaskTracker;

use crate::client::{self, Admin, Endpoint, Liveness};
use crate::config::GoogleCloudConfig;
use crate::convert::{attempt, decode, Source};
use crate::names::{group_subscription, topic_name, unique_subscription, TopicName};
use crate::BROKER;

/// Consumes Pub/Sub subscriptions. Cheap to clone (clones share the connection and are
/// closed together).
///
/// - `subscribe(topic, SubscribeOptions::group(g))` consumes the subscription
///   `{prefix}{topic}.{g}`: every subscriber of the group competes for its messages, and
///   the subscription keeps collecting messages while nobody consumes.
/// - `subscribe(topic, SubscribeOptions::new())` creates a subscription of its own (deleted
///   when the stream ends, unless `delete_unique_subscriptions` is off).
///
/// `subscribe` returns once the subscription exists, with the streaming pull started:
/// every message published after it returns is delivered. Pub/Sub delivers only messages
/// published while a subscription exists, so create a group's subscription with
/// [`initialize`](Subscriber::initialize) before publishing when messages published before
/// the first subscriber must not be missed.
///
/// ```no_run
/// use futures::StreamExt;
/// use tidemill_core::{SubscribeOptions, Subscriber};
/// use tidemill_googlecloud::{GoogleCloudConfig, GoogleCloudSubscriber};
///
/// # async fn run() -> tidemill_core::Result<()> {
/// let subscriber = GoogleCloudSubscriber::connect(GoogleCloudConfig::new("my-project")).await?;
/// let mut stream = subscriber.subscribe("orders", SubscribeOptions::group("billing")).await?;
/// while let Some(delivery) = stream.next().await {
///     let delivery = delivery?;
///     println!("{}", delivery.message());
///     delivery.ack().await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct GoogleCloudSubscriber {
    inner: Arc<Inner>,
}

struct Inner {
    config: GoogleCloudConfig,
    endpoint: Endpoint,
    admin: Admin,
    client: google_cloud_pubsub::client::Subscriber,
    closed: CancellationToken,
    tasks: TaskTracker,
    /// Streaming pulls that failed and are not re-opened yet (health: disconnected).
    recovering: std::sync::atomic::AtomicUsize,
    /// Whether the service answers (checked only once the state was asked for).
    liveness: Arc<Liveness>,
}

impl GoogleCloudSubscriber {
    /// Validates `config`, connects and checks that the service answers (within
    /// `connect_timeout`; the error names the address).
    pub async fn connect(config: GoogleCloudConfig) -> Result<Self> {
        config.validate()?;
        let endpoint = Endpoint::resolve(&config)?;
        let topics = endpoint.topic_admin().await?;
        endpoint
            .probe(&topics, &config.project_id, config.connect_timeout)
            .await?;
        let subscriptions = endpoint.subscription_admin().await?;
        let client = endpoint.subscriber().await?;
        tracing::debug!(address = %endpoint.address, project = %config.project_id, "pubsub subscriber connected");
        let liveness = Liveness::new(topics.clone(), &config, &endpoint);
        Ok(GoogleCloudSubscriber {
            inner: Arc::new(Inner {
                liveness,
                admin: Admin {
                    topics,
                    subscriptions: Some(subscriptions),
                    timeout: config.operation_timeout,
                },
                config,
                endpoint,
                client,
                closed: CancellationToken::new(),
                tasks: TaskTracker::new(),
                recovering: std::sync::atomic::AtomicUsize::new(0),
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &GoogleCloudConfig {
        &self.inner.config
    }

    /// The address errors name: the emulator's `host:port` or the endpoint URL.
    pub fn address(&self) -> &str {
        &self.inner.endpoint.address
    }

    /// The full name of the subscription a group consumes on `topic`
    /// (`projects/P/subscriptions/{prefix}{topic}.{group}`).
    pub fn subscription_name(&self, topic: &str, group: &str) -> Result<String> {
        let config = &self.inner.config;
        let name = topic_name(&config.project_id, topic)?;
        group_subscription(
            &config.project_id,
            &config.subscription_prefix,
            &name,
            group,
        )
    }

    fn closed_error(topic: &str) -> Error {
        Error::SubscriberClosed {
            broker: BROKER,
            topic: topic.to_owned(),
        }
    }
}

#[async_trait]
impl Subscriber for GoogleCloudSubscriber {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<DeliveryStream> {
        let inner = &self.inner;
        let config = &inner.config;
        if inner.closed.is_cancelled() {
            return Err(Self::closed_error(topic));
        }
        let name = topic_name(&config.project_id, topic)?;
        let (subscription, unique) = match options.consumer_group() {
            Some(group) => (
                group_subscription(
                    &config.project_id,
                    &config.subscription_prefix,
                    &name,
                    group,
                )?,
                false,
            ),
            None if !config.create_subscriptions => {
                return Err(Error::config(
                    BROKER,
                    format!(
                        "subscribing to `{}` without a consumer group needs a subscription of \
                         its own, but `create_subscriptions` is off",
                        name.path
                    ),
                ))
            }
            None => (
                unique_subscription(&config.project_id, &config.subscription_prefix, &name)?,
                true,
            ),
        };
        inner
            .admin
            .ensure_subscription(config, &name, &subscription, unique)
            .await?;
        if inner.closed.is_cancelled() {
            if unique {
                let _ = inner
                    .admin
                    .delete_subscription(&name.path, &subscription)
                    .await;
            }
            return Err(Self::closed_error(topic));
        }

        let stop = inner.closed.child_token();
        let ctx = Arc::new(PullContext {
            inner: inner.clone(),
            topic_path: Arc::from(name.path.as_str()),
            topic: Arc::new(name),
            subscription: Arc::from(subscription),
            unique,
            stopped: stop.clone(),
            outstanding: Arc::default(),
        });
        let buffer = Arc::new(Mutex::new(Buffer::default()));
        tracing::debug!(topic = %ctx.topic.path, subscription = %ctx.subscription, "subscribed");
        inner.tasks.spawn(ctx.clone().pull(
            buffer.clone(),
            stop.clone(),
            options.cancellation().cloned(),
        ));
        Ok(DeliveryStream::new(Inbox {
            buffer,
            _stop_on_drop: stop.drop_guard(),
        })
        .with_options(&options))
    }

    /// With a group: creates the topic and the group's subscription, so that messages
    /// published from now on are kept for the group. Without a group: creates the topic
    /// (a subscription of its own is made by each `subscribe`).
    async fn initialize(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        let inner = &self.inner;
        let config = &inner.config;
        if inner.closed.is_cancelled() {
            return Err(Self::closed_error(topic));
        }
        let name = topic_name(&config.project_id, topic)?;
        match options.consumer_group() {
            Some(group) => {
                let subscription = group_subscription(
                    &config.project_id,
                    &config.subscription_prefix,
                    &name,
                    group,
                )?;
                inner
                    .admin
                    .ensure_subscription(config, &name, &subscription, false)
                    .await
            }
            None => inner.admin.ensure_topic(&name, config.create_topics).await,
        }
    }

    /// Down while a streaming pull that failed is being re-opened (or its subscription
    /// re-created), and while the service does not answer the background check (see
    /// [`health_check_interval`](GoogleCloudConfig::health_check_interval); the first call
    /// starts the checks). The client retries connection failures inside a pull by
    /// itself without telling, so a pull alone does not show an outage. No round trip on
    /// the call itself.
    fn connection_state(&self) -> tidemill_core::ConnectionState {
        if self.inner.closed.is_cancelled() {
            tidemill_core::ConnectionState::Closed
        } else if self
            .inner
            .recovering
            .load(std::sync::atomic::Ordering::Acquire)
            > 0
        {
            tidemill_core::ConnectionState::Disconnected
        } else {
            self.inner.liveness.state()
        }
    }

    /// Ends every stream (their pulls stop at once; deliveries already handed out can still
    /// be settled) and deletes the subscriptions of group-less subscribe calls.
    async fn close(&self) -> Result<()> {
        let inner = &self.inner;
        inner.closed.cancel();
        inner.liveness.stop();
        inner.tasks.close();
        // Each stream's clean-up is bounded by one administrative call.
        let limit = inner.config.operation_timeout + Duration::from_secs(5);
        if tokio::time::timeout(limit, inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("pubsub subscriber: clean-up did not finish within {limit:?}");
        }
        Ok(())
    }
}

impl std::fmt::Debug for GoogleCloudSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoogleCloudSubscriber")
            .field("address", &self.inner.endpoint.address)
            .field("project", &self.inner.config.project_id)
            .field("closed", &self.inner.closed.is_cancelled())
            .finish()
    }
}

/// The application's end of a subscription: takes deliveries from the buffer the pull
/// task fills.
struct Inbox {
    buffer: Arc<Mutex<Buffer>>,
    /// Dropping the stream stops the subscription.
    _stop_on_drop: DropGuard,
}

impl Stream for Inbox {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut buffer = self.buffer.lock();
        if let Some(item) = buffer.items.pop_front() {
            return Poll::Ready(Some(item));
        }
        if buffer.ended {
            return Poll::Ready(None);
        }
        if !buffer
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            buffer.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// What the pull task received and the application has not taken yet. Every message in it
/// is already under the client's lease management (its lease is extended until it is
/// settled), and it is nacked when the subscription stops, polled or not.
#[derive(Default)]
struct Buffer {
    items: VecDeque<Result<Delivery>>,
    waker: Option<Waker>,
    /// No more items will come (stopped, or failed for good).
    ended: bool,
}

impl Buffer {
    fn push(buffer: &Mutex<Buffer>, item: Result<Delivery>) {
        Self::push_all(buffer, std::iter::once(item));
    }

    /// Adds `items` in order with one lock and one wake-up.
    fn push_all(buffer: &Mutex<Buffer>, items: impl IntoIterator<Item = Result<Delivery>>) {
        let waker = {
            let mut b = buffer.lock();
            if b.ended {
                // Stopped meanwhile: dropping the deliveries nacks them.
                return;
            }
            b.items.extend(items);
            b.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Ends the buffer: the deliveries the application had not taken yet are returned, to
    /// be released; errors stay, for the application to see before the stream ends.
    fn end(buffer: &Mutex<Buffer>) -> Vec<Delivery> {
        let (items, waker) = {
            let mut b = buffer.lock();
            b.ended = true;
            let (deliveries, errors): (Vec<_>, Vec<_>) = std::mem::take(&mut b.items)
                .into_iter()
                .partition(Result::is_ok);
            b.items = errors.into();
            let deliveries: Vec<Delivery> = deliveries.into_iter().flatten().collect();
            (deliveries, b.waker.take())
        };
        if let Some(w) = waker {
            w.wake();
        }
        items
    }
}

struct PullContext {
    inner: Arc<Inner>,
    topic: Arc<TopicName>,
    /// The topic's full name, shared by every received message's record.
    topic_path: Arc<str>,
    subscription: Arc<str>,
    unique: bool,
    /// Cancelled when the subscription stops (stream dropped or cancelled, subscriber
    /// closed): messages held for a delayed nack are released then.
    stopped: CancellationToken,
    /// Deliveries made and not yet settled (buffered, handed out, held for a delayed nack).
    outstanding: Arc<AtomicUsize>,
}

/// Most messages the pull task moves into the buffer at once (those the client already
/// holds when one arrives).
const PUSH_BATCH: usize = 256;

/// How long a stopping subscription waits for deliveries being settled at that moment
/// before it flushes the client's acks; deliveries held longer are not waited for.
const SETTLE_GRACE: Duration = Duration::from_secs(1);

/// Counts a delivery as outstanding until dropped (settled, or released).
struct Outstanding(Arc<AtomicUsize>);

impl Outstanding {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Outstanding(count.clone())
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How a streaming pull ended.
enum Ended {
    /// The subscription stopped.
    Stopped,
    /// The subscription vanished: create it again, then re-open the pull.
    Recreate,
    /// A transient failure ended the pull: re-open it after a pause.
    Reopen,
    /// A permanent failure, or the client ended the stream.
    Failed,
}

impl PullContext {
    /// A new streaming pull (it connects when first read).
    fn open(&self) -> MessageStream {
        let c = &self.inner.config;
        self.inner
            .client
            .subscribe(self.subscription.to_string())
            .set_max_outstanding_messages(
                i64::try_from(c.max_outstanding_messages).unwrap_or(i64::MAX),
            )
            .set_max_outstanding_bytes(i64::try_from(c.max_outstanding_bytes).unwrap_or(i64::MAX))
            .set_max_lease(c.max_lease)
            .set_max_lease_extension(c.max_lease_extension)
            // Deliveries handed out stay valid (and leased) until settled.
            .set_shutdown_behavior(ShutdownBehavior::WaitForProcessing)
            .build()
    }

    /// The subscription's pull task: reads every message as soon as the server sends it
    /// (so the client leases it at once: a message waiting unread in transit would not be
    /// leased and could expire and come back while its first copy is handled), and puts
    /// it into `buffer` for the application. Re-opens the pull after transient failures
    /// and re-creates a vanished subscription. When the subscription stops, releases what
    /// the application has not taken, and flushes pending acks and nacks before ending
    /// (bounded by `operation_timeout`).
    async fn pull(
        self: Arc<Self>,
        buffer: Arc<Mutex<Buffer>>,
        stop: CancellationToken,
        user: Option<CancellationToken>,
    ) {
        let user = user.unwrap_or_default();
        let stopped = async {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = user.cancelled() => {}
            }
        };
        tokio::pin!(stopped);
        let mut recovery = None;
        loop {
            if let Some(how) = recovery.take() {
                let recovered = tokio::select! {
                    _ = &mut stopped => None,
                    result = self.clone().recover(how) => Some(result),
                };
                self.inner.recovering.fetch_sub(1, Ordering::AcqRel);
                match recovered {
                    None => break,
                    Some(Err(e)) => {
                        Buffer::push(&buffer, Err(e));
                        break;
                    }
                    Some(Ok(())) => {}
                }
            }
            let mut stream = self.open();
            let ended = loop {
                tokio::select! {
                    biased;
                    _ = &mut stopped => break Ended::Stopped,
                    item = stream.next() => match item {
                        Some(Ok((message, handler))) => {
                            // What the client holds already goes in with it: one lock and
                            // at most one wake-up of the application for the lot.
                            let mut batch = vec![Ok(self.delivery(message, handler))];
                            let mut end = None;
                            while batch.len() < PUSH_BATCH {
                                match stream.next().now_or_never() {
                                    Some(Some(Ok((message, handler)))) => {
                                        batch.push(Ok(self.delivery(message, handler)));
                                    }
                                    Some(Some(Err(e))) => {
                                        let (ended, err) = self.failed(e);
                                        batch.push(Err(err));
                                        end = Some(ended);
                                        break;
                                    }
                                    Some(None) => {
                                        end = Some(Ended::Failed);
                                        break;
                                    }
                                    None => break,
                                }
                            }
                            Buffer::push_all(&buffer, batch);
                            if let Some(ended) = end {
                                break ended;
                            }
                        }
                        Some(Err(e)) => {
                            let (ended, err) = self.failed(e);
                            Buffer::push(&buffer, Err(err));
                            break ended;
                        }
                        None => break Ended::Failed,
                    },
                }
            };
            match ended {
                Ended::Recreate | Ended::Reopen => {
                    self.inner.recovering.fetch_add(1, Ordering::AcqRel);
                    // Deliveries already buffered or handed out stay valid: the old
                    // stream's client keeps leasing them until they are settled.
                    self.release(stream, &buffer, false).await;
                    recovery = Some(ended);
                }
                Ended::Stopped | Ended::Failed => {
                    self.release(stream, &buffer, true).await;
                    break;
                }
            }
        }
        // Ended without a stream to release (stopped or failed while recovering).
        stop.cancel();
        drop(Buffer::end(&buffer));
        if self.unique && self.inner.config.delete_unique_subscriptions {
            if let Err(e) = self
                .inner
                .admin
                .delete_subscription(&self.topic.path, &self.subscription)
                .await
            {
                tracing::warn!(error = %e, "could not delete subscription {}", self.subscription);
            }
        }
        tracing::debug!(subscription = %self.subscription, "subscription stream ended");
    }

    /// Ends a streaming pull. Messages the client read ahead are nacked (a dropped handler
    /// nacks its message). With `last`, the subscription is over: the buffer's deliveries
    /// and those held for a delayed nack are released too, and once every delivery is
    /// settled the client's shutdown is awaited (bounded by `operation_timeout`), so the
    /// pending acks and nacks have reached Pub/Sub when `close` returns. Deliveries the
    /// application still holds keep their leases until it settles them.
    async fn release(&self, mut stream: MessageStream, buffer: &Mutex<Buffer>, last: bool) {
        let mut read_ahead = 0usize;
        while let Some(Some(Ok((_, handler)))) = stream.next().now_or_never() {
            drop(handler);
            read_ahead += 1;
        }
        let shutdown = stream.shutdown_token();
        drop(stream);
        if !last {
            return;
        }
        // Stop delayed nacks waiting (they nack at once) and release the buffer.
        self.stopped.cancel();
        let released = Buffer::end(buffer);
        let (buffered, read_ahead) = (released.len(), read_ahead);
        drop(released);
        if buffered + read_ahead > 0 {
            tracing::debug!(subscription = %self.subscription, buffered, read_ahead, "released deliveries the application had not taken");
        }
        // Give what is being settled right now (delayed nacks released above, handlers
        // finishing) a moment; deliveries the application keeps holding are not waited for.
        let settled = async {
            while self.outstanding.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout(SETTLE_GRACE, settled).await.is_ok() {
            let limit = self.inner.config.operation_timeout;
            if tokio::time::timeout(limit, shutdown.shutdown())
                .await
                .is_err()
            {
                tracing::warn!(subscription = %self.subscription, "pending acks and nacks not flushed within {limit:?}");
            }
        } else {
            tracing::debug!(
                subscription = %self.subscription,
                held = self.outstanding.load(Ordering::Acquire),
                "deliveries still held by the application stay leased until settled"
            );
        }
    }

    /// What a failed streaming pull means, and the error to report.
    fn failed(&self, e: google_cloud_pubsub::Error) -> (Ended, Error) {
        // The client retries connection failures itself; what reaches us ended the pull.
        let not_found = client::code(&e) == Some(Code::NotFound);
        let transient = client::is_transient(&e);
        let err = client::broker_error(
            &self.topic.path,
            format!("receive from subscription `{}`", self.subscription),
            e,
        );
        tracing::warn!(error = %err, "pubsub streaming pull failed");
        let ended = if not_found && self.inner.config.create_subscriptions {
            // The subscription vanished (deleted, expired, emulator restarted).
            Ended::Recreate
        } else if transient {
            Ended::Reopen
        } else {
            Ended::Failed
        };
        (ended, err)
    }

    /// Recovers from a failed pull: `Err` when that is impossible.
    async fn recover(self: Arc<Self>, how: Ended) -> Result<()> {
        match how {
            Ended::Recreate => {
                let mut backoff = Duration::from_millis(100);
                loop {
                    tracing::warn!(subscription = %self.subscription, "subscription not found; creating it again");
                    match self
                        .inner
                        .admin
                        .ensure_subscription(
                            &self.inner.config,
                            &self.topic,
                            &self.subscription,
                            self.unique,
                        )
                        .await
                    {
                        Ok(()) => return Ok(()),
                        Err(e) if e.is_transient() => {
                            tracing::warn!(error = %e, "re-creating the subscription failed; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            _ => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(())
            }
        }
    }

    fn delivery(&self, message: PubsubMessage, handler: Handler) -> Delivery {
        let attempt = attempt(handler.delivery_attempt());
        let msg = decode(
            message,
            &Source {
                topic: &self.topic_path,
                subscription: &self.subscription,
                uuid_attribute: &self.inner.config.uuid_attribute,
                delivery_attempt: attempt,
            },
        );
        let delivery = Delivery::new(
            msg,
            Acker {
                handler,
                topic: self.topic.clone(),
                received: Instant::now(),
                max_lease: self.inner.config.max_lease,
                stopped: self.stopped.clone(),
                _outstanding: Outstanding::new(&self.outstanding),
            },
        );
        match attempt {
            Some(n) => delivery.with_attempt(n),
            None => delivery,
        }
    }
}

/// Settles one Pub/Sub delivery.
struct Acker {
    handler: Handler,
    topic: Arc<TopicName>,
    /// When the client handed the message out: the lease cannot be extended past
    /// `received + max_lease`, which bounds a delayed nack.
    received: Instant,
    max_lease: Duration,
    stopped: CancellationToken,
    /// Dropped (the count decremented) once the message is settled.
    _outstanding: Outstanding,
}

/// How long before the end of `max_lease` a delayed nack is sent at the latest.
const LEASE_MARGIN: Duration = Duration::from_secs(5);

impl Acker {
    /// Acks or nacks; `outstanding` is dropped once the client has the action. With
    /// exactly-once delivery the confirmed ack or nack runs as a task, so it happens even
    /// when the caller drops the returned future (dropping the client's handler unsettled
    /// would nack the message, turning an ack into a redelivery).
    fn settle(
        handler: Handler,
        topic: Arc<TopicName>,
        ack: bool,
        outstanding: Outstanding,
    ) -> AckFuture {
        match handler {
            Handler::ExactlyOnce(h) => {
                let what = if ack { "acknowledge" } else { "nack" };
                let path = topic.clone();
                let work = async move {
                    let result = if ack {
                        h.confirmed_ack().await
                    } else {
                        h.confirmed_nack().await
                    };
                    drop(outstanding);
                    result.map_err(|e| ack_error(&topic.path, what, e))
                };
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return AckFuture::boxed(work);
                };
                let task = runtime.spawn(work);
                AckFuture::boxed(async move {
                    task.await.unwrap_or_else(|e| {
                        Err(Error::transient(
                            BROKER,
                            &path.path,
                            what,
                            format!("the task settling the message ended early: {e}"),
                        ))
                    })
                })
            }
            other => {
                if ack {
                    other.ack();
                } else {
                    other.nack();
                }
                drop(outstanding);
                AckFuture::ready(Ok(()))
            }
        }
    }
}

impl Acknowledger for Acker {
    fn ack(self: Box<Self>) -> AckFuture {
        let Acker {
            handler,
            topic,
            _outstanding: outstanding,
            ..
        } = *self;
        Acker::settle(handler, topic, true, outstanding)
    }

    fn nack(self: Box<Self>, delay: Option<Duration>) -> AckFuture {
        let Acker {
            handler,
            topic,
            received,
            max_lease,
            stopped,
            _outstanding: outstanding,
        } = *self;
        // The lease can be extended until `received + max_lease`: nack before that.
        let leased_for = max_lease.saturating_sub(received.elapsed() + LEASE_MARGIN);
        let delay = delay.map(|d| d.min(leased_for)).filter(|d| !d.is_zero());
        match (delay, tokio::runtime::Handle::try_current()) {
            (Some(delay), Ok(runtime)) if !stopped.is_cancelled() => {
                // The client does not expose ack ids, so the delay is served by keeping the
                // message leased for `delay` and nacking it then, or at once when the
                // subscription stops (so another member of the group gets it).
                runtime.spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stopped.cancelled() => {}
                    }
                    if let Err(e) = Acker::settle(handler, topic, false, outstanding).await {
                        tracing::warn!(error = %e, "delayed nack failed; Pub/Sub redelivers after the ack deadline");
                    }
                });
                AckFuture::ready(Ok(()))
            }
            _ => Acker::settle(handler, topic, false, outstanding),
        }
    }

    fn nack_on_drop(self: Box<Self>) {
        // The client's handler nacks itself when dropped, without blocking.
        drop(self);
    }
}

fn ack_error(topic: &str, what: &str, err: AckError) -> Error {
    match err {
        AckError::LeaseExpired => Error::permanent(
            BROKER,
            topic,
            what,
            "the lease expired before the operation; Pub/Sub redelivers the message",
        ),
        AckError::Rpc { source, .. } => {
            let transient = client::is_transient(&source);
            let msg = source.to_string();
            if transient {
                Error::transient(BROKER, topic, what, msg)
            } else {
                Error::permanent(BROKER, topic, what, msg)
            }
        }
        other => Error::transient(BROKER, topic, what, other),
    }
}
