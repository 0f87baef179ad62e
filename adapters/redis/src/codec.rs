//! Messages as stream entries and back.
//!
//! An entry Tidemill writes holds `tidemill-uuid`, `tidemill-key` (when the message has a
//! key), one field per metadata entry and the payload field. An entry any other client
//! wrote is read the same way: the payload field (when there is one) is the payload, every
//! other field is metadata (values that are not UTF-8 base64-encoded under `name.b64`), and
//! a message without a uuid field gets one derived from its stream and entry id.

use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use tidemill_core::headers::{
    insert_header_bytes, stable_uuid, BINARY_SUFFIX, KEY_HEADER, UUID_HEADER,
};
use tidemill_core::{Error, Message, Metadata, Native, NativeEntry, Result};

use crate::record::RedisRecord;
use crate::BROKER;

/// Watermill's uuid field (watermill-redisstream): read as the uuid when there is no
/// `tidemill-uuid`.
pub(crate) const WATERMILL_UUID_FIELD: &str = "_watermill_message_uuid";

/// A stream entry's field-value pairs, in order.
pub(crate) type Fields = Vec<(Bytes, Bytes)>;

/// The fields of `message`, or an error naming what is wrong with it.
#[cfg(test)]
pub(crate) fn encode(
    message: &Message,
    topic: &str,
    payload_field: &str,
    max_bytes: usize,
) -> Result<Fields> {
    let mut fields = Vec::with_capacity(message.metadata().len() + 3);
    write(message, topic, payload_field, max_bytes, |k, v| {
        fields.push((Bytes::copy_from_slice(k), Bytes::copy_from_slice(v)))
    })?;
    Ok(fields)
}

/// Passes the fields of `message` to `push`, in order, or fails (before passing any) naming
/// what is wrong with it: a reserved metadata key, or a message over `max_bytes`.
pub(crate) fn write(
    message: &Message,
    topic: &str,
    payload_field: &str,
    max_bytes: usize,
    mut push: impl FnMut(&[u8], &[u8]),
) -> Result<()> {
    let too_large = |size: usize| {
        Err(Error::MessageTooLarge {
            broker: BROKER,
            topic: topic.to_owned(),
            uuid: message.uuid().to_owned(),
            size,
            limit: max_bytes,
        })
    };
    if let Some(record) = Native::of::<RedisRecord>(message, BROKER) {
        let fields = encode_native(message, payload_field, record);
        let size: usize = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > max_bytes {
            return too_large(size);
        }
        for (k, v) in &fields {
            push(k, v);
        }
        return Ok(());
    }
    let metadata = message.metadata();
    let mut size = UUID_HEADER.len() + message.uuid().len();
    size += message.key().map_or(0, |k| KEY_HEADER.len() + k.len());
    size += payload_field.len() + message.payload().len();
    for (k, v) in metadata.iter() {
        if k == payload_field || k == UUID_HEADER || k == KEY_HEADER {
            return Err(Error::permanent(
                BROKER,
                topic,
                format!("publish message {}", message.uuid()),
                format!(
                    "metadata key `{k}` is reserved: it names the payload, uuid or key field \
                     of the stream entry"
                ),
            ));
        }
        size += k.len() + v.len();
    }
    if size > max_bytes {
        return too_large(size);
    }
    push(UUID_HEADER.as_bytes(), message.uuid().as_bytes());
    if let Some(key) = message.key() {
        push(KEY_HEADER.as_bytes(), key);
    }
    for (k, v) in metadata.iter() {
        push(k.as_bytes(), v.as_bytes());
    }
    push(payload_field.as_bytes(), message.payload());
    Ok(())
}

