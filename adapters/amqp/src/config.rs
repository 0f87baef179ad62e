//! Configuration of the AMQP adapter.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use serde::{Deserialize, Serialize};
use tidemill_core::{Error, Result};

use crate::BROKER;

/// RabbitMQ's default `max_message_size` (128 MiB), the default of
/// [`AmqpConfig::max_message_size`].
pub const RABBITMQ_MAX_MESSAGE_BYTES: usize = 128 * 1024 * 1024;

/// The longest name AMQP accepts for an exchange, queue or routing key, in bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// Configuration shared by [`AmqpPublisher`](crate::AmqpPublisher) and
/// [`AmqpSubscriber`](crate::AmqpSubscriber).
///
/// Every field has a default, so a configuration file only names what it changes.
/// Durations are humantime strings in configuration files (`"10s"`, `"250ms"`, `"1m"`).
/// Name templates may use `{topic}`, `{group}` (group queues) and `{id}` (a random id, for
/// subscriptions without a group).
///
/// ```
/// use std::time::Duration;
/// use tidemill_amqp::{AmqpConfig, ExchangeType, QueueType};
///
/// let config: AmqpConfig = serde_json::from_str(r#"{
///     "url": "amqp://app:secret@rabbit.internal:5672/orders",
///     "exchange_type": "topic",
///     "queue_type": "quorum",
///     "delivery_limit": 10,
///     "dead_letter_exchange": "orders.dead",
///     "prefetch": 32,
///     "connect_timeout": "3s",
///     "queue_arguments": { "x-max-length": 100000 }
/// }"#).unwrap();
/// assert_eq!(config.exchange_type, ExchangeType::Topic);
/// assert_eq!(config.queue_type, QueueType::Quorum);
/// assert_eq!(config.connect_timeout, Duration::from_secs(3));
/// assert!(config.persistent); // a default
/// config.validate().unwrap();
/// ```
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// The broker's AMQP URI: `amqp://user:password@host:port/vhost` (the vhost
    /// URL-encoded: `%2f` is `/`), or `amqps://` for TLS (feature `tls`, on by default:
    /// lapin's rustls with the platform's trust store). Query parameters lapin understands
    /// (`heartbeat`, `frame_max`, `channel_max`) are honoured. Error messages name the
    /// address without the password.
    ///
    /// **A cluster**: several URIs separated by commas, one per node
    /// (`amqp://app:pw@rabbit1:5672/%2f,amqp://app:pw@rabbit2:5672/%2f`). Each connection
    /// tries the nodes in list order (or shuffled, [`shuffle_nodes`](Self::shuffle_nodes))
    /// and keeps the first that accepts it; after losing a connection it starts with the
    /// node after the lost one, so the node that just failed is tried last. Each entry is a
    /// whole URI (credentials, vhost and query of their own); a comma inside a host or
    /// vhost is refused (write it `%2C`), a comma inside a password is fine.
    /// Default: `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: String,

    /// With several nodes in [`url`](Self::url): try them in a random order (every
    /// connection shuffles anew; after a lost connection the lost node still comes last),
    /// which spreads many clients sharing one list over the cluster. Off, the list order is
    /// a preference: connections go to the first node that answers. Default: `false`.
    pub shuffle_nodes: bool,

    /// A name for the connections, shown by RabbitMQ's management UI and `rabbitmqctl
    /// list_connections`. Default: none.
    pub connection_name: Option<String>,

    /// How long connecting (TCP, TLS and the AMQP handshake) may take before it fails with an
    /// error naming the address. Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,

    /// The heartbeat interval requested from the broker, so a dead connection is noticed
    /// within about twice this long even when no traffic flows. `0s` leaves it to the broker
    /// (RabbitMQ: 60 s). A `heartbeat` query parameter in [`url`](Self::url) wins.
    /// Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,

    /// The longest a `publish` call may take: getting a connection (waiting while it
    /// reconnects), sending, and receiving every publisher confirm. Past it the call fails
    /// with a transient error; messages of the batch may or may not have been accepted.
    /// Default: `30s`.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,

    /// Reconnection: after a connection is lost, attempts start 100 ms apart and back off
    /// exponentially up to this interval, and never give up while a publisher or
    /// subscription is in use. Default: `5s`.
    #[serde(with = "humantime_serde")]
    pub reconnect_backoff_max: Duration,

    /// Declare the exchanges, queues and bindings the adapter uses (durable, idempotent).
    /// When `false` they must exist: the adapter checks with passive declarations and fails
    /// with an error naming the missing exchange or queue. Default: `true`.
    pub declare_topology: bool,

    /// The exchange a topic maps to: `{topic}` is replaced by the topic. Ignored when
    /// [`AmqpConfig::with_exchange_naming`] set a function. Default: `"{topic}"`.
    pub exchange_name: String,

    /// The type of the exchanges the adapter declares. Default: [`ExchangeType::Fanout`].
    pub exchange_type: ExchangeType,

    /// The queue of a consumer group: `{topic}` and `{group}` are replaced (it must use
    /// `{group}`, or every group would share one queue). Ignored when
    /// [`AmqpConfig::with_group_queue_naming`] set a function. Default: `"{topic}.{group}"`.
    pub group_queue_name: String,

    /// The exclusive queue of a subscription without a group: `{topic}` and `{id}` (random,
    /// required) are replaced. Ignored when [`AmqpConfig::with_broadcast_queue_naming`] set a
    /// function. Default: `"{topic}.tidemill-{id}"`.
    pub broadcast_queue_name: String,

    /// The binding key of the queues bound to `topic` and `direct` exchanges (`fanout`
    /// exchanges ignore it; `headers` exchanges bind with
    /// [`binding_arguments`](Self::binding_arguments)). The default `#` matches every
    /// routing key on a topic exchange; a `direct` exchange needs an actual key. Messages
    /// are published with their key as routing key (see the crate docs). Default: `"#"`.
    pub binding_key: String,

    /// Arguments of the queue bindings (e.g. `x-match` and the headers for a `headers`
    /// exchange). Default: none.
    pub binding_arguments: BTreeMap<String, serde_json::Value>,

    /// Publish messages as persistent (delivery mode 2), so a durable queue keeps them
    /// across a broker restart. Default: `true`.
    pub persistent: bool,

    /// Publish with the `mandatory` flag: a message that no queue receives (nothing bound
    /// to the exchange, or no binding matches) is returned by the broker, and `publish`
    /// fails with an error naming the exchange. Default: `false` (such messages are
    /// dropped, as the AMQP model has it).
    pub mandatory: bool,

    /// The largest message body the publisher sends; a larger one fails with
    /// `Error::MessageTooLarge` before anything is sent. Set it to the broker's
    /// `max_message_size`. From 1 to the platform's `usize::MAX`. Default: 128 MiB
    /// ([`RABBITMQ_MAX_MESSAGE_BYTES`]).
    #[serde(deserialize_with = "strict::usize_at_least_1")]
    pub max_message_size: usize,

    /// Consumer prefetch (`basic.qos`): how many unacknowledged messages the broker sends a
    /// subscription ahead, from 0 to 65535; `0` means unlimited. Ignored when
    /// [`ordered`](Self::ordered) is on. Default: `128`.
    #[serde(deserialize_with = "strict::u16_any")]
    pub prefetch: u16,

    /// Ordered consumption (see the crate docs on ordering): each subscription takes one
    /// message at a time (prefetch 1), so with a single consumer on a queue messages are
    /// handled in queue order and the next one is not delivered while one is unsettled. A
    /// nacked message with a key goes back to the head of the queue and comes again before
    /// its successors; a nacked message without a key (which has no order to keep) is
    /// re-published to the back of the queue (confirmed, then acked), so it cannot hold up
    /// the queue. Default: `false`.
    pub ordered: bool,

    /// The type of the durable queues of consumer groups. Subscriptions without a group
    /// always use an exclusive classic queue. Default: [`QueueType::Classic`].
    pub queue_type: QueueType,

    /// Extra arguments of the group queues the adapter declares (`x-message-ttl`,
    /// `x-max-length`, `x-overflow`, `x-queue-mode`, ...). JSON numbers become AMQP
    /// integers (or doubles), strings long strings, arrays and objects field arrays and
    /// tables. A queue that already exists with different arguments makes `subscribe` fail
    /// with the broker's PRECONDITION_FAILED naming the queue. Default: none.
    pub queue_arguments: BTreeMap<String, serde_json::Value>,

    /// Broker-side dead-lettering for group queues (`x-dead-letter-exchange`): messages that
    /// expire, overflow the queue or pass [`delivery_limit`](Self::delivery_limit) are
    /// republished to this exchange. Default: none.
    pub dead_letter_exchange: Option<String>,

    /// The routing key of dead-lettered messages (`x-dead-letter-routing-key`). Default:
    /// none (the message's own routing key).
    pub dead_letter_routing_key: Option<String>,

    /// For quorum queues (`x-delivery-limit`): after this many redeliveries a message is
    /// dead-lettered (or dropped without a dead-letter exchange). From 1 to 4294967295.
    /// Requires [`QueueType::Quorum`]. Default: none.
    #[serde(deserialize_with = "strict::optional_u32_at_least_1")]
    pub delivery_limit: Option<u32>,

    /// Where a message's uuid travels (see the crate docs, "Identity"): Tidemill's
    /// convention (`tidemill`, the default), Watermill's `_watermill_message_uuid` header
    /// (`watermill`), the `message_id` property as it is (`message_id`), or a header of your
    /// choice (`{"header": "x-id"}`).
    pub message_uuid: UuidCarrier,

    /// Naming functions that override the templates (set with the `with_*_naming` methods;
    /// not part of the serialised configuration).
    #[serde(skip)]
    pub naming: Naming,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            shuffle_nodes: false,
            connection_name: None,
            connect_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(30),
            reconnect_backoff_max: Duration::from_secs(5),
            declare_topology: true,
            exchange_name: "{topic}".to_owned(),
            exchange_type: ExchangeType::Fanout,
            group_queue_name: "{topic}.{group}".to_owned(),
            broadcast_queue_name: "{topic}.tidemill-{id}".to_owned(),
            binding_key: "#".to_owned(),
            binding_arguments: BTreeMap::new(),
            persistent: true,
            mandatory: false,
            max_message_size: RABBITMQ_MAX_MESSAGE_BYTES,
            prefetch: 128,
            ordered: false,
            queue_type: QueueType::Classic,
            queue_arguments: BTreeMap::new(),
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            delivery_limit: None,
            message_uuid: UuidCarrier::default(),
            naming: Naming::default(),
        }
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact(&self.url))
            .field("shuffle_nodes", &self.shuffle_nodes)
            .field("connection_name", &self.connection_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("publish_timeout", &self.publish_timeout)
            .field("reconnect_backoff_max", &self.reconnect_backoff_max)
            .field("declare_topology", &self.declare_topology)
            .field("exchange_name", &self.exchange_name)
            .field("exchange_type", &self.exchange_type)
            .field("group_queue_name", &self.group_queue_name)
            .field("broadcast_queue_name", &self.broadcast_queue_name)
            .field("binding_key", &self.binding_key)
            .field("binding_arguments", &self.binding_arguments)
            .field("persistent", &self.persistent)
            .field("mandatory", &self.mandatory)
            .field("max_message_size", &self.max_message_size)
            .field("prefetch", &self.prefetch)
            .field("ordered", &self.ordered)
            .field("queue_type", &self.queue_type)
            .field("queue_arguments", &self.queue_arguments)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("dead_letter_routing_key", &self.dead_letter_routing_key)
            .field("delivery_limit", &self.delivery_limit)
            .field("message_uuid", &self.message_uuid)
            .field("naming", &self.naming)
            .finish()
    }
}

