//! Tidemill messages ↔ Kafka records.
//!
//! Receiving: the record becomes a message (payload = value, key = key, uuid from the
//! identity header or derived from topic/partition/offset, metadata = the string view of
//! the other headers) carrying the record itself as its [`Native`] ([`KafkaRecord`]).
//!
//! Publishing: a message carrying a Kafka record is written from that record, with only
//! what the application changed in the string view applied; any other message is written
//! from its string metadata.

use std::borrow::Cow;
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use tidemill_core::headers::{stable_uuid, BINARY_SUFFIX};
use tidemill_core::{Message, Metadata, Native, NativeEntry};

use crate::record::{Arena, KafkaRecord, RecordBuilder, View};
use crate::{KafkaConfig, BROKER};

/// Which headers carry a message's uuid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Identity {
    /// The header the publisher writes the uuid to (and the first one read).
    pub(crate) write: String,
    /// The headers a uuid is read from, best first (`write` first).
    pub(crate) read: Vec<String>,
}

impl Identity {
    pub(crate) fn new(config: &KafkaConfig) -> Arc<Self> {
        let mut read = vec![config.uuid_header.clone()];
        for h in &config.uuid_read_headers {
            if !read.contains(h) {
                read.push(h.clone());
            }
        }
        Arc::new(Identity {
            write: config.uuid_header.clone(),
            read,
        })
    }

    fn rank(&self, name: &str) -> Option<usize> {
        self.read.iter().position(|h| h == name)
    }
}

/// A received record of `topic` as a Tidemill message carrying its [`KafkaRecord`].
#[cfg(test)]
pub(crate) fn message<M: rdkafka::Message>(
    m: &M,
    topic: &Arc<str>,
    identity: &Identity,
    arena: &mut Arena,
) -> Message {
    message_of(record(m, topic, arena), identity)
}

/// A received record of `topic` as the [`KafkaRecord`] its message will carry (what the
/// poll thread does with it: copy it out of librdkafka's buffers).
pub(crate) fn record<M: rdkafka::Message>(
    m: &M,
    topic: &Arc<str>,
    arena: &mut Arena,
) -> KafkaRecord {
    let (partition, offset) = (m.partition(), m.offset());
    let value = m.payload().map(|v| arena.copy(v));
    let key = m.key().map(|k| arena.copy(k));
    let mut builder = RecordBuilder::new(
        topic.clone(),
        partition,
        offset,
        m.timestamp().into(),
        key,
        value,
        arena,
    );
    if let Some(headers) = m.headers() {
        let count = headers.count();
        builder.reserve(count, 0);
        for i in 0..count {
            // rdkafka panics on a header name that is not UTF-8 (only a C client can
            // write one): count it instead of losing the whole subscription.
            match catch_unwind(AssertUnwindSafe(|| headers.try_get(i))) {
                Ok(Some(h)) => builder.header(h.key, h.value),
                Ok(None) => {}
                Err(_) => builder.unreadable(),
            }
        }
    }
    let record = builder.finish(arena);
    if record.unreadable_headers() > 0 {
        tracing::warn!(
            topic = &**topic,
            partition,
            offset,
            unreadable = record.unreadable_headers(),
            "a record has header names that are not UTF-8; they are left out"
        );
    }
    record
}

/// The Tidemill message of a received record (payload = value, key = key, uuid from the
/// identity header or derived from topic/partition/offset, metadata = the string view of
/// the other headers), carrying the record as its [`Native`]. The subscription makes it
/// when the message is first handed out, on the thread that takes it (which is also where
/// it is usually dropped).
pub(crate) fn message_of(mut record: KafkaRecord, identity: &Identity) -> Message {
    let (uuid_from, view, metadata) = string_view(&record, identity);
    let uuid = match uuid_from.and_then(|i| record.header(i).value_str()) {
        Some(text) => Arc::from(text),
        None => derived_uuid(record.topic(), record.partition(), record.offset()),
    };
    record.uuid_from = uuid_from;
    record.view = view;
    let value = record.value_bytes().cloned();
    let key = record.key_bytes().cloned();
    let native = Native::new(BROKER, record, &metadata);
    let msg = Message::with_uuid(uuid, value.unwrap_or_default()).with_metadata_map(metadata);
    let msg = match key {
        Some(k) => msg.with_key_bytes(k),
        None => msg,
    };
    msg.with_native(native)
}

