//! CommandBus and EventBus: marshal, tag with the type name, publish.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tidemill_core::{Message, Publisher, Subscriber};
use tidemill_middleware::request_reply::{RequestError, Requester, RequesterConfig};

use crate::{
    short_type_name, Command, CqrsError, Event, Json, Marshal, TopicNaming, TypeHeader,
    CONTENT_TYPE_KEY,
};

type SendHook = Arc<dyn Fn(&mut Message) + Send + Sync>;

/// What both buses share.
#[derive(Clone)]
struct Bus<M> {
    publisher: Arc<dyn Publisher>,
    marshaler: M,
    naming: TopicNaming,
    hook: Option<SendHook>,
    kind: &'static str,
    type_header: TypeHeader,
}

impl<M> Bus<M> {
    /// Marshals `value` into a message tagged with its name, runs the hook, and returns it
    /// with the topic it goes to.
    fn message<T>(&self, name: &str, value: &T) -> Result<(String, Message), CqrsError>
    where
        M: Marshal<T>,
    {
        let payload = self
            .marshaler
            .marshal(value)
            .map_err(|source| CqrsError::Marshal {
                kind: self.kind,
                name: name.to_owned(),
                source,
            })?;
        let mut msg =
            Message::new(payload).with_metadata(CONTENT_TYPE_KEY, self.marshaler.content_type());
        self.type_header.write(&mut msg, name);
        if let Some(hook) = &self.hook {
            hook(&mut msg);
        }
        Ok((self.naming.topic(name), msg))
    }

    async fn send<T>(&self, name: &str, value: &T) -> Result<(), CqrsError>
    where
        M: Marshal<T>,
    {
        let (topic, msg) = self.message(name, value)?;
        self.publisher
            .publish(&topic, vec![msg])
            .await
            .map_err(|source| CqrsError::Publish {
                kind: self.kind,
                name: name.to_owned(),
                topic,
                source: Box::new(source),
            })
    }
}

/// Sends typed commands to the topic their name maps to (default `commands.<Name>`).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tidemill_core::MemoryBroker;
/// use tidemill_cqrs::{Command, CommandBus};
///
/// #[derive(Serialize, Deserialize)]
/// struct BookRoom { room: u32 }
/// impl Command for BookRoom {}
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tidemill_cqrs::CqrsError> {
/// let broker = MemoryBroker::new();
/// let bus = CommandBus::new(broker.publisher())
///     .on_send(|msg| msg.metadata_mut().set("sent-by", "front-desk"));
/// bus.send(&BookRoom { room: 101 }).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct CommandBus<M = Json> {
    bus: Bus<M>,
}

impl CommandBus<Json> {
    /// A bus publishing JSON-encoded commands through `publisher`.
    pub fn new(publisher: impl Publisher + 'static) -> Self {
        CommandBus {
            bus: Bus {
                publisher: Arc::new(publisher),
                marshaler: Json,
                naming: TopicNaming::commands(),
                hook: None,
                kind: "command",
                type_header: TypeHeader::default(),
            },
        }
    }
}

impl<M> CommandBus<M> {
    /// Uses `marshaler` instead.
    pub fn with_marshaler<N>(self, marshaler: N) -> CommandBus<N> {
        let Bus {
            publisher,
            naming,
            hook,
            kind,
            type_header,
            ..
        } = self.bus;
        CommandBus {
            bus: Bus {
                publisher,
                marshaler,
                naming,
                hook,
                kind,
                type_header,
            },
        }
    }

    /// Replaces how command names map to topics.
    pub fn with_topic_naming(mut self, naming: TopicNaming) -> Self {
        self.bus.naming = naming;
        self
    }

    /// Tags commands with their type name in `header` instead of `cqrs-name` metadata
    /// (e.g. [`TypeHeader::watermill`] to talk to Watermill services). Processors must read
    /// the same place.
    pub fn with_type_header(mut self, header: TypeHeader) -> Self {
        self.bus.type_header = header;
        self
    }

    /// Runs `hook` on every message before it is sent (set metadata, a key, ...).
    pub fn on_send(mut self, hook: impl Fn(&mut Message) + Send + Sync + 'static) -> Self {
        self.bus.hook = Some(Arc::new(hook));
        self
    }

    /// The topic command `C` is sent to.
    pub fn topic_of<C: Command>(&self) -> String {
        self.bus.naming.topic(&C::name())
    }

