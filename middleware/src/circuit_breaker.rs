//! Circuit breaker: stop calling a failing dependency for a while.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use tidemill_core::router::redeliver_after;
use tidemill_core::{is_permanent, BoxError, Message};
use tokio::time::Instant;
use tower::{Layer, Service};

type Predicate = Arc<dyn Fn(&BoxError) -> bool + Send + Sync>;

/// Opens after `failures` consecutive failed calls; while open, messages are not handled
/// but nacked with a delay of the time the circuit stays open (so the broker holds them
/// back instead of spinning); after `open_for`, one message is let through as a probe
/// (half-open): its success closes the circuit, its failure opens it again.
///
/// One `CircuitBreaker` value is one circuit: its clones (and every handler it wraps)
/// share the state, so one breaker can guard a dependency several handlers use. Which
/// errors count as failures is decided by [`is_failure`](CircuitBreaker::is_failure)
/// (default: all but permanent ones — a malformed message says nothing about the
/// dependency's health). [`state`](CircuitBreaker::state) tells the current state. It
/// costs two locks (admit, record) and a boxed future per message.
///
/// ```
/// use std::time::Duration;
/// use tidemill_core::{HandlerResult, MemoryBroker, Message, Router};
/// use tidemill_middleware::CircuitBreaker;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = MemoryBroker::new();
/// let router = Router::new();
/// let breaker = CircuitBreaker::new(5, Duration::from_secs(30));
/// router
///     .add_handler("charge")
///     .subscribe(broker.subscriber(), "charges")
///     .layer(breaker.clone())
///     .handler(|_m: Message| async move { HandlerResult::Ok(()) })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct CircuitBreaker {
    failures: u32,
    open_for: Duration,
    is_failure: Predicate,
    state: Arc<Mutex<Inner>>,
}

/// The state of a [`CircuitBreaker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls go through; counting consecutive failures.
    Closed,
    /// Calls are refused (messages nacked with a delay).
    Open,
    /// One probe call is let through.
    HalfOpen,
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// The circuit is open: the message was not handled and is redelivered later.
#[derive(Debug, thiserror::Error)]
#[error("circuit open for another {remaining:?}; message not handled")]
pub struct CircuitOpen {
    /// How long the circuit stays open.
    pub remaining: Duration,
}

impl CircuitBreaker {
    /// Opens after `failures` consecutive failures (at least 1) for `open_for`.
    pub fn new(failures: u32, open_for: Duration) -> Self {
        CircuitBreaker {
            failures: failures.max(1),
            open_for,
            is_failure: Arc::new(|e: &BoxError| !is_permanent(e.as_ref())),
            state: Arc::new(Mutex::new(Inner::Closed { failures: 0 })),
        }
    }

    /// Which errors count as failures of the dependency.
    pub fn is_failure(
        mut self,
        predicate: impl Fn(&BoxError) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.is_failure = Arc::new(predicate);
        self
    }

    /// The current state.
    pub fn state(&self) -> CircuitState {
        match &*self.state.lock() {
            Inner::Closed { .. } => CircuitState::Closed,
            Inner::Open { until } if Instant::now() >= *until => CircuitState::HalfOpen,
            Inner::Open { .. } => CircuitState::Open,
            Inner::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Whether a call may go ahead now; `Err(remaining)` when refused.
    fn admit(&self) -> Result<(), Duration> {
        let mut state = self.state.lock();
        match &mut *state {
            Inner::Closed { .. } => Ok(()),
            Inner::Open { until } => {
                let now = Instant::now();
                if now >= *until {
                    tracing::info!("circuit half-open; letting one probe through");
                    *state = Inner::HalfOpen { probing: true };
                    Ok(())
                } else {
                    Err(*until - now)
                }
            }
            Inner::HalfOpen { probing } => {
                if *probing {
                    // Another probe is under way: come back after a short while.
                    Err(self.open_for.min(Duration::from_secs(1)))
                } else {
                    *probing = true;
                    Ok(())
                }
            }
        }
    }

    fn record(&self, failed: bool) {
        let mut state = self.state.lock();
        let next = match (&*state, failed) {
            (_, false) => {
                if !matches!(*state, Inner::Closed { .. }) {
                    tracing::info!("probe succeeded; circuit closed");
                }
                Inner::Closed { failures: 0 }
            }
            (Inner::Closed { failures }, true) if failures + 1 < self.failures => Inner::Closed {
                failures: failures + 1,
            },
            (Inner::Open { until }, true) => Inner::Open { until: *until },
            (_, true) => {
                tracing::warn!(open_for = ?self.open_for, "circuit opened");
                Inner::Open {
                    until: Instant::now() + self.open_for,
                }
            }
        };
        *state = next;
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("failures", &self.failures)
            .field("open_for", &self.open_for)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for CircuitBreaker {
    type Service = CircuitBreakerService<S>;

    fn layer(&self, inner: S) -> CircuitBreakerService<S> {
        CircuitBreakerService {
            inner,
            breaker: self.clone(),
        }
    }
}

/// The service made by [`CircuitBreaker`].
#[derive(Clone, Debug)]
pub struct CircuitBreakerService<S> {
    inner: S,
    breaker: CircuitBreaker,
}

impl<S> Service<Message> for CircuitBreakerService<S>
where
    S: Service<Message, Response = Vec<Message>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Vec<Message>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        if let Err(remaining) = self.breaker.admit() {
            return Box::pin(futures::future::ready(Err(redeliver_after(
                remaining,
                CircuitOpen { remaining },
            ))));
        }
        let breaker = self.breaker.clone();
        let fut = self.inner.call(msg);
        Box::pin(async move {
            let result = fut.await.map_err(Into::into);
            let failed = match &result {
                Ok(_) => false,
                Err(e) => (breaker.is_failure)(e),
            };
            breaker.record(failed);
            result
        })
    }
}