/// The uuid of a record without an identity header: the same for every consumer.
pub(crate) fn derived_uuid(topic: &str, partition: i32, offset: i64) -> Arc<str> {
    stable_uuid(&[
        b"kafka",
        topic.as_bytes(),
        &partition.to_be_bytes(),
        &offset.to_be_bytes(),
    ])
}

/// Which header gives the uuid, how each header shows, and the metadata (string view).
fn string_view(record: &KafkaRecord, identity: &Identity) -> (Option<usize>, Vec<View>, Metadata) {
    let mut uuid_from: Option<(usize, usize)> = None; // (rank, index)
    let mut view = Vec::with_capacity(record.headers().len());
    let mut binary = false;
    for (i, h) in record.headers().enumerate() {
        if let Some(rank) = identity.rank(h.name()) {
            if h.value_str().is_some_and(|v| !v.is_empty())
                && uuid_from.is_none_or(|(best, _)| rank < best)
            {
                uuid_from = Some((rank, i));
            }
            view.push(View::Hidden);
            continue;
        }
        match h.value() {
            Some(v) if std::str::from_utf8(v).is_err() => {
                binary = true;
                view.push(View::Base64);
            }
            _ => view.push(View::Name),
        }
    }
    if binary {
        // A real header always shows under its own name: a binary value whose `.b64`
        // name is taken by one is only in the record.
        let shown: HashSet<&str> = record
            .headers()
            .zip(&view)
            .filter(|(_, v)| **v == View::Name)
            .map(|(h, _)| h.name())
            .collect();
        for (h, v) in record.headers().zip(view.iter_mut()) {
            if *v == View::Base64 && shown.contains(format!("{}{BINARY_SUFFIX}", h.name()).as_str())
            {
                *v = View::Hidden;
            }
        }
    }
    let mut metadata = Metadata::new();
    for (h, v) in record.headers().zip(&view) {
        match v {
            View::Name => metadata.set(h.name(), h.value_str().unwrap_or_default()),
            View::Base64 => metadata.set(
                format!("{}{BINARY_SUFFIX}", h.name()),
                base64::engine::general_purpose::STANDARD.encode(h.value().unwrap_or_default()),
            ),
            View::Hidden => {}
        }
    }
    (uuid_from.map(|(_, i)| i), view, metadata)
}

/// A message encoded as a Kafka record.
pub(crate) struct Encoded {
    pub(crate) uuid: Arc<str>,
    pub(crate) headers: OwnedHeaders,
    pub(crate) key: Option<Bytes>,
    /// `None`: a null value (tombstone).
    pub(crate) payload: Option<Bytes>,
    /// Value, key, and header names and values, in bytes.
    pub(crate) size: usize,
}

/// A header to write: name and value (`None`: null), borrowed where possible.
type OutHeader<'a> = (Cow<'a, str>, Option<Cow<'a, [u8]>>);

/// Encodes `msg`: from its Kafka record when it carries one, else from its metadata.
pub(crate) fn encode(msg: Message, identity: &Identity) -> Encoded {
    let native = msg.native().filter(|n| n.broker() == BROKER).cloned();
    match native
        .as_ref()
        .and_then(|n| n.get::<KafkaRecord>().map(|r| (n, r)))
    {
        Some((native, record)) => encode_native(msg, native, record, identity),
        None => encode_plain(msg, identity),
    }
}

