#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod client;
mod config;
mod convert;
mod publisher;
mod record;
mod state;
mod subscriber;
mod subscription;

pub use config::{KafkaConfig, Ordering, StartFrom};
pub use publisher::KafkaPublisher;
pub use record::{KafkaHeader, KafkaRecord, KafkaTimestamp};
pub use subscriber::KafkaSubscriber;

/// The broker name in every error of this crate.
pub const BROKER: &str = "kafka";
