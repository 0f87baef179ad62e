//! [`SqlRecord`]: the row a message was read from.

use std::time::SystemTime;

use tidemill_core::Message;

use crate::BROKER;

/// The row of the messages table a received message came from.
///
/// Every message a [`SqlSubscriber`](crate::SqlSubscriber) delivers carries one, read
/// through [`SqlRecord::of`].
///
/// ```no_run
/// # fn handle(msg: &tidemill_core::Message) {
/// use tidemill_sql::SqlRecord;
/// if let Some(record) = SqlRecord::of(msg) {
///     println!("{} #{} written at {:?}", record.topic(), record.offset(), record.created_at());
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct SqlRecord {
    pub(crate) topic: String,
    pub(crate) offset: i64,
    pub(crate) created_at: SystemTime,
    pub(crate) group: String,
    pub(crate) uuid_stored: bool,
}

impl SqlRecord {
    /// The record of `msg`, if a `SqlSubscriber` received it.
    pub fn of(msg: &Message) -> Option<&SqlRecord> {
        tidemill_core::Native::of::<SqlRecord>(msg, BROKER)
    }

    /// The topic column.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The row's `offset`: its position in the table (unique, growing with each insert).
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// When the row was written (the database server's clock).
    pub fn created_at(&self) -> SystemTime {
        self.created_at
    }

    /// The consumer group that received it (a generated name for a subscription without
    /// a group).
    pub fn consumer_group(&self) -> &str {
        &self.group
    }

    /// Whether the row had a uuid; when it had none (a plain `INSERT` by another program)
    /// the message's uuid is derived from topic and offset, the same on every delivery.
    pub fn uuid_stored(&self) -> bool {
        self.uuid_stored
    }
}
