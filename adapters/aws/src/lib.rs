//! # tidemill-aws
//!
//! Tidemill on AWS: SNS topics fanning out to SQS queues, on the official AWS SDK.
#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod names;

pub use config::{AwsConfig, Mode};

/// The broker name in errors and logs.
pub const BROKER: &str = "aws";
