//! In-process retries with exponential backoff.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tidemill_core::router::metric_names;
use tidemill_core::{is_permanent, BoxError, Message};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use crate::util::HandlerOutput;
use crate::Backoff;

type Predicate = Arc<dyn Fn(&BoxError) -> bool + Send + Sync>;
type Hook = Arc<dyn Fn(&RetryEvent<'_>) + Send + Sync>;

/// Retries a failing handler in-process, with exponential backoff, before the error reaches
/// the layers outside it (and finally the router, which nacks).
///
/// - `max_attempts` counts every call, the first included (default 3);
/// - delays follow a [`Backoff`] (default 100 ms, doubling, at most 10 s);
/// - `max_elapsed` stops retrying once the next retry would start later than that after
///   the first call;
/// - `retry_if` decides which errors are retried (default: all but
///   [permanent](tidemill_core::permanent) ones);
/// - `on_retry` is called before each retry (for logs and metrics);
/// - `attempt_timeout` bounds each call on its own. A tower `TimeoutLayer` placed *inside*
///   the retry layer does the same: each attempt gets a fresh timeout, so one slow attempt
///   does not doom the next. Placed outside, a timeout bounds all attempts together.
///
/// Each message's future keeps a clone of the message for the next attempt and an `Arc` of
/// the layer's state (the inner service and the configuration), so it retries the same way
/// whoever polls it (the router, `ServiceExt::oneshot`, a `Buffer`, a spawned task), also
/// after its service is gone; that is its whole cost when the first attempt succeeds (a
/// lock per call is added only while futures of one service overlap). The last error is
/// returned unchanged, so outer layers (poison queue, dead letter) see the handler's own
/// error.
///
/// ```
/// use std::time::Duration;
/// use tidemill_core::{permanent, HandlerResult, MemoryBroker, Message, Router};
/// use tidemill_middleware::{Backoff, Retry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = MemoryBroker::new();
/// let router = Router::new();
/// let retry = Retry::new()
///     .max_attempts(5)
///     .backoff(Backoff::new(Duration::from_millis(50)).jitter(true))
///     .max_elapsed(Duration::from_secs(10))
///     .attempt_timeout(Duration::from_secs(2))
///     .on_retry(|e| tracing::warn!(uuid = e.message.uuid(), attempt = e.attempt, "retrying"));
/// router
///     .add_handler("orders")
///     .subscribe(broker.subscriber(), "orders")
///     .layer(retry)
///     .handler(|msg: Message| async move {
///         if msg.payload().is_empty() {
///             return Err(permanent("empty order")); // not retried
///         }
///         HandlerResult::Ok(())
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Retry {
    config: Arc<Config>,
}

struct Config {
    max_attempts: u32,
    backoff: Backoff,
    max_elapsed: Option<Duration>,
    attempt_timeout: Option<Duration>,
    retry_if: Predicate,
    on_retry: Option<Hook>,
}

impl Clone for Config {
    fn clone(&self) -> Self {
        Config {
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            max_elapsed: self.max_elapsed,
            attempt_timeout: self.attempt_timeout,
            retry_if: self.retry_if.clone(),
            on_retry: self.on_retry.clone(),
        }
    }
}

/// What [`Retry::on_retry`] hooks see before each retry.
#[derive(Debug)]
pub struct RetryEvent<'a> {
    /// The message being handled.
    pub message: &'a Message,
    /// The attempt that just failed (1 = the first call).
    pub attempt: u32,
    /// How long the layer waits before the next attempt.
    pub delay: Duration,
    /// The error of the failed attempt.
    pub error: &'a BoxError,
}

/// An attempt took longer than [`Retry::attempt_timeout`].
#[derive(Debug, thiserror::Error)]
#[error("attempt {attempt} timed out after {after:?}")]
pub struct AttemptTimedOut {
    /// Which attempt (1 = the first call).
    pub attempt: u32,
    /// The timeout.
    pub after: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self::new()
    }
}

