#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod codec;
mod config;
mod conn;
mod publisher;
mod record;
mod subscriber;

pub use config::{RedisConfig, StartFrom};
pub use publisher::RedisPublisher;
pub use record::RedisRecord;
pub use subscriber::RedisSubscriber;

/// The broker name in every error of this crate.
pub const BROKER: &str = "redis";
