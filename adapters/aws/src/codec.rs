//! Messages as SNS/SQS bodies and message attributes, and back.
//!
//! - The body is the payload when it is text SQS accepts (UTF-8 without control characters
//!   other than tab and line breaks); any other payload travels base64-encoded with the
//!   attribute `tidemill-encoding: base64`, an empty one as `.` with `tidemill-encoding:
//!   empty` (SQS refuses empty bodies).
//! - `tidemill-uuid` carries the uuid, `tidemill-key` the key (`tidemill-key.b64` when it is
//!   not text).
//! - Each metadata entry is a `String` attribute of its own while it can be (a valid
//!   attribute name, a non-empty text value) and SQS's limit of 10 attributes allows; the
//!   rest travel as one JSON object in `tidemill-metadata`.
//! - Received: `Binary` attributes become metadata under `name.b64` (base64), others under
//!   their name; a message without `tidemill-uuid` takes SQS's message id as uuid (the same
//!   on every receive), and on a FIFO queue its message group id as key.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use tidemill_core::headers::{insert_header_bytes, BINARY_SUFFIX, KEY_HEADER, UUID_HEADER};
use tidemill_core::{Error, Message, Metadata, Native, NativeEntry, Result};

use crate::names::{allowed_char, attribute_name, fifo_id, is_text};
use crate::record::{Attribute, AttributeValue, SqsRecord};
use crate::BROKER;

/// The attribute telling how the body encodes the payload.
pub(crate) const ENCODING_ATTR: &str = "tidemill-encoding";
/// The attribute carrying metadata that does not fit attributes of its own, as JSON.
pub(crate) const METADATA_ATTR: &str = "tidemill-metadata";
/// The key attribute when the key is not text.
const KEY_B64_ATTR: &str = "tidemill-key.b64";
/// SQS's (and SNS's) limit of message attributes per message.
const MAX_ATTRIBUTES: usize = 10;

fn reserved(name: &str) -> bool {
    matches!(
        name,
        UUID_HEADER | KEY_HEADER | KEY_B64_ATTR | ENCODING_ATTR | METADATA_ATTR
    )
}

/// A message ready to send.
#[derive(Debug)]
pub(crate) struct Encoded {
    pub(crate) body: String,
    pub(crate) attributes: Vec<(String, Attribute)>,
    /// FIFO only: the message group id (the key, or the uuid for a message without one)
    /// and the deduplication id (uuid and content).
    pub(crate) fifo: Option<(String, String)>,
    /// Body plus attributes, as SQS counts them.
    pub(crate) size: usize,
}

/// One metadata entry on its way to an attribute.
struct Candidate {
    name: String,
    attr: Attribute,
    /// May move into the JSON attribute (a `String` of our own making).
    spillable: bool,
    /// The metadata key and value it shows as.
    meta_key: String,
    meta_value: String,
}

/// Encodes `message` for `topic` (a FIFO one when `fifo`), or fails naming what is wrong
/// with it: a reserved metadata key, or a message over `max_bytes`.
pub(crate) fn encode(
    message: &Message,
    topic: &str,
    max_bytes: usize,
    fifo: bool,
) -> Result<Encoded> {
    let payload = message.payload();
    let (body, encoding) = if payload.is_empty() {
        (".".to_owned(), Some("empty"))
    } else if let Some(text) = is_text(payload) {
        (text.to_owned(), None)
    } else {
        (
            base64::engine::general_purpose::STANDARD.encode(payload),
            Some("base64"),
        )
    };
    let mut attributes: Vec<(String, Attribute)> = Vec::with_capacity(4);
    attributes.push((UUID_HEADER.to_owned(), Attribute::text(message.uuid())));
    if let Some(key) = message.key() {
        match is_text(key).filter(|k| !k.is_empty()) {
            Some(text) => attributes.push((KEY_HEADER.to_owned(), Attribute::text(text))),
            None => attributes.push((
                KEY_B64_ATTR.to_owned(),
                Attribute::text(base64::engine::general_purpose::STANDARD.encode(key)),
            )),
        }
    }
    if let Some(encoding) = encoding {
        attributes.push((ENCODING_ATTR.to_owned(), Attribute::text(encoding)));
    }
    let metadata = message.metadata();
    for (k, _) in metadata.iter() {
        if reserved(k) {
            return Err(Error::permanent(
                BROKER,
                topic,
                format!("publish message {}", message.uuid()),
                format!(
                    "metadata key `{k}` is reserved: it names an attribute that carries the \
                     uuid, key, payload encoding or overflow metadata"
                ),
            ));
        }
    }
    let candidates = match Native::of::<SqsRecord>(message, BROKER) {
        Some(record) => native_candidates(message, record),
        None => metadata.iter().map(|(k, v)| candidate(k, v)).collect(),
    };
    place(&mut attributes, candidates);
    let size = body.len() + attributes.iter().map(|(n, a)| a.size(n)).sum::<usize>();
    if size > max_bytes {
        return Err(Error::MessageTooLarge {
            broker: BROKER,
            topic: topic.to_owned(),
            uuid: message.uuid().to_owned(),
            size,
            limit: max_bytes,
        });
    }
    let fifo = fifo.then(|| {
        let group_id = match message.key() {
            Some(key) => fifo_id(key),
            None => fifo_id(message.uuid().as_bytes()),
        };
        (group_id, dedup_id(message.uuid(), &body, &attributes))
    });
    Ok(Encoded {
        body,
        attributes,
        fifo,
        size,
    })
}

