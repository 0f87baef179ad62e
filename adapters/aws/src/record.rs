//! [`SqsRecord`]: the SQS message a delivery was read from.

use std::time::SystemTime;

use bytes::Bytes;
use tidemill_core::Message;

use crate::BROKER;

/// A message attribute as SQS carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attribute {
    /// Its data type: `String`, `Number` or `Binary`, optionally with a custom suffix
    /// (`String.json`).
    pub data_type: String,
    /// Its value.
    pub value: AttributeValue,
}

/// The value of an [`Attribute`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttributeValue {
    /// A `String` or `Number` value.
    Text(String),
    /// A `Binary` value.
    Binary(Bytes),
}

impl Attribute {
    /// A `String` attribute.
    pub fn text(value: impl Into<String>) -> Self {
        Attribute {
            data_type: "String".to_owned(),
            value: AttributeValue::Text(value.into()),
        }
    }

    pub(crate) fn size(&self, name: &str) -> usize {
        name.len()
            + self.data_type.len()
            + match &self.value {
                AttributeValue::Text(s) => s.len(),
                AttributeValue::Binary(b) => b.len(),
            }
    }
}

/// The SQS message a received message came from.
///
/// Every message an [`SqsSubscriber`](crate::SqsSubscriber) delivers carries one, read
/// through [`SqsRecord::of`]. When a handler publishes the message again through an
/// [`SqsPublisher`](crate::SqsPublisher), the attributes it did not change are written as
/// received (with their data types).
///
/// ```no_run
/// # fn handle(msg: &tidemill_core::Message) {
/// use tidemill_aws::SqsRecord;
/// if let Some(record) = SqsRecord::of(msg) {
///     println!("{} from queue {}", record.message_id(), record.queue());
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct SqsRecord {
    pub(crate) queue: String,
    pub(crate) message_id: String,
    pub(crate) attributes: Vec<(String, Attribute)>,
    pub(crate) sent_at: Option<SystemTime>,
    pub(crate) group_id: Option<String>,
    pub(crate) sequence_number: Option<String>,
    pub(crate) sns_message_id: Option<String>,
    pub(crate) uuid_stored: bool,
}

impl SqsRecord {
    /// The record of `msg`, if an `SqsSubscriber` received it.
    pub fn of(msg: &Message) -> Option<&SqsRecord> {
        tidemill_core::Native::of::<SqsRecord>(msg, BROKER)
    }

    /// The queue it was received from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// SQS's message id (the same on every receive of this message from this queue).
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// The message attributes as received, sorted by name (Tidemill's own included).
    pub fn attributes(&self) -> &[(String, Attribute)] {
        &self.attributes
    }

    /// When it was sent to the queue (`SentTimestamp`).
    pub fn sent_at(&self) -> Option<SystemTime> {
        self.sent_at
    }

    /// Its FIFO message group id.
    pub fn message_group_id(&self) -> Option<&str> {
        self.group_id.as_deref()
    }

    /// Its FIFO sequence number.
    pub fn sequence_number(&self) -> Option<&str> {
        self.sequence_number.as_deref()
    }

    /// The SNS message id, when it arrived in an SNS notification envelope (a queue
    /// subscribed without raw message delivery) that was unwrapped.
    pub fn sns_message_id(&self) -> Option<&str> {
        self.sns_message_id.as_deref()
    }

    /// Whether it carried a `tidemill-uuid` attribute; when it had none (sent by another
    /// program) the message's uuid is SQS's message id (or the SNS message id of an
    /// envelope).
    pub fn uuid_stored(&self) -> bool {
        self.uuid_stored
    }
}
