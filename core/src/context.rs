//! Where and how a message was received: the router's per-delivery context
//! ([`MessageContext`]), the facts about the handler ([`HandlerInfo`]) and the input's
//! acknowledgement the router and layers share ([`Settlement`]).

use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::{AckHandle, AttemptOrigin};

/// Where and how a message was received; set by the router before the handler runs.
///
/// Cloning is one reference count: the router allocates one block per message holding the
/// handler, the delivery attempt and the input's acknowledgement.
#[derive(Clone)]
pub struct MessageContext(Arc<Received>);

/// What a [`MessageContext`] shares (and, for the router's messages, its [`Settlement`]).
pub(crate) struct Received {
    handler: Arc<HandlerInfo>,
    attempt: Option<u32>,
    origin: AttemptOrigin,
    ack: AckSlot,
}

/// Where the input's acknowledgement is kept.
enum AckSlot {
    /// Not reachable (a context built without one).
    None,
    /// In this block (the router's messages).
    Own(Mutex<Option<AckHandle>>),
    /// In a separately made [`Settlement`].
    Shared(Settlement),
}

impl Received {
    /// Takes the acknowledgement; `None` if taken already or never there.
    pub(crate) fn take_ack(&self) -> Option<AckHandle> {
        match &self.ack {
            AckSlot::None => None,
            AckSlot::Own(slot) => slot.lock().take(),
            AckSlot::Shared(settlement) => settlement.take(),
        }
    }

    /// Whether the acknowledgement is gone (taken, or never there).
    pub(crate) fn ack_taken(&self) -> bool {
        match &self.ack {
            AckSlot::None => true,
            AckSlot::Own(slot) => slot.lock().is_none(),
            AckSlot::Shared(settlement) => settlement.is_taken(),
        }
    }
}

impl fmt::Debug for MessageContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageContext")
            .field("handler", &self.0.handler)
            .field("attempt", &self.0.attempt)
            .field("ack_taken", &self.0.ack_taken())
            .finish()
    }
}

impl MessageContext {
    /// A context for a message received by `handler`, on its `attempt`-th delivery if known.
    pub fn new(handler: Arc<HandlerInfo>, attempt: Option<u32>) -> Self {
        MessageContext(Arc::new(Received {
            handler,
            attempt,
            origin: AttemptOrigin::Broker,
            ack: AckSlot::None,
        }))
    }

    /// Records who counted the attempt (default: the broker); builder style.
    pub fn with_attempt_origin(self, origin: AttemptOrigin) -> Self {
        MessageContext(Arc::new(Received {
            handler: self.0.handler.clone(),
            attempt: self.0.attempt,
            origin,
            ack: AckSlot::None,
        }))
    }

    /// The context of a message received by `handler` and settled through `handle`, and
    /// the [`Settlement`] that settles it unless a layer [takes](Self::take_ack) the handle
    /// first. One allocation for both (the router uses this).
    pub fn received(handler: Arc<HandlerInfo>, handle: AckHandle) -> (Self, Settlement) {
        let received = Arc::new(Received {
            handler,
            attempt: handle.attempt(),
            origin: handle.attempt_origin(),
            ack: AckSlot::Own(Mutex::new(Some(handle))),
        });
        (
            MessageContext(received.clone()),
            Settlement::of_context(received),
        )
    }

    /// Makes the input's acknowledgement reachable through [`take_ack`](Self::take_ack)
    /// (the router does this); builder style.
    pub fn with_settlement(self, settlement: Settlement) -> Self {
        MessageContext(Arc::new(Received {
            handler: self.0.handler.clone(),
            attempt: self.0.attempt,
            origin: self.0.origin,
            ack: AckSlot::Shared(settlement),
        }))
    }

