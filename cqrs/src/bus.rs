//! CommandBus and EventBus: marshal, tag with the type name, publish.

use std::sync::Arc;

use tidemill_core::{Message, Publisher};

use crate::{Command, CqrsError, Event, Json, Marshal, TopicNaming, CONTENT_TYPE_KEY, NAME_KEY};

type SendHook = Arc<dyn Fn(&mut Message) + Send + Sync>;

/// What both buses share.
#[derive(Clone)]
struct Bus<M> {
    publisher: Arc<dyn Publisher>,
    marshaler: M,
    naming: TopicNaming,
    hook: Option<SendHook>,
    kind: &'static str,
}

impl<M> Bus<M> {
    async fn send<T>(&self, name: &str, value: &T) -> Result<(), CqrsError>
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
        let mut msg = Message::new(payload)
            .with_metadata(NAME_KEY, name)
            .with_metadata(CONTENT_TYPE_KEY, self.marshaler.content_type());
        if let Some(hook) = &self.hook {
            hook(&mut msg);
        }
        let topic = self.naming.topic(name);
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
            ..
        } = self.bus;
        CommandBus {
            bus: Bus {
                publisher,
                marshaler,
                naming,
                hook,
                kind,
            },
        }
    }

    /// Replaces how command names map to topics.
    pub fn with_topic_naming(mut self, naming: TopicNaming) -> Self {
        self.bus.naming = naming;
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
            ..
        } = self.bus;
        EventBus {
            bus: Bus {
                publisher,
                marshaler,
                naming,
                hook,
                kind,
            },
        }
    }

    /// Replaces how event names map to topics.
    pub fn with_topic_naming(mut self, naming: TopicNaming) -> Self {
        self.bus.naming = naming;
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
