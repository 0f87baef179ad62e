//! Messages to AMQP and back (the crate docs, "Messages on the wire", say it for users).
//!
//! Publishing a message that carries no [`AmqpEnvelope`]:
//! - uuid → where [`UuidCarrier`] says;
//! - key → `tidemill-key` header (any bytes), and the routing key when it is UTF-8 and at
//!   most 255 bytes;
//! - metadata → long-string headers, except the `amqp.*` keys of [`PROPERTY_KEYS`], which
//!   set the AMQP property of that name.
//!
//! Publishing a message that carries an envelope starts from the envelope (properties, typed
//! headers, delivery mode, routing key) and applies what the application changed in the
//! string view.
//!
//! Receiving: every header becomes metadata (text as is; a value that is not UTF-8 as
//! base64 under `<name>.b64`; numbers, booleans, timestamps, decimals as text; tables and
//! arrays as JSON), every set property its `amqp.*` key; the envelope keeps the rest.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use lapin::BasicProperties;
use tidemill_core::headers::{stable_uuid, BINARY_SUFFIX, KEY_HEADER};
use tidemill_core::{new_uuid, Error, Message, Metadata, Native, NativeEntry, Result};

use crate::config::{UuidCarrier, MAX_NAME_BYTES};
use crate::native::{AmqpEnvelope, Props};
use crate::BROKER;

/// Header of a message `nack_with_delay` parked in a delay queue: a table with the attempt
/// count so far, the uuid, and the exchange, routing key and expiration of the original
/// delivery. Trusted only on a message that a delay queue of the consuming queue
/// dead-lettered back (see [`decode`]); anywhere else it is an ordinary header.
pub(crate) const REDELIVERY_HEADER: &str = "tidemill-redelivery";

/// Header RabbitMQ quorum queues set on redeliveries: how often the message was returned.
pub(crate) const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// Marks the queues `nack_with_delay` parks messages in.
pub(crate) const DELAY_QUEUE_MARKER: &str = ".tidemill-delay-";

/// Metadata keys that map to AMQP basic properties instead of headers.
pub const PROPERTY_KEYS: [&str; 11] = [
    "amqp.content-type",
    "amqp.content-encoding",
    "amqp.correlation-id",
    "amqp.reply-to",
    "amqp.expiration",
    "amqp.message-id",
    "amqp.type",
    "amqp.app-id",
    "amqp.user-id",
    "amqp.timestamp",
    "amqp.priority",
];

fn is_property_key(name: &str) -> bool {
    name.starts_with("amqp.") && PROPERTY_KEYS.contains(&name)
}

/// A message ready for `basic.publish`.
pub(crate) struct Encoded {
    pub(crate) routing_key: ShortString,
    pub(crate) properties: BasicProperties,
    pub(crate) payload: Bytes,
    /// The message's uuid, to name it in errors.
    pub(crate) uuid: Arc<str>,
}

/// Encodes `message` for publishing to `topic`.
pub(crate) fn encode(
    topic: &str,
    message: Message,
    persistent: bool,
    carrier: &UuidCarrier,
) -> Result<Encoded> {
    let native = message.native().filter(|n| n.broker() == BROKER).cloned();
    let (uuid, metadata, payload, key) = message.into_parts();
    let envelope = native.as_ref().and_then(Native::get::<AmqpEnvelope>);
    let (props, routing_key) = match (native.as_ref(), envelope) {
        (Some(native), Some(envelope)) => {
            encode_native(topic, &uuid, &metadata, key, native, envelope, carrier)?
        }
        _ => encode_fresh(topic, &uuid, &metadata, key, persistent, carrier)?,
    };
    Ok(Encoded {
        routing_key,
        properties: props.into_basic(),
        payload,
        uuid,
    })
}

fn encode_fresh(
    topic: &str,
    uuid: &Arc<str>,
    metadata: &Metadata,
    key: Option<Bytes>,
    persistent: bool,
    carrier: &UuidCarrier,
) -> Result<(Props, ShortString)> {
    let mut props = Props::default();
    if persistent {
        props.delivery_mode = Some(2);
    }
    let mut headers = BTreeMap::new();
    let mut routing_key = ShortString::default();
    if let Some(key) = key {
        routing_key = routing_key_for(&key);
        headers.insert(
            KEY_HEADER.into(),
            AMQPValue::LongString(key.to_vec().into()),
        );
    }
    for (name, value) in metadata.iter() {
        if is_property_key(name) {
            set_property(topic, uuid, &mut props, name, value)?;
        } else {
            headers.insert(
                header_name(topic, uuid, name)?,
                AMQPValue::LongString(value.into()),
            );
        }
    }
    place_uuid(topic, uuid, &mut props, &mut headers, carrier, true)?;
    if !headers.is_empty() {
        props.headers = Some(headers);
    }
    Ok((props, routing_key))
}

