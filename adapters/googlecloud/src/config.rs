//! Configuration of the Pub/Sub adapter.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidemill_core::{Error, Result};

use tidemill_core::headers::UUID_HEADER;

use crate::BROKER;

/// Watermill's uuid attribute, for [`GoogleCloudConfig::uuid_attribute`].
pub const WATERMILL_UUID_ATTRIBUTE: &str = "_watermill_message_uuid";

/// Pub/Sub's limit on an attribute key, in bytes.
const MAX_ATTRIBUTE_KEY_BYTES: usize = 256;

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
///
/// Numbers are checked, never coerced: a negative, fractional or out-of-range value (in the
/// file or from [`validate`](Self::validate)) is an error naming the field and the allowed
/// range. Credentials never appear in the configuration: outside the emulator the adapter
/// uses application-default credentials (`GOOGLE_APPLICATION_CREDENTIALS`, the metadata
/// server), and no error, log line or `Debug` output of this crate shows a key, token or
/// credentials file content. An `endpoint` with userinfo is refused without echoing it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
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

    /// The attribute carrying a message's uuid, written on publish and read on receipt.
    /// Default: `tidemill-uuid`. Set `_watermill_message_uuid` to exchange messages with
    /// Watermill (Go) services. A received message without it (a plain client's) gets its
    /// Pub/Sub message id as uuid, which is the same on every redelivery. The attribute is
    /// not part of the message's metadata.
    pub uuid_attribute: String,

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

    /// Flow control: the most messages one subscription stream holds unacknowledged
    /// (buffered, handed out and not yet settled, or held for a delayed nack); the server
    /// stops sending beyond it. At least 1. Default: `1000`.
    pub max_outstanding_messages: u64,

    /// Flow control: the most bytes one subscription stream holds unacknowledged. At
    /// least 1. Default: 100 MiB.
    pub max_outstanding_bytes: u64,

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

    /// How often a publisher or subscriber checks that the service answers, for its
    /// `connection_state` (`Router::health`): the client library exposes no connection
    /// state, so once the state is first asked for, one cheap request (`GetTopic`) goes
    /// out per interval; no answer within `connect_timeout` reports disconnected until an
    /// answer comes again. Zero turns the checks off (the publisher then always reports
    /// connected, the subscriber only a streaming pull being re-opened). Default: `5s`.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
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
    pub max_delivery_attempts: u32,
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
            uuid_attribute: UUID_HEADER.to_owned(),
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
            health_check_interval: Duration::from_secs(5),
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

    /// Checks every field; the error names the offending one and the allowed range, and
    /// never shows credentials (an endpoint with userinfo is refused without echoing it).
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::config(BROKER, msg));
        if self.project_id.is_empty() {
            return bad("`project_id` is required".into());
        }
        if !valid_project_id(&self.project_id) {
            return bad(format!(
                "`project_id` {:?} is not a valid Google Cloud project id (6 to 30 lowercase \
                 letters, digits and hyphens, starting with a letter)",
                self.project_id
            ));
        }
        if let Some(host) = &self.emulator_host {
            if host.contains('@') {
                return bad(
                    "`emulator_host` must be `host:port`; it must not carry credentials \
                     (the emulator takes none)"
                        .into(),
                );
            }
            if host.is_empty() || host.contains('/') || !host.contains(':') {
                return bad(format!(
                    "`emulator_host` {host:?} must be `host:port` (no scheme)"
                ));
            }
        }
        if let Some(endpoint) = &self.endpoint {
            if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
                return bad(format!(
                    "`endpoint` {:?} must be a URL starting with https:// or http://",
                    redact_url(endpoint)
                ));
            }
            if has_userinfo(endpoint) || endpoint.contains('?') {
                return bad(format!(
                    "`endpoint` {:?} must not carry credentials or a query: the adapter \
                     authenticates with application-default credentials",
                    redact_url(endpoint)
                ));
            }
        }
        whole_seconds("ack_deadline", self.ack_deadline, 10, 600)?;
        whole_seconds("max_lease_extension", self.max_lease_extension, 10, 600)?;
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
        if self.uuid_attribute.is_empty()
            || self.uuid_attribute.len() > MAX_ATTRIBUTE_KEY_BYTES
            || self.uuid_attribute.to_ascii_lowercase().starts_with("goog")
        {
            return bad(format!(
                "`uuid_attribute` {:?} must be a Pub/Sub attribute name: 1 to \
                 {MAX_ATTRIBUTE_KEY_BYTES} bytes, not starting with `goog`",
                self.uuid_attribute
            ));
        }
        in_range(
            "max_outstanding_messages",
            self.max_outstanding_messages,
            1,
            i64::MAX as u64,
        )?;
        in_range(
            "max_outstanding_bytes",
            self.max_outstanding_bytes,
            1,
            i64::MAX as u64,
        )?;
        in_range(
            "batch_max_messages",
            u64::from(self.batch_max_messages),
            1,
            1000,
        )?;
        in_range(
            "batch_max_bytes",
            u64::from(self.batch_max_bytes),
            1,
            PUBSUB_MAX_MESSAGE_BYTES as u64,
        )?;
        in_range(
            "max_message_bytes",
            self.max_message_bytes as u64,
            1,
            PUBSUB_MAX_MESSAGE_BYTES as u64,
        )?;
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("operation_timeout", self.operation_timeout),
            ("publish_timeout", self.publish_timeout),
        ] {
            if value.is_zero() {
                return bad(format!("`{name}` must be positive, got 0s"));
            }
        }
        if let Some(dl) = &self.dead_letter {
            if dl.topic.is_empty() {
                return bad("`dead_letter.topic` is required".into());
            }
            in_range(
                "dead_letter.max_delivery_attempts",
                u64::from(dl.max_delivery_attempts),
                5,
                100,
            )?;
        }
        if let Some(rb) = &self.retry_backoff {
            if rb.minimum > Duration::from_secs(600) || rb.maximum > Duration::from_secs(600) {
                return bad(format!(
                    "`retry_backoff` bounds must be between 0s and 600s, got {:?} and {:?}",
                    rb.minimum, rb.maximum
                ));
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

/// `Debug` shows every field, the endpoint without userinfo or query (credentials never
/// belong there, and `validate` refuses them, but `Debug` may run before `validate`).
impl std::fmt::Debug for GoogleCloudConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let GoogleCloudConfig {
            project_id,
            emulator_host,
            endpoint,
            create_topics,
            create_subscriptions,
            subscription_prefix,
            delete_unique_subscriptions,
            unique_subscription_ttl,
            ack_deadline,
            uuid_attribute,
            message_ordering,
            exactly_once_delivery,
            dead_letter,
            retry_backoff,
            max_outstanding_messages,
            max_outstanding_bytes,
            max_lease,
            max_lease_extension,
            batch_max_messages,
            batch_max_bytes,
            batch_max_delay,
            max_message_bytes,
            connect_timeout,
            operation_timeout,
            publish_timeout,
            health_check_interval,
        } = self;
        f.debug_struct("GoogleCloudConfig")
            .field("project_id", project_id)
            .field("emulator_host", &emulator_host.as_deref().map(redact_host))
            .field("endpoint", &endpoint.as_deref().map(redact_url))
            .field("create_topics", create_topics)
            .field("create_subscriptions", create_subscriptions)
            .field("subscription_prefix", subscription_prefix)
            .field("delete_unique_subscriptions", delete_unique_subscriptions)
            .field("unique_subscription_ttl", unique_subscription_ttl)
            .field("ack_deadline", ack_deadline)
            .field("uuid_attribute", uuid_attribute)
            .field("message_ordering", message_ordering)
            .field("exactly_once_delivery", exactly_once_delivery)
            .field("dead_letter", dead_letter)
            .field("retry_backoff", retry_backoff)
            .field("max_outstanding_messages", max_outstanding_messages)
            .field("max_outstanding_bytes", max_outstanding_bytes)
            .field("max_lease", max_lease)
            .field("max_lease_extension", max_lease_extension)
            .field("batch_max_messages", batch_max_messages)
            .field("batch_max_bytes", batch_max_bytes)
            .field("batch_max_delay", batch_max_delay)
            .field("max_message_bytes", max_message_bytes)
            .field("connect_timeout", connect_timeout)
            .field("operation_timeout", operation_timeout)
            .field("publish_timeout", publish_timeout)
            .field("health_check_interval", health_check_interval)
            .finish()
    }
}

