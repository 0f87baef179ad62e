//! Messages to NATS headers and payloads, and back.
//!
//! - Metadata entries become headers. NATS header values cannot hold CR or LF, and the
//!   client trims whitespace around them; header names must be printable ASCII without `:`.
//!   A value (or name) that would not survive unchanged travels as an RFC 2047 style encoded
//!   word, `=?utf-8?b?BASE64?=`, and is decoded on receipt; so does a value that itself looks
//!   like an encoded word, so every string round-trips exactly.
//! - The uuid travels in `Nats-Msg-Id` (JetStream's message id, which the stream uses to
//!   drop duplicates) as `{uuid}.{hash}`, `hash` being 16 hex digits of a hash of the uuid,
//!   metadata, key and payload: a retried publish of the same message is dropped by the
//!   stream, while a deliberate republish of the uuid with other content (a dead-letter
//!   layer's copy with a failure count, say) is stored. On receipt the suffix is checked
//!   against the content and removed. When the metadata sets its own `Nats-Msg-Id`, that one
//!   is sent and the uuid goes in `tidemill-uuid`.
//! - The key travels in `tidemill-key` (`tidemill-key.b64`, base64, when it is not UTF-8).
//! - Received messages without either uuid header get a stable uuid derived from their
//!   stream and sequence (JetStream) or from their subject, headers and payload (core NATS).

use std::borrow::Cow;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use tidemill_core::headers::{stable_uuid, KEY_HEADER, UUID_HEADER};
use tidemill_core::{Error, Message, Metadata, Result};

use crate::BROKER;

/// JetStream's message id header.
pub(crate) const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// The key header when the key is not UTF-8.
pub(crate) const KEY_B64_HEADER: &str = "tidemill-key.b64";

const WORD_PREFIX: &str = "=?utf-8?b?";
const WORD_SUFFIX: &str = "?=";
/// `NATS/1.0\r\n` before the headers and `\r\n` after them.
const HEADER_FRAME: usize = 12;

/// Names the adapter writes itself: metadata under these names is sent encoded.
const RESERVED: [&str; 3] = [UUID_HEADER, KEY_HEADER, KEY_B64_HEADER];

fn is_word(s: &str) -> bool {
    s.len() >= WORD_PREFIX.len() + WORD_SUFFIX.len()
        && s.starts_with(WORD_PREFIX)
        && s.ends_with(WORD_SUFFIX)
}

fn encode_word(s: &str) -> String {
    let mut out = String::with_capacity(WORD_PREFIX.len() + s.len() * 4 / 3 + 6);
    out.push_str(WORD_PREFIX);
    STANDARD.encode_string(s, &mut out);
    out.push_str(WORD_SUFFIX);
    out
}

fn decode_word(s: &str) -> Option<String> {
    if !is_word(s) {
        return None;
    }
    let inner = &s[WORD_PREFIX.len()..s.len() - WORD_SUFFIX.len()];
    let bytes = STANDARD.decode(inner).ok()?;
    String::from_utf8(bytes).ok()
}

/// A header value that arrives exactly as sent.
fn value_is_plain(v: &str) -> bool {
    !(v.chars().any(|c| c.is_control() && c != '\t')
        || v.starts_with(char::is_whitespace)
        || v.ends_with(char::is_whitespace)
        || is_word(v))
}

/// A header name that arrives exactly as sent and is not the adapter's own.
fn name_is_plain(k: &str) -> bool {
    !k.is_empty()
        && k.chars().all(|c| c.is_ascii_graphic() && c != ':')
        && !is_word(k)
        && !RESERVED.contains(&k)
}

fn encode_value(v: &str) -> Cow<'_, str> {
    if value_is_plain(v) {
        Cow::Borrowed(v)
    } else {
        Cow::Owned(encode_word(v))
    }
}

fn decode_value(v: &str) -> Cow<'_, str> {
    match decode_word(v) {
        Some(decoded) => Cow::Owned(decoded),
        None => Cow::Borrowed(v),
    }
}

