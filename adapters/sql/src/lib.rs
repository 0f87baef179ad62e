#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
pub mod inbox;
mod listen;
pub mod outbox;
mod publisher;
mod record;
mod schema;
mod subscriber;

pub use config::{SqlConfig, StartFrom};
pub use publisher::{DeliverAt, SqlPublisher};
pub use record::SqlRecord;
pub use schema::schema_sql;
pub use subscriber::SqlSubscriber;

/// The sqlx this crate is built with, for the transactions and queries you pass to it
/// (`publish_in`, the inbox's handler) without a version mismatch.
pub use sqlx;

/// The broker name in every error of this crate.
pub const BROKER: &str = "postgres";
