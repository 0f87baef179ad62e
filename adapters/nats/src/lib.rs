#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod codec;
mod config;
mod connection;
mod core_nats;
mod js;
mod naming;
mod publisher;
mod record;
mod subscriber;
mod wire;

pub use config::{
    DeliverFrom, JetStreamConfig, NatsConfig, NatsMode, Retention, Storage, UuidHeader,
};
pub use publisher::NatsPublisher;
pub use record::{NatsRecord, RawHeader};
pub use subscriber::NatsSubscriber;

/// The broker name in every error of this crate.
pub const BROKER: &str = "nats";