/// The `Nats-Msg-Id` of a message: `{uuid}.{hash}` (16 lowercase hex digits), as a header
/// value (an encoded word when the uuid is not plain).
fn message_id(uuid: &str, hash: u64) -> Cow<'static, str> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(uuid.len() + 17);
    id.push_str(uuid);
    id.push('.');
    for shift in (0..16).rev() {
        id.push(char::from(HEX[((hash >> (shift * 4)) & 0xf) as usize]));
    }
    // A uuid of printable ASCII without spaces (any standard one) is plain as it is.
    let plain = uuid.bytes().all(|b| b.is_ascii_graphic()) && !is_word(&id);
    if plain || value_is_plain(&id) {
        Cow::Owned(id)
    } else {
        Cow::Owned(encode_word(&id))
    }
}

/// A message ready to publish.
pub(crate) struct Encoded {
    pub headers: HeaderMap,
    pub payload: Bytes,
}

fn header_error(topic: &str, uuid: &str, what: &str) -> Error {
    // Unreachable in practice: every name and value is made valid above.
    Error::permanent(
        BROKER,
        topic,
        "encode headers",
        format!("message {uuid}: {what} is not a valid NATS header"),
    )
}

/// Encodes `message` for `topic`; fails when it would exceed `max_payload` bytes (payload
/// plus headers, the server's limit).
pub(crate) fn encode(message: &Message, topic: &str, max_payload: usize) -> Result<Encoded> {
    let mut headers = HeaderMap::new();
    let mut size = HEADER_FRAME;
    let uuid = message.uuid();
    let mut insert =
        |headers: &mut HeaderMap, name: HeaderName, value: Cow<'_, str>| -> Result<()> {
            // Values come out of `encode_value`, which leaves no CR or LF (the only characters
            // `HeaderValue` refuses); checked again here so that its conversion cannot panic.
            if value.contains(['\r', '\n']) {
                return Err(header_error(topic, uuid, "a value"));
            }
            let value = HeaderValue::from(value.into_owned());
            let name_str: &str = name.as_ref();
            size += name_str.len() + value.as_str().len() + 4;
            headers.insert(name, value);
            Ok(())
        };
    let metadata = message.metadata();
    for (k, v) in metadata.iter() {
        let name = if name_is_plain(k) {
            HeaderName::try_from(k)
        } else {
            HeaderName::try_from(encode_word(k))
        }
        .map_err(|_| header_error(topic, uuid, "a name"))?;
        insert(&mut headers, name, encode_value(v))?;
    }
    if metadata.contains_key(MSG_ID_HEADER) {
        insert(
            &mut headers,
            HeaderName::from_static(UUID_HEADER),
            encode_value(uuid),
        )?;
    } else {
        let hash = content_hash(uuid, metadata, message.key(), message.payload());
        insert(
            &mut headers,
            HeaderName::from_static(MSG_ID_HEADER),
            message_id(uuid, hash),
        )?;
    }
    if let Some(key) = message.key() {
        match std::str::from_utf8(key) {
            Ok(text) => insert(
                &mut headers,
                HeaderName::from_static(KEY_HEADER),
                encode_value(text),
            )?,
            Err(_) => insert(
                &mut headers,
                HeaderName::from_static(KEY_B64_HEADER),
                Cow::Owned(STANDARD.encode(key)),
            )?,
        }
    }
    let total = message.payload().len() + size;
    if total > max_payload {
        return Err(Error::MessageTooLarge {
            broker: BROKER,
            topic: topic.to_owned(),
            uuid: uuid.to_owned(),
            size: total,
            limit: max_payload,
        });
    }
    Ok(Encoded {
        headers,
        payload: message.payload().clone(),
    })
}

