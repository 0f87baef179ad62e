//! Handlers: tower services from `Message` to the messages to publish, and the adapter that
//! turns plain async functions into such services.

use std::future::Future;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, FutureExt};
use tower::Service;

use crate::{BoxError, Message};

/// The result type of handler functions: `Ok` with what to publish (`()` for nothing).
pub type HandlerResult<T = ()> = Result<T, BoxError>;

/// What a handler returns: the messages to publish to its output topic.
pub trait IntoMessages {
    /// Converts into the list of messages to publish.
    fn into_messages(self) -> Vec<Message>;
}

impl IntoMessages for () {
    fn into_messages(self) -> Vec<Message> {
        Vec::new()
    }
}

impl IntoMessages for Message {
    fn into_messages(self) -> Vec<Message> {
        vec![self]
    }
}

impl IntoMessages for Option<Message> {
    fn into_messages(self) -> Vec<Message> {
        self.into_iter().collect()
    }
}

impl IntoMessages for Vec<Message> {
    fn into_messages(self) -> Vec<Message> {
        self
    }
}

/// Turns an async function `Fn(Message) -> Result<R, E>` into a handler service, where `R`
/// is `()`, `Message`, `Option<Message>` or `Vec<Message>`.
///
/// ```
/// use tidemill_core::router::{handler_fn, HandlerResult};
/// use tidemill_core::Message;
///
/// async fn shout(msg: Message) -> HandlerResult<Message> {
///     let text = std::str::from_utf8(msg.payload())?.to_uppercase();
///     Ok(Message::new(text))
/// }
/// let service = handler_fn(shout);
/// # let _ = service;
/// ```
pub fn handler_fn<F, Fut, R, E>(f: F) -> HandlerFn<F, R, E>
where
    F: Fn(Message) -> Fut,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
    R: IntoMessages,
    E: Into<BoxError>,
{
    HandlerFn {
        f,
        _marker: PhantomData,
    }
}

/// A handler service built from a function by [`handler_fn`].
pub struct HandlerFn<F, R, E> {
    f: F,
    _marker: PhantomData<fn() -> (R, E)>,
}

impl<F: Clone, R, E> Clone for HandlerFn<F, R, E> {
    fn clone(&self) -> Self {
        HandlerFn {
            f: self.f.clone(),
            _marker: PhantomData,
        }
    }
}

impl<F, R, E> std::fmt::Debug for HandlerFn<F, R, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerFn").finish_non_exhaustive()
    }
}

impl<F, Fut, R, E> Service<Message> for HandlerFn<F, R, E>
where
    F: Fn(Message) -> Fut,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
    R: IntoMessages,
    E: Into<BoxError>,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = futures::future::Map<Fut, fn(Result<R, E>) -> Result<Vec<Message>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        (self.f)(msg).map(|r| r.map(IntoMessages::into_messages).map_err(Into::into))
    }
}

/// The type-erased handler service router-level layers wrap.
pub type BoxHandler = tower::util::BoxService<Message, Vec<Message>, BoxError>;

/// The future of a [`BoxHandler`].
pub type BoxHandlerFuture = BoxFuture<'static, Result<Vec<Message>, BoxError>>;
