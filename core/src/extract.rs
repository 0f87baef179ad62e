//! Extractors: what a router handler takes as arguments, in the style of axum.
//!
//! A handler given to [`HandlerBuilder::handler`](crate::router::HandlerBuilder::handler)
//! is an async function or closure whose arguments are extractors, each taken from the
//! received message (and the handler's state) before the function runs:
//!
//! | argument | what it is | fails when |
//! |---|---|---|
//! | [`Message`] | the message itself (only as the **last** argument) | never |
//! | [`State<T>`] | the handler's state (see [`HandlerBuilder::state`], [`Router::with_state`]), cloned per message | never |
//! | [`Json<T>`] | the payload decoded as JSON by [`marshal::Json`] | the payload does not decode |
//! | `Protobuf<T>` | the payload decoded by `marshal::Protobuf` (feature `protobuf`) | the payload does not decode |
//! | [`Metadata`] | the message's metadata (shared, not copied) | never |
//! | [`Key`] | the ordering key | the message has none (use `Option<Key>`) |
//! | [`MessageUuid`] | the message's uuid | never |
//! | [`MessageContext`] | where it was received: handler, topic, group, delivery attempt | outside a router |
//! | [`Bytes`] | the payload (shared, not copied) | never |
//! | [`String`] | the payload as UTF-8 text | it is not UTF-8 |
//! | `Option<T>` | `T`, or `None` where `T` fails | never |
//! | `Result<T, BoxError>` | `T`, or why it failed | never |
//!
//! A failing extractor fails the message with a **permanent** error ([`permanent`]) naming
//! the message, topic and cause, without calling the function: a poison queue
//! (tidemill-middleware's `PoisonQueue`) routes it to the poison topic with that reason;
//! without one the router nacks it with its growing delay. Extractors run in the order of
//! the arguments, before the handler's future is made.
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::Arc;
//! use serde::{Deserialize, Serialize};
//! use tidemill_core::extract::{Json, MessageContext, State};
//! use tidemill_core::router::Router;
//! use tidemill_core::{BoxError, MemoryBroker};
//!
//! #[derive(Deserialize)]
//! struct Order { id: String, cents: u64 }
//! #[derive(Serialize)]
//! struct Priced { id: String, total: u64 }
//!
//! #[derive(Clone, Default)]
//! struct Shop { handled: Arc<AtomicU64> }
//!
//! async fn price(
//!     State(shop): State<Shop>,
//!     ctx: MessageContext,
//!     Json(order): Json<Order>,
//! ) -> Result<Json<Priced>, BoxError> {
//!     shop.handled.fetch_add(1, Ordering::Relaxed);
//!     assert_eq!(ctx.handler().name, "price");
//!     Ok(Json(Priced { id: order.id, total: order.cents * 2 }))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = MemoryBroker::new();
//! let router = Router::new();
//! router
//!     .add_handler("price")
//!     .subscribe(broker.subscriber(), "orders")
//!     .publish(broker.publisher(), "priced")
//!     .state(Shop::default())
//!     .handler(price)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Implement [`FromMessageParts`] for your own extractors (and [`FromRef`] to take a part
//! of a larger state with `State<Part>`).
//!
//! [`HandlerBuilder::state`]: crate::router::HandlerBuilder::state
//! [`Router::with_state`]: crate::router::Router::with_state
//! [`permanent`]: crate::permanent

use std::convert::Infallible;
use std::fmt;
use std::ops::{Deref, DerefMut};

use bytes::Bytes;

#[cfg(feature = "protobuf")]
use crate::marshal::Marshal;
use crate::router::IntoOutput;
use crate::{marshal, permanent, BoxError, Message};

pub use crate::{MessageContext, Metadata};

/// Markers telling the two ways an argument is extracted (private: they only steer trait
/// selection).
pub mod via {
    /// The argument takes the message itself ([`FromMessage`](super::FromMessage)).
    #[derive(Debug)]
    pub enum Message {}
    /// The argument reads the message ([`FromMessageParts`](super::FromMessageParts)).
    #[derive(Debug)]
    pub enum Parts {}
}

/// An argument of a handler taken from a reference to the received message (and the
/// handler's state `S`): any argument position.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an argument of a handler (with state `{S}`)",
    label = "`{Self}` is not an extractor",
    note = "handler arguments are extractors: `State<T>`, `Json<T>`, `Metadata`, `Key`, \
            `MessageUuid`, `MessageContext`, `Bytes`, `String`, `Option<_>`/`Result<_, BoxError>` \
            of those, or a type implementing `FromMessageParts`",
    note = "`Message` (the message itself) may only be the last argument"
)]
pub trait FromMessageParts<S>: Sized {
    /// Why extraction failed; mark it [`permanent`](crate::permanent()) when retrying cannot
    /// help (the built-in extractors do).
    type Rejection: Into<BoxError>;

