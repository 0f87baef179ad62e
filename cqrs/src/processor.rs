//! Command and event processors: typed handlers running on the router.

mod batch;

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::task::{Context as TaskContext, Poll};

use futures::future::BoxFuture;
use futures::TryFutureExt;
use tidemill_core::router::{BoxHandler, Router};
use tidemill_core::{permanent, BoxError, Message, Publisher, Subscriber};
use tidemill_middleware::headers;
use tidemill_middleware::request_reply::{error_reply, ok_reply, ReplyPublishFailed};
use tower::{Layer, Service, ServiceExt};

use crate::{
    short_type_name, Command, CqrsError, DecodeError, Event, Json, Marshal, TopicNaming,
    TypeHeader, CONTENT_TYPE_KEY, NAME_KEY,
};

/// What a typed handler gets besides the decoded value: the message it came in and the
/// processor's state `S` (see [`CommandProcessor::with_state`]), cloned per message.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use serde::{Deserialize, Serialize};
/// use tidemill_core::MemoryBroker;
/// use tidemill_cqrs::{Command, CommandProcessor};
///
/// #[derive(Serialize, Deserialize)]
/// struct BookRoom { room: u32 }
/// impl Command for BookRoom {}
///
/// let broker = MemoryBroker::new();
/// let booked = Arc::new(AtomicU32::new(0));
/// let mut commands = CommandProcessor::new(broker.subscriber()).with_state(booked.clone());
/// commands.handle(|cmd: BookRoom, ctx| async move {
///     ctx.state().fetch_add(1, Ordering::Relaxed);
///     println!("room {} (message {})", cmd.room, ctx.message().uuid());
///     Ok(())
/// })?;
/// # Ok::<(), tidemill_cqrs::CqrsError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Context<S = ()> {
    message: Message,
    state: S,
}

impl<S> Context<S> {
    /// The received message (metadata, uuid, key, receive context).
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The delivery attempt (1 = first), where the broker reports it.
    pub fn attempt(&self) -> Option<u32> {
        self.message.context().and_then(|c| c.attempt())
    }

    /// The processor's state (`()` unless set with `with_state`).
    pub fn state(&self) -> &S {
        &self.state
    }

    /// The processor's state, owned.
    pub fn into_state(self) -> S {
        self.state
    }
}

/// What a processor does with a message whose type none of its handlers knows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownTypePolicy {
    /// Acknowledge it, log a warning and count it ([`CommandProcessor::unknown_count`]).
    #[default]
    AckAndCount,
    /// Fail it with a permanent error: poison-queue middleware sends it to the poison topic;
    /// without it the router nacks it (redelivered).
    Reject,
}

type Call =
    Arc<dyn Fn(Message) -> BoxFuture<'static, Result<Vec<Message>, BoxError>> + Send + Sync>;

/// One typed handler, erased.
#[derive(Clone)]
struct Registration {
    /// The command/event type name it handles.
    type_name: String,
    call: Call,
}

/// Builds the erased call of a handler without result.
fn erase<T, M, S, F, Fut>(
    kind: &'static str,
    type_name: String,
    marshaler: M,
    state: S,
    f: F,
) -> Call
where
    T: Send + 'static,
    M: Marshal<T>,
    S: Clone + Send + Sync + 'static,
    F: Fn(T, Context<S>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    erase_output(kind, type_name, marshaler, state, move |value, ctx| {
        f(value, ctx).map_ok(|()| Vec::new())
    })
}

