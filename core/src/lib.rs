//! # tidemill-core
//!
//! The core of Tidemill, a broker-agnostic messaging framework: the [`Message`] model, the
//! object-safe [`Publisher`] and [`Subscriber`] traits, [`Delivery`] acknowledgements, the
//! embedded [`MemoryBroker`], and the errors they share; the [`Router`] with its
//! [extractors](extract) (state, typed payloads) and the [marshalers](marshal) every typed
//! API shares.
//!
//! Delivery is **at least once**: a message is acknowledged to the broker only after the
//! application acked it; a nacked or dropped delivery is redelivered.
#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backoff;
mod context;
mod delivery;
mod error;
pub mod extract;
pub mod headers;
pub mod marshal;
pub mod memory;
mod message;
mod native;
mod pubsub;
pub mod router;
mod stop;

pub use backoff::Backoff;
pub use context::{HandlerInfo, MessageContext};
pub use delivery::{AckFuture, AckHandle, Acknowledger, AttemptOrigin, Delivery};
pub use error::{is_permanent, permanent, BoxError, Error, PermanentError, Result};
pub use memory::{MemoryBroker, MemoryConfig, MemoryPublisher, MemorySubscriber};
pub use message::{new_uuid, Message, Metadata, MetadataParseError};
pub use native::{Native, NativeEntry};
pub use pubsub::{
    ConnectionState, ConnectionStateCell, DeliveryStream, Publisher, SubscribeOptions, Subscriber,
};
pub use router::{handler_fn, HandlerResult, Router, RouterConfig, RouterError};

/// Re-exported so adapters and users name the same cancellation token type.
pub use tokio_util::sync::CancellationToken;

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