/// The AMQP exchange type of the exchanges the adapter declares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeType {
    /// Every bound queue gets every message; routing keys are ignored.
    #[default]
    Fanout,
    /// Queues receive the messages whose routing key matches their binding pattern
    /// (`*` one word, `#` any number of words).
    Topic,
    /// Queues receive the messages whose routing key equals their binding key.
    Direct,
    /// Queues receive the messages whose headers match their binding arguments.
    Headers,
}

impl ExchangeType {
    pub(crate) fn kind(self) -> lapin::ExchangeKind {
        match self {
            ExchangeType::Fanout => lapin::ExchangeKind::Fanout,
            ExchangeType::Topic => lapin::ExchangeKind::Topic,
            ExchangeType::Direct => lapin::ExchangeKind::Direct,
            ExchangeType::Headers => lapin::ExchangeKind::Headers,
        }
    }
}

/// The type of the durable queues of consumer groups.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// RabbitMQ's classic queue: a nacked message returns to its place at the head.
    #[default]
    Classic,
    /// A replicated quorum queue (`x-queue-type: quorum`): the broker counts deliveries
    /// (`x-delivery-count`, reported by `Delivery::attempt`) and can dead-letter after
    /// [`AmqpConfig::delivery_limit`].
    Quorum,
}

/// Where a message's uuid travels on the wire (see the crate docs, "Identity").
///
/// In configuration files: `"tidemill"`, `"watermill"`, `"message_id"` or
/// `{"header": "<name>"}`.
///
/// ```
/// use tidemill_amqp::{AmqpConfig, UuidCarrier};
/// let c: AmqpConfig = serde_json::from_str(r#"{"message_uuid": "watermill"}"#).unwrap();
/// assert_eq!(c.message_uuid, UuidCarrier::Watermill);
/// assert_eq!(c.message_uuid.header(), Some("_watermill_message_uuid"));
/// let c: AmqpConfig = serde_json::from_str(r#"{"message_uuid": {"header": "x-id"}}"#).unwrap();
/// assert_eq!(c.message_uuid, UuidCarrier::Header("x-id".into()));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UuidCarrier {
    /// Tidemill's convention: read from the `tidemill-uuid` header, else from the
    /// `message_id` property; written to `message_id` (and to the `tidemill-uuid` header
    /// when `message_id` holds something else or the uuid is longer than 255 bytes).
    #[default]
    Tidemill,
    /// Watermill's: the `_watermill_message_uuid` header (read, else `message_id`;
    /// written to the header only), so Tidemill and Watermill services share message ids.
    Watermill,
    /// The `message_id` property as it is: read from it, written to it (a uuid longer than
    /// 255 bytes cannot be published); no uuid header.
    MessageId,
    /// A header of your choice, like [`Watermill`](Self::Watermill) with another name.
    Header(String),
}