/// Starts from what was received and applies the application's changes.
fn encode_native(
    topic: &str,
    uuid: &Arc<str>,
    metadata: &Metadata,
    key: Option<Bytes>,
    native: &Native,
    envelope: &AmqpEnvelope,
    carrier: &UuidCarrier,
) -> Result<(Props, ShortString)> {
    let mut props = Props::from_basic(&envelope.properties);
    let had_headers = props.headers.is_some();
    let mut headers = props.headers.take().unwrap_or_default();
    for name in &envelope.broker_headers {
        headers.remove(name);
    }
    for (md_key, header) in &envelope.header_sources {
        match native.entry(metadata, md_key) {
            NativeEntry::Kept => {}
            NativeEntry::Removed => {
                headers.remove(header);
            }
            NativeEntry::Changed(value) => {
                change_header(topic, uuid, &mut headers, header, md_key, value)?;
            }
        }
    }
    let received = native.metadata();
    for name in PROPERTY_KEYS {
        if !received.contains_key(name) {
            continue;
        }
        match native.entry(metadata, name) {
            NativeEntry::Kept => {}
            NativeEntry::Removed => clear_property(&mut props, name),
            NativeEntry::Changed(value) => set_property(topic, uuid, &mut props, name, value)?,
        }
    }
    for (name, value) in native.added(metadata) {
        if is_property_key(name) {
            set_property(topic, uuid, &mut props, name, value)?;
        } else {
            headers.insert(
                header_name(topic, uuid, name)?,
                AMQPValue::LongString(value.into()),
            );
        }
    }
    let routing_key = if key == envelope.key {
        envelope.routing_key.clone()
    } else {
        match key {
            Some(key) => {
                headers.insert(
                    KEY_HEADER.into(),
                    AMQPValue::LongString(key.to_vec().into()),
                );
                routing_key_for(&key)
            }
            None => {
                headers.remove(KEY_HEADER);
                ShortString::default()
            }
        }
    };
    place_uuid(topic, uuid, &mut props, &mut headers, carrier, false)?;
    if had_headers || !headers.is_empty() {
        props.headers = Some(headers);
    }
    Ok((props, routing_key))
}

/// Puts the uuid where `carrier` says, unless it is there already. A fresh message (no
/// envelope) in Tidemill's convention gets it in `message_id`; an enveloped one keeps its
/// properties and gets the uuid header when nothing carries the uuid yet.
fn place_uuid(
    topic: &str,
    uuid: &str,
    props: &mut Props,
    headers: &mut BTreeMap<ShortString, AMQPValue>,
    carrier: &UuidCarrier,
    fresh: bool,
) -> Result<()> {
    let message_id = props.message_id.as_ref().map(ShortString::as_str);
    match carrier.header() {
        Some(header) => {
            let carried = match headers.get(header) {
                Some(value) => value_utf8(value) == Some(uuid),
                None => message_id == Some(uuid),
            };
            if carried {
                return Ok(());
            }
            if fresh && *carrier == UuidCarrier::Tidemill && message_id.is_none() {
                if let Ok(id) = ShortString::try_new(uuid) {
                    props.message_id = Some(id);
                    return Ok(());
                }
            }
            headers.insert(
                ShortString::try_new(header).map_err(|_| too_long(topic, uuid, header))?,
                AMQPValue::LongString(uuid.into()),
            );
        }
        None => {
            if message_id != Some(uuid) {
                let id = ShortString::try_new(uuid).map_err(|_| {
                    Error::permanent(
                        BROKER,
                        topic,
                        "publish",
                        format!(
                            "message uuid `{}…` is {} bytes, over the {MAX_NAME_BYTES} bytes \
                             the message_id property holds (message_uuid = \"message_id\")",
                            head(uuid, 40),
                            uuid.len()
                        ),
                    )
                })?;
                props.message_id = Some(id);
            }
        }
    }
    Ok(())
}

fn too_long(topic: &str, uuid: &str, name: &str) -> Error {
    Error::permanent(
        BROKER,
        topic,
        "publish",
        format!(
            "message {uuid}: metadata key `{}…` is {} bytes, over AMQP's header name limit of \
             {MAX_NAME_BYTES}",
            head(name, 40),
            name.len()
        ),
    )
}

fn header_name(topic: &str, uuid: &str, name: &str) -> Result<ShortString> {
    ShortString::try_new(name).map_err(|_| too_long(topic, uuid, name))
}

/// The routing key for a message key: the key when it is UTF-8 and fits, else empty.
fn routing_key_for(key: &[u8]) -> ShortString {
    std::str::from_utf8(key)
        .ok()
        .and_then(|text| ShortString::try_new(text).ok())
        .unwrap_or_default()
}

/// Applies a changed string-view value to the header it showed, keeping the header's type
/// where the new text is a value of that type.
fn change_header(
    topic: &str,
    uuid: &str,
    headers: &mut BTreeMap<ShortString, AMQPValue>,
    header: &ShortString,
    md_key: &str,
    value: &str,
) -> Result<()> {
    let old = headers.get(header);
    let new = if md_key != header.as_str() {
        // `<name>.b64`: base64 of a binary value.
        match base64::engine::general_purpose::STANDARD.decode(value) {
            Ok(bytes) => match old {
                Some(AMQPValue::ByteArray(_)) => AMQPValue::ByteArray(bytes.into()),
                _ => AMQPValue::LongString(bytes.into()),
            },
            Err(_) => {
                headers.remove(header);
                headers.insert(
                    header_name(topic, uuid, md_key)?,
                    AMQPValue::LongString(value.into()),
                );
                return Ok(());
            }
        }
    } else {
        retyped(old, value)
    };
    headers.insert(header.clone(), new);
    Ok(())
}

