//! The composition harness: runs one layer-wrapped handler in each way a tower service is
//! used and records what happened, so that a test asserts the same behaviour in every one.
//!
//! - [`Composition::Direct`]: one service, driven by `poll_ready` + `call` + `.await`;
//! - [`Composition::Oneshot`]: `tower::ServiceExt::oneshot` on a service made for the
//!   delivery, dropped right after `call` (the future outlives its service);
//! - [`Composition::Buffer`]: behind `tower::buffer::Buffer` (the service lives on the
//!   buffer's worker task, the future is polled by the caller);
//! - [`Composition::Spawned`]: under an outer layer that spawns the inner future on another
//!   task and awaits its result;
//! - [`Composition::Router`], [`Composition::Concurrent`]: as a handler of the router on
//!   the in-memory broker, one message at a time (the default) or `concurrency(8)`;
//! - [`Composition::RouterLevel`]: as a router-level layer (`router.layer(..)`, wrapping
//!   the boxed handler).
//!
//! The first four take their deliveries from the same in-memory broker, in the same
//! consumer group, and settle them like the router does (`Ok` → publish the outputs, ack;
//! error → nack with the delay the error asks for, or the router's default), so every
//! composition sees real delivery attempts and redeliveries. What the layer stack returned
//! for each delivery is recorded (a pass-through probe outside it, in the router), as is
//! every call of the handler. Tests run with tokio's clock paused: delays take no real
//! time and time differences are exact.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use parking_lot::Mutex;
use tidemill_core::router::{redelivery_delay, BoxHandler, Settlement};
use tidemill_core::{
    Backoff, BoxError, HandlerInfo, HandlerResult, MemoryBroker, MemoryPublisher, Message,
    MessageContext, Publisher, Router, RouterConfig, SubscribeOptions, Subscriber,
};
use tokio::time::Instant;
use tower::buffer::Buffer;
use tower::{Layer, Service, ServiceExt};

use super::next;

/// The handler's name in every composition.
pub const HANDLER: &str = "pay";
/// The topic it consumes.
pub const TOPIC: &str = "payments";
/// Its consumer group.
pub const GROUP: &str = "billing";
/// Where its outputs go (retained for the group of the same name, so a run can read them).
pub const OUTPUT: &str = "receipts";
/// The delay before a failed message no layer asked a delay for is redelivered: the
/// router's (configured so) and the direct driver's.
pub const REDELIVERY: Duration = Duration::from_millis(50);
/// A run that sees more deliveries than this is not going to finish.
const MAX_DELIVERIES: usize = 200;
/// How early a timer may fire, as `Instant` measures it (tokio's timers round to the
/// millisecond): lower bounds on delays allow this much.
pub const TIMER_SLACK: Duration = Duration::from_millis(2);

/// How a layer-wrapped service is used; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Composition {
    Direct,
    Oneshot,
    Buffer,
    Spawned,
    Router,
    Concurrent,
    RouterLevel,
}

impl Composition {
    /// Every composition.
    pub const ALL: [Composition; 7] = [
        Composition::Direct,
        Composition::Oneshot,
        Composition::Buffer,
        Composition::Spawned,
        Composition::Router,
        Composition::Concurrent,
        Composition::RouterLevel,
    ];

    /// Whether the router drives the service.
    pub fn is_router(self) -> bool {
        matches!(
            self,
            Composition::Router | Composition::Concurrent | Composition::RouterLevel
        )
    }
}

/// One call of the handler.
#[derive(Clone, Debug)]
pub struct Call {
    /// The message the handler got (with its receive context).
    pub message: Message,
    /// When (tokio's clock).
    pub at: Instant,
}

impl Call {
    /// The delivery attempt of the call's message (0 without one).
    pub fn attempt(&self) -> u32 {
        super::attempt(&self.message)
    }
}

type Condition = Arc<dyn Fn(&Message, u32) -> bool + Send + Sync>;
type Behaviour =
    Arc<dyn Fn(Message, u32) -> BoxFuture<'static, HandlerResult<Vec<Message>>> + Send + Sync>;