/// The FIFO deduplication id: the uuid and a hash of the body and attributes, so a
/// publish retried with the same message is dropped as a duplicate (for five minutes),
/// while a changed copy with the same uuid (republished with new metadata, as durable
/// dead-letter counting does) is delivered.
fn dedup_id(uuid: &str, body: &str, attributes: &[(String, Attribute)]) -> String {
    let mut content = Vec::with_capacity(body.len() + 64);
    let mut part = |bytes: &[u8]| {
        content.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        content.extend_from_slice(bytes);
    };
    part(body.as_bytes());
    let mut sorted: Vec<&(String, Attribute)> = attributes.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, attr) in sorted {
        part(name.as_bytes());
        part(attr.data_type.as_bytes());
        match &attr.value {
            AttributeValue::Text(t) => part(t.as_bytes()),
            AttributeValue::Binary(b) => part(b),
        }
    }
    let hash = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &content).simple();
    let id = fifo_id(uuid.as_bytes());
    if id.len() + 33 <= 128 {
        format!("{id}.{hash}")
    } else {
        format!("{}.{hash}", &id[..128 - 33])
    }
}

fn candidate(k: &str, v: &str) -> Candidate {
    Candidate {
        name: k.to_owned(),
        attr: Attribute::text(v),
        spillable: true,
        meta_key: k.to_owned(),
        meta_value: v.to_owned(),
    }
}

/// A received message published again: the attributes it arrived with where the
/// application left their entries alone (types and bytes as received), its changes and
/// additions as `String` attributes.
fn native_candidates(message: &Message, record: &SqsRecord) -> Vec<Candidate> {
    let native = message.native().expect("a record comes with its native");
    let current = message.metadata();
    let mut out = Vec::new();
    let mut covered: Vec<String> = Vec::new();
    for (name, attr) in &record.attributes {
        if reserved(name) {
            continue;
        }
        let key = match attr.value {
            AttributeValue::Binary(_) => format!("{name}{BINARY_SUFFIX}"),
            AttributeValue::Text(_) => name.clone(),
        };
        match native.entry(current, &key) {
            NativeEntry::Kept => out.push(Candidate {
                name: name.clone(),
                attr: attr.clone(),
                spillable: attr.data_type == "String",
                meta_key: key.clone(),
                meta_value: current.get(&key).unwrap_or_default().to_owned(),
            }),
            NativeEntry::Changed(v) => out.push(candidate(&key, v)),
            NativeEntry::Removed => {}
        }
        covered.push(key);
    }
    out.extend(
        current
            .iter()
            .filter(|(k, _)| !covered.iter().any(|c| c == k))
            .map(|(k, v)| candidate(k, v)),
    );
    out
}

