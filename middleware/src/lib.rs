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
//! Each layer's future owns what the layer needs (an `Arc` of its configuration, a clone
//! of the input where it must retry or dead-letter), so a layer behaves the same whoever
//! drives its service: the router, `ServiceExt::oneshot`, a `Buffer`, a spawned task. With
//! no layer at all the router already nacks failures with a growing delay
//! ([`RouterConfig::redelivery`](tidemill_core::RouterConfig::redelivery)).
//!
//! | layer | what it does | success-path cost per message |
//! |---|---|---|
//! | [`Retry`] | calls the handler again in-process with backoff, then passes the last error on | an `Arc` and a clone of the input |
//! | [`DelayedRedelivery`] | asks for a nack with a delay that grows with the delivery attempt ([`redeliver_after`](tidemill_core::router::redeliver_after)) | an `Arc` and a metadata lookup |
//! | [`PoisonQueue`] | publishes permanent failures to a poison topic, then acks (nacks if that publish fails) | an `Arc` and a clone of the input |
//! | [`DeadLetter`] | after N failed deliveries publishes to a dead-letter topic with the history, then acks; earlier failures pass on (or are republished, with durable counting) | an `Arc`, a clone of the input and a metadata check |
//! | [`Recoverer`] | turns panics into [`Panicked`] errors the other layers see | two unwind guards |
//! | [`CorrelationId`] | copies the input's correlation id to every output | one reference count |
//! | [`Throttle`] | at most N messages per duration, shared or per handler | a lock |
//! | [`CircuitBreaker`] | opens after N failures; while open, nacks with the open time as delay | two locks and a boxed future |
//! | [`Deduplicator`] | acks messages whose key was handled before, unhandled | a boxed future and a store lookup |
//! | [`IgnoreErrors`] | listed error kinds count as success (acked) | an `Arc` and one reference count |
//! | [`InstantAck`] | acks before the handler runs (at-most-once, via [`take_ack`](tidemill_core::MessageContext::take_ack)) | a boxed future and the early ack |
//! | [`Duplicator`] | runs the handler twice, for idempotency tests | a boxed future and a second call |
//!
//! At router level each layer also boxes its future (one allocation per layer and message).
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
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

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
