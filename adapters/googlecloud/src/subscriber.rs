//! The subscriber: one Pub/Sub subscription per (topic, group), consumed by a streaming pull.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
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

use crate::client::{self, Admin, Endpoint};
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
        Ok(GoogleCloudSubscriber {
            inner: Arc::new(Inner {
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
            topic: Arc::new(name),
            subscription,
            unique,
            stopped: stop.clone(),
        });
        let pull = Arc::new(Pull {
            state: Mutex::new(PullState::Idle(ctx.open(), false)),
            ctx,
        });
        tracing::debug!(topic = %pull.ctx.topic.path, subscription = %pull.ctx.subscription, "subscribed");
        inner.tasks.spawn(
            pull.clone()
                .watch(stop.clone(), options.cancellation().cloned()),
        );
        Ok(DeliveryStream::new(Inbox {
            pull,
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

    /// Ends every stream (their pulls stop at once; deliveries already handed out can still
    /// be settled) and deletes the subscriptions of group-less subscribe calls.
    async fn close(&self) -> Result<()> {
        let inner = &self.inner;
        inner.closed.cancel();
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

/// The application's end of a subscription. The application's task polls the streaming
/// pull directly (no hand-off between tasks); the pull state is shared with a watcher
/// task that drops it the moment the subscription stops, whether or not the application
/// still polls.
struct Inbox {
    pull: Arc<Pull>,
    /// Dropping the stream stops the subscription.
    _stop_on_drop: DropGuard,
}

impl Stream for Inbox {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.pull.poll_next(cx)
    }
}

/// One subscription's streaming pull and what it needs to recover.
struct Pull {
    ctx: Arc<PullContext>,
    /// Locked only while polling (never across an await), so the watcher can always take
    /// the pull away.
    state: Mutex<PullState>,
}

struct PullContext {
    inner: Arc<Inner>,
    topic: Arc<TopicName>,
    subscription: String,
    unique: bool,
    /// Cancelled when the subscription stops (stream dropped or cancelled, subscriber
    /// closed): messages held for a delayed nack are released then.
    stopped: CancellationToken,
}

enum PullState {
    /// Ready to read the next message; `true` once the streaming pull has been read from
    /// (it may hold messages read ahead).
    Idle(Box<MessageStream>, bool),
    /// Reading (or recovering); the future owns the message stream meanwhile.
    Busy(BoxFuture<'static, (Option<Result<Delivery>>, Next)>),
    /// Must recover before reading again.
    Recover(Recovery),
    /// Ended: stopped, or failed for good.
    Done,
}

/// What follows a step of the pull.
enum Next {
    Read(Box<MessageStream>),
    Recover(Recovery),
    Done,
}

#[derive(Clone, Copy)]
enum Recovery {
    /// The subscription vanished: create it again, then re-open the pull.
    Recreate,
    /// A transient failure ended the pull: re-open it after a pause.
    Reopen,
}

impl Pull {
    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Delivery>>> {
        let mut state = self.state.lock();
        loop {
            match std::mem::replace(&mut *state, PullState::Done) {
                PullState::Idle(stream, _) => {
                    *state = PullState::Busy(Box::pin(self.ctx.clone().read(stream)));
                }
                PullState::Recover(how) => {
                    *state = PullState::Busy(Box::pin(self.ctx.clone().recover(how)));
                }
                PullState::Busy(mut step) => match step.as_mut().poll(cx) {
                    Poll::Pending => {
                        *state = PullState::Busy(step);
                        return Poll::Pending;
                    }
                    Poll::Ready((item, next)) => {
                        *state = match next {
                            Next::Read(stream) => PullState::Idle(stream, true),
                            Next::Recover(how) => PullState::Recover(how),
                            Next::Done => PullState::Done,
                        };
                        if let Some(item) = item {
                            return Poll::Ready(Some(item));
                        }
                    }
                },
                PullState::Done => return Poll::Ready(None),
            }
        }
    }

    /// Ends the pull: messages the client read ahead but did not hand out are nacked (so
    /// other members of the group get them at once), then the message stream is dropped,
    /// which closes the streaming pull; the client keeps leasing only deliveries the
    /// application still holds, until settled.
    fn stop(&self) {
        let old = std::mem::replace(&mut *self.state.lock(), PullState::Done);
        if let PullState::Idle(mut stream, true) = old {
            // Whatever the client has already read comes out without waiting; a dropped
            // handler nacks its message. (A busy read has nothing read ahead: the client
            // only reads from the network once its buffer is empty.)
            let mut released = 0;
            while let Some(Some(Ok((_, handler)))) = stream.next().now_or_never() {
                drop(handler);
                released += 1;
            }
            if released > 0 {
                tracing::debug!(subscription = %self.ctx.subscription, released, "released messages read ahead");
            }
        }
    }

    /// Waits for the subscription to stop, stops the pull and cleans up.
    async fn watch(self: Arc<Self>, stop: CancellationToken, user: Option<CancellationToken>) {
        match user {
            Some(user) => tokio::select! {
                _ = stop.cancelled() => {}
                _ = user.cancelled() => {}
            },
            None => stop.cancelled().await,
        }
        // Either way, the subscription is over (releases delayed nacks).
        stop.cancel();
        self.stop();
        let ctx = &self.ctx;
        if ctx.unique && ctx.inner.config.delete_unique_subscriptions {
            if let Err(e) = ctx
                .inner
                .admin
                .delete_subscription(&ctx.topic.path, &ctx.subscription)
                .await
            {
                tracing::warn!(error = %e, "could not delete subscription {}", ctx.subscription);
            }
        }
        tracing::debug!(subscription = %ctx.subscription, "subscription stream ended");
    }
}

impl PullContext {
    /// A new streaming pull (it connects when first read).
    fn open(&self) -> Box<MessageStream> {
        let c = &self.inner.config;
        Box::new(
            self.inner
                .client
                .subscribe(self.subscription.clone())
                .set_max_outstanding_messages(
                    i64::try_from(c.max_outstanding_messages).unwrap_or(i64::MAX),
                )
                .set_max_outstanding_bytes(
                    i64::try_from(c.max_outstanding_bytes).unwrap_or(i64::MAX),
                )
                .set_max_lease(c.max_lease)
                .set_max_lease_extension(c.max_lease_extension)
                // Deliveries handed out stay valid (and leased) until settled.
                .set_shutdown_behavior(ShutdownBehavior::WaitForProcessing)
                .build(),
        )
    }

    /// Reads the next message.
    async fn read(
        self: Arc<Self>,
        mut stream: Box<MessageStream>,
    ) -> (Option<Result<Delivery>>, Next) {
        match stream.next().await {
            Some(Ok((message, handler))) => (
                Some(Ok(self.delivery(message, handler))),
                Next::Read(stream),
            ),
            Some(Err(e)) => {
                // The client retries connection failures itself; what reaches us ended the
                // pull.
                let not_found = client::code(&e) == Some(Code::NotFound);
                let transient = client::is_transient(&e);
                let err = client::broker_error(
                    &self.topic.path,
                    format!("receive from subscription `{}`", self.subscription),
                    e,
                );
                tracing::warn!(error = %err, "pubsub streaming pull failed");
                let next = if not_found && self.inner.config.create_subscriptions {
                    // The subscription vanished (deleted, expired, emulator restarted).
                    Next::Recover(Recovery::Recreate)
                } else if transient {
                    Next::Recover(Recovery::Reopen)
                } else {
                    Next::Done
                };
                (Some(Err(err)), next)
            }
            None => (None, Next::Done),
        }
    }

    /// Recovers from a failed pull.
    async fn recover(self: Arc<Self>, how: Recovery) -> (Option<Result<Delivery>>, Next) {
        match how {
            Recovery::Reopen => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                (None, Next::Read(self.open()))
            }
            Recovery::Recreate => {
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
                        Ok(()) => return (None, Next::Read(self.open())),
                        Err(e) if e.is_transient() => {
                            tracing::warn!(error = %e, "re-creating the subscription failed; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                        }
                        Err(e) => return (Some(Err(e)), Next::Done),
                    }
                }
            }
        }
    }

    fn delivery(&self, message: PubsubMessage, handler: Handler) -> Delivery {
        let attempt = attempt(handler.delivery_attempt());
        let msg = decode(
            message,
            &Source {
                topic: &self.topic.path,
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
}

/// How long before the end of `max_lease` a delayed nack is sent at the latest.
const LEASE_MARGIN: Duration = Duration::from_secs(5);

impl Acker {
    fn settle(handler: Handler, topic: Arc<TopicName>, ack: bool) -> AckFuture {
        match handler {
            Handler::ExactlyOnce(h) => AckFuture::boxed(async move {
                let (result, what) = if ack {
                    (h.confirmed_ack().await, "acknowledge")
                } else {
                    (h.confirmed_nack().await, "nack")
                };
                result.map_err(|e| ack_error(&topic.path, what, e))
            }),
            other => {
                if ack {
                    other.ack();
                } else {
                    other.nack();
                }
                AckFuture::ready(Ok(()))
            }
        }
    }
}

impl Acknowledger for Acker {
    fn ack(self: Box<Self>) -> AckFuture {
        let Acker { handler, topic, .. } = *self;
        Acker::settle(handler, topic, true)
    }

    fn nack(self: Box<Self>, delay: Option<Duration>) -> AckFuture {
        let Acker {
            handler,
            topic,
            received,
            max_lease,
            stopped,
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
                    if let Err(e) = Acker::settle(handler, topic, false).await {
                        tracing::warn!(error = %e, "delayed nack failed; Pub/Sub redelivers after the ack deadline");
                    }
                });
                AckFuture::ready(Ok(()))
            }
            _ => Acker::settle(handler, topic, false),
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
