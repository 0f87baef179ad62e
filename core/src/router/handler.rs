//! Handlers: tower services from `Message` to the messages to publish, and the adapters that
//! turn plain async functions into such services: [`HandlerService`] (functions taking
//! extractors, see [`crate::extract`]) and [`handler_fn`] (functions of a `Message`).

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, FutureExt};
use pin_project_lite::pin_project;
use tower::Service;

use crate::extract::HandlerArgs;
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

/// What a handler may publish: the messages of an [`IntoMessages`] type, or a value encoded
/// by a marshaler ([`Json`](crate::extract::Json), `Protobuf`). Encoding may fail (a
/// permanent error).
#[diagnostic::on_unimplemented(
    message = "a handler cannot publish `{Self}`",
    label = "not a handler output",
    note = "a handler's `Ok` value is `()` (nothing to publish), `Message`, `Option<Message>`, \
            `Vec<Message>`, `Json<T>` (T: Serialize) or a type implementing `IntoMessages`"
)]
pub trait IntoOutput {
    /// The messages to publish.
    fn into_output(self) -> Result<Vec<Message>, BoxError>;
}

impl<T: IntoMessages> IntoOutput for T {
    #[inline]
    fn into_output(self) -> Result<Vec<Message>, BoxError> {
        Ok(self.into_messages())
    }
}

/// What a handler's future may resolve to: `Result<R, E>` with `R:` [`IntoOutput`] and `E:
/// Into<BoxError>`, or a bare `R` for a handler that cannot fail.
#[diagnostic::on_unimplemented(
    message = "a handler cannot return `{Self}`",
    label = "the handler's future resolves to `{Self}`",
    note = "a handler returns `Result<R, E>` (`HandlerResult<R>`), or a bare `R` if it cannot \
            fail, where `R` is `()`, `Message`, `Option<Message>`, `Vec<Message>` or `Json<T>` \
            and `E: Into<BoxError>`"
)]
pub trait IntoHandlerResult {
    /// The messages to publish, or why the message failed.
    fn into_handler_result(self) -> Result<Vec<Message>, BoxError>;
}

impl<R: IntoOutput, E: Into<BoxError>> IntoHandlerResult for Result<R, E> {
    #[inline]
    fn into_handler_result(self) -> Result<Vec<Message>, BoxError> {
        match self {
            Ok(out) => out.into_output(),
            Err(e) => Err(e.into()),
        }
    }
}

impl<T: IntoOutput> IntoHandlerResult for T {
    #[inline]
    fn into_handler_result(self) -> Result<Vec<Message>, BoxError> {
        self.into_output()
    }
}

/// An async function or closure usable as a handler: implemented for every `Fn` of up to 8
/// arguments returning a future. `Args` is the tuple of its argument types; the router
/// extracts them from each message ([`HandlerArgs`]).
///
/// A wrong signature is refused naming what is wrong; here "`u32` cannot be an argument of
/// a handler (with state `()`)", as `u32` is no extractor:
///
/// ```compile_fail,E0277
/// # use tidemill_core::{MemoryBroker, Message, Router};
/// # async fn add(router: Router, broker: MemoryBroker) {
/// router
///     .add_handler("h")
///     .subscribe(broker.subscriber(), "t")
///     .handler(|n: u32, msg: Message| async move { drop((n, msg)) })
///     .await;
/// # }
/// ```
///
/// and "a handler cannot return `u32`":
///
/// ```compile_fail,E0277
/// # use tidemill_core::{MemoryBroker, Message, Router};
/// # async fn add(router: Router, broker: MemoryBroker) {
/// router
///     .add_handler("h")
///     .subscribe(broker.subscriber(), "t")
///     .handler(|msg: Message| async move { 42u32 })
///     .await;
/// # }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a handler function",
    label = "expected an async function or closure of extractors",
    note = "a handler is an `async fn`, or a closure returning a future \
            (`|msg: Message| async move {{ .. }}`), of up to 8 arguments that are extractors \
            (see `tidemill_core::extract`)",
    note = "closures need their argument types: `|State(db): State<Db>, msg: Message| ..`"
)]
pub trait Handler<Args>: Sized {
    /// What the future resolves to.
    type Output;
    /// The future of one call.
    type Future: Future<Output = Self::Output>;

