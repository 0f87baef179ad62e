//! Mapping between Tidemill messages and Pub/Sub messages.
//!
//! | Tidemill | Pub/Sub |
//! |---|---|
//! | payload | `data` (bytes, unchanged) |
//! | metadata | attributes (string → string, unchanged) |
//! | uuid | attribute `tidemill-uuid`; for messages without it, a stable uuid derived from topic + message id |
//! | key (UTF-8, `message_ordering` on) | `ordering_key` |
//! | key (otherwise) | attribute `tidemill-key`, or `tidemill-key.b64` (base64) when not UTF-8 |
//! | delivery attempt | `delivery_attempt` (only with a dead-letter policy) |

use std::collections::HashMap;

use base64::Engine;
use bytes::Bytes;
use google_cloud_pubsub::model::Message as PubsubMessage;
use tidemill_core::headers::{stable_uuid, BINARY_SUFFIX, KEY_HEADER, UUID_HEADER};
use tidemill_core::{Error, Message, Metadata, Result};

use crate::BROKER;

/// The attribute holding a key that is not UTF-8, base64-encoded.
pub(crate) const KEY_B64_ATTRIBUTE: &str = "tidemill-key.b64";

const _: () = assert!(KEY_B64_ATTRIBUTE.len() == KEY_HEADER.len() + BINARY_SUFFIX.len());

/// A message ready for the Pub/Sub publisher, and its ordering key (if any).
pub(crate) struct Encoded {
    pub message: PubsubMessage,
    pub ordering_key: Option<String>,
}

