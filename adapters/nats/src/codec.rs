//! Messages to NATS headers and payloads, and back.
//!
//! - Metadata entries become headers. NATS header values cannot hold CR or LF, clients
//!   trim whitespace around them, and header names must be printable ASCII without `:`.
//!   A metadata value (or name) that would not survive unchanged travels as an RFC 2047
//!   style encoded word, `=?utf-8?b?BASE64?=`, and the message then carries the header
//!   `tidemill-encoding: b-words`; only on such a message are encoded words decoded on
//!   receipt (and a value that merely looks like one is sent encoded too). Headers of
//!   other clients arrive as sent, whatever they look like.
//! - The uuid travels as [`UuidHeader`] says (default: `Nats-Msg-Id: {uuid}.{hash}`).
//! - The key travels in `tidemill-key` (`tidemill-key.b64`, base64, when it is not UTF-8).
//! - Received headers are read from the raw header block (see [`crate::wire`]): every
//!   line in order, any bytes. The string view takes the last value of a repeated name and
//!   puts a non-UTF-8 value base64-encoded under `{name}.b64`; the [`NatsRecord`] keeps
//!   them all.
//! - Publishing a message that carries a [`NatsRecord`] writes the record's headers, with
//!   only what the application changed in the string view applied.

use std::borrow::Cow;
use std::sync::Arc;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use tidemill_core::headers::{
    insert_header_bytes, stable_uuid, BINARY_SUFFIX, KEY_HEADER, UUID_HEADER,
};
use tidemill_core::{Error, Message, Metadata, Native, NativeEntry, Result};

use crate::config::UuidHeader;
use crate::record::{NatsRecord, RawHeader};
use crate::wire::WireMsg;
use crate::BROKER;

/// JetStream's message id header.
pub(crate) const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// The key header when the key is not UTF-8.
pub(crate) const KEY_B64_HEADER: &str = "tidemill-key.b64";
/// Watermill's uuid header.
pub(crate) const WATERMILL_UUID_HEADER: &str = "_watermill_message_uuid";
/// Present (with [`ENCODING_VALUE`]) when the message holds encoded words to decode.
pub(crate) const ENCODING_HEADER: &str = "tidemill-encoding";
const ENCODING_VALUE: &str = "b-words";

const WORD_PREFIX: &str = "=?utf-8?b?";
const WORD_SUFFIX: &str = "?=";
/// `NATS/1.0\r\n` before the headers and `\r\n` after them.
const HEADER_FRAME: usize = 12;

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

/// A header name async-nats accepts and that arrives exactly as sent.
fn name_is_valid(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_graphic() && c != ':')
}

/// The identity settings of one publisher or subscriber.
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    mode: UuidHeader,
}

impl Identity {
    pub(crate) fn new(mode: UuidHeader) -> Self {
        Identity { mode }
    }

    /// The plain header carrying the bare uuid, if the mode has one.
    fn uuid_header(&self) -> Option<&str> {
        match &self.mode {
            UuidHeader::Tidemill | UuidHeader::NatsMsgId => None,
            UuidHeader::Watermill => Some(WATERMILL_UUID_HEADER),
            UuidHeader::Header(name) => Some(name),
        }
    }

    /// Names metadata may not use as they are (sent encoded instead).
    fn reserved(&self, name: &str) -> bool {
        matches!(
            name,
            UUID_HEADER | KEY_HEADER | KEY_B64_HEADER | ENCODING_HEADER
        ) || self.uuid_header() == Some(name)
    }
}

/// How the headers go out: as an async-nats map when it can express them exactly
/// (repeated names keep their order; the order of different names does not survive),
/// else as a raw header block.
pub(crate) enum Outgoing {
    Map(HeaderMap),
    Raw(Bytes),
}

/// A message ready to publish.
pub(crate) struct Encoded {
    pub headers: Outgoing,
    pub payload: Bytes,
}

fn header_error(topic: &str, uuid: &str, what: &str) -> Error {
    Error::permanent(
        BROKER,
        topic,
        "encode headers",
        format!("message {uuid}: {what} is not a valid NATS header"),
    )
}

/// Header lines being built (name, value bytes), in order.
#[derive(Default)]
struct Lines {
    status: Option<Bytes>,
    /// Name, value, and whether the line is a received one written back as it was.
    lines: Vec<(Bytes, Bytes, bool)>,
    encoded: bool,
    /// Received lines are literal (their message held no encoded words).
    literal_received: bool,
}

impl Lines {
    fn push(&mut self, name: impl Into<Bytes>, value: impl Into<Bytes>) {
        self.lines.push((name.into(), value.into(), false));
    }

    /// A received line, as it was.
    fn push_received(&mut self, h: &RawHeader) {
        self.lines.push((h.name.clone(), h.value.clone(), true));
    }

    /// A metadata entry, encoded as needed.
    fn push_entry(&mut self, identity: &Identity, k: &str, v: &str) {
        let name = if name_is_valid(k) && !is_word(k) && !identity.reserved(k) {
            k.to_owned()
        } else {
            self.encoded = true;
            encode_word(k)
        };
        let value = if value_is_plain(v) {
            v.to_owned()
        } else {
            self.encoded = true;
            encode_word(v)
        };
        self.push(name, value);
    }

    fn size(&self) -> usize {
        HEADER_FRAME
            + self.status.as_ref().map_or(0, |s| s.len())
            + self
                .lines
                .iter()
                .map(|(n, v, _)| n.len() + v.len() + 4)
                .sum::<usize>()
    }