impl UuidCarrier {
    /// The header that carries the uuid; `None` for [`MessageId`](Self::MessageId).
    pub fn header(&self) -> Option<&str> {
        match self {
            UuidCarrier::Tidemill => Some(tidemill_core::headers::UUID_HEADER),
            UuidCarrier::Watermill => Some(WATERMILL_UUID_HEADER),
            UuidCarrier::MessageId => None,
            UuidCarrier::Header(name) => Some(name),
        }
    }
}

/// The header Watermill's AMQP marshaler keeps the message uuid in.
pub const WATERMILL_UUID_HEADER: &str = "_watermill_message_uuid";

type ExchangeFn = dyn Fn(&str) -> String + Send + Sync;
type GroupQueueFn = dyn Fn(&str, &str) -> String + Send + Sync;

/// Naming functions overriding [`AmqpConfig`]'s name templates. Set them with
/// [`AmqpConfig::with_exchange_naming`], [`AmqpConfig::with_group_queue_naming`] and
/// [`AmqpConfig::with_broadcast_queue_naming`].
#[derive(Clone, Default)]
pub struct Naming {
    exchange: Option<Arc<ExchangeFn>>,
    group_queue: Option<Arc<GroupQueueFn>>,
    broadcast_queue: Option<Arc<GroupQueueFn>>,
}

impl fmt::Debug for Naming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Naming")
            .field("exchange", &self.exchange.is_some())
            .field("group_queue", &self.group_queue.is_some())
            .field("broadcast_queue", &self.broadcast_queue.is_some())
            .finish()
    }
}

