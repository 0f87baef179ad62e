//! [`KafkaConfig`]: every setting of the adapter, serde-deserialisable.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use tidemill_core::{Error, Result};

use tidemill_core::headers::UUID_HEADER;

use crate::BROKER;

/// Where a subscription starts reading a partition for which it has no position: always
/// for a subscription without a consumer group, and for a consumer group that has no
/// committed offset yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// At the end of the partition: only messages published after `subscribe` (or, for a
    /// group, after `initialize`) returned are received. Kafka's own default.
    #[default]
    Latest,
    /// At the oldest message the broker still keeps: a new subscription first receives
    /// everything already in the topic.
    Earliest,
}

/// What a subscription keeps in order, and therefore what may be processed in parallel.
///
/// Kafka itself orders per partition, and the publisher sends every message with the same
/// key to the same partition, so both modes keep the order of every key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Messages with the same key are handed out one at a time, in partition order: the
    /// next one only after the previous was acked, a nacked one first again. Messages
    /// with different keys, and messages without a key, are handed out without waiting
    /// for each other, so a router handler with `concurrency(n)` processes them in
    /// parallel.
    #[default]
    Key,
    /// Every message of a partition waits for the previous one of that partition, with
    /// or without a key (strict Kafka partition order, also across redeliveries).
    /// Partitions are still processed in parallel.
    Partition,
}