/// Encodes `msg` for `topic`, with the key as ordering key when `ordering` is on. Fails with
/// `MessageTooLarge` when data + attributes + ordering key exceed `limit` bytes.
pub(crate) fn encode(msg: Message, ordering: bool, limit: usize, topic: &str) -> Result<Encoded> {
    let (uuid, metadata, payload, key) = msg.into_parts();
    let mut attributes: HashMap<String, String> = HashMap::with_capacity(metadata.len() + 2);
    let mut size = payload.len();
    for (k, v) in metadata.iter() {
        size += k.len() + v.len();
        attributes.insert(k.to_owned(), v.to_owned());
    }
    size += UUID_HEADER.len() + uuid.len();
    attributes.insert(UUID_HEADER.to_owned(), uuid.to_string());
    let mut ordering_key = None;
    if let Some(key) = key {
        match std::str::from_utf8(&key) {
            Ok(text) if ordering && !text.is_empty() => {
                size += text.len();
                ordering_key = Some(text.to_owned());
            }
            Ok(text) => {
                size += KEY_HEADER.len() + text.len();
                attributes.insert(KEY_HEADER.to_owned(), text.to_owned());
            }
            Err(_) => {
                let b64 = base64::engine::general_purpose::STANDARD.encode(&key);
                size += KEY_B64_ATTRIBUTE.len() + b64.len();
                if ordering {
                    // The ordering key must be a string: the base64 form keeps per-key
                    // order for binary keys too.
                    size += b64.len();
                    ordering_key = Some(b64.clone());
                }
                attributes.insert(KEY_B64_ATTRIBUTE.to_owned(), b64);
            }
        }
    }
    if size > limit {
        return Err(Error::MessageTooLarge {
            broker: BROKER,
            topic: topic.to_owned(),
            uuid: uuid.to_string(),
            size,
            limit,
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

/// Decodes a received message of `topic` (its full name).
pub(crate) fn decode(pm: PubsubMessage, topic: &str) -> Message {
    let PubsubMessage {
        data,
        attributes,
        message_id,
        ordering_key,
        ..
    } = pm;
    let mut uuid = None;
    let mut key: Option<Bytes> = None;
    let mut key_b64: Option<String> = None;
    let mut metadata = Metadata::new();
    for (k, v) in attributes {
        match k.as_str() {
            UUID_HEADER if !v.is_empty() => uuid = Some(v),
            KEY_HEADER => key = Some(Bytes::from(v)),
            KEY_B64_ATTRIBUTE => key_b64 = Some(v),
            _ => metadata.set(k, v),
        }
    }
    if let Some(b64) = key_b64 {
        match base64::engine::general_purpose::STANDARD.decode(&b64) {
            Ok(bytes) => key = Some(Bytes::from(bytes)),
            // Not ours after all: keep it as plain metadata rather than lose it.
            Err(_) => metadata.set(KEY_B64_ATTRIBUTE, b64),
        }
    }
    if key.is_none() && !ordering_key.is_empty() {
        key = Some(Bytes::from(ordering_key));
    }
    let uuid = match uuid {
        Some(u) => u.into(),
        None => stable_uuid(&[BROKER.as_bytes(), topic.as_bytes(), message_id.as_bytes()]),
    };
    let mut msg = Message::with_uuid(uuid, data).with_metadata_map(metadata);
    msg.set_key(key);
    msg
}

/// The delivery attempt as Tidemill reports it: Pub/Sub sets `delivery_attempt` (1 for the
/// first delivery) only on subscriptions with a dead-letter policy; 0 or absent means
/// unknown.
pub(crate) fn attempt(delivery_attempt: Option<i32>) -> Option<u32> {
    delivery_attempt
        .filter(|n| *n > 0)
        .and_then(|n| u32::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &str = "projects/p/topics/t";

    fn round_trip(msg: &Message, ordering: bool) -> (Encoded, Message) {
        let enc = encode(msg.clone(), ordering, 10_000_000, TOPIC).unwrap();
        let back = decode(enc.message.clone(), TOPIC);
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
            assert_eq!(
                back.key().map(|k| k.as_ref()),
                Some(&[0xffu8, 0x00, 0x80][..])
            );
            assert_eq!(
                enc.message
                    .attributes
                    .get(KEY_B64_ATTRIBUTE)
                    .map(String::as_str),
                Some("/wCA")
            );
            // Ordered: the base64 form orders binary keys.
            let expected_ordering_key = if ordering { "/wCA" } else { "" };
            assert_eq!(enc.message.ordering_key, expected_ordering_key);
        }
        let empty = Message::new("x").with_key("");
        let (_, back) = round_trip(&empty, true);
        assert_eq!(back.key().map(|k| k.as_ref()), Some(&b""[..]));
    }

    #[test]
    fn a_foreign_ordering_key_is_the_key() {
        let pm = PubsubMessage::new()
            .set_data("from another client")
            .set_message_id("42")
            .set_ordering_key("acct-7")
            .set_attributes([("source", "legacy")]);
        let msg = decode(pm, TOPIC);
        assert_eq!(msg.key_str(), Some("acct-7"));
        assert_eq!(msg.metadata().get("source"), Some("legacy"));
        assert_eq!(msg.metadata().len(), 1);
    }

    #[test]
    fn foreign_messages_get_a_stable_uuid() {
        let pm = PubsubMessage::new().set_data("x").set_message_id("1234");
        let a = decode(pm.clone(), TOPIC);
        let b = decode(pm.clone(), TOPIC);
        assert_eq!(a.uuid(), b.uuid());
        assert_eq!(a.uuid().len(), 36);
        let other = decode(pm.set_message_id("1235"), TOPIC);
        assert_ne!(a.uuid(), other.uuid());
        let elsewhere = decode(
            PubsubMessage::new().set_data("x").set_message_id("1234"),
            "projects/p/topics/other",
        );
        assert_ne!(a.uuid(), elsewhere.uuid());
    }

    #[test]
    fn a_malformed_base64_key_is_kept_as_metadata() {
        let pm = PubsubMessage::new()
            .set_data("x")
            .set_message_id("1")
            .set_attributes([(KEY_B64_ATTRIBUTE, "not base64!")]);
        let msg = decode(pm, TOPIC);
        assert_eq!(msg.key(), None);
        assert_eq!(msg.metadata().get(KEY_B64_ATTRIBUTE), Some("not base64!"));
    }

    #[test]
    fn oversized_messages_are_refused_naming_the_limit() {
        let msg = Message::new(vec![0u8; 1000]).with_metadata("k", "v");
        let err = match encode(msg.clone(), false, 1000, TOPIC) {
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
        assert!(encode(msg, false, 2000, TOPIC).is_ok());
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