    /// Extracts the argument.
    fn from_message_parts(msg: &Message, state: &S) -> Result<Self, Self::Rejection>;
}

/// The last argument of a handler: it may take the received message itself. Every
/// [`FromMessageParts`] extractor is one too; `M` tells the two kinds apart.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be the last argument of a handler (with state `{S}`)",
    label = "`{Self}` is not an extractor",
    note = "the last argument may be `Message` or any extractor: `State<T>`, `Json<T>`, \
            `Metadata`, `Key`, `MessageUuid`, `MessageContext`, `Bytes`, `String`, ..."
)]
pub trait FromMessage<S, M = via::Message>: Sized {
    /// Why extraction failed.
    type Rejection: Into<BoxError>;

    /// Extracts the argument, consuming the message.
    fn from_message(msg: Message, state: &S) -> Result<Self, Self::Rejection>;
}

impl<S, T: FromMessageParts<S>> FromMessage<S, via::Parts> for T {
    type Rejection = T::Rejection;

    #[inline]
    fn from_message(msg: Message, state: &S) -> Result<Self, Self::Rejection> {
        T::from_message_parts(&msg, state)
    }
}

impl<S> FromMessage<S> for Message {
    type Rejection = Infallible;

    #[inline]
    fn from_message(msg: Message, _state: &S) -> Result<Self, Infallible> {
        Ok(msg)
    }
}

/// The arguments of a handler, extracted together: implemented for tuples of up to 8
/// extractors whose last one is a [`FromMessage`] and the others [`FromMessageParts`].
#[diagnostic::on_unimplemented(
    message = "the arguments `{Self}` cannot be extracted for a handler with state `{S}`",
    label = "not all of these are extractors",
    note = "every argument but the last must implement `FromMessageParts`; the last may be \
            `Message`"
)]
pub trait HandlerArgs<S, M>: Sized {
    /// Extracts every argument, in order; the first failure is returned.
    fn extract(msg: Message, state: &S) -> Result<Self, BoxError>;
}

impl<S> HandlerArgs<S, via::Parts> for () {
    #[inline]
    fn extract(_msg: Message, _state: &S) -> Result<Self, BoxError> {
        Ok(())
    }
}

macro_rules! handler_args {
    ($($part:ident),* ; $last:ident) => {
        impl<S, M, $($part,)* $last> HandlerArgs<S, M> for ($($part,)* $last,)
        where
            $($part: FromMessageParts<S>,)*
            $last: FromMessage<S, M>,
        {
            #[inline]
            #[allow(non_snake_case)]
            fn extract(msg: Message, state: &S) -> Result<Self, BoxError> {
                $(let $part = $part::from_message_parts(&msg, state).map_err(Into::into)?;)*
                let $last = $last::from_message(msg, state).map_err(Into::into)?;
                Ok(($($part,)* $last,))
            }
        }
    };
}

handler_args!(; T1);
handler_args!(T1; T2);
handler_args!(T1, T2; T3);
handler_args!(T1, T2, T3; T4);
handler_args!(T1, T2, T3, T4; T5);
handler_args!(T1, T2, T3, T4, T5; T6);
handler_args!(T1, T2, T3, T4, T5, T6; T7);
handler_args!(T1, T2, T3, T4, T5, T6, T7; T8);

/// Makes a `T` from a reference to the handler's state `S`, so `State<T>` can take a part
/// of a larger state. Every `Clone` type is made from itself.
///
/// ```
/// use std::sync::Arc;
/// use tidemill_core::extract::{FromRef, State};
///
/// #[derive(Clone)]
/// struct App { db: Arc<String>, mailer: Arc<String> }
///
/// #[derive(Clone)]
/// struct Db(Arc<String>);
/// impl FromRef<App> for Db {
///     fn from_ref(app: &App) -> Db { Db(app.db.clone()) }
/// }
/// // A handler on a router `with_state(app)` can now take `State(db): State<Db>`
/// // as well as `State(app): State<App>`.
/// # let app = App { db: Arc::new("db".into()), mailer: Arc::new("m".into()) };
/// # assert_eq!(*Db::from_ref(&app).0, "db");
/// ```
#[diagnostic::on_unimplemented(
    message = "`State<{Self}>` needs the handler's state to provide a `{Self}`, but the \
               state is `{T}`",
    label = "the state is `{T}`",
    note = "give the handler its state with `.state(value)` on the handler builder or \
            `router.with_state(value)`, or implement `FromRef<{T}> for {Self}` to take a \
            part of it"
)]
pub trait FromRef<T> {
    /// Makes `Self` from the state.
    fn from_ref(input: &T) -> Self;
}