    fn finish(mut self) -> Outgoing {
        if self.encoded {
            // Receivers will decode encoded words: received lines that merely look like
            // one are sent encoded, so they arrive as they are.
            for (n, v, received) in &mut self.lines {
                if !*received || !self.literal_received {
                    continue;
                }
                for part in [&mut *n, &mut *v] {
                    if let Ok(text) = std::str::from_utf8(part) {
                        if is_word(text) {
                            *part = Bytes::from(encode_word(text));
                        }
                    }
                }
            }
            self.push(ENCODING_HEADER, ENCODING_VALUE);
        }
        let expressible = self.status.is_none()
            && self.lines.iter().all(|(n, v, _)| {
                std::str::from_utf8(n).is_ok_and(name_is_valid)
                    && std::str::from_utf8(v).is_ok_and(|v| {
                        !v.contains(['\r', '\n'])
                            && !v.starts_with([' ', '\t'])
                            && !v.ends_with([' ', '\t'])
                    })
            });
        if expressible {
            let mut map = HeaderMap::new();
            for (n, v, _) in self.lines {
                let (Ok(n), Ok(v)) = (std::str::from_utf8(&n), std::str::from_utf8(&v)) else {
                    continue;
                };
                if let Ok(name) = HeaderName::try_from(n) {
                    map.append(name, HeaderValue::from(v));
                }
            }
            return Outgoing::Map(map);
        }
        let mut block = BytesMut::with_capacity(self.size());
        block.put_slice(b"NATS/1.0");
        if let Some(status) = &self.status {
            block.put_u8(b' ');
            block.put_slice(status);
        }
        block.put_slice(b"\r\n");
        for (n, v, _) in &self.lines {
            block.put_slice(n);
            block.put_slice(b": ");
            block.put_slice(v);
            block.put_slice(b"\r\n");
        }
        block.put_slice(b"\r\n");
        Outgoing::Raw(block.freeze())
    }
}

/// Encodes `message` for `topic`, sent on `subject`; fails when it would exceed
/// `max_payload` bytes (payload plus headers, the server's limit).
pub(crate) fn encode(
    message: &Message,
    topic: &str,
    subject: &str,
    max_payload: usize,
    identity: &Identity,
) -> Result<Encoded> {
    if let Some(native) = message.native().filter(|n| n.broker() == BROKER) {
        if let Some(record) = native.get::<NatsRecord>() {
            return encode_native(
                message,
                topic,
                subject,
                max_payload,
                identity,
                native,
                record,
            );
        }
    }
    encode_plain(message, topic, subject, max_payload, identity)
}

fn too_large(message: &Message, topic: &str, total: usize, limit: usize) -> Error {
    Error::MessageTooLarge {
        broker: BROKER,
        topic: topic.to_owned(),
        uuid: message.uuid().to_owned(),
        size: total,
        limit,
    }
}

/// A message built by the application: the fast path, straight into an async-nats map.
fn encode_plain(
    message: &Message,
    topic: &str,
    subject: &str,
    max_payload: usize,
    identity: &Identity,
) -> Result<Encoded> {
    let mut headers = HeaderMap::new();
    let mut size = HEADER_FRAME;
    let uuid = message.uuid();
    let mut encoded = false;
    let mut insert = |headers: &mut HeaderMap, name: HeaderName, value: Cow<'_, str>| {
        // Values come out of `encode_value`, which leaves no CR or LF (the only characters
        // `HeaderValue` refuses); checked again here so that its conversion cannot panic.
        if value.contains(['\r', '\n']) {
            return Err(header_error(topic, uuid, "a value"));
        }
        let value = HeaderValue::from(value.into_owned());
        let name_str: &str = name.as_ref();
        size += name_str.len() + value.as_str().len() + 4;
        headers.append(name, value);
        Ok(())
    };
    let metadata = message.metadata();
    for (k, v) in metadata.iter() {
        let name = if name_is_valid(k) && !is_word(k) && !identity.reserved(k) {
            HeaderName::try_from(k)
        } else {
            encoded = true;
            HeaderName::try_from(encode_word(k))
        }
        .map_err(|_| header_error(topic, uuid, "a name"))?;
        let value = if value_is_plain(v) {
            Cow::Borrowed(v)
        } else {
            encoded = true;
            Cow::Owned(encode_word(v))
        };
        insert(&mut headers, name, value)?;
    }
    let key_value = key_header(message.key(), &mut encoded);
    let ids = identity_headers(message, subject, identity, &mut encoded);
    if encoded {
        insert(
            &mut headers,
            HeaderName::from_static(ENCODING_HEADER),
            Cow::Borrowed(ENCODING_VALUE),
        )?;
    }
    for (name, value) in ids.into_iter().flatten() {
        let name =
            HeaderName::try_from(name.as_ref()).map_err(|_| header_error(topic, uuid, "a name"))?;
        insert(&mut headers, name, value)?;
    }
    if let Some((name, value)) = key_value {
        insert(&mut headers, HeaderName::from_static(name), value)?;
    }
    let total = message.payload().len() + size;
    if total > max_payload {
        return Err(too_large(message, topic, total, max_payload));
    }
    Ok(Encoded {
        headers: Outgoing::Map(headers),
        payload: message.payload().clone(),
    })
}

/// The key header of `key`.
fn key_header(
    key: Option<&Bytes>,
    encoded: &mut bool,
) -> Option<(&'static str, Cow<'static, str>)> {
    let key = key?;
    Some(match std::str::from_utf8(key) {
        Ok(text) if value_is_plain(text) => (KEY_HEADER, Cow::Owned(text.to_owned())),
        Ok(text) => {
            *encoded = true;
            (KEY_HEADER, Cow::Owned(encode_word(text)))
        }
        Err(_) => (KEY_B64_HEADER, Cow::Owned(STANDARD.encode(key))),
    })
}

/// The headers carrying `message`'s uuid, as the identity mode says (when the metadata
/// sets `Nats-Msg-Id` itself, that one is sent and the uuid goes in `tidemill-uuid`).
/// Sets `encoded` when a value had to be sent as an encoded word.
fn identity_headers(
    message: &Message,
    subject: &str,
    identity: &Identity,
    encoded: &mut bool,
) -> [Option<(Cow<'static, str>, Cow<'static, str>)>; 2] {
    let uuid = message.uuid();
    let own_msg_id = message.metadata().contains_key(MSG_ID_HEADER);
    let mut value = |v: &str| -> Cow<'static, str> {
        if value_is_plain(v) {
            Cow::Owned(v.to_owned())
        } else {
            *encoded = true;
            Cow::Owned(encode_word(v))
        }
    };
    match &identity.mode {
        UuidHeader::Tidemill | UuidHeader::NatsMsgId if own_msg_id => {
            [Some((UUID_HEADER.into(), value(uuid))), None]
        }
        UuidHeader::NatsMsgId => [Some((MSG_ID_HEADER.into(), value(uuid))), None],
        UuidHeader::Tidemill => [
            Some((MSG_ID_HEADER.into(), message_id(message, subject, encoded))),
            None,
        ],
        UuidHeader::Watermill | UuidHeader::Header(_) => {
            let name = identity.uuid_header().unwrap_or(UUID_HEADER).to_owned();
            let bare = Some((name.into(), value(uuid)));
            let id = (!own_msg_id)
                .then(|| (MSG_ID_HEADER.into(), message_id(message, subject, encoded)));
            [bare, id]
        }
    }
}