impl AmqpConfig {
    /// The default configuration for the broker at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        AmqpConfig {
            url: url.into(),
            ..AmqpConfig::default()
        }
    }

    /// Names the exchange of each topic with `f(topic)` instead of
    /// [`exchange_name`](Self::exchange_name).
    ///
    /// ```
    /// use tidemill_amqp::AmqpConfig;
    /// let config = AmqpConfig::default().with_exchange_naming(|topic| format!("app.{topic}"));
    /// assert_eq!(config.exchange_for("orders").unwrap(), "app.orders");
    /// ```
    pub fn with_exchange_naming(
        mut self,
        f: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> Self {
        self.naming.exchange = Some(Arc::new(f));
        self
    }

    /// Names the queue of consumer group `group` on `topic` with `f(topic, group)` instead of
    /// [`group_queue_name`](Self::group_queue_name).
    pub fn with_group_queue_naming(
        mut self,
        f: impl Fn(&str, &str) -> String + Send + Sync + 'static,
    ) -> Self {
        self.naming.group_queue = Some(Arc::new(f));
        self
    }

    /// Names the exclusive queue of a subscription without a group with `f(topic, id)` (`id`
    /// is random and must be part of the name) instead of
    /// [`broadcast_queue_name`](Self::broadcast_queue_name).
    pub fn with_broadcast_queue_naming(
        mut self,
        f: impl Fn(&str, &str) -> String + Send + Sync + 'static,
    ) -> Self {
        self.naming.broadcast_queue = Some(Arc::new(f));
        self
    }

    /// The exchange `topic` maps to.
    pub fn exchange_for(&self, topic: &str) -> Result<String> {
        let name = match &self.naming.exchange {
            Some(f) => f(topic),
            None => self.exchange_name.replace("{topic}", topic),
        };
        check_name("exchange", name)
    }

    /// The durable queue of consumer group `group` on `topic`.
    pub fn group_queue_for(&self, topic: &str, group: &str) -> Result<String> {
        let name = match &self.naming.group_queue {
            Some(f) => f(topic, group),
            None => self
                .group_queue_name
                .replace("{topic}", topic)
                .replace("{group}", group),
        };
        check_name("queue", name)
    }

    /// A fresh exclusive queue name for a subscription to `topic` without a group.
    pub(crate) fn broadcast_queue_for(&self, topic: &str) -> Result<String> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let id = &id[..16];
        let name = match &self.naming.broadcast_queue {
            Some(f) => f(topic, id),
            None => self
                .broadcast_queue_name
                .replace("{topic}", topic)
                .replace("{id}", id),
        };
        check_name("queue", name)
    }

    /// Checks every field; `connect` calls this first.
    pub fn validate(&self) -> Result<()> {
        self.nodes()?;
        if self.naming.exchange.is_none() && !self.exchange_name.contains("{topic}") {
            return Err(Error::config(
                BROKER,
                format!(
                    "exchange_name `{}` must contain {{topic}}, or every topic would share one exchange",
                    self.exchange_name
                ),
            ));
        }
        if self.naming.group_queue.is_none() && !self.group_queue_name.contains("{group}") {
            return Err(Error::config(
                BROKER,
                format!(
                    "group_queue_name `{}` must contain {{group}}, or every consumer group would share one queue",
                    self.group_queue_name
                ),
            ));
        }
        if self.naming.broadcast_queue.is_none() && !self.broadcast_queue_name.contains("{id}") {
            return Err(Error::config(
                BROKER,
                format!(
                    "broadcast_queue_name `{}` must contain {{id}}, or two subscriptions would collide",
                    self.broadcast_queue_name
                ),
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::config(BROKER, "connect_timeout must be positive"));
        }
        if self.publish_timeout.is_zero() {
            return Err(Error::config(BROKER, "publish_timeout must be positive"));
        }
        if self.reconnect_backoff_max.is_zero() {
            return Err(Error::config(
                BROKER,
                "reconnect_backoff_max must be positive",
            ));
        }
        if self.heartbeat.subsec_nanos() != 0 {
            return Err(Error::config(
                BROKER,
                format!(
                    "heartbeat {:?} is not a whole number of seconds (AMQP negotiates it in \
                     seconds, from 0 to {} s)",
                    self.heartbeat,
                    u16::MAX
                ),
            ));
        }
        if self.heartbeat.as_secs() > u64::from(u16::MAX) {
            return Err(Error::config(
                BROKER,
                format!(
                    "heartbeat {:?} is over AMQP's maximum of {} s",
                    self.heartbeat,
                    u16::MAX
                ),
            ));
        }
        if self.max_message_size == 0 {
            return Err(Error::config(BROKER, "max_message_size must be positive"));
        }
        if ShortString::try_new(self.binding_key.as_str()).is_err() {
            return Err(Error::config(
                BROKER,
                format!("binding_key is longer than {MAX_NAME_BYTES} bytes"),
            ));
        }
        if self.exchange_type == ExchangeType::Direct && self.binding_key == "#" {
            return Err(Error::config(
                BROKER,
                "binding_key \"#\" is a wildcard only for topic exchanges: with exchange_type = \"direct\" set the routing key the group queues should receive",
            ));
        }
        if self.delivery_limit == Some(0) {
            return Err(Error::config(
                BROKER,
                "delivery_limit must be from 1 to 4294967295 (0 would give up on a message at its \
                 first nack)",
            ));
        }
        if let Some(header) = self.message_uuid.header() {
            if header.is_empty() || header.len() > MAX_NAME_BYTES {
                return Err(Error::config(
                    BROKER,
                    format!(
                        "message_uuid: the header name must be 1 to {MAX_NAME_BYTES} bytes long"
                    ),
                ));
            }
            if RESERVED_HEADERS.contains(&header) {
                return Err(Error::config(
                    BROKER,
                    format!(
                        "message_uuid: header `{header}` is taken (by the key, the broker or \
                         Tidemill's redelivery bookkeeping)"
                    ),
                ));
            }
        }
        if self.delivery_limit.is_some() && self.queue_type != QueueType::Quorum {
            return Err(Error::config(
                BROKER,
                "delivery_limit needs queue_type = \"quorum\" (classic queues do not count deliveries)",
            ));
        }
        for (what, name) in [
            ("dead_letter_exchange", &self.dead_letter_exchange),
            ("dead_letter_routing_key", &self.dead_letter_routing_key),
        ] {
            if let Some(name) = name {
                if ShortString::try_new(name.as_str()).is_err() {
                    return Err(Error::config(
                        BROKER,
                        format!("{what} is longer than {MAX_NAME_BYTES} bytes"),
                    ));
                }
            }
        }
        json_table("queue_arguments", &self.queue_arguments)?;
        json_table("binding_arguments", &self.binding_arguments)?;
        Ok(())
    }

    /// The node list of [`url`](Self::url): each URI with the configured heartbeat applied,
    /// and its address without the password.
    pub(crate) fn nodes(&self) -> Result<Vec<(AMQPUri, String)>> {
        let entries = split_nodes(&self.url);
        let count = entries.len();
        let which = |n: usize| {
            if count == 1 {
                "url".to_owned()
            } else {
                format!("url (node {} of {count})", n + 1)
            }
        };
        let mut nodes = Vec::with_capacity(count);
        for (n, entry) in entries.into_iter().enumerate() {
            if entry.is_empty() {
                return Err(Error::config(
                    BROKER,
                    format!(
                        "{} is empty: separate the nodes' URIs with single commas",
                        which(n)
                    ),
                ));
            }
            let uri = parse_one(entry, &which(n))?;
            if host_and_path(entry).contains(',') {
                return Err(Error::config(
                    BROKER,
                    format!(
                        "{} `{}` has a comma in its host or vhost: give every node as a whole \
                         URI (amqp://user:password@host1:5672/%2f,amqp://user:password@host2:5672/%2f), \
                         and write a comma in a vhost as %2C",
                        which(n),
                        redact(entry)
                    ),
                ));
            }
            nodes.push((self.with_heartbeat(uri), redact(entry)));
        }
        Ok(nodes)
    }

    fn with_heartbeat(&self, mut uri: AMQPUri) -> AMQPUri {
        if uri.query.heartbeat.is_none() && !self.heartbeat.is_zero() {
            uri.query.heartbeat =
                Some(u16::try_from(self.heartbeat.as_secs().max(1)).unwrap_or(u16::MAX));
        }
        uri
    }

    /// The prefetch subscriptions use.
    pub(crate) fn effective_prefetch(&self) -> u16 {
        if self.ordered {
            1
        } else {
            self.prefetch
        }
    }

    /// The arguments of a group queue.
    pub(crate) fn group_queue_arguments(&self) -> Result<FieldTable> {
        let mut args = json_table("queue_arguments", &self.queue_arguments)?;
        if self.queue_type == QueueType::Quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        if let Some(dlx) = &self.dead_letter_exchange {
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(dlx.as_str().into()),
            );
        }
        if let Some(key) = &self.dead_letter_routing_key {
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(key.as_str().into()),
            );
        }
        if let Some(limit) = self.delivery_limit {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(limit)),
            );
        }
        Ok(args)
    }

    /// The arguments of queue bindings.
    pub(crate) fn binding_table(&self) -> Result<FieldTable> {
        json_table("binding_arguments", &self.binding_arguments)
    }
}

