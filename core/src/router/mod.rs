//! The router: runs handlers (tower services) on subscriptions, publishes their output, and
//! settles every message by the outcome rules.
//!
//! - Handler `Ok(out)` → `out` is published to the handler's output topic (confirmed by the
//!   broker) → the input is acked.
//! - Handler error, publish error, or panic → the input is nacked and redelivered after a
//!   growing delay ([`RouterConfig::redelivery`]: 100 ms doubling to 30 s, jittered, by
//!   default), never at once: a message that always fails cannot spin. Each failure is
//!   counted ([`Router::handler_stats`]) and logged, rate-limited (to standard error when
//!   the application set no tracing subscriber). Panics are caught; the router keeps
//!   running.
//! - Hooks for middleware that settles differently: an error wrapped by [`redeliver_after`]
//!   nacks with that delay; [`MessageContext::take_ack`](crate::MessageContext::take_ack)
//!   lets a layer settle the input itself before the handler finishes (see [`Settlement`]).
//! - A consumer-only handler (no output) that returns messages is a bug: counted, logged,
//!   nacked with the delay.
//! - Per handler, up to `concurrency` messages are in flight (default 1: sequential);
//!   messages with the same key are processed one after another.
//! - Graceful shutdown: stop taking deliveries → let in-flight messages finish (bounded by
//!   [`RouterConfig::close_timeout`]; past it they are abandoned and nacked) → close the
//!   publishers and subscribers the handlers used.
//! - Observable: each handler records its metrics ([`metric_names`]) through the `metrics`
//!   facade when the application installed a recorder before it started (nothing, not
//!   even the time, otherwise); a [`MessageTracer`] opens each message's span (the
//!   OpenTelemetry one continues the trace the message carries); [`Router::health`]
//!   answers readiness and liveness probes.
//!
//! ```
//! use tidemill_core::router::{HandlerResult, Router};
//! use tidemill_core::{MemoryBroker, Message, Publisher};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = MemoryBroker::new();
//! let router = Router::new();
//! router
//!     .add_handler("shout")
//!     .subscribe(broker.subscriber(), "words")
//!     .publish(broker.publisher(), "shouts")
//!     .handler(|msg: Message| async move {
//!         let text = String::from_utf8_lossy(msg.payload()).to_uppercase();
//!         HandlerResult::Ok(Message::new(text))
//!     })
//!     .await?;
//! let running = router.clone();
//! tokio::spawn(async move { running.run().await });
//! router.running().await;
//! broker.publisher().publish_one("words", Message::new("hi")).await?;
//! router.close().await?;
//! # Ok(()) }
//! ```

mod batch;
mod failure;
mod handler;
mod health;
mod observe;
mod outcome;
mod run;
mod state;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::layer::util::{Identity, Stack};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

pub use crate::context::Settlement;
use batch::BatchConfig;
pub use batch::{BatchFuture, BatchResult, BatchService, IntoBatchResult};
pub use failure::HandlerStats;
pub use handler::{
    handler_fn, BoxHandler, BoxHandlerFuture, Handler, HandlerFn, HandlerFuture, HandlerResult,
    HandlerService, IntoHandlerResult, IntoMessages, IntoOutput,
};
pub use health::{HandlerHealth, HandlerStatus, RouterHealth, RouterStatus};
pub use observe::{metrics_enabled, names as metric_names, MessageTracer, Settled};
pub use outcome::{redeliver_after, redelivery_delay, RedeliverAfter};
pub use state::StatefulRouter;

use crate::extract::HandlerArgs;
use crate::{
    Backoff, BoxError, DeliveryStream, Error, HandlerInfo, Message, Publisher, SubscribeOptions,
    Subscriber,
};
use failure::Failures;
use run::{run_handler, HandlerCtx};

/// Router settings.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// How long in-flight messages may take to finish once shutdown (or a handler stop)
    /// begins; past it they are abandoned and nacked. Default 30 s.
    pub close_timeout: Duration,
    /// Close the publishers and subscribers given to handlers when the router closes.
    /// Default true.
    pub close_clients: bool,
    /// The delay before a failed message (handler error, publish error, panic) is
    /// redelivered, by delivery attempt, unless a layer asked for another one
    /// ([`redeliver_after`]). Default [`Backoff::redelivery`]: 100 ms, doubling, at most
    /// 30 s, jittered. Where the broker reports no delivery attempt, the router counts the
    /// failures of each message itself (the most recent 10,000 to 20,000 uuids per handler).
    pub redelivery: Backoff,
    /// Opens the span each message is handled in (see [`MessageTracer`]); tidemill-otel's
    /// tracer parents it on the trace context the message carries. Default `None`: a
    /// plain `message` span.
    pub tracer: Option<Arc<dyn MessageTracer>>,
}