/// The `Nats-Msg-Id` Tidemill writes for `message` sent on `subject`: `{uuid}.{hash}` (16
/// lowercase hex digits of [`content_hash`]), as a header value (an encoded word when the
/// uuid is not plain).
fn message_id(message: &Message, subject: &str, encoded: &mut bool) -> Cow<'static, str> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let uuid = message.uuid();
    let hash = content_hash(
        uuid,
        Some(subject.as_bytes()),
        message.metadata(),
        message.key(),
        message.payload(),
    );
    let mut id = String::with_capacity(uuid.len() + 17);
    id.push_str(uuid);
    id.push('.');
    let mut hex = [0u8; 16];
    for (i, digit) in hex.iter_mut().enumerate() {
        *digit = HEX[((hash >> ((15 - i) * 4)) & 0xf) as usize];
    }
    id.push_str(std::str::from_utf8(&hex).unwrap_or_default());
    // A uuid of printable ASCII without spaces (any standard one) is plain as it is.
    let plain = uuid.bytes().all(|b| b.is_ascii_graphic()) && !is_word(&id);
    if plain || value_is_plain(&id) {
        Cow::Owned(id)
    } else {
        *encoded = true;
        Cow::Owned(encode_word(&id))
    }
}

/// A message carrying a [`NatsRecord`]: the record's headers with the application's
/// changes applied.
fn encode_native(
    message: &Message,
    topic: &str,
    subject: &str,
    max_payload: usize,
    identity: &Identity,
    native: &Native,
    record: &NatsRecord,
) -> Result<Encoded> {
    let metadata = message.metadata();
    let uuid_kept = record.uuid.as_deref() == Some(message.uuid());
    let key_kept = record.key.as_ref() == message.key();
    let mut lines = Lines {
        status: record.status_line.clone(),
        encoded: record.encoded,
        literal_received: !record.encoded,
        ..Lines::default()
    };
    let mut changed_done: Vec<&str> = Vec::new();
    let mut has_uuid = false;
    // Nothing the application did shows in the headers: the received block can go out
    // as it was.
    let mut untouched = uuid_kept && key_kept;
    for (h, role) in record.headers.iter().zip(record.roles.iter()) {
        match role {
            Role::View(view_key) => match native.entry(metadata, view_key) {
                NativeEntry::Kept => lines.push_received(h),
                NativeEntry::Removed => untouched = false,
                NativeEntry::Changed(new) => {
                    untouched = false;
                    if changed_done.contains(&view_key.as_str()) {
                        continue;
                    }
                    changed_done.push(view_key);
                    match view_key.strip_suffix(BINARY_SUFFIX) {
                        Some(_) if h.value_str().is_none() => match STANDARD.decode(new) {
                            Ok(bytes) => lines.push(h.name.clone(), bytes),
                            Err(_) => lines.push_entry(identity, view_key, new),
                        },
                        _ => match h.name_str() {
                            Some(name) if name == view_key => lines.push_entry(identity, name, new),
                            _ => lines.push_entry(identity, view_key, new),
                        },
                    }
                }
            },
            Role::Opaque => lines.push_received(h),
            Role::Uuid => {
                has_uuid = true;
                if uuid_kept {
                    lines.push_received(h);
                } else {
                    lines.push(h.name.clone(), Bytes::from(message.uuid().to_owned()));
                }
            }
            Role::OwnMsgId => {
                has_uuid = true;
                let id = Bytes::from(message_id(message, subject, &mut lines.encoded).into_owned());
                untouched &= id == h.value;
                lines.push(h.name.clone(), id);
            }
            Role::Key => {
                if key_kept {
                    lines.push_received(h);
                }
            }
            Role::Dropped => {}
        }
    }
    for (k, v) in native.added(metadata) {
        untouched = false;
        lines.push_entry(identity, k, v);
    }
    let appended_from = lines.lines.len();
    if !has_uuid {
        let ids = identity_headers(message, subject, identity, &mut lines.encoded);
        for (name, value) in ids.into_iter().flatten() {
            lines.push(
                Bytes::from(name.into_owned()),
                Bytes::from(value.into_owned()),
            );
        }
    }
    if !key_kept {
        let mut encoded = false;
        if let Some((name, value)) = key_header(message.key(), &mut encoded) {
            lines.encoded |= encoded;
            lines.push(name, Bytes::from(value.into_owned()));
        }
    }
    let total = message.payload().len() + lines.size();
    if total > max_payload {
        return Err(too_large(message, topic, total, max_payload));
    }
    let headers = match &record.raw_headers {
        // A block the parsed lines do not reproduce (lines without `:`, folded lines,
        // other spacing): sent as received, with the uuid header appended if added.
        Some(raw) if untouched && !record.canonical && raw.ends_with(b"\r\n\r\n") => {
            let mut block = BytesMut::with_capacity(raw.len() + 64);
            block.put_slice(&raw[..raw.len() - 2]);
            for (n, v, _) in &lines.lines[appended_from..] {
                block.put_slice(n);
                block.put_slice(b": ");
                block.put_slice(v);
                block.put_slice(b"\r\n");
            }
            block.put_slice(b"\r\n");
            Outgoing::Raw(block.freeze())
        }
        _ => lines.finish(),
    };
    Ok(Encoded {
        headers,
        payload: message.payload().clone(),
    })
}

/// What a received header line became, for publishing the message again.
#[derive(Clone, Debug)]
pub(crate) enum Role {
    /// An entry of the string view, under this key.
    View(String),
    /// Not in the view (its name is not UTF-8): always published as received.
    Opaque,
    /// The header the uuid was read from (bare uuid).
    Uuid,
    /// Tidemill's `Nats-Msg-Id` (`{uuid}.{hash}`): written anew.
    OwnMsgId,
    /// The key header.
    Key,
    /// Tidemill's own bookkeeping (`tidemill-encoding`, a second uuid header): written
    /// anew when needed.
    Dropped,
}

/// Where a received message came from, for its record and a uuid when it carries none.
pub(crate) enum Origin<'a> {
    /// A JetStream delivery (its ack subject parsed, when it had one).
    Stream {
        stream: &'a str,
        ack: Option<AckInfo<'a>>,
    },
    /// A core NATS message.
    Subject,
}

