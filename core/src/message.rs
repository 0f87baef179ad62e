//! The message model: uuid, metadata, payload and an optional ordering key.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;

use crate::context::MessageContext;
use crate::native::Native;

/// How many payload bytes `Debug` shows before eliding the rest.
const DEBUG_PAYLOAD_PREVIEW: usize = 64;

/// A message: a unique id, string metadata, an opaque payload and an optional key.
///
/// Cloning is cheap: a message is one reference-counted block (uuid, metadata, payload,
/// key) plus its receive context; a clone shares the block, and modifying a clone copies
/// it first (the parts themselves are reference counted too, so that copy is cheap).
///
/// ```
/// use tidemill_core::Message;
///
/// let msg = Message::new("hello")
///     .with_metadata("content-type", "text/plain")
///     .with_key("customer-42");
/// assert_eq!(msg.payload().as_ref(), b"hello");
/// assert_eq!(msg.metadata().get("content-type"), Some("text/plain"));
/// assert_eq!(msg.key_str(), Some("customer-42"));
/// assert_eq!(msg.uuid().len(), 36); // a UUIDv7: ids sort by creation time
/// ```
#[derive(Clone)]
pub struct Message {
    parts: Arc<Parts>,
    context: Option<MessageContext>,
}

/// What a message is made of, shared between clones.
#[derive(Clone)]
struct Parts {
    uuid: Uuid,
    metadata: Metadata,
    payload: Bytes,
    key: Option<Bytes>,
    native: Option<Native>,
}

/// Length of a hyphenated uuid.
const UUID_LEN: usize = uuid::fmt::Hyphenated::LENGTH;

/// A message id: generated ones are kept inline (no allocation of their own), given ones
/// shared.
#[derive(Clone)]
pub(crate) enum Uuid {
    /// The hyphenated lowercase text of a generated UUIDv7 (ASCII).
    Generated([u8; UUID_LEN]),
    Given(Arc<str>),
}

impl Uuid {
    fn generate() -> Self {
        let mut text = [0; UUID_LEN];
        uuid::Uuid::now_v7().hyphenated().encode_lower(&mut text);
        Uuid::Generated(text)
    }

    #[inline]
    pub(crate) fn as_str(&self) -> &str {
        match self {
            // Always ASCII (written by `generate`), so this never falls back.
            Uuid::Generated(text) => std::str::from_utf8(text).unwrap_or_default(),
            Uuid::Given(id) => id,
        }
    }
}

