//! Instant ack: acknowledge before handling.

use std::future::poll_fn;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tidemill_core::{BoxError, Message};
use tower::{Layer, Service};

use crate::util::Shared;

/// Acks the input *before* the handler runs, through the router's early-settlement hook
/// ([`MessageContext::take_ack`](tidemill_core::MessageContext::take_ack)). The handler
/// then runs as usual and its output is still published.
///
/// **Trade-off: at-most-once for this handler.** If the handler fails, panics, or the
/// process dies while it runs, the message is *not* redelivered: it is gone. Use it for
/// work that is cheap to lose (cache warming, metrics) or that must not be redelivered
/// (non-idempotent, long-running work that would exceed the broker's ack deadline). Layers
/// outside it still see the handler's errors, but nothing they do can bring the message
/// back; the router logs such failures. It costs a boxed future and the early ack per
/// message.
///
/// ```
/// use tidemill_core::{HandlerResult, MemoryBroker, Message, Router};
/// use tidemill_middleware::InstantAck;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = MemoryBroker::new();
/// let router = Router::new();
/// router
///     .add_handler("page-views")
///     .subscribe(broker.subscriber(), "page-views")
///     .layer(InstantAck::new())
///     .handler(|_m: Message| async move { HandlerResult::Ok(()) })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct InstantAck;

impl InstantAck {
    /// The layer.
    pub fn new() -> Self {
        InstantAck
    }
}

impl<S: Service<Message>> Layer<S> for InstantAck {
    type Service = InstantAckService<S>;

    fn layer(&self, inner: S) -> InstantAckService<S> {
        InstantAckService {
            inner: Shared::new(inner),
        }
    }
}

/// The service made by [`InstantAck`].
pub struct InstantAckService<S> {
    inner: Shared<S>,
}

impl<S> std::fmt::Debug for InstantAckService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstantAckService").finish_non_exhaustive()
    }
}

impl<S> Service<Message> for InstantAckService<S>
where
    S: Service<Message, Response = Vec<Message>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Vec<Message>, BoxError>>;

    /// Always ready: the handler's readiness is awaited after the ack.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            match msg.context().and_then(|c| c.take_ack()) {
                Some(handle) => {
                    if let Err(e) = handle.ack().await {
                        // The broker will redeliver: at-least-once after all, for this one.
                        tracing::warn!(uuid = msg.uuid(), error = %e, "instant ack failed; handling anyway");
                    }
                }
                None => tracing::debug!(
                    uuid = msg.uuid(),
                    "no acknowledgement to take (not from a router, or already settled)"
                ),
            }
            let fut = poll_fn(|cx| inner.poll_call(cx, &msg))
                .await
                .map_err(Into::into)?;
            fut.await.map_err(Into::into)
        })
    }
}
