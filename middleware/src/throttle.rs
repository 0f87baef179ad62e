//! Throttle: at most N messages per duration, shared or per handler.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tidemill_core::{BoxError, Message};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

/// Lets at most `count` messages per `per` into the handler, evenly spaced (one every
/// `per / count`), by holding back the handler's readiness: the router takes no new
/// message until the next slot.
///
/// One `Throttle` value is **one budget**: every service made from it, or from its clones,
/// shares it, so `router.layer(Throttle::new(..))` limits all handlers together.
/// [`Throttle::per_handler`] gives each handler (each service it makes) its own budget.
/// tower's `RateLimitLayer` is the per-handler alternative with bursts ("N per window").
/// It costs a lock per message, and a timer while it holds a message back.
///
/// ```
/// use std::time::Duration;
/// use tidemill_core::{HandlerResult, MemoryBroker, Message, Router};
/// use tidemill_middleware::Throttle;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = MemoryBroker::new();
/// let router = Router::new();
/// let shared = Throttle::new(100, Duration::from_secs(1)); // 100 msg/s for both handlers
/// for topic in ["emails", "sms"] {
///     router
///         .add_handler(topic)
///         .subscribe(broker.subscriber(), topic)
///         .layer(shared.clone())
///         .handler(|_m: Message| async move { HandlerResult::Ok(()) })
///         .await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Throttle {
    interval: Duration,
    shared: Option<Arc<Mutex<Option<Instant>>>>,
}

impl Throttle {
    /// `count` messages per `per`, one budget for every service made from this value.
    pub fn new(count: u32, per: Duration) -> Self {
        Throttle {
            interval: per / count.max(1),
            shared: Some(Arc::default()),
        }
    }

    /// `count` messages per `per` for each handler separately.
    pub fn per_handler(count: u32, per: Duration) -> Self {
        Throttle {
            interval: per / count.max(1),
            shared: None,
        }
    }
}

impl fmt::Debug for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Throttle")
            .field("interval", &self.interval)
            .field("shared", &self.shared.is_some())
            .finish()
    }
}

impl<S> Layer<S> for Throttle {
    type Service = ThrottleService<S>;

    fn layer(&self, inner: S) -> ThrottleService<S> {
        ThrottleService {
            inner,
            interval: self.interval,
            next: self.shared.clone().unwrap_or_default(),
            reserved: false,
            sleep: None,
        }
    }
}

/// The service made by [`Throttle`].
pub struct ThrottleService<S> {
    inner: S,
    interval: Duration,
    /// When the next message may start (shared between the services of one budget).
    next: Arc<Mutex<Option<Instant>>>,
    /// A slot was taken by `poll_ready` for the next `call`.
    reserved: bool,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S> fmt::Debug for ThrottleService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThrottleService")
            .field("interval", &self.interval)
            .field("reserved", &self.reserved)
            .finish_non_exhaustive()
    }
}

impl<S> Service<Message> for ThrottleService<S>
where
    S: Service<Message, Response = Vec<Message>>,
    S::Error: Into<BoxError>,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = futures::future::MapErr<S::Future, fn(S::Error) -> BoxError>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        while !self.reserved {
            if let Some(sleep) = &mut self.sleep {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
            let now = Instant::now();
            let mut next = self.next.lock();
            match *next {
                Some(at) if at > now => {
                    drop(next);
                    self.sleep = Some(Box::pin(tokio::time::sleep_until(at)));
                }
                _ => {
                    *next = Some(now + self.interval);
                    self.reserved = true;
                }
            }
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        use futures::TryFutureExt;
        self.reserved = false;
        self.inner
            .call(msg)
            .map_err(Into::into as fn(S::Error) -> BoxError)
    }
}