/// `value` within `min..=max`, or an error naming `field` and the range.
fn in_range(field: &str, value: u64, min: u64, max: u64) -> Result<()> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(Error::config(
            BROKER,
            format!("`{field}` must be between {min} and {max}, got {value}"),
        ))
    }
}

/// `value` a whole number of seconds within `min..=max` (Pub/Sub takes whole seconds: a
/// fraction would be cut off silently).
fn whole_seconds(field: &str, value: Duration, min: u64, max: u64) -> Result<()> {
    if value.subsec_nanos() != 0 || !(min..=max).contains(&value.as_secs()) {
        return Err(Error::config(
            BROKER,
            format!(
                "`{field}` must be a whole number of seconds between {min}s and {max}s, got {value:?}"
            ),
        ));
    }
    Ok(())
}

/// Whether `url` has userinfo (`scheme://user:password@host`).
fn has_userinfo(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority.contains('@')
}

/// `url` without userinfo, query and fragment: what errors and `Debug` may show.
pub(crate) fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => authority.to_owned(),
    };
    let path = tail.split(['?', '#']).next().unwrap_or("");
    let hidden = if tail.len() > path.len() { "?***" } else { "" };
    match scheme {
        Some(s) => format!("{s}://{authority}{path}{hidden}"),
        None => format!("{authority}{path}{hidden}"),
    }
}