impl Retry {
    /// Three attempts, [`Backoff::default`], retrying every error that is not permanent.
    pub fn new() -> Self {
        Retry {
            config: Arc::new(Config {
                max_attempts: 3,
                backoff: Backoff::default(),
                max_elapsed: None,
                attempt_timeout: None,
                retry_if: Arc::new(|e: &BoxError| !is_permanent(e.as_ref())),
                on_retry: None,
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// Calls in total, the first included (at least 1).
    pub fn max_attempts(self, n: u32) -> Self {
        self.with(|c| c.max_attempts = n.max(1))
    }

    /// The delays between attempts.
    pub fn backoff(self, backoff: Backoff) -> Self {
        self.with(|c| c.backoff = backoff)
    }

    /// No retry starts later than `max` after the first call.
    pub fn max_elapsed(self, max: Duration) -> Self {
        self.with(|c| c.max_elapsed = Some(max))
    }

    /// Bounds each attempt; a timed-out attempt fails with [`AttemptTimedOut`] (retried
    /// like any other error).
    pub fn attempt_timeout(self, timeout: Duration) -> Self {
        self.with(|c| c.attempt_timeout = Some(timeout))
    }

    /// Retries only errors for which `predicate` is true.
    pub fn retry_if(self, predicate: impl Fn(&BoxError) -> bool + Send + Sync + 'static) -> Self {
        self.with(|c| c.retry_if = Arc::new(predicate))
    }

    /// Calls `hook` before each retry.
    pub fn on_retry(self, hook: impl Fn(&RetryEvent<'_>) + Send + Sync + 'static) -> Self {
        self.with(|c| c.on_retry = Some(Arc::new(hook)))
    }
}

impl fmt::Debug for Retry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("max_attempts", &self.config.max_attempts)
            .field("backoff", &self.config.backoff)
            .field("max_elapsed", &self.config.max_elapsed)
            .field("attempt_timeout", &self.config.attempt_timeout)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for Retry
where
    S: Service<Message>,
{
    type Service = RetryService<S>;

    fn layer(&self, inner: S) -> RetryService<S> {
        RetryService {
            shared: Arc::new(Inner {
                service: Mutex::new(inner),
                config: self.config.clone(),
            }),
        }
    }
}

/// The service made by [`Retry`].
pub struct RetryService<S> {
    shared: Arc<Inner<S>>,
}

/// The inner service and the configuration, shared by every future of one service (a
/// retry calls the service again later). Readiness and the call happen together under the
/// lock, so no caller can consume readiness another one asked for; the lock is never held
/// across an await.
struct Inner<S> {
    service: Mutex<S>,
    config: Arc<Config>,
}

impl<S: Service<Message>> Inner<S> {
    /// Polls the service's readiness and, once ready, calls it with a clone of `msg`.
    fn poll_call(&self, cx: &mut Context<'_>, msg: &Message) -> Poll<Result<S::Future, S::Error>> {
        let mut service = self.service.lock();
        match service.poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(service.call(msg.clone()))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    #[inline]
    fn attempt_timeout(&self) -> Option<Pin<Box<Sleep>>> {
        self.config
            .attempt_timeout
            .map(|d| Box::pin(tokio::time::sleep(d)))
    }
}

impl<S> fmt::Debug for RetryService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryService").finish_non_exhaustive()
    }
}

impl<S> Service<Message> for RetryService<S>
where
    S: Service<Message, Response = Vec<Message>>,
    S::Error: Into<BoxError>,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = RetryFuture<S>;

    /// Always ready: each attempt waits for the inner service's readiness itself.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, msg: Message) -> RetryFuture<S> {
        let started = self.shared.config.max_elapsed.map(|_| Instant::now());
        let timeout = self.shared.attempt_timeout();
        // The first attempt starts here when the inner service is ready (the usual case),
        // so the future starts out calling. Otherwise (not ready: the noop waker is not
        // kept, the future polls again with its own) the future waits for readiness.
        let (state, attempt, input) = {
            // No future of an earlier message alive (e.g. one message at a time): the
            // service is ours alone, no lock needed.
            let mut locked;
            let service = match Arc::get_mut(&mut self.shared) {
                Some(inner) => inner.service.get_mut(),
                None => {
                    locked = self.shared.service.lock();
                    &mut *locked
                }
            };
            match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(Ok(())) => {
                    let input = Some(msg.clone());
                    let fut = service.call(msg);
                    (State::Calling { fut, timeout }, 1, input)
                }
                Poll::Ready(Err(e)) => (
                    State::Failed {
                        error: Some(e.into()),
                    },
                    0,
                    None,
                ),
                Poll::Pending => (State::Idle, 0, Some(msg)),
            }
        };
        RetryFuture {
            started,
            shared: self.shared.clone(),
            input,
            attempt,
            state,
        }
    }
}

pin_project! {
    /// The future of [`RetryService`].
    pub struct RetryFuture<S: Service<Message>> {
        shared: Arc<Inner<S>>,
        // The message for the next attempt (`None` when the inner service failed before
        // the first one).
        input: Option<Message>,
        attempt: u32,
        started: Option<Instant>,
        #[pin]
        state: State<S::Future>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Idle,
        Calling { #[pin] fut: F, timeout: Option<Pin<Box<Sleep>>> },
        Sleeping { sleep: Pin<Box<Sleep>> },
        /// The inner service failed (not the handler): nothing to retry.
        Failed { error: Option<BoxError> },
    }
}

impl<S> Future for RetryFuture<S>
where
    S: Service<Message, Response = Vec<Message>>,
    S::Error: Into<BoxError>,
{
    type Output = HandlerOutput;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<HandlerOutput> {
        // The usual case, kept apart so that it compiles to little more than the inner poll:
        // an attempt without a timeout is in flight and succeeds (or is not done yet).
        if let StateProj::Calling { fut, timeout: None } = self.as_mut().project().state.project() {
            return match fut.poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(out)) => Poll::Ready(Ok(out)),
                Poll::Ready(Err(e)) => self.poll_slow(cx, Some(e.into())),
            };
        }
        self.poll_slow(cx, None)
    }
}

