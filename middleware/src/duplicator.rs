//! Duplicator: run the handler twice, to test idempotency.

use std::future::poll_fn;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tidemill_core::{BoxError, Message};
use tower::{Layer, Service};

use crate::util::Shared;

/// Runs the handler twice for every message, one run after the other, and publishes the
/// output of both: a test aid that shows whether a handler is idempotent (what
/// at-least-once delivery requires of it). Either run failing fails the message. It costs
/// a boxed future and a second call per message: not for production.
///
/// ```
/// use tidemill_core::{HandlerResult, MemoryBroker, Message, Router};
/// use tidemill_middleware::Duplicator;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = MemoryBroker::new();
/// let router = Router::new();
/// router
///     .add_handler("upsert")
///     .subscribe(broker.subscriber(), "customers")
///     .layer(Duplicator::new())
///     .handler(|_m: Message| async move { HandlerResult::Ok(()) })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Duplicator;

impl Duplicator {
    /// The layer.
    pub fn new() -> Self {
        Duplicator
    }
}

impl<S: Service<Message>> Layer<S> for Duplicator {
    type Service = DuplicatorService<S>;

    fn layer(&self, inner: S) -> DuplicatorService<S> {
        DuplicatorService {
            inner: Shared::new(inner),
        }
    }
}

/// The service made by [`Duplicator`].
pub struct DuplicatorService<S> {
    inner: Shared<S>,
}

impl<S> std::fmt::Debug for DuplicatorService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DuplicatorService").finish_non_exhaustive()
    }
}

impl<S> Service<Message> for DuplicatorService<S>
where
    S: Service<Message, Response = Vec<Message>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Vec<Message>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut out = Vec::new();
            for _ in 0..2 {
                let fut = poll_fn(|cx| inner.poll_call(cx, &msg))
                    .await
                    .map_err(Into::into)?;
                out.extend(fut.await.map_err(Into::into)?);
            }
            Ok(out)
        })
    }
}