/// The innermost service: decides each call's result by a function of the message and
/// the number of the call for this message's uuid (1 for the first), and records every
/// call. Clones share the record.
#[derive(Clone)]
pub struct TestHandler {
    behaviour: Behaviour,
    panic_in_call: Option<Condition>,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl TestHandler {
    /// `f(message, n)` is the result of call `n` (from 1) for this message's uuid.
    pub fn new(
        f: impl Fn(&Message, u32) -> HandlerResult<Vec<Message>> + Send + Sync + 'static,
    ) -> Self {
        let f = Arc::new(f);
        Self::with_future(move |m, n| {
            let f = f.clone();
            Box::pin(async move { f(&m, n) })
        })
    }

    /// Like [`new`](Self::new), with an asynchronous result.
    pub fn with_future(
        f: impl Fn(Message, u32) -> BoxFuture<'static, HandlerResult<Vec<Message>>>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        TestHandler {
            behaviour: Arc::new(f),
            panic_in_call: None,
            calls: Arc::default(),
        }
    }

    /// Succeeds every time, with no output.
    pub fn ok() -> Self {
        Self::new(|_, _| Ok(Vec::new()))
    }

    /// Fails every time with `error` (transient).
    pub fn failing(error: &'static str) -> Self {
        Self::new(move |_, _| Err(error.into()))
    }

    /// Fails the first `n` calls of each message with `error`, then succeeds.
    pub fn failing_first(n: u32, error: &'static str) -> Self {
        Self::new(move |_, call| {
            if call <= n {
                Err(error.into())
            } else {
                Ok(Vec::new())
            }
        })
    }

    /// Panics in `call` itself (before any future exists) when `when(message, n)` holds.
    pub fn panicking_in_call(
        mut self,
        when: impl Fn(&Message, u32) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.panic_in_call = Some(Arc::new(when));
        self
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().clone()
    }
}

impl Service<Message> for TestHandler {
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = BoxFuture<'static, HandlerResult<Vec<Message>>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let n = {
            let mut calls = self.calls.lock();
            calls.push(Call {
                message: msg.clone(),
                at: Instant::now(),
            });
            calls
                .iter()
                .filter(|c| c.message.uuid() == msg.uuid())
                .count()
        };
        let n = u32::try_from(n).expect("few calls");
        if let Some(when) = &self.panic_in_call {
            if when(&msg, n) {
                panic!("panicked in call {n} of {}", super::text(&msg));
            }
        }
        (self.behaviour)(msg, n)
    }
}

/// How a delivery was settled, as the layer stack's result tells the router.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settled {
    /// `Ok`: the outputs are published and the input acked.
    Ack {
        /// How many outputs.
        outputs: usize,
    },
    /// An error: the input is nacked with `delay` (`None`: the router's default).
    Nack {
        /// The error's text.
        error: String,
        /// The delay the error asks for.
        delay: Option<Duration>,
    },
}

/// `Ok` with no output.
pub fn ack() -> Settled {
    Settled::Ack { outputs: 0 }
}

/// An error passed on as it is (no delay asked for).
pub fn nack(error: impl Into<String>) -> Settled {
    Settled::Nack {
        error: error.into(),
        delay: None,
    }
}

/// An error asking for a redelivery after `delay`.
pub fn nack_after(error: impl Into<String>, delay: Duration) -> Settled {
    Settled::Nack {
        error: error.into(),
        delay: Some(delay),
    }
}

/// One delivery and what the layer stack returned for it.
#[derive(Debug)]
pub struct Delivered {
    pub uuid: String,
    pub attempt: Option<u32>,
    pub started: Instant,
    pub ended: Instant,
    pub result: Result<Vec<Message>, BoxError>,
}

impl Delivered {
    fn new(
        uuid: String,
        attempt: Option<u32>,
        started: Instant,
        result: Result<Vec<Message>, BoxError>,
    ) -> Self {
        Delivered {
            uuid,
            attempt,
            started,
            ended: Instant::now(),
            result,
        }
    }

    /// The result as the router settles it.
    pub fn settled(&self) -> Settled {
        match &self.result {
            Ok(out) => Settled::Ack { outputs: out.len() },
            Err(e) => Settled::Nack {
                error: e.to_string(),
                delay: delay_of(e),
            },
        }
    }

    /// The error, if the delivery failed.
    pub fn error(&self) -> Option<&BoxError> {
        self.result.as_ref().err()
    }

    /// The outputs, if it succeeded.
    pub fn outputs(&self) -> &[Message] {
        self.result.as_deref().unwrap_or(&[])
    }
}

