//! Ignore errors: listed error kinds count as success.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tidemill_core::{BoxError, Message};
use tower::{Layer, Service};

use crate::util::{error_chain, HandlerOutput, LayerFuture, OnError, OnFailure};

type Matcher = Arc<dyn Fn(&(dyn std::error::Error + 'static)) -> bool + Send + Sync>;

/// Treats the listed kinds of error as success: the input is acked (nothing is
/// published) and the error is logged and counted. Kinds are error types, found anywhere
/// in the error's source chain ([`of_type`](IgnoreErrors::of_type)), or predicates
/// ([`when`](IgnoreErrors::when)). Each message's future keeps an `Arc` of the
/// configuration and a copy of the input without its context (one reference count), for
/// the log line.
///
/// ```
/// use tidemill_core::{HandlerResult, MemoryBroker, Message, Router};
/// use tidemill_middleware::IgnoreErrors;
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("customer {0} is already archived")]
/// struct AlreadyArchived(String);
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = MemoryBroker::new();
/// let router = Router::new();
/// router
///     .add_handler("archive")
///     .subscribe(broker.subscriber(), "archive")
///     .layer(IgnoreErrors::new().of_type::<AlreadyArchived>())
///     .handler(|m: Message| async move {
///         let result: HandlerResult = Err(AlreadyArchived(m.uuid().to_owned()).into());
///         result // acked: archiving twice is fine
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct IgnoreErrors {
    matchers: Arc<Vec<Matcher>>,
    ignored: Arc<AtomicU64>,
}

impl IgnoreErrors {
    /// Ignores nothing until told what to ignore.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ignores errors of type `E` (also when wrapped by other errors).
    pub fn of_type<E: std::error::Error + 'static>(self) -> Self {
        self.when(|e| {
            let mut current = Some(e);
            while let Some(err) = current {
                if err.is::<E>() {
                    return true;
                }
                current = err.source();
            }
            false
        })
    }

    /// Ignores errors for which `predicate` is true.
    pub fn when(
        mut self,
        predicate: impl Fn(&(dyn std::error::Error + 'static)) -> bool + Send + Sync + 'static,
    ) -> Self {
        Arc::make_mut(&mut self.matchers).push(Arc::new(predicate));
        self
    }

    /// How many errors were ignored so far.
    pub fn ignored(&self) -> u64 {
        self.ignored.load(Ordering::Relaxed)
    }

    fn matches(&self, error: &BoxError) -> bool {
        let error: &(dyn std::error::Error + 'static) = error.as_ref();
        self.matchers.iter().any(|m| m(error))
    }
}

impl fmt::Debug for IgnoreErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IgnoreErrors")
            .field("kinds", &self.matchers.len())
            .field("ignored", &self.ignored())
            .finish()
    }
}

impl<S> Layer<S> for IgnoreErrors {
    type Service = IgnoreErrorsService<S>;

    fn layer(&self, inner: S) -> IgnoreErrorsService<S> {
        IgnoreErrorsService {
            inner,
            config: Arc::new(self.clone()),
        }
    }
}

/// The service made by [`IgnoreErrors`].
#[derive(Clone, Debug)]
pub struct IgnoreErrorsService<S> {
    inner: S,
    config: Arc<IgnoreErrors>,
}

impl<S> Service<Message> for IgnoreErrorsService<S>
where
    S: Service<Message, Response = Vec<Message>>,
    S::Error: Into<BoxError>,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = LayerFuture<S::Future, IgnoreFailure>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let failure = IgnoreFailure {
            config: self.config.clone(),
            input: msg.detached(),
        };
        LayerFuture::from(OnError::new(self.inner.call(msg), failure))
    }
}

/// The error path of [`IgnoreErrors`].
pub struct IgnoreFailure {
    config: Arc<IgnoreErrors>,
    input: Message,
}

impl OnFailure for IgnoreFailure {
    fn fail(self, error: BoxError) -> futures::future::BoxFuture<'static, HandlerOutput> {
        let config = self.config;
        let result = if config.matches(&error) {
            config.ignored.fetch_add(1, Ordering::Relaxed);
            tracing::info!(uuid = self.input.uuid(), error = %error_chain(error.as_ref()), "ignoring handler error; acking");
            Ok(Vec::new())
        } else {
            Err(error)
        };
        Box::pin(futures::future::ready(result))
    }
}