/// Builds the erased call: decode with `marshaler`, then run `f` with a clone of `state`.
fn erase_output<T, M, S, F, Fut>(
    kind: &'static str,
    type_name: String,
    marshaler: M,
    state: S,
    f: F,
) -> Call
where
    T: Send + 'static,
    M: Marshal<T>,
    S: Clone + Send + Sync + 'static,
    F: Fn(T, Context<S>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Message>, BoxError>> + Send + 'static,
{
    Arc::new(
        move |message: Message| match marshaler.unmarshal(message.payload()) {
            Ok(value) => Box::pin(f(
                value,
                Context {
                    message,
                    state: state.clone(),
                },
            )),
            Err(source) => {
                let err = DecodeError::Payload {
                    kind,
                    name: type_name.clone(),
                    uuid: message.uuid().to_owned(),
                    topic: topic_of(&message),
                    source,
                };
                Box::pin(std::future::ready(Err(permanent(err))))
            }
        },
    )
}

fn topic_of(message: &Message) -> String {
    message
        .context()
        .map(|c| c.handler().topic.clone())
        .unwrap_or_default()
}

/// Shared dispatch for one router handler serving `handlers` (one, or a whole event group).
#[derive(Clone)]
struct Dispatcher {
    kind: &'static str,
    handlers: Arc<Vec<Registration>>,
    /// Types handled elsewhere in the same processor: acked silently (they are not unknown).
    siblings: Arc<HashSet<String>>,
    policy: UnknownTypePolicy,
    unknown: Arc<AtomicU64>,
    type_header: TypeHeader,
}

impl Dispatcher {
    async fn dispatch(self, message: Message) -> Result<Vec<Message>, BoxError> {
        let Some(name) = self.type_header.read(&message) else {
            return Err(permanent(DecodeError::MissingName {
                kind: self.kind,
                uuid: message.uuid().to_owned(),
                topic: topic_of(&message),
                key: self.type_header.describe().to_owned(),
            }));
        };
        let name = name.into_owned();
        let name = name.as_str();
        if let Some(h) = self.handlers.iter().find(|h| h.type_name == name) {
            return (h.call)(message).await;
        }
        if self.siblings.contains(name) {
            tracing::trace!(kind = self.kind, name, "not for this handler; acking");
            return Ok(Vec::new());
        }
        match self.policy {
            UnknownTypePolicy::AckAndCount => {
                self.unknown.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    kind = self.kind,
                    name,
                    uuid = message.uuid(),
                    "no handler for this type; acking it (UnknownTypePolicy::AckAndCount)"
                );
                Ok(Vec::new())
            }
            UnknownTypePolicy::Reject => Err(permanent(DecodeError::UnknownType {
                kind: self.kind,
                name: name.to_owned(),
                uuid: message.uuid().to_owned(),
                topic: topic_of(&message),
            })),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn add_to(
        self,
        router: &Router,
        handler_name: String,
        subscriber: Arc<dyn Subscriber>,
        topic: String,
        group: String,
        layers: &[WrapHandler],
        replies: Option<Arc<dyn Publisher>>,
    ) -> Result<(), CqrsError> {
        let dispatcher = self;
        let mut service = BoxHandler::new(tower::service_fn(move |message: Message| {
            dispatcher.clone().dispatch(message)
        }));
        for wrap in layers.iter().rev() {
            service = wrap(service);
        }
        router
            .add_handler(handler_name)
            .subscribe(subscriber, topic)
            .group(group)
            .service(ReplyIfRequested {
                inner: service,
                replies,
            })
            .await?;
        Ok(())
    }
}

/// A type-erased tower layer applied to each handler of a processor.
type WrapHandler = Arc<dyn Fn(BoxHandler) -> BoxHandler + Send + Sync>;

fn wrap_handler<L>(layer: L) -> WrapHandler
where
    L: Layer<BoxHandler> + Send + Sync + 'static,
    L::Service: Service<Message, Response = Vec<Message>> + Send + 'static,
    <L::Service as Service<Message>>::Error: Into<BoxError>,
    <L::Service as Service<Message>>::Future: Send + 'static,
{
    Arc::new(move |inner| BoxHandler::new(layer.layer(inner).map_err(Into::into)))
}

/// Answers commands sent with [`send_and_wait`](crate::CommandClient::send_and_wait)
/// (they carry a reply address and correlation id) with the handler's verdict, then acks
/// them; passes every other message through untouched, so one handler serves both.
struct ReplyIfRequested {
    inner: BoxHandler,
    replies: Option<Arc<dyn Publisher>>,
}

impl Service<Message> for ReplyIfRequested {
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Vec<Message>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, message: Message) -> Self::Future {
        let md = message.metadata();
        let (Some(reply_to), Some(request_id)) =
            (md.get(headers::REPLY_TO), md.get(headers::REQUEST_ID))
        else {
            return discard_output(self.inner.call(message));
        };
        let (reply_to, request_id) = (reply_to.to_owned(), request_id.to_owned());
        let Some(publisher) = self.replies.clone() else {
            tracing::warn!(
                uuid = message.uuid(),
                %request_id,
                %reply_to,
                "a sender waits for this command's verdict, but the processor has no reply \
                 publisher (CommandProcessor::with_replies); handling it without replying"
            );
            return discard_output(self.inner.call(message));
        };
        let handled = self.inner.call(message);
        Box::pin(async move {
            let reply = match handled.await {
                // The handler's result (handle_with_result), or an empty "done".
                Ok(out) => {
                    let result = out.into_iter().next().unwrap_or_else(|| Message::new(""));
                    ok_reply(result, &request_id, 1, 1)
                }
                Err(error) => {
                    let reply = error_reply(&error, &request_id);
                    let md = reply.metadata();
                    let kind = md.get(headers::REPLY_ERROR_KIND).unwrap_or_default();
                    let text = md.get(headers::REPLY_ERROR).unwrap_or_default();
                    tracing::debug!(%request_id, %kind, error = %text, "command failed; replying with the error");
                    reply
                }
            };
            publisher
                .publish_one(&reply_to, reply)
                .await
                .map_err(|source| ReplyPublishFailed {
                    request_id,
                    reply_to,
                    source,
                })?;
            Ok(Vec::new())
        })
    }
}

/// Handler results only travel as replies: a plainly sent command's result is dropped (the
/// router handler has no output topic).
fn discard_output(
    handled: BoxFuture<'static, Result<Vec<Message>, BoxError>>,
) -> BoxFuture<'static, Result<Vec<Message>, BoxError>> {
    Box::pin(handled.map_ok(|_| Vec::new()))
}

