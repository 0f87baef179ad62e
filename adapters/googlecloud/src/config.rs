//! Configuration of the Pub/Sub adapter.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidemill_core::{Error, Result};

use crate::BROKER;

/// The environment variable naming a Pub/Sub emulator (`host:port`), as Google's tools use it.
pub const EMULATOR_HOST_ENV: &str = "PUBSUB_EMULATOR_HOST";

/// Pub/Sub's own limit on a message (data plus attributes plus ordering key), in bytes.
pub const PUBSUB_MAX_MESSAGE_BYTES: usize = 10_000_000;

/// Configuration shared by [`GoogleCloudPublisher`](crate::GoogleCloudPublisher) and
/// [`GoogleCloudSubscriber`](crate::GoogleCloudSubscriber).
///
/// Every field has a default except [`project_id`](Self::project_id). Durations are
/// written as humantime strings in configuration files (`"10s"`, `"1h 30m"`, `"250ms"`).
///
/// ```
/// use tidemill_googlecloud::GoogleCloudConfig;
///
/// let config: GoogleCloudConfig = serde_json::from_str(r#"{
///     "project_id": "my-project",
///     "ack_deadline": "20s",
///     "max_outstanding_messages": 500,
///     "dead_letter": { "topic": "orders.dead", "max_delivery_attempts": 5 }
/// }"#).unwrap();
/// assert_eq!(config.ack_deadline, std::time::Duration::from_secs(20));
/// assert!(config.create_topics); // a default
/// config.validate().unwrap();
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GoogleCloudConfig {
    /// The Google Cloud project that holds the topics and subscriptions. Required. A topic
    /// given as a full name (`projects/P/topics/T`) may live in another project.
    pub project_id: String,

    /// `host:port` of a Pub/Sub emulator. The adapter then talks plain-text gRPC and REST to
    /// `http://HOST` with anonymous credentials. When unset, the `PUBSUB_EMULATOR_HOST`
    /// environment variable is used if it is set and [`endpoint`](Self::endpoint) is not.
    /// Default: unset.
    pub emulator_host: Option<String>,

    /// The API endpoint (e.g. a regional `https://europe-west1-pubsub.googleapis.com`).
    /// Default: unset, i.e. `https://pubsub.googleapis.com`. Outside the emulator the
    /// adapter authenticates with application-default credentials.
    pub endpoint: Option<String>,

    /// Create a topic on first use when it does not exist. When `false`, publishing or
    /// subscribing to a missing topic fails with an error naming it. Default: `true`.
    pub create_topics: bool,

    /// Create subscriptions on subscribe/initialize when they do not exist (and re-create a
    /// subscription that vanished while consuming, e.g. after an emulator restart). When
    /// `false`, subscribing with a group whose subscription does not exist fails with an
    /// error naming it, and subscribing without a group is an error. Default: `true`.
    pub create_subscriptions: bool,

    /// Prepended to the name of every subscription the adapter derives: `{prefix}{topic}.{group}`
    /// for a consumer group, `{prefix}{topic}.tidemill-{random}` without one. Default: `""`.
    pub subscription_prefix: String,

    /// Delete the subscription of a subscribe call without a consumer group when its stream
    /// ends (dropped, cancelled or the subscriber closed). Default: `true`.
    pub delete_unique_subscriptions: bool,

    /// Expiration of subscriptions created for subscribe calls without a group: Pub/Sub
    /// deletes them after this long without a subscriber, so a crashed process leaks
    /// nothing for long. Pub/Sub's minimum is one day. Default: `1day`.
    #[serde(with = "humantime_serde")]
    pub unique_subscription_ttl: Duration,

    /// Ack deadline of the subscriptions the adapter creates (10 s to 600 s): how long Pub/Sub
    /// waits for a client it has not heard from before redelivering. The client extends it
    /// while a delivery is held (see [`max_lease_extension`](Self::max_lease_extension)).
    /// Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub ack_deadline: Duration,

    /// Message ordering: publish a message's key as its Pub/Sub ordering key and create
    /// subscriptions with message ordering enabled, so messages with the same key are
    /// delivered in publish order (in one region). Default: `false` (the key travels in the
    /// `tidemill-key` attribute).
    pub message_ordering: bool,

    /// Create subscriptions with exactly-once delivery. Acks and nacks are then confirmed by
    /// the service and their failures surface from `Delivery::ack`/`nack`. Default: `false`.
    pub exactly_once_delivery: bool,

    /// Dead-letter policy for the subscriptions the adapter creates. With one, Pub/Sub counts
    /// delivery attempts (`Delivery::attempt`) and moves a message to the dead-letter topic
    /// after `max_delivery_attempts`. Default: none.
    pub dead_letter: Option<DeadLetterConfig>,

    /// Server-side redelivery backoff after a nack (the subscription's retry policy) for the
    /// subscriptions the adapter creates. Default: none (immediate redelivery).
    pub retry_backoff: Option<RetryBackoff>,

    /// Flow control: the most messages one subscription stream holds unacknowledged; the
    /// server stops sending beyond it. `0` or less: no limit. Default: `1000`.
    pub max_outstanding_messages: i64,

    /// Flow control: the most bytes one subscription stream holds unacknowledged. `0` or
    /// less: no limit. Default: 100 MiB.
    pub max_outstanding_bytes: i64,

    /// The longest the client keeps extending the lease of a delivery it holds; past it
    /// Pub/Sub redelivers. It also bounds `nack_with_delay` (see the crate docs).
    /// Default: `1h`.
    #[serde(with = "humantime_serde")]
    pub max_lease: Duration,

    /// How far each lease extension reaches (10 s to 600 s): how soon Pub/Sub redelivers the
    /// messages of a client that died. Default: `60s`.
    #[serde(with = "humantime_serde")]
    pub max_lease_extension: Duration,

    /// Publisher batching: send a batch once it holds this many messages (1 to 1000).
    /// Default: `100`.
    pub batch_max_messages: u32,

    /// Publisher batching: send a batch once it holds this many bytes. Default: 1 MB.
    pub batch_max_bytes: u32,

    /// Publisher batching: send a batch at the latest this long after its first message.
    /// Default: `10ms`.
    #[serde(with = "humantime_serde")]
    pub batch_max_delay: Duration,

    /// Largest message accepted by `publish` (data, attributes and ordering key), checked
    /// before sending; larger ones fail with `Error::MessageTooLarge`. Default and maximum:
    /// Pub/Sub's limit, 10,000,000 bytes.
    pub max_message_bytes: usize,

    /// How long connecting may take: creating a publisher or subscriber checks that the
    /// service answers and fails with `Error::Connect` naming the address after this.
    /// Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,

    /// Time limit of each administrative call (creating or looking up topics and
    /// subscriptions). Default: `30s`.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,

    /// How long `publish` keeps retrying transient failures (connection loss, unavailable
    /// service) before it fails. Default: `60s`.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
}