/// Adds `candidates` to `attributes`: as attributes of their own while they are valid ones
/// and fit SQS's limit, the rest as JSON in [`METADATA_ATTR`].
fn place(attributes: &mut Vec<(String, Attribute)>, candidates: Vec<Candidate>) {
    let fits = |c: &Candidate| {
        !c.spillable
            || (attribute_name(&c.name)
                && !c.meta_value.is_empty()
                && c.meta_value.chars().all(allowed_char))
    };
    let (mut own, mut spill): (Vec<Candidate>, Vec<Candidate>) =
        candidates.into_iter().partition(|c| fits(c));
    let budget = MAX_ATTRIBUTES - attributes.len();
    if !spill.is_empty() || own.len() > budget {
        // One slot for the JSON attribute; spill our own String ones from the end first.
        while own.len() > budget - 1 {
            match own.iter().rposition(|c| c.spillable) {
                Some(i) => spill.insert(0, own.remove(i)),
                None => {
                    // Only foreign typed attributes left over: their string view travels.
                    let c = own.pop().expect("more than the budget");
                    spill.insert(0, c);
                }
            }
        }
    }
    attributes.extend(own.into_iter().map(|c| (c.name, c.attr)));
    if !spill.is_empty() {
        let map: serde_json::Map<String, serde_json::Value> = spill
            .into_iter()
            .map(|c| (c.meta_key, serde_json::Value::String(c.meta_value)))
            .collect();
        attributes.push((
            METADATA_ATTR.to_owned(),
            Attribute::text(serde_json::Value::Object(map).to_string()),
        ));
    }
}

/// What a received SQS message says, before it becomes a [`Message`].
pub(crate) struct Received<'a> {
    pub(crate) queue: &'a str,
    pub(crate) message_id: &'a str,
    pub(crate) body: &'a str,
    pub(crate) attributes: Vec<(String, Attribute)>,
    pub(crate) system: &'a HashMap<aws_sdk_sqs::types::MessageSystemAttributeName, String>,
    pub(crate) unwrap_envelopes: bool,
}

