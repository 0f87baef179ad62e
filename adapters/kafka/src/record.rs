//! [`KafkaRecord`]: the Kafka record a message was received as, exactly as the broker
//! delivered it.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tidemill_core::{Message, Native};

use crate::BROKER;

/// The Kafka record a [`KafkaSubscriber`](crate::KafkaSubscriber) delivery was made from,
/// exactly as the broker delivered it: topic, partition, offset, timestamp, key (null or
/// not), value (null for a tombstone) and every header in order, with repeated names,
/// values that are not UTF-8, and null values kept apart from empty ones.
///
/// Every received message carries one (see [`KafkaRecord::of`]); handlers that only use
/// the string metadata never need it. When a [`KafkaPublisher`](crate::KafkaPublisher)
/// publishes a message that carries one, it starts from this record: headers the
/// application left alone are sent byte for byte (see the crate documentation).
///
/// ```
/// # fn handle(msg: &tidemill_core::Message) {
/// use tidemill_kafka::KafkaRecord;
///
/// if let Some(record) = KafkaRecord::of(msg) {
///     println!("{}[{}]@{}", record.topic(), record.partition(), record.offset());
///     for header in record.headers() {
///         println!("{} = {:?}", header.name(), header.value());
///     }
///     if record.is_tombstone() {
///         // the producer deleted record.key() (log compaction)
///     }
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct KafkaRecord {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    timestamp: KafkaTimestamp,
    key: Option<Bytes>,
    value: Option<Bytes>,
    /// Header names and values, back to back.
    header_bytes: Bytes,
    headers: Vec<HeaderAt>,
    /// Headers librdkafka could not hand over (names that are not UTF-8).
    unreadable_headers: usize,
    /// Index of the header the message's uuid was read from, if any.
    pub(crate) uuid_from: Option<usize>,
    /// Per header: the metadata key it shows as in the string view, if any.
    pub(crate) view: Vec<View>,
}

/// Where one header's name and value are in [`KafkaRecord::header_bytes`].
#[derive(Clone, Debug)]
struct HeaderAt {
    name: Range<usize>,
    value: Option<Range<usize>>,
}

/// How a header shows in the string view (the message's metadata).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum View {
    /// Under its own name (text or null values).
    Name,
    /// Base64 under its name with `.b64` appended (values that are not UTF-8).
    Base64,
    /// Not at all: an identity header, or a binary value whose `.b64` name is taken by a
    /// real header of that name.
    Hidden,
}

/// A record's timestamp and its kind, in milliseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KafkaTimestamp {
    /// The record has no timestamp.
    NotAvailable,
    /// Set by the producer when it created the record (`message.timestamp.type=CreateTime`).
    CreateTime(i64),
    /// Set by the broker when it appended the record (`LogAppendTime`).
    LogAppendTime(i64),
}

impl KafkaTimestamp {
    /// The timestamp in milliseconds since the Unix epoch, whatever its kind.
    pub fn millis(&self) -> Option<i64> {
        match *self {
            KafkaTimestamp::NotAvailable => None,
            KafkaTimestamp::CreateTime(ms) | KafkaTimestamp::LogAppendTime(ms) => Some(ms),
        }
    }
}

impl From<rdkafka::Timestamp> for KafkaTimestamp {
    fn from(t: rdkafka::Timestamp) -> Self {
        match t {
            rdkafka::Timestamp::NotAvailable => KafkaTimestamp::NotAvailable,
            rdkafka::Timestamp::CreateTime(ms) => KafkaTimestamp::CreateTime(ms),
            rdkafka::Timestamp::LogAppendTime(ms) => KafkaTimestamp::LogAppendTime(ms),
        }
    }
}

/// One header of a [`KafkaRecord`]: a name and a value that may be null.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KafkaHeader<'a> {
    name: &'a str,
    value: Option<&'a [u8]>,
}

impl<'a> KafkaHeader<'a> {
    /// The header's name (may be empty; Kafka header names are UTF-8).
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// The header's value: `None` for a null value, `Some(b"")` for an empty one.
    pub fn value(&self) -> Option<&'a [u8]> {
        self.value
    }

    /// Whether the value is null (the producer sent the name without a value).
    pub fn is_null(&self) -> bool {
        self.value.is_none()
    }

    /// The value as text, if it is non-null and valid UTF-8.
    pub fn value_str(&self) -> Option<&'a str> {
        self.value.and_then(|v| std::str::from_utf8(v).ok())
    }
}