    /// Marshals and publishes `command`; returns once the broker accepted it.
    pub async fn send<C: Command>(&self, command: &C) -> Result<(), CqrsError>
    where
        M: Marshal<C>,
    {
        self.bus.send(&C::name(), command).await
    }

    /// Connects a [`CommandClient`]: this bus plus a reply subscription (through
    /// `subscriber`), for [`send_and_wait`](CommandClient::send_and_wait).
    pub async fn connect_client(
        self,
        subscriber: impl Subscriber + 'static,
        config: RequesterConfig,
    ) -> Result<CommandClient<M>, CqrsError> {
        let requester = Requester::connect(self.bus.publisher.clone(), subscriber, config)
            .await
            .map_err(|e| CqrsError::Connect(Box::new(e)))?;
        Ok(CommandClient {
            bus: self,
            requester,
        })
    }
}

/// A [`CommandBus`] that can also send a command and wait for its handler's verdict,
/// built on [request-reply](tidemill_middleware::request_reply): the command carries a
/// reply address and a correlation id, and a [`CommandProcessor`](crate::CommandProcessor)
/// set up [`with_replies`](crate::CommandProcessor::with_replies) answers with the
/// handler's `Ok` or its error. Plain [`send`](CommandClient::send) works as on the bus.
///
/// ```
/// use std::time::Duration;
/// use serde::{Deserialize, Serialize};
/// use tidemill_core::{permanent, router::Router, MemoryBroker};
/// use tidemill_cqrs::{Command, CommandBus, CommandProcessor, CqrsError};
/// use tidemill_middleware::request_reply::RequesterConfig;
///
/// #[derive(Serialize, Deserialize)]
/// struct BookRoom { room: u32 }
/// impl Command for BookRoom {}
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = MemoryBroker::new();
/// let router = Router::new();
/// let mut commands = CommandProcessor::new(broker.subscriber()).with_replies(broker.publisher());
/// commands.handle(|cmd: BookRoom, _| async move {
///     if cmd.room == 13 {
///         return Err(permanent("there is no room 13"));
///     }
///     Ok(())
/// })?;
/// commands.add_to(&router).await?;
/// let running = router.clone();
/// tokio::spawn(async move { running.run().await });
/// router.running().await;
///
/// let client = CommandBus::new(broker.publisher())
///     .connect_client(broker.subscriber(), RequesterConfig::default())
///     .await?;
/// client.send_and_wait(&BookRoom { room: 101 }, Duration::from_secs(10)).await?;
/// let err = client.send_and_wait(&BookRoom { room: 13 }, Duration::from_secs(10)).await;
/// assert!(matches!(err, Err(CqrsError::CommandFailed { .. })));
/// client.close().await;
/// router.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct CommandClient<M = Json> {
    bus: CommandBus<M>,
    requester: Requester,
}

impl<M> fmt::Debug for CommandClient<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandClient")
            .field("requester", &self.requester)
            .finish_non_exhaustive()
    }
}

impl<M> CommandClient<M> {
    /// The bus it sends through.
    pub fn bus(&self) -> &CommandBus<M> {
        &self.bus
    }

    /// The underlying requester (reply topic, pending and unknown-reply counts).
    pub fn requester(&self) -> &Requester {
        &self.requester
    }

    /// Sends `command` without waiting for its handler (as [`CommandBus::send`]).
    pub async fn send<C: Command>(&self, command: &C) -> Result<(), CqrsError>
    where
        M: Marshal<C>,
    {
        self.bus.send(command).await
    }

    /// Sends `command` and waits up to `timeout` for its handler's verdict:
    ///
    /// - `Ok(())` once the handler succeeded;
    /// - [`CqrsError::CommandFailed`] with the error's kind and message when it failed
    ///   (including a command that did not decode, or retries inside the processor that
    ///   ran out);
    /// - [`CqrsError::NoReply`] when no verdict came in time (no processor running, or one
    ///   without [`with_replies`](crate::CommandProcessor::with_replies)); the command may
    ///   still be handled later;
    /// - [`CqrsError::Marshal`], or [`CqrsError::Request`] if publishing failed or the
    ///   client is closed.
    pub async fn send_and_wait<C: Command>(
        &self,
        command: &C,
        timeout: Duration,
    ) -> Result<(), CqrsError>
    where
        M: Marshal<C>,
    {
        self.request(command, timeout).await.map(drop)
    }

