//! The AMQP record kept with every received message ([`AmqpEnvelope`]), and the editable
//! copy of AMQP basic properties the encoder works on.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use tidemill_core::{Message, Native};

use crate::BROKER;

/// What RabbitMQ delivered, kept with a received message (its
/// [`Native`](tidemill_core::Native) record): exchange, routing key, redelivered flag,
/// delivery tag, the queue it came from, and every basic property with the headers as
/// AMQP-typed values ([`FieldTable`]).
///
/// Handlers that use the string view ([`Message::metadata`]) need none of this. It is for
/// reading what the string view cannot show (typed and binary header values, the routing
/// key, `delivery_mode`, ...) and it is what makes a pass-through hop faithful: when
/// [`AmqpPublisher`](crate::AmqpPublisher) publishes a message that carries an envelope, it
/// starts from the envelope's properties, headers and routing key and applies only what the
/// application changed in the string view (see the crate docs, "Messages on the wire").
///
/// The envelope describes the message as its producer published it plus what the broker
/// added, without the traces of Tidemill's own delayed redelivery: after
/// `nack_with_delay` a message comes back through the default exchange from a delay queue,
/// and the envelope still shows the exchange, routing key, `expiration` and headers of the
/// original delivery (the delay queue's `x-death` entry and Tidemill's bookkeeping header
/// are removed).
///
/// ```no_run
/// use tidemill_amqp::AmqpEnvelope;
/// # fn handle(msg: &tidemill_core::Message) {
/// if let Some(envelope) = AmqpEnvelope::of(msg) {
///     println!("routing key {} via exchange {:?}", envelope.routing_key(), envelope.exchange());
///     if let Some(headers) = envelope.headers() {
///         for (name, value) in headers {
///             println!("{name}: {value:?}"); // typed: LongInt(42), Boolean(true), ...
///         }
///     }
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct AmqpEnvelope {
    pub(crate) exchange: ShortString,
    pub(crate) routing_key: ShortString,
    pub(crate) redelivered: bool,
    pub(crate) delivery_tag: u64,
    pub(crate) queue: Arc<str>,
    pub(crate) properties: BasicProperties,
    pub(crate) delivery_count: Option<u32>,
    /// The message key as decoded (from `tidemill-key`), to tell whether the application
    /// changed it.
    pub(crate) key: Option<Bytes>,
    /// Metadata key → the header it shows.
    pub(crate) header_sources: Vec<(String, ShortString)>,
    /// Headers the broker added on delivery (a quorum queue's `x-delivery-count`), which a
    /// republish leaves out.
    pub(crate) broker_headers: Vec<ShortString>,
}

impl AmqpEnvelope {
    /// The envelope of `msg`, if the AMQP adapter received it.
    pub fn of(msg: &Message) -> Option<&AmqpEnvelope> {
        Native::of::<AmqpEnvelope>(msg, BROKER)
    }

    /// The exchange the message was published to (`""`: the default exchange).
    pub fn exchange(&self) -> &str {
        self.exchange.as_str()
    }

    /// The routing key it was published with.
    pub fn routing_key(&self) -> &str {
        self.routing_key.as_str()
    }

    /// Whether it was delivered before: the broker's `redelivered` flag (after a nack, a
    /// lost channel or connection), or it comes back after `nack_with_delay`.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// The delivery tag on the subscription's channel (for logs; settle the delivery
    /// through Tidemill's `Delivery`).
    pub fn delivery_tag(&self) -> u64 {
        self.delivery_tag
    }

    /// The queue the message was consumed from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Every basic property (`content_type()`, `content_encoding()`, `headers()`,
    /// `delivery_mode()`, `priority()`, `correlation_id()`, `reply_to()`, `expiration()`,
    /// `message_id()`, `timestamp()`, `kind()` (the `type` property), `user_id()`,
    /// `app_id()`, `cluster_id()`), as lapin's [`BasicProperties`].
    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    /// The headers with their AMQP types, including those the broker added (`x-death`,
    /// a quorum queue's `x-delivery-count` on redeliveries).
    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }

    /// The `delivery_mode` property: `Some(2)` persistent, `Some(1)` or `None` transient.
    pub fn delivery_mode(&self) -> Option<u8> {
        *self.properties.delivery_mode()
    }

    /// The `message_id` property.
    pub fn message_id(&self) -> Option<&str> {
        self.properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str)
    }

    /// How often a quorum queue delivered the message before (its `x-delivery-count`,
    /// counted by the broker); `None` on classic queues and on a first delivery.
    pub fn delivery_count(&self) -> Option<u32> {
        self.delivery_count
    }
}

