//! # tidemill-middleware
//!
//! Reliability middleware for the Tidemill [router](tidemill_core::Router), as
//! [`tower::Layer`]s, and [request-reply](request_reply) over any broker.
//!
//! Every layer works at router level (`router.layer(..)`, wrapping every handler) and at
//! handler level (`.layer(..)` on the handler builder). tower's own layers do the rest of
//! the job and need nothing from Tidemill: `tower::timeout::TimeoutLayer` (a timed-out
//! handler fails, so the message is nacked or retried), `tower::limit::RateLimitLayer`
//! (per handler), `tower::limit::ConcurrencyLimitLayer` and `tower::load_shed::LoadShedLayer`.
//!
//! | layer | on a handler error | settles the input by |
//! |---|---|---|
//! | [`Retry`] | calls the handler again in-process, with exponential backoff | passing the last error on |
//! | [`DelayedRedelivery`] | asks for a redelivery after a growing delay | nack with delay (router hook [`redeliver_after`](tidemill_core::router::redeliver_after)) |
//! | [`PoisonQueue`] | publishes permanent failures to a poison topic | ack after the publish; nack if it fails |
//! | [`DeadLetter`] | after N deliveries, publishes to a dead-letter topic | ack after the publish; durable counting republishes, then acks |
//! | [`Recoverer`] | turns panics into errors the other layers see | — |
//! | [`CorrelationId`] | — (copies the correlation id to outputs) | — |
//! | [`Throttle`] | — (N messages per duration, shared or per handler) | — |
//! | [`CircuitBreaker`] | opens after N failures; refuses while open | nack with the open time as delay |
//! | [`Deduplicator`] | — (acks duplicates unhandled) | ack |
//! | [`IgnoreErrors`] | listed error kinds become success | ack |
//! | [`InstantAck`] | — (acks before the handler runs: at-most-once) | early ack (router hook [`take_ack`](tidemill_core::MessageContext::take_ack)) |
//! | [`Duplicator`] | — (runs the handler twice, for idempotency tests) | — |
//!
//! ## The recommended stack
//!
//! A failure flows from the handler outwards: panics become errors, transient errors are
//! retried in-process, then redelivered with a growing delay, and after N deliveries the
//! message goes to a dead-letter topic; permanent errors skip all that and go to a poison
//! topic at once. Layers added first are outermost:
//!
//! ```
//! use std::time::Duration;
//! use tidemill_core::{permanent, HandlerResult, MemoryBroker, Message, Router};
//! use tidemill_middleware::{
//!     Backoff, CorrelationId, DeadLetter, DelayedRedelivery, PoisonQueue, Recoverer, Retry,
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = MemoryBroker::new();
//! let router = Router::new();
//! router
//!     .layer(CorrelationId::new())
//!     .layer(DeadLetter::new(broker.publisher(), "dead-letters").max_deliveries(5))
//!     .layer(PoisonQueue::new(broker.publisher(), "poison"))
//!     .layer(DelayedRedelivery::new(Backoff::new(Duration::from_secs(1))))
//!     .layer(Retry::new().max_attempts(3).backoff(Backoff::new(Duration::from_millis(100))))
//!     .layer(Recoverer::new());
//! router
//!     .add_handler("orders")
//!     .subscribe(broker.subscriber(), "orders")
//!     .group("orders")
//!     .handler(|msg: Message| async move {
//!         if msg.payload().is_empty() {
//!             return Err(permanent("empty order")); // → poison, at once
//!         }
//!         HandlerResult::Ok(()) // a transient error → retry → delayed redelivery → dead letter
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod circuit_breaker;
mod correlation;
mod dead_letter;
mod dedup;
mod delay;
mod duplicator;
pub mod headers;
mod ignore_errors;
mod instant_ack;
mod poison;
mod recoverer;
pub mod request_reply;
mod retry;
mod throttle;
mod util;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use circuit_breaker::{CircuitBreaker, CircuitBreakerService, CircuitOpen, CircuitState};
pub use correlation::{correlation_id, CorrelationFuture, CorrelationId, CorrelationIdService};
pub use dead_letter::{
    Counting, DeadLetter, DeadLetterPublishFailed, DeadLetterService, NotYetDue,
};
pub use dedup::{DedupKey, DedupStore, Deduplicator, DeduplicatorService, MemoryDedupStore};
pub use delay::{DelayedRedelivery, DelayedRedeliveryService};
pub use duplicator::{Duplicator, DuplicatorService};
pub use ignore_errors::{IgnoreErrors, IgnoreErrorsService};
pub use instant_ack::{InstantAck, InstantAckService};
pub use poison::{PoisonPublishFailed, PoisonQueue, PoisonQueueService};
pub use recoverer::{Panicked, Recoverer, RecovererFuture, RecovererService};
pub use retry::{AttemptTimedOut, Retry, RetryEvent, RetryFuture, RetryService};
pub use throttle::{Throttle, ThrottleService};
pub use tidemill_core::Backoff;
pub use util::{LayerFuture, OnFailure};