impl Message {
    /// A new message with a fresh time-ordered uuid (UUIDv7) and empty metadata.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self::from_parts(Uuid::generate(), payload.into())
    }

    /// A message with the given uuid (as received from a broker, or chosen by the caller).
    pub fn with_uuid(uuid: impl Into<Arc<str>>, payload: impl Into<Bytes>) -> Self {
        Self::from_parts(Uuid::Given(uuid.into()), payload.into())
    }

    fn from_parts(uuid: Uuid, payload: Bytes) -> Self {
        Message {
            parts: Arc::new(Parts {
                uuid,
                metadata: Metadata::new(),
                payload,
                key: None,
                native: None,
            }),
            context: None,
        }
    }

    /// The parts, to modify: copied first if a clone shares them.
    #[inline]
    fn parts_mut(&mut self) -> &mut Parts {
        Arc::make_mut(&mut self.parts)
    }

    /// Adds (or replaces) a metadata entry; builder style.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl ToString) -> Self {
        self.parts_mut().metadata.set(key, value);
        self
    }

    /// Replaces all metadata; builder style.
    pub fn with_metadata_map(mut self, metadata: Metadata) -> Self {
        self.parts_mut().metadata = metadata;
        self
    }

    /// Sets the ordering/partitioning key; builder style. Messages with the same key keep
    /// their order (Kafka key, Pub/Sub ordering key, router per-key sequencing).
    pub fn with_key(mut self, key: impl AsRef<[u8]>) -> Self {
        self.parts_mut().key = Some(Bytes::copy_from_slice(key.as_ref()));
        self
    }

    /// Sets the key from bytes without copying.
    pub fn with_key_bytes(mut self, key: Bytes) -> Self {
        self.parts_mut().key = Some(key);
        self
    }

    /// The message's unique id.
    #[inline]
    pub fn uuid(&self) -> &str {
        self.parts.uuid.as_str()
    }

    /// A copy of the id that outlives the message (no allocation: inline or shared).
    #[inline]
    pub(crate) fn uuid_copy(&self) -> Uuid {
        self.parts.uuid.clone()
    }

    /// The payload.
    #[inline]
    pub fn payload(&self) -> &Bytes {
        &self.parts.payload
    }

    /// Replaces the payload.
    pub fn set_payload(&mut self, payload: impl Into<Bytes>) {
        self.parts_mut().payload = payload.into();
    }

    /// The metadata.
    #[inline]
    pub fn metadata(&self) -> &Metadata {
        &self.parts.metadata
    }

    /// The metadata, mutably.
    #[inline]
    pub fn metadata_mut(&mut self) -> &mut Metadata {
        &mut self.parts_mut().metadata
    }

    /// The ordering key, if any.
    #[inline]
    pub fn key(&self) -> Option<&Bytes> {
        self.parts.key.as_ref()
    }

    /// The ordering key as UTF-8, if it is set and valid UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// Sets or clears the key.
    pub fn set_key(&mut self, key: Option<Bytes>) {
        self.parts_mut().key = key;
    }

    /// What the broker delivered, as its adapter kept it (headers with their exact bytes,
    /// properties, coordinates such as partition and offset): see [`Native`]. `None` for
    /// messages made by the application.
    #[inline]
    pub fn native(&self) -> Option<&Native> {
        self.parts.native.as_ref()
    }

    /// Attaches what the broker delivered (adapters do this when they receive); builder
    /// style.
    pub fn with_native(mut self, native: Native) -> Self {
        self.parts_mut().native = Some(native);
        self
    }

    /// Sets or clears the broker's record. Clearing it makes an adapter publish the message
    /// from its string metadata alone, as if the application had made it.
    pub fn set_native(&mut self, native: Option<Native>) {
        self.parts_mut().native = native;
    }

    /// Where this message was received (handler, topic, delivery attempt), set by the
    /// router for the handler and its layers. Never sent to a broker.
    #[inline]
    pub fn context(&self) -> Option<&MessageContext> {
        self.context.as_ref()
    }

    /// A clone without the receive context: the message as a broker carries it. Cheaper
    /// than [`clone`](Clone::clone) (one reference count), for layers that keep a copy of
    /// the input but not its context.
    #[inline]
    pub fn detached(&self) -> Message {
        Message {
            parts: self.parts.clone(),
            context: None,
        }
    }

    /// Sets the receive context (the router does this; layers and tests may too).
    #[inline]
    pub fn set_context(&mut self, context: Option<MessageContext>) {
        self.context = context;
    }

    /// Splits the message into uuid, metadata, payload and key (adapters use this to
    /// encode without copying).
    pub fn into_parts(self) -> (Arc<str>, Metadata, Bytes, Option<Bytes>) {
        let parts = Arc::try_unwrap(self.parts).unwrap_or_else(|shared| (*shared).clone());
        let uuid = match parts.uuid {
            Uuid::Given(id) => id,
            generated @ Uuid::Generated(_) => Arc::from(generated.as_str()),
        };
        (uuid, parts.metadata, parts.payload, parts.key)
    }
}

/// Generates a new time-ordered message id (UUIDv7, hyphenated lowercase).
pub fn new_uuid() -> Arc<str> {
    let mut buf = uuid::Uuid::encode_buffer();
    let s = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buf);
    Arc::from(&*s)
}

impl PartialEq for Message {
    /// Messages are equal when uuid, metadata, payload and key are; the receive context is
    /// not part of a message's identity.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.parts, &other.parts)
            || (self.uuid() == other.uuid()
                && self.payload() == other.payload()
                && self.key() == other.key()
                && self.metadata() == other.metadata())
    }
}

impl Eq for Message {}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Message");
        s.field("uuid", &self.uuid());
        if let Some(key) = self.key() {
            s.field("key", &PreviewBytes(key));
        }
        s.field("metadata", self.metadata());
        s.field("payload", &PreviewBytes(self.payload()));
        if let Some(native) = self.native() {
            s.field("native", &native.broker());
        }
        if let Some(ctx) = &self.context {
            s.field("context", ctx);
        }
        s.finish()
    }
}