fn encode_plain(msg: Message, identity: &Identity) -> Encoded {
    let (uuid, metadata, payload, key) = msg.into_parts();
    let mut size = payload.len() + key.as_ref().map_or(0, Bytes::len);
    size += identity.write.len() + uuid.len();
    let mut h = OwnedHeaders::new_with_capacity(metadata.len() + 1).insert(Header {
        key: identity.write.as_str(),
        value: Some(&*uuid),
    });
    for (k, v) in metadata.iter() {
        if k == identity.write {
            continue; // the uuid header is written from the uuid
        }
        size += k.len() + v.len();
        h = h.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    Encoded {
        uuid,
        headers: h,
        key,
        payload: Some(payload),
        size,
    }
}

fn encode_native(
    msg: Message,
    native: &Native,
    record: &KafkaRecord,
    identity: &Identity,
) -> Encoded {
    let current = msg.metadata();
    let uuid = msg.uuid();
    let received_uuid = record.uuid_from.and_then(|i| record.header(i).value_str());
    let uuid_changed = received_uuid != Some(uuid);
    let mut out: Vec<OutHeader<'_>> = Vec::with_capacity(record.headers().len() + 1);
    let mut has_uuid = false;
    let mut changed: HashSet<String> = HashSet::new();
    for (i, h) in record.headers().enumerate() {
        let raw = (Cow::Borrowed(h.name()), h.value().map(Cow::Borrowed));
        if h.name() == identity.write {
            if h.value_str() == Some(uuid) {
                has_uuid = true;
                out.push(raw);
            }
            continue;
        }
        if record.uuid_from == Some(i) {
            if !uuid_changed {
                out.push(raw);
            }
            continue;
        }
        let key: Cow<'_, str> = match record.view[i] {
            View::Hidden => {
                out.push(raw);
                continue;
            }
            View::Name => Cow::Borrowed(h.name()),
            View::Base64 => Cow::Owned(format!("{}{BINARY_SUFFIX}", h.name())),
        };
        match native.entry(current, &key) {
            NativeEntry::Kept => out.push(raw),
            NativeEntry::Removed => {}
            NativeEntry::Changed(now) => {
                if changed.insert(key.clone().into_owned()) {
                    out.push(changed_header(record.view[i], h.name(), &key, now));
                }
            }
        }
    }
    for (k, v) in native.added(current) {
        if k != identity.write {
            out.push((Cow::Borrowed(k), Some(Cow::Borrowed(v.as_bytes()))));
        }
    }
    if !has_uuid {
        out.insert(
            0,
            (
                Cow::Borrowed(identity.write.as_str()),
                Some(Cow::Borrowed(uuid.as_bytes())),
            ),
        );
    }
    let payload = msg.payload();
    let payload = if record.is_tombstone() && payload.is_empty() {
        None
    } else {
        Some(payload.clone())
    };
    let key = msg.key().cloned();
    let mut size = payload.as_ref().map_or(0, Bytes::len) + key.as_ref().map_or(0, Bytes::len);
    let mut headers = OwnedHeaders::new_with_capacity(out.len());
    for (name, value) in &out {
        size += name.len() + value.as_ref().map_or(0, |v| v.len());
        headers = headers.insert(Header {
            key: name,
            value: value.as_deref(),
        });
    }
    Encoded {
        uuid: Arc::from(uuid),
        headers,
        key,
        payload,
        size,
    }
}