impl<T: Clone> FromRef<T> for T {
    #[inline]
    fn from_ref(input: &T) -> T {
        input.clone()
    }
}

/// The handler's state (or a part of it, see [`FromRef`]), cloned for each message: keep
/// it cheap to clone (`Arc`s, pools, clients that are handles).
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use tidemill_core::extract::State;
/// use tidemill_core::{MemoryBroker, Message, Router};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = MemoryBroker::new();
/// let router = Router::new();
/// let seen = Arc::new(AtomicU64::new(0));
/// router
///     .add_handler("count")
///     .subscribe(broker.subscriber(), "events")
///     .state(seen.clone())
///     .handler(|State(seen): State<Arc<AtomicU64>>, _msg: Message| async move {
///         seen.fetch_add(1, Ordering::Relaxed);
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct State<T>(pub T);

impl<S, T: FromRef<S>> FromMessageParts<S> for State<T> {
    type Rejection = Infallible;

    #[inline]
    fn from_message_parts(_msg: &Message, state: &S) -> Result<Self, Infallible> {
        Ok(State(T::from_ref(state)))
    }
}

impl<T> Deref for State<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for State<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// Why an extractor refused a message; built-in extractors return it marked
/// [`permanent`](crate::permanent()) (retrying the same message cannot help).
#[derive(Debug)]
pub struct ExtractError {
    uuid: String,
    topic: Option<String>,
    what: String,
    source: Option<BoxError>,
}

impl ExtractError {
    /// An error about `msg`: `what` went wrong (e.g. "cannot decode it as JSON `Order`"),
    /// because of `source` if given.
    pub fn new(msg: &Message, what: impl Into<String>, source: Option<BoxError>) -> Self {
        ExtractError {
            uuid: msg.uuid().to_owned(),
            topic: msg.context().map(|c| c.handler().topic.clone()),
            what: what.into(),
            source,
        }
    }

    /// The same error, marked permanent (what the built-in extractors return).
    pub fn permanent(self) -> BoxError {
        permanent(self)
    }

    /// The uuid of the refused message.
    pub fn uuid(&self) -> &str {
        &self.uuid
    }
}

impl fmt::Display for ExtractError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "message {}", self.uuid)?;
        if let Some(topic) = &self.topic {
            write!(f, " on topic `{topic}`")?;
        }
        write!(f, ": {}", self.what)
    }
}

impl std::error::Error for ExtractError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// A payload in JSON: as an argument, decoded with [`marshal::Json`] (a payload that does
/// not decode fails the message permanently, naming the type and the decoder's error); as
/// the handler's output (`Ok(Json(value))`), `value` encoded with it and published with
/// `content-type: application/json` metadata.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tidemill_core::extract::Json;
/// use tidemill_core::{BoxError, HandlerResult};
///
/// #[derive(Deserialize)]
/// struct Order { id: String }
/// #[derive(Serialize)]
/// struct Accepted { id: String }
///
/// async fn accept(Json(order): Json<Order>) -> HandlerResult<Json<Accepted>> {
///     Ok(Json(Accepted { id: order.id }))
/// }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Json<T>(pub T);

impl<S, T: serde::de::DeserializeOwned> FromMessageParts<S> for Json<T> {
    type Rejection = BoxError;

    fn from_message_parts(msg: &Message, _state: &S) -> Result<Self, BoxError> {
        marshal::Json::decode(msg.payload())
            .map(Json)
            .map_err(|source| decode_error::<T>(msg, "JSON", source))
    }
}

impl<T: serde::Serialize> IntoOutput for Json<T> {
    fn into_output(self) -> Result<Vec<Message>, BoxError> {
        let payload = marshal::Json::encode(&self.0).map_err(|e| encode_error::<T>("JSON", e))?;
        Ok(vec![Message::new(payload).with_metadata(
            marshal::CONTENT_TYPE_KEY,
            marshal::Json::CONTENT_TYPE,
        )])
    }
}

impl<T> Deref for Json<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for Json<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// A Protocol Buffers payload (feature `protobuf`): like [`Json`], decoded and encoded with
/// `marshal::Protobuf` (prost).
#[cfg(feature = "protobuf")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Protobuf<T>(pub T);

#[cfg(feature = "protobuf")]
impl<S, T: prost::Message + Default> FromMessageParts<S> for Protobuf<T> {
    type Rejection = BoxError;