    /// Takes the input's acknowledgement handle away from the router, so the caller settles
    /// the input itself, before the handler finishes (an instant-ack layer acks it before
    /// the handler runs). The router still publishes the handler's output but no longer
    /// acks or nacks the input. `None` if someone took it already, or if the message was
    /// not received by a router.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tidemill_core::router::Settlement;
    /// use tidemill_core::{HandlerInfo, MemoryBroker, Message, MessageContext};
    /// # use tidemill_core::{Publisher, SubscribeOptions, Subscriber};
    /// # use futures::StreamExt;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> tidemill_core::Result<()> {
    /// # let broker = MemoryBroker::new();
    /// # let mut stream = broker.subscriber().subscribe("t", SubscribeOptions::new()).await?;
    /// # broker.publisher().publish_one("t", Message::new("x")).await?;
    /// # let delivery = stream.next().await.expect("open")?;
    /// let (mut msg, handle) = delivery.into_parts();
    /// let info = Arc::new(HandlerInfo {
    ///     name: "h".into(), topic: "t".into(), group: None, publish_topic: None,
    /// });
    /// msg.set_context(Some(
    ///     MessageContext::new(info, handle.attempt()).with_settlement(Settlement::new(handle)),
    /// ));
    /// let ctx = msg.context().expect("set above");
    /// let early = ctx.take_ack().expect("first taker gets it");
    /// early.ack().await?;
    /// assert!(ctx.take_ack().is_none());
    /// # Ok(()) }
    /// ```
    pub fn take_ack(&self) -> Option<AckHandle> {
        self.0.take_ack()
    }

    /// The handler processing the message.
    #[inline]
    pub fn handler(&self) -> &HandlerInfo {
        &self.0.handler
    }

    /// The delivery attempt (1 for the first delivery) where the broker or the subscriber
    /// counts it.
    #[inline]
    pub fn attempt(&self) -> Option<u32> {
        self.0.attempt
    }

    /// Who counted [`attempt`](Self::attempt): the broker (survives restarts) or this
    /// process.
    #[inline]
    pub fn attempt_origin(&self) -> AttemptOrigin {
        self.0.origin
    }
}

/// Static facts about a router handler, shared by every message it processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerInfo {
    /// The handler's unique name.
    pub name: String,
    /// The topic it consumes.
    pub topic: String,
    /// Its consumer group, if any.
    pub group: Option<String>,
    /// The topic its output is published to, if any.
    pub publish_topic: Option<String>,
}

/// The acknowledgement of one input message, shared between the router and the message's
/// context so that it can be taken early (see
/// [`MessageContext::take_ack`](crate::MessageContext::take_ack)). Whoever takes it settles
/// the message; if nobody does, the router does by the outcome rules.
#[derive(Clone)]
pub struct Settlement(Repr);

#[derive(Clone)]
enum Repr {
    /// Made by [`Settlement::new`].
    Standalone(Arc<Mutex<Option<AckHandle>>>),
    /// Shares the block of a context made by
    /// [`MessageContext::received`](crate::MessageContext::received).
    Context(Arc<Received>),
}

impl Settlement {
    /// Holds `handle` until someone takes it.
    pub fn new(handle: AckHandle) -> Self {
        Settlement(Repr::Standalone(Arc::new(Mutex::new(Some(handle)))))
    }

    pub(crate) fn of_context(received: Arc<Received>) -> Self {
        Settlement(Repr::Context(received))
    }

    /// Takes the handle; `None` if it was already taken.
    pub fn take(&self) -> Option<AckHandle> {
        match &self.0 {
            Repr::Standalone(slot) => slot.lock().take(),
            Repr::Context(received) => received.take_ack(),
        }
    }

    /// Whether the handle was taken.
    pub fn is_taken(&self) -> bool {
        match &self.0 {
            Repr::Standalone(slot) => slot.lock().is_none(),
            Repr::Context(received) => received.ack_taken(),
        }
    }
}

impl fmt::Debug for Settlement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settlement")
            .field("taken", &self.is_taken())
            .finish()
    }
}