impl RouterConfig {
    /// Sets the [`tracer`](RouterConfig::tracer); builder style.
    pub fn with_tracer(mut self, tracer: impl MessageTracer) -> Self {
        self.tracer = Some(Arc::new(tracer));
        self
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            close_timeout: Duration::from_secs(30),
            close_clients: true,
            redelivery: Backoff::redelivery(),
            tracer: None,
        }
    }
}

/// Errors from building or running a router.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouterError {
    /// Two handlers with one name.
    #[error("a handler named `{0}` already exists")]
    DuplicateHandler(String),
    /// A handler without a subscription.
    #[error("handler `{0}` has no subscription: call .subscribe(subscriber, topic)")]
    MissingSubscriber(String),
    /// Subscribing failed when the handler started.
    #[error("handler `{handler}`: cannot subscribe to topic `{topic}`: {source}")]
    Subscribe {
        /// The handler's name.
        handler: String,
        /// Its topic.
        topic: String,
        /// The subscriber's error.
        #[source]
        source: Box<Error>,
    },
    /// The router is closing or closed.
    #[error("the router is closed; cannot {0}")]
    Closed(&'static str),
    /// `run` was called twice.
    #[error("the router is already running")]
    AlreadyRunning,
    /// No handler with that name is registered.
    #[error("no handler named `{0}`")]
    UnknownHandler(String),
    /// Closing a publisher or subscriber failed.
    #[error("closing the router's clients failed: {0}")]
    Close(#[source] Box<Error>),
    /// A handler's settings make no sense (empty name, concurrency 0).
    #[error("handler `{handler}`: {reason}")]
    InvalidHandler {
        /// The handler's name (may be empty: that is one of the reasons).
        handler: String,
        /// What is wrong.
        reason: &'static str,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum State {
    Created,
    /// `run` is subscribing the handlers registered so far.
    Starting,
    Running,
    Closing,
    Closed,
}

type RouterLayer = Arc<dyn Fn(BoxHandler) -> BoxHandler + Send + Sync>;
type Runner = Box<dyn FnOnce(HandlerRun) -> BoxFuture<'static, ()> + Send>;

/// Everything a handler loop needs once started.
pub(crate) struct HandlerRun {
    stream: DeliveryStream,
    ctx: Arc<HandlerCtx>,
    layers: Vec<RouterLayer>,
    stop: CancellationToken,
    force: CancellationToken,
}

struct Slot {
    info: Arc<HandlerInfo>,
    failures: Arc<Failures>,
    pending: Option<Pending>,
    /// The clients of a started handler (for [`Router::health`]).
    clients: Option<health::Clients>,
    stop: CancellationToken,
    force: CancellationToken,
    finished: CancellationToken,
}

struct Pending {
    subscriber: Arc<dyn Subscriber>,
    options: SubscribeOptions,
    output: Option<Arc<dyn Publisher>>,
    concurrency: usize,
    inline: bool,
    runner: Runner,
}

struct Inner {
    config: RouterConfig,
    layers: Mutex<Vec<RouterLayer>>,
    handlers: Mutex<HashMap<String, Slot>>,
    state: watch::Sender<State>,
    stop: CancellationToken,
    force: CancellationToken,
    tasks: TaskTracker,
    active: AtomicUsize,
    all_stopped: Notify,
    publishers: Mutex<Vec<Arc<dyn Publisher>>>,
    subscribers: Mutex<Vec<Arc<dyn Subscriber>>>,
    /// Handlers whose loop ended without being stopped (subscription ended, service
    /// failed), by name, with their topic: the router is no longer ready or live.
    ended: Mutex<HashMap<String, String>>,
}

/// Runs handlers; cheap to clone (clones control the same router).
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

impl Router {
    /// A router with the default configuration.
    pub fn new() -> Self {
        Self::with_config(RouterConfig::default())
    }

    /// A router with `config`.
    pub fn with_config(config: RouterConfig) -> Self {
        Router {
            inner: Arc::new(Inner {
                config,
                layers: Mutex::default(),
                handlers: Mutex::default(),
                state: watch::Sender::new(State::Created),
                stop: CancellationToken::new(),
                force: CancellationToken::new(),
                tasks: TaskTracker::new(),
                active: AtomicUsize::new(0),
                all_stopped: Notify::new(),
                publishers: Mutex::default(),
                subscribers: Mutex::default(),
                ended: Mutex::default(),
            }),
        }
    }

    /// Adds a router-level layer: it wraps every handler started afterwards, outside the
    /// handler's own layers. The first layer added is the outermost.
    pub fn layer<L>(&self, layer: L) -> &Self
    where
        L: Layer<BoxHandler> + Send + Sync + 'static,
        L::Service: Service<Message, Response = Vec<Message>> + Send + 'static,
        <L::Service as Service<Message>>::Error: Into<BoxError>,
        <L::Service as Service<Message>>::Future: Send + 'static,
    {
        let wrap: RouterLayer =
            Arc::new(move |inner| BoxHandler::new(layer.layer(inner).map_err(Into::into)));
        self.inner.layers.lock().push(wrap);
        self
    }

    /// Starts describing a handler named `name` (unique within the router).
    pub fn add_handler(&self, name: impl Into<String>) -> HandlerBuilder<'_, Identity> {
        HandlerBuilder {
            router: self,
            name: name.into(),
            subscription: None,
            options: SubscribeOptions::new(),
            output: None,
            concurrency: 1,
            inline: false,
            layered: false,
            layers: ServiceBuilder::new(),
            state: (),
        }
    }

    /// Starts every handler and runs until [`close`](Router::close) is called (or a signal
    /// arrives, see [`close_on_signals`](Router::close_on_signals)) or every handler has
    /// stopped; then shuts down gracefully. Handlers added while running start at once.
    pub async fn run(&self) -> Result<(), RouterError> {
        let mut started = false;
        self.inner.state.send_if_modified(|s| {
            if *s == State::Created {
                *s = State::Starting;
                started = true;
            }
            started
        });
        if !started {
            return Err(match *self.inner.state.borrow() {
                State::Starting | State::Running => RouterError::AlreadyRunning,
                _ => RouterError::Closed("run"),
            });
        }
        // Subscribe every registered handler; `running` fires only once all are subscribed,
        // so whatever is published after it resolves reaches them. Handlers registered
        // meanwhile are picked up by the next round; the last check and the switch to
        // Running happen under the registry lock, which `register` also takes.
        loop {
            let pending: Vec<String> = {
                let handlers = self.inner.handlers.lock();
                let pending: Vec<String> = handlers
                    .iter()
                    .filter(|(_, slot)| slot.pending.is_some())
                    .map(|(name, _)| name.clone())
                    .collect();
                if pending.is_empty() {
                    self.inner.state.send_replace(State::Running);
                    break;
                }
                pending
            };
            for name in pending {
                if let Err(e) = self.start(&name).await {
                    self.shutdown().await?;
                    return Err(e);
                }
            }
        }
        tracing::info!(
            handlers = self.inner.active.load(Ordering::Acquire),
            "router running"
        );
        loop {
            let stopped = self.inner.all_stopped.notified();
            if self.inner.stop.is_cancelled() {
                break;
            }
            tokio::select! {
                _ = self.inner.stop.cancelled() => break,
                _ = stopped => {
                    if self.inner.active.load(Ordering::Acquire) == 0 {
                        tracing::info!("every handler stopped; closing the router");
                        break;
                    }
                }
            }
        }
        self.shutdown().await
    }

    /// Resolves once the router runs (every initial handler subscribed), or has closed.
    pub async fn running(&self) {
        let mut rx = self.inner.state.subscribe();
        let _ = rx.wait_for(|s| *s >= State::Running).await;
    }

    /// Resolves once the router has closed.
    pub async fn closed(&self) {
        let mut rx = self.inner.state.subscribe();
        let _ = rx.wait_for(|s| *s == State::Closed).await;
    }

    /// Whether the router is running.
    pub fn is_running(&self) -> bool {
        *self.inner.state.borrow() == State::Running
    }

    /// Whether the router has closed.
    pub fn is_closed(&self) -> bool {
        *self.inner.state.borrow() == State::Closed
    }

    /// Shuts down gracefully and waits until closed. Idempotent.
    pub async fn close(&self) -> Result<(), RouterError> {
        let was_created = self.inner.state.send_if_modified(|s| {
            if *s == State::Created {
                *s = State::Closing;
                return true;
            }
            false
        });
        if was_created {
            // Never ran: nothing to drain.
            return self.shutdown().await;
        }
        self.inner.stop.cancel();
        self.closed().await;
        Ok(())
    }

    /// Closes the router on SIGINT (Ctrl-C) or SIGTERM.
    pub fn close_on_signals(&self) {
        let router = self.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutdown signal received; closing the router");
            if let Err(e) = router.close().await {
                tracing::error!(error = %e, "router shutdown failed");
            }
        });
    }

    /// Stops one handler gracefully (its in-flight messages finish, bounded by the close
    /// timeout) and waits until it has stopped. Its name can be used again afterwards.
    pub async fn stop_handler(&self, name: &str) -> Result<(), RouterError> {
        let (stop, force, finished, pending) = {
            let mut handlers = self.inner.handlers.lock();
            let slot = handlers
                .get_mut(name)
                .ok_or_else(|| RouterError::UnknownHandler(name.to_owned()))?;
            let pending = slot.pending.is_some();
            (
                slot.stop.clone(),
                slot.force.clone(),
                slot.finished.clone(),
                pending,
            )
        };
        if pending {
            // Registered but never started.
            self.inner.handlers.lock().remove(name);
            return Ok(());
        }
        stop.cancel();
        let timeout = self.inner.config.close_timeout;
        if tokio::time::timeout(timeout, finished.cancelled())
            .await
            .is_err()
        {
            tracing::warn!(
                handler = name,
                ?timeout,
                "handler did not finish in time; abandoning its in-flight messages"
            );
            force.cancel();
            finished.cancelled().await;
        }
        Ok(())
    }

    /// The failure counts of handler `name` while it is registered (pending or running):
    /// how many of its messages failed, panicked or could not publish their output, and
    /// how many were nacked for redelivery.
    pub fn handler_stats(&self, name: &str) -> Option<HandlerStats> {
        self.inner
            .handlers
            .lock()
            .get(name)
            .map(|slot| slot.failures.stats())
    }

    /// Names of the registered handlers (pending or running).
    pub fn handlers(&self) -> Vec<String> {
        self.inner.handlers.lock().keys().cloned().collect()
    }

    /// Registers a handler; returns whether it must be started now (the router runs).
    fn register(
        &self,
        name: String,
        info: HandlerInfo,
        pending: Pending,
    ) -> Result<bool, RouterError> {
        let mut handlers = self.inner.handlers.lock();
        let state = *self.inner.state.borrow();
        if state >= State::Closing {
            return Err(RouterError::Closed("add a handler"));
        }
        if handlers.contains_key(&name) {
            return Err(RouterError::DuplicateHandler(name));
        }
        self.inner.ended.lock().remove(&name);
        handlers.insert(
            name,
            Slot {
                info: Arc::new(info),
                failures: Arc::new(Failures::new(self.inner.config.redelivery)),
                pending: Some(pending),
                clients: None,
                stop: self.inner.stop.child_token(),
                force: self.inner.force.child_token(),
                finished: CancellationToken::new(),
            },
        );
        Ok(state == State::Running)
    }

    /// Subscribes a registered handler and spawns its loop.
    async fn start(&self, name: &str) -> Result<(), RouterError> {
        let (info, failures, pending, stop, force, finished) = {
            let mut handlers = self.inner.handlers.lock();
            let Some(slot) = handlers.get_mut(name) else {
                return Ok(());
            };
            let Some(pending) = slot.pending.take() else {
                return Ok(());
            };
            slot.clients = Some(health::Clients {
                subscriber: pending.subscriber.clone(),
                output: pending.output.clone(),
            });
            (
                slot.info.clone(),
                slot.failures.clone(),
                pending,
                slot.stop.clone(),
                slot.force.clone(),
                slot.finished.clone(),
            )
        };
        // The handler's loop watches its stop token itself (once per message) and drops the
        // stream when it stops; the subscription does not watch it a second time.
        let stream = match pending
            .subscriber
            .subscribe(&info.topic, pending.options.clone())
            .await
        {
            Ok(stream) => stream,
            Err(source) => {
                self.inner.handlers.lock().remove(name);
                return Err(RouterError::Subscribe {
                    handler: info.name.clone(),
                    topic: info.topic.clone(),
                    source: Box::new(source),
                });
            }
        };
        self.inner
            .subscribers
            .lock()
            .push(pending.subscriber.clone());
        if let Some(p) = &pending.output {
            self.inner.publishers.lock().push(p.clone());
        }
        let stopped = stop.clone();
        let run = HandlerRun {
            stream,
            ctx: Arc::new(HandlerCtx {
                info: info.clone(),
                output: pending.output,
                concurrency: pending.concurrency,
                inline: pending.inline,
                failures,
                metrics: observe::HandlerMetrics::register(&info),
                tracer: self.inner.config.tracer.clone(),
            }),
            layers: self.inner.layers.lock().clone(),
            stop,
            force,
        };
        let inner = self.inner.clone();
        let name = name.to_owned();
        let started = info.clone();
        let fut = (pending.runner)(run);
        self.inner.active.fetch_add(1, Ordering::AcqRel);
        self.inner.tasks.spawn(async move {
            fut.await;
            if !stopped.is_cancelled() {
                // Nobody stopped it: its subscription ended or its service failed.
                inner
                    .ended
                    .lock()
                    .insert(started.name.clone(), started.topic.clone());
            }
            {
                let mut handlers = inner.handlers.lock();
                // Only remove our own slot: the name may have been reused since.
                if handlers
                    .get(&name)
                    .is_some_and(|s| Arc::ptr_eq(&s.info, &started))
                {
                    handlers.remove(&name);
                }
            }
            finished.cancel();
            if inner.active.fetch_sub(1, Ordering::AcqRel) == 1 {
                inner.all_stopped.notify_waiters();
            }
        });
        tracing::debug!(handler = %info.name, topic = %info.topic, "handler started");
        Ok(())
    }

    /// Stops intake, drains (bounded by the close timeout), closes clients. Idempotent.
    async fn shutdown(&self) -> Result<(), RouterError> {
        self.inner.state.send_if_modified(|s| {
            if *s < State::Closing {
                *s = State::Closing;
                return true;
            }
            false
        });
        self.inner.stop.cancel();
        self.inner.tasks.close();
        let timeout = self.inner.config.close_timeout;
        if tokio::time::timeout(timeout, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?timeout,
                "handlers did not finish in time; abandoning in-flight messages (they are nacked)"
            );
            self.inner.force.cancel();
            self.inner.tasks.wait().await;
        }
        self.inner.handlers.lock().clear();
        let mut result = Ok(());
        if self.inner.config.close_clients {
            let publishers = std::mem::take(&mut *self.inner.publishers.lock());
            for p in publishers {
                if let Err(e) = p.close().await {
                    tracing::error!(error = %e, "closing a publisher failed");
                    result = Err(RouterError::Close(Box::new(e)));
                }
            }
            let subscribers = std::mem::take(&mut *self.inner.subscribers.lock());
            for s in subscribers {
                if let Err(e) = s.close().await {
                    tracing::error!(error = %e, "closing a subscriber failed");
                    result = Err(RouterError::Close(Box::new(e)));
                }
            }
        }
        self.inner.state.send_replace(State::Closed);
        tracing::info!("router closed");
        result
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C closes the router");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Describes one handler; finish with [`handler`](HandlerBuilder::handler) or
/// [`service`](HandlerBuilder::service). `S` is the state its handler function's
/// [`State`](crate::extract::State) arguments read (see [`state`](HandlerBuilder::state)).
#[must_use = "a handler is added only by .service(..) or .handler(..)"]
pub struct HandlerBuilder<'r, L, S = ()> {
    router: &'r Router,
    name: String,
    subscription: Option<(Arc<dyn Subscriber>, String)>,
    options: SubscribeOptions,
    output: Option<(Arc<dyn Publisher>, String)>,
    concurrency: usize,
    /// Poll the messages in flight in the handler's own task rather than one task each
    /// (batch handlers: their work is the batch, not the message).
    inline: bool,
    /// Whether a handler-level layer was added (a batch handler without any takes its
    /// batches straight from the subscription).
    layered: bool,
    layers: ServiceBuilder<L>,
    state: S,
}

