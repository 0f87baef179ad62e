//! [`NatsRecord`]: what NATS delivered, attached to every received message.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tidemill_core::Message;

use crate::BROKER;

/// One header line as received: name and value bytes, the value without the whitespace
/// around it (what every NATS client strips).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawHeader {
    pub(crate) name: Bytes,
    pub(crate) value: Bytes,
}

impl RawHeader {
    pub(crate) fn new(name: Bytes, value: Bytes) -> Self {
        RawHeader { name, value }
    }

    /// The name's bytes, exactly as sent (NATS header names are case-sensitive).
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// The value's bytes (any bytes but CR LF; not necessarily UTF-8).
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// The name as text, if it is UTF-8.
    pub fn name_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.name).ok()
    }

    /// The value as text, if it is UTF-8.
    pub fn value_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.value).ok()
    }
}

/// What NATS delivered for a received message: the broker-native fields and the headers
/// exactly as sent (every line in order, repeated names and non-UTF-8 values included).
///
/// Every message a `NatsSubscriber` delivers carries one, read through
/// [`NatsRecord::of`] (or `tidemill_core::Native::of::<NatsRecord>(&msg, "nats")`).
/// Handlers that only use the string metadata need none of this. When a message carrying
/// a record is published again through a `NatsPublisher` (a handler passing it on), the
/// headers are written from the record, with only what the application changed in the
/// string metadata applied, so a plain consumer sees the headers it would have seen from
/// the original publisher (plus Tidemill's uuid header when the original had none).
///
/// ```no_run
/// # fn handle(msg: &tidemill_core::Message) {
/// use tidemill_nats::NatsRecord;
/// if let Some(record) = NatsRecord::of(msg) {
///     println!("stream {:?} sequence {:?}", record.stream(), record.stream_sequence());
///     for h in record.headers() {
///         println!("{:?}: {:?}", h.name(), h.value());
///     }
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct NatsRecord {
    /// UTF-8 (made so on receipt when it was not), shared with the received bytes.
    pub(crate) subject: Bytes,
    /// Only a UTF-8 reply subject is kept.
    pub(crate) reply: Option<Bytes>,
    /// These three are UTF-8 (slices of the reply subject where they come from it).
    pub(crate) stream: Option<Bytes>,
    pub(crate) consumer: Option<Bytes>,
    pub(crate) domain: Option<Bytes>,
    pub(crate) stream_sequence: Option<u64>,
    pub(crate) consumer_sequence: Option<u64>,
    pub(crate) num_delivered: Option<u64>,
    pub(crate) num_pending: Option<u64>,
    pub(crate) timestamp_nanos: Option<u64>,
    pub(crate) status: Option<u16>,
    pub(crate) description: Option<String>,
    pub(crate) headers: Vec<RawHeader>,
    pub(crate) raw_headers: Option<Bytes>,
    /// The status line after `NATS/1.0 `, as received.
    pub(crate) status_line: Option<Bytes>,
    /// What each header became (parallel to `headers`).
    pub(crate) roles: Vec<crate::codec::Role>,
    /// The uuid and key decoded from the headers.
    pub(crate) uuid: Option<std::sync::Arc<str>>,
    pub(crate) key: Option<Bytes>,
    /// Whether the message held encoded words (Tidemill's `tidemill-encoding`).
    pub(crate) encoded: bool,
    /// Whether the raw block is exactly what the parsed lines give back.
    pub(crate) canonical: bool,
}

/// A field kept as bytes that are UTF-8 (checked on receipt) as text.
fn utf8(bytes: Option<&Bytes>) -> Option<&str> {
    bytes.and_then(|b| std::str::from_utf8(b).ok())
}

impl NatsRecord {
    /// The record of `msg`, if a `NatsSubscriber` received it.
    pub fn of(msg: &Message) -> Option<&NatsRecord> {
        tidemill_core::Native::of::<NatsRecord>(msg, BROKER)
    }

    /// The subject the message was published to (with the `subject_prefix`, if any).
    pub fn subject(&self) -> &str {
        std::str::from_utf8(&self.subject).unwrap_or_default()
    }

    /// The reply subject of the delivery (JetStream: the ack subject).
    pub fn reply(&self) -> Option<&str> {
        utf8(self.reply.as_ref())
    }

    /// JetStream: the stream holding the message; `None` in core NATS mode.
    pub fn stream(&self) -> Option<&str> {
        utf8(self.stream.as_ref())
    }

    /// JetStream: the consumer that delivered it.
    pub fn consumer(&self) -> Option<&str> {
        utf8(self.consumer.as_ref())
    }

    /// JetStream: the domain in the ack subject, when the server names one.
    pub fn domain(&self) -> Option<&str> {
        utf8(self.domain.as_ref())
    }

    /// JetStream: the message's sequence number in its stream.
    pub fn stream_sequence(&self) -> Option<u64> {
        self.stream_sequence
    }

    /// JetStream: the consumer's delivery sequence of this delivery.
    pub fn consumer_sequence(&self) -> Option<u64> {
        self.consumer_sequence
    }

    /// JetStream: how many times the server delivered the message, this delivery
    /// included (the server's own count; what `Delivery::attempt` reports).
    pub fn num_delivered(&self) -> Option<u64> {
        self.num_delivered
    }

    /// JetStream: messages pending for the consumer after this one.
    pub fn num_pending(&self) -> Option<u64> {
        self.num_pending
    }

    /// JetStream: when the stream stored the message.
    pub fn timestamp(&self) -> Option<SystemTime> {
        self.timestamp_nanos
            .map(|n| SystemTime::UNIX_EPOCH + Duration::from_nanos(n))
    }

    /// The status code of the header block's first line (`NATS/1.0 503`), when the
    /// publisher wrote one. Server status messages (heartbeats, timeouts) never reach the
    /// application; a stored message whose publisher wrote a status line does, with it
    /// here.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// The description after the status code, if any.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// Every header line, in the order received, repeated names included.
    pub fn headers(&self) -> &[RawHeader] {
        &self.headers
    }

    /// The values of header `name`, in the order received.
    pub fn values<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |h| h.name() == name)
            .map(RawHeader::value)
    }

    /// The header block exactly as received (`NATS/1.0` line, header lines, empty line),
    /// when the message had headers.
    pub fn raw_headers(&self) -> Option<&Bytes> {
        self.raw_headers.as_ref()
    }
}
