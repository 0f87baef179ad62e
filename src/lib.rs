//! # Tidemill
//!
//! Broker-agnostic messaging for Rust, in the spirit of Go's Watermill: write handlers once
//! against one small API and run them on the embedded in-memory broker, Kafka, RabbitMQ,
//! NATS JetStream or Google Cloud Pub/Sub by changing configuration.
//!
//! This facade re-exports [`tidemill_core`]: the [`Message`] model, the [`Publisher`] and
//! [`Subscriber`] traits, [`Delivery`] acknowledgements, the [`Router`] and the embedded
//! [`MemoryBroker`].
//!
//! ```
//! use tidemill::{MemoryBroker, Message, Publisher, SubscribeOptions, Subscriber};
//! use futures::StreamExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> tidemill::Result<()> {
//! let broker = MemoryBroker::new();
//! let mut orders = broker.subscriber().subscribe("orders", SubscribeOptions::new()).await?;
//! broker.publisher().publish_one("orders", Message::new("tea x2")).await?;
//! let delivery = orders.next().await.expect("open")?;
//! println!("got {}", delivery.message());
//! delivery.ack().await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub use tidemill_core::*;

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
