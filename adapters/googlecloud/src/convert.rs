//! Mapping between Tidemill messages and Pub/Sub messages.
//!
//! | Tidemill | Pub/Sub |
//! |---|---|
//! | payload | `data` (bytes, unchanged) |
//! | metadata | attributes (string → string, unchanged) |
//! | uuid | the uuid attribute (`tidemill-uuid` unless configured otherwise); for messages without it, the Pub/Sub message id |
//! | key (UTF-8, `message_ordering` on) | `ordering_key` |
//! | key (otherwise) | attribute `tidemill-key`, or `tidemill-key.b64` (base64) when not UTF-8 |
//! | key of a received message | its ordering key if it has one, else `tidemill-key`/`tidemill-key.b64` |
//! | delivery attempt | `delivery_attempt` (only with a dead-letter policy) |
//! | everything as received | [`PubSubRecord`], attached as the message's `Native` |
//!
//! A message carrying a [`PubSubRecord`] is published from the record (ordering key and
//! attributes as received) with only the application's changes applied.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use google_cloud_pubsub::model::Message as PubsubMessage;
use tidemill_core::headers::{BINARY_SUFFIX, KEY_HEADER};
use tidemill_core::{Error, Message, Metadata, Native, NativeEntry, Result};

use crate::record::{KeySource, PubSubRecord};
use crate::BROKER;

/// The attribute holding a key that is not UTF-8, base64-encoded.
pub(crate) const KEY_B64_ATTRIBUTE: &str = "tidemill-key.b64";

const _: () = assert!(KEY_B64_ATTRIBUTE.len() == KEY_HEADER.len() + BINARY_SUFFIX.len());

/// A message ready for the Pub/Sub publisher, and its ordering key (if any).
pub(crate) struct Encoded {
    pub message: PubsubMessage,
    pub ordering_key: Option<String>,
}

/// How the publisher encodes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Encoding<'a> {
    /// Publish keys as ordering keys (`message_ordering`).
    pub ordering: bool,
    /// Largest message in bytes (data + attributes + ordering key).
    pub limit: usize,
    /// The attribute carrying the uuid.
    pub uuid_attribute: &'a str,
}

/// Encodes `msg` for `topic`. A message received from Pub/Sub is rebuilt from its
/// [`PubSubRecord`] with the application's changes applied. Fails with `MessageTooLarge`
/// when data + attributes + ordering key exceed the limit.
pub(crate) fn encode(msg: Message, how: &Encoding<'_>, topic: &str) -> Result<Encoded> {
    let native = msg.native().filter(|n| n.broker() == BROKER).cloned();
    let record = native.as_ref().and_then(Native::get::<PubSubRecord>);
    let (attributes, ordering_key) = match (native.as_ref(), record) {
        (Some(native), Some(record)) => from_record(&msg, native, record, how),
        _ => fresh(&msg, how),
    };
    let (uuid, _, payload, _) = msg.into_parts();
    let size = payload.len()
        + attributes
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
        + ordering_key.as_ref().map_or(0, String::len);
    if size > how.limit {
        return Err(Error::MessageTooLarge {
            broker: BROKER,
            topic: topic.to_owned(),
            uuid: uuid.to_string(),
            size,
            limit: how.limit,
        });
    }
    let mut message = PubsubMessage::new()
        .set_data(payload)
        .set_attributes(attributes);
    if let Some(k) = &ordering_key {
        message = message.set_ordering_key(k.clone());
    }
    Ok(Encoded {
        message,
        ordering_key,
    })
}

/// Attributes and ordering key of a message the application made (or whose record was
/// dropped): metadata, the uuid attribute and the key by the configured rules.
fn fresh(msg: &Message, how: &Encoding<'_>) -> (HashMap<String, String>, Option<String>) {
    let metadata = msg.metadata();
    let mut attributes: HashMap<String, String> = HashMap::with_capacity(metadata.len() + 2);
    for (k, v) in metadata.iter() {
        attributes.insert(k.to_owned(), v.to_owned());
    }
    attributes.insert(how.uuid_attribute.to_owned(), msg.uuid().to_owned());
    let ordering_key = encode_key(msg.key(), how.ordering, &mut attributes);
    (attributes, ordering_key)
}