impl<'r, L, S> HandlerBuilder<'r, L, S> {
    /// Consumes `topic` through `subscriber`.
    pub fn subscribe(
        mut self,
        subscriber: impl Subscriber + 'static,
        topic: impl Into<String>,
    ) -> Self {
        self.subscription = Some((Arc::new(subscriber), topic.into()));
        self
    }

    /// Consumes as a member of consumer group `group`.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.options = self.options.with_group(Some(group.into()));
        self
    }

    /// Publishes the handler's output to `topic` through `publisher`. Without this the
    /// handler is consumer-only.
    pub fn publish(
        mut self,
        publisher: impl Publisher + 'static,
        topic: impl Into<String>,
    ) -> Self {
        self.output = Some((Arc::new(publisher), topic.into()));
        self
    }

    /// Up to `n` messages in flight (default 1); same-key messages stay sequential. `0` is
    /// rejected when the handler is added ([`RouterError::InvalidHandler`]).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Adds a handler-level layer (inside router-level layers; first added is outermost).
    pub fn layer<T>(self, layer: T) -> HandlerBuilder<'r, Stack<T, L>, S> {
        let (mut builder, ()) = self.rebuild(|layers, state| (layers.layer(layer), state, ()));
        builder.layered = true;
        builder
    }

    /// Makes this a batch handler: its function takes up to `max_messages` messages at once,
    /// or what arrived within `max_wait` of a batch's first message (see [`BatchHandler`]).
    /// Layers added before this apply to each message of a batch.
    pub fn batch(self, max_messages: usize, max_wait: Duration) -> BatchHandler<'r, L, S> {
        BatchHandler {
            builder: self,
            config: BatchConfig::new(max_messages, max_wait),
        }
    }

    /// Gives the handler function `state`: its [`State<T>`](crate::extract::State)
    /// arguments get a clone of it (or of a part, see
    /// [`FromRef`](crate::extract::FromRef)) with each message, so keep it cheap to clone
    /// (`Arc`s, handles). Replaces the router's state (see [`Router::with_state`]).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tidemill_core::extract::State;
    /// use tidemill_core::{MemoryBroker, Message, Router};
    ///
    /// struct Greeter { greeting: String }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let broker = MemoryBroker::new();
    /// let router = Router::new();
    /// router
    ///     .add_handler("greet")
    ///     .subscribe(broker.subscriber(), "names")
    ///     .publish(broker.publisher(), "greetings")
    ///     .state(Arc::new(Greeter { greeting: "hello".into() }))
    ///     .handler(|State(g): State<Arc<Greeter>>, name: String| async move {
    ///         Message::new(format!("{} {name}", g.greeting))
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn state<T>(self, state: T) -> HandlerBuilder<'r, L, T> {
        self.rebuild(|layers, _| (layers, state, ())).0
    }

    /// Adds the handler with an async function (or closure) as its service. Its arguments
    /// are extractors ([`crate::extract`]): the message itself (`msg: Message`, last),
    /// the state (`State<T>`), the payload decoded (`Json<T>`), metadata, key, uuid,
    /// receive context, ... It returns `Result<R, E>` ([`HandlerResult<R>`]), or a bare
    /// `R` if it cannot fail, where `R` is what to publish: `()`, `Message`,
    /// `Option<Message>`, `Vec<Message>` or `Json<T>` (encoded), and `E: Into<BoxError>`.
    ///
    /// ```
    /// use serde::{Deserialize, Serialize};
    /// use tidemill_core::extract::{Json, Metadata};
    /// use tidemill_core::{HandlerResult, MemoryBroker, Message, Router};
    ///
    /// #[derive(Deserialize, Serialize)]
    /// struct Reading { celsius: f64 }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let broker = MemoryBroker::new();
    /// let router = Router::new();
    /// // The plain style: a function of the message.
    /// router
    ///     .add_handler("log")
    ///     .subscribe(broker.subscriber(), "readings")
    ///     .handler(|msg: Message| async move {
    ///         println!("{msg}");
    ///         HandlerResult::Ok(())
    ///     })
    ///     .await?;
    /// // Extractors: a payload that is not a `Reading` fails permanently (poison).
    /// router
    ///     .add_handler("convert")
    ///     .subscribe(broker.subscriber(), "readings")
    ///     .publish(broker.publisher(), "fahrenheit")
    ///     .handler(|md: Metadata, Json(r): Json<Reading>| async move {
    ///         let _sensor = md.get("sensor");
    ///         Json(Reading { celsius: r.celsius * 9.0 / 5.0 + 32.0 })
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// A handler that always fails names its result type once, e.g. as an async closure:
    /// `async |_: Message| -> HandlerResult { Err("not yet".into()) }`.
    pub async fn handler<F, A, M>(self, f: F) -> Result<(), RouterError>
    where
        F: Handler<A> + Send + 'static,
        F::Future: Send + 'static,
        F::Output: IntoHandlerResult,
        A: HandlerArgs<S, M> + 'static,
        M: 'static,
        S: Send + 'static,
        L: Layer<HandlerService<F, A, M, S>>,
        L::Service: Service<Message, Response = Vec<Message>> + Send + 'static,
        <L::Service as Service<Message>>::Error: Into<BoxError>,
        <L::Service as Service<Message>>::Future: Send + 'static,
    {
        let (builder, state) = self.take_state();
        builder.service(HandlerService::new(f, state)).await
    }

    /// The builder without its state, and the state.
    fn take_state(self) -> (HandlerBuilder<'r, L, ()>, S) {
        self.rebuild(|layers, state| (layers, (), state))
    }

    /// The builder with the layers and state `f` makes of its own, and what else `f` returns.
    fn rebuild<L2, S2, X>(
        self,
        f: impl FnOnce(ServiceBuilder<L>, S) -> (ServiceBuilder<L2>, S2, X),
    ) -> (HandlerBuilder<'r, L2, S2>, X) {
        let HandlerBuilder {
            router,
            name,
            subscription,
            options,
            output,
            concurrency,
            inline,
            layered,
            layers,
            state,
        } = self;
        let (layers, state, extra) = f(layers, state);
        (
            HandlerBuilder {
                router,
                name,
                subscription,
                options,
                output,
                concurrency,
                inline,
                layered,
                layers,
                state,
            },
            extra,
        )
    }

    /// Adds the handler with `service`, wrapped in this builder's layers (the builder's
    /// state is not used: a service keeps its own). If the router is running, the handler
    /// starts (subscribes) before this returns.
    pub async fn service<Svc>(self, service: Svc) -> Result<(), RouterError>
    where
        L: Layer<Svc>,
        L::Service: Service<Message, Response = Vec<Message>> + Send + 'static,
        <L::Service as Service<Message>>::Error: Into<BoxError>,
        <L::Service as Service<Message>>::Future: Send + 'static,
    {
        let (builder, layers) =
            self.rebuild(|layers, state| (ServiceBuilder::new(), state, layers));
        let service = layers.service(service);
        builder
            .add(Box::new(move |run: HandlerRun| {
                layered_runner(service, run)
            }))
            .await
    }

    /// Checks the builder and registers the handler with the loop `runner` starts; if the
    /// router is running, the handler starts (subscribes) before this returns.
    async fn add(self, runner: Runner) -> Result<(), RouterError> {
        if self.name.trim().is_empty() {
            return Err(RouterError::InvalidHandler {
                handler: self.name,
                reason: "a handler needs a name that is not empty",
            });
        }
        if self.concurrency == 0 {
            return Err(RouterError::InvalidHandler {
                handler: self.name,
                reason: "concurrency must be at least 1 (1 = one message at a time)",
            });
        }
        let (subscriber, topic) = self
            .subscription
            .ok_or_else(|| RouterError::MissingSubscriber(self.name.clone()))?;
        let info = HandlerInfo {
            name: self.name.clone(),
            topic,
            group: self.options.consumer_group().map(str::to_owned),
            publish_topic: self.output.as_ref().map(|(_, t)| t.clone()),
        };
        let (output, _) = match self.output {
            Some((p, t)) => (Some(p), Some(t)),
            None => (None, None),
        };
        let router = self.router;
        let start_now = router.register(
            self.name.clone(),
            info,
            Pending {
                subscriber,
                options: self.options,
                output,
                concurrency: self.concurrency,
                inline: self.inline,
                runner,
            },
        )?;
        if start_now {
            router.start(&self.name).await?;
        }
        Ok(())
    }
}

