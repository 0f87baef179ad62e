//! [`PubSubRecord`]: what Pub/Sub delivered, attached to every received message.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use tidemill_core::Message;

use crate::BROKER;

/// Where a received message's Tidemill key came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeySource {
    /// No key.
    None,
    /// The Pub/Sub ordering key.
    OrderingKey,
    /// The `tidemill-key` attribute.
    Attribute,
    /// The `tidemill-key.b64` attribute (base64 of a key that is not UTF-8).
    Base64Attribute,
}

/// What Pub/Sub delivered for a received message: its message id, publish time, ordering
/// key, delivery attempt and every attribute exactly as published, including the ones
/// Tidemill reads itself (the uuid attribute, `tidemill-key`).
///
/// Every message a `GoogleCloudSubscriber` delivers carries one, read through
/// [`PubSubRecord::of`] (or `tidemill_core::Native::of::<PubSubRecord>(&msg, "googlecloud")`).
/// Handlers that only use the string metadata need none of this. When a message carrying
/// a record is published again through a `GoogleCloudPublisher` (a handler passing it on,
/// a dead-letter or poison layer), the Pub/Sub message is built from the record: the same
/// ordering key and attributes, with only what the application changed in the metadata,
/// key or uuid applied. A plain subscriber then sees what the original publisher sent,
/// plus the uuid attribute when the original had none.
///
/// ```no_run
/// # fn handle(msg: &tidemill_core::Message) {
/// use tidemill_googlecloud::PubSubRecord;
/// if let Some(record) = PubSubRecord::of(msg) {
///     println!("message {} published at {:?}", record.message_id(), record.publish_time());
///     println!("ordering key {:?}", record.ordering_key());
///     for (name, value) in record.attributes() {
///         println!("{name} = {value}");
///     }
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PubSubRecord {
    pub(crate) message_id: String,
    pub(crate) publish_time: Option<SystemTime>,
    pub(crate) ordering_key: String,
    pub(crate) attributes: HashMap<String, String>,
    pub(crate) delivery_attempt: Option<u32>,
    pub(crate) subscription: Arc<str>,
    pub(crate) topic: Arc<str>,
    /// The attribute the uuid was read from; `None` when the message had none (its uuid is
    /// the message id).
    pub(crate) uuid_attribute: Option<String>,
    /// The key as decoded, and where from.
    pub(crate) key: Option<Bytes>,
    pub(crate) key_source: KeySource,
}

impl PubSubRecord {
    /// The record of `msg`, if a `GoogleCloudSubscriber` received it.
    pub fn of(msg: &Message) -> Option<&PubSubRecord> {
        tidemill_core::Native::of::<PubSubRecord>(msg, BROKER)
    }

    /// The message id Pub/Sub assigned on publish: unique within the topic and the same on
    /// every redelivery. A message without a uuid attribute has it as its uuid.
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// When Pub/Sub accepted the message (`publish_time`), if the service reported it.
    pub fn publish_time(&self) -> Option<SystemTime> {
        self.publish_time
    }

    /// The ordering key the message was published with; `None` for none (Pub/Sub's empty
    /// ordering key).
    pub fn ordering_key(&self) -> Option<&str> {
        (!self.ordering_key.is_empty()).then_some(self.ordering_key.as_str())
    }

    /// Every attribute as published, including those Tidemill turned into the uuid or the
    /// key (and which are therefore not in the message's metadata).
    pub fn attributes(&self) -> &HashMap<String, String> {
        &self.attributes
    }

    /// Pub/Sub's delivery attempt (1 for the first delivery), reported only on
    /// subscriptions with a dead-letter policy; the same as `Delivery::attempt`.
    pub fn delivery_attempt(&self) -> Option<u32> {
        self.delivery_attempt
    }

    /// The subscription that delivered the message (`projects/P/subscriptions/S`).
    pub fn subscription(&self) -> &str {
        &self.subscription
    }

    /// The topic the message was consumed from (`projects/P/topics/T`).
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Whether the attribute `name` became the uuid or the key rather than metadata.
    pub(crate) fn consumed(&self, name: &str) -> bool {
        self.uuid_attribute.as_deref() == Some(name)
            || match self.key_source {
                KeySource::Attribute => name == tidemill_core::headers::KEY_HEADER,
                KeySource::Base64Attribute => name == crate::convert::KEY_B64_ATTRIBUTE,
                KeySource::None | KeySource::OrderingKey => false,
            }
    }
}