/// Puts `key` where the configuration says: the ordering key (UTF-8 with `ordering`; the
/// base64 form of a binary key), else `tidemill-key` / `tidemill-key.b64`.
fn encode_key(
    key: Option<&Bytes>,
    ordering: bool,
    attributes: &mut HashMap<String, String>,
) -> Option<String> {
    let key = key?;
    match std::str::from_utf8(key) {
        Ok(text) if ordering && !text.is_empty() => Some(text.to_owned()),
        Ok(text) => {
            attributes.insert(KEY_HEADER.to_owned(), text.to_owned());
            None
        }
        Err(_) => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(key);
            attributes.insert(KEY_B64_ATTRIBUTE.to_owned(), b64.clone());
            // The ordering key must be a string: the base64 form keeps per-key order for
            // binary keys too.
            ordering.then_some(b64)
        }
    }
}

/// Attributes and ordering key of a received message published again: as received, with
/// what the application changed (metadata entries, uuid, key) applied.
fn from_record(
    msg: &Message,
    native: &Native,
    record: &PubSubRecord,
    how: &Encoding<'_>,
) -> (HashMap<String, String>, Option<String>) {
    let metadata = msg.metadata();
    let mut attributes: HashMap<String, String> =
        HashMap::with_capacity(record.attributes.len() + 1);
    for (name, value) in &record.attributes {
        if record.consumed(name) {
            // The uuid and key attributes: as received, unless the uuid or key changed
            // (handled below).
            attributes.insert(name.clone(), value.clone());
            continue;
        }
        match native.entry(metadata, name) {
            NativeEntry::Kept => {
                attributes.insert(name.clone(), value.clone());
            }
            NativeEntry::Changed(now) => {
                attributes.insert(name.clone(), now.to_owned());
            }
            NativeEntry::Removed => {}
        }
    }
    for (name, value) in native.added(metadata) {
        attributes.insert(name.to_owned(), value.to_owned());
    }
    // The uuid: wherever it was read from, and in the configured attribute (a message
    // without a uuid attribute gains one: the only difference a plain consumer sees).
    if let Some(name) = &record.uuid_attribute {
        attributes.insert(name.clone(), msg.uuid().to_owned());
    }
    attributes.insert(how.uuid_attribute.to_owned(), msg.uuid().to_owned());
    let mut ordering_key = record.ordering_key().map(str::to_owned);
    if msg.key() != record.key.as_ref() {
        // The application changed the key: drop the old one's representation and write
        // the new one (as ordering key again if that is where the old one was).
        match record.key_source {
            KeySource::OrderingKey => ordering_key = None,
            KeySource::Attribute => {
                attributes.remove(KEY_HEADER);
            }
            KeySource::Base64Attribute => {
                let b64 = attributes.remove(KEY_B64_ATTRIBUTE);
                if b64.is_some() && b64 == ordering_key {
                    ordering_key = None;
                }
            }
            KeySource::None => {}
        }
        let text = msg.key().and_then(|k| std::str::from_utf8(k).ok());
        match text {
            Some(text) if record.key_source == KeySource::OrderingKey && !text.is_empty() => {
                ordering_key = Some(text.to_owned());
            }
            _ => {
                if let Some(k) = encode_key(msg.key(), how.ordering, &mut attributes) {
                    ordering_key = Some(k);
                }
            }
        }
    }
    (attributes, ordering_key)
}

/// Where a received message came from, for [`decode`].
pub(crate) struct Source<'a> {
    /// The topic's full name.
    pub topic: &'a Arc<str>,
    /// The subscription's full name.
    pub subscription: &'a Arc<str>,
    /// The attribute carrying the uuid.
    pub uuid_attribute: &'a str,
    /// Pub/Sub's delivery attempt (only with a dead-letter policy).
    pub delivery_attempt: Option<u32>,
}

