//! Messages to AMQP properties and back.
//!
//! - uuid → `message-id` property (the `tidemill-uuid` header when longer than 255 bytes);
//! - key → `tidemill-key` header (any bytes), and the routing key when it is UTF-8 and at
//!   most 255 bytes;
//! - metadata → headers (long strings), except the `amqp.*` keys of [`PROPERTY_KEYS`],
//!   which set the AMQP property of that name.
//!
//! On the way back every header becomes metadata: text as is, a value that is not UTF-8
//! base64-encoded under `<name>.b64`, numbers and booleans as their decimal/`true`/`false`
//! text, tables and arrays as JSON. Set AMQP properties (other than `message-id` and
//! `delivery-mode`) come back under their `amqp.*` metadata key.

use std::fmt::Write as _;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use tidemill_core::headers::{insert_header_bytes, stable_uuid, KEY_HEADER, UUID_HEADER};
use tidemill_core::{Error, Message, Metadata, Result};

use crate::config::MAX_NAME_BYTES;
use crate::BROKER;

/// Header carrying the attempt count of a message re-published by `nack_with_delay`.
pub(crate) const ATTEMPT_HEADER: &str = "tidemill-attempt";

/// Header RabbitMQ quorum queues set on redeliveries: how often the message was returned.
pub(crate) const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// Marks the queues `nack_with_delay` parks messages in; their traces in `x-death` headers
/// are removed on receipt.
pub(crate) const DELAY_QUEUE_MARKER: &str = ".tidemill-delay-";

/// Metadata keys that map to AMQP basic properties instead of headers.
pub const PROPERTY_KEYS: [&str; 10] = [
    "amqp.content-type",
    "amqp.content-encoding",
    "amqp.correlation-id",
    "amqp.reply-to",
    "amqp.expiration",
    "amqp.type",
    "amqp.app-id",
    "amqp.user-id",
    "amqp.timestamp",
    "amqp.priority",
];

/// A message ready for `basic.publish`.
pub(crate) struct Encoded {
    pub(crate) routing_key: ShortString,
    pub(crate) properties: BasicProperties,
    pub(crate) payload: Bytes,
}

/// Encodes `message` for publishing to `topic`.
pub(crate) fn encode(topic: &str, message: Message, persistent: bool) -> Result<Encoded> {
    let (uuid, metadata, payload, key) = message.into_parts();
    let mut properties = BasicProperties::default();
    if persistent {
        properties = properties.with_delivery_mode(2);
    }
    let mut headers = FieldTable::default();
    let mut has_headers = false;
    match ShortString::try_new(&*uuid) {
        Ok(id) => properties = properties.with_message_id(id),
        Err(_) => {
            headers.insert(
                UUID_HEADER.into(),
                AMQPValue::LongString(uuid.as_bytes().into()),
            );
            has_headers = true;
        }
    }
    let mut routing_key = ShortString::default();
    if let Some(key) = key {
        if let Ok(text) = std::str::from_utf8(&key) {
            if let Ok(rk) = ShortString::try_new(text) {
                routing_key = rk;
            }
        }
        headers.insert(
            KEY_HEADER.into(),
            AMQPValue::LongString(key.to_vec().into()),
        );
        has_headers = true;
    }
    for (name, value) in metadata.iter() {
        if name.starts_with("amqp.") && PROPERTY_KEYS.contains(&name) {
            properties = set_property(topic, &uuid, properties, name, value)?;
            continue;
        }
        let header = ShortString::try_new(name).map_err(|_| {
            Error::permanent(
                BROKER,
                topic,
                "publish",
                format!(
                    "message {uuid}: metadata key `{}…` is {} bytes, over AMQP's header name limit of {MAX_NAME_BYTES}",
                    &name[..name.floor_char_boundary(40)],
                    name.len()
                ),
            )
        })?;
        headers.insert(header, AMQPValue::LongString(value.into()));
        has_headers = true;
    }
    if has_headers {
        properties = properties.with_headers(headers);
    }
    Ok(Encoded {
        routing_key,
        properties,
        payload,
    })
}

