//! [`RedisRecord`]: the stream entry a message was read from.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tidemill_core::Message;

use crate::codec::Role;
use crate::BROKER;

/// The stream entry a received message came from: stream, entry id and every field exactly
/// as stored (in order, repeated names and binary names and values included).
///
/// Every message a [`RedisSubscriber`](crate::RedisSubscriber) delivers carries one, read
/// through [`RedisRecord::of`]. When such a message is published again through a
/// [`RedisPublisher`](crate::RedisPublisher) (a handler passing it on, a dead-letter or
/// poison layer), the new entry is written from these fields with only what the application
/// changed applied, plus `tidemill-uuid` when the entry had none.
///
/// ```no_run
/// # fn handle(msg: &tidemill_core::Message) {
/// use tidemill_redis::RedisRecord;
/// if let Some(record) = RedisRecord::of(msg) {
///     println!("{} {}", record.stream(), record.id());
///     for (name, value) in record.fields() {
///         println!("{name:?} = {value:?}");
///     }
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RedisRecord {
    pub(crate) stream: String,
    pub(crate) id: String,
    pub(crate) fields: Vec<(Bytes, Bytes)>,
    pub(crate) roles: Vec<Role>,
    pub(crate) uuid: Arc<str>,
}

impl RedisRecord {
    /// The record of `msg`, if a `RedisSubscriber` received it.
    pub fn of(msg: &Message) -> Option<&RedisRecord> {
        tidemill_core::Native::of::<RedisRecord>(msg, BROKER)
    }

    /// The stream the entry is in (the topic with the configured prefix).
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The entry id, `<milliseconds>-<sequence>`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// When the server added the entry (the id's milliseconds), if the id has the usual
    /// form.
    pub fn timestamp(&self) -> Option<SystemTime> {
        let ms: u64 = self.id.split('-').next()?.parse().ok()?;
        Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// Every field-value pair of the entry, as stored.
    pub fn fields(&self) -> &[(Bytes, Bytes)] {
        &self.fields
    }
}
