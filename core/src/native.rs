//! What a broker delivered, kept with the message: the broker-native envelope.
//!
//! Brokers carry more than string→string metadata: repeated header keys, binary and null
//! values, typed AMQP headers and properties, Kafka tombstones, a RabbitMQ routing key, a
//! Pub/Sub ordering key. An adapter shows handlers the string view
//! ([`Message::metadata`](crate::Message::metadata)) and keeps the record it received in a
//! [`Native`] attached to the message. When the same kind of adapter publishes the message
//! again (a handler passing it on, a dead-letter or poison layer), it starts from that
//! record and applies only what the application changed in the string view, so a hop that
//! changes nothing leaves the message as a plain consumer published it.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use crate::{Message, Metadata};

/// A broker's own record of a received message.
///
/// Brokers carry more than string→string metadata: repeated header keys, binary and null
/// values, typed AMQP headers and properties, Kafka tombstones, a RabbitMQ routing key, a
/// Pub/Sub ordering key. An adapter shows handlers the string view
/// ([`Message::metadata`]) and keeps the record it received here. When the same kind of
/// adapter publishes the message again (a handler passing it on, a dead-letter or poison
/// layer), it starts from the record and applies only what the application changed in the
/// string view, so a hop that changes nothing leaves the message as its producer sent it.
///
/// Cloning is one reference count. Adapters document what their record type holds (e.g.
/// partition, offset and raw headers for Kafka; properties, routing key and exchange for
/// RabbitMQ) and give typed accessors for it.
///
/// ```
/// use tidemill_core::{Message, Metadata, Native, NativeEntry};
///
/// #[derive(Debug)]
/// struct Record { headers: Vec<(String, Vec<u8>)> }
///
/// let mut metadata = Metadata::new();
/// metadata.set("trace", "abc");
/// metadata.set("tenant", "t1");
/// let record = Record { headers: vec![("trace".into(), b"abc".to_vec())] };
/// let mut msg = Message::new("payload")
///     .with_metadata_map(metadata.clone())
///     .with_native(Native::new("example", record, &metadata));
///
/// // A handler changes one entry and adds another.
/// msg.metadata_mut().set("tenant", "t2");
/// msg.metadata_mut().set("new", "1");
///
/// let native = msg.native().expect("received");
/// assert_eq!(native.broker(), "example");
/// assert_eq!(native.get::<Record>().unwrap().headers.len(), 1);
/// assert_eq!(native.entry(msg.metadata(), "trace"), NativeEntry::Kept);
/// assert_eq!(native.entry(msg.metadata(), "tenant"), NativeEntry::Changed("t2"));
/// assert_eq!(native.added(msg.metadata()).collect::<Vec<_>>(), vec![("new", "1")]);
/// ```
#[derive(Clone)]
pub struct Native(Arc<Inner<dyn Any + Send + Sync>>);

/// One allocation per received message: the record lives in the `Arc` with the rest.
struct Inner<R: ?Sized> {
    broker: &'static str,
    /// The string view as the adapter made it on receipt.
    metadata: Metadata,
    record: R,
}

/// What became of one received metadata entry (see [`Native::entry`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NativeEntry<'a> {
    /// The entry is as received: publish the broker's original (all values, exact bytes).
    Kept,
    /// The application set a new value.
    Changed(&'a str),
    /// The application removed the entry.
    Removed,
}

impl Native {
    /// The record `broker`'s adapter received, with the string view `metadata` it made of
    /// it (the message's metadata at receipt).
    pub fn new<T: Any + Send + Sync>(broker: &'static str, record: T, metadata: &Metadata) -> Self {
        let inner: Arc<Inner<dyn Any + Send + Sync>> = Arc::new(Inner {
            broker,
            metadata: metadata.clone(),
            record,
        });
        Native(inner)
    }

    /// The record of `msg` if `broker`'s adapter received it as a `T`.
    pub fn of<'a, T: Any>(msg: &'a Message, broker: &str) -> Option<&'a T> {
        msg.native()
            .filter(|n| n.broker() == broker)
            .and_then(Native::get)
    }

    /// The broker (adapter) that received the message, e.g. `kafka`.
    pub fn broker(&self) -> &'static str {
        self.0.broker
    }

    /// The record, if it is a `T`.
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.record.downcast_ref()
    }

    /// The string view of the headers as received.
    pub fn metadata(&self) -> &Metadata {
        &self.0.metadata
    }

    /// Whether `current` (the message's metadata now) is the string view as received.
    pub fn unchanged(&self, current: &Metadata) -> bool {
        current.same_as(&self.0.metadata) || *current == self.0.metadata
    }

    /// What became of the received entry `key` in `current`.
    pub fn entry<'a>(&self, current: &'a Metadata, key: &str) -> NativeEntry<'a> {
        match current.get(key) {
            None => NativeEntry::Removed,
            Some(now) if self.0.metadata.get(key) == Some(now) => NativeEntry::Kept,
            Some(now) => NativeEntry::Changed(now),
        }
    }

    /// The entries of `current` that were not received (added by the application).
    pub fn added<'a>(&'a self, current: &'a Metadata) -> impl Iterator<Item = (&'a str, &'a str)> {
        current
            .iter()
            .filter(move |(k, _)| !self.0.metadata.contains_key(k))
    }
}

impl fmt::Debug for Native {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Native")
            .field("broker", &self.0.broker)
            .finish_non_exhaustive()
    }
}