/// `text` as a value of `old`'s type if it parses as one, else a long string.
fn retyped(old: Option<&AMQPValue>, text: &str) -> AMQPValue {
    let parsed = match old {
        Some(AMQPValue::Boolean(_)) => text.parse().ok().map(AMQPValue::Boolean),
        Some(AMQPValue::ShortShortInt(_)) => text.parse().ok().map(AMQPValue::ShortShortInt),
        Some(AMQPValue::ShortShortUInt(_)) => text.parse().ok().map(AMQPValue::ShortShortUInt),
        Some(AMQPValue::ShortInt(_)) => text.parse().ok().map(AMQPValue::ShortInt),
        Some(AMQPValue::ShortUInt(_)) => text.parse().ok().map(AMQPValue::ShortUInt),
        Some(AMQPValue::LongInt(_)) => text.parse().ok().map(AMQPValue::LongInt),
        Some(AMQPValue::LongUInt(_)) => text.parse().ok().map(AMQPValue::LongUInt),
        Some(AMQPValue::LongLongInt(_)) => text.parse().ok().map(AMQPValue::LongLongInt),
        Some(AMQPValue::Float(_)) => text.parse().ok().map(AMQPValue::Float),
        Some(AMQPValue::Double(_)) => text.parse().ok().map(AMQPValue::Double),
        Some(AMQPValue::Timestamp(_)) => text.parse().ok().map(AMQPValue::Timestamp),
        Some(AMQPValue::ByteArray(_)) => Some(AMQPValue::ByteArray(text.as_bytes().into())),
        _ => None,
    };
    parsed.unwrap_or_else(|| AMQPValue::LongString(text.into()))
}

fn set_property(topic: &str, uuid: &str, p: &mut Props, name: &str, value: &str) -> Result<()> {
    let invalid = |why: &str| {
        Error::permanent(
            BROKER,
            topic,
            "publish",
            format!("message {uuid}: metadata `{name}` = `{value}` {why}"),
        )
    };
    match name {
        "amqp.timestamp" => {
            p.timestamp = Some(
                value
                    .parse()
                    .map_err(|_| invalid("is not a timestamp (seconds since 1970)"))?,
            );
        }
        "amqp.priority" => {
            p.priority = Some(
                value
                    .parse()
                    .map_err(|_| invalid("is not a priority (0 to 255)"))?,
            );
        }
        _ => {
            if let Some(slot) = p.text_property(name) {
                *slot = Some(
                    ShortString::try_new(value)
                        .map_err(|_| invalid(&format!("is longer than {MAX_NAME_BYTES} bytes")))?,
                );
            }
        }
    }
    Ok(())
}

fn clear_property(p: &mut Props, name: &str) {
    match name {
        "amqp.timestamp" => p.timestamp = None,
        "amqp.priority" => p.priority = None,
        _ => {
            if let Some(slot) = p.text_property(name) {
                *slot = None;
            }
        }
    }
}

/// A delivery as lapin hands it over, minus the acker.
pub(crate) struct Incoming {
    pub(crate) exchange: ShortString,
    pub(crate) routing_key: ShortString,
    pub(crate) redelivered: bool,
    pub(crate) delivery_tag: u64,
    pub(crate) properties: BasicProperties,
    pub(crate) data: Vec<u8>,
}

/// Where a delivery was consumed.
pub(crate) struct QueueContext<'a> {
    pub(crate) queue: &'a Arc<str>,
    /// A quorum queue: its `x-delivery-count` on a redelivery is the broker's.
    pub(crate) quorum: bool,
    pub(crate) carrier: &'a UuidCarrier,
}

/// A received message and what is known about its earlier deliveries.
pub(crate) struct Decoded {
    /// The message, with its [`AmqpEnvelope`] attached.
    pub(crate) message: Message,
    pub(crate) uuid: Arc<str>,
    /// Deliveries before the message was last parked by `nack_with_delay` (0 if never).
    pub(crate) hop_attempt: u32,
    /// The quorum queue's count of earlier deliveries (only when the broker set it).
    pub(crate) delivery_count: Option<u32>,
    /// Identifies the message across redeliveries of one queue, for counting attempts on
    /// classic queues: the uuid when the message carries one, else a digest of its content.
    pub(crate) tracking: Arc<str>,
}

/// Tidemill's bookkeeping of a delayed redelivery, read from a trusted
/// [`REDELIVERY_HEADER`].
struct Hop {
    attempt: u32,
    uuid: Option<Arc<str>>,
    exchange: ShortString,
    routing_key: ShortString,
    expiration: Option<ShortString>,
    no_headers: bool,
}