/// Decodes a received message: the string view for handlers, and the [`PubSubRecord`] of
/// everything as received.
pub(crate) fn decode(pm: PubsubMessage, from: &Source<'_>) -> Message {
    let PubsubMessage {
        data,
        attributes,
        message_id,
        publish_time,
        ordering_key,
        ..
    } = pm;
    let mut uuid = None;
    let mut key: Option<Bytes> = None;
    let mut key_source = KeySource::None;
    let b64_key = |b64: &String| base64::engine::general_purpose::STANDARD.decode(b64).ok();
    if !ordering_key.is_empty() {
        // Tidemill orders a binary key by its base64 form, which it also writes to
        // `tidemill-key.b64`: the key is then the decoded bytes.
        match attributes
            .get(KEY_B64_ATTRIBUTE)
            .filter(|b64| **b64 == ordering_key)
            .and_then(b64_key)
        {
            Some(bytes) => {
                key = Some(Bytes::from(bytes));
                key_source = KeySource::Base64Attribute;
            }
            None => {
                key = Some(Bytes::from(ordering_key.clone()));
                key_source = KeySource::OrderingKey;
            }
        }
    } else if let Some(text) = attributes.get(KEY_HEADER) {
        key = Some(Bytes::from(text.clone()));
        key_source = KeySource::Attribute;
    } else if let Some(b64) = attributes.get(KEY_B64_ATTRIBUTE) {
        // Not decodable: not ours after all, kept as plain metadata.
        if let Some(bytes) = b64_key(b64) {
            key = Some(Bytes::from(bytes));
            key_source = KeySource::Base64Attribute;
        }
    }
    let mut metadata = Metadata::new();
    let mut uuid_attribute = None;
    for (k, v) in &attributes {
        if k == from.uuid_attribute && !v.is_empty() {
            // Straight into the message's shared id (no String copy first).
            uuid = Some(Arc::<str>::from(v.as_str()));
            uuid_attribute = Some(k.clone());
            continue;
        }
        let is_key = match key_source {
            KeySource::Attribute => k == KEY_HEADER,
            KeySource::Base64Attribute => k == KEY_B64_ATTRIBUTE,
            KeySource::None | KeySource::OrderingKey => false,
        };
        if !is_key {
            metadata.set(k.clone(), v);
        }
    }
    let mut msg = match uuid {
        Some(u) => Message::with_uuid(u, data),
        // The message id: unique within the topic, the same on every redelivery.
        None if !message_id.is_empty() => Message::with_uuid(message_id.as_str(), data),
        None => Message::new(data),
    }
    .with_metadata_map(metadata);
    msg.set_key(key.clone());
    let record = PubSubRecord {
        message_id,
        publish_time: publish_time.and_then(|t| system_time(t.seconds(), t.nanos())),
        ordering_key,
        attributes,
        delivery_attempt: from.delivery_attempt,
        subscription: from.subscription.clone(),
        topic: from.topic.clone(),
        uuid_attribute,
        key,
        key_source,
    };
    let native = Native::new(BROKER, record, msg.metadata());
    msg.with_native(native)
}

fn system_time(seconds: i64, nanos: i32) -> Option<SystemTime> {
    let nanos = u32::try_from(nanos).ok()?;
    if seconds >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds.unsigned_abs(), nanos))
    } else {
        SystemTime::UNIX_EPOCH
            .checked_sub(Duration::from_secs(seconds.unsigned_abs()))?
            .checked_add(Duration::from_nanos(u64::from(nanos)))
    }
}