/// The loop of a handler whose every message takes the service (wrapped in the router's
/// layers, if it has any).
fn layered_runner<Svc>(service: Svc, run: HandlerRun) -> BoxFuture<'static, ()>
where
    Svc: Service<Message, Response = Vec<Message>> + Send + 'static,
    Svc::Error: Into<BoxError>,
    Svc::Future: Send + 'static,
{
    if run.layers.is_empty() {
        Box::pin(run_handler(service, run))
    } else {
        let mut boxed = BoxHandler::new(service.map_err(Into::into));
        for wrap in run.layers.iter().rev() {
            boxed = wrap(boxed);
        }
        Box::pin(run_handler(boxed, run))
    }
}

/// A batch handler being described (from [`HandlerBuilder::batch`]); finish with
/// [`handler`](BatchHandler::handler).
///
/// The function gets a `Vec<Message>` and returns a [`BatchResult`] (or `()`,
/// `Vec<Message>` to publish, or a `Result` of these: an `Err` fails the whole batch),
/// which settles **each message on its own** by the router's outcome rules: the messages
/// that succeeded are acked (after the batch's outputs were published and confirmed), a
/// failed one is nacked with the growing delay, or handled by the layers (poison queue,
/// dead letter, retry, recoverer) exactly as a single message would be. A panic fails
/// every message of the batch as a panic.
///
/// - **How batches form**: without layers (neither the handler's nor the router's), the
///   router takes deliveries straight from the subscription until the batch is full,
///   `max_wait` has passed since its first message, or the handler stops; it calls the
///   function and settles each message in order, so the subscription must let
///   `max_messages` messages go unacked (RabbitMQ `prefetch`, NATS `max_ack_pending`,
///   Pub/Sub flow control). With layers, every message goes through them first; those that
///   reach the handler are gathered into batches, handled one batch at a time, in arrival
///   order, with up to twice `max_messages` messages in flight (or the handler's
///   [`concurrency`](HandlerBuilder::concurrency), if higher) so the next batch gathers
///   while one is handled.
/// - **Order per key**: a batch holds messages in the order the subscription hands them
///   out. Subscriptions that keep order per key hand out a key's next message only once the
///   one before is settled, so a batch holds one message per key; with layers, the router
///   keeps keys sequential the same way on every backend. Should a subscription hand out
///   several messages of one key, a batch without layers keeps their order, and when one
///   fails, the later ones of its key in that batch are nacked with it (redelivered no
///   sooner), never acked ahead of it. Messages without a key are not limited.
/// - **Retries**: a message a retry layer retries joins a later batch.
/// - **Shutdown**: a partial batch is handled at once when the handler stops taking
///   messages (or, while a layer still holds on to the handler to retry something, within
///   `max_wait`); messages abandoned past the close timeout are nacked, never acked.
///
/// ```
/// use std::time::Duration;
/// use tidemill_core::router::BatchResult;
/// use tidemill_core::{MemoryBroker, Message, Router};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = MemoryBroker::new();
/// let router = Router::new();
/// router
///     .add_handler("store")
///     .subscribe(broker.subscriber(), "readings")
///     .batch(500, Duration::from_millis(50))
///     .handler(|msgs: Vec<Message>| async move {
///         let mut result = BatchResult::ok();
///         for (i, msg) in msgs.iter().enumerate() {
///             if msg.payload().is_empty() {
///                 // Only this one fails (and is redelivered); the others are acked.
///                 result.fail(i, tidemill_core::permanent("empty reading"));
///             }
///         }
///         // ... insert the others in one statement ...
///         result
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[must_use = "a batch handler is added only by .handler(..)"]
pub struct BatchHandler<'r, L, S = ()> {
    builder: HandlerBuilder<'r, L, S>,
    config: BatchConfig,
}