impl fmt::Display for Message {
    /// A one-line summary: uuid, key, metadata count and payload size — never the payload.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "message {}", self.uuid())?;
        if let Some(key) = self.key() {
            write!(f, " key={:?}", PreviewBytes(key))?;
        }
        write!(
            f,
            " ({} metadata entries, {} payload bytes)",
            self.metadata().len(),
            self.payload().len()
        )
    }
}

/// Debug-formats bytes as a string when printable, truncated to a preview.
struct PreviewBytes<'a>(&'a Bytes);

impl fmt::Debug for PreviewBytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0;
        let shown = &bytes[..bytes.len().min(DEBUG_PAYLOAD_PREVIEW)];
        match std::str::from_utf8(shown) {
            Ok(text) => write!(f, "{text:?}")?,
            Err(_) => write!(f, "{shown:02x?}")?,
        }
        if bytes.len() > shown.len() {
            write!(f, "… ({} bytes)", bytes.len())?;
        }
        Ok(())
    }
}

/// String→string message metadata (headers). Cloning is cheap: the map is shared until a
/// clone is modified.
///
/// ```
/// use tidemill_core::Metadata;
///
/// let mut md = Metadata::new();
/// md.set("retries", 3);
/// assert_eq!(md.get_as::<u32>("retries").unwrap(), Some(3));
/// assert!(md.get_as::<u32>("missing").unwrap().is_none());
/// ```
#[derive(Clone, Default)]
pub struct Metadata {
    map: Option<Arc<BTreeMap<String, String>>>,
}

/// A metadata value that did not parse as the requested type.
#[derive(Debug, thiserror::Error)]
#[error("metadata `{key}` = {value:?} is not a valid {expected}: {reason}")]
pub struct MetadataParseError {
    /// The metadata key.
    pub key: String,
    /// The raw value.
    pub value: String,
    /// The requested type's name.
    pub expected: &'static str,
    /// The parser's explanation.
    pub reason: String,
}

impl Metadata {
    /// Empty metadata (does not allocate).
    pub fn new() -> Self {
        Metadata { map: None }
    }

    /// The value for `key`.
    #[inline]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.map.as_ref()?.get(key).map(String::as_str)
    }

    /// The value for `key` parsed as `T`; `Ok(None)` when absent, an error naming the key
    /// and value when present but unparsable.
    pub fn get_as<T>(&self, key: &str) -> Result<Option<T>, MetadataParseError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match self.get(key) {
            None => Ok(None),
            Some(raw) => raw
                .parse()
                .map(Some)
                .map_err(|e: T::Err| MetadataParseError {
                    key: key.to_owned(),
                    value: raw.to_owned(),
                    expected: std::any::type_name::<T>(),
                    reason: e.to_string(),
                }),
        }
    }

    /// Sets `key` to `value` (any `Display` value), replacing a previous value.
    pub fn set(&mut self, key: impl Into<String>, value: impl ToString) {
        self.map_mut().insert(key.into(), value.to_string());
    }

    /// Sets `key` only if absent; returns the value now stored.
    pub fn set_if_absent(&mut self, key: impl Into<String>, value: impl ToString) -> &str {
        self.map_mut()
            .entry(key.into())
            .or_insert_with(|| value.to_string())
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let map = self.map.as_mut()?;
        if !map.contains_key(key) {
            return None;
        }
        Arc::make_mut(map).remove(key)
    }

    /// Whether `key` is present.
    #[inline]
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Number of entries.
    #[inline]
    pub fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |m| m.len())
    }

    /// Whether there are no entries.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.map
            .iter()
            .flat_map(|m| m.iter())
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Copies every entry of `other` into `self`, replacing existing keys.
    pub fn extend_from(&mut self, other: &Metadata) {
        if other.is_empty() {
            return;
        }
        if self.is_empty() {
            self.map = other.map.clone();
            return;
        }
        let map = self.map_mut();
        for (k, v) in other.iter() {
            map.insert(k.to_owned(), v.to_owned());
        }
    }

    /// Whether both share one map (a cheap check before comparing).
    pub(crate) fn same_as(&self, other: &Metadata) -> bool {
        match (&self.map, &other.map) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }

    fn map_mut(&mut self) -> &mut BTreeMap<String, String> {
        Arc::make_mut(self.map.get_or_insert_with(Default::default))
    }
}