/// Everything a run recorded.
#[derive(Debug)]
pub struct Outcome {
    pub composition: Composition,
    /// Every call of the handler, in order.
    pub calls: Vec<Call>,
    /// Every delivery, in the order they started.
    pub deliveries: Vec<Delivered>,
    /// What was published to [`OUTPUT`].
    pub outputs: Vec<Message>,
    /// What the handler's group still holds after the run (0: every input acked).
    pub backlog: usize,
}

impl Outcome {
    /// The calls of the message `uuid`.
    pub fn calls_of(&self, uuid: &str) -> Vec<&Call> {
        self.calls
            .iter()
            .filter(|c| c.message.uuid() == uuid)
            .collect()
    }

    /// The deliveries of the message `uuid`.
    pub fn deliveries_of(&self, uuid: &str) -> Vec<&Delivered> {
        self.deliveries.iter().filter(|d| d.uuid == uuid).collect()
    }

    /// How each delivery of `uuid` was settled.
    pub fn settled(&self, uuid: &str) -> Vec<Settled> {
        self.deliveries_of(uuid)
            .iter()
            .map(|d| d.settled())
            .collect()
    }

    /// The delivery attempt of each call of `uuid`.
    pub fn call_attempts(&self, uuid: &str) -> Vec<u32> {
        self.calls_of(uuid).iter().map(|c| c.attempt()).collect()
    }

    /// The time from the end of each delivery of `uuid` to the start of the next.
    pub fn gaps(&self, uuid: &str) -> Vec<Duration> {
        self.deliveries_of(uuid)
            .windows(2)
            .map(|w| w[1].started - w[0].ended)
            .collect()
    }

    /// Every nacked delivery came back no earlier than its delay (the layer's, or the
    /// router's default): the broker did what the result asked for.
    fn check_redeliveries(&self) {
        let uuids: HashSet<&str> = self.deliveries.iter().map(|d| d.uuid.as_str()).collect();
        for uuid in uuids {
            let deliveries = self.deliveries_of(uuid);
            for pair in deliveries.windows(2) {
                if let Settled::Nack { delay, .. } = pair[0].settled() {
                    let delay = delay.unwrap_or(REDELIVERY);
                    let gap = pair[1].started - pair[0].ended;
                    assert!(
                        gap + TIMER_SLACK >= delay,
                        "{:?}: {uuid} nacked with {delay:?} came back after {gap:?}",
                        self.composition
                    );
                }
            }
        }
    }
}

/// Records what the layer stack returns for each delivery (outermost, in the router).
#[derive(Clone)]
struct Probe(Arc<Mutex<Vec<Delivered>>>);

impl<S> Layer<S> for Probe {
    type Service = ProbeService<S>;

    fn layer(&self, inner: S) -> ProbeService<S> {
        ProbeService {
            inner,
            log: self.0.clone(),
        }
    }
}

struct ProbeService<S> {
    inner: S,
    log: Arc<Mutex<Vec<Delivered>>>,
}

impl<S> Service<Message> for ProbeService<S>
where
    S: Service<Message, Response = Vec<Message>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = BoxFuture<'static, HandlerResult<Vec<Message>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let started = Instant::now();
        let log = self.log.clone();
        let uuid = msg.uuid().to_owned();
        let attempt = msg.context().and_then(|c| c.attempt());
        let fut = self.inner.call(msg);
        Box::pin(async move {
            let result = fut.await.map_err(Into::into);
            let copy = match &result {
                Ok(out) => Ok(out.clone()),
                Err(e) => Err(CopiedError::of(e)),
            };
            log.lock()
                .push(Delivered::new(uuid, attempt, started, copy));
            result
        })
    }
}

/// A copy of an error for the record: its text, its sources' texts, the redelivery delay
/// it asks for and whether it is permanent.
#[derive(Debug)]
pub struct CopiedError {
    text: String,
    source: Option<Box<CopiedError>>,
    delay: Option<Duration>,
    permanent: bool,
}

impl CopiedError {
    fn of(error: &BoxError) -> BoxError {
        Box::new(Self::copy(error.as_ref()))
    }

    fn copy(error: &(dyn std::error::Error + 'static)) -> CopiedError {
        CopiedError {
            text: error.to_string(),
            source: error.source().map(|s| Box::new(Self::copy(s))),
            delay: redelivery_delay(error),
            permanent: tidemill_core::is_permanent(error),
        }
    }
}

impl std::fmt::Display for CopiedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for CopiedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as _)
    }
}