/// A subscription's dead-letter policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// The dead-letter topic (short name or `projects/P/topics/T`); created when missing if
    /// [`GoogleCloudConfig::create_topics`] is set. On Google Cloud, the Pub/Sub service
    /// account needs permission to publish to it and to subscribe to the source.
    pub topic: String,
    /// Delivery attempts before a message is dead-lettered (5 to 100).
    pub max_delivery_attempts: i32,
}

/// A subscription's retry policy: Pub/Sub redelivers a nacked message after an exponential
/// backoff between these bounds (0 s to 600 s each).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBackoff {
    /// The first backoff.
    #[serde(with = "humantime_serde")]
    pub minimum: Duration,
    /// The longest backoff.
    #[serde(with = "humantime_serde")]
    pub maximum: Duration,
}

impl Default for GoogleCloudConfig {
    fn default() -> Self {
        GoogleCloudConfig {
            project_id: String::new(),
            emulator_host: None,
            endpoint: None,
            create_topics: true,
            create_subscriptions: true,
            subscription_prefix: String::new(),
            delete_unique_subscriptions: true,
            unique_subscription_ttl: Duration::from_secs(24 * 60 * 60),
            ack_deadline: Duration::from_secs(10),
            message_ordering: false,
            exactly_once_delivery: false,
            dead_letter: None,
            retry_backoff: None,
            max_outstanding_messages: 1000,
            max_outstanding_bytes: 100 * 1024 * 1024,
            max_lease: Duration::from_secs(60 * 60),
            max_lease_extension: Duration::from_secs(60),
            batch_max_messages: 100,
            batch_max_bytes: 1_000_000,
            batch_max_delay: Duration::from_millis(10),
            max_message_bytes: PUBSUB_MAX_MESSAGE_BYTES,
            connect_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(60),
        }
    }
}