impl PartialEq for Metadata {
    /// Equal when they hold the same entries (an emptied map equals a new one).
    fn eq(&self, other: &Self) -> bool {
        self.same_as(other) || (self.len() == other.len() && self.iter().eq(other.iter()))
    }
}

impl Eq for Metadata {}

impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Into<String>, V: ToString> FromIterator<(K, V)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut md = Metadata::new();
        for (k, v) in iter {
            md.set(k, v);
        }
        md
    }
}

impl<K: Into<String>, V: ToString> Extend<(K, V)> for Metadata {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.set(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_unique_and_sort_by_creation() {
        let ids: Vec<String> = (0..1000)
            .map(|_| Message::new("x").uuid().to_owned())
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "UUIDv7 ids must sort by creation time");
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
    }

    #[test]
    fn clones_share_metadata_until_modified() {
        let a = Message::new("p").with_metadata("k", "v");
        let mut b = a.clone();
        b.metadata_mut().set("k", "changed");
        assert_eq!(a.metadata().get("k"), Some("v"));
        assert_eq!(b.metadata().get("k"), Some("changed"));
    }

    #[test]
    fn clones_are_independent_values() {
        let a = Message::new("p").with_key("k");
        let mut b = a.clone();
        assert_eq!(a, b);
        b.set_payload("q");
        b.set_key(None);
        assert_eq!(a.payload().as_ref(), b"p");
        assert_eq!(a.key_str(), Some("k"));
        assert_eq!(b.payload().as_ref(), b"q");
        assert_eq!(a.uuid(), b.uuid());
        assert_ne!(a, b);
    }

    #[test]
    fn into_parts_keeps_generated_and_given_uuids() {
        let generated = Message::new("p").with_metadata("m", "1");
        let uuid = generated.uuid().to_owned();
        let shared = generated.clone();
        let (id, md, payload, key) = generated.into_parts();
        assert_eq!(&*id, uuid);
        assert_eq!(md.get("m"), Some("1"));
        assert_eq!(payload.as_ref(), b"p");
        assert!(key.is_none());
        assert_eq!(shared.uuid(), uuid);
        let (id, ..) = Message::with_uuid("given-1", "p").into_parts();
        assert_eq!(&*id, "given-1");
    }

    #[test]
    fn typed_metadata_reports_bad_values() {
        let md: Metadata = [("n", "twelve")].into_iter().collect();
        let err = md.get_as::<u32>("n").unwrap_err();
        assert!(err.to_string().contains("`n`"), "{err}");
        assert!(err.to_string().contains("twelve"), "{err}");
    }

    #[test]
    fn debug_and_display_do_not_dump_large_payloads() {
        let msg = Message::with_uuid("id-1", vec![b'a'; 10_000]).with_key("k");
        let debug = format!("{msg:?}");
        assert!(debug.len() < 300, "{debug}");
        assert!(debug.contains("10000 bytes"), "{debug}");
        let display = msg.to_string();
        assert_eq!(
            display,
            "message id-1 key=\"k\" (0 metadata entries, 10000 payload bytes)"
        );
    }

    #[test]
    fn emptied_metadata_equals_new_metadata() {
        let mut md = Metadata::new();
        md.set("a", 1);
        md.remove("a");
        assert_eq!(md, Metadata::new());
        assert_ne!(md, [("a", "1")].into_iter().collect());
    }

    #[test]
    fn metadata_remove_and_extend() {
        let mut md = Metadata::new();
        assert_eq!(md.remove("x"), None);
        md.set("a", 1);
        let other: Metadata = [("b", "2")].into_iter().collect();
        md.extend_from(&other);
        assert_eq!(md.len(), 2);
        assert_eq!(md.remove("a").as_deref(), Some("1"));
        assert_eq!(md.iter().collect::<Vec<_>>(), vec![("b", "2")]);
    }
}