/// Decodes a delivery from `ctx.queue`.
///
/// The [`REDELIVERY_HEADER`] is trusted only when the delivery is what a delay queue of
/// this queue dead-letters back: through the default exchange with the queue's name as
/// routing key, and the newest `x-death` entry (which RabbitMQ writes on dead-lettering)
/// naming a delay queue of this queue with reason `expired`. A message a producer publishes
/// to the topic's exchange never looks like that, whatever headers it sets. Likewise
/// `x-delivery-count` counts only on a redelivery from a quorum queue (RabbitMQ sets it
/// then, replacing whatever the producer wrote).
pub(crate) fn decode(ctx: &QueueContext<'_>, incoming: Incoming) -> Decoded {
    let Incoming {
        exchange,
        routing_key,
        redelivered,
        delivery_tag,
        properties,
        data,
    } = incoming;
    let mut properties = properties;
    let hop = trusted_hop(ctx.queue, &exchange, &routing_key, headers_of(&properties));
    if let Some(hop) = &hop {
        // Only a message back from a delay queue is rebuilt; any other is kept as lapin
        // read it.
        let mut props = Props::from_basic(&properties);
        let mut headers = props.headers.take().unwrap_or_default();
        remove_delay_traces(ctx.queue, &mut headers);
        props.expiration = hop.expiration.clone();
        props.headers = (!hop.no_headers || !headers.is_empty()).then_some(headers);
        properties = props.into_basic();
    }
    let headers = headers_of(&properties);
    let mut broker_headers = Vec::new();
    let delivery_count = if ctx.quorum && redelivered {
        let count = headers.get(DELIVERY_COUNT_HEADER).and_then(value_u32);
        if count.is_some() {
            broker_headers.push(ShortString::from(DELIVERY_COUNT_HEADER));
        }
        count
    } else {
        None
    };

    // Identity.
    let uuid_header = ctx.carrier.header().filter(|h| {
        headers
            .get(*h)
            .and_then(value_utf8)
            .is_some_and(|v| !v.is_empty())
    });
    let message_id = properties
        .message_id()
        .as_ref()
        .map(ShortString::as_str)
        .filter(|id| !id.is_empty());
    let message_id_is_uuid = uuid_header.is_none() && message_id.is_some();
    let carried: Option<Arc<str>> = match uuid_header {
        Some(h) => headers.get(h).and_then(value_utf8).map(Arc::from),
        None => message_id.map(Arc::from),
    };
    let hop_uuid = hop.as_ref().and_then(|h| h.uuid.clone());
    let (uuid, tracked_by_uuid) = match hop_uuid.or(carried) {
        Some(uuid) => (uuid, true),
        None => (new_uuid(), false),
    };
    let key = headers
        .get(KEY_HEADER)
        .and_then(value_bytes)
        .map(Bytes::copy_from_slice);

    // The string view.
    let mut metadata = Metadata::new();
    let mut sources = Vec::new();
    let shown = |name: &str| {
        !(Some(name) == uuid_header
            || (name == KEY_HEADER && key.is_some())
            || broker_headers.iter().any(|b| b.as_str() == name))
    };
    let mut binary = Vec::new();
    for (name, value) in headers {
        if !shown(name.as_str()) {
            continue;
        }
        match value {
            AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
                Ok(text) => metadata.set(name.as_str(), text),
                Err(_) => {
                    binary.push((name, s.as_bytes()));
                    continue;
                }
            },
            AMQPValue::ByteArray(b) => match std::str::from_utf8(b.as_slice()) {
                Ok(text) => metadata.set(name.as_str(), text),
                Err(_) => {
                    binary.push((name, b.as_slice()));
                    continue;
                }
            },
            AMQPValue::ShortString(s) => metadata.set(name.as_str(), s.as_str()),
            AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => {
                metadata.set(name.as_str(), to_json(value))
            }
            other => metadata.set(name.as_str(), scalar_text(other)),
        }
        sources.push((name.as_str().to_owned(), name.clone()));
    }
    // Binary values under `<name>.b64`, unless a header of that very name took the key.
    for (name, bytes) in binary {
        let md_key = format!("{}{BINARY_SUFFIX}", name.as_str());
        if metadata.contains_key(&md_key) {
            continue;
        }
        metadata.set(
            md_key.as_str(),
            base64::engine::general_purpose::STANDARD.encode(bytes),
        );
        sources.push((md_key, name.clone()));
    }
    properties_to_metadata(&properties, message_id_is_uuid, &mut metadata);

    let (exchange, routing_key) = match &hop {
        Some(hop) => (hop.exchange.clone(), hop.routing_key.clone()),
        None => (exchange, routing_key),
    };
    let tracking = if tracked_by_uuid {
        uuid.clone()
    } else {
        stable_uuid(&[
            b"amqp-delivery",
            exchange.as_str().as_bytes(),
            routing_key.as_str().as_bytes(),
            format!("{properties:?}").as_bytes(),
            &data,
        ])
    };
    let hop_attempt = hop.as_ref().map_or(0, |h| h.attempt);
    let envelope = AmqpEnvelope {
        exchange,
        routing_key,
        redelivered: redelivered || hop.is_some(),
        delivery_tag,
        queue: ctx.queue.clone(),
        properties,
        delivery_count,
        key: key.clone(),
        header_sources: sources,
        broker_headers,
    };
    let native = Native::new(BROKER, envelope, &metadata);
    let mut message = Message::with_uuid(uuid.clone(), data)
        .with_metadata_map(metadata)
        .with_native(native);
    message.set_key(key);
    Decoded {
        message,
        uuid,
        hop_attempt,
        delivery_count,
        tracking,
    }
}