/// The header lines of a raw header block: the status line's code and description, and
/// each `name: value` line (value trimmed of spaces and tabs; a line starting with a
/// space or tab continues the previous value; a line without `:` is kept only in the raw
/// block).
pub(crate) fn parse_header_block(block: &Bytes) -> (Option<Bytes>, Vec<RawHeader>) {
    let mut lines: Vec<RawHeader> = Vec::new();
    let mut at = 0;
    let mut status = None;
    let mut first = true;
    while at < block.len() {
        let end = find(&block[at..], b"\r\n").map_or(block.len(), |e| at + e);
        let line = block.slice(at..end);
        at = end + 2;
        if first {
            first = false;
            if let Some(rest) = line.strip_prefix(b"NATS/1.0") {
                let off = 8 + (rest.len() - rest.trim_ascii_start().len());
                let status_line = line.slice(off..);
                let status_line = status_line.slice(..status_line.trim_ascii_end().len());
                if !status_line.is_empty() {
                    status = Some(status_line);
                }
            }
            continue;
        }
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            if let Some(last) = lines.last_mut() {
                let mut joined = BytesMut::from(last.value());
                joined.put_u8(b' ');
                joined.put_slice(trim_ows(&line));
                *last = RawHeader::new(last.name.clone(), joined.freeze());
            }
            continue;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = line.slice(..colon);
        let value = &line[colon + 1..];
        let trimmed = trim_ows(value);
        let start = colon + 1 + (value.len() - trim_ows_start(value).len());
        let value = line.slice(start..start + trimmed.len());
        lines.push(RawHeader::new(name, value));
    }
    (status, lines)
}

