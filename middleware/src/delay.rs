//! Delayed redelivery: nack with an exponentially growing delay.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tidemill_core::router::{redeliver_after, redelivery_delay};
use tidemill_core::{is_permanent, BoxError, Message};
use tower::{Layer, Service};

use crate::headers;
use crate::util::{HandlerOutput, LayerFuture, OnError, OnFailure};
use crate::Backoff;

type Predicate = Arc<dyn Fn(&BoxError) -> bool + Send + Sync>;

/// On a handler error, asks the router to nack the input with a delay
/// ([`nack_with_delay`](tidemill_core::Delivery::nack_with_delay)) that grows with the
/// delivery attempt: `backoff.delay(attempt)`. The broker then redelivers the message no
/// earlier than that, instead of at once, so a struggling dependency gets time to recover.
///
/// The attempt is the broker's ([`MessageContext::attempt`](tidemill_core::MessageContext::attempt)),
/// or the durable count a [`DeadLetter`](crate::DeadLetter) layer keeps on brokers without
/// one; lacking both, every delay is the first. Permanent errors, and errors that ask for a
/// delay already, are passed on unchanged (by default; see
/// [`when`](DelayedRedelivery::when)): redelivering permanent ones is futile. Each
/// message's future keeps an `Arc` of the configuration and the attempt (one metadata
/// lookup).
///
/// ```
/// use std::time::Duration;
/// use tidemill_core::{HandlerResult, MemoryBroker, Message, Router};
/// use tidemill_middleware::{Backoff, DelayedRedelivery};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = MemoryBroker::new();
/// let router = Router::new();
/// router
///     .add_handler("sync")
///     .subscribe(broker.subscriber(), "changes")
///     .layer(DelayedRedelivery::new(
///         Backoff::new(Duration::from_secs(1)).max_interval(Duration::from_secs(60)),
///     ))
///     .handler(|_m: Message| async move { HandlerResult::Ok(()) })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DelayedRedelivery {
    backoff: Backoff,
    predicate: Predicate,
}

impl DelayedRedelivery {
    /// Delays redeliveries by `backoff`.
    pub fn new(backoff: Backoff) -> Self {
        DelayedRedelivery {
            backoff,
            predicate: Arc::new(|e: &BoxError| !is_permanent(e.as_ref())),
        }
    }

    /// Delays only errors for which `predicate` is true (default: not permanent).
    pub fn when(mut self, predicate: impl Fn(&BoxError) -> bool + Send + Sync + 'static) -> Self {
        self.predicate = Arc::new(predicate);
        self
    }
}

impl fmt::Debug for DelayedRedelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DelayedRedelivery")
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

/// The delivery attempt of `msg`: the durable count of a dead-letter layer when the
/// message is such a copy, else the broker's, else 1.
pub(crate) fn delivery_attempt(msg: &Message) -> u32 {
    let md = msg.metadata();
    let topic = msg.context().map(|c| c.handler().topic.as_str());
    if topic.is_some() && md.get(headers::FAILURES_TOPIC) == topic {
        if let Ok(Some(prior)) = md.get_as::<u32>(headers::FAILURES) {
            return prior + 1;
        }
    }
    msg.context().and_then(|c| c.attempt()).unwrap_or(1)
}

impl<S> Layer<S> for DelayedRedelivery {
    type Service = DelayedRedeliveryService<S>;

    fn layer(&self, inner: S) -> DelayedRedeliveryService<S> {
        DelayedRedeliveryService {
            inner,
            config: Arc::new(self.clone()),
        }
    }
}

/// The service made by [`DelayedRedelivery`].
#[derive(Clone)]
pub struct DelayedRedeliveryService<S> {
    inner: S,
    config: Arc<DelayedRedelivery>,
}

impl<S: fmt::Debug> fmt::Debug for DelayedRedeliveryService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DelayedRedeliveryService")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish()
    }
}

impl<S> Service<Message> for DelayedRedeliveryService<S>
where
    S: Service<Message, Response = Vec<Message>>,
    S::Error: Into<BoxError>,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = LayerFuture<S::Future, DelayFailure>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let failure = DelayFailure {
            attempt: delivery_attempt(&msg),
            config: self.config.clone(),
        };
        LayerFuture::from(OnError::new(self.inner.call(msg), failure))
    }
}

/// The error path of [`DelayedRedelivery`].
pub struct DelayFailure {
    attempt: u32,
    config: Arc<DelayedRedelivery>,
}

impl OnFailure for DelayFailure {
    fn fail(self, error: BoxError) -> futures::future::BoxFuture<'static, HandlerOutput> {
        let config = self.config;
        let result = if redelivery_delay(error.as_ref()).is_some() || !(config.predicate)(&error) {
            Err(error)
        } else {
            Err(redeliver_after(config.backoff.delay(self.attempt), error))
        };
        Box::pin(futures::future::ready(result))
    }
}