fn set_property(
    topic: &str,
    uuid: &str,
    p: BasicProperties,
    name: &str,
    value: &str,
) -> Result<BasicProperties> {
    let invalid = |why: &str| {
        Error::permanent(
            BROKER,
            topic,
            "publish",
            format!("message {uuid}: metadata `{name}` = `{value}` {why}"),
        )
    };
    let short = || {
        ShortString::try_new(value)
            .map_err(|_| invalid(&format!("is longer than {MAX_NAME_BYTES} bytes")))
    };
    Ok(match name {
        "amqp.content-type" => p.with_content_type(short()?),
        "amqp.content-encoding" => p.with_content_encoding(short()?),
        "amqp.correlation-id" => p.with_correlation_id(short()?),
        "amqp.reply-to" => p.with_reply_to(short()?),
        "amqp.expiration" => p.with_expiration(short()?),
        "amqp.type" => p.with_type(short()?),
        "amqp.app-id" => p.with_app_id(short()?),
        "amqp.user-id" => p.with_user_id(short()?),
        "amqp.timestamp" => p.with_timestamp(
            value
                .parse()
                .map_err(|_| invalid("is not a timestamp (seconds since 1970)"))?,
        ),
        "amqp.priority" => p.with_priority(
            value
                .parse()
                .map_err(|_| invalid("is not a priority (0 to 255)"))?,
        ),
        _ => p,
    })
}

/// A received message and what its headers say about earlier deliveries.
pub(crate) struct Decoded {
    pub(crate) message: Message,
    /// The message's uuid (shared with `message`).
    pub(crate) uuid: Arc<str>,
    /// Attempts before it was re-published by `nack_with_delay` (0 if it never was).
    pub(crate) attempt_base: u32,
    /// The quorum queue's count of earlier returns, if any.
    pub(crate) delivery_count: Option<u32>,
}

/// Decodes a delivery. `exchange` and `routing_key` only serve to derive a stable uuid for
/// messages that carry none.
pub(crate) fn decode(
    exchange: &str,
    routing_key: &str,
    properties: &BasicProperties,
    data: Vec<u8>,
) -> Decoded {
    let mut metadata = Metadata::new();
    let mut uuid: Option<Arc<str>> = None;
    let mut key: Option<Bytes> = None;
    let mut attempt_base = 0;
    let mut delivery_count = None;
    if let Some(headers) = properties.headers() {
        let delayed_death = headers
            .inner()
            .get("x-first-death-queue")
            .is_some_and(|q| value_text(q).contains(DELAY_QUEUE_MARKER));
        for (name, value) in headers {
            let name = name.as_str();
            match name {
                UUID_HEADER => {
                    if let Some(text) = value_utf8(value) {
                        uuid = Some(Arc::from(text));
                        continue;
                    }
                }
                KEY_HEADER => {
                    if let Some(bytes) = value_bytes(value) {
                        key = Some(Bytes::copy_from_slice(bytes));
                        continue;
                    }
                }
                ATTEMPT_HEADER => {
                    if let Some(n) = value_u32(value) {
                        attempt_base = n;
                        continue;
                    }
                }
                DELIVERY_COUNT_HEADER => {
                    if let Some(n) = value_u32(value) {
                        delivery_count = Some(n);
                        continue;
                    }
                }
                "x-death" => {
                    // Drop the traces of our own delay queues; keep any others.
                    if let AMQPValue::FieldArray(deaths) = value {
                        let kept: Vec<&AMQPValue> = deaths
                            .as_slice()
                            .iter()
                            .filter(|d| !is_delay_death(d))
                            .collect();
                        if kept.is_empty() {
                            continue;
                        }
                        let json =
                            serde_json::Value::Array(kept.into_iter().map(to_json).collect());
                        metadata.set(name, json);
                        continue;
                    }
                }
                _ if delayed_death && name.starts_with("x-first-death-") => continue,
                _ if name.starts_with("x-last-death-")
                    && headers
                        .inner()
                        .get("x-last-death-queue")
                        .is_some_and(|q| value_text(q).contains(DELAY_QUEUE_MARKER)) =>
                {
                    continue
                }
                _ => {}
            }
            insert_value(&mut metadata, name, value);
        }
    }
    properties_to_metadata(properties, &mut metadata);
    let uuid = uuid
        .or_else(|| {
            properties
                .message_id()
                .as_ref()
                .filter(|id| !id.as_str().is_empty())
                .map(|id| Arc::from(id.as_str()))
        })
        .unwrap_or_else(|| {
            let ts = properties.timestamp().unwrap_or(0).to_be_bytes();
            stable_uuid(&[
                b"amqp",
                exchange.as_bytes(),
                routing_key.as_bytes(),
                &ts,
                &data,
            ])
        });
    let mut message = Message::with_uuid(uuid.clone(), data).with_metadata_map(metadata);
    message.set_key(key);
    Decoded {
        message,
        uuid,
        attempt_base,
        delivery_count,
    }
}