/// `host:port` without anything before an `@`.
fn redact_host(host: &str) -> String {
    match host.rsplit_once('@') {
        Some((_, h)) => format!("***@{h}"),
        None => host.to_owned(),
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
    #[test]
    fn numbers_are_checked_never_coerced() {
        let parse = |json: &str| {
            serde_json::from_str::<GoogleCloudConfig>(&format!(
                r#"{{"project_id": "tidemill-test", {json}}}"#
            ))
        };
        // Negative, fractional, boolean and too large: refused by the field's type.
        for json in [
            r#""max_outstanding_messages": -5"#,
            r#""max_outstanding_messages": 1e3"#,
            r#""max_outstanding_messages": 1.5"#,
            r#""max_outstanding_messages": true"#,
            r#""max_outstanding_messages": 99999999999999999999999"#,
            r#""batch_max_messages": -1"#,
            r#""batch_max_messages": 4294967296"#,
            r#""batch_max_bytes": 2.5"#,
            r#""dead_letter": {"topic": "d", "max_delivery_attempts": -5}"#,
            r#""dead_letter": {"topic": "d", "max_delivery_attempts": 5.0}"#,
            r#""create_topics": 1"#,
            r#""create_topics": "yes""#,
            r#""ack_deadline": 10"#,
            r#""ack_deadline": "1.5""#,
        ] {
            assert!(parse(json).is_err(), "{json} was accepted");
        }
        // In range for the type, out of range for Pub/Sub: `validate` names the range.
        for (json, field, range) in [
            (
                r#""max_outstanding_messages": 0"#,
                "max_outstanding_messages",
                "between 1 and",
            ),
            (
                r#""max_outstanding_bytes": 0"#,
                "max_outstanding_bytes",
                "between 1 and",
            ),
            (
                r#""max_outstanding_bytes": 18446744073709551615"#,
                "max_outstanding_bytes",
                "9223372036854775807",
            ),
            (
                r#""batch_max_messages": 0"#,
                "batch_max_messages",
                "between 1 and 1000",
            ),
            (
                r#""batch_max_messages": 1001"#,
                "batch_max_messages",
                "between 1 and 1000",
            ),
            (
                r#""batch_max_bytes": 0"#,
                "batch_max_bytes",
                "between 1 and 10000000",
            ),
            (
                r#""max_message_bytes": 0"#,
                "max_message_bytes",
                "between 1 and 10000000",
            ),
            (
                r#""dead_letter": {"topic": "d", "max_delivery_attempts": 4}"#,
                "max_delivery_attempts",
                "between 5 and 100",
            ),
            (
                r#""ack_deadline": "9s""#,
                "ack_deadline",
                "between 10s and 600s",
            ),
            (
                r#""ack_deadline": "601s""#,
                "ack_deadline",
                "between 10s and 600s",
            ),
            (
                r#""ack_deadline": "10s 500ms""#,
                "ack_deadline",
                "whole number of seconds",
            ),
            (
                r#""max_lease_extension": "20s 1ms""#,
                "max_lease_extension",
                "whole number of seconds",
            ),
            (r#""publish_timeout": "0s""#, "publish_timeout", "positive"),
            (
                r#""uuid_attribute": """#,
                "uuid_attribute",
                "1 to 256 bytes",
            ),
            (r#""uuid_attribute": "googx""#, "uuid_attribute", "goog"),
        ] {
            let config = parse(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            let err = config.validate().expect_err(json).to_string();
            assert!(err.contains(field), "{json}: {err}");
            assert!(err.contains(range), "{json}: {err} should say {range}");
        }
    }

    #[test]
    fn credentials_in_endpoints_are_refused_and_never_shown() {
        for (config, field) in [
            (
                GoogleCloudConfig {
                    endpoint: Some("https://user:hunter2@pubsub.example.com/x".into()),
                    ..GoogleCloudConfig::new("p-123456")
                },
                "endpoint",
            ),
            (
                GoogleCloudConfig {
                    endpoint: Some("https://pubsub.example.com/?key=hunter2".into()),
                    ..GoogleCloudConfig::new("p-123456")
                },
                "endpoint",
            ),
            (
                GoogleCloudConfig {
                    endpoint: Some("user:hunter2@pubsub.example.com".into()),
                    ..GoogleCloudConfig::new("p-123456")
                },
                "endpoint",
            ),
            (
                GoogleCloudConfig::emulator("p-123456", "user:hunter2@127.0.0.1:8085"),
                "emulator_host",
            ),
        ] {
            let err = config.validate().expect_err(field).to_string();
            assert!(err.contains(field), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
            let debug = format!("{config:?}");
            assert!(!debug.contains("hunter2"), "{debug}");
            assert!(debug.contains("pubsub.example.com") || debug.contains("127.0.0.1"));
        }
        assert_eq!(
            redact_url("https://a:b@host:1/path?key=c#f"),
            "https://***@host:1/path?***"
        );
        assert_eq!(redact_url("https://host/v1"), "https://host/v1");
    }
}