/// The redelivery delay `error` asks for (also through a [`CopiedError`]).
pub fn delay_of(error: &BoxError) -> Option<Duration> {
    match error.downcast_ref::<CopiedError>() {
        Some(c) => c.delay,
        None => redelivery_delay(error.as_ref()),
    }
}

/// Whether `error` is permanent (also through a [`CopiedError`]).
pub fn permanent_error(error: &BoxError) -> bool {
    match error.downcast_ref::<CopiedError>() {
        Some(c) => c.permanent,
        None => tidemill_core::is_permanent(error.as_ref()),
    }
}

/// What `topic` kept for consumer group `group` of `broker` (nothing if the group does not
/// exist), each acked.
pub async fn kept_for(broker: &MemoryBroker, topic: &str, group: &str) -> Vec<Message> {
    let Some(n) = broker.group_backlog(topic, group) else {
        return Vec::new();
    };
    let mut stream = broker
        .subscriber()
        .subscribe(topic, SubscribeOptions::group(group))
        .await
        .expect("subscribe");
    let mut kept = Vec::with_capacity(n);
    for _ in 0..n {
        kept.push(next(&mut stream).await);
    }
    kept
}

/// What the harness's handler info says about where a message came from.
pub fn handler_info() -> Arc<HandlerInfo> {
    Arc::new(HandlerInfo {
        name: HANDLER.into(),
        topic: TOPIC.into(),
        group: Some(GROUP.into()),
        publish_topic: Some(OUTPUT.into()),
    })
}

/// `msg` as the harness's handler receives it, on delivery `attempt` (`None`: a broker
/// that does not count), without an acknowledgement to take.
pub fn received(mut msg: Message, attempt: Option<u32>) -> Message {
    msg.set_context(Some(MessageContext::new(handler_info(), attempt)));
    msg
}

/// An outer layer that spawns the inner service's future on another task and awaits it.
#[derive(Clone, Copy)]
pub struct SpawnLayer;

impl<S> Layer<S> for SpawnLayer {
    type Service = Spawn<S>;

    fn layer(&self, inner: S) -> Spawn<S> {
        Spawn(inner)
    }
}

/// The service of [`SpawnLayer`].
pub struct Spawn<S>(S);

impl<S> Service<Message> for Spawn<S>
where
    S: Service<Message, Response = Vec<Message>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = BoxFuture<'static, HandlerResult<Vec<Message>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let task = tokio::spawn(self.0.call(msg));
        Box::pin(async move { task.await.map_err(BoxError::from)? })
    }
}

/// A layer the harness can put in every composition: a tower layer for the test handler
/// and for the router's boxed handlers (every Tidemill layer, tower's, and stacks of them).
pub trait UnderTest: Clone + Send + Sync + 'static {
    /// The layer's service around the test handler.
    type Svc: Service<Message, Response = Vec<Message>, Error = BoxError, Future = Self::Fut>
        + Send
        + 'static;
    /// Its future.
    type Fut: Future<Output = HandlerResult<Vec<Message>>> + Send + 'static;

    /// Wraps `handler`.
    fn wrap(&self, handler: TestHandler) -> Self::Svc;

    /// Adds the layer to `router` as a router-level layer.
    fn add_to(&self, router: &Router);
}

impl<L, S, B> UnderTest for L
where
    L: Layer<TestHandler, Service = S> + Layer<BoxHandler, Service = B> + Clone + Send + Sync,
    L: 'static,
    S: Service<Message, Response = Vec<Message>, Error = BoxError> + Send + 'static,
    S::Future: Send + 'static,
    B: Service<Message, Response = Vec<Message>, Error = BoxError> + Send + 'static,
    B::Future: Send + 'static,
{
    type Svc = S;
    type Fut = S::Future;

    fn wrap(&self, handler: TestHandler) -> S {
        Layer::<TestHandler>::layer(self, handler)
    }

    fn add_to(&self, router: &Router) {
        router.layer(self.clone());
    }
}

/// One composition on a fresh in-memory broker.
pub struct Harness {
    pub composition: Composition,
    pub broker: MemoryBroker,
    settle: Duration,
    deadline: Duration,
}

impl Harness {
    /// A harness for `composition`.
    pub fn new(composition: Composition) -> Self {
        Harness {
            composition,
            broker: MemoryBroker::new(),
            settle: Duration::from_secs(60),
            deadline: Duration::from_secs(600),
        }
    }