fn properties_to_metadata(p: &BasicProperties, md: &mut Metadata) {
    let pairs: [(&str, &Option<ShortString>); 8] = [
        ("amqp.content-type", p.content_type()),
        ("amqp.content-encoding", p.content_encoding()),
        ("amqp.correlation-id", p.correlation_id()),
        ("amqp.reply-to", p.reply_to()),
        ("amqp.expiration", p.expiration()),
        ("amqp.type", p.kind()),
        ("amqp.app-id", p.app_id()),
        ("amqp.user-id", p.user_id()),
    ];
    for (name, value) in pairs {
        if let Some(value) = value {
            md.set(name, value.as_str());
        }
    }
    if let Some(ts) = p.timestamp() {
        md.set("amqp.timestamp", ts);
    }
    if let Some(priority) = p.priority() {
        md.set("amqp.priority", priority);
    }
}

fn is_delay_death(death: &AMQPValue) -> bool {
    match death {
        AMQPValue::FieldTable(t) => t
            .inner()
            .get("queue")
            .is_some_and(|q| value_text(q).contains(DELAY_QUEUE_MARKER)),
        _ => false,
    }
}

/// Stores one header as metadata (see the module docs).
fn insert_value(md: &mut Metadata, name: &str, value: &AMQPValue) {
    match value {
        AMQPValue::LongString(s) => insert_header_bytes(md, name, s.as_bytes()),
        AMQPValue::ByteArray(b) => insert_header_bytes(md, name, b.as_slice()),
        AMQPValue::ShortString(s) => md.set(name, s.as_str()),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => md.set(name, to_json(value)),
        other => md.set(name, scalar_text(other)),
    }
}

fn value_utf8(v: &AMQPValue) -> Option<&str> {
    match v {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

fn value_bytes(v: &AMQPValue) -> Option<&[u8]> {
    match v {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        AMQPValue::ByteArray(b) => Some(b.as_slice()),
        _ => None,
    }
}

fn value_u32(v: &AMQPValue) -> Option<u32> {
    let n: i128 = match v {
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Timestamp(n) => (*n).into(),
        other => value_utf8(other)?.parse().ok()?,
    };
    u32::try_from(n).ok()
}

fn value_text(v: &AMQPValue) -> String {
    match value_utf8(v) {
        Some(text) => text.to_owned(),
        None => scalar_text(v),
    }
}

fn scalar_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        AMQPValue::Timestamp(t) => t.to_string(),
        AMQPValue::DecimalValue(d) => decimal_text(d.value, d.scale),
        AMQPValue::Void => String::new(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ByteArray(_) | AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => {
            to_json(v).to_string()
        }
    }
}

/// `value × 10^-scale` in decimal notation (`12345`, scale 2 → `123.45`).
fn decimal_text(value: u32, scale: u8) -> String {
    let digits = value.to_string();
    let scale = usize::from(scale);
    if scale == 0 {
        return digits;
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    let mut out = String::with_capacity(padded.len() + 1);
    let _ = write!(out, "{int}.{frac}");
    out
}

/// A header value as JSON: strings that are not UTF-8 and byte arrays become base64 text.
fn to_json(v: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Timestamp(n) => (*n).into(),
        AMQPValue::Float(f) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number)
        }
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => Value::String(decimal_text(d.value, d.scale)),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => Value::String(text.to_owned()),
            Err(_) => Value::String(base64::engine::general_purpose::STANDARD.encode(s.as_bytes())),
        },
        AMQPValue::ByteArray(b) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b.as_slice()))
        }
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(to_json).collect())
        }
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), to_json(v)))
                .collect(),
        ),
        AMQPValue::Void => Value::Null,
    }
}

