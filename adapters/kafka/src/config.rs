//! [`KafkaConfig`]: every setting of the adapter, serde-deserialisable.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use tidemill_core::{Error, Result};

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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Number of partitions of the topics the adapter creates. More partitions, more
    /// parallelism: a partition is consumed by one group member at a time. Default 1.
    pub partitions: i32,
    /// Replication factor of the topics the adapter creates. Default 1.
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
    /// acks make room; other partitions go on. Default 10,000.
    pub max_buffered_per_partition: usize,
    /// How often the offsets of acked messages are committed to the consumer group. They
    /// are also committed when partitions are revoked and when the subscription ends.
    /// Default 1 s.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
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
    /// Largest message the publisher sends, in bytes: payload, key and headers
    /// (librdkafka `message.max.bytes`). Larger messages fail with
    /// `Error::MessageTooLarge` naming this limit. Keep it at or below the broker's
    /// `message.max.bytes` / the topic's `max.message.bytes`. Default 1,000,000.
    pub max_message_bytes: usize,
    /// librdkafka settings for every client (producer, consumers, admin), e.g.
    /// `security.protocol`, `sasl.mechanism`, `ssl.ca.location`. Default none.
    pub properties: BTreeMap<String, String>,
    /// librdkafka settings for the producer only, e.g. `linger.ms`, `compression.type`,
    /// `enable.idempotence` (on by default). Default none.
    pub producer_properties: BTreeMap<String, String>,
    /// librdkafka settings for consumers only, e.g. `session.timeout.ms`,
    /// `heartbeat.interval.ms`, `partition.assignment.strategy`. Default none.
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
            subscribe_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(30),
            max_message_bytes: 1_000_000,
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
    /// names the offending field.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::config(BROKER, msg));
        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            return bad("`brokers` is empty; expected host:port[,host:port...]".into());
        }
        if self.client_id.is_empty() {
            return bad("`client_id` is empty".into());
        }
        if self.partitions < 1 {
            return bad(format!(
                "`partitions` must be at least 1, got {}",
                self.partitions
            ));
        }
        if self.replication_factor < 1 {
            return bad(format!(
                "`replication_factor` must be at least 1, got {}",
                self.replication_factor
            ));
        }
        if self.max_buffered_per_partition == 0 {
            return bad("`max_buffered_per_partition` must be at least 1".into());
        }
        if self.max_message_bytes < 1_000 || self.max_message_bytes > 1_000_000_000 {
            return bad(format!(
                "`max_message_bytes` must be between 1000 and 1000000000 (librdkafka's range), got {}",
                self.max_message_bytes
            ));
        }
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("commit_interval", self.commit_interval),
            ("subscribe_timeout", self.subscribe_timeout),
            ("publish_timeout", self.publish_timeout),
            ("close_timeout", self.close_timeout),
        ] {
            if value.is_zero() {
                return bad(format!("`{name}` must be greater than zero"));
            }
        }
        if self.publish_timeout > Duration::from_millis(i32::MAX as u64) {
            return bad("`publish_timeout` is too large (at most about 24 days)".into());
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
            .set("message.max.bytes", self.max_message_bytes.to_string());
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
        c.set("group.id", group)
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
        assert_eq!(k.get("bootstrap.servers"), Some("b:1"));
    }
}