    fn from_message_parts(msg: &Message, _state: &S) -> Result<Self, BoxError> {
        marshal::Protobuf
            .unmarshal(msg.payload())
            .map(Protobuf)
            .map_err(|source| decode_error::<T>(msg, "Protobuf", source))
    }
}

#[cfg(feature = "protobuf")]
impl<T: prost::Message + Default> IntoOutput for Protobuf<T> {
    fn into_output(self) -> Result<Vec<Message>, BoxError> {
        let payload = marshal::Protobuf
            .marshal(&self.0)
            .map_err(|e| encode_error::<T>("Protobuf", e))?;
        Ok(vec![Message::new(payload).with_metadata(
            marshal::CONTENT_TYPE_KEY,
            Marshal::<T>::content_type(&marshal::Protobuf),
        )])
    }
}

#[cfg(feature = "protobuf")]
impl<T> Deref for Protobuf<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

#[cfg(feature = "protobuf")]
impl<T> DerefMut for Protobuf<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

fn decode_error<T>(msg: &Message, format: &str, source: BoxError) -> BoxError {
    ExtractError::new(
        msg,
        format!(
            "cannot decode the payload as {format} `{}`",
            marshal::short_type_name::<T>()
        ),
        Some(source),
    )
    .permanent()
}

/// The output of a handler that could not be encoded: permanent (the same value fails
/// again).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode the handler's output `{type_name}` as {format}: {source}")]
pub struct EncodeError {
    type_name: String,
    format: &'static str,
    #[source]
    source: BoxError,
}

fn encode_error<T>(format: &'static str, source: BoxError) -> BoxError {
    permanent(EncodeError {
        type_name: marshal::short_type_name::<T>(),
        format,
        source,
    })
}

impl<S> FromMessageParts<S> for Metadata {
    type Rejection = Infallible;

    #[inline]
    fn from_message_parts(msg: &Message, _state: &S) -> Result<Self, Infallible> {
        Ok(msg.metadata().clone())
    }
}

/// The message's ordering key; a message without one is refused (permanently): take
/// `Option<Key>` where keys are optional.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key(pub Bytes);

impl Key {
    /// The key as text, if it is UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

impl<S> FromMessageParts<S> for Key {
    type Rejection = BoxError;

    fn from_message_parts(msg: &Message, _state: &S) -> Result<Self, BoxError> {
        match msg.key() {
            Some(key) => Ok(Key(key.clone())),
            None => Err(ExtractError::new(msg, "it has no key", None).permanent()),
        }
    }
}

/// The message's uuid.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MessageUuid(pub String);

impl<S> FromMessageParts<S> for MessageUuid {
    type Rejection = Infallible;

    #[inline]
    fn from_message_parts(msg: &Message, _state: &S) -> Result<Self, Infallible> {
        Ok(MessageUuid(msg.uuid().to_owned()))
    }
}

impl<S> FromMessageParts<S> for MessageContext {
    type Rejection = BoxError;

    #[inline]
    fn from_message_parts(msg: &Message, _state: &S) -> Result<Self, BoxError> {
        match msg.context() {
            Some(ctx) => Ok(ctx.clone()),
            None => Err(ExtractError::new(
                msg,
                "it has no receive context (it was not delivered by a router)",
                None,
            )
            .permanent()),
        }
    }
}

impl<S> FromMessageParts<S> for Bytes {
    type Rejection = Infallible;

    #[inline]
    fn from_message_parts(msg: &Message, _state: &S) -> Result<Self, Infallible> {
        Ok(msg.payload().clone())
    }
}

impl<S> FromMessageParts<S> for String {
    type Rejection = BoxError;

    fn from_message_parts(msg: &Message, _state: &S) -> Result<Self, BoxError> {
        match std::str::from_utf8(msg.payload()) {
            Ok(text) => Ok(text.to_owned()),
            Err(e) => {
                Err(
                    ExtractError::new(msg, "its payload is not UTF-8 text", Some(Box::new(e)))
                        .permanent(),
                )
            }
        }
    }
}

impl<S, T: FromMessageParts<S>> FromMessageParts<S> for Option<T> {
    type Rejection = Infallible;

    #[inline]
    fn from_message_parts(msg: &Message, state: &S) -> Result<Self, Infallible> {
        Ok(T::from_message_parts(msg, state).ok())
    }
}

impl<S, T: FromMessageParts<S>> FromMessageParts<S> for Result<T, BoxError> {
    type Rejection = Infallible;

    #[inline]
    fn from_message_parts(msg: &Message, state: &S) -> Result<Self, Infallible> {
        Ok(T::from_message_parts(msg, state).map_err(Into::into))
    }
}