/// The properties of a copy parked in a delay queue by `nack_with_delay`: the message as
/// received (without the headers the broker added on delivery), its `expiration` moved
/// into the [`REDELIVERY_HEADER`] (RabbitMQ would expire it early, and drops it on
/// dead-lettering), plus that header with the attempt count, uuid and where it was
/// published.
pub(crate) fn parked_properties(
    envelope: &AmqpEnvelope,
    uuid: &str,
    attempt: u32,
) -> BasicProperties {
    let mut props = Props::from_basic(&envelope.properties);
    let expiration = props.expiration.take();
    let no_headers = props.headers.is_none();
    let headers = props.headers_mut();
    for name in &envelope.broker_headers {
        headers.remove(name);
    }
    let mut hop = BTreeMap::new();
    hop.insert(
        ShortString::from("attempt"),
        AMQPValue::LongLongInt(i64::from(attempt)),
    );
    hop.insert(
        ShortString::from("uuid"),
        AMQPValue::LongString(uuid.into()),
    );
    hop.insert(
        ShortString::from("exchange"),
        AMQPValue::LongString(envelope.exchange.as_str().into()),
    );
    hop.insert(
        ShortString::from("routing-key"),
        AMQPValue::LongString(envelope.routing_key.as_str().into()),
    );
    if let Some(expiration) = expiration {
        hop.insert(
            ShortString::from("expiration"),
            AMQPValue::LongString(expiration.as_str().into()),
        );
    }
    if no_headers {
        hop.insert(ShortString::from("no-headers"), AMQPValue::Boolean(true));
    }
    headers.insert(
        REDELIVERY_HEADER.into(),
        AMQPValue::FieldTable(FieldTable::from(hop)),
    );
    props.into_basic()
}

fn trusted_hop(
    queue: &str,
    exchange: &ShortString,
    routing_key: &ShortString,
    headers: &BTreeMap<ShortString, AMQPValue>,
) -> Option<Hop> {
    if !exchange.as_str().is_empty() || routing_key.as_str() != queue {
        return None;
    }
    let Some(AMQPValue::FieldArray(deaths)) = headers.get("x-death") else {
        return None;
    };
    let Some(AMQPValue::FieldTable(newest)) = deaths.as_slice().first() else {
        return None;
    };
    let field = |name: &str| newest.inner().get(name).and_then(value_utf8);
    if field("reason") != Some("expired")
        || !field("queue").is_some_and(|q| is_delay_queue_of(q, queue))
    {
        return None;
    }
    let Some(AMQPValue::FieldTable(hop)) = headers.get(REDELIVERY_HEADER) else {
        return None;
    };
    let hop = hop.inner();
    let text = |name: &str| hop.get(name).and_then(value_utf8);
    let short = |name: &str| text(name).and_then(|t| ShortString::try_new(t).ok());
    Some(Hop {
        attempt: hop.get("attempt").and_then(value_u32)?,
        uuid: text("uuid").filter(|u| !u.is_empty()).map(Arc::from),
        exchange: short("exchange").unwrap_or_default(),
        routing_key: short("routing-key").unwrap_or_default(),
        expiration: short("expiration"),
        no_headers: matches!(hop.get("no-headers"), Some(AMQPValue::Boolean(true))),
    })
}

/// Removes what a trusted delay hop left: the bookkeeping header, the delay queues'
/// `x-death` entries, and `x-first-death-*` / `x-last-death-*` naming a delay queue.
fn remove_delay_traces(queue: &str, headers: &mut BTreeMap<ShortString, AMQPValue>) {
    headers.remove(REDELIVERY_HEADER);
    let ours = |v: Option<&AMQPValue>| {
        v.and_then(value_utf8)
            .is_some_and(|q| is_delay_queue_of(q, queue))
    };
    if let Some(AMQPValue::FieldArray(deaths)) = headers.get("x-death") {
        let kept: Vec<AMQPValue> = deaths
            .as_slice()
            .iter()
            .filter(|d| match d {
                AMQPValue::FieldTable(t) => !ours(t.inner().get("queue")),
                _ => true,
            })
            .cloned()
            .collect();
        if kept.is_empty() {
            headers.remove("x-death");
        } else {
            headers.insert(
                "x-death".into(),
                AMQPValue::FieldArray(FieldArray::from(kept)),
            );
        }
    }
    for prefix in ["x-first-death-", "x-last-death-"] {
        if ours(headers.get(format!("{prefix}queue").as_str())) {
            for field in ["queue", "reason", "exchange"] {
                headers.remove(format!("{prefix}{field}").as_str());
            }
        }
    }
}

