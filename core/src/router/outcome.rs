//! Hooks through which a handler or a layer settles its input differently from the default
//! outcome rules (`Ok` → publish, ack; error → nack at once).
//!
//! - **Nack with a delay**: return an error wrapped by [`redeliver_after`]; the router nacks
//!   the input with [`nack_with_delay`](crate::Delivery::nack_with_delay) instead of `nack`.
//!   Delayed-redelivery and circuit-breaker middleware use this.
//! - **Settle early**: [`MessageContext::take_ack`](crate::MessageContext::take_ack) hands the
//!   input's [`AckHandle`] to whoever asks first (e.g. an instant-ack layer that acks before
//!   the handler runs). The router then still publishes the handler's output, but no longer
//!   settles the input; a later error is only logged.
//!
//! Acking without publishing needs no hook: a layer that has dealt with a message itself
//! (published it to a poison or dead-letter topic) returns `Ok(vec![])`, which the router
//! acks.

use std::fmt;
use std::time::Duration;

use crate::BoxError;

/// A handler error asking the router to redeliver the input after a delay. Build one with
/// [`redeliver_after`]; the router finds it anywhere in the error's source chain.
#[derive(Debug)]
pub struct RedeliverAfter {
    delay: Duration,
    source: BoxError,
}

impl RedeliverAfter {
    /// How long the broker should wait before redelivering.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// The wrapped error.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.source.as_ref()
    }
}

impl fmt::Display for RedeliverAfter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl std::error::Error for RedeliverAfter {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// Wraps `error` so the router nacks the input with `delay` (the broker redelivers it no
/// earlier than that) instead of at once.
///
/// ```
/// use std::time::Duration;
/// use tidemill_core::router::{redeliver_after, redelivery_delay};
/// use tidemill_core::BoxError;
///
/// let err: BoxError = redeliver_after(Duration::from_secs(5), "database unavailable");
/// assert_eq!(redelivery_delay(err.as_ref()), Some(Duration::from_secs(5)));
/// assert_eq!(err.to_string(), "database unavailable");
/// ```
pub fn redeliver_after(delay: Duration, error: impl Into<BoxError>) -> BoxError {
    Box::new(RedeliverAfter {
        delay,
        source: error.into(),
    })
}

/// The delay asked for by a [`RedeliverAfter`] in `error` or its source chain (the
/// outermost one wins); `None` when the error asks for none.
pub fn redelivery_delay(error: &(dyn std::error::Error + 'static)) -> Option<Duration> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(err) = current {
        if let Some(r) = err.downcast_ref::<RedeliverAfter>() {
            return Some(r.delay);
        }
        current = err.source();
    }
    None
}