impl<'r, L, S> BatchHandler<'r, L, S> {
    /// Also ends a batch before its payloads pass `bytes` (a message that would cross it
    /// starts the next batch; a larger one alone makes a batch of one).
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.config.max_bytes = Some(bytes);
        self
    }

    /// Adds the handler with the batch function `f`. If the router is running, it starts
    /// (subscribes) before this returns.
    pub async fn handler<F, Fut>(self, f: F) -> Result<(), RouterError>
    where
        F: Fn(Vec<Message>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future + Send + 'static,
        Fut::Output: IntoBatchResult,
        L: Layer<BatchService>,
        L::Service: Service<Message, Response = Vec<Message>> + Send + 'static,
        <L::Service as Service<Message>>::Error: Into<BoxError>,
        <L::Service as Service<Message>>::Future: Send + 'static,
    {
        let BatchHandler {
            builder: mut b,
            config,
        } = self;
        if config.max_messages == 0 {
            return Err(RouterError::InvalidHandler {
                handler: b.name,
                reason: "a batch holds at least 1 message (max_messages 0)",
            });
        }
        if config.max_bytes == Some(0) {
            return Err(RouterError::InvalidHandler {
                handler: b.name,
                reason: "a batch's max_bytes must be at least 1",
            });
        }
        b.concurrency = b.concurrency.max(config.max_messages.saturating_mul(2));
        b.inline = true;
        let output = batch::BatchOutput {
            handler: b.name.clone(),
            topic: b
                .subscription
                .as_ref()
                .map(|(_, t)| t.clone())
                .unwrap_or_default(),
            publisher: b.output.clone(),
        };
        let (b, _state) = b.take_state();
        if b.layered {
            return b.service(BatchService::start(f, config, output)).await;
        }
        // No handler-level layers: without router-level ones either, batches come straight
        // from the subscription (no per-message service call); otherwise each message takes
        // the router's layers on its way into the batch.
        let runner: Runner = Box::new(move |run: HandlerRun| {
            if run.layers.is_empty() {
                Box::pin(batch::run_direct(f, config, output, run))
            } else {
                layered_runner(BatchService::start(f, config, output), run)
            }
        });
        b.add(runner).await
    }
}

#[cfg(test)]
mod tests;