/// `{queue}.tidemill-delay-{ms}ms`, or a name derived from a hash when that is too long.
pub(crate) fn delay_queue_name(queue: &str, ms: u32) -> String {
    let name = format!("{queue}{DELAY_QUEUE_MARKER}{ms}ms");
    if name.len() <= MAX_NAME_BYTES {
        return name;
    }
    format!(
        "tidemill{DELAY_QUEUE_MARKER}{ms}ms-{}",
        stable_uuid(&[queue.as_bytes()])
    )
}

/// Whether `name` is a delay queue of `queue`.
pub(crate) fn is_delay_queue_of(name: &str, queue: &str) -> bool {
    let Some((_, rest)) = name.rsplit_once(DELAY_QUEUE_MARKER) else {
        return false;
    };
    let Some(end) = rest.find("ms") else {
        return false;
    };
    match rest[..end].parse::<u32>() {
        Ok(ms) => delay_queue_name(queue, ms) == name,
        Err(_) => false,
    }
}

/// The headers of `p` (an empty table if it has none).
fn headers_of(p: &BasicProperties) -> &BTreeMap<ShortString, AMQPValue> {
    static NONE: BTreeMap<ShortString, AMQPValue> = BTreeMap::new();
    p.headers().as_ref().map_or(&NONE, FieldTable::inner)
}

