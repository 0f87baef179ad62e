#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod confirm;
mod connection;
mod convert;
mod native;
mod publisher;
mod settle;
mod subscriber;
mod topology;

pub use config::{
    AmqpConfig, ExchangeType, Naming, QueueType, UuidCarrier, MAX_NAME_BYTES,
    RABBITMQ_MAX_MESSAGE_BYTES, WATERMILL_UUID_HEADER,
};
pub use convert::PROPERTY_KEYS;
pub use native::AmqpEnvelope;
pub use publisher::AmqpPublisher;
pub use subscriber::AmqpSubscriber;

/// The broker name in every error of this crate.
pub const BROKER: &str = "amqp";