fn trim_ows_start(v: &[u8]) -> &[u8] {
    let n = v.iter().take_while(|b| **b == b' ' || **b == b'\t').count();
    &v[n..]
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let v = trim_ows_start(v);
    let n = v
        .iter()
        .rev()
        .take_while(|b| **b == b' ' || **b == b'\t')
        .count();
    &v[..v.len() - n]
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a received message, attaching its [`NatsRecord`].
pub(crate) fn decode(msg: WireMsg, origin: Origin<'_>, identity: &Identity) -> Message {
    let (status, headers) = match &msg.headers {
        Some(block) => parse_header_block(block),
        None => (None, Vec::new()),
    };
    let decode_words = headers
        .iter()
        .any(|h| h.name() == ENCODING_HEADER.as_bytes() && h.value() == ENCODING_VALUE.as_bytes());
    let text = |b: &[u8]| -> Option<String> {
        let s = std::str::from_utf8(b).ok()?;
        Some(match decode_words.then(|| decode_word(s)).flatten() {
            Some(decoded) => decoded,
            None => s.to_owned(),
        })
    };
    let configured = identity.uuid_header();
    let mut roles: Vec<Role> = Vec::with_capacity(headers.len());
    let mut metadata = Metadata::new();
    // Uuid candidates: (index, value), by kind.
    let mut cfg_uuid: Option<(usize, String)> = None;
    let mut tm_uuid: Option<(usize, String)> = None;
    let mut wm_uuid: Option<(usize, String)> = None;
    let mut msg_id: Option<(usize, String)> = None;
    let mut key: Option<Bytes> = None;
    for (i, h) in headers.iter().enumerate() {
        let Some(raw_name) = h.name_str() else {
            roles.push(Role::Opaque);
            continue;
        };
        match raw_name {
            UUID_HEADER => {
                roles.push(Role::Dropped);
                tm_uuid = text(h.value()).map(|v| (i, v));
                continue;
            }
            KEY_HEADER => {
                roles.push(Role::Key);
                key = text(h.value()).map(Bytes::from);
                continue;
            }
            KEY_B64_HEADER => {
                if let Ok(bytes) = STANDARD.decode(h.value()) {
                    roles.push(Role::Key);
                    key = Some(Bytes::from(bytes));
                    continue;
                }
            }
            ENCODING_HEADER if decode_words => {
                roles.push(Role::Dropped);
                continue;
            }
            _ => {}
        }
        // Read once; a uuid candidate keeps a copy.
        let value = text(h.value());
        if Some(raw_name) == configured {
            cfg_uuid = value.clone().map(|v| (i, v));
        } else if raw_name == WATERMILL_UUID_HEADER {
            wm_uuid = value.clone().map(|v| (i, v));
        } else if raw_name == MSG_ID_HEADER {
            // An earlier id line enters the view now: this one is the candidate.
            if let Some((m, v)) = msg_id.take() {
                set_view(&roles, &mut metadata, m, v);
            }
            if let Some(v) = value {
                // Its view entry is set once the uuid is known, unless it is taken for the
                // uuid (most messages: no entry put into the view and taken out again).
                let name = text(h.name()).unwrap_or_else(|| raw_name.to_owned());
                msg_id = Some((i, v));
                roles.push(Role::View(name));
                continue;
            }
        }
        let name = text(h.name()).unwrap_or_else(|| raw_name.to_owned());
        let view_key = match value {
            Some(v) => {
                metadata.set(name.clone(), v);
                name
            }
            None => {
                insert_header_bytes(&mut metadata, &name, h.value());
                format!("{name}{BINARY_SUFFIX}")
            }
        };
        roles.push(Role::View(view_key));
    }
    // The uuid, and which header it came from (taken out of the view).
    let uuid: Arc<str> = if let Some((idx, uuid)) = cfg_uuid.clone().or(tm_uuid.clone()) {
        if cfg_uuid.is_some() {
            take(&mut roles, &mut metadata, idx, Role::Uuid);
            if let Some((t, _)) = &tm_uuid {
                roles[*t] = Role::Dropped;
            }
        } else {
            roles[idx] = Role::Uuid;
        }
        if let Some((m, id)) = &msg_id {
            if is_own_form(id, &uuid) {
                take(&mut roles, &mut metadata, *m, Role::OwnMsgId);
            }
        }
        uuid.into()
    } else if let Some(own) = msg_id.as_ref().and_then(|(m, id)| {
        // Hashed without the id's own entry (no copy of the metadata).
        let skip = match &roles[*m] {
            Role::View(k) => Some(k.as_str()),
            _ => None,
        };
        own_message_id(
            id,
            &msg.subject,
            &metadata,
            skip,
            key.as_ref(),
            &msg.payload,
        )
        .map(|u| (*m, Arc::<str>::from(u)))
    }) {
        take(&mut roles, &mut metadata, own.0, Role::OwnMsgId);
        own.1
    } else if let Some((idx, uuid)) = wm_uuid {
        take(&mut roles, &mut metadata, idx, Role::Uuid);
        if let Some((m, id)) = &msg_id {
            if is_own_form(id, &uuid) {
                take(&mut roles, &mut metadata, *m, Role::OwnMsgId);
            }
        }
        uuid.into()
    } else if let Some((idx, id)) = msg_id.take() {
        take(&mut roles, &mut metadata, idx, Role::Uuid);
        id.into()
    } else {
        derive_uuid(&msg, &origin)
    };
    // The id line, when it stays in the view.
    if let Some((m, v)) = msg_id {
        set_view(&roles, &mut metadata, m, v);
    }
    let ack = match &origin {
        Origin::Stream { ack, .. } => ack.as_ref(),
        Origin::Subject => None,
    };
    let canonical = match &msg.headers {
        None => true,
        Some(raw) => is_canonical(raw, status.as_deref(), &headers),
    };
    let record = NatsRecord {
        canonical,
        subject: match String::from_utf8_lossy(&msg.subject) {
            Cow::Borrowed(_) => msg.subject.clone(),
            Cow::Owned(lossy) => Bytes::from(lossy),
        },
        reply: msg.reply_str().and(msg.reply.clone()),
        stream: match &origin {
            Origin::Stream { stream, .. } => Some(match ack {
                Some(a) if a.stream == *stream => part_of(msg.reply.as_ref(), a.stream),
                _ => Bytes::copy_from_slice(stream.as_bytes()),
            }),
            Origin::Subject => None,
        },
        consumer: ack.map(|a| part_of(msg.reply.as_ref(), a.consumer)),
        domain: ack.and_then(|a| a.domain.map(|d| part_of(msg.reply.as_ref(), d))),
        stream_sequence: ack.map(|a| a.stream_sequence),
        consumer_sequence: ack.map(|a| a.consumer_sequence),
        num_delivered: ack.map(|a| a.delivered),
        num_pending: ack.map(|a| a.pending),
        timestamp_nanos: ack.map(|a| a.timestamp),
        status: status.as_ref().and_then(|s| {
            std::str::from_utf8(s.split(|b| *b == b' ').next()?)
                .ok()?
                .parse()
                .ok()
        }),
        description: status.as_ref().and_then(|s| {
            let text = std::str::from_utf8(s).ok()?;
            let (_, d) = text.split_once(' ')?;
            Some(d.trim().to_owned()).filter(|d| !d.is_empty())
        }),
        status_line: status,
        encoded: decode_words,
        headers,
        roles,
        raw_headers: msg.headers.clone(),
        uuid: Some(uuid.clone()),
        key: key.clone(),
    };
    if metadata.is_empty() {
        // An emptied map compares unequal to a fresh one (`Metadata`'s derived `Eq`).
        metadata = Metadata::new();
    }
    let native = Native::new(BROKER, record, &metadata);
    let mut message = Message::with_uuid(uuid, msg.payload)
        .with_metadata_map(metadata)
        .with_native(native);
    message.set_key(key);
    message
}

/// `part` as bytes: a slice of `whole` (no copy) when it lies within it, else a copy.
fn part_of(whole: Option<&Bytes>, part: &str) -> Bytes {
    match whole {
        Some(whole)
            if whole.as_ptr_range().start <= part.as_ptr()
                && part.as_bytes().as_ptr_range().end <= whole.as_ptr_range().end =>
        {
            whole.slice_ref(part.as_bytes())
        }
        _ => Bytes::copy_from_slice(part.as_bytes()),
    }
}

/// Whether `raw` is exactly the block the parsed status and lines give back (`NATS/1.0`,
/// ` {status}`, `\r\n`, each `name: value\r\n`, `\r\n`), compared piece by piece.
fn is_canonical(raw: &[u8], status: Option<&[u8]>, headers: &[RawHeader]) -> bool {
    let mut rest = raw;
    let mut eat = |piece: &[u8]| match rest.strip_prefix(piece) {
        Some(r) => {
            rest = r;
            true
        }
        None => false,
    };
    if !eat(b"NATS/1.0") {
        return false;
    }
    if let Some(st) = status {
        if !(eat(b" ") && eat(st)) {
            return false;
        }
    }
    if !eat(b"\r\n") {
        return false;
    }
    for h in headers {
        if !(eat(h.name()) && eat(b": ") && eat(h.value()) && eat(b"\r\n")) {
            return false;
        }
    }
    eat(b"\r\n") && rest.is_empty()
}

/// Sets the view entry of header `idx` (still a view entry) to `value`, unless a later line
/// has the same view key (the last line of a name is the view's value).
fn set_view(roles: &[Role], metadata: &mut Metadata, idx: usize, value: String) {
    if let Role::View(k) = &roles[idx] {
        if !roles[idx + 1..]
            .iter()
            .any(|r| matches!(r, Role::View(o) if o == k))
        {
            metadata.set(k.clone(), value);
        }
    }
}

/// Makes header `idx` play `role`, taking it out of the string view when it was the
/// view's value (the last line of its name).
fn take(roles: &mut [Role], metadata: &mut Metadata, idx: usize, role: Role) {
    if let Role::View(k) = &roles[idx] {
        let k = k.clone();
        if roles[idx + 1..]
            .iter()
            .all(|r| !matches!(r, Role::View(o) if *o == k))
        {
            metadata.remove(&k);
        }
    }
    roles[idx] = role;
}

/// Whether `id` is `{uuid}.{16 hex digits}`.
fn is_own_form(id: &str, uuid: &str) -> bool {
    id.strip_prefix(uuid)
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A 64-bit hash of the uuid, subject, metadata, key and payload, each length-prefixed:
/// what makes two publishes of one uuid the same message for JetStream's deduplication.
/// The subject is in it because a stream's duplicate window spans all of its subjects: a
/// message forwarded unchanged to another topic of the same stream is a new message, not a
/// retry. Eight bytes at a time with a final mix (it runs on every publish and every
/// delivery); stable across processes and versions (metadata iterates in key order). Not
/// meant to resist deliberate collisions: it tells apart messages that share a uuid.
/// `subject: None` is the hash of ids written before the subject was part of it.
fn content_hash(
    uuid: &str,
    subject: Option<&[u8]>,
    metadata: &Metadata,
    key: Option<&Bytes>,
    payload: &[u8],
) -> u64 {
    content_hash_skipping(uuid, subject, metadata, None, key, payload)
}

/// [`content_hash`] of `metadata` without its entry `skip`.
fn content_hash_skipping(
    uuid: &str,
    subject: Option<&[u8]>,
    metadata: &Metadata,
    skip: Option<&str>,
    key: Option<&Bytes>,
    payload: &[u8],
) -> u64 {
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
    if let Some(subject) = subject {
        feed(subject);
    }
    for (k, v) in metadata.iter() {
        if Some(k) == skip {
            continue;
        }
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
/// very content on `subject`, or of this content alone, as earlier versions wrote it);
/// `None` for any other message id.
fn own_message_id<'a>(
    id: &'a str,
    subject: &[u8],
    metadata: &Metadata,
    skip: Option<&str>,
    key: Option<&Bytes>,
    payload: &[u8],
) -> Option<&'a str> {
    let (uuid, hex) = id.rsplit_once('.')?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let hash = u64::from_str_radix(hex, 16).ok()?;
    [Some(subject), None]
        .into_iter()
        .any(|subject| hash == content_hash_skipping(uuid, subject, metadata, skip, key, payload))
        .then_some(uuid)
}

/// The uuid of a message that carries none: JetStream, from its stream and sequence
/// (`stable_uuid("nats", stream, sequence)`: the same on every redelivery, different for
/// every stored message); core NATS, from subject, header block and payload.
fn derive_uuid(msg: &WireMsg, origin: &Origin<'_>) -> Arc<str> {
    match origin {
        Origin::Stream {
            stream,
            ack: Some(ack),
        } => stable_uuid(&[
            b"nats",
            stream.as_bytes(),
            ack.stream_sequence.to_string().as_bytes(),
        ]),
        _ => stable_uuid(&[
            b"nats-core",
            &msg.subject,
            msg.headers.as_deref().unwrap_or_default(),
            &msg.payload,
        ]),
    }
}

/// What a JetStream ack subject tells about a delivery.
#[derive(Debug, PartialEq, Eq, Clone)]
pub(crate) struct AckInfo<'a> {
    pub domain: Option<&'a str>,
    pub stream: &'a str,
    pub consumer: &'a str,
    pub delivered: u64,
    pub stream_sequence: u64,
    pub consumer_sequence: u64,
    pub timestamp: u64,
    pub pending: u64,
}

/// Parses `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`,
/// or the newer form with `<domain>.<account hash>.` after `$JS.ACK.` (and more tokens at
/// the end).
pub(crate) fn parse_ack_subject(reply: &str) -> Option<AckInfo<'_>> {
    let rest = reply.strip_prefix("$JS.ACK.")?;
    // The first nine tokens and how many there are (no allocation per delivery).
    let mut tokens = [""; 9];
    let mut count = 0;
    for token in rest.split('.') {
        if let Some(t) = tokens.get_mut(count) {
            *t = token;
        }
        count += 1;
    }
    let base = match count {
        7 => 0,
        n if n >= 9 => 2,
        _ => return None,
    };
    Some(AckInfo {
        domain: (base == 2 && tokens[0] != "_").then(|| tokens[0]),
        stream: tokens[base],
        consumer: tokens[base + 1],
        delivered: tokens[base + 2].parse().ok()?,
        stream_sequence: tokens[base + 3].parse().ok()?,
        consumer_sequence: tokens[base + 4].parse().ok()?,
        timestamp: tokens[base + 5].parse().ok()?,
        pending: tokens[base + 6].parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tidemill() -> Identity {
        Identity::new(UuidHeader::Tidemill)
    }

    /// The header block a server would deliver for `out`.
    fn block(out: &Outgoing) -> Bytes {
        match out {
            Outgoing::Raw(b) => b.clone(),
            Outgoing::Map(map) => {
                let mut b = BytesMut::new();
                b.put_slice(b"NATS/1.0\r\n");
                for (name, values) in map.iter() {
                    for v in values {
                        b.put_slice(name.as_ref());
                        b.put_slice(b": ");
                        b.put_slice(v.as_str().as_bytes());
                        b.put_slice(b"\r\n");
                    }
                }
                b.put_slice(b"\r\n");
                b.freeze()
            }
        }
    }

    fn wire(headers: Option<Bytes>, payload: &'static [u8]) -> WireMsg {
        WireMsg {
            subject: Bytes::from_static(b"t"),
            reply: Some(Bytes::from_static(
                b"$JS.ACK.S.c.1.9.9.1700000000000000000.0",
            )),
            headers,
            payload: Bytes::from_static(payload),
        }
    }

    fn stream_origin(seq: u64) -> Origin<'static> {
        let reply: &'static str =
            Box::leak(format!("$JS.ACK.S.c.1.{seq}.{seq}.1700000000000000000.0").into_boxed_str());
        Origin::Stream {
            stream: "S",
            ack: parse_ack_subject(reply),
        }
    }

    fn round_trip_with(m: &Message, identity: &Identity) -> Message {
        let e = encode(m, "t", "t", 1 << 20, identity).unwrap();
        let msg = WireMsg {
            subject: Bytes::from_static(b"t"),
            reply: None,
            headers: Some(block(&e.headers)),
            payload: e.payload,
        };
        decode(msg, stream_origin(1), identity)
    }

    fn round_trip(m: &Message) -> Message {
        round_trip_with(m, &tidemill())
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
            m = m.with_metadata(format!("k{i}"), *v);
            m = m.with_metadata(*v, format!("as name {i}"));
        }
        for reserved in [UUID_HEADER, KEY_HEADER, KEY_B64_HEADER, ENCODING_HEADER] {
            m = m.with_metadata(reserved, "user value");
        }
        assert_eq!(round_trip(&m), m);
        let binary_key = Message::new("p").with_key([0xffu8, 0, 1]);
        assert_eq!(round_trip(&binary_key), binary_key);
        for uuid in [" padded uuid ", "line\nbreak", "=?utf-8?b?aGk=?="] {
            let odd = Message::with_uuid(uuid, "p");
            for identity in [tidemill(), Identity::new(UuidHeader::NatsMsgId)] {
                assert_eq!(
                    round_trip_with(&odd, &identity).uuid(),
                    uuid,
                    "{identity:?}"
                );
            }
        }
        for identity in [
            Identity::new(UuidHeader::Watermill),
            Identity::new(UuidHeader::NatsMsgId),
            Identity::new(UuidHeader::Header("x-id".into())),
        ] {
            assert_eq!(round_trip_with(&m, &identity), m, "{identity:?}");
        }
    }

    #[test]
    fn foreign_headers_arrive_as_sent() {
        let raw = Bytes::from_static(
            b"NATS/1.0\r\ntrace: =?utf-8?b?aGk=?=\r\n=?utf-8?b?aGk=?=: v\r\nbin: \xff\xfe\r\ndup: 1\r\ndup: 2\r\n\r\n",
        );
        let m = decode(wire(Some(raw.clone()), b"p"), stream_origin(3), &tidemill());
        assert_eq!(m.metadata().get("trace"), Some("=?utf-8?b?aGk=?="));
        assert_eq!(m.metadata().get("=?utf-8?b?aGk=?="), Some("v"));
        assert_eq!(m.metadata().get("bin.b64"), Some("//4="));
        assert_eq!(m.metadata().get("dup"), Some("2"));
        let record = NatsRecord::of(&m).unwrap();
        assert_eq!(record.values(b"dup").collect::<Vec<_>>(), vec![b"1", b"2"]);
        assert_eq!(record.stream_sequence(), Some(3));
        assert_eq!(record.raw_headers(), Some(&raw));
        // Republished unchanged: the same lines (and Tidemill's id added).
        let e = encode(&m, "t", "t", 1 << 20, &tidemill()).unwrap();
        let (_, lines) = parse_header_block(&block(&e.headers));
        let mut want: Vec<RawHeader> = record.headers().to_vec();
        want.push(lines.last().unwrap().clone());
        assert_eq!(lines, want);
        assert_eq!(lines.last().unwrap().name(), MSG_ID_HEADER.as_bytes());
    }

    #[test]
    fn a_handler_changes_only_what_it_changes() {
        let raw = Bytes::from_static(b"NATS/1.0\r\na: 1\r\na: 2\r\nb: x\r\nbin: \xff\r\nNats-Msg-Id: order-1-created\r\n\r\n");
        let mut m = decode(wire(Some(raw), b"p"), stream_origin(1), &tidemill());
        assert_eq!(m.uuid(), "order-1-created");
        m.metadata_mut().set("b", "y");
        m.metadata_mut().set("c", "=?utf-8?b?aGk=?=");
        let e = encode(&m, "t", "t", 1 << 20, &tidemill()).unwrap();
        let (_, lines) = parse_header_block(&block(&e.headers));
        let got: Vec<(&[u8], &[u8])> = lines.iter().map(|h| (h.name(), h.value())).collect();
        assert_eq!(
            got,
            vec![
                (&b"a"[..], &b"1"[..]),
                (b"a", b"2"),
                (b"b", b"y"),
                (b"bin", b"\xff"),
                (b"Nats-Msg-Id", b"order-1-created"),
                (b"c", b"=?utf-8?b?PT91dGYtOD9iP2FHaz0/PQ==?="),
                (b"tidemill-encoding", b"b-words"),
            ]
        );
        let again = round_trip(&m);
        assert_eq!(again.metadata().get("c"), Some("=?utf-8?b?aGk=?="));
        assert_eq!(again.uuid(), "order-1-created");
    }

    /// A stream's duplicate window spans its subjects: the id differs per subject, so a
    /// message forwarded unchanged to another topic of the stream is not dropped. Ids
    /// written before the subject was hashed are still read as Tidemill's own.
    #[test]
    fn the_message_id_depends_on_the_subject() {
        let m = Message::new("x").with_metadata("a", "1").with_key("k");
        let on = |subject: &str| {
            let e = encode(&m, subject, subject, 1 << 20, &tidemill()).unwrap();
            let (_, lines) = parse_header_block(&block(&e.headers));
            let id = lines.iter().find(|h| h.name() == MSG_ID_HEADER.as_bytes());
            id.map(|h| h.value_str().unwrap().to_owned()).unwrap()
        };
        assert_ne!(on("orders.created"), on("orders.audit"));
        assert_eq!(on("orders.created"), on("orders.created"));
        let legacy = content_hash(m.uuid(), None, m.metadata(), m.key(), m.payload());
        let raw = format!(
            "NATS/1.0\r\nNats-Msg-Id: {}.{legacy:016x}\r\ntidemill-key: k\r\na: 1\r\n\r\n",
            m.uuid()
        );
        let got = decode(
            wire(Some(Bytes::from(raw)), b"x"),
            stream_origin(1),
            &tidemill(),
        );
        assert_eq!(got, m);
    }

    #[test]
    fn uuid_travels_as_the_jetstream_message_id() {
        let m = Message::new("x").with_metadata("a", "1").with_key("k");
        let id = |m: &Message| {
            let e = encode(m, "t", "t", 1 << 20, &tidemill()).unwrap();
            let (_, lines) = parse_header_block(&block(&e.headers));
            lines
                .iter()
                .find(|h| h.name() == MSG_ID_HEADER.as_bytes())
                .map(|h| h.value_str().unwrap().to_owned())
        };
        let first = id(&m).unwrap();
        assert!(first.starts_with(&format!("{}.", m.uuid())), "{first}");
        assert_eq!(round_trip(&m), m);
        assert_eq!(id(&m.clone()).unwrap(), first);
        for v in [
            m.clone().with_metadata("a", "2"),
            m.clone().with_key("other"),
            Message::with_uuid(m.uuid(), "y")
                .with_metadata("a", "1")
                .with_key("k"),
        ] {
            assert_ne!(id(&v).unwrap(), first);
            assert_eq!(round_trip(&v), v);
        }
        // Another client's id that merely looks like one of ours stays whole.
        let looks = format!(
            "NATS/1.0\r\nNats-Msg-Id: {}.0123456789abcdef\r\n\r\n",
            m.uuid()
        );
        let foreign = decode(
            wire(Some(Bytes::from(looks)), b"x"),
            Origin::Subject,
            &tidemill(),
        );
        assert_eq!(foreign.uuid(), format!("{}.0123456789abcdef", m.uuid()));
        // A message id of the user's own is kept; the uuid moves to tidemill-uuid.
        let own = Message::new("x").with_metadata(MSG_ID_HEADER, "order-7");
        assert_eq!(id(&own).as_deref(), Some("order-7"));
        assert_eq!(round_trip(&own), own);
    }

    #[test]
    fn identity_modes() {
        let m = Message::new("x");
        let lines = |identity: &Identity| {
            let e = encode(&m, "t", "t", 1 << 20, identity).unwrap();
            let (_, lines) = parse_header_block(&block(&e.headers));
            lines
                .iter()
                .map(|h| {
                    (
                        h.name_str().unwrap().to_owned(),
                        h.value_str().unwrap().to_owned(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let wm = lines(&Identity::new(UuidHeader::Watermill));
        assert!(wm.contains(&(WATERMILL_UUID_HEADER.to_owned(), m.uuid().to_owned())));
        // Read by a subscriber configured for Tidemill's header: same message.
        let e = encode(&m, "t", "t", 1 << 20, &Identity::new(UuidHeader::Watermill)).unwrap();
        let got = decode(
            WireMsg {
                subject: Bytes::from_static(b"t"),
                reply: None,
                headers: Some(block(&e.headers)),
                payload: e.payload,
            },
            Origin::Subject,
            &tidemill(),
        );
        assert_eq!(got, m);
        let id = lines(&Identity::new(UuidHeader::NatsMsgId));
        assert_eq!(id, vec![(MSG_ID_HEADER.to_owned(), m.uuid().to_owned())]);
        let plain = lines(&Identity::new(UuidHeader::Header("x-id".into())));
        assert!(plain.contains(&("x-id".to_owned(), m.uuid().to_owned())));
        // Watermill's header is read whatever the configuration.
        let raw = format!("NATS/1.0\r\n{WATERMILL_UUID_HEADER}: wm-1\r\nname: Cmd\r\n\r\n");
        let got = decode(
            wire(Some(Bytes::from(raw)), b"{}"),
            stream_origin(1),
            &tidemill(),
        );
        assert_eq!(got.uuid(), "wm-1");
        assert_eq!(got.metadata().len(), 1);
    }

    #[test]
    fn message_id_lines_enter_the_view_unless_they_are_the_uuid() {
        let view = |raw: &'static [u8]| {
            let m = decode(
                wire(Some(Bytes::from_static(raw)), b"p"),
                Origin::Subject,
                &tidemill(),
            );
            let entries: Vec<(String, String)> = m
                .metadata()
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            (m.uuid().to_owned(), entries)
        };
        let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        // The last id line is the uuid; none stays in the view.
        assert_eq!(
            view(b"NATS/1.0\r\nNats-Msg-Id: a\r\nNats-Msg-Id: b\r\n\r\n"),
            ("b".to_owned(), vec![])
        );
        // Watermill's uuid wins; a foreign id stays in the view.
        assert_eq!(
            view(b"NATS/1.0\r\n_watermill_message_uuid: w\r\nNats-Msg-Id: x\r\nk: v\r\n\r\n"),
            (
                "w".to_owned(),
                vec![pair("Nats-Msg-Id", "x"), pair("k", "v")]
            )
        );
        // A later id line that is not UTF-8: no id candidate, both lines in the view.
        let (uuid, entries) = view(b"NATS/1.0\r\nNats-Msg-Id: a\r\nNats-Msg-Id: \xff\r\n\r\n");
        assert_ne!(uuid, "a");
        assert_eq!(
            entries,
            vec![pair("Nats-Msg-Id", "a"), pair("Nats-Msg-Id.b64", "/w==")]
        );
    }

    #[test]
    fn foreign_messages_get_stable_uuids() {
        let h = Some(Bytes::from_static(b"NATS/1.0\r\ntrace: abc\r\n\r\n"));
        let a = decode(wire(h.clone(), b"p"), stream_origin(9), &tidemill());
        let b = decode(wire(h.clone(), b"p"), stream_origin(9), &tidemill());
        let c = decode(wire(h.clone(), b"p"), stream_origin(10), &tidemill());
        assert_eq!(a.uuid(), b.uuid());
        assert_ne!(a.uuid(), c.uuid());
        assert_eq!(a.metadata().get("trace"), Some("abc"));
        assert_eq!(a.key(), None);
        let x = decode(wire(None, b"p"), Origin::Subject, &tidemill());
        let y = decode(wire(None, b"p"), Origin::Subject, &tidemill());
        let z = decode(wire(None, b"q"), Origin::Subject, &tidemill());
        assert_eq!(x.uuid(), y.uuid());
        assert_ne!(x.uuid(), z.uuid());
        let h = Some(Bytes::from_static(
            b"NATS/1.0\r\nNats-Msg-Id: their-id\r\n\r\n",
        ));
        let m = decode(wire(h, b""), Origin::Subject, &tidemill());
        assert_eq!(m.uuid(), "their-id");
        assert!(m.metadata().is_empty());
    }

    #[test]
    fn status_lines_and_odd_lines() {
        let raw = Bytes::from_static(
            b"NATS/1.0 503 No Responders\r\nk:   spaced value \t\r\nno colon line\r\n  folded\r\n\r\n",
        );
        let m = decode(wire(Some(raw), b""), stream_origin(1), &tidemill());
        let r = NatsRecord::of(&m).unwrap();
        assert_eq!(r.status(), Some(503));
        assert_eq!(r.description(), Some("No Responders"));
        assert_eq!(m.metadata().get("k"), Some("spaced value folded"));
        // Republished with its status line (a raw header block).
        let e = encode(&m, "t", "t", 1 << 20, &tidemill()).unwrap();
        match e.headers {
            Outgoing::Raw(b) => assert!(b.starts_with(b"NATS/1.0 503 No Responders\r\n")),
            Outgoing::Map(_) => panic!("a status line needs the raw path"),
        }
    }

    #[test]
    fn oversized_messages_name_the_limit() {
        let m = Message::new(vec![0u8; 2000]);
        let err = encode(&m, "big", "big", 1000, &tidemill()).err().unwrap();
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
        let a = parse_ack_subject("$JS.ACK.ORDERS.billing.3.42.40.1700000000000000000.7").unwrap();
        assert_eq!(
            (
                a.stream,
                a.consumer,
                a.delivered,
                a.stream_sequence,
                a.consumer_sequence,
                a.pending
            ),
            ("ORDERS", "billing", 3, 42, 40, 7)
        );
        let b =
            parse_ack_subject("$JS.ACK.hub.ACCHASH.ORDERS.billing.1.5.5.1700000000000000000.0.tok")
                .unwrap();
        assert_eq!(
            (b.domain, b.stream, b.delivered, b.stream_sequence),
            (Some("hub"), "ORDERS", 1, 5)
        );
        assert_eq!(parse_ack_subject("_INBOX.x"), None);
        assert_eq!(parse_ack_subject("$JS.ACK.a.b.c"), None);
    }
}