fn text(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// A received message published again: the received fields, with what the application
/// changed applied, so a hop that changes nothing writes the entry the producer wrote
/// (plus `tidemill-uuid` when it had none, so the uuid travels on).
fn encode_native(message: &Message, payload_field: &str, record: &RedisRecord) -> Fields {
    let metadata = message.metadata();
    let native = message.native().expect("a record comes with its native");
    let mut out: Fields = Vec::with_capacity(record.fields.len() + 2);
    let (mut has_payload, mut has_uuid, mut has_key) = (false, false, false);
    let mut changed_done: Vec<String> = Vec::new();
    for (i, (name, value)) in record.fields.iter().enumerate() {
        match record.roles[i] {
            Role::Payload => {
                has_payload = true;
                out.push((name.clone(), message.payload().clone()));
            }
            Role::Uuid => {
                has_uuid = true;
                if record.uuid.as_ref() == message.uuid() {
                    out.push((name.clone(), value.clone()));
                } else {
                    out.push((name.clone(), text(message.uuid())));
                }
            }
            Role::Key => {
                has_key = true;
                match message.key() {
                    Some(key) if *key == *value => out.push((name.clone(), value.clone())),
                    Some(key) => out.push((name.clone(), key.clone())),
                    None => {}
                }
            }
            Role::Opaque => out.push((name.clone(), value.clone())),
            Role::View => {
                let view_key = view_key(name, value);
                match native.entry(metadata, &view_key) {
                    NativeEntry::Kept => out.push((name.clone(), value.clone())),
                    NativeEntry::Removed => {}
                    NativeEntry::Changed(new) => {
                        // A repeated name shows once in the view: write the new value once.
                        if changed_done.contains(&view_key) {
                            continue;
                        }
                        let bytes = match view_key.strip_suffix(BINARY_SUFFIX) {
                            Some(_) if !value_is_text(value) => decode_b64(new).map(Bytes::from),
                            _ => None,
                        };
                        out.push((name.clone(), bytes.unwrap_or_else(|| text(new))));
                        changed_done.push(view_key);
                    }
                }
            }
        }
    }
    if !has_uuid {
        out.insert(
            0,
            (
                Bytes::from_static(UUID_HEADER.as_bytes()),
                text(message.uuid()),
            ),
        );
    }
    if !has_key {
        if let Some(key) = message.key() {
            out.insert(1, (Bytes::from_static(KEY_HEADER.as_bytes()), key.clone()));
        }
    }
    for (k, v) in native.added(metadata) {
        out.push((text(k), text(v)));
    }
    if !has_payload && !message.payload().is_empty() {
        out.push((text(payload_field), message.payload().clone()));
    }
    out
}

fn value_is_text(v: &[u8]) -> bool {
    std::str::from_utf8(v).is_ok()
}

/// The metadata key a received field shows as.
fn view_key(name: &[u8], value: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    if value_is_text(value) {
        name.into_owned()
    } else {
        format!("{name}{BINARY_SUFFIX}")
    }
}

/// What a received field became.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// The payload.
    Payload,
    /// The uuid.
    Uuid,
    /// The key.
    Key,
    /// A metadata entry of the string view.
    View,
    /// Kept in the record only (a repeated payload, uuid or key field).
    Opaque,
}

/// The message in entry `id` of `stream`.
pub(crate) fn decode(stream: &str, id: &str, fields: Fields, payload_field: &str) -> Message {
    let mut metadata = Metadata::new();
    let mut roles = Vec::with_capacity(fields.len());
    let mut payload = None;
    let mut uuid: Option<(usize, Arc<str>)> = None;
    let mut watermill: Option<(usize, Arc<str>)> = None;
    let mut key = None;
    for (i, (name, value)) in fields.iter().enumerate() {
        let name_text = std::str::from_utf8(name).ok();
        let role = match name_text {
            Some(n) if n == payload_field && payload.is_none() => {
                payload = Some(value.clone());
                Role::Payload
            }
            Some(UUID_HEADER) if uuid.is_none() => match std::str::from_utf8(value) {
                Ok(v) if !v.is_empty() => {
                    uuid = Some((i, Arc::from(v)));
                    Role::Uuid
                }
                _ => Role::Opaque,
            },
            Some(KEY_HEADER) if key.is_none() => {
                key = Some(value.clone());
                Role::Key
            }
            Some(n) if n == payload_field || n == UUID_HEADER || n == KEY_HEADER => Role::Opaque,
            Some(WATERMILL_UUID_FIELD) if watermill.is_none() => {
                if let Ok(v) = std::str::from_utf8(value) {
                    if !v.is_empty() {
                        watermill = Some((i, Arc::from(v)));
                    }
                }
                Role::View
            }
            _ => Role::View,
        };
        if role == Role::View {
            let name = String::from_utf8_lossy(name);
            insert_header_bytes(&mut metadata, &name, value);
        }
        roles.push(role);
    }
    let uuid: Arc<str> = match (uuid, watermill) {
        (Some((_, u)), _) => u,
        (None, Some((i, u))) => {
            // Watermill's uuid field is the uuid, not metadata.
            metadata.remove(WATERMILL_UUID_FIELD);
            roles[i] = Role::Uuid;
            u
        }
        (None, None) => stable_uuid(&[BROKER.as_bytes(), stream.as_bytes(), id.as_bytes()]),
    };
    if metadata.is_empty() {
        metadata = Metadata::new();
    }
    let record = RedisRecord {
        stream: stream.to_owned(),
        id: id.to_owned(),
        fields,
        roles,
        uuid: uuid.clone(),
    };
    let native = Native::new(BROKER, record, &metadata);
    let mut message = Message::with_uuid(uuid, payload.unwrap_or_default())
        .with_metadata_map(metadata)
        .with_native(native);
    message.set_key(key);
    message
}

