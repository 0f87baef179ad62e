//! Correlation id propagation.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tidemill_core::{BoxError, Message};
use tower::{Layer, Service};

use crate::headers;

/// Copies the input's correlation id into every message the handler returns, so a chain of
/// handlers can be followed end to end. When the input has none, a chain starts: its
/// outputs get the input's uuid (unique, time-ordered) as their correlation id, so the
/// chain leads back to the message that began it. Outputs that already carry a correlation
/// id keep theirs. The input itself is not modified. Each message's future keeps a copy of
/// the input without its context (one reference count); handlers that publish nothing pay
/// nothing more.
///
/// The metadata key is [`headers::CORRELATION_ID`] (`correlation-id`) unless
/// [`key`](CorrelationId::key) says otherwise; [`correlation_id`] reads it.
///
/// ```
/// use tidemill_core::{HandlerResult, MemoryBroker, Message, Router};
/// use tidemill_middleware::{correlation_id, CorrelationId};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = MemoryBroker::new();
/// let router = Router::new();
/// router.layer(CorrelationId::new()); // every handler
/// router
///     .add_handler("enrich")
///     .subscribe(broker.subscriber(), "orders")
///     .publish(broker.publisher(), "orders.enriched")
///     .handler(|msg: Message| async move {
///         tracing::info!(correlation_id = ?correlation_id(&msg), "enriching");
///         // Gets the input's correlation id, or the input's uuid when it has none.
///         HandlerResult::Ok(Message::new(msg.payload().clone()))
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct CorrelationId {
    /// `None`: [`headers::CORRELATION_ID`] (costs nothing to share per message).
    key: Option<Arc<str>>,
}

impl Default for CorrelationId {
    fn default() -> Self {
        Self::new()
    }
}

impl CorrelationId {
    /// Propagates [`headers::CORRELATION_ID`].
    pub fn new() -> Self {
        CorrelationId { key: None }
    }

    /// Propagates the metadata entry `key` instead.
    pub fn key(key: impl AsRef<str>) -> Self {
        CorrelationId {
            key: Some(Arc::from(key.as_ref())),
        }
    }
}

/// The correlation id of `msg` under the default key, if it has one.
pub fn correlation_id(msg: &Message) -> Option<&str> {
    msg.metadata().get(headers::CORRELATION_ID)
}

impl<S> Layer<S> for CorrelationId {
    type Service = CorrelationIdService<S>;

    fn layer(&self, inner: S) -> CorrelationIdService<S> {
        CorrelationIdService {
            inner,
            key: self.key.clone(),
        }
    }
}

/// The service made by [`CorrelationId`].
#[derive(Clone, Debug)]
pub struct CorrelationIdService<S> {
    inner: S,
    key: Option<Arc<str>>,
}

impl<S> Service<Message> for CorrelationIdService<S>
where
    S: Service<Message, Response = Vec<Message>>,
    S::Error: Into<BoxError>,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = CorrelationFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, msg: Message) -> Self::Future {
        // One reference count: the outputs get the input's id once the handler is done.
        let source = msg.detached();
        CorrelationFuture {
            fut: self.inner.call(msg),
            key: self.key.clone(),
            source,
        }
    }
}

pin_project! {
    /// The future of [`CorrelationIdService`].
    pub struct CorrelationFuture<F> {
        #[pin]
        fut: F,
        key: Option<Arc<str>>,
        source: Message,
    }
}

impl<F, E> Future for CorrelationFuture<F>
where
    F: Future<Output = Result<Vec<Message>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Vec<Message>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.fut.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
            Poll::Ready(Ok(mut out)) => {
                if !out.is_empty() {
                    tag(this.key.as_deref(), this.source, &mut out);
                }
                Poll::Ready(Ok(out))
            }
        }
    }
}

/// Gives every output without a correlation id the one of the input (or the input's uuid).
/// Out of line: handlers that publish nothing never get here.
#[inline(never)]
fn tag(key: Option<&str>, source: &Message, out: &mut [Message]) {
    let key = key.unwrap_or(headers::CORRELATION_ID);
    let id = source.metadata().get(key).unwrap_or(source.uuid());
    for m in out {
        m.metadata_mut().set_if_absent(key, id);
    }
}