impl GoogleCloudConfig {
    /// The defaults, for `project_id` on Google Cloud (or on an emulator named by
    /// `PUBSUB_EMULATOR_HOST`).
    pub fn new(project_id: impl Into<String>) -> Self {
        GoogleCloudConfig {
            project_id: project_id.into(),
            ..Self::default()
        }
    }

    /// The defaults, for `project_id` on the emulator at `host` (`host:port`).
    ///
    /// ```
    /// use tidemill_googlecloud::GoogleCloudConfig;
    /// let config = GoogleCloudConfig::emulator("my-project", "127.0.0.1:8085");
    /// assert_eq!(config.emulator_host.as_deref(), Some("127.0.0.1:8085"));
    /// ```
    pub fn emulator(project_id: impl Into<String>, host: impl Into<String>) -> Self {
        GoogleCloudConfig {
            emulator_host: Some(host.into()),
            ..Self::new(project_id)
        }
    }

    /// Checks every field; the error names the offending one.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::config(BROKER, msg));
        if self.project_id.is_empty() {
            return bad("`project_id` is required".into());
        }
        if !valid_project_id(&self.project_id) {
            return bad(format!(
                "`project_id` {:?} is not a valid Google Cloud project id",
                self.project_id
            ));
        }
        if let Some(host) = &self.emulator_host {
            if host.is_empty() || host.contains('/') || !host.contains(':') {
                return bad(format!(
                    "`emulator_host` {host:?} must be `host:port` (no scheme)"
                ));
            }
        }
        if let Some(endpoint) = &self.endpoint {
            if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
                return bad(format!(
                    "`endpoint` {endpoint:?} must be a URL starting with https:// or http://"
                ));
            }
        }
        let secs = |d: Duration| d.as_secs_f64();
        if !(10.0..=600.0).contains(&secs(self.ack_deadline)) {
            return bad(format!(
                "`ack_deadline` must be between 10s and 600s, got {:?}",
                self.ack_deadline
            ));
        }
        if !(10.0..=600.0).contains(&secs(self.max_lease_extension)) {
            return bad(format!(
                "`max_lease_extension` must be between 10s and 600s, got {:?}",
                self.max_lease_extension
            ));
        }
        if self.max_lease < Duration::from_secs(10) {
            return bad(format!(
                "`max_lease` must be at least 10s, got {:?}",
                self.max_lease
            ));
        }
        if self.unique_subscription_ttl < Duration::from_secs(24 * 60 * 60) {
            return bad(format!(
                "`unique_subscription_ttl` must be at least one day (Pub/Sub's minimum), got {:?}",
                self.unique_subscription_ttl
            ));
        }
        if !(1..=1000).contains(&self.batch_max_messages) {
            return bad(format!(
                "`batch_max_messages` must be between 1 and 1000, got {}",
                self.batch_max_messages
            ));
        }
        if self.batch_max_bytes == 0 {
            return bad("`batch_max_bytes` must be positive".into());
        }
        if self.max_message_bytes == 0 || self.max_message_bytes > PUBSUB_MAX_MESSAGE_BYTES {
            return bad(format!(
                "`max_message_bytes` must be between 1 and {PUBSUB_MAX_MESSAGE_BYTES}, got {}",
                self.max_message_bytes
            ));
        }
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("operation_timeout", self.operation_timeout),
            ("publish_timeout", self.publish_timeout),
        ] {
            if value.is_zero() {
                return bad(format!("`{name}` must be positive"));
            }
        }
        if let Some(dl) = &self.dead_letter {
            if dl.topic.is_empty() {
                return bad("`dead_letter.topic` is required".into());
            }
            if !(5..=100).contains(&dl.max_delivery_attempts) {
                return bad(format!(
                    "`dead_letter.max_delivery_attempts` must be between 5 and 100, got {}",
                    dl.max_delivery_attempts
                ));
            }
        }
        if let Some(rb) = &self.retry_backoff {
            if rb.minimum > Duration::from_secs(600) || rb.maximum > Duration::from_secs(600) {
                return bad("`retry_backoff` bounds must be at most 600s".into());
            }
            if rb.minimum > rb.maximum {
                return bad(format!(
                    "`retry_backoff.minimum` ({:?}) is larger than `retry_backoff.maximum` ({:?})",
                    rb.minimum, rb.maximum
                ));
            }
        }
        Ok(())
    }
}