/// Headers the uuid cannot travel in.
const RESERVED_HEADERS: [&str; 4] = [
    tidemill_core::headers::KEY_HEADER,
    crate::convert::REDELIVERY_HEADER,
    crate::convert::DELIVERY_COUNT_HEADER,
    "x-death",
];

/// One node's URI, parsed; `which` names it in errors (`url`, `url (node 2 of 3)`).
fn parse_one(entry: &str, which: &str) -> Result<AMQPUri> {
    let uri = AMQPUri::from_str(entry).map_err(|e| {
        Error::config(
            BROKER,
            format!(
                "{which} `{}` is not an AMQP URI: {}",
                redact(entry),
                scrub(&e, entry)
            ),
        )
    })?;
    if cfg!(not(feature = "tls")) && uri.scheme == AMQPScheme::AMQPS {
        return Err(Error::config(
            BROKER,
            format!(
                "{which} `{}` asks for TLS (amqps://), but tidemill-amqp was built without its \
                 `tls` feature",
                redact(entry)
            ),
        ));
    }
    Ok(uri)
}

/// The entries of a node list: split at each comma that starts another URI
/// (`,amqp://…`), or that leaves an empty entry (`a,,b`, a trailing comma); a comma inside
/// a password stays where it is. Entries are trimmed.
pub(crate) fn split_nodes(url: &str) -> Vec<&str> {
    let mut entries = Vec::new();
    let mut start = 0;
    for (at, _) in url.match_indices(',') {
        let rest = url[at + 1..].trim_start();
        if rest.is_empty() || rest.starts_with(',') || starts_with_scheme(rest) {
            entries.push(url[start..at].trim());
            start = at + 1;
        }
    }
    entries.push(url[start..].trim());
    entries
}

/// Whether `text` starts with `scheme://`.
fn starts_with_scheme(text: &str) -> bool {
    text.split_once("://").is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    })
}

/// The host, port and vhost of a URI's text: after the userinfo, before the query.
fn host_and_path(entry: &str) -> &str {
    let rest = entry.split_once("://").map_or(entry, |(_, rest)| rest);
    let rest = rest.split_once('?').map_or(rest, |(before, _)| before);
    rest.rsplit_once('@').map_or(rest, |(_, after)| after)
}

/// The address of `url` (one URI or a node list) without passwords, for error messages,
/// `Debug` and logs.
pub(crate) fn redact(url: &str) -> String {
    let entries = split_nodes(url);
    if entries.len() == 1 {
        return redact_one(url);
    }
    entries
        .into_iter()
        .map(redact_one)
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one(url: &str) -> String {
    match AMQPUri::from_str(url) {
        Ok(uri) => display_uri(&uri),
        Err(_) => match url.rsplit_once('@') {
            // Unparsable: drop everything before the host, whatever it is.
            Some((_, host)) => format!("…@{host}"),
            None => url.to_owned(),
        },
    }
}

/// `text` (e.g. a parser's error, which may quote its input) without `url`'s userinfo.
/// (`url` may be a node list: every node's password is hidden.)
pub(crate) fn scrub(text: &str, url: &str) -> String {
    let mut text = text.replace(url, &redact(url));
    for entry in split_nodes(url) {
        text = text.replace(entry, &redact_one(entry));
        let rest = entry.split_once("://").map_or(entry, |(_, rest)| rest);
        if let Some((userinfo, _)) = rest.rsplit_once('@') {
            if let Some((_, password)) = userinfo.split_once(':') {
                if !password.is_empty() {
                    text = text.replace(password, "***");
                }
            }
        }
    }
    text
}

/// `scheme://user@host:port/vhost`, without the password.
fn display_uri(uri: &AMQPUri) -> String {
    let scheme = match uri.scheme {
        AMQPScheme::AMQP => "amqp",
        AMQPScheme::AMQPS => "amqps",
    };
    let vhost = if uri.vhost == "/" {
        "%2f".to_owned()
    } else {
        uri.vhost.clone()
    };
    let user = &uri.authority.userinfo.username;
    format!(
        "{scheme}://{user}@{}:{}/{vhost}",
        uri.authority.host, uri.authority.port
    )
}

fn check_name(what: &str, name: String) -> Result<String> {
    if name.is_empty() {
        return Err(Error::config(BROKER, format!("the {what} name is empty")));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(Error::config(
            BROKER,
            format!(
                "{what} name `{name}` is {} bytes, over AMQP's limit of {MAX_NAME_BYTES}",
                name.len()
            ),
        ));
    }
    Ok(name)
}

/// Converts a JSON map from the configuration into an AMQP field table.
fn json_table(what: &str, map: &BTreeMap<String, serde_json::Value>) -> Result<FieldTable> {
    let mut table = FieldTable::default();
    for (key, value) in map {
        let name = ShortString::try_new(key.as_str()).map_err(|_| {
            Error::config(
                BROKER,
                format!("{what}: key `{key}` is longer than {MAX_NAME_BYTES} bytes"),
            )
        })?;
        table.insert(name, json_value(what, key, value)?);
    }
    Ok(table)
}

fn json_value(what: &str, key: &str, value: &serde_json::Value) -> Result<AMQPValue> {
    use serde_json::Value;
    Ok(match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                AMQPValue::LongLongInt(i)
            } else if let Some(f) = n.as_f64() {
                AMQPValue::Double(f)
            } else {
                return Err(Error::config(
                    BROKER,
                    format!("{what}: `{key}` = {n} does not fit a signed 64-bit integer"),
                ));
            }
        }
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items
                .iter()
                .map(|v| json_value(what, key, v))
                .collect::<Result<Vec<_>>>()?,
        )),
        Value::Object(map) => {
            let map: BTreeMap<String, Value> =
                map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            AMQPValue::FieldTable(json_table(what, &map)?)
        }
    })
}