    /// Like [`send_and_wait`](Self::send_and_wait), for a command whose handler was
    /// registered with
    /// [`handle_with_result`](crate::CommandProcessor::handle_with_result): returns the
    /// handler's result, decoded with this bus's marshaler. A handler without a result
    /// gives [`CqrsError::NoResult`]; a result that does not decode as `R`,
    /// [`CqrsError::ResultDecode`].
    pub async fn send_and_wait_for<C: Command, R>(
        &self,
        command: &C,
        timeout: Duration,
    ) -> Result<R, CqrsError>
    where
        M: Marshal<C> + Marshal<R>,
    {
        let reply = self.request(command, timeout).await?;
        if reply.metadata().get(CONTENT_TYPE_KEY).is_none() {
            return Err(CqrsError::NoResult {
                name: C::name().into_owned(),
            });
        }
        Marshal::<R>::unmarshal(&self.bus.bus.marshaler, reply.payload()).map_err(|source| {
            CqrsError::ResultDecode {
                name: C::name().into_owned(),
                result: short_type_name::<R>(),
                source,
            }
        })
    }

    async fn request<C: Command>(
        &self,
        command: &C,
        timeout: Duration,
    ) -> Result<Message, CqrsError>
    where
        M: Marshal<C>,
    {
        let name = C::name();
        let (topic, msg) = self.bus.bus.message(&name, command)?;
        match self.requester.request_timeout(&topic, msg, timeout).await {
            Ok(reply) => Ok(reply),
            Err(RequestError::Handler { kind, message, .. }) => Err(CqrsError::CommandFailed {
                name: name.into_owned(),
                topic,
                kind,
                message,
            }),
            Err(RequestError::Timeout { .. }) => Err(CqrsError::NoReply {
                name: name.into_owned(),
                topic,
                timeout,
            }),
            Err(source) => Err(CqrsError::Request {
                name: name.into_owned(),
                source: Box::new(source),
            }),
        }
    }

    /// Stops listening for replies; waiting calls fail with [`CqrsError::Request`].
    pub async fn close(&self) {
        self.requester.close().await;
    }
}

/// Publishes typed events to the topic their name maps to (default `events.<Name>`).
#[derive(Clone)]
pub struct EventBus<M = Json> {
    bus: Bus<M>,
}

impl EventBus<Json> {
    /// A bus publishing JSON-encoded events through `publisher`.
    pub fn new(publisher: impl Publisher + 'static) -> Self {
        EventBus {
            bus: Bus {
                publisher: Arc::new(publisher),
                marshaler: Json,
                naming: TopicNaming::events(),
                hook: None,
                kind: "event",
                type_header: TypeHeader::default(),
            },
        }
    }
}

impl<M> EventBus<M> {
    /// Uses `marshaler` instead.
    pub fn with_marshaler<N>(self, marshaler: N) -> EventBus<N> {
        let Bus {
            publisher,
            naming,
            hook,
            kind,
            type_header,
            ..
        } = self.bus;
        EventBus {
            bus: Bus {
                publisher,
                marshaler,
                naming,
                hook,
                kind,
                type_header,
            },
        }
    }

    /// Replaces how event names map to topics.
    pub fn with_topic_naming(mut self, naming: TopicNaming) -> Self {
        self.bus.naming = naming;
        self
    }

    /// Tags events with their type name in `header` instead of `cqrs-name` metadata (e.g.
    /// [`TypeHeader::watermill`] to talk to Watermill services). Processors must read the
    /// same place.
    pub fn with_type_header(mut self, header: TypeHeader) -> Self {
        self.bus.type_header = header;
        self
    }

    /// Runs `hook` on every message before it is published.
    pub fn on_publish(mut self, hook: impl Fn(&mut Message) + Send + Sync + 'static) -> Self {
        self.bus.hook = Some(Arc::new(hook));
        self
    }

    /// The topic event `E` is published to.
    pub fn topic_of<E: Event>(&self) -> String {
        self.bus.naming.topic(&E::name())
    }

    /// Marshals and publishes `event`; returns once the broker accepted it.
    pub async fn publish<E: Event>(&self, event: &E) -> Result<(), CqrsError>
    where
        M: Marshal<E>,
    {
        self.bus.send(&E::name(), event).await
    }
}