/// Configuration of [`KafkaPublisher`](crate::KafkaPublisher) and
/// [`KafkaSubscriber`](crate::KafkaSubscriber).
///
/// Every field has a default (`KafkaConfig::default()`, or any field left out when
/// deserialising); unknown fields are rejected. Durations are written like `"10s"` or
/// `"250ms"`.
///
/// ```
/// use tidemill_kafka::{KafkaConfig, StartFrom};
///
/// let config: KafkaConfig = serde_json::from_str(r#"{
///     "brokers": "kafka-1:9092,kafka-2:9092",
///     "start_from": "earliest",
///     "partitions": 6,
///     "commit_interval": "500ms",
///     "properties": { "security.protocol": "ssl" }
/// }"#).unwrap();
/// assert_eq!(config.start_from, StartFrom::Earliest);
/// assert_eq!(config.partitions, 6);
/// assert_eq!(config.replication_factor, 1); // a default
/// config.validate().unwrap();
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port...]` (librdkafka `bootstrap.servers`).
    /// Default `127.0.0.1:9092`.
    pub brokers: String,
    /// Client id reported to the brokers (librdkafka `client.id`). Default `tidemill`.
    pub client_id: String,
    /// How long `connect` waits for the brokers to answer before failing with an error
    /// naming `brokers`. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Timeout of each administrative request: topic creation, metadata, committed offsets,
    /// watermarks, synchronous commits. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Prepended to every consumer group name to form the Kafka `group.id`
    /// (`SubscribeOptions::group("billing")` with prefix `staging.` joins `staging.billing`),
    /// e.g. to separate environments sharing a cluster or to match group ACLs. Also
    /// prefixes the private group id of subscriptions without a group. Default empty.
    pub group_prefix: String,
    /// Create missing topics (admin API) when publishing, subscribing or initializing.
    /// When off, using a missing topic fails with an error naming it. Default `true`.
    pub create_topics: bool,
    /// Number of partitions of the topics the adapter creates, 1 to 2147483647. More
    /// partitions, more parallelism: a partition is consumed by one group member at a
    /// time. Default 1.
    #[serde(deserialize_with = "strict::partitions")]
    pub partitions: i32,
    /// Replication factor of the topics the adapter creates, 1 to 32767. Default 1.
    #[serde(deserialize_with = "strict::replication_factor")]
    pub replication_factor: i32,
    /// Topic-level settings for the topics the adapter creates, e.g.
    /// `"retention.ms": "604800000"`. Default none.
    pub topic_config: BTreeMap<String, String>,
    /// Where a subscription without a group, or a group without committed offsets, starts.
    /// Default [`StartFrom::Latest`]. Also decides where a consumer continues when its
    /// position is no longer in the log (librdkafka `auto.offset.reset`).
    pub start_from: StartFrom,
    /// What a subscription keeps in order (see [`Ordering`]). Default [`Ordering::Key`].
    pub ordering: Ordering,
    /// How many messages of one partition a subscription holds at most: handed out and
    /// not yet acked, or waiting behind an unacked message with the same key. When a
    /// partition reaches it, the subscription stops taking that partition's messages from
    /// librdkafka (whose own prefetch is bounded by `queued.max.messages.kbytes`) until
    /// acks make room; other partitions go on. 1 to 4294967295; default 10,000.
    ///
    /// A message nacked with a delay holds its partition's commit point (and its place in
    /// this buffer) until it is acked, so at most this many later messages of its
    /// partition are processed meanwhile.
    #[serde(deserialize_with = "strict::max_buffered_per_partition")]
    pub max_buffered_per_partition: usize,
    /// How often the offsets of acked messages are committed to the consumer group. They
    /// are also committed when partitions are revoked, when the subscription ends, and
    /// once `commit_every` acked messages wait for a commit. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Commit as soon as this many messages were acked since the last commit, before
    /// `commit_interval` is over. Together they bound what a crash leaves handled but
    /// uncommitted (delivered again to the partitions' next owner): at most about this
    /// many messages, or what was acked within one `commit_interval` if fewer, per
    /// subscription (plus the deliveries in flight, and the messages behind one held for
    /// a delayed redelivery, which cannot be committed before it). Lower means fewer
    /// duplicates after a crash and more commit requests. 1 to 4294967295; default 1,000.
    #[serde(deserialize_with = "strict::commit_every")]
    pub commit_every: usize,
    /// How long `subscribe` waits for the subscription to be effective (group joined,
    /// partitions assigned, start positions resolved) before failing. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub subscribe_timeout: Duration,
    /// When a stream is dropped or cancelled while the application still holds
    /// deliveries from it, how long the subscription keeps its partitions so that those
    /// deliveries can still be acked and committed. `KafkaSubscriber::close` does not
    /// wait for them. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long `KafkaSubscriber::close` waits for its subscriptions to commit and leave
    /// their groups, and `KafkaPublisher::close` for outstanding messages. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    /// How long librdkafka tries to deliver a published message (retrying through
    /// connection losses and broker restarts) before `publish` fails
    /// (librdkafka `message.timeout.ms`). Default 30 s.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// How often librdkafka reports its statistics to the adapter (librdkafka
    /// `statistics.interval.ms`), from which the publisher's and each subscription's
    /// connection state comes back up after a loss (it goes down at once, on librdkafka's
    /// `AllBrokersDown` error) and each subscription sets the consumer lag gauge
    /// `tidemill_consumer_lag_messages`. Each report costs the client one JSON document
    /// (a few hundred bytes per broker and per partition), nothing per message. Zero
    /// turns the reports off: `connection_state` then always says connected and no lag
    /// is recorded. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub statistics_interval: Duration,
    /// Largest message the publisher sends, in bytes: payload, key and headers
    /// (librdkafka `message.max.bytes`). Larger messages fail with
    /// `Error::MessageTooLarge` with this limit before anything is sent. It is the
    /// adapter's own limit: keep it at or below the broker's `message.max.bytes` / the
    /// topic's `max.message.bytes`. 1,000 to 1,000,000,000 (librdkafka's range); default
    /// 1,000,000.
    #[serde(deserialize_with = "strict::max_message_bytes")]
    pub max_message_bytes: usize,
    /// The header a published message's uuid is written to, and the first one a received
    /// record's uuid is read from. Default `tidemill-uuid`; `_watermill_message_uuid` to
    /// exchange messages with Watermill services (which read and write that header).
    pub uuid_header: String,
    /// More headers a received record's uuid is read from, in this order, when it has no
    /// non-empty text `uuid_header`; e.g. `["tidemill-uuid"]` next to
    /// `uuid_header = "_watermill_message_uuid"` to also take the ids of Tidemill
    /// services that write the default header. Identity headers do not show in the
    /// message's metadata (they stay in its [`KafkaRecord`](crate::KafkaRecord)). Default
    /// none.
    pub uuid_read_headers: Vec<String>,
    /// librdkafka settings for every client (producer, consumers, admin), e.g.
    /// `security.protocol`, `sasl.mechanism`, `ssl.ca.location`. Default none.
    pub properties: BTreeMap<String, String>,
    /// librdkafka settings for the producer only, e.g. `linger.ms`, `compression.type`,
    /// `enable.idempotence` (on by default). Default none.
    pub producer_properties: BTreeMap<String, String>,
    /// librdkafka settings for consumers only, e.g. `session.timeout.ms` (10 s unless set
    /// here: how long a crashed member keeps its partitions), `heartbeat.interval.ms`
    /// (1 s unless set here), `partition.assignment.strategy`. Default none.
    pub consumer_properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            client_id: "tidemill".into(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            group_prefix: String::new(),
            create_topics: true,
            partitions: 1,
            replication_factor: 1,
            topic_config: BTreeMap::new(),
            start_from: StartFrom::Latest,
            ordering: Ordering::Key,
            max_buffered_per_partition: 10_000,
            commit_interval: Duration::from_secs(1),
            commit_every: 1_000,
            subscribe_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(30),
            statistics_interval: Duration::from_secs(5),
            max_message_bytes: 1_000_000,
            uuid_header: UUID_HEADER.to_owned(),
            uuid_read_headers: Vec::new(),
            properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
        }
    }
}

/// librdkafka settings the adapter sets itself from dedicated fields, or that its
/// guarantees depend on: they may not appear in the property maps.
const RESERVED: &[(&str, &str)] = &[
    ("bootstrap.servers", "use `brokers`"),
    ("metadata.broker.list", "use `brokers`"),
    ("client.id", "use `client_id`"),
    ("group.id", "the group comes from SubscribeOptions"),
    (
        "enable.auto.commit",
        "offsets are committed by the adapter, only for acked messages",
    ),
    (
        "enable.auto.offset.store",
        "offsets are committed by the adapter, only for acked messages",
    ),
    ("auto.offset.reset", "use `start_from`"),
    ("message.timeout.ms", "use `publish_timeout`"),
    ("delivery.timeout.ms", "use `publish_timeout`"),
    ("message.max.bytes", "use `max_message_bytes`"),
    ("statistics.interval.ms", "use `statistics_interval`"),
    (
        "acks",
        "publish returns only once every in-sync replica has the message (acks=all)",
    ),
    (
        "request.required.acks",
        "publish returns only once every in-sync replica has the message (acks=all)",
    ),
    (
        "enable.partition.eof",
        "the adapter does not report partition ends",
    ),
];

impl KafkaConfig {
    /// A configuration for `brokers` (`host:port[,host:port...]`) with every other field
    /// at its default.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            ..KafkaConfig::default()
        }
    }

    /// Checks the values (the publisher and subscriber do this on `connect`); the error
    /// names the offending field and the range it allows, never a secret value.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::config(BROKER, msg));
        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            return bad("`brokers` is empty; expected host:port[,host:port...]".into());
        }
        if self.client_id.is_empty() {
            return bad("`client_id` is empty".into());
        }
        for (name, value, min, max) in [
            (
                "partitions",
                i64::from(self.partitions),
                1,
                i64::from(i32::MAX),
            ),
            (
                "replication_factor",
                i64::from(self.replication_factor),
                1,
                i64::from(i16::MAX),
            ),
            (
                "max_buffered_per_partition",
                i64::try_from(self.max_buffered_per_partition).unwrap_or(i64::MAX),
                1,
                i64::from(u32::MAX),
            ),
            (
                "commit_every",
                i64::try_from(self.commit_every).unwrap_or(i64::MAX),
                1,
                i64::from(u32::MAX),
            ),
            (
                "max_message_bytes",
                i64::try_from(self.max_message_bytes).unwrap_or(i64::MAX),
                1_000,
                1_000_000_000,
            ),
        ] {
            if !(min..=max).contains(&value) {
                return bad(format!(
                    "`{name}` must be an integer from {min} to {max}, got {value}"
                ));
            }
        }
        for (name, value, zero_ok) in [
            ("connect_timeout", self.connect_timeout, false),
            ("request_timeout", self.request_timeout, false),
            ("commit_interval", self.commit_interval, false),
            ("subscribe_timeout", self.subscribe_timeout, false),
            ("drain_timeout", self.drain_timeout, true),
            ("close_timeout", self.close_timeout, false),
            ("publish_timeout", self.publish_timeout, false),
            ("statistics_interval", self.statistics_interval, true),
        ] {
            let range = if zero_ok { "0ms" } else { "1ms" };
            if (value.is_zero() && !zero_ok)
                || value > MAX_DURATION
                || value.subsec_nanos() % 1_000_000 != 0
            {
                return bad(format!(
                    "`{name}` must be a whole number of milliseconds from {range} to {}ms (about 24 days), got {value:?}",
                    MAX_DURATION.as_millis()
                ));
            }
        }
        if self.statistics_interval > MAX_STATISTICS_INTERVAL {
            return bad(format!(
                "`statistics_interval` must be at most 1 day (librdkafka's limit), got {:?}",
                self.statistics_interval
            ));
        }
        if self.uuid_header.is_empty() {
            return bad(
                "`uuid_header` is empty; expected a header name such as `tidemill-uuid`".into(),
            );
        }
        if self.uuid_read_headers.iter().any(String::is_empty) {
            return bad("`uuid_read_headers` contains an empty header name".into());
        }
        for (field, map) in [
            ("properties", &self.properties),
            ("producer_properties", &self.producer_properties),
            ("consumer_properties", &self.consumer_properties),
        ] {
            for key in map.keys() {
                if let Some((_, why)) = RESERVED.iter().find(|(k, _)| *k == key.as_str()) {
                    return bad(format!("`{field}` may not set `{key}`: {why}"));
                }
            }
        }
        Ok(())
    }

    /// `brokers` as errors and logs show it: any `user:password@` hidden.
    pub(crate) fn brokers_display(&self) -> String {
        redact_brokers(&self.brokers)
    }

    /// The secret values of this configuration (librdkafka settings whose names say they
    /// hold a secret, credentials in `brokers`), to hide from error texts and log lines.
    pub(crate) fn secrets(&self) -> Arc<Secrets> {
        let mut values: Vec<String> = self
            .properties
            .iter()
            .chain(&self.producer_properties)
            .chain(&self.consumer_properties)
            .filter(|(k, v)| is_secret_name(k) && !v.is_empty())
            .map(|(_, v)| v.clone())
            .collect();
        for b in self.brokers.split(',') {
            if let Some((userinfo, _)) = b.rsplit_once('@') {
                let userinfo = userinfo.rsplit_once("://").map_or(userinfo, |(_, u)| u);
                if !userinfo.is_empty() {
                    values.push(userinfo.to_owned());
                }
            }
        }
        // Longest first, so a secret containing another is hidden whole.
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Arc::new(Secrets(values))
    }

    /// `statistics_interval` for librdkafka (0: off).
    pub(crate) fn statistics_millis(&self) -> String {
        self.statistics_interval.as_millis().to_string()
    }

    /// Settings shared by every client.
    pub(crate) fn base_client(&self, role: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", format!("{}-{role}", self.client_id));
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// The producer's librdkafka settings.
    pub(crate) fn producer_client(&self) -> ClientConfig {
        let mut c = self.base_client("producer");
        c.set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", millis(self.publish_timeout))
            .set("message.max.bytes", self.max_message_bytes.to_string())
            .set("statistics.interval.ms", self.statistics_millis());
        for (k, v) in &self.producer_properties {
            c.set(k, v);
        }
        c
    }

    /// The Kafka `group.id` of Tidemill consumer group `group`.
    pub(crate) fn group_id(&self, group: &str) -> String {
        format!("{}{group}", self.group_prefix)
    }

    /// A consumer's librdkafka settings; `group` is the Kafka group.id.
    pub(crate) fn consumer_client(&self, group: &str) -> ClientConfig {
        let mut c = self.base_client("consumer");
        c.set("heartbeat.interval.ms", HEARTBEAT_INTERVAL_MS)
            .set("session.timeout.ms", SESSION_TIMEOUT_MS)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set(
                "auto.offset.reset",
                match self.start_from {
                    StartFrom::Latest => "latest",
                    StartFrom::Earliest => "earliest",
                },
            );
        for (k, v) in &self.consumer_properties {
            c.set(k, v);
        }
        c
    }
}

/// The longest duration the adapter accepts (librdkafka takes milliseconds as a 32-bit
/// integer).
const MAX_DURATION: Duration = Duration::from_millis(i32::MAX as u64);

/// librdkafka's largest `statistics.interval.ms`.
const MAX_STATISTICS_INTERVAL: Duration = Duration::from_secs(86_400);

/// The consumers' `heartbeat.interval.ms` unless `consumer_properties` sets it
/// (librdkafka's default is 3000): the other members of a group notice a member leaving
/// (a closed subscriber) or joining at their next heartbeat, so this is about how long a
/// handover takes.
const HEARTBEAT_INTERVAL_MS: &str = "1000";

/// The consumers' `session.timeout.ms` unless `consumer_properties` sets it (librdkafka's
/// default is 45000): how long the group coordinator waits for a member that stopped
/// heartbeating (a crashed or frozen process, a lost network) before it gives the
/// member's partitions to the others. Ten missed heartbeats; Kafka brokers accept 6 s to
/// 30 min by default (`group.min/max.session.timeout.ms`).
const SESSION_TIMEOUT_MS: &str = "10000";

/// Shown instead of a secret value.
const HIDDEN: &str = "***";

/// Whether a librdkafka setting's value is a secret (passwords, tokens, keys, JAAS and
/// OAuth configuration): hidden from `Debug`, errors and logs. When in doubt, hidden.
pub(crate) fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "credential",
        "jaas",
        "oauthbearer.config",
        "key.pem",
        "ssl.key",
        "keystore",
        "private",
    ]
    .iter()
    .any(|s| name.contains(s))
}

/// `brokers` with any `user:password@` of an entry hidden.
fn redact_brokers(brokers: &str) -> String {
    brokers
        .split(',')
        .map(|b| match b.rsplit_once('@') {
            Some((before, host)) => match before.split_once("://") {
                Some((scheme, _)) => format!("{scheme}://{HIDDEN}@{host}"),
                None => format!("{HIDDEN}@{host}"),
            },
            None => b.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A map of librdkafka settings as `Debug` shows it: secret values hidden.
struct RedactedMap<'a>(&'a BTreeMap<String, String>);

impl fmt::Debug for RedactedMap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown = if is_secret_name(k) {
                    HIDDEN
                } else {
                    v.as_str()
                };
                (k, shown)
            }))
            .finish()
    }
}

/// Shows every field, with secret values (`sasl.password`, `ssl.key.password`, ...) and
/// credentials in `brokers` replaced by `***`.
impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers_display())
            .field("client_id", &self.client_id)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("group_prefix", &self.group_prefix)
            .field("create_topics", &self.create_topics)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("topic_config", &RedactedMap(&self.topic_config))
            .field("start_from", &self.start_from)
            .field("ordering", &self.ordering)
            .field(
                "max_buffered_per_partition",
                &self.max_buffered_per_partition,
            )
            .field("commit_interval", &self.commit_interval)
            .field("commit_every", &self.commit_every)
            .field("subscribe_timeout", &self.subscribe_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("close_timeout", &self.close_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field("statistics_interval", &self.statistics_interval)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("uuid_header", &self.uuid_header)
            .field("uuid_read_headers", &self.uuid_read_headers)
            .field("properties", &RedactedMap(&self.properties))
            .field(
                "producer_properties",
                &RedactedMap(&self.producer_properties),
            )
            .field(
                "consumer_properties",
                &RedactedMap(&self.consumer_properties),
            )
            .finish()
    }
}

/// The secret values of a configuration, hidden from error texts and log lines.
#[derive(Default)]
pub(crate) struct Secrets(Vec<String>);

impl Secrets {
    /// `text` with every secret value replaced by `***`.
    pub(crate) fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for s in &self.0 {
            if out.contains(s.as_str()) {
                out = Cow::Owned(out.replace(s.as_str(), HIDDEN));
            }
        }
        out
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secrets({} hidden)", self.0.len())
    }
}

/// Integer fields: integers (or integer text) in the field's range only; floats,
/// booleans and words are refused, never rounded or converted.
mod strict {
    use std::fmt;

    use serde::de::{self, Deserializer, Unexpected, Visitor};

    struct Int {
        field: &'static str,
        min: i128,
        max: i128,
    }

    impl Int {
        fn check<E: de::Error>(&self, v: i128, unexpected: Unexpected<'_>) -> Result<i128, E> {
            if (self.min..=self.max).contains(&v) {
                Ok(v)
            } else {
                Err(E::invalid_value(unexpected, self))
            }
        }
    }

    impl<'de> Visitor<'de> for Int {
        type Value = i128;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "`{}`: an integer from {} to {}",
                self.field, self.min, self.max
            )
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i128, E> {
            self.check(v.into(), Unexpected::Signed(v))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i128, E> {
            self.check(v.into(), Unexpected::Unsigned(v))
        }

        fn visit_i128<E: de::Error>(self, v: i128) -> Result<i128, E> {
            self.check(v, Unexpected::Other("integer"))
        }

        fn visit_u128<E: de::Error>(self, v: u128) -> Result<i128, E> {
            self.check(
                i128::try_from(v).unwrap_or(i128::MAX),
                Unexpected::Other("integer"),
            )
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<i128, E> {
            match v.parse::<i128>() {
                Ok(n) => self.check(n, Unexpected::Str(v)),
                Err(_) => Err(E::invalid_type(Unexpected::Str(v), &self)),
            }
        }
    }

    fn int<'de, D: Deserializer<'de>>(
        d: D,
        field: &'static str,
        min: i128,
        max: i128,
    ) -> Result<i128, D::Error> {
        d.deserialize_any(Int { field, min, max })
    }

    // The ranges fit the fields' types, so the conversions below cannot fail.

    pub(super) fn partitions<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
        int(d, "partitions", 1, i32::MAX.into()).map(|v| v as i32)
    }

    pub(super) fn replication_factor<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
        int(d, "replication_factor", 1, i16::MAX.into()).map(|v| v as i32)
    }

    pub(super) fn max_buffered_per_partition<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<usize, D::Error> {
        int(d, "max_buffered_per_partition", 1, u32::MAX.into()).map(|v| v as usize)
    }

    pub(super) fn commit_every<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        int(d, "commit_every", 1, u32::MAX.into()).map(|v| v as usize)
    }

    pub(super) fn max_message_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        int(d, "max_message_bytes", 1_000, 1_000_000_000).map(|v| v as usize)
    }
}

/// A duration in whole milliseconds (at least 1), as librdkafka wants it.
pub(crate) fn millis(d: Duration) -> String {
    d.as_millis().clamp(1, i32::MAX as u128).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_deserialise_from_nothing() {
        let c: KafkaConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, KafkaConfig::default());
        c.validate().unwrap();
        assert_eq!(c.start_from, StartFrom::Latest);
        assert_eq!(c.ordering, Ordering::Key);
    }

    #[test]
    fn durations_and_enums_read_as_text() {
        let c: KafkaConfig = serde_json::from_str(
            r#"{"commit_interval": "250ms", "start_from": "earliest", "ordering": "partition"}"#,
        )
        .unwrap();
        assert_eq!(c.commit_interval, Duration::from_millis(250));
        assert_eq!(c.start_from, StartFrom::Earliest);
        assert_eq!(c.ordering, Ordering::Partition);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected_with_their_names() {
        let err = serde_json::from_str::<KafkaConfig>(r#"{"broker": "x:1"}"#).unwrap_err();
        assert!(err.to_string().contains("broker"), "{err}");
        let err = serde_json::from_str::<KafkaConfig>(r#"{"start_from": "middle"}"#).unwrap_err();
        assert!(err.to_string().contains("middle"), "{err}");

        let c = KafkaConfig {
            partitions: 0,
            ..KafkaConfig::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("`partitions`") && err.contains("kafka"),
            "{err}"
        );

        let c = KafkaConfig::new(" , ");
        assert!(c.validate().unwrap_err().to_string().contains("`brokers`"));
    }

    #[test]
    fn reserved_librdkafka_settings_are_refused() {
        let mut c = KafkaConfig::default();
        c.consumer_properties
            .insert("enable.auto.commit".into(), "true".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("consumer_properties") && err.contains("enable.auto.commit"),
            "{err}"
        );
        let mut c = KafkaConfig::default();
        c.producer_properties.insert("acks".into(), "1".into());
        assert!(c.validate().unwrap_err().to_string().contains("acks"));
    }

    #[test]
    fn client_settings_carry_the_guarantees() {
        let mut c = KafkaConfig::new("b:1");
        c.producer_properties
            .insert("linger.ms".into(), "20".into());
        let p = c.producer_client();
        assert_eq!(p.get("acks"), Some("all"));
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("linger.ms"), Some("20"));
        assert_eq!(p.get("message.timeout.ms"), Some("30000"));
        let k = c.consumer_client("g");
        assert_eq!(k.get("group.id"), Some("g"));
        assert_eq!(k.get("enable.auto.commit"), Some("false"));
        assert_eq!(k.get("auto.offset.reset"), Some("latest"));
        assert_eq!(k.get("heartbeat.interval.ms"), Some("1000"));
        assert_eq!(k.get("session.timeout.ms"), Some("10000"));
        c.consumer_properties
            .insert("heartbeat.interval.ms".into(), "250".into());
        c.consumer_properties
            .insert("session.timeout.ms".into(), "45000".into());
        let k = c.consumer_client("g");
        assert_eq!(
            k.get("heartbeat.interval.ms"),
            Some("250"),
            "the user's wins"
        );
        assert_eq!(k.get("session.timeout.ms"), Some("45000"));
        assert_eq!(k.get("bootstrap.servers"), Some("b:1"));
    }

    #[test]
    fn integers_are_strict_and_errors_say_the_range() {
        for (json, range) in [
            (r#"{"partitions": -5}"#, "from 1 to 2147483647"),
            (r#"{"partitions": 0}"#, "from 1 to 2147483647"),
            (r#"{"partitions": 1.5}"#, "from 1 to 2147483647"),
            (r#"{"partitions": 1e3}"#, "from 1 to 2147483647"),
            (r#"{"partitions": "1e3"}"#, "from 1 to 2147483647"),
            (r#"{"partitions": true}"#, "from 1 to 2147483647"),
            (r#"{"partitions": "yes"}"#, "from 1 to 2147483647"),
            (
                r#"{"partitions": 99999999999999999999999}"#,
                "from 1 to 2147483647",
            ),
            (r#"{"replication_factor": 40000}"#, "from 1 to 32767"),
            (
                r#"{"max_buffered_per_partition": -5}"#,
                "from 1 to 4294967295",
            ),
            (
                r#"{"max_buffered_per_partition": 0}"#,
                "from 1 to 4294967295",
            ),
            (r#"{"commit_every": 0}"#, "from 1 to 4294967295"),
            (r#"{"max_message_bytes": 999}"#, "from 1000 to 1000000000"),
        ] {
            let err = serde_json::from_str::<KafkaConfig>(json)
                .unwrap_err()
                .to_string();
            assert!(err.contains(range), "{json}: {err}");
            let field = json.split('"').nth(1).unwrap();
            assert!(err.contains(field), "{json} names the field: {err}");
        }
        let c: KafkaConfig =
            serde_json::from_str(r#"{"partitions": "6", "max_message_bytes": 2000000}"#).unwrap();
        assert_eq!((c.partitions, c.max_message_bytes), (6, 2_000_000));
    }

    #[test]
    fn validate_checks_ranges_zero_and_lossy_durations() {
        type Change = Box<dyn Fn(&mut KafkaConfig)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|c| c.partitions = -1),
                "`partitions` must be an integer from 1 to 2147483647, got -1",
            ),
            (
                Box::new(|c| c.replication_factor = 40_000),
                "from 1 to 32767",
            ),
            (
                Box::new(|c| c.max_buffered_per_partition = 0),
                "from 1 to 4294967295",
            ),
            (Box::new(|c| c.commit_every = 0), "from 1 to 4294967295"),
            (
                Box::new(|c| c.max_message_bytes = 10),
                "from 1000 to 1000000000",
            ),
            (
                Box::new(|c| c.commit_interval = Duration::ZERO),
                "`commit_interval` must be a whole number of milliseconds from 1ms",
            ),
            (
                Box::new(|c| c.request_timeout = Duration::from_micros(1500)),
                "`request_timeout` must be a whole number of milliseconds",
            ),
            (
                Box::new(|c| c.publish_timeout = Duration::from_secs(30 * 86_400)),
                "`publish_timeout`",
            ),
            (
                Box::new(|c| c.drain_timeout = Duration::MAX),
                "`drain_timeout`",
            ),
            (
                Box::new(|c| c.statistics_interval = Duration::from_secs(86_401)),
                "`statistics_interval` must be at most 1 day",
            ),
            (
                Box::new(|c| c.uuid_header.clear()),
                "`uuid_header` is empty",
            ),
            (
                Box::new(|c| c.uuid_read_headers = vec![String::new()]),
                "`uuid_read_headers`",
            ),
        ];
        for (change, want) in cases {
            let mut c = KafkaConfig::default();
            change(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(want), "expected {want:?} in {err}");
        }
        let c = KafkaConfig {
            drain_timeout: Duration::ZERO,
            ..KafkaConfig::default()
        };
        c.validate()
            .expect("a zero drain_timeout means: do not wait");
        let c = KafkaConfig {
            statistics_interval: Duration::ZERO,
            ..KafkaConfig::default()
        };
        c.validate()
            .expect("a zero statistics_interval turns the reports off");
        assert_eq!(c.statistics_millis(), "0");
    }

    #[test]
    fn secrets_never_show_in_debug_or_redacted_texts() {
        let mut c = KafkaConfig::new("SASL_SSL://app:brokerpw@kafka-1:9093,kafka-2:9093");
        c.properties
            .insert("sasl.password".into(), "hunter2".into());
        c.properties.insert("sasl.username".into(), "app".into());
        c.producer_properties
            .insert("ssl.key.password".into(), "k3y-pass".into());
        c.consumer_properties.insert(
            "sasl.oauthbearer.config".into(),
            "principal=x clientSecret=oauth-s3cret".into(),
        );
        let debug = format!("{c:?}");
        for secret in ["hunter2", "k3y-pass", "oauth-s3cret", "brokerpw"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(debug.contains("sasl.username"), "{debug}");
        assert!(debug.contains("kafka-2:9093"), "{debug}");
        assert_eq!(
            c.brokers_display(),
            "SASL_SSL://***@kafka-1:9093,kafka-2:9093"
        );
        let secrets = c.secrets();
        let text = "login with hunter2 and app:brokerpw failed (k3y-pass)";
        let shown = secrets.redact(text);
        for secret in ["hunter2", "k3y-pass", "brokerpw"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(!format!("{secrets:?}").contains("hunter2"));
    }

    #[test]
    fn creation_errors_hide_secret_values() {
        let mut c = KafkaConfig::default();
        c.properties
            .insert("sasl.password".into(), "hunter2".into());
        // A value librdkafka refuses, quoting it: the secret is hidden wherever it shows.
        c.properties
            .insert("security.protocol".into(), "hunter2".into());
        let err = c
            .producer_client()
            .create_native_config()
            .map(|_| ())
            .map_err(|e| crate::client::creation_error(&c.secrets(), "producer", e));
        let err = err
            .expect_err("an unknown security protocol is refused")
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("security.protocol"), "{err}");
        assert!(err.contains("***"), "{err}");
    }
}