impl<S> RetryFuture<S>
where
    S: Service<Message, Response = Vec<Message>>,
    S::Error: Into<BoxError>,
{
    /// Everything but the usual case: `failed` is the error of the attempt just polled.
    #[cold]
    #[inline(never)]
    fn poll_slow(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut failed: Option<BoxError>,
    ) -> Poll<HandlerOutput> {
        let mut this = self.project();
        loop {
            if let Some(error) = failed.take() {
                let config = &*this.shared.config;
                if *this.attempt >= config.max_attempts || !(config.retry_if)(&error) {
                    return Poll::Ready(Err(error));
                }
                let Some(message) = &*this.input else {
                    return Poll::Ready(Err(error));
                };
                let delay = config.backoff.delay(*this.attempt);
                if let (Some(max), Some(started)) = (config.max_elapsed, *this.started) {
                    if started.elapsed() + delay > max {
                        tracing::debug!(attempt = *this.attempt, ?max, "retry budget spent");
                        return Poll::Ready(Err(error));
                    }
                }
                tracing::debug!(attempt = *this.attempt, ?delay, error = %error, "retrying");
                crate::util::count(metric_names::RETRIED, message);
                if let Some(hook) = &config.on_retry {
                    hook(&RetryEvent {
                        message,
                        attempt: *this.attempt,
                        delay,
                        error: &error,
                    });
                }
                this.state.set(State::Sleeping {
                    sleep: Box::pin(tokio::time::sleep(delay)),
                });
            }
            match this.state.as_mut().project() {
                StateProj::Idle => match &*this.input {
                    Some(msg) => match this.shared.poll_call(cx, msg) {
                        Poll::Pending => return Poll::Pending,
                        // The service itself failed: nothing to retry.
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                        Poll::Ready(Ok(fut)) => {
                            *this.attempt += 1;
                            let timeout = this.shared.attempt_timeout();
                            this.state.set(State::Calling { fut, timeout });
                        }
                    },
                    None => return Poll::Ready(Err("retry future polled after completion".into())),
                },
                StateProj::Failed { error } => {
                    let error = error
                        .take()
                        .unwrap_or_else(|| "retry future polled after completion".into());
                    return Poll::Ready(Err(error));
                }
                StateProj::Calling { fut, timeout } => match fut.poll(cx) {
                    Poll::Ready(Ok(out)) => return Poll::Ready(Ok(out)),
                    Poll::Ready(Err(e)) => failed = Some(e.into()),
                    Poll::Pending => {
                        let expired = match timeout {
                            Some(t) => t.as_mut().poll(cx).is_ready(),
                            None => false,
                        };
                        if !expired {
                            return Poll::Pending;
                        }
                        failed = Some(Box::new(AttemptTimedOut {
                            attempt: *this.attempt,
                            after: this.shared.config.attempt_timeout.unwrap_or_default(),
                        }));
                    }
                },
                StateProj::Sleeping { sleep } => {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.state.set(State::Idle);
                }
            }
        }
    }
}