fn properties_to_metadata(p: &BasicProperties, message_id_is_uuid: bool, md: &mut Metadata) {
    let message_id = if message_id_is_uuid {
        &None
    } else {
        p.message_id()
    };
    let pairs: [(&str, &Option<ShortString>); 9] = [
        ("amqp.content-type", p.content_type()),
        ("amqp.content-encoding", p.content_encoding()),
        ("amqp.correlation-id", p.correlation_id()),
        ("amqp.reply-to", p.reply_to()),
        ("amqp.expiration", p.expiration()),
        ("amqp.message-id", message_id),
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

pub(crate) fn value_utf8(v: &AMQPValue) -> Option<&str> {
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

/// The uuid a returned (unroutable) message carries, as [`decode`] would read it.
pub(crate) fn returned_uuid(properties: &BasicProperties, carrier: &UuidCarrier) -> Option<String> {
    let from_header = carrier.header().and_then(|h| {
        properties
            .headers()
            .as_ref()
            .and_then(|t| t.inner().get(h))
            .and_then(value_utf8)
            .filter(|v| !v.is_empty())
    });
    from_header
        .or_else(|| {
            properties
                .message_id()
                .as_ref()
                .map(ShortString::as_str)
                .filter(|id| !id.is_empty())
        })
        .map(str::to_owned)
}

/// The longest start of `s` that is at most `max` bytes and ends on a character boundary
/// (for quoting long names in errors).
fn head(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {

    #[test]
    fn quoted_heads_end_on_a_character_boundary() {
        assert_eq!(head("abcdef", 4), "abcd");
        assert_eq!(head("ab", 40), "ab");
        // 'é' is two bytes: three bytes hold one of them.
        assert_eq!(head("ééé", 3), "é");
    }

    use super::*;
    use lapin::types::DecimalValue;

    fn queue() -> Arc<str> {
        Arc::from("orders.billing")
    }

    fn incoming(props: BasicProperties, data: &[u8]) -> Incoming {
        Incoming {
            exchange: "orders".into(),
            routing_key: "rk".into(),
            redelivered: false,
            delivery_tag: 1,
            properties: props,
            data: data.to_vec(),
        }
    }

    fn dec(carrier: &UuidCarrier, quorum: bool, i: Incoming) -> Decoded {
        let q = queue();
        decode(
            &QueueContext {
                queue: &q,
                quorum,
                carrier,
            },
            i,
        )
    }

    fn round_trip(m: Message) -> (Encoded, Decoded) {
        let carrier = UuidCarrier::Tidemill;
        let e = encode("t", m, true, &carrier).unwrap();
        let i = Incoming {
            routing_key: e.routing_key.clone(),
            properties: e.properties.clone(),
            ..incoming(BasicProperties::default(), &e.payload)
        };
        let d = dec(&carrier, false, i);
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
        assert!(
            !e.properties
                .headers()
                .as_ref()
                .is_some_and(|h| h.contains_key("tidemill-uuid")),
            "message_id carries the uuid"
        );
        assert_eq!(d.hop_attempt, 0);
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
        let c = UuidCarrier::Tidemill;
        let m = Message::new("x").with_metadata("amqp.priority", "high");
        let err = encode("orders", m, true, &c).err().unwrap().to_string();
        assert!(
            err.contains("amqp.priority") && err.contains("orders"),
            "{err}"
        );
        let m = Message::new("x").with_metadata("k".repeat(300), "v");
        let err = encode("orders", m, true, &c).err().unwrap().to_string();
        assert!(err.contains("255"), "{err}");
        let m = Message::with_uuid("u".repeat(300), "x");
        let err = encode("orders", m, true, &UuidCarrier::MessageId)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("message_id"), "{err}");
    }

    #[test]
    fn id_less_messages_get_distinct_uuids_and_typed_headers_as_text() {
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
        let c = UuidCarrier::Tidemill;
        let a = dec(&c, false, incoming(props.clone(), b"body"));
        let b = dec(&c, false, incoming(props.clone(), b"body"));
        assert_ne!(a.message.uuid(), b.message.uuid(), "never the same uuid");
        assert_eq!(a.tracking, b.tracking, "but the same tracking digest");
        let md = a.message.metadata();
        assert_eq!(md.get("bin.b64"), Some("/wA="));
        assert_eq!(md.get("n"), Some("-5"));
        assert_eq!(md.get("flag"), Some("true"));
        assert_eq!(md.get("price"), Some("19.99"));
        assert_eq!(md.get("list"), Some(r#"["a",2]"#));
        assert_eq!(a.message.key(), None);
        let envelope = AmqpEnvelope::of(&a.message).unwrap();
        assert_eq!(envelope.routing_key(), "rk");
        assert_eq!(envelope.exchange(), "orders");
        assert_eq!(envelope.headers(), props.headers().as_ref());
    }

    #[test]
    fn a_literal_header_wins_over_a_derived_b64_name() {
        let mut headers = FieldTable::default();
        headers.insert("trace".into(), AMQPValue::LongString(vec![0xffu8].into()));
        headers.insert("trace.b64".into(), AMQPValue::LongString("text".into()));
        let props = BasicProperties::default().with_headers(headers);
        let d = dec(&UuidCarrier::Tidemill, false, incoming(props, b""));
        assert_eq!(d.message.metadata().get("trace.b64"), Some("text"));
        assert_eq!(d.message.metadata().len(), 1);
    }

    #[test]
    fn spoofed_counts_are_ordinary_headers() {
        let mut headers = FieldTable::default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongInt(7));
        let mut hop = FieldTable::default();
        hop.insert("attempt".into(), AMQPValue::LongLongInt(9));
        headers.insert(REDELIVERY_HEADER.into(), AMQPValue::FieldTable(hop));
        let props = BasicProperties::default().with_headers(headers);
        // Classic queue, or a first delivery from a quorum queue: not the broker's count.
        for quorum in [false, true] {
            let d = dec(
                &UuidCarrier::Tidemill,
                quorum,
                incoming(props.clone(), b"x"),
            );
            assert_eq!((d.hop_attempt, d.delivery_count), (0, None));
            assert_eq!(d.message.metadata().get("x-delivery-count"), Some("7"));
            assert!(d.message.metadata().contains_key(REDELIVERY_HEADER));
        }
        // A redelivery from a quorum queue: the broker's.
        let d = dec(
            &UuidCarrier::Tidemill,
            true,
            Incoming {
                redelivered: true,
                ..incoming(props.clone(), b"x")
            },
        );
        assert_eq!(d.delivery_count, Some(7));
        assert!(!d.message.metadata().contains_key("x-delivery-count"));
    }

    /// What RabbitMQ makes of a parked copy when its delay queue dead-letters it back.
    fn dead_lettered(props: BasicProperties, delay_queue: &str, q: &str) -> Incoming {
        let mut death = FieldTable::default();
        death.insert("queue".into(), AMQPValue::LongString(delay_queue.into()));
        death.insert("reason".into(), AMQPValue::LongString("expired".into()));
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        headers.insert(
            "x-first-death-queue".into(),
            AMQPValue::LongString(delay_queue.into()),
        );
        headers.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString("expired".into()),
        );
        headers.insert(
            "x-first-death-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        Incoming {
            exchange: "".into(),
            routing_key: q.into(),
            redelivered: false,
            delivery_tag: 9,
            properties: props.with_headers(headers),
            data: b"x".to_vec(),
        }
    }

    #[test]
    fn a_parked_message_comes_back_as_it_was_with_its_count() {
        let c = UuidCarrier::Tidemill;
        let original = BasicProperties::default()
            .with_delivery_mode(1)
            .with_expiration("60000".into());
        let first = dec(&c, false, incoming(original.clone(), b"x"));
        let envelope = AmqpEnvelope::of(&first.message).unwrap();
        let parked = parked_properties(envelope, first.message.uuid(), 3);
        assert!(parked.expiration().is_none(), "would expire early");
        let q = queue();
        let back = dec(
            &c,
            false,
            dead_lettered(parked, &delay_queue_name(&q, 1000), &q),
        );
        assert_eq!(back.hop_attempt, 3);
        assert_eq!(
            back.message.uuid(),
            first.message.uuid(),
            "id-less: uuid pinned"
        );
        assert_eq!(back.message.metadata(), first.message.metadata());
        let again = AmqpEnvelope::of(&back.message).unwrap();
        assert_eq!(again.properties(), &original, "no traces left");
        assert_eq!((again.exchange(), again.routing_key()), ("orders", "rk"));
        assert!(again.redelivered());
        // The same header from somewhere else is not trusted.
        let forged = dead_lettered(
            parked_properties(envelope, "u", 3),
            "elsewhere.tidemill-delay-1000ms",
            &q,
        );
        let d = dec(&c, false, forged);
        assert_eq!(d.hop_attempt, 0);
        let mut via_topic = dead_lettered(
            parked_properties(envelope, "u", 3),
            &delay_queue_name(&q, 1000),
            &q,
        );
        via_topic.exchange = "orders".into();
        assert_eq!(dec(&c, false, via_topic).hop_attempt, 0);
    }

    #[test]
    fn a_republish_applies_only_what_the_application_changed() {
        let c = UuidCarrier::Tidemill;
        let headers = FieldTable::from(BTreeMap::from([
            (ShortString::from("count"), AMQPValue::LongInt(42)),
            (ShortString::from("flag"), AMQPValue::Boolean(false)),
            (ShortString::from("gone"), AMQPValue::LongString("x".into())),
            (
                ShortString::from("blob"),
                AMQPValue::ByteArray(vec![0xffu8].into()),
            ),
            (ShortString::from("kept"), AMQPValue::Double(0.5)),
        ]));
        let sent = BasicProperties::default()
            .with_headers(headers)
            .with_delivery_mode(1)
            .with_message_id("m-1".into())
            .with_type("Old".into())
            .with_app_id("producer".into());
        let d = dec(&c, false, incoming(sent.clone(), b"body"));
        // Unchanged: the very same properties and routing key.
        let e = encode("out", d.message.clone(), true, &c).unwrap();
        assert_eq!(e.properties, sent);
        assert_eq!(e.routing_key.as_str(), "rk");
        // Changed, removed, added.
        let mut m = d.message;
        let md = m.metadata_mut();
        md.set("count", "43");
        md.set("flag", "not a bool");
        md.remove("gone");
        md.set("blob.b64", "AAE=");
        md.set("amqp.type", "New");
        md.remove("amqp.app-id");
        md.set("added", "1");
        let e = encode("out", m, true, &c).unwrap();
        let h = e.properties.headers().clone().unwrap();
        let get = |k: &str| h.inner().get(k).cloned();
        assert_eq!(get("count"), Some(AMQPValue::LongInt(43)), "type kept");
        assert_eq!(
            get("flag"),
            Some(AMQPValue::LongString("not a bool".into()))
        );
        assert_eq!(get("gone"), None);
        assert_eq!(get("blob"), Some(AMQPValue::ByteArray(vec![0u8, 1].into())));
        assert_eq!(get("kept"), Some(AMQPValue::Double(0.5)));
        assert_eq!(get("added"), Some(AMQPValue::LongString("1".into())));
        assert_eq!(
            e.properties.kind().as_ref().map(ShortString::as_str),
            Some("New")
        );
        assert_eq!(e.properties.app_id(), &None);
        assert_eq!(e.properties.delivery_mode(), &Some(1), "delivery mode kept");
        assert_eq!(
            e.properties.message_id().as_ref().map(ShortString::as_str),
            Some("m-1")
        );
        assert_eq!(e.routing_key.as_str(), "rk");
    }

    #[test]
    fn a_changed_key_sets_routing_key_and_key_header() {
        let c = UuidCarrier::Tidemill;
        let d = dec(&c, false, incoming(BasicProperties::default(), b"x"));
        let id_less = d.message.uuid().to_owned();
        let e = encode("out", d.message.clone(), true, &c).unwrap();
        let h = e.properties.headers().clone().unwrap();
        assert_eq!(
            h.inner().get("tidemill-uuid"),
            Some(&AMQPValue::LongString(id_less.as_str().into())),
            "the uuid header is added to an id-less message, nothing else"
        );
        assert_eq!(h.inner().len(), 1);
        assert_eq!(e.properties.message_id(), &None);
        let mut m = d.message;
        m.set_key(Some(Bytes::from_static(b"new-key")));
        let e = encode("out", m, true, &c).unwrap();
        assert_eq!(e.routing_key.as_str(), "new-key");
        assert!(e
            .properties
            .headers()
            .as_ref()
            .unwrap()
            .contains_key(KEY_HEADER));
    }

    #[test]
    fn delay_queues_are_recognised() {
        assert!(is_delay_queue_of("q.tidemill-delay-100ms", "q"));
        assert!(!is_delay_queue_of("q.tidemill-delay-100ms", "p"));
        assert!(!is_delay_queue_of("qq.tidemill-delay-100ms", "q"));
        let long = "q".repeat(250);
        assert!(is_delay_queue_of(&delay_queue_name(&long, 5), &long));
        assert!(!is_delay_queue_of(&delay_queue_name(&long, 5), "q"));
    }

    #[test]
    fn decimals_render_with_their_scale() {
        assert_eq!(decimal_text(5, 3), "0.005");
        assert_eq!(decimal_text(12345, 0), "12345");
        assert_eq!(decimal_text(12345, 2), "123.45");
    }
}