impl fmt::Debug for KafkaHeader<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value: &dyn fmt::Debug = match (self.value, self.value_str()) {
            (None, _) => &"null",
            (Some(_), Some(text)) => &text.len(),
            (Some(bytes), None) => &bytes.len(),
        };
        f.debug_struct("KafkaHeader")
            .field("name", &self.name)
            .field("value_len", value)
            .finish()
    }
}

impl KafkaRecord {
    /// The record `msg` was received as, if a Kafka subscriber delivered it.
    pub fn of(msg: &Message) -> Option<&KafkaRecord> {
        Native::of::<KafkaRecord>(msg, BROKER)
    }

    /// The topic the record was read from.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partition the record was read from.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The record's offset in its partition.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// The record's timestamp and its kind.
    pub fn timestamp(&self) -> KafkaTimestamp {
        self.timestamp
    }

    /// The record's key: `None` for a null key, `Some(b"")` for an empty one. The
    /// message's [`key`](Message::key) is the same.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The record's value: `None` for a null value (a tombstone), `Some(b"")` for an empty
    /// one. The message's payload is the same bytes (empty for a tombstone).
    pub fn value(&self) -> Option<&[u8]> {
        self.value.as_deref()
    }

    /// Whether the value is null: a tombstone, which deletes the key from a compacted
    /// topic.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// Every header in the order the producer sent them, repeated names included.
    pub fn headers(&self) -> impl ExactSizeIterator<Item = KafkaHeader<'_>> + '_ {
        (0..self.headers.len()).map(move |i| self.header(i))
    }

    /// The headers named `name`, in order.
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = KafkaHeader<'a>> {
        self.headers().filter(move |h| h.name() == name)
    }

    /// The last header named `name` (the one the string view shows when names repeat).
    pub fn last_header(&self, name: &str) -> Option<KafkaHeader<'_>> {
        self.headers().filter(|h| h.name() == name).last()
    }

    /// How many headers the record had that could not be read (librdkafka refuses header
    /// names that are not valid UTF-8). They are missing from [`headers`](Self::headers),
    /// from the metadata, and from what a publisher sends on; normally 0.
    pub fn unreadable_headers(&self) -> usize {
        self.unreadable_headers
    }

    /// The key, shared.
    pub(crate) fn key_bytes(&self) -> Option<&Bytes> {
        self.key.as_ref()
    }

    /// The value, shared.
    pub(crate) fn value_bytes(&self) -> Option<&Bytes> {
        self.value.as_ref()
    }

    pub(crate) fn header(&self, i: usize) -> KafkaHeader<'_> {
        let at = &self.headers[i];
        KafkaHeader {
            // Written from `&str` by the builder, so always UTF-8.
            name: std::str::from_utf8(&self.header_bytes[at.name.clone()]).unwrap_or_default(),
            value: at.value.clone().map(|r| &self.header_bytes[r]),
        }
    }
}

impl fmt::Debug for KafkaRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaRecord")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("timestamp", &self.timestamp)
            .field("key_len", &self.key.as_ref().map(Bytes::len))
            .field("value_len", &self.value.as_ref().map(Bytes::len))
            .field("headers", &self.headers().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Builds a [`KafkaRecord`] from what librdkafka delivered.
pub(crate) struct RecordBuilder {
    record: KafkaRecord,
    /// Header names and values, back to back (the arena's scratch buffer, handed back by
    /// [`finish`](Self::finish)).
    bytes: Vec<u8>,
}

impl RecordBuilder {
    pub(crate) fn new(
        topic: Arc<str>,
        partition: i32,
        offset: i64,
        timestamp: KafkaTimestamp,
        key: Option<Bytes>,
        value: Option<Bytes>,
        arena: &mut Arena,
    ) -> Self {
        RecordBuilder {
            record: KafkaRecord {
                topic,
                partition,
                offset,
                timestamp,
                key,
                value,
                header_bytes: Bytes::new(),
                headers: Vec::new(),
                unreadable_headers: 0,
                uuid_from: None,
                view: Vec::new(),
            },
            bytes: arena.take_scratch(),
        }
    }

    /// Reserves room for `count` headers of `bytes` bytes in all.
    pub(crate) fn reserve(&mut self, count: usize, bytes: usize) {
        self.record.headers.reserve_exact(count);
        self.bytes.reserve_exact(bytes);
    }

    pub(crate) fn header(&mut self, name: &str, value: Option<&[u8]>) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(name.as_bytes());
        let name = start..self.bytes.len();
        let value = value.map(|v| {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(v);
            start..self.bytes.len()
        });
        self.record.headers.push(HeaderAt { name, value });
    }

    pub(crate) fn unreadable(&mut self) {
        self.record.unreadable_headers += 1;
    }

    pub(crate) fn finish(mut self, arena: &mut Arena) -> KafkaRecord {
        self.record.header_bytes = arena.copy(&self.bytes);
        arena.return_scratch(self.bytes);
        self.record
    }
}