/// Deserializers for numeric options that accept integers only and name the allowed range
/// (serde's own say "expected u16"; a float, a boolean or a word is refused, never rounded
/// or converted).
mod strict {
    use std::fmt;

    use serde::de::{self, Deserializer, Unexpected, Visitor};

    struct Int {
        min: i128,
        max: i128,
    }

    impl Int {
        fn check<E: de::Error>(&self, v: i128) -> Result<i128, E> {
            if (self.min..=self.max).contains(&v) {
                Ok(v)
            } else {
                Err(E::invalid_value(Unexpected::Other(&v.to_string()), self))
            }
        }
    }

    impl<'de> Visitor<'de> for Int {
        type Value = i128;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "an integer from {} to {}", self.min, self.max)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i128, E> {
            self.check(v.into())
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i128, E> {
            self.check(v.into())
        }

        fn visit_i128<E: de::Error>(self, v: i128) -> Result<i128, E> {
            self.check(v)
        }

        fn visit_u128<E: de::Error>(self, v: u128) -> Result<i128, E> {
            self.check(i128::try_from(v).unwrap_or(i128::MAX))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<i128, E> {
            // Text sources (environment, URL query): plain digits with an optional sign.
            let digits = v.strip_prefix(['+', '-']).unwrap_or(v);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(E::invalid_value(Unexpected::Str(v), &self));
            }
            match v.parse::<i128>() {
                Ok(n) => self.check(n),
                Err(_) => Err(E::invalid_value(Unexpected::Str(v), &self)),
            }
        }
    }

    fn int<'de, D: Deserializer<'de>>(d: D, min: i128, max: i128) -> Result<i128, D::Error> {
        d.deserialize_any(Int { min, max })
    }

