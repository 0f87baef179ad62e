//! The subscriber: one Pub/Sub subscription per (topic, group), consumed by a streaming pull.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
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
use tokio::sync::mpsc;
use tokio_util::sync::DropGuard;
use tokio_util::task::TaskTracker;

use crate::client::{self, Admin, Endpoint};
use crate::config::GoogleCloudConfig;
use crate::convert::{attempt, decode};
use crate::names::{group_subscription, topic_name, unique_subscription, TopicName};
use crate::BROKER;

/// Deliveries read ahead of the application, per stream. They are leased (the client
/// extends their deadlines) and nacked when the stream ends before they are handed out.
const READ_AHEAD: usize = 64;

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
        let endpoint = Endpoint::resolve(&config);
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
        if let Some(user) = options.cancellation().cloned() {
            let stop = stop.clone();
            inner.tasks.spawn(async move {
                tokio::select! {
                    _ = user.cancelled() => stop.cancel(),
                    _ = stop.cancelled() => {}
                }
            });
        }
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let inbox = Arc::new(Mutex::new(rx));
        let pump = Pump {
            inner: inner.clone(),
            topic: Arc::new(name),
            subscription,
            unique,
            tx,
            inbox: inbox.clone(),
            stop: stop.clone(),
        };
        let stream = pump.open();
        tracing::debug!(topic = %pump.topic.path, subscription = %pump.subscription, "subscribed");
        inner.tasks.spawn(pump.run(stream));
        Ok(DeliveryStream::new(Inbox {
            rx: inbox,
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
        if tokio::time::timeout(limit, inner.tasks.wait()).await.is_err() {
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

/// The application's end of a subscription: deliveries read ahead by the pump.
struct Inbox {
    /// Shared with the pump, which drains it when the subscription stops so that nothing
    /// read ahead stays leased while nobody reads.
    rx: Arc<Mutex<mpsc::Receiver<Result<Delivery>>>>,
    /// Dropping the stream stops the pump.
    _stop_on_drop: DropGuard,
}

impl Stream for Inbox {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.lock().poll_recv(cx)
    }
}

/// Drives one streaming pull: reads messages, hands them to the inbox, re-opens the pull
/// after failures, and cleans up when the subscription stops.
struct Pump {
    inner: Arc<Inner>,
    topic: Arc<TopicName>,
    subscription: String,
    unique: bool,
    tx: mpsc::Sender<Result<Delivery>>,
    inbox: Arc<Mutex<mpsc::Receiver<Result<Delivery>>>>,
    stop: CancellationToken,
}

impl Pump {
    /// A new streaming pull (it connects when first read).
    fn open(&self) -> MessageStream {
        let c = &self.inner.config;
        self.inner
            .client
            .subscribe(self.subscription.clone())
            .set_max_outstanding_messages(c.max_outstanding_messages)
            .set_max_outstanding_bytes(c.max_outstanding_bytes)
            .set_max_lease(c.max_lease)
            .set_max_lease_extension(c.max_lease_extension)
            // Deliveries handed out stay valid (and leased) until settled.
            .set_shutdown_behavior(ShutdownBehavior::WaitForProcessing)
            .build()
    }

    async fn run(self, mut stream: MessageStream) {
        loop {
            let item = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                item = stream.next() => item,
            };
            match item {
                Some(Ok((message, handler))) => {
                    let delivery = self.delivery(message, handler);
                    if !self.hand_out(Ok(delivery)).await {
                        break;
                    }
                }
                Some(Err(e)) => {
                    // The client retries connection failures itself; what reaches us ended
                    // the pull.
                    let not_found = client::code(&e) == Some(Code::NotFound);
                    let transient = client::is_transient(&e);
                    let err = client::broker_error(
                        &self.topic.path,
                        format!("receive from subscription `{}`", self.subscription),
                        e,
                    );
                    tracing::warn!(error = %err, "pubsub streaming pull failed");
                    if !self.hand_out(Err(err)).await {
                        break;
                    }
                    let recover = if not_found && self.inner.config.create_subscriptions {
                        // The subscription vanished (deleted, expired, emulator restarted).
                        self.recreate().await
                    } else if transient {
                        self.pause(Duration::from_secs(1)).await
                    } else {
                        false
                    };
                    if !recover {
                        break;
                    }
                    stream = self.open();
                }
                None => break,
            }
        }
        self.clean_up(stream).await;
    }

    fn delivery(&self, message: PubsubMessage, handler: Handler) -> Delivery {
        let msg = decode(message, &self.topic.path);
        let attempt = attempt(handler.delivery_attempt());
        let delivery = Delivery::new(
            msg,
            Acker {
                handler,
                topic: self.topic.clone(),
            },
        );
        match attempt {
            Some(n) => delivery.with_attempt(n),
            None => delivery,
        }
    }

    /// Hands an item to the application; `false` when the subscription stopped meanwhile
    /// (a delivery not handed out is dropped, which nacks it).
    async fn hand_out(&self, item: Result<Delivery>) -> bool {
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => false,
            sent = self.tx.send(item) => sent.is_ok(),
        }
    }

    /// Sleeps `d`; `false` if the subscription stopped meanwhile.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// Re-creates the topic and subscription, retrying transient failures with backoff.
    async fn recreate(&self) -> bool {
        let mut backoff = Duration::from_millis(100);
        loop {
            let config = &self.inner.config;
            tracing::warn!(subscription = %self.subscription, "subscription not found; creating it again");
            match self
                .inner
                .admin
                .ensure_subscription(config, &self.topic, &self.subscription, self.unique)
                .await
            {
                Ok(()) => return true,
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, "re-creating the subscription failed; retrying");
                    if !self.pause(backoff).await {
                        return false;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(e) => {
                    let _ = self.hand_out(Err(e)).await;
                    return false;
                }
            }
        }
    }

    async fn clean_up(self, stream: MessageStream) {
        // Dropping the message stream ends the pull; the client keeps leasing only the
        // deliveries the application still holds, until they are settled.
        drop(stream);
        let left: Vec<Result<Delivery>> = {
            let mut rx = self.inbox.lock();
            rx.close();
            std::iter::from_fn(|| rx.try_recv().ok()).collect()
        };
        // Read ahead but never handed out: nacked (dropping a delivery nacks it).
        drop(left);
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
}

/// Settles one Pub/Sub delivery.
struct Acker {
    handler: Handler,
    topic: Arc<TopicName>,
}

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
        let Acker { handler, topic } = *self;
        Acker::settle(handler, topic, true)
    }

    fn nack(self: Box<Self>, delay: Option<Duration>) -> AckFuture {
        let Acker { handler, topic } = *self;
        let delay = delay.filter(|d| !d.is_zero());
        match (delay, tokio::runtime::Handle::try_current()) {
            (Some(delay), Ok(runtime)) => {
                // The client does not expose ack ids, so the delay is served by keeping the
                // message leased for `delay` (bounded by `max_lease`) and nacking it then.
                runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
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
