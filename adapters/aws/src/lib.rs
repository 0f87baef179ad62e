#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod client;
mod codec;
mod config;
mod names;
mod publisher;
mod record;
mod resources;
mod subscriber;

pub use config::{AwsConfig, Mode};
pub use publisher::SqsPublisher;
pub use record::{Attribute, AttributeValue, SqsRecord};
pub use subscriber::SqsSubscriber;

/// The broker name in every error of this crate.
pub const BROKER: &str = "aws";