    pub(super) fn u16_any<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
        let v = int(d, 0, u16::MAX.into())?;
        Ok(u16::try_from(v).unwrap_or(u16::MAX))
    }

    pub(super) fn usize_at_least_1<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        let max = i128::try_from(usize::MAX).unwrap_or(i128::MAX);
        let v = int(d, 1, max)?;
        Ok(usize::try_from(v).unwrap_or(usize::MAX))
    }

    pub(super) fn optional_u32_at_least_1<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<u32>, D::Error> {
        struct Opt;
        impl<'de> Visitor<'de> for Opt {
            type Value = Option<u32>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an integer from 1 to {}, or nothing", u32::MAX)
            }
            fn visit_none<E: de::Error>(self) -> Result<Option<u32>, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Option<u32>, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<u32>, D::Error> {
                let v = int(d, 1, u32::MAX.into())?;
                Ok(Some(u32::try_from(v).unwrap_or(u32::MAX)))
            }
        }
        d.deserialize_option(Opt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqps_urls_need_the_tls_feature() {
        let result = AmqpConfig::new("amqps://app:secret@rabbit.internal:5671/%2f").validate();
        if cfg!(feature = "tls") {
            result.unwrap();
        } else {
            let message = result.unwrap_err().to_string();
            assert!(message.contains("`tls` feature"), "{message}");
            assert!(!message.contains("secret"), "{message}");
        }
    }

    #[test]
    fn defaults_validate_and_render_names() {
        let c = AmqpConfig::default();
        c.validate().unwrap();
        assert_eq!(c.exchange_for("orders").unwrap(), "orders");
        assert_eq!(
            c.group_queue_for("orders", "billing").unwrap(),
            "orders.billing"
        );
        let a = c.broadcast_queue_for("orders").unwrap();
        let b = c.broadcast_queue_for("orders").unwrap();
        assert!(a.starts_with("orders.tidemill-"), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn naming_functions_override_templates() {
        let c = AmqpConfig::default()
            .with_exchange_naming(|t| format!("x.{t}"))
            .with_group_queue_naming(|t, g| format!("{g}@{t}"))
            .with_broadcast_queue_naming(|t, id| format!("tmp.{t}.{id}"));
        assert_eq!(c.exchange_for("a").unwrap(), "x.a");
        assert_eq!(c.group_queue_for("a", "g").unwrap(), "g@a");
        assert!(c.broadcast_queue_for("a").unwrap().starts_with("tmp.a."));
    }

    #[test]
    fn bad_configurations_are_refused_with_the_option_named() {
        let err = |c: AmqpConfig| c.validate().unwrap_err().to_string();
        assert!(err(AmqpConfig::new("http://x")).contains("url"));
        let c = AmqpConfig {
            group_queue_name: "{topic}".into(),
            ..AmqpConfig::default()
        };
        assert!(err(c).contains("group_queue_name"));
        let c = AmqpConfig {
            delivery_limit: Some(3),
            ..AmqpConfig::default()
        };
        assert!(err(c).contains("delivery_limit"));
        let c = AmqpConfig {
            exchange_type: ExchangeType::Direct,
            ..AmqpConfig::default()
        };
        assert!(err(c).contains("binding_key"));
        let c = AmqpConfig {
            connect_timeout: Duration::ZERO,
            ..AmqpConfig::default()
        };
        assert!(err(c).contains("connect_timeout"));
        let long = "t".repeat(300);
        let e = AmqpConfig::default().exchange_for(&long).unwrap_err();
        assert!(e.to_string().contains("255"), "{e}");
    }

    #[test]
    fn unknown_fields_and_bad_values_fail_to_deserialize() {
        assert!(serde_json::from_str::<AmqpConfig>(r#"{"prefetchh": 3}"#).is_err());
        assert!(serde_json::from_str::<AmqpConfig>(r#"{"exchange_type": "nope"}"#).is_err());
        assert!(serde_json::from_str::<AmqpConfig>(r#"{"heartbeat": "soon"}"#).is_err());
    }

    #[test]
    fn numbers_are_integers_in_range_and_errors_say_the_range() {
        let err = |json: &str| match serde_json::from_str::<AmqpConfig>(json) {
            Ok(c) => c
                .validate()
                .err()
                .unwrap_or_else(|| panic!("{json} accepted"))
                .to_string(),
            Err(e) => e.to_string(),
        };
        for json in [
            r#"{"prefetch": -5}"#,
            r#"{"prefetch": 70000}"#,
            r#"{"prefetch": 1e3}"#,
            r#"{"prefetch": 1.5}"#,
            r#"{"prefetch": 99999999999999999999999}"#,
            r#"{"prefetch": true}"#,
            r#"{"prefetch": "yes"}"#,
        ] {
            let e = err(json);
            assert!(e.contains("an integer from 0 to 65535"), "{json}: {e}");
        }
        let e = err(r#"{"max_message_size": 0}"#);
        assert!(e.contains("an integer from 1 to"), "{e}");
        let e = err(r#"{"max_message_size": -1}"#);
        assert!(e.contains("an integer from 1 to"), "{e}");
        for json in [
            r#"{"queue_type": "quorum", "delivery_limit": 0}"#,
            r#"{"queue_type": "quorum", "delivery_limit": -3}"#,
            r#"{"queue_type": "quorum", "delivery_limit": 2.5}"#,
            r#"{"queue_type": "quorum", "delivery_limit": 4294967296}"#,
        ] {
            let e = err(json);
            assert!(e.contains("from 1 to 4294967295"), "{json}: {e}");
        }
        let c = AmqpConfig {
            queue_type: QueueType::Quorum,
            delivery_limit: Some(0),
            ..AmqpConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("from 1 to"));
        let e = err(r#"{"persistent": "yes"}"#);
        assert!(e.contains("boolean"), "{e}");
        let e = err(r#"{"heartbeat": "1500ms"}"#);
        assert!(e.contains("whole number of seconds"), "{e}");
        let e = err(r#"{"message_uuid": {"header": ""}}"#);
        assert!(e.contains("message_uuid"), "{e}");
        let e = err(r#"{"message_uuid": {"header": "tidemill-key"}}"#);
        assert!(e.contains("taken"), "{e}");
        // Text sources (environment, URL query) give digits as strings.
        let c: AmqpConfig =
            serde_json::from_str(r#"{"prefetch": "7", "delivery_limit": null}"#).unwrap();
        assert_eq!((c.prefetch, c.delivery_limit), (7, None));
        let c: AmqpConfig =
            serde_json::from_str(r#"{"queue_type": "quorum", "delivery_limit": 3}"#).unwrap();
        assert_eq!(c.delivery_limit, Some(3));
        c.validate().unwrap();
    }

    #[test]
    fn malformed_urls_never_show_the_password() {
        for url in [
            "user:hunter2@somehost:1234/vh",
            "amqp://user:hunter2@somehost:notaport/vh",
            "amqp://user:hunter2@somehost/vh?heartbeat=soon",
            "amqp://user:hun@ter2@somehost/vh",
            "http://user:hunter2@somehost/",
            "amqp://user:hunter2@[::1/",
        ] {
            let c = AmqpConfig::new(url);
            let shown = format!("{c:?}");
            assert!(
                !shown.contains("hunter2") && !shown.contains("ter2"),
                "{shown}"
            );
            if let Err(e) = c.validate() {
                let text = e.to_string();
                assert!(
                    !text.contains("hunter2") && !text.contains("ter2"),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn passwords_never_show() {
        let c = AmqpConfig::new("amqp://user:s3cret@host:1234/vh");
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("amqp://user@host:1234/vh"), "{shown}");
        assert!(!redact("amqp://u:s3cret@").contains("s3cret"));
    }

    const LIST: &str = "amqp://app:pw1@rabbit1:5672/%2f, amqp://app:pw2@rabbit2:5673/orders?frame_max=8192,amqps://other:pw3@rabbit3/%2f";

    #[test]
    fn a_node_list_is_split_at_each_uri() {
        assert_eq!(
            split_nodes(LIST),
            [
                "amqp://app:pw1@rabbit1:5672/%2f",
                "amqp://app:pw2@rabbit2:5673/orders?frame_max=8192",
                "amqps://other:pw3@rabbit3/%2f"
            ]
        );
        assert_eq!(split_nodes("amqp://h/%2f"), ["amqp://h/%2f"]);
        // A comma in a password does not start a node.
        assert_eq!(
            split_nodes("amqp://u:pa,ss@h1/%2f,amqp://u:x@h2/%2f"),
            ["amqp://u:pa,ss@h1/%2f", "amqp://u:x@h2/%2f"]
        );
        // Empty entries are kept, to be refused.
        assert_eq!(split_nodes("amqp://a/%2f,"), ["amqp://a/%2f", ""]);
        assert_eq!(
            split_nodes("amqp://a/%2f,,amqp://b/%2f"),
            ["amqp://a/%2f", "", "amqp://b/%2f"]
        );
    }

    #[test]
    fn every_node_of_a_list_is_parsed_with_its_own_settings() {
        let c = AmqpConfig {
            heartbeat: Duration::from_secs(7),
            ..AmqpConfig::new(LIST)
        };
        c.validate().unwrap();
        let nodes = c.nodes().unwrap();
        let addresses: Vec<&str> = nodes.iter().map(|(_, a)| a.as_str()).collect();
        assert_eq!(
            addresses,
            [
                "amqp://app@rabbit1:5672/%2f",
                "amqp://app@rabbit2:5673/orders",
                "amqps://other@rabbit3:5671/%2f"
            ]
        );
        let (first, second, third) = (&nodes[0].0, &nodes[1].0, &nodes[2].0);
        assert_eq!(first.authority.userinfo.password, "pw1");
        assert_eq!(second.authority.userinfo.password, "pw2");
        assert_eq!(third.authority.userinfo.username, "other");
        assert_eq!((first.authority.port, second.authority.port), (5672, 5673));
        assert_eq!(second.vhost, "orders");
        assert_eq!(second.query.frame_max, Some(8192));
        assert_eq!(third.scheme, AMQPScheme::AMQPS);
        // The configured heartbeat applies to every node.
        assert!(nodes.iter().all(|(u, _)| u.query.heartbeat == Some(7)));
        // A password with a comma in it.
        let c = AmqpConfig::new("amqp://u:pa,ss@h1/%2f,amqp://u:x@h2/%2f");
        let nodes = c.nodes().unwrap();
        assert_eq!(nodes[0].0.authority.userinfo.password, "pa,ss");
        assert_eq!(nodes[1].0.authority.host, "h2");
    }

    #[test]
    fn bad_node_lists_are_refused_naming_the_node() {
        let err = |url: &str| AmqpConfig::new(url).validate().unwrap_err().to_string();
        let e = err("amqp://u:hunter2@h1/%2f,");
        assert!(e.contains("url (node 2 of 2) is empty"), "{e}");
        let e = err("amqp://u:hunter2@h1/%2f,,amqp://u:hunter2@h3/%2f");
        assert!(e.contains("node 2 of 3") && e.contains("empty"), "{e}");
        // Several hosts in one URI, or a bare host after a comma: whole URIs are needed.
        for url in [
            "amqp://u:hunter2@h1,h2/%2f",
            "amqp://u:hunter2@h1:5672/%2f,h2:5672",
        ] {
            let e = err(url);
            assert!(e.contains("comma in its host or vhost"), "{url}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        let e = err("amqp://u:hunter2@h1/%2f,amqp://u:hunter3@h2:nope/%2f,amqp://u:hunter4@h3/%2f");
        assert!(e.contains("url (node 2 of 3)"), "{e}");
        assert!(e.contains("not an AMQP URI"), "{e}");
        assert!(!e.contains("hunter"), "{e}");
        let e = err("amqp://u:hunter2@h1/%2f,http://u:hunter3@h2/");
        assert!(e.contains("node 2 of 2"), "{e}");
        assert!(!e.contains("hunter"), "{e}");
    }

    #[test]
    fn no_password_of_a_node_list_shows() {
        let c = AmqpConfig::new(LIST);
        let shown = format!("{c:?}");
        for secret in ["pw1", "pw2", "pw3"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(
            shown.contains(
                "amqp://app@rabbit1:5672/%2f,amqp://app@rabbit2:5673/orders,amqps://other@rabbit3:5671/%2f"
            ),
            "{shown}"
        );
        let c = AmqpConfig::new("amqp://u:hunter2@h1/%2f,amqp://u:hunter3@h2:nope/%2f");
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter"), "{shown}");
        let text = scrub(
            "failed: amqp://u:hunter3@h2:nope/%2f, password hunter2",
            "amqp://u:hunter2@h1/%2f,amqp://u:hunter3@h2:nope/%2f",
        );
        assert!(!text.contains("hunter"), "{text}");
    }

    #[test]
    fn a_node_list_comes_through_json_and_text() {
        let c: AmqpConfig = serde_json::from_str(
            r#"{"url": "amqp://g:g@127.0.0.1:5681/%2f,amqp://g:g@127.0.0.1:5682/%2f",
                "shuffle_nodes": true}"#,
        )
        .unwrap();
        assert!(c.shuffle_nodes);
        assert_eq!(c.nodes().unwrap().len(), 2);
        assert!(!AmqpConfig::default().shuffle_nodes);
    }

    #[test]
    fn queue_arguments_convert_to_amqp_values() {
        let c: AmqpConfig = serde_json::from_str(
            r#"{"queue_type": "quorum", "delivery_limit": 5, "dead_letter_exchange": "dlx",
                "queue_arguments": {"x-max-length": 10, "x-overflow": "reject-publish",
                                    "x-ratio": 0.5, "x-list": [1, "a"], "x-map": {"k": true}}}"#,
        )
        .unwrap();
        let args = c.group_queue_arguments().unwrap();
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(get("x-max-length"), Some(AMQPValue::LongLongInt(10)));
        assert_eq!(
            get("x-overflow"),
            Some(AMQPValue::LongString("reject-publish".into()))
        );
        assert_eq!(get("x-ratio"), Some(AMQPValue::Double(0.5)));
        assert_eq!(
            get("x-queue-type"),
            Some(AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(get("x-delivery-limit"), Some(AMQPValue::LongLongInt(5)));
        assert_eq!(
            get("x-dead-letter-exchange"),
            Some(AMQPValue::LongString("dlx".into()))
        );
        assert!(matches!(get("x-list"), Some(AMQPValue::FieldArray(_))));
        assert!(matches!(get("x-map"), Some(AMQPValue::FieldTable(_))));
    }
}
