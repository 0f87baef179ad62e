//! Tidemill messages ↔ Kafka records.
//!
//! - payload ↔ record value (a record without a value, a tombstone, arrives as an empty
//!   payload);
//! - key ↔ record key (so the partitioner keeps every key on one partition);
//! - uuid ↔ header [`UUID_HEADER`]; metadata ↔ the other headers, values as UTF-8 bytes.
//!
//! A record from another client has no uuid header: its uuid is derived from topic,
//! partition and offset with [`stable_uuid`], so every consumer sees the same uuid for it.
//! Header values that are not UTF-8 are kept base64-encoded under `key.b64`
//! ([`insert_header_bytes`]); a header without a value becomes an empty string; of repeated
//! header keys the last one wins.

use bytes::Bytes;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use tidemill_core::headers::{insert_header_bytes, stable_uuid, UUID_HEADER};
use tidemill_core::{Message, Metadata};

/// Headers for a message: the uuid, then every metadata entry.
pub(crate) fn headers(uuid: &str, metadata: &Metadata) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(metadata.len() + 1).insert(Header {
        key: UUID_HEADER,
        value: Some(uuid),
    });
    for (k, v) in metadata.iter() {
        h = h.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    h
}

/// The size a message takes against `message.max.bytes`, without librdkafka's fixed
/// per-record overhead: value, key, and header keys and values.
pub(crate) fn encoded_size(
    uuid: &str,
    metadata: &Metadata,
    payload: &[u8],
    key: Option<&[u8]>,
) -> usize {
    payload.len()
        + key.map_or(0, <[u8]>::len)
        + UUID_HEADER.len()
        + uuid.len()
        + metadata
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// A received record as a Tidemill message.
pub(crate) fn message<H: Headers>(
    topic: &str,
    partition: i32,
    offset: i64,
    payload: Option<&[u8]>,
    key: Option<&[u8]>,
    headers: Option<&H>,
) -> Message {
    let mut uuid = None;
    let mut metadata = Metadata::new();
    if let Some(headers) = headers {
        for h in headers.iter() {
            let value = h.value.unwrap_or(&[]);
            if h.key == UUID_HEADER && uuid.is_none() {
                if let Ok(text) = std::str::from_utf8(value) {
                    if !text.is_empty() {
                        uuid = Some(text);
                        continue;
                    }
                }
            }
            insert_header_bytes(&mut metadata, h.key, value);
        }
    }
    let payload = payload.map_or_else(Bytes::new, Bytes::copy_from_slice);
    let msg = match uuid {
        Some(uuid) => Message::with_uuid(uuid, payload),
        None => Message::with_uuid(
            stable_uuid(&[
                b"kafka",
                topic.as_bytes(),
                &partition.to_be_bytes(),
                &offset.to_be_bytes(),
            ]),
            payload,
        ),
    };
    let msg = msg.with_metadata_map(metadata);
    match key {
        Some(k) => msg.with_key(k),
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: &Message) -> Message {
        let h = headers(m.uuid(), m.metadata());
        message(
            "t",
            0,
            7,
            Some(m.payload()),
            m.key().map(|k| &k[..]),
            Some(&h),
        )
    }

    #[test]
    fn uuid_metadata_key_and_payload_survive() {
        let m = Message::new(vec![0u8, 0xff, 1, 2])
            .with_key([0xfe, 0x00])
            .with_metadata("greeting", "héllo ✓")
            .with_metadata("empty", "");
        assert_eq!(roundtrip(&m), m);
        let plain = Message::new("x");
        let back = roundtrip(&plain);
        assert_eq!(back, plain);
        assert!(back.key().is_none());
    }

    #[test]
    fn foreign_records_get_a_stable_uuid_and_keep_binary_headers() {
        let h = OwnedHeaders::new()
            .insert(Header {
                key: "trace",
                value: Some(&[0xffu8, 0x00][..]),
            })
            .insert(Header::<&[u8]> {
                key: "nothing",
                value: None,
            })
            .insert(Header {
                key: "text",
                value: Some("plain"),
            });
        let a = message("orders", 2, 41, Some(b"p"), None, Some(&h));
        let b = message("orders", 2, 41, Some(b"p"), None, Some(&h));
        let c = message("orders", 2, 42, Some(b"p"), None, Some(&h));
        assert_eq!(a.uuid(), b.uuid());
        assert_ne!(a.uuid(), c.uuid());
        assert_eq!(a.metadata().get("trace.b64"), Some("/wA="));
        assert_eq!(a.metadata().get("nothing"), Some(""));
        assert_eq!(a.metadata().get("text"), Some("plain"));
        let none = message::<OwnedHeaders>("orders", 0, 0, None, None, None);
        assert!(none.payload().is_empty());
        assert!(none.metadata().is_empty());
    }

    #[test]
    fn a_binary_uuid_header_is_not_taken_for_a_uuid() {
        let h = OwnedHeaders::new().insert(Header {
            key: UUID_HEADER,
            value: Some(&[0xffu8][..]),
        });
        let m = message("t", 0, 1, Some(b""), None, Some(&h));
        assert_eq!(m.uuid().len(), 36);
        assert_eq!(m.metadata().get("tidemill-uuid.b64"), Some("/w=="));
    }

    #[test]
    fn size_counts_payload_key_and_headers() {
        let m = Message::with_uuid("id", vec![0u8; 10]).with_metadata("ab", "cd");
        let size = encoded_size(m.uuid(), m.metadata(), m.payload(), Some(b"kk"));
        assert_eq!(size, 10 + 2 + UUID_HEADER.len() + 2 + 4);
    }
}