/// Properties for re-publishing a received message to a delay queue: the original ones,
/// with the attempt count so far, and the uuid pinned in `message-id` (a derived uuid
/// would otherwise change with the exchange the message comes back through).
pub(crate) fn redelivery_properties(
    mut properties: BasicProperties,
    uuid: &str,
    attempt: u32,
) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        ATTEMPT_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(attempt)),
    );
    if properties.message_id().is_none() {
        match ShortString::try_new(uuid) {
            Ok(id) => properties = properties.with_message_id(id),
            Err(_) => {
                headers.insert(
                    UUID_HEADER.into(),
                    AMQPValue::LongString(LongString::from(uuid)),
                );
            }
        }
    }
    properties.with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{DecimalValue, FieldArray};

    fn round_trip(m: Message) -> (Encoded, Decoded) {
        let e = encode("t", m, true).unwrap();
        let d = decode(
            "t",
            e.routing_key.as_str(),
            &e.properties,
            e.payload.to_vec(),
        );
        (e, d)
    }

    #[test]
    fn messages_round_trip_unchanged() {
        let m = Message::new(vec![0u8, 0xff, 0xfe, b'x'])
            .with_metadata("greeting", "héllo wörld ✓")
            .with_metadata("index", 7)
            .with_metadata("amqp.content-type", "application/json")
            .with_metadata("amqp.priority", 3)
            .with_metadata("amqp.timestamp", 1_700_000_000u64)
            .with_key("customer-42");
        let (e, d) = round_trip(m.clone());
        assert_eq!(d.message, m);
        assert_eq!(e.routing_key.as_str(), "customer-42");
        assert_eq!(e.properties.delivery_mode(), &Some(2));
        assert_eq!(
            e.properties.message_id().as_ref().map(ShortString::as_str),
            Some(m.uuid())
        );
        assert_eq!(
            e.properties
                .content_type()
                .as_ref()
                .map(ShortString::as_str),
            Some("application/json")
        );
        assert_eq!(d.attempt_base, 0);
        assert_eq!(d.delivery_count, None);
    }

    #[test]
    fn binary_keys_and_long_uuids_survive() {
        let long_uuid = "u".repeat(300);
        let m = Message::with_uuid(long_uuid.as_str(), "p").with_key([0xffu8, 0x00, 0x80]);
        let (e, d) = round_trip(m.clone());
        assert_eq!(d.message, m);
        assert_eq!(e.routing_key.as_str(), "", "a binary key is no routing key");
        assert!(e.properties.message_id().is_none());
    }

    #[test]
    fn invalid_property_metadata_is_an_error_naming_it() {
        let m = Message::new("x").with_metadata("amqp.priority", "high");
        let err = encode("orders", m, true).err().unwrap().to_string();
        assert!(
            err.contains("amqp.priority") && err.contains("orders"),
            "{err}"
        );
        let m = Message::new("x").with_metadata("k".repeat(300), "v");
        let err = encode("orders", m, true).err().unwrap().to_string();
        assert!(err.contains("255"), "{err}");
    }

    #[test]
    fn foreign_messages_get_stable_uuids_and_typed_headers_as_text() {
        let mut headers = FieldTable::default();
        headers.insert(
            "bin".into(),
            AMQPValue::LongString(vec![0xffu8, 0x00].into()),
        );
        headers.insert("n".into(), AMQPValue::LongInt(-5));
        headers.insert("flag".into(), AMQPValue::Boolean(true));
        headers.insert(
            "price".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 1999,
            }),
        );
        headers.insert(
            "list".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongString("a".into()),
                AMQPValue::LongLongInt(2),
            ])),
        );
        let props = BasicProperties::default().with_headers(headers);
        let a = decode("ex", "rk", &props, b"body".to_vec());
        let b = decode("ex", "rk", &props, b"body".to_vec());
        let c = decode("ex", "rk", &props, b"other".to_vec());
        assert_eq!(a.message.uuid(), b.message.uuid(), "stable");
        assert_ne!(a.message.uuid(), c.message.uuid());
        let md = a.message.metadata();
        assert_eq!(md.get("bin.b64"), Some("/wA="));
        assert_eq!(md.get("n"), Some("-5"));
        assert_eq!(md.get("flag"), Some("true"));
        assert_eq!(md.get("price"), Some("19.99"));
        assert_eq!(md.get("list"), Some(r#"["a",2]"#));
        assert_eq!(a.message.key(), None);
    }

    #[test]
    fn delayed_redeliveries_keep_uuid_and_count_and_lose_delay_traces() {
        let original = BasicProperties::default();
        let uuid = "0190c1d2-0000-7000-8000-000000000001";
        let mut props = redelivery_properties(original, uuid, 3);
        // What RabbitMQ adds when the delay queue dead-letters the message back.
        let mut death = FieldTable::default();
        death.insert(
            "queue".into(),
            AMQPValue::LongString("q.tidemill-delay-1000ms".into()),
        );
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        headers.insert(
            "x-first-death-queue".into(),
            AMQPValue::LongString("q.tidemill-delay-1000ms".into()),
        );
        headers.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString("expired".into()),
        );
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        props = props.with_headers(headers);
        let d = decode("", "q", &props, b"x".to_vec());
        assert_eq!(d.message.uuid(), uuid);
        assert_eq!(d.attempt_base, 3);
        assert_eq!(d.delivery_count, Some(2));
        assert!(
            d.message.metadata().is_empty(),
            "{:?}",
            d.message.metadata()
        );
    }

    #[test]
    fn decimals_render_with_their_scale() {
        assert_eq!(decimal_text(5, 3), "0.005");
        assert_eq!(decimal_text(12345, 0), "12345");
        assert_eq!(decimal_text(12345, 2), "123.45");
    }
}