/// Google Cloud project ids: 6 to 30 lowercase letters, digits and hyphens, starting with a
/// letter. Older projects may also carry a `domain:` prefix.
fn valid_project_id(id: &str) -> bool {
    let id = id.rsplit(':').next().unwrap_or(id);
    !id.is_empty()
        && id.len() <= 63
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_once_a_project_is_set() {
        assert!(GoogleCloudConfig::default().validate().is_err());
        GoogleCloudConfig::new("tidemill-test").validate().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let cases: Vec<(GoogleCloudConfig, &str)> = vec![
            (GoogleCloudConfig::new("Bad_Project"), "project_id"),
            (
                GoogleCloudConfig::emulator("p-123456", "http://127.0.0.1:8085"),
                "emulator_host",
            ),
            (
                GoogleCloudConfig {
                    ack_deadline: Duration::from_secs(5),
                    ..GoogleCloudConfig::new("p-123456")
                },
                "ack_deadline",
            ),
            (
                GoogleCloudConfig {
                    dead_letter: Some(DeadLetterConfig {
                        topic: "dlq".into(),
                        max_delivery_attempts: 1,
                    }),
                    ..GoogleCloudConfig::new("p-123456")
                },
                "max_delivery_attempts",
            ),
            (
                GoogleCloudConfig {
                    max_message_bytes: PUBSUB_MAX_MESSAGE_BYTES + 1,
                    ..GoogleCloudConfig::new("p-123456")
                },
                "max_message_bytes",
            ),
            (
                GoogleCloudConfig {
                    publish_timeout: Duration::ZERO,
                    ..GoogleCloudConfig::new("p-123456")
                },
                "publish_timeout",
            ),
        ];
        for (config, field) in cases {
            let err = config.validate().expect_err(field);
            assert!(matches!(err, Error::Config { .. }), "{err}");
            assert!(err.to_string().contains(field), "{err} should name {field}");
            assert!(err.to_string().starts_with("googlecloud:"), "{err}");
        }
    }

    #[test]
    fn deserializes_with_defaults_and_rejects_unknown_fields() {
        let config: GoogleCloudConfig = serde_json::from_str(
            r#"{"project_id": "tidemill-test", "batch_max_delay": "5ms",
                "retry_backoff": {"minimum": "1s", "maximum": "1m"}}"#,
        )
        .unwrap();
        assert_eq!(config.batch_max_delay, Duration::from_millis(5));
        assert_eq!(
            config.retry_backoff,
            Some(RetryBackoff {
                minimum: Duration::from_secs(1),
                maximum: Duration::from_secs(60)
            })
        );
        assert_eq!(config.max_outstanding_messages, 1000);
        let err = serde_json::from_str::<GoogleCloudConfig>(r#"{"project": "x"}"#)
            .expect_err("unknown field");
        assert!(err.to_string().contains("project"), "{err}");
        let err = serde_json::from_str::<GoogleCloudConfig>(
            r#"{"project_id": "x", "ack_deadline": "ten seconds"}"#,
        )
        .expect_err("bad duration");
        assert!(err.to_string().contains("ten seconds"), "{err}");
    }
}