/// The header for a received entry the application changed: a binary header's `.b64`
/// entry set to valid base64 is written back as bytes under the header's name; anything
/// else as text under the metadata key.
fn changed_header<'a>(view: View, name: &'a str, key: &str, now: &'a str) -> OutHeader<'a> {
    if view == View::Base64 {
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(now) {
            return (Cow::Borrowed(name), Some(Cow::Owned(bytes)));
        }
        return (
            Cow::Owned(key.to_owned()),
            Some(Cow::Borrowed(now.as_bytes())),
        );
    }
    (Cow::Borrowed(name), Some(Cow::Borrowed(now.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::OwnedMessage;
    use rdkafka::Timestamp;

    fn identity() -> Arc<Identity> {
        Identity::new(&KafkaConfig::default())
    }

    fn received(
        offset: i64,
        value: Option<&[u8]>,
        key: Option<&[u8]>,
        headers: OwnedHeaders,
    ) -> Message {
        received_with(offset, value, key, headers, &identity())
    }

    fn received_with(
        offset: i64,
        value: Option<&[u8]>,
        key: Option<&[u8]>,
        headers: OwnedHeaders,
        identity: &Identity,
    ) -> Message {
        let m = OwnedMessage::new(
            value.map(<[u8]>::to_vec),
            key.map(<[u8]>::to_vec),
            "orders".into(),
            Timestamp::CreateTime(1_700_000_000_000),
            2,
            offset,
            Some(headers),
        );
        message(&m, &Arc::from("orders"), identity, &mut Arena::new())
    }

    /// Name and value of every header of `e`, in order.
    fn headers_of(e: &Encoded) -> Vec<(String, Option<Vec<u8>>)> {
        e.headers
            .iter()
            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
            .collect()
    }

    fn h(name: &str, value: Option<&[u8]>) -> (String, Option<Vec<u8>>) {
        (name.to_owned(), value.map(<[u8]>::to_vec))
    }

    fn odd_headers() -> OwnedHeaders {
        OwnedHeaders::new()
            .insert(Header {
                key: "trace",
                value: Some(&[0xffu8, 0x00][..]),
            })
            .insert(Header {
                key: "trace.b64",
                value: Some(&b"text"[..]),
            })
            .insert(Header::<&[u8]> {
                key: "nothing",
                value: None,
            })
            .insert(Header {
                key: "dup",
                value: Some(&b"1"[..]),
            })
            .insert(Header {
                key: "dup",
                value: Some(&b"2"[..]),
            })
            .insert(Header {
                key: "",
                value: Some(&b""[..]),
            })
    }

    #[test]
    fn tidemill_messages_survive_a_round_trip() {
        let m = Message::new(vec![0u8, 0xff, 1, 2])
            .with_key([0xfe, 0x00])
            .with_metadata("greeting", "héllo ✓")
            .with_metadata("empty", "");
        let e = encode(m.clone(), &identity());
        assert_eq!(
            headers_of(&e)[0],
            h("tidemill-uuid", Some(m.uuid().as_bytes()))
        );
        let back = received(7, e.payload.as_deref(), e.key.as_deref(), e.headers);
        assert_eq!(back, m);
        let plain = Message::new("x");
        let e = encode(plain.clone(), &identity());
        let back = received(7, e.payload.as_deref(), None, e.headers);
        assert_eq!(back, plain);
        assert!(back.key().is_none());
    }

    #[test]
    fn foreign_records_get_a_stable_uuid_and_a_string_view() {
        let a = received(41, Some(b"p"), None, odd_headers());
        let b = received(41, Some(b"p"), None, odd_headers());
        let c = received(42, Some(b"p"), None, odd_headers());
        assert_eq!(a.uuid(), b.uuid());
        assert_ne!(a.uuid(), c.uuid());
        let md = a.metadata();
        assert_eq!(md.get("trace.b64"), Some("text"), "the real header wins");
        assert_eq!(md.get("nothing"), Some(""));
        assert_eq!(md.get("dup"), Some("2"), "the last of repeated names");
        assert_eq!(md.get(""), Some(""));
        assert_eq!(md.len(), 4);
        let r = KafkaRecord::of(&a).expect("the record");
        assert_eq!((r.topic(), r.partition(), r.offset()), ("orders", 2, 41));
        assert_eq!(r.headers().len(), 6);
        assert_eq!(r.headers().next().unwrap().value(), Some(&[0xffu8, 0][..]));
        assert!(r.headers().nth(2).unwrap().is_null());
        let none = received(0, None, None, OwnedHeaders::new());
        assert!(none.payload().is_empty());
        assert!(none.metadata().is_empty());
        assert!(KafkaRecord::of(&none).unwrap().is_tombstone());
    }

    #[test]
    fn a_binary_value_without_a_real_b64_header_shows_as_base64() {
        let hs = OwnedHeaders::new().insert(Header {
            key: "bin",
            value: Some(&[0xffu8][..]),
        });
        let m = received(1, Some(b""), None, hs);
        assert_eq!(m.metadata().get("bin.b64"), Some("/w=="));
    }

    #[test]
    fn a_binary_uuid_header_is_not_taken_for_a_uuid() {
        let hs = OwnedHeaders::new().insert(Header {
            key: "tidemill-uuid",
            value: Some(&[0xffu8][..]),
        });
        let m = received(1, Some(b""), None, hs);
        assert_eq!(m.uuid(), &*derived_uuid("orders", 2, 1));
        assert!(m.metadata().is_empty(), "identity headers are not metadata");
    }

    #[test]
    fn an_unchanged_record_is_written_back_byte_for_byte() {
        let m = received(5, None, None, odd_headers());
        let e = encode(m.clone(), &identity());
        let mut want = vec![h("tidemill-uuid", Some(m.uuid().as_bytes()))];
        want.extend(odd_headers().iter().map(|x| h(x.key, x.value)));
        assert_eq!(headers_of(&e), want, "the uuid header is added first");
        assert!(e.payload.is_none(), "a tombstone stays a tombstone");
        assert!(e.key.is_none(), "a null key stays null");

        // Received again (now with the uuid header): written back without any change.
        let again = received(9, None, Some(b""), e.headers.clone());
        assert_eq!(again.uuid(), m.uuid());
        let e2 = encode(again, &identity());
        assert_eq!(headers_of(&e2), want);
        assert_eq!(
            e2.key.as_deref(),
            Some(&b""[..]),
            "an empty key stays empty"
        );
    }

    #[test]
    fn only_what_the_application_changed_is_applied() {
        let mut m = received(5, Some(b"v"), Some(b"k"), odd_headers());
        let md = m.metadata_mut();
        md.set("dup", "3"); // changed: written once, where the first one was
        md.remove("nothing"); // removed
        md.set("trace.b64", "other"); // the real text header changed
        md.set("added", "yes");
        let e = encode(m.clone(), &identity());
        assert_eq!(
            headers_of(&e),
            vec![
                h("tidemill-uuid", Some(m.uuid().as_bytes())),
                h("trace", Some(&[0xff, 0x00])),
                h("trace.b64", Some(b"other")),
                h("dup", Some(b"3")),
                h("", Some(b"")),
                h("added", Some(b"yes")),
            ]
        );
        assert_eq!(e.payload.as_deref(), Some(&b"v"[..]));

        // A changed payload of a tombstone is a value; an empty one stays a tombstone.
        let mut t = received(6, None, None, OwnedHeaders::new());
        assert!(encode(t.clone(), &identity()).payload.is_none());
        t.set_payload("now");
        assert_eq!(encode(t, &identity()).payload.as_deref(), Some(&b"now"[..]));
    }

    #[test]
    fn a_changed_base64_entry_is_written_back_as_bytes() {
        let hs = OwnedHeaders::new().insert(Header {
            key: "bin",
            value: Some(&[0xffu8][..]),
        });
        let mut m = received(1, Some(b""), None, hs);
        m.metadata_mut().set("bin.b64", "AAE=");
        let e = encode(m.clone(), &identity());
        assert_eq!(headers_of(&e)[1], h("bin", Some(&[0, 1])));
        m.metadata_mut().set("bin.b64", "not base64!");
        let e = encode(m, &identity());
        assert_eq!(headers_of(&e)[1], h("bin.b64", Some(b"not base64!")));
    }

    #[test]
    fn a_new_uuid_replaces_the_received_one() {
        let hs = OwnedHeaders::new()
            .insert(Header {
                key: "a",
                value: Some(&b"1"[..]),
            })
            .insert(Header {
                key: "tidemill-uuid",
                value: Some(&b"old"[..]),
            });
        let m = received(1, Some(b"x"), None, hs);
        assert_eq!(m.uuid(), "old");
        let (_, md, payload, key) = m.clone().into_parts();
        let mut renamed = Message::with_uuid("new", payload).with_metadata_map(md);
        renamed.set_key(key);
        renamed.set_native(m.native().cloned());
        let e = encode(renamed, &identity());
        assert_eq!(
            headers_of(&e),
            vec![h("tidemill-uuid", Some(b"new")), h("a", Some(b"1"))]
        );
    }

    #[test]
    fn the_uuid_header_is_configurable_and_fallbacks_are_read() {
        let watermill = Identity::new(&KafkaConfig {
            uuid_header: "_watermill_message_uuid".into(),
            ..KafkaConfig::default()
        });
        let hs = OwnedHeaders::new()
            .insert(Header {
                key: "_watermill_message_uuid",
                value: Some(&b"wm-1"[..]),
            })
            .insert(Header {
                key: "tidemill-uuid",
                value: Some(&b"tm-1"[..]),
            });
        let m = received_with(1, Some(b""), None, hs.clone(), &watermill);
        assert_eq!(m.uuid(), "wm-1");
        assert_eq!(
            m.metadata().get("tidemill-uuid"),
            Some("tm-1"),
            "not an identity header of this configuration"
        );
        let e = encode(Message::with_uuid("id-9", "p"), &watermill);
        assert_eq!(
            headers_of(&e),
            vec![h("_watermill_message_uuid", Some(b"id-9"))]
        );

        // Tidemill's header by default; Watermill's read when it is missing, if asked.
        let both = Identity::new(&KafkaConfig {
            uuid_read_headers: vec!["_watermill_message_uuid".into()],
            ..KafkaConfig::default()
        });
        assert_eq!(received_with(1, Some(b""), None, hs, &both).uuid(), "tm-1");
        let only_wm = OwnedHeaders::new().insert(Header {
            key: "_watermill_message_uuid",
            value: Some(&b"wm-2"[..]),
        });
        let m = received_with(1, Some(b""), None, only_wm.clone(), &both);
        assert_eq!(m.uuid(), "wm-2");
        assert!(m.metadata().is_empty());
        assert_ne!(
            received(1, Some(b""), None, only_wm).uuid(),
            "wm-2",
            "not read unless configured"
        );
        // Passed on: Watermill's header kept, Tidemill's added.
        let e = encode(m, &both);
        assert_eq!(
            headers_of(&e),
            vec![
                h("tidemill-uuid", Some(b"wm-2")),
                h("_watermill_message_uuid", Some(b"wm-2"))
            ]
        );
    }

    #[test]
    fn a_message_from_another_broker_is_written_from_its_metadata() {
        #[derive(Debug)]
        struct OtherRecord;
        let mut md = Metadata::new();
        md.set("trace.b64", "/wA=");
        md.set("tenant", "t1");
        let m = Message::with_uuid("id-1", "p")
            .with_metadata_map(md.clone())
            .with_native(Native::new("nats", OtherRecord, &md));
        let e = encode(m, &identity());
        assert_eq!(
            headers_of(&e),
            vec![
                h("tidemill-uuid", Some(b"id-1")),
                h("tenant", Some(b"t1")),
                h("trace.b64", Some(b"/wA=")),
            ]
        );
        assert_eq!(e.payload.as_deref(), Some(&b"p"[..]));
        // An empty payload without a Kafka record is an empty value, not a tombstone.
        let e = encode(Message::new(""), &identity());
        assert_eq!(e.payload.as_deref(), Some(&b""[..]));
    }

    #[test]
    fn size_counts_payload_key_and_headers() {
        let m = Message::with_uuid("id", vec![0u8; 10])
            .with_metadata("ab", "cd")
            .with_key("kk");
        let e = encode(m, &identity());
        assert_eq!(e.size, 10 + 2 + "tidemill-uuid".len() + 2 + 4);
    }
}