type GroupNaming = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// Runs command handlers on a router: exactly one handler per command type, each with its
/// own subscription (consumer group named after the handler by default).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tidemill_core::{router::Router, MemoryBroker};
/// use tidemill_cqrs::{Command, CommandProcessor, Context};
///
/// #[derive(Serialize, Deserialize)]
/// struct BookRoom { room: u32 }
/// impl Command for BookRoom {}
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tidemill_cqrs::CqrsError> {
/// let broker = MemoryBroker::new();
/// let router = Router::new();
/// let mut commands = CommandProcessor::new(broker.subscriber());
/// commands.handle(|cmd: BookRoom, _ctx: Context| async move {
///     println!("booking room {}", cmd.room);
///     Ok(())
/// })?;
/// assert!(commands.handle(|_: BookRoom, _| async { Ok(()) }).is_err(), "one handler per type");
/// commands.add_to(&router).await?;
/// # Ok(()) }
/// ```
pub struct CommandProcessor<M = Json, S = ()> {
    subscriber: Arc<dyn Subscriber>,
    marshaler: M,
    state: S,
    naming: TopicNaming,
    group: GroupNaming,
    policy: UnknownTypePolicy,
    handlers: Vec<Registration>,
    unknown: Arc<AtomicU64>,
    layers: Vec<WrapHandler>,
    replies: Option<Arc<dyn Publisher>>,
    type_header: TypeHeader,
}

impl CommandProcessor {
    /// A processor consuming through `subscriber`, decoding JSON.
    pub fn new(subscriber: impl Subscriber + 'static) -> Self {
        CommandProcessor {
            subscriber: Arc::new(subscriber),
            marshaler: Json,
            state: (),
            naming: TopicNaming::commands(),
            group: Arc::new(str::to_owned),
            policy: UnknownTypePolicy::default(),
            handlers: Vec::new(),
            unknown: Arc::default(),
            layers: Vec::new(),
            replies: None,
            type_header: TypeHeader::default(),
        }
    }

    /// The router handler name used for command `name` (`<name>-handler`), whatever the
    /// processor's marshaler and state.
    ///
    /// ```
    /// use tidemill_cqrs::CommandProcessor;
    /// assert_eq!(CommandProcessor::handler_name("Ping"), "Ping-handler");
    /// ```
    pub fn handler_name(name: &str) -> String {
        format!("{name}-handler")
    }
}

impl<M: Clone + Send + Sync + 'static, S: Clone + Send + Sync + 'static> CommandProcessor<M, S> {
    /// Uses `marshaler` (must match the bus's). Call before adding handlers.
    pub fn with_marshaler<N>(self, marshaler: N) -> CommandProcessor<N, S> {
        CommandProcessor {
            subscriber: self.subscriber,
            marshaler,
            state: self.state,
            naming: self.naming,
            group: self.group,
            policy: self.policy,
            handlers: self.handlers,
            unknown: self.unknown,
            layers: self.layers,
            replies: self.replies,
            type_header: self.type_header,
        }
    }

    /// Hands `state` to the handlers added afterwards: their [`Context`] carries a clone of
    /// it per message ([`Context::state`]), so they need not clone what they use
    /// themselves. Keep it cheap to clone (`Arc`s, handles). Call before adding handlers.
    pub fn with_state<T: Clone + Send + Sync + 'static>(self, state: T) -> CommandProcessor<M, T> {
        CommandProcessor {
            subscriber: self.subscriber,
            marshaler: self.marshaler,
            state,
            naming: self.naming,
            group: self.group,
            policy: self.policy,
            handlers: self.handlers,
            unknown: self.unknown,
            layers: self.layers,
            replies: self.replies,
            type_header: self.type_header,
        }
    }

    /// Replaces how command names map to topics (must match the bus's).
    pub fn with_topic_naming(mut self, naming: TopicNaming) -> Self {
        self.naming = naming;
        self
    }

    /// Reads the command's type name from `header` instead of `cqrs-name` metadata (must
    /// match the senders': [`TypeHeader::watermill`] for Watermill services).
    pub fn with_type_header(mut self, header: TypeHeader) -> Self {
        self.type_header = header;
        self
    }

    /// Replaces how handler names map to consumer groups (default: the handler name).
    pub fn with_group_naming(mut self, f: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.group = Arc::new(f);
        self
    }

    /// Answers commands sent with [`send_and_wait`](crate::CommandClient::send_and_wait)
    /// with their handler's verdict, published through `publisher` to the sender's reply
    /// address; the command is then acked (its sender has the answer, even an error).
    /// Commands sent with plain [`send`](crate::CommandBus::send) are not affected.
    ///
    /// Router-level layers wrap the replier, so they see a request's error only if the
    /// reply could not be sent; to retry a command before answering, add
    /// [`Retry`](tidemill_middleware::Retry) with [`layer`](Self::layer).
    pub fn with_replies(mut self, publisher: impl Publisher + 'static) -> Self {
        self.replies = Some(Arc::new(publisher));
        self
    }

    /// Adds a tower layer around each command handler, inside the replier (see
    /// [`with_replies`](Self::with_replies)) and inside router-level layers; the first
    /// added is the outermost. It applies to commands sent both ways.
    pub fn layer<L>(&mut self, layer: L) -> &mut Self
    where
        L: Layer<BoxHandler> + Send + Sync + 'static,
        L::Service: Service<Message, Response = Vec<Message>> + Send + 'static,
        <L::Service as Service<Message>>::Error: Into<BoxError>,
        <L::Service as Service<Message>>::Future: Send + 'static,
    {
        self.layers.push(wrap_handler(layer));
        self
    }

    /// Sets the policy for commands no handler knows.
    pub fn with_unknown_type_policy(mut self, policy: UnknownTypePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How many messages of unknown type were acked under [`UnknownTypePolicy::AckAndCount`].
    pub fn unknown_count(&self) -> u64 {
        self.unknown.load(Ordering::Relaxed)
    }

    /// Registers the handler of command `C`. A second handler for the same command type is
    /// an error.
    pub fn handle<C, F, Fut>(&mut self, f: F) -> Result<&mut Self, CqrsError>
    where
        C: Command,
        M: Marshal<C>,
        F: Fn(C, Context<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let name = C::name().into_owned();
        if self.handlers.iter().any(|h| h.type_name == name) {
            return Err(CqrsError::DuplicateCommandHandler(name));
        }
        let call = erase(
            "command",
            name.clone(),
            self.marshaler.clone(),
            self.state.clone(),
            f,
        );
        self.handlers.push(Registration {
            type_name: name,
            call,
        });
        Ok(self)
    }

    /// Registers the handler of command `C`, whose result `R` goes back to a sender using
    /// [`send_and_wait_for`](crate::CommandClient::send_and_wait_for) (marshaled like the
    /// commands). For a plainly sent command the result is dropped. A second handler for
    /// the same command type is an error.
    pub fn handle_with_result<C, R, F, Fut>(&mut self, f: F) -> Result<&mut Self, CqrsError>
    where
        C: Command,
        R: Send + 'static,
        M: Marshal<C> + Marshal<R>,
        F: Fn(C, Context<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, BoxError>> + Send + 'static,
    {
        let name = C::name().into_owned();
        if self.handlers.iter().any(|h| h.type_name == name) {
            return Err(CqrsError::DuplicateCommandHandler(name));
        }
        let marshaler = self.marshaler.clone();
        let result_name = short_type_name::<R>();
        let f = Arc::new(f);
        let call = erase_output(
            "command",
            name.clone(),
            self.marshaler.clone(),
            self.state.clone(),
            move |command: C, ctx: Context<S>| {
                let (marshaler, result_name, f) =
                    (marshaler.clone(), result_name.clone(), f.clone());
                async move {
                    let result = f(command, ctx).await?;
                    let payload = Marshal::<R>::marshal(&marshaler, &result).map_err(|source| {
                        permanent(CqrsError::Marshal {
                            kind: "command result",
                            name: result_name.clone(),
                            source,
                        })
                    })?;
                    Ok(vec![Message::new(payload)
                        .with_metadata(NAME_KEY, result_name)
                        .with_metadata(
                            CONTENT_TYPE_KEY,
                            Marshal::<R>::content_type(&marshaler),
                        )])
                }
            },
        );
        self.handlers.push(Registration {
            type_name: name,
            call,
        });
        Ok(self)
    }

    /// Adds every handler to `router` (each its own router handler and consumer group).
    pub async fn add_to(&self, router: &Router) -> Result<(), CqrsError> {
        let siblings: Arc<HashSet<String>> =
            Arc::new(self.handlers.iter().map(|h| h.type_name.clone()).collect());
        for h in &self.handlers {
            let handler_name = CommandProcessor::handler_name(&h.type_name);
            let group = (self.group)(&handler_name);
            let dispatcher = Dispatcher {
                kind: "command",
                handlers: Arc::new(vec![h.clone()]),
                siblings: siblings.clone(),
                policy: self.policy,
                unknown: self.unknown.clone(),
                type_header: self.type_header.clone(),
            };
            dispatcher
                .add_to(
                    router,
                    handler_name,
                    self.subscriber.clone(),
                    self.naming.topic(&h.type_name),
                    group,
                    &self.layers,
                    self.replies.clone(),
                )
                .await?;
        }
        Ok(())
    }
}

/// A handler registration of an [`EventProcessor`]: a lone handler or a group.
struct EventHandlerSpec {
    name: String,
    handlers: Vec<Registration>,
}

/// Runs event handlers on a router. Every handler gets every event of its type (its own
/// consumer group, named after it by default); an [`EventGroup`] shares one subscription
/// among several handlers so their relative order holds.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tidemill_core::{router::Router, MemoryBroker};
/// use tidemill_cqrs::{Context, Event, EventProcessor};
///
/// #[derive(Serialize, Deserialize)]
/// struct RoomBooked { room: u32 }
/// impl Event for RoomBooked {}
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tidemill_cqrs::CqrsError> {
/// let broker = MemoryBroker::new();
/// let router = Router::new();
/// let mut events = EventProcessor::new(broker.subscriber());
/// events.handle("send-invoice", |e: RoomBooked, _ctx: Context| async move {
///     println!("invoice for room {}", e.room);
///     Ok(())
/// })?;
/// events.handle("notify-guest", |e: RoomBooked, _ctx: Context| async move { Ok(()) })?;
/// events.add_to(&router).await?;
/// # Ok(()) }
/// ```
pub struct EventProcessor<M = Json, S = ()> {
    subscriber: Arc<dyn Subscriber>,
    marshaler: M,
    state: S,
    naming: TopicNaming,
    group: GroupNaming,
    policy: UnknownTypePolicy,
    specs: Vec<EventHandlerSpec>,
    batches: Vec<batch::BatchSpec>,
    unknown: Arc<AtomicU64>,
    layers: Vec<WrapHandler>,
    type_header: TypeHeader,
}

impl EventProcessor {
    /// A processor consuming through `subscriber`, decoding JSON.
    pub fn new(subscriber: impl Subscriber + 'static) -> Self {
        EventProcessor {
            subscriber: Arc::new(subscriber),
            marshaler: Json,
            state: (),
            naming: TopicNaming::events(),
            group: Arc::new(str::to_owned),
            policy: UnknownTypePolicy::default(),
            specs: Vec::new(),
            batches: Vec::new(),
            unknown: Arc::default(),
            layers: Vec::new(),
            type_header: TypeHeader::default(),
        }
    }
}

impl<M: Clone + Send + Sync + 'static, S: Clone + Send + Sync + 'static> EventProcessor<M, S> {
    /// Uses `marshaler` (must match the bus's). Call before adding handlers.
    pub fn with_marshaler<N>(self, marshaler: N) -> EventProcessor<N, S> {
        EventProcessor {
            subscriber: self.subscriber,
            marshaler,
            state: self.state,
            naming: self.naming,
            group: self.group,
            policy: self.policy,
            specs: self.specs,
            batches: self.batches,
            unknown: self.unknown,
            layers: self.layers,
            type_header: self.type_header,
        }
    }

    /// Hands `state` to the handlers added afterwards (groups too): their [`Context`]
    /// carries a clone of it per message ([`Context::state`]). Keep it cheap to clone.
    /// Call before adding handlers.
    pub fn with_state<T: Clone + Send + Sync + 'static>(self, state: T) -> EventProcessor<M, T> {
        EventProcessor {
            subscriber: self.subscriber,
            marshaler: self.marshaler,
            state,
            naming: self.naming,
            group: self.group,
            policy: self.policy,
            specs: self.specs,
            batches: self.batches,
            unknown: self.unknown,
            layers: self.layers,
            type_header: self.type_header,
        }
    }

    /// Replaces how event names map to topics (must match the bus's).
    pub fn with_topic_naming(mut self, naming: TopicNaming) -> Self {
        self.naming = naming;
        self
    }

    /// Reads the event's type name from `header` instead of `cqrs-name` metadata (must
    /// match the publishers': [`TypeHeader::watermill`] for Watermill services).
    pub fn with_type_header(mut self, header: TypeHeader) -> Self {
        self.type_header = header;
        self
    }

    /// Replaces how handler/group names map to consumer groups (default: the name itself).
    pub fn with_group_naming(mut self, f: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.group = Arc::new(f);
        self
    }

    /// Adds a tower layer around each event handler and group (inside router-level
    /// layers; the first added is the outermost).
    pub fn layer<L>(&mut self, layer: L) -> &mut Self
    where
        L: Layer<BoxHandler> + Send + Sync + 'static,
        L::Service: Service<Message, Response = Vec<Message>> + Send + 'static,
        <L::Service as Service<Message>>::Error: Into<BoxError>,
        <L::Service as Service<Message>>::Future: Send + 'static,
    {
        self.layers.push(wrap_handler(layer));
        self
    }

    /// Sets the policy for events no handler of the subscription knows.
    pub fn with_unknown_type_policy(mut self, policy: UnknownTypePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How many messages of unknown type were acked under [`UnknownTypePolicy::AckAndCount`].
    pub fn unknown_count(&self) -> u64 {
        self.unknown.load(Ordering::Relaxed)
    }

    fn check_name(&self, name: &str) -> Result<(), CqrsError> {
        if self.specs.iter().any(|s| s.name == name) || self.batches.iter().any(|b| b.name == name)
        {
            return Err(CqrsError::DuplicateHandlerName(name.to_owned()));
        }
        Ok(())
    }

    /// Adds handler `name` for event `E`, with its own subscription.
    pub fn handle<E, F, Fut>(
        &mut self,
        name: impl Into<String>,
        f: F,
    ) -> Result<&mut Self, CqrsError>
    where
        E: Event,
        M: Marshal<E>,
        F: Fn(E, Context<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let name = name.into();
        self.check_name(&name)?;
        let type_name = E::name().into_owned();
        let call = erase(
            "event",
            type_name.clone(),
            self.marshaler.clone(),
            self.state.clone(),
            f,
        );
        self.specs.push(EventHandlerSpec {
            name,
            handlers: vec![Registration { type_name, call }],
        });
        Ok(self)
    }

    /// Starts event group `name`: its handlers share one subscription (and so one topic:
    /// the group's event types must map to the same topic) and see events in order.
    pub fn group(&mut self, name: impl Into<String>) -> EventGroup<'_, M, S> {
        EventGroup {
            processor: self,
            name: name.into(),
            handlers: Vec::new(),
        }
    }

    /// Every event type some handler, group or batch handler of this processor handles.
    fn handled_types(&self) -> HashSet<String> {
        self.specs
            .iter()
            .flat_map(|s| s.handlers.iter().map(|h| h.type_name.clone()))
            .chain(self.batches.iter().map(|b| b.type_name.clone()))
            .collect()
    }

    /// Adds every handler, group and batch handler to `router`.
    pub async fn add_to(&self, router: &Router) -> Result<(), CqrsError> {
        for spec in &self.batches {
            let sorting = batch::Sorting {
                siblings: Arc::new(self.handled_types()),
                policy: self.policy,
                unknown: self.unknown.clone(),
                type_header: self.type_header.clone(),
            };
            spec.add_to(
                router,
                self.subscriber.clone(),
                self.naming.topic(&spec.type_name),
                (self.group)(&spec.name),
                &self.layers,
                sorting,
            )
            .await?;
        }
        for spec in &self.specs {
            let mut topics = spec
                .handlers
                .iter()
                .map(|h| (h.type_name.as_str(), self.naming.topic(&h.type_name)));
            let Some((first, topic)) = topics.next() else {
                return Err(CqrsError::EmptyGroup(spec.name.clone()));
            };
            if let Some((second, other)) = topics.find(|(_, t)| *t != topic) {
                return Err(CqrsError::GroupSpansTopics {
                    group: spec.name.clone(),
                    first: first.to_owned(),
                    first_topic: topic,
                    second: second.to_owned(),
                    second_topic: other,
                });
            }
            // Other event types sharing the topic are someone else's business: lone
            // handlers ack them silently; groups apply the unknown-type policy.
            let lone = spec.handlers.len() == 1;
            let siblings: HashSet<String> = if lone {
                self.handled_types()
            } else {
                HashSet::new()
            };
            let dispatcher = Dispatcher {
                kind: "event",
                handlers: Arc::new(spec.handlers.clone()),
                siblings: Arc::new(siblings),
                policy: self.policy,
                unknown: self.unknown.clone(),
                type_header: self.type_header.clone(),
            };
            dispatcher
                .add_to(
                    router,
                    spec.name.clone(),
                    self.subscriber.clone(),
                    topic,
                    (self.group)(&spec.name),
                    &self.layers,
                    None,
                )
                .await?;
        }
        Ok(())
    }
}

/// Handlers sharing one subscription; see [`EventProcessor::group`]. Finish with
/// [`done`](EventGroup::done).
pub struct EventGroup<'p, M, S = ()> {
    processor: &'p mut EventProcessor<M, S>,
    name: String,
    handlers: Vec<Registration>,
}

impl<M: Clone + Send + Sync + 'static, S: Clone + Send + Sync + 'static> EventGroup<'_, M, S> {
    /// Adds the group's handler for event `E` (one per event type).
    pub fn handle<E, F, Fut>(mut self, f: F) -> Result<Self, CqrsError>
    where
        E: Event,
        M: Marshal<E>,
        F: Fn(E, Context<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let type_name = E::name().into_owned();
        if self.handlers.iter().any(|h| h.type_name == type_name) {
            return Err(CqrsError::DuplicateHandlerName(format!(
                "{}/{type_name}",
                self.name
            )));
        }
        let call = erase(
            "event",
            type_name.clone(),
            self.processor.marshaler.clone(),
            self.processor.state.clone(),
            f,
        );
        self.handlers.push(Registration { type_name, call });
        Ok(self)
    }

    /// Adds the group to its processor.
    pub fn done(self) -> Result<(), CqrsError> {
        self.processor.check_name(&self.name)?;
        if self.handlers.is_empty() {
            return Err(CqrsError::EmptyGroup(self.name));
        }
        self.processor.specs.push(EventHandlerSpec {
            name: self.name,
            handlers: self.handlers,
        });
        Ok(())
    }
}
