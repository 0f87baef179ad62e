//! Panics become errors.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::FutureExt;
use pin_project_lite::pin_project;
use tidemill_core::{BoxError, Message};
use tower::{Layer, Service};

/// Turns a panic in the layers inside it or in the handler into a [`Panicked`] error
/// carrying the panic message, so retry, poison-queue and dead-letter layers outside it
/// see it like any other failure.
///
/// The router survives panics on its own (it nacks the message); without this layer,
/// though, a panic bypasses every layer between the handler and the router. Put it
/// innermost. It costs two unwind guards per message (around `call` and around each poll)
/// and no allocation.
///
/// ```
/// use tidemill_core::{HandlerResult, MemoryBroker, Message, Router};
/// use tidemill_middleware::{Recoverer, Retry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = MemoryBroker::new();
/// let router = Router::new();
/// router
///     .add_handler("fragile")
///     .subscribe(broker.subscriber(), "in")
///     .layer(Retry::new()) // sees the panic as an error and retries
///     .layer(Recoverer::new())
///     .handler(|msg: Message| async move {
///         assert!(!msg.payload().is_empty(), "empty payload");
///         HandlerResult::Ok(())
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Recoverer;

impl Recoverer {
    /// The layer.
    pub fn new() -> Self {
        Recoverer
    }
}

/// A handler panicked.
#[derive(Debug, thiserror::Error)]
#[error("handler panicked: {message}")]
pub struct Panicked {
    /// The panic message.
    pub message: String,
}

impl Panicked {
    fn from_payload(payload: Box<dyn Any + Send>) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "non-string panic payload".to_owned()
        };
        Panicked { message }
    }
}

impl<S> Layer<S> for Recoverer {
    type Service = RecovererService<S>;

    fn layer(&self, inner: S) -> RecovererService<S> {
        RecovererService { inner }
    }
}

/// The service made by [`Recoverer`].
#[derive(Clone, Debug)]
pub struct RecovererService<S> {
    inner: S,
}

impl<S> Service<Message> for RecovererService<S>
where
    S: Service<Message, Response = Vec<Message>>,
    S::Error: Into<BoxError>,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = RecovererFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, msg: Message) -> Self::Future {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(msg))) {
            Ok(fut) => RecovererFuture {
                state: State::Running {
                    fut: AssertUnwindSafe(fut).catch_unwind(),
                },
            },
            Err(payload) => RecovererFuture {
                state: State::Panicked {
                    error: Some(Panicked::from_payload(payload)),
                },
            },
        }
    }
}

pin_project! {
    /// The future of [`RecovererService`].
    pub struct RecovererFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = RecovererProj]
    enum State<F> {
        Running { #[pin] fut: futures::future::CatchUnwind<AssertUnwindSafe<F>> },
        Panicked { error: Option<Panicked> },
    }
}

impl<F, E> Future for RecovererFuture<F>
where
    F: Future<Output = Result<Vec<Message>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Vec<Message>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            RecovererProj::Running { fut } => match fut.poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(result)) => Poll::Ready(result.map_err(Into::into)),
                Poll::Ready(Err(payload)) => {
                    let error = Panicked::from_payload(payload);
                    tracing::error!(panic = %error.message, "handler panicked; recovered as an error");
                    Poll::Ready(Err(Box::new(error)))
                }
            },
            RecovererProj::Panicked { error } => {
                let error = error.take().unwrap_or_else(|| Panicked {
                    message: "polled after completion".to_owned(),
                });
                tracing::error!(panic = %error.message, "handler panicked; recovered as an error");
                Poll::Ready(Err(Box::new(error)))
            }
        }
    }
}