/// Where a received message came from, for deriving a uuid when it carries none.
pub(crate) enum Origin<'a> {
    /// A JetStream stream message.
    Stream { stream: &'a str, sequence: u64 },
    /// A core NATS message.
    Subject(&'a str),
}

/// Decodes a received message.
pub(crate) fn decode(headers: Option<&HeaderMap>, payload: Bytes, origin: Origin<'_>) -> Message {
    let mut metadata = Metadata::new();
    let mut uuid: Option<String> = None;
    let mut msg_id: Option<String> = None;
    let mut key: Option<Bytes> = None;
    if let Some(headers) = headers {
        for (name, values) in headers.iter() {
            // A header sent several times (by other clients): the last value wins.
            let Some(value) = values.last() else { continue };
            let (name, value): (&str, &str) = (name.as_ref(), value.as_str());
            match name {
                UUID_HEADER => uuid = Some(decode_value(value).into_owned()),
                MSG_ID_HEADER => msg_id = Some(decode_value(value).into_owned()),
                KEY_HEADER => key = Some(Bytes::from(decode_value(value).into_owned())),
                KEY_B64_HEADER => match STANDARD.decode(value) {
                    Ok(bytes) => key = Some(Bytes::from(bytes)),
                    Err(_) => metadata.set(name, value),
                },
                _ => {
                    let name = decode_value(name);
                    metadata.set(name, decode_value(value));
                }
            }
        }
    }
    let uuid: std::sync::Arc<str> = match (uuid, msg_id) {
        (Some(uuid), msg_id) => {
            if let Some(id) = msg_id {
                metadata.set(MSG_ID_HEADER, id);
            }
            uuid.into()
        }
        (None, Some(id)) => match own_message_id(&id, &metadata, key.as_ref(), &payload) {
            Some(uuid) => uuid.into(),
            None => id.into(),
        },
        (None, None) => derive_uuid(headers, &payload, origin),
    };
    let mut message = Message::with_uuid(uuid, payload).with_metadata_map(metadata);
    message.set_key(key);
    message
}

/// A 64-bit hash of the uuid, metadata, key and payload, each length-prefixed: what makes
/// two publishes of one uuid the same message for JetStream's deduplication. Eight bytes at
/// a time with a final mix (it runs on every publish and every delivery); stable across
/// processes and versions (metadata iterates in key order). Not meant to resist deliberate
/// collisions: it tells apart messages that share a uuid.
fn content_hash(uuid: &str, metadata: &Metadata, key: Option<&Bytes>, payload: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut word = |w: u64| {
        hash = (hash ^ w).wrapping_mul(K).rotate_left(29);
    };
    let mut feed = |bytes: &[u8]| {
        word(bytes.len() as u64);
        let mut chunks = bytes.chunks_exact(8);
        for c in chunks.by_ref() {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            word(u64::from_le_bytes(b));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            word(u64::from_le_bytes(b));
        }
    };
    feed(uuid.as_bytes());
    for (k, v) in metadata.iter() {
        feed(k.as_bytes());
        feed(v.as_bytes());
    }
    match key {
        Some(key) => {
            feed(b"k");
            feed(key);
        }
        None => feed(b""),
    }
    feed(payload);
    // splitmix64's finalizer.
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// The uuid inside a `Nats-Msg-Id` this codec wrote (`{uuid}.{hash}` with the hash of this
/// very content); `None` for any other message id.
fn own_message_id<'a>(
    id: &'a str,
    metadata: &Metadata,
    key: Option<&Bytes>,
    payload: &[u8],
) -> Option<&'a str> {
    let (uuid, hex) = id.rsplit_once('.')?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let hash = u64::from_str_radix(hex, 16).ok()?;
    (hash == content_hash(uuid, metadata, key, payload)).then_some(uuid)
}