/// AMQP basic properties as plain fields, to edit (lapin's type only adds).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Props {
    pub(crate) content_type: Option<ShortString>,
    pub(crate) content_encoding: Option<ShortString>,
    pub(crate) headers: Option<BTreeMap<ShortString, AMQPValue>>,
    pub(crate) delivery_mode: Option<u8>,
    pub(crate) priority: Option<u8>,
    pub(crate) correlation_id: Option<ShortString>,
    pub(crate) reply_to: Option<ShortString>,
    pub(crate) expiration: Option<ShortString>,
    pub(crate) message_id: Option<ShortString>,
    pub(crate) timestamp: Option<u64>,
    pub(crate) kind: Option<ShortString>,
    pub(crate) user_id: Option<ShortString>,
    pub(crate) app_id: Option<ShortString>,
    pub(crate) cluster_id: Option<ShortString>,
}

impl Props {
    pub(crate) fn from_basic(p: &BasicProperties) -> Self {
        Props {
            content_type: p.content_type().clone(),
            content_encoding: p.content_encoding().clone(),
            headers: p.headers().as_ref().map(|h| h.inner().clone()),
            delivery_mode: *p.delivery_mode(),
            priority: *p.priority(),
            correlation_id: p.correlation_id().clone(),
            reply_to: p.reply_to().clone(),
            expiration: p.expiration().clone(),
            message_id: p.message_id().clone(),
            timestamp: *p.timestamp(),
            kind: p.kind().clone(),
            user_id: p.user_id().clone(),
            app_id: p.app_id().clone(),
            cluster_id: p.cluster_id().clone(),
        }
    }

    pub(crate) fn into_basic(self) -> BasicProperties {
        let mut p = BasicProperties::default();
        macro_rules! set {
            ($($field:ident => $with:ident),* $(,)?) => {
                $(if let Some(v) = self.$field { p = p.$with(v); })*
            };
        }
        set!(
            content_type => with_content_type,
            content_encoding => with_content_encoding,
            delivery_mode => with_delivery_mode,
            priority => with_priority,
            correlation_id => with_correlation_id,
            reply_to => with_reply_to,
            expiration => with_expiration,
            message_id => with_message_id,
            timestamp => with_timestamp,
            kind => with_type,
            user_id => with_user_id,
            app_id => with_app_id,
            cluster_id => with_cluster_id,
        );
        if let Some(headers) = self.headers {
            p = p.with_headers(FieldTable::from(headers));
        }
        p
    }

    /// The headers, created empty if there are none.
    pub(crate) fn headers_mut(&mut self) -> &mut BTreeMap<ShortString, AMQPValue> {
        self.headers.get_or_insert_with(BTreeMap::new)
    }

    /// The property behind metadata key `name` (one of [`PROPERTY_KEYS`](crate::PROPERTY_KEYS)
    /// except timestamp and priority, which are not strings).
    pub(crate) fn text_property(&mut self, name: &str) -> Option<&mut Option<ShortString>> {
        Some(match name {
            "amqp.content-type" => &mut self.content_type,
            "amqp.content-encoding" => &mut self.content_encoding,
            "amqp.correlation-id" => &mut self.correlation_id,
            "amqp.reply-to" => &mut self.reply_to,
            "amqp.expiration" => &mut self.expiration,
            "amqp.message-id" => &mut self.message_id,
            "amqp.type" => &mut self.kind,
            "amqp.app-id" => &mut self.app_id,
            "amqp.user-id" => &mut self.user_id,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn props_convert_both_ways_unchanged() {
        let mut headers = FieldTable::default();
        headers.insert("n".into(), AMQPValue::LongInt(1));
        let p = BasicProperties::default()
            .with_content_type("a/b".into())
            .with_content_encoding("gzip".into())
            .with_headers(headers)
            .with_delivery_mode(1)
            .with_priority(3)
            .with_correlation_id("c".into())
            .with_reply_to("r".into())
            .with_expiration("60000".into())
            .with_message_id("m".into())
            .with_timestamp(5)
            .with_type("t".into())
            .with_user_id("guest".into())
            .with_app_id("app".into())
            .with_cluster_id("cl".into());
        assert_eq!(Props::from_basic(&p).into_basic(), p);
        let empty = BasicProperties::default();
        assert_eq!(Props::from_basic(&empty).into_basic(), empty);
    }
}