    /// How long to wait after the run is done, to see that nothing else happens (60 s by
    /// default: of tokio's paused clock, so no real time).
    pub fn settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// A publisher to the harness's broker (for the layers' destinations).
    pub fn publisher(&self) -> MemoryPublisher {
        self.broker.publisher()
    }

    /// What `topic` kept for its consumer group `topic` (the default a dead-letter or
    /// poison layer makes it keep for), each acked.
    pub async fn kept(&self, topic: &str) -> Vec<Message> {
        self.kept_for(topic, topic).await
    }

    /// What `topic` kept for consumer group `group`, each acked.
    pub async fn kept_for(&self, topic: &str, group: &str) -> Vec<Message> {
        kept_for(&self.broker, topic, group).await
    }

    /// Publishes `inputs` to [`TOPIC`] and runs `layer` around `handler` until every input
    /// is acked, then for the settle time; returns what happened.
    pub async fn run<L: UnderTest>(
        &self,
        layer: L,
        handler: TestHandler,
        inputs: Vec<Message>,
    ) -> Outcome {
        let uuids: Vec<String> = inputs.iter().map(|m| m.uuid().to_owned()).collect();
        let broker = self.broker.clone();
        let outcome = self
            .run_inner(layer, handler, inputs, self.settle, move |deliveries| {
                broker.group_backlog(TOPIC, GROUP) == Some(0)
                    && uuids
                        .iter()
                        .all(|u| deliveries.iter().any(|d| &d.uuid == u))
            })
            .await;
        assert_eq!(
            outcome.backlog, 0,
            "{:?}: every input acked",
            self.composition
        );
        outcome
    }

    /// Like [`run`](Self::run), but stops as soon as `done` holds for the deliveries so
    /// far (no settle time): for messages that are never acked.
    pub async fn run_until<L: UnderTest>(
        &self,
        layer: L,
        handler: TestHandler,
        inputs: Vec<Message>,
        done: impl Fn(&[Delivered]) -> bool,
    ) -> Outcome {
        self.run_inner(layer, handler, inputs, Duration::ZERO, done)
            .await
    }