fn decode_b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(pairs: &[(&[u8], &[u8])]) -> Fields {
        pairs
            .iter()
            .map(|(k, v)| (Bytes::copy_from_slice(k), Bytes::copy_from_slice(v)))
            .collect()
    }

    fn round_trip(m: &Message) -> Message {
        let fields = encode(m, "t", "payload", 1 << 20).unwrap();
        decode("t", "1-0", fields, "payload")
    }

    #[test]
    fn uuid_key_metadata_and_payload_round_trip() {
        let m = Message::new(&b"\x00\xffbytes"[..])
            .with_key(b"k\x00ey")
            .with_metadata("trace", "abc")
            .with_metadata("empty", "");
        let got = round_trip(&m);
        assert_eq!(got.uuid(), m.uuid());
        assert_eq!(got.payload(), m.payload());
        assert_eq!(got.key(), m.key());
        assert_eq!(got.metadata(), m.metadata());
    }

    #[test]
    fn reserved_metadata_is_refused() {
        for k in ["payload", UUID_HEADER, KEY_HEADER] {
            let m = Message::new("x").with_metadata(k, "v");
            let e = encode(&m, "orders", "payload", 1 << 20).unwrap_err();
            assert!(
                e.to_string().contains(k) && e.to_string().contains("orders"),
                "{e}"
            );
        }
    }

    #[test]
    fn oversized_messages_name_the_limit() {
        let m = Message::new(vec![0u8; 2000]);
        let e = encode(&m, "big", "payload", 1000).unwrap_err();
        assert!(
            matches!(e, Error::MessageTooLarge { limit: 1000, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("big"));
    }

    #[test]
    fn foreign_entries_get_stable_uuids_and_keep_their_fields() {
        let fields = f(&[
            (b"name", b"alice"),
            (b"bin", b"\xff\x00"),
            (b"\xffodd", b"v"),
            (b"name", b"bob"),
        ]);
        let a = decode("s", "5-1", fields.clone(), "payload");
        let b = decode("s", "5-1", fields.clone(), "payload");
        let c = decode("s", "5-2", fields.clone(), "payload");
        assert_eq!(a.uuid(), b.uuid());
        assert_ne!(a.uuid(), c.uuid());
        assert!(a.payload().is_empty());
        assert_eq!(
            a.metadata().get("name"),
            Some("bob"),
            "the last value shows"
        );
        assert_eq!(a.metadata().get("bin.b64"), Some("/wA="));
        assert_eq!(a.metadata().get("\u{fffd}odd"), Some("v"));
        let record = RedisRecord::of(&a).unwrap();
        assert_eq!(record.fields(), &fields[..]);
        assert_eq!(record.id(), "5-1");
    }

    #[test]
    fn an_unchanged_hop_writes_the_received_fields() {
        let fields = f(&[
            (b"payload", b"p"),
            (b"name", b"a"),
            (b"name", b"b"),
            (b"bin", b"\xff"),
        ]);
        let m = decode("s", "1-1", fields.clone(), "payload");
        let out = encode(&m, "next", "payload", 1 << 20).unwrap();
        let mut expected = f(&[(UUID_HEADER.as_bytes(), m.uuid().as_bytes())]);
        expected.extend(fields);
        assert_eq!(out, expected);
        // And the uuid travels on.
        assert_eq!(decode("next", "9-9", out, "payload").uuid(), m.uuid());
    }

    #[test]
    fn a_hop_applies_only_what_the_handler_changed() {
        let fields = f(&[
            (b"a", b"1"),
            (b"bin", b"\xff"),
            (b"gone", b"x"),
            (b"payload", b"p"),
        ]);
        let mut m = decode("s", "1-1", fields, "payload");
        m.metadata_mut().set("a", "2");
        m.metadata_mut().remove("gone");
        m.metadata_mut().set("bin.b64", "/w==");
        m.metadata_mut().set("new", "n");
        m.set_payload("q");
        let out = encode(&m, "next", "payload", 1 << 20).unwrap();
        assert_eq!(
            out,
            f(&[
                (UUID_HEADER.as_bytes(), m.uuid().as_bytes()),
                (b"a", b"2"),
                (b"bin", b"\xff"),
                (b"payload", b"q"),
                (b"new", b"n"),
            ])
        );
    }

    #[test]
    fn watermill_uuid_field_is_the_uuid() {
        let m = decode(
            "s",
            "1-1",
            f(&[(b"_watermill_message_uuid", b"wm-1"), (b"payload", b"x")]),
            "payload",
        );
        assert_eq!(m.uuid(), "wm-1");
        assert!(m.metadata().is_empty());
        let out = encode(&m, "s", "payload", 1 << 20).unwrap();
        assert_eq!(decode("s", "2-2", out, "payload").uuid(), "wm-1");
    }

    #[test]
    fn base64_decodes() {
        assert_eq!(decode_b64("/wA=").unwrap(), vec![0xff, 0]);
        assert_eq!(decode_b64("YWJj").unwrap(), b"abc");
        assert_eq!(decode_b64("YQ==").unwrap(), b"a");
        assert!(decode_b64("a").is_none());
    }
}