/// Size of the chunks an [`Arena`] copies received bytes into.
const CHUNK: usize = 16 * 1024;
/// Larger pieces get an allocation of their own (a small piece a handler keeps holds at
/// most one chunk in memory).
const MAX_PIECE: usize = 1024;

/// Where a subscription's poll thread copies received keys, values and header bytes:
/// small pieces go back to back into shared chunks of [`CHUNK`] bytes, so a record's bytes
/// cost no allocation of their own and their clones (the message's payload and key, the
/// [`KafkaRecord`]'s value and key) only count a reference. A chunk is freed once nothing
/// refers to any of its pieces.
pub(crate) struct Arena {
    chunk: BytesMut,
    /// A buffer to collect a record's header bytes in, reused from record to record.
    scratch: Vec<u8>,
}

impl Arena {
    pub(crate) fn new() -> Self {
        Arena {
            chunk: BytesMut::new(),
            scratch: Vec::new(),
        }
    }

    /// A copy of `bytes`.
    pub(crate) fn copy(&mut self, bytes: &[u8]) -> Bytes {
        if bytes.is_empty() {
            return Bytes::new();
        }
        if bytes.len() > MAX_PIECE {
            return Bytes::copy_from_slice(bytes);
        }
        if self.chunk.capacity() - self.chunk.len() < bytes.len() {
            self.chunk = BytesMut::with_capacity(CHUNK);
        }
        self.chunk.extend_from_slice(bytes);
        self.chunk.split().freeze()
    }

    fn take_scratch(&mut self) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.scratch);
        v.clear();
        v
    }

    fn return_scratch(&mut self, v: Vec<u8>) {
        // A huge record's buffer is not kept.
        if v.capacity() <= CHUNK {
            self.scratch = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_copies_are_independent_of_each_other_and_of_the_source() {
        let mut arena = Arena::new();
        let mut source = vec![1u8, 2, 3];
        let a = arena.copy(&source);
        source[0] = 9;
        let b = arena.copy(&source);
        let empty = arena.copy(&[]);
        let big = arena.copy(&vec![7u8; MAX_PIECE + 1]);
        // Enough small pieces to fill several chunks.
        let many: Vec<Bytes> = (0..3 * CHUNK / 100)
            .map(|i| arena.copy(&[(i % 251) as u8; 100]))
            .collect();
        assert_eq!(&a[..], &[1, 2, 3]);
        assert_eq!(&b[..], &[9, 2, 3]);
        assert!(empty.is_empty());
        assert_eq!(big.len(), MAX_PIECE + 1);
        assert!(big.iter().all(|&x| x == 7));
        for (i, piece) in many.iter().enumerate() {
            assert_eq!(&piece[..], &[(i % 251) as u8; 100][..]);
        }
        let a2 = a.clone();
        drop(a);
        assert_eq!(&a2[..], &[1, 2, 3]);
    }

    #[test]
    fn headers_keep_order_duplicates_and_null() {
        let mut arena = Arena::new();
        let mut b = RecordBuilder::new(
            Arc::from("t"),
            1,
            2,
            KafkaTimestamp::CreateTime(5),
            None,
            Some(Bytes::from_static(b"v")),
            &mut arena,
        );
        b.header("a", Some(b"1"));
        b.header("", None);
        b.header("a", Some(&[0xff]));
        b.header("e", Some(b""));
        let r = b.finish(&mut arena);
        let all: Vec<(&str, Option<&[u8]>)> = r.headers().map(|h| (h.name(), h.value())).collect();
        assert_eq!(
            all,
            vec![
                ("a", Some(&b"1"[..])),
                ("", None),
                ("a", Some(&[0xffu8][..])),
                ("e", Some(&b""[..]))
            ]
        );
        assert_eq!(r.last_header("a").unwrap().value(), Some(&[0xffu8][..]));
        assert_eq!(r.headers_named("a").count(), 2);
        assert!(r.headers().nth(1).unwrap().is_null());
        assert_eq!(r.timestamp().millis(), Some(5));
        assert!(!r.is_tombstone());
        assert_eq!(r.key(), None);
        let debug = format!("{r:?}");
        assert!(debug.contains("partition: 1"), "{debug}");
    }
}