fn derive_uuid(
    headers: Option<&HeaderMap>,
    payload: &[u8],
    origin: Origin<'_>,
) -> std::sync::Arc<str> {
    match origin {
        Origin::Stream { stream, sequence } => {
            stable_uuid(&[b"nats", stream.as_bytes(), sequence.to_string().as_bytes()])
        }
        Origin::Subject(subject) => {
            // No broker coordinates: the content identifies the message.
            let mut fields: Vec<(&str, &str)> = headers
                .map(|h| {
                    h.iter()
                        .flat_map(|(n, vs)| vs.iter().map(move |v| (n.as_ref(), v.as_str())))
                        .collect()
                })
                .unwrap_or_default();
            fields.sort_unstable();
            let mut header_bytes = Vec::new();
            for (n, v) in fields {
                header_bytes.extend_from_slice(n.as_bytes());
                header_bytes.push(0);
                header_bytes.extend_from_slice(v.as_bytes());
                header_bytes.push(0);
            }
            stable_uuid(&[b"nats-core", subject.as_bytes(), &header_bytes, payload])
        }
    }
}

/// What a JetStream ack subject tells about a delivery.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct AckInfo<'a> {
    pub stream: &'a str,
    pub delivered: u64,
    pub stream_sequence: u64,
}

/// Parses `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`,
/// or the newer form with `<domain>.<account hash>.` after `$JS.ACK.` (and more tokens at
/// the end).
pub(crate) fn parse_ack_subject(reply: &str) -> Option<AckInfo<'_>> {
    let rest = reply.strip_prefix("$JS.ACK.")?;
    let tokens: Vec<&str> = rest.split('.').collect();
    let base = match tokens.len() {
        7 => 0,
        n if n >= 9 => 2,
        _ => return None,
    };
    Some(AckInfo {
        stream: tokens[base],
        delivered: tokens[base + 2].parse().ok()?,
        stream_sequence: tokens[base + 3].parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: &Message) -> Message {
        let e = encode(m, "t", 1 << 20).unwrap();
        decode(
            Some(&e.headers),
            e.payload,
            Origin::Stream {
                stream: "S",
                sequence: 1,
            },
        )
    }

    #[test]
    fn metadata_uuid_and_key_round_trip_unchanged() {
        let awkward = [
            "plain",
            "",
            "héllo wörld ✓",
            " leading",
            "trailing\t",
            "two\r\nlines",
            "tab\tinside",
            "=?utf-8?b?aGk=?=",
            "nul\0byte",
        ];
        let mut m = Message::new(vec![0u8, 0xff, b'\r', b'\n'])
            .with_key("customer 42\n")
            .with_metadata("Nats-TTL-like", "x");
        for (i, v) in awkward.iter().enumerate() {
            m = m.with_metadata(format!("k{i}"), v);
        }
        for k in [
            "",
            "with space",
            "colon:key",
            "ключ",
            "tidemill-uuid",
            "tidemill-key",
            "=?utf-8?b?eA==?=",
        ] {
            m = m.with_metadata(k, "v");
        }
        assert_eq!(round_trip(&m), m);
        let binary_key = Message::new("x").with_key([0xffu8, 0, 1]);
        assert_eq!(round_trip(&binary_key), binary_key);
    }

    #[test]
    fn uuid_travels_as_the_jetstream_message_id() {
        let m = Message::new("x").with_metadata("a", "1").with_key("k");
        let e = encode(&m, "t", 1 << 20).unwrap();
        let id = e.headers.get(MSG_ID_HEADER).unwrap().as_str().to_owned();
        assert!(id.starts_with(&format!("{}.", m.uuid())), "{id}");
        assert!(e.headers.get(UUID_HEADER).is_none());
        assert_eq!(round_trip(&m), m);
        // The same message again (a retry) has the same id: the stream drops it.
        let again = encode(&m.clone(), "t", 1 << 20).unwrap();
        assert_eq!(again.headers.get(MSG_ID_HEADER).unwrap().as_str(), id);
        // The same uuid with other metadata, key or payload (a deliberate republish) does not.
        let variants = [
            m.clone().with_metadata("a", "2"),
            m.clone().with_key("other"),
            Message::with_uuid(m.uuid(), "y")
                .with_metadata("a", "1")
                .with_key("k"),
        ];
        for v in variants {
            assert_eq!(v.uuid(), m.uuid());
            let e = encode(&v, "t", 1 << 20).unwrap();
            assert_ne!(e.headers.get(MSG_ID_HEADER).unwrap().as_str(), id);
            assert_eq!(round_trip(&v), v);
        }
        // Another client's id that merely looks like one of ours stays whole.
        let mut h = HeaderMap::new();
        h.insert(
            MSG_ID_HEADER,
            format!("{}.0123456789abcdef", m.uuid()).as_str(),
        );
        let foreign = decode(Some(&h), Bytes::from_static(b"x"), Origin::Subject("s"));
        assert_eq!(foreign.uuid(), format!("{}.0123456789abcdef", m.uuid()));
        // A message id of the user's own is kept; the uuid moves to tidemill-uuid.
        let own = Message::new("x").with_metadata(MSG_ID_HEADER, "order-7");
        let e = encode(&own, "t", 1 << 20).unwrap();
        assert_eq!(e.headers.get(MSG_ID_HEADER).unwrap().as_str(), "order-7");
        assert_eq!(e.headers.get(UUID_HEADER).unwrap().as_str(), own.uuid());
        assert_eq!(round_trip(&own), own);
    }

    #[test]
    fn foreign_messages_get_stable_uuids() {
        let mut h = HeaderMap::new();
        h.insert("trace", "abc");
        let a = decode(
            Some(&h),
            Bytes::from_static(b"p"),
            Origin::Stream {
                stream: "S",
                sequence: 9,
            },
        );
        let b = decode(
            Some(&h),
            Bytes::from_static(b"p"),
            Origin::Stream {
                stream: "S",
                sequence: 9,
            },
        );
        let c = decode(
            Some(&h),
            Bytes::from_static(b"p"),
            Origin::Stream {
                stream: "S",
                sequence: 10,
            },
        );
        assert_eq!(a.uuid(), b.uuid());
        assert_ne!(a.uuid(), c.uuid());
        assert_eq!(a.metadata().get("trace"), Some("abc"));
        assert_eq!(a.key(), None);
        let x = decode(None, Bytes::from_static(b"p"), Origin::Subject("s"));
        let y = decode(None, Bytes::from_static(b"p"), Origin::Subject("s"));
        let z = decode(None, Bytes::from_static(b"q"), Origin::Subject("s"));
        assert_eq!(x.uuid(), y.uuid());
        assert_ne!(x.uuid(), z.uuid());
        // Another client's message id is the uuid.
        let mut h = HeaderMap::new();
        h.insert(MSG_ID_HEADER, "their-id");
        let m = decode(Some(&h), Bytes::new(), Origin::Subject("s"));
        assert_eq!(m.uuid(), "their-id");
        assert!(m.metadata().is_empty());
    }

    #[test]
    fn oversized_messages_name_the_limit() {
        let m = Message::new(vec![0u8; 2000]);
        let err = encode(&m, "big", 1000).err().unwrap();
        match &err {
            Error::MessageTooLarge {
                limit, size, topic, ..
            } => {
                assert_eq!(*limit, 1000);
                assert!(*size > 2000);
                assert_eq!(topic, "big");
            }
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("1000"), "{err}");
    }

    #[test]
    fn ack_subjects() {
        assert_eq!(
            parse_ack_subject("$JS.ACK.ORDERS.billing.3.42.40.1700000000000000000.7"),
            Some(AckInfo {
                stream: "ORDERS",
                delivered: 3,
                stream_sequence: 42
            })
        );
        assert_eq!(
            parse_ack_subject("$JS.ACK._.ACCHASH.ORDERS.billing.1.5.5.1700000000000000000.0.tok"),
            Some(AckInfo {
                stream: "ORDERS",
                delivered: 1,
                stream_sequence: 5
            })
        );
        assert_eq!(parse_ack_subject("_INBOX.x"), None);
        assert_eq!(parse_ack_subject("$JS.ACK.a.b.c"), None);
    }
}