    async fn run_inner<L: UnderTest>(
        &self,
        layer: L,
        handler: TestHandler,
        inputs: Vec<Message>,
        settle: Duration,
        done: impl Fn(&[Delivered]) -> bool,
    ) -> Outcome {
        let stop_at = Instant::now() + self.deadline;
        let log: Arc<Mutex<Vec<Delivered>>> = Arc::default();
        self.broker
            .publisher()
            .retain_for(OUTPUT, OUTPUT)
            .await
            .expect("retain the outputs");
        let running = self.start(layer, handler.clone(), log.clone()).await;
        self.broker
            .publisher()
            .publish(TOPIC, inputs)
            .await
            .expect("publish the inputs");
        while !done(&log.lock()) {
            let count = log.lock().len();
            if Instant::now() >= stop_at || count > MAX_DELIVERIES {
                panic!(
                    "{:?}: not done after {count} deliveries: {:#?}",
                    self.composition,
                    log.lock()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Anything that happens now is more than the test expects.
        tokio::time::sleep(settle).await;
        running.stop().await;
        let mut deliveries = std::mem::take(&mut *log.lock());
        deliveries.sort_by_key(|d| d.started);
        let outcome = Outcome {
            composition: self.composition,
            calls: handler.calls(),
            deliveries,
            outputs: self.kept(OUTPUT).await,
            backlog: self.broker.group_backlog(TOPIC, GROUP).unwrap_or(0),
        };
        outcome.check_redeliveries();
        outcome
    }

    async fn start<L: UnderTest>(
        &self,
        layer: L,
        handler: TestHandler,
        log: Arc<Mutex<Vec<Delivered>>>,
    ) -> Running {
        let c = self.composition;
        if c.is_router() {
            let router = Router::with_config(RouterConfig {
                redelivery: Backoff::new(REDELIVERY).multiplier(1.0),
                ..RouterConfig::default()
            });
            let builder = router
                .add_handler(HANDLER)
                .subscribe(self.broker.subscriber(), TOPIC)
                .group(GROUP)
                .publish(self.broker.publisher(), OUTPUT);
            let added = match c {
                Composition::Router => builder.service(Probe(log).layer(layer.wrap(handler))).await,
                Composition::Concurrent => {
                    builder
                        .concurrency(8)
                        .service(Probe(log).layer(layer.wrap(handler)))
                        .await
                }
                _ => {
                    router.layer(Probe(log));
                    layer.add_to(&router);
                    builder.service(handler).await
                }
            };
            added.expect("handler added");
            let task = tokio::spawn({
                let router = router.clone();
                async move { router.run().await }
            });
            tokio::time::timeout(super::WAIT, router.running())
                .await
                .expect("router runs");
            return Running::Router(router, task);
        }
        let stream = self
            .broker
            .subscriber()
            .subscribe(TOPIC, SubscribeOptions::group(GROUP))
            .await
            .expect("subscribe");
        let caller = match c {
            Composition::Direct => Caller::Direct(layer.wrap(handler)),
            Composition::Oneshot => Caller::Oneshot(Box::new(move || layer.wrap(handler.clone()))),
            Composition::Buffer => Caller::Buffer(Buffer::new(layer.wrap(handler), 16)),
            _ => Caller::Spawned(SpawnLayer.layer(layer.wrap(handler))),
        };
        let driver = Driver {
            info: handler_info(),
            output: self.broker.publisher(),
            log,
        };
        Running::Direct(tokio::spawn(driver.run(caller, stream)))
    }
}

/// A run under way.
enum Running {
    Router(
        Router,
        tokio::task::JoinHandle<Result<(), tidemill_core::RouterError>>,
    ),
    Direct(tokio::task::JoinHandle<()>),
}

impl Running {
    async fn stop(self) {
        match self {
            Running::Router(router, task) => {
                router.close().await.expect("router closes");
                task.await.expect("router task").expect("router ran");
            }
            Running::Direct(task) => {
                task.abort();
                let _ = task.await;
            }
        }
    }
}

/// How the direct driver calls the service.
enum Caller<S: Service<Message>> {
    Direct(S),
    Oneshot(Box<dyn FnMut() -> S + Send>),
    Buffer(Buffer<Message, S::Future>),
    Spawned(Spawn<S>),
}

impl<S> Caller<S>
where
    S: Service<Message, Response = Vec<Message>, Error = BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    async fn call(&mut self, msg: Message) -> HandlerResult<Vec<Message>> {
        match self {
            Caller::Direct(s) => s.ready().await?.call(msg).await,
            Caller::Oneshot(make) => make().oneshot(msg).await,
            Caller::Buffer(b) => b.ready().await?.call(msg).await,
            Caller::Spawned(s) => s.ready().await?.call(msg).await,
        }
    }
}

/// Stands in for the router in the direct compositions: takes deliveries, gives each a
/// receive context, calls the service, settles by the router's rules.
struct Driver {
    info: Arc<HandlerInfo>,
    output: MemoryPublisher,
    log: Arc<Mutex<Vec<Delivered>>>,
}

impl Driver {
    async fn run<S>(self, mut caller: Caller<S>, mut stream: tidemill_core::DeliveryStream)
    where
        S: Service<Message, Response = Vec<Message>, Error = BoxError> + Send + 'static,
        S::Future: Send + 'static,
    {
        while let Some(item) = stream.next().await {
            let (mut msg, handle) = item.expect("delivery").into_parts();
            let attempt = handle.attempt();
            let settlement = Settlement::new(handle);
            msg.set_context(Some(
                MessageContext::new(self.info.clone(), attempt).with_settlement(settlement.clone()),
            ));
            let uuid = msg.uuid().to_owned();
            let started = Instant::now();
            let result = caller.call(msg).await;
            let record = match &result {
                Ok(out) => Ok(out.clone()),
                Err(e) => Err(CopiedError::of(e)),
            };
            self.log
                .lock()
                .push(Delivered::new(uuid, attempt, started, record));
            // Settled like the router does: outputs published, then the input acked or
            // nacked, unless a layer took its acknowledgement.
            if let Ok(out) = &result {
                if !out.is_empty() {
                    self.output
                        .publish(OUTPUT, out.clone())
                        .await
                        .expect("publish the outputs");
                }
            }
            let Some(handle) = settlement.take() else {
                continue;
            };
            match result {
                Ok(_) => handle.ack().await.expect("ack"),
                Err(e) => {
                    let delay = redelivery_delay(e.as_ref()).unwrap_or(REDELIVERY);
                    handle.nack_with_delay(delay).await.expect("nack");
                }
            }
        }
    }
}