/// The delivery attempt as Tidemill reports it: Pub/Sub sets `delivery_attempt` (1 for the
/// first delivery) only on subscriptions with a dead-letter policy; 0 or absent means
/// unknown. No attribute is ever read for it: a publisher cannot set it.
pub(crate) fn attempt(delivery_attempt: Option<i32>) -> Option<u32> {
    delivery_attempt
        .filter(|n| *n > 0)
        .and_then(|n| u32::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemill_core::headers::UUID_HEADER;

    const TOPIC: &str = "projects/p/topics/t";
    const SUB: &str = "projects/p/subscriptions/t.g";

    fn how(ordering: bool) -> Encoding<'static> {
        Encoding {
            ordering,
            limit: 10_000_000,
            uuid_attribute: UUID_HEADER,
        }
    }

    fn names() -> &'static (Arc<str>, Arc<str>) {
        static NAMES: std::sync::OnceLock<(Arc<str>, Arc<str>)> = std::sync::OnceLock::new();
        NAMES.get_or_init(|| (Arc::from(TOPIC), Arc::from(SUB)))
    }

    fn source(uuid_attribute: &str) -> Source<'_> {
        let (topic, subscription) = names();
        Source {
            topic,
            subscription,
            uuid_attribute,
            delivery_attempt: None,
        }
    }

    fn received(pm: PubsubMessage) -> Message {
        decode(pm, &source(UUID_HEADER))
    }

    fn round_trip(msg: &Message, ordering: bool) -> (Encoded, Message) {
        let enc = encode(msg.clone(), &how(ordering), TOPIC).unwrap();
        let back = received(enc.message.clone().set_message_id("1"));
        (enc, back)
    }

    #[test]
    fn uuid_metadata_payload_and_key_round_trip() {
        let msg = Message::new(vec![0u8, 0xff, 0x80, b'\n'])
            .with_metadata("greeting", "héllo ✓")
            .with_metadata("n", 1)
            .with_key("customer-1");
        for ordering in [false, true] {
            let (_, back) = round_trip(&msg, ordering);
            assert_eq!(back, msg, "ordering={ordering}");
        }
    }

    #[test]
    fn the_key_becomes_the_ordering_key_only_with_message_ordering() {
        let msg = Message::new("x").with_key("customer-1");
        let (enc, _) = round_trip(&msg, true);
        assert_eq!(enc.message.ordering_key, "customer-1");
        assert_eq!(enc.ordering_key.as_deref(), Some("customer-1"));
        assert!(!enc.message.attributes.contains_key(KEY_HEADER));

        let (enc, _) = round_trip(&msg, false);
        assert_eq!(enc.message.ordering_key, "");
        assert_eq!(enc.ordering_key, None);
        assert_eq!(
            enc.message.attributes.get(KEY_HEADER).map(String::as_str),
            Some("customer-1")
        );

        // No key: no ordering key and no key attribute.
        let (enc, back) = round_trip(&Message::new("x"), true);
        assert_eq!(enc.message.ordering_key, "");
        assert_eq!(back.key(), None);
    }

    #[test]
    fn binary_and_empty_keys_survive() {
        let binary = Message::new("x").with_key([0xffu8, 0x00, 0x80]);
        for ordering in [false, true] {
            let (enc, back) = round_trip(&binary, ordering);
            let expected_ordering_key = if ordering { "/wCA" } else { "" };
            assert_eq!(enc.message.ordering_key, expected_ordering_key);
            assert_eq!(
                enc.message
                    .attributes
                    .get(KEY_B64_ATTRIBUTE)
                    .map(String::as_str),
                Some("/wCA")
            );
            assert_eq!(
                back.key().map(|k| k.as_ref()),
                Some(&[0xffu8, 0x00, 0x80][..])
            );
        }
        let empty = Message::new("x").with_key("");
        let (_, back) = round_trip(&empty, true);
        assert_eq!(back.key().map(|k| k.as_ref()), Some(&b""[..]));
    }

    #[test]
    fn a_foreign_ordering_key_is_the_key_and_a_key_attribute_stays_metadata() {
        let pm = PubsubMessage::new()
            .set_data("from another client")
            .set_message_id("42")
            .set_ordering_key("acct-7")
            .set_attributes([("source", "legacy"), (KEY_HEADER, "other")]);
        let msg = received(pm);
        assert_eq!(msg.key_str(), Some("acct-7"));
        assert_eq!(msg.metadata().get("source"), Some("legacy"));
        assert_eq!(msg.metadata().get(KEY_HEADER), Some("other"));
        assert_eq!(msg.metadata().len(), 2);
        let record = PubSubRecord::of(&msg).expect("a record");
        assert_eq!(record.ordering_key(), Some("acct-7"));
        assert_eq!(record.message_id(), "42");
        assert_eq!(record.attributes().len(), 2);
    }

    #[test]
    fn messages_without_a_uuid_attribute_take_the_message_id() {
        let pm = PubsubMessage::new().set_data("x").set_message_id("1234");
        let a = received(pm.clone());
        let b = received(pm.clone());
        assert_eq!(a.uuid(), "1234");
        assert_eq!(a.uuid(), b.uuid());
        // An empty uuid attribute is no uuid (and stays metadata).
        let c = received(pm.set_attributes([(UUID_HEADER, "")]));
        assert_eq!(c.uuid(), "1234");
        assert_eq!(c.metadata().get(UUID_HEADER), Some(""));
    }

    #[test]
    fn the_uuid_attribute_is_configurable() {
        let pm = PubsubMessage::new()
            .set_data("x")
            .set_message_id("9")
            .set_attributes([("_watermill_message_uuid", "wm-1"), (UUID_HEADER, "tm-1")]);
        let msg = decode(pm, &source("_watermill_message_uuid"));
        assert_eq!(msg.uuid(), "wm-1");
        // Tidemill's own attribute is plain metadata here.
        assert_eq!(msg.metadata().get(UUID_HEADER), Some("tm-1"));
        assert!(msg.metadata().get("_watermill_message_uuid").is_none());

        let out = Message::with_uuid("u-2", "y");
        let how = Encoding {
            uuid_attribute: "_watermill_message_uuid",
            ..how(false)
        };
        let enc = encode(out, &how, TOPIC).unwrap();
        assert_eq!(
            enc.message
                .attributes
                .get("_watermill_message_uuid")
                .map(String::as_str),
            Some("u-2")
        );
        assert!(!enc.message.attributes.contains_key(UUID_HEADER));
    }

    #[test]
    fn a_received_message_republished_unchanged_is_identical() {
        let attrs = [
            ("a", "1"),
            (KEY_HEADER, "attr-key"),
            ("", "empty name"),
            ("tidemill-key.b64", "%%%"),
        ];
        let pm = PubsubMessage::new()
            .set_data("payload")
            .set_message_id("77")
            .set_ordering_key("ok-1")
            .set_attributes(attrs);
        let msg = received(pm.clone());
        for ordering in [false, true] {
            let enc = encode(msg.clone(), &how(ordering), TOPIC).unwrap();
            assert_eq!(enc.message.ordering_key, "ok-1");
            assert_eq!(enc.ordering_key.as_deref(), Some("ok-1"));
            assert_eq!(enc.message.data, pm.data);
            let mut expected = pm.attributes.clone();
            expected.insert(UUID_HEADER.to_owned(), "77".to_owned());
            assert_eq!(enc.message.attributes, expected);
        }
    }

    #[test]
    fn only_the_applications_changes_are_applied() {
        let pm = PubsubMessage::new()
            .set_data("payload")
            .set_message_id("78")
            .set_attributes([
                ("keep", "k"),
                ("change", "old"),
                ("drop", "d"),
                (UUID_HEADER, "u-1"),
                (KEY_HEADER, "key-1"),
            ]);
        let mut msg = received(pm);
        assert_eq!(msg.uuid(), "u-1");
        assert_eq!(msg.key_str(), Some("key-1"));
        msg.metadata_mut().set("change", "new");
        msg.metadata_mut().remove("drop");
        msg.metadata_mut().set("added", "a");
        let enc = encode(msg.clone(), &how(false), TOPIC).unwrap();
        let attrs = &enc.message.attributes;
        assert_eq!(attrs.get("keep").map(String::as_str), Some("k"));
        assert_eq!(attrs.get("change").map(String::as_str), Some("new"));
        assert_eq!(attrs.get("added").map(String::as_str), Some("a"));
        assert!(!attrs.contains_key("drop"));
        assert_eq!(attrs.get(UUID_HEADER).map(String::as_str), Some("u-1"));
        assert_eq!(attrs.get(KEY_HEADER).map(String::as_str), Some("key-1"));
        assert_eq!(attrs.len(), 5);

        // A new key replaces the old one's attribute; with message ordering it becomes the
        // ordering key.
        msg.set_key(Some(Bytes::from_static(b"key-2")));
        let enc = encode(msg.clone(), &how(true), TOPIC).unwrap();
        assert_eq!(enc.message.ordering_key, "key-2");
        assert!(!enc.message.attributes.contains_key(KEY_HEADER));
        // Removing the key removes it.
        msg.set_key(None);
        let enc = encode(msg, &how(false), TOPIC).unwrap();
        assert_eq!(enc.message.ordering_key, "");
        assert!(!enc.message.attributes.contains_key(KEY_HEADER));
    }

    #[test]
    fn a_changed_ordering_key_stays_an_ordering_key() {
        let pm = PubsubMessage::new()
            .set_data("x")
            .set_message_id("79")
            .set_ordering_key("old");
        let mut msg = received(pm);
        msg.set_key(Some(Bytes::from_static(b"new")));
        let enc = encode(msg, &how(false), TOPIC).unwrap();
        assert_eq!(enc.message.ordering_key, "new");
        assert_eq!(enc.ordering_key.as_deref(), Some("new"));
        assert!(!enc.message.attributes.contains_key(KEY_HEADER));
    }

    #[test]
    fn the_record_holds_what_was_delivered() {
        let pm = PubsubMessage::new()
            .set_data("x")
            .set_message_id("80")
            .set_publish_time(google_cloud_wkt::Timestamp::clamp(1_700_000_000, 5))
            .set_attributes([("a", "b")]);
        let msg = decode(
            pm,
            &Source {
                delivery_attempt: Some(3),
                ..source(UUID_HEADER)
            },
        );
        let record = PubSubRecord::of(&msg).expect("a record");
        assert_eq!(record.message_id(), "80");
        assert_eq!(
            record.publish_time(),
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5))
        );
        assert_eq!(record.ordering_key(), None);
        assert_eq!(record.delivery_attempt(), Some(3));
        assert_eq!(record.subscription(), SUB);
        assert_eq!(record.topic(), TOPIC);
        assert_eq!(record.attributes().get("a").map(String::as_str), Some("b"));
    }

    #[test]
    fn a_malformed_base64_key_is_kept_as_metadata() {
        let pm = PubsubMessage::new()
            .set_data("x")
            .set_message_id("1")
            .set_attributes([(KEY_B64_ATTRIBUTE, "not base64!")]);
        let msg = received(pm);
        assert_eq!(msg.key(), None);
        assert_eq!(msg.metadata().get(KEY_B64_ATTRIBUTE), Some("not base64!"));
    }

    #[test]
    fn oversized_messages_are_refused_naming_the_limit() {
        let msg = Message::new(vec![0u8; 1000]).with_metadata("k", "v");
        let small = Encoding {
            limit: 1000,
            ..how(false)
        };
        let err = match encode(msg.clone(), &small, TOPIC) {
            Err(e) => e,
            Ok(_) => panic!("a message over the limit was encoded"),
        };
        match &err {
            Error::MessageTooLarge {
                size, limit, uuid, ..
            } => {
                assert_eq!(*limit, 1000);
                assert!(*size > 1000);
                assert_eq!(uuid, msg.uuid());
            }
            other => panic!("unexpected error {other}"),
        }
        assert!(err.to_string().contains("1000 bytes"), "{err}");
        assert!(err.to_string().contains(TOPIC), "{err}");
        let larger = Encoding {
            limit: 2000,
            ..how(false)
        };
        assert!(encode(msg, &larger, TOPIC).is_ok());
    }

    #[test]
    fn delivery_attempt_mapping() {
        // Subscriptions without a dead-letter policy: Pub/Sub sends 0 / nothing.
        assert_eq!(attempt(None), None);
        assert_eq!(attempt(Some(0)), None);
        // With a dead-letter policy: 1 for the first delivery, counting up.
        assert_eq!(attempt(Some(1)), Some(1));
        assert_eq!(attempt(Some(5)), Some(5));
        assert_eq!(attempt(Some(-3)), None);
    }
}