/// The SNS notification envelope (a subscription without raw message delivery).
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Envelope {
    #[serde(rename = "Type")]
    kind: String,
    message_id: String,
    topic_arn: String,
    message: String,
    #[serde(default)]
    message_attributes: HashMap<String, EnvelopeAttribute>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EnvelopeAttribute {
    #[serde(rename = "Type")]
    kind: String,
    value: String,
}

/// The message and its delivery count.
pub(crate) fn decode(r: Received<'_>) -> (Message, Option<u32>) {
    use aws_sdk_sqs::types::MessageSystemAttributeName as Sys;
    let b64 = &base64::engine::general_purpose::STANDARD;
    let mut attributes = r.attributes;
    let mut body: &str = r.body;
    let mut sns_message_id = None;
    let envelope = (r.unwrap_envelopes && attributes.is_empty() && body.starts_with('{'))
        .then(|| serde_json::from_str::<Envelope>(body).ok())
        .flatten()
        .filter(|e| e.kind == "Notification" && !e.topic_arn.is_empty());
    let unwrapped;
    if let Some(envelope) = envelope {
        attributes = envelope
            .message_attributes
            .into_iter()
            .map(|(name, a)| {
                let value = if a.kind.starts_with("Binary") {
                    b64.decode(&a.value)
                        .map(|v| AttributeValue::Binary(v.into()))
                        .unwrap_or(AttributeValue::Text(a.value))
                } else {
                    AttributeValue::Text(a.value)
                };
                (
                    name,
                    Attribute {
                        data_type: a.kind,
                        value,
                    },
                )
            })
            .collect();
        attributes.sort_by(|a, b| a.0.cmp(&b.0));
        sns_message_id = Some(envelope.message_id);
        unwrapped = envelope.message;
        body = &unwrapped;
    }
    let mut metadata = Metadata::new();
    let (mut uuid, mut key, mut encoding): (Option<&str>, Option<Bytes>, Option<&str>) =
        (None, None, None);
    for (name, attr) in &attributes {
        match (&attr.value, name.as_str()) {
            (AttributeValue::Text(v), UUID_HEADER) => uuid = Some(v),
            (AttributeValue::Text(v), KEY_HEADER) => {
                key = Some(Bytes::copy_from_slice(v.as_bytes()))
            }
            (AttributeValue::Text(v), KEY_B64_ATTR) => match b64.decode(v) {
                Ok(k) => key = Some(k.into()),
                Err(_) => metadata.set(name.clone(), v),
            },
            (AttributeValue::Text(v), ENCODING_ATTR) => encoding = Some(v),
            (AttributeValue::Text(v), METADATA_ATTR) => {
                match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(v) {
                    Ok(map) => {
                        for (k, v) in map {
                            match v {
                                serde_json::Value::String(s) => metadata.set(k, s),
                                other => metadata.set(k, other.to_string()),
                            }
                        }
                    }
                    Err(_) => metadata.set(name.clone(), v),
                }
            }
            (AttributeValue::Text(v), _) => metadata.set(name.clone(), v),
            (AttributeValue::Binary(v), _) => insert_header_bytes(&mut metadata, name, v),
        }
    }
    let payload: Bytes = match encoding {
        Some("base64") => match b64.decode(body) {
            Ok(p) => p.into(),
            Err(_) => {
                // Not what the attribute says: keep the body as is, and the attribute in
                // the metadata, so the handler sees both.
                metadata.set(ENCODING_ATTR, "base64");
                Bytes::copy_from_slice(body.as_bytes())
            }
        },
        Some("empty") => Bytes::new(),
        Some(other) => {
            metadata.set(ENCODING_ATTR, other);
            Bytes::copy_from_slice(body.as_bytes())
        }
        None => Bytes::copy_from_slice(body.as_bytes()),
    };
    let group_id = r.system.get(&Sys::MessageGroupId).cloned();
    let uuid_stored = uuid.is_some();
    let message_uuid: String = match uuid {
        Some(u) => u.to_owned(),
        None => sns_message_id
            .clone()
            .unwrap_or_else(|| r.message_id.to_owned()),
    };
    if key.is_none() && !uuid_stored {
        key = group_id
            .as_ref()
            .map(|g| Bytes::copy_from_slice(g.as_bytes()));
    }
    let attempt = r
        .system
        .get(&Sys::ApproximateReceiveCount)
        .and_then(|c| c.parse().ok());
    let sent_at = r
        .system
        .get(&Sys::SentTimestamp)
        .and_then(|t| t.parse::<u64>().ok())
        .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
    let record = SqsRecord {
        queue: r.queue.to_owned(),
        message_id: r.message_id.to_owned(),
        attributes,
        sent_at,
        group_id,
        sequence_number: r.system.get(&Sys::SequenceNumber).cloned(),
        sns_message_id,
        uuid_stored,
    };
    let native = Native::new(BROKER, record, &metadata);
    let mut message = Message::with_uuid(message_uuid, payload)
        .with_metadata_map(metadata)
        .with_native(native);
    message.set_key(key);
    (message, attempt)
}

/// The attributes of an SQS message as [`Attribute`]s, sorted by name.
pub(crate) fn sqs_attributes(
    attrs: Option<&HashMap<String, aws_sdk_sqs::types::MessageAttributeValue>>,
) -> Vec<(String, Attribute)> {
    let mut out: Vec<(String, Attribute)> = attrs
        .into_iter()
        .flatten()
        .map(|(name, v)| {
            let value = match (v.string_value(), v.binary_value()) {
                (Some(s), _) => AttributeValue::Text(s.to_owned()),
                (None, Some(b)) => AttributeValue::Binary(Bytes::copy_from_slice(b.as_ref())),
                (None, None) => AttributeValue::Text(String::new()),
            };
            (
                name.clone(),
                Attribute {
                    data_type: v.data_type().to_owned(),
                    value,
                },
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(message: &Message) -> Message {
        let enc = encode(message, "t", 256 * 1024, false).expect("encodes");
        let system = HashMap::new();
        let mut attributes = enc.attributes.clone();
        attributes.sort_by(|a, b| a.0.cmp(&b.0));
        decode(Received {
            queue: "q",
            message_id: "mid",
            body: &enc.body,
            attributes,
            system: &system,
            unwrap_envelopes: true,
        })
        .0
    }

    #[test]
    fn text_binary_and_empty_payloads_round_trip() {
        for payload in [&b"hello"[..], &[0u8, 159, 146, 150][..], &b""[..]] {
            let msg = Message::new(Bytes::copy_from_slice(payload)).with_key("k1");
            let back = roundtrip(&msg);
            assert_eq!(back.payload().as_ref(), payload);
            assert_eq!(back.uuid(), msg.uuid());
            assert_eq!(back.key_str(), Some("k1"));
            assert!(back.metadata().is_empty(), "{:?}", back.metadata());
        }
    }

    #[test]
    fn metadata_beyond_ten_attributes_travels_as_json() {
        let mut msg = Message::new("x");
        for i in 0..15 {
            msg.metadata_mut().set(format!("k{i:02}"), format!("v{i}"));
        }
        msg.metadata_mut().set("has space", "ok");
        msg.metadata_mut().set("empty", "");
        let enc = encode(&msg, "t", 256 * 1024, false).unwrap();
        assert!(enc.attributes.len() <= MAX_ATTRIBUTES);
        assert!(enc.attributes.iter().any(|(n, _)| n == METADATA_ATTR));
        let back = roundtrip(&msg);
        assert_eq!(back.metadata(), msg.metadata());
    }

    fn dedup(msg: &Message) -> String {
        encode(msg, "t", 1024, true).unwrap().fifo.unwrap().1
    }

    #[test]
    fn the_deduplication_id_changes_with_the_content_not_only_the_uuid() {
        let msg = Message::new("x").with_key("k");
        let same = dedup(&msg);
        assert_eq!(same, dedup(&msg), "a retry is a duplicate");
        assert!(same.starts_with(msg.uuid()) && same.len() <= 128);
        let changed = msg.clone().with_metadata("failures", "1");
        assert_ne!(same, dedup(&changed));
    }

    #[test]
    fn binary_keys_round_trip() {
        let msg = Message::new("x").with_key([0xffu8, 0]);
        assert_eq!(
            roundtrip(&msg).key().map(|k| k.to_vec()),
            Some(vec![0xff, 0])
        );
    }

    #[test]
    fn reserved_metadata_is_refused() {
        let msg = Message::new("x").with_metadata(METADATA_ATTR, "1");
        let err = encode(&msg, "orders", 1024, false).unwrap_err().to_string();
        assert!(err.contains("reserved") && err.contains("orders"), "{err}");
    }

    #[test]
    fn oversized_messages_are_named() {
        let msg = Message::new(vec![b'a'; 300 * 1024]);
        let err = encode(&msg, "orders", 256 * 1024, false).unwrap_err();
        assert!(matches!(err, Error::MessageTooLarge { .. }), "{err}");
        assert!(err.to_string().contains("orders"));
    }

    #[test]
    fn sns_envelopes_are_unwrapped() {
        let body = r#"{"Type":"Notification","MessageId":"sns-1","TopicArn":"arn:aws:sns:r:1:t","Message":"inner","MessageAttributes":{"a":{"Type":"String","Value":"b"}}}"#;
        let system = HashMap::new();
        let (msg, _) = decode(Received {
            queue: "q",
            message_id: "sqs-1",
            body,
            attributes: Vec::new(),
            system: &system,
            unwrap_envelopes: true,
        });
        assert_eq!(msg.payload().as_ref(), b"inner");
        assert_eq!(msg.uuid(), "sns-1");
        assert_eq!(msg.metadata().get("a"), Some("b"));
    }

    #[test]
    fn foreign_messages_take_the_sqs_id_and_group() {
        use aws_sdk_sqs::types::MessageSystemAttributeName as Sys;
        let mut system = HashMap::new();
        system.insert(Sys::MessageGroupId, "customer-1".to_owned());
        system.insert(Sys::ApproximateReceiveCount, "3".to_owned());
        let (msg, attempt) = decode(Received {
            queue: "q",
            message_id: "sqs-1",
            body: "{\"plain\":true}",
            attributes: vec![(
                "n".into(),
                Attribute {
                    data_type: "Number".into(),
                    value: AttributeValue::Text("42".into()),
                },
            )],
            system: &system,
            unwrap_envelopes: true,
        });
        assert_eq!(msg.uuid(), "sqs-1");
        assert_eq!(msg.key_str(), Some("customer-1"));
        assert_eq!(attempt, Some(3));
        assert_eq!(msg.metadata().get("n"), Some("42"));
        // Passed on unchanged, the Number attribute keeps its type.
        let enc = encode(&msg, "t", 1024, false).unwrap();
        let n = enc.attributes.iter().find(|(n, _)| n == "n").unwrap();
        assert_eq!(n.1.data_type, "Number");
    }
}