    /// Calls the function with its extracted arguments.
    fn call(&self, args: Args) -> Self::Future;
}

macro_rules! handler_impl {
    ($($arg:ident),*) => {
        impl<F, Fut, $($arg,)*> Handler<($($arg,)*)> for F
        where
            F: Fn($($arg),*) -> Fut,
            Fut: Future,
        {
            type Output = Fut::Output;
            type Future = Fut;

            #[inline]
            #[allow(non_snake_case)]
            fn call(&self, ($($arg,)*): ($($arg,)*)) -> Fut {
                (self)($($arg),*)
            }
        }
    };
}

handler_impl!();
handler_impl!(T1);
handler_impl!(T1, T2);
handler_impl!(T1, T2, T3);
handler_impl!(T1, T2, T3, T4);
handler_impl!(T1, T2, T3, T4, T5);
handler_impl!(T1, T2, T3, T4, T5, T6);
handler_impl!(T1, T2, T3, T4, T5, T6, T7);
handler_impl!(T1, T2, T3, T4, T5, T6, T7, T8);

/// The handler service [`HandlerBuilder::handler`](super::HandlerBuilder::handler) makes of
/// a [`Handler`] function and its state `S`: per message, it extracts the arguments `A` (a
/// refused message fails with the extractor's error, without calling the function), calls
/// the function and turns its result into the messages to publish.
pub struct HandlerService<F, A, M, S> {
    f: F,
    state: S,
    _marker: PhantomData<fn() -> (A, M)>,
}

impl<F, A, M, S> HandlerService<F, A, M, S> {
    /// A service calling `f` with arguments extracted from each message and `state`.
    pub fn new(f: F, state: S) -> Self {
        HandlerService {
            f,
            state,
            _marker: PhantomData,
        }
    }

    /// The state handed to extractors.
    pub fn state(&self) -> &S {
        &self.state
    }
}

impl<F: Clone, A, M, S: Clone> Clone for HandlerService<F, A, M, S> {
    fn clone(&self) -> Self {
        HandlerService::new(self.f.clone(), self.state.clone())
    }
}

impl<F, A, M, S> std::fmt::Debug for HandlerService<F, A, M, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerService")
            .field("args", &std::any::type_name::<A>())
            .field("state", &std::any::type_name::<S>())
            .finish_non_exhaustive()
    }
}

impl<F, A, M, S> Service<Message> for HandlerService<F, A, M, S>
where
    F: Handler<A>,
    F::Output: IntoHandlerResult,
    A: HandlerArgs<S, M>,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = HandlerFuture<F::Future>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, msg: Message) -> Self::Future {
        match A::extract(msg, &self.state) {
            Ok(args) => HandlerFuture {
                inner: Inner::Running {
                    fut: self.f.call(args),
                },
            },
            Err(error) => HandlerFuture {
                inner: Inner::Refused { error: Some(error) },
            },
        }
    }
}

pin_project! {
    /// The future of a [`HandlerService`]: the function's, or the error of an extractor
    /// that refused the message.
    pub struct HandlerFuture<Fut> {
        #[pin]
        inner: Inner<Fut>,
    }
}

pin_project! {
    #[project = InnerProj]
    enum Inner<Fut> {
        Running { #[pin] fut: Fut },
        Refused { error: Option<BoxError> },
    }
}

impl<Fut> std::fmt::Debug for HandlerFuture<Fut> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerFuture").finish_non_exhaustive()
    }
}

impl<Fut> Future for HandlerFuture<Fut>
where
    Fut: Future,
    Fut::Output: IntoHandlerResult,
{
    type Output = Result<Vec<Message>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().inner.project() {
            InnerProj::Running { fut } => fut.poll(cx).map(IntoHandlerResult::into_handler_result),
            InnerProj::Refused { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| "handler future polled after completion".into()))),
        }
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
