//! Configuration of the SQS/SNS adapter.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidemill_core::{Error, Result};

use crate::names;
use crate::BROKER;

/// How topics map onto SNS and SQS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Publish/subscribe (the default): a topic is an SNS topic; each consumer group is an
    /// SQS queue subscribed to it (`<topic>-<group>`, raw message delivery), so every group
    /// sees every message; a subscription without a group gets a private queue, deleted
    /// when the subscription ends.
    #[default]
    Topics,
    /// Point to point: a topic is an SQS queue of that name, published to with
    /// `SendMessageBatch`; every subscriber competes for its messages whatever group it
    /// names (no SNS involved). For work queues, and for queues other programs fill.
    Queues,
}

/// Configuration of [`SqsPublisher`](crate::SqsPublisher) and
/// [`SqsSubscriber`](crate::SqsSubscriber).
///
/// Credentials are never part of it: the SDK reads them from the standard chain
/// (environment, shared config and credentials files, SSO, web identity, container and
/// instance roles), so none can end up in a log line. Durations are humantime strings in
/// configuration files (`"30s"`, `"500ms"`).
///
/// ```
/// use std::time::Duration;
/// use tidemill_aws::AwsConfig;
///
/// let mut config = AwsConfig::new("eu-west-1");
/// config.fifo = true; // order per key (message group = key)
/// config.visibility_timeout = Duration::from_secs(60);
/// // A local emulator (moto, LocalStack):
/// config.endpoint = Some("http://127.0.0.1:4566".into());
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsConfig {
    /// The AWS region, e.g. `eu-west-1`. Default none: the standard chain's (`AWS_REGION`,
    /// the profile's `region`).
    pub region: Option<String>,
    /// Another endpoint for both services, e.g. `http://127.0.0.1:4566` for an emulator.
    /// Default none: AWS's own.
    pub endpoint: Option<String>,
    /// The shared-config profile to read credentials and region from. Default none:
    /// `AWS_PROFILE`, else `default`.
    pub profile: Option<String>,
    /// How topics map onto SNS and SQS. Default [`Mode::Topics`].
    pub mode: Mode,
    /// FIFO topics and queues (names get the `.fifo` suffix): messages with the same key
    /// are delivered in publish order, one at a time per consumer group (the key is the
    /// message group id), and a message is deduplicated by its uuid for five minutes. FIFO
    /// throughput is lower (300 messages/s per group without high-throughput mode). Default
    /// false: standard topics and queues, which deliver in no particular order and may
    /// deliver a message twice.
    pub fifo: bool,
    /// Prepended to every topic to name its SNS topic and SQS queues. Default none.
    pub name_prefix: String,
    /// Create SNS topics, SQS queues and subscriptions as needed. Default true; with false,
    /// using one that does not exist fails naming it.
    pub create_resources: bool,
    /// How long one `ReceiveMessage` waits for messages (long polling, 0 to 20 s). Default
    /// 20 s. Only affects how often an idle subscription asks; messages are returned as
    /// soon as they arrive.
    #[serde(with = "humantime_serde")]
    pub wait_time: Duration,
    /// How long a received message stays invisible to other consumers. A subscription
    /// extends it every third of this while it holds the message (buffered or in a
    /// handler), so a slow handler never loses its message to another consumer; when a
    /// consumer dies, its messages come back after this. Whole seconds, 1 s to 12 h.
    /// Default 30 s.
    #[serde(with = "humantime_serde")]
    pub visibility_timeout: Duration,
    /// Messages one subscription holds at most: received and not yet settled (buffered,
    /// handed out, or held back behind an earlier message of their key). Default 40.
    pub prefetch: usize,
    /// `ReceiveMessage` calls one subscription keeps in flight (each returns at most 10
    /// messages). Default 2.
    pub concurrent_receives: usize,
    /// FIFO only: hand out one message per key at a time within a subscription (SQS may
    /// return several messages of one group in one receive); when one is nacked, the ones
    /// held behind it go back with it, so they come back after it. Default true.
    pub order_per_key: bool,
    /// The largest message the publisher sends (body plus attributes), in bytes. Default
    /// 262,144 (256 KiB, the SNS and SQS limit).
    pub max_message_bytes: usize,
    /// A received body that is an SNS notification envelope (from a queue subscribed
    /// without raw message delivery, and carrying no message attributes of its own) is
    /// unwrapped: the payload is its `Message`, the metadata its `MessageAttributes`.
    /// Default true.
    pub unwrap_sns_envelopes: bool,
    /// How long the queues this adapter creates keep a message nobody consumed (SQS's
    /// `MessageRetentionPeriod`, 60 s to 14 days). Default none: SQS's own, 4 days.
    #[serde(with = "humantime_serde")]
    pub message_retention: Option<Duration>,
    /// A subscription without a consumer group reads a private queue, deleted when the
    /// subscription ends. A process that crashed cannot delete its private queues: each live
    /// one is tagged with a heartbeat every quarter of this, and a new private subscription
    /// to the same topic deletes (and unsubscribes) those whose heartbeat is older than
    /// this. Default 1 h.
    #[serde(with = "humantime_serde")]
    pub private_queue_expiry: Duration,
    /// How long connecting may take before it fails. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a call (publish, ack, create a queue) may take, retries included, before it
    /// fails. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            region: None,
            endpoint: None,
            profile: None,
            mode: Mode::Topics,
            fifo: false,
            name_prefix: String::new(),
            create_resources: true,
            wait_time: Duration::from_secs(20),
            visibility_timeout: Duration::from_secs(30),
            prefetch: 40,
            concurrent_receives: 2,
            order_per_key: true,
            max_message_bytes: 256 * 1024,
            unwrap_sns_envelopes: true,
            message_retention: None,
            private_queue_expiry: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for AwsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsConfig")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint.as_deref().map(names::redact))
            .field("profile", &self.profile)
            .field("mode", &self.mode)
            .field("fifo", &self.fifo)
            .field("name_prefix", &self.name_prefix)
            .field("create_resources", &self.create_resources)
            .field("wait_time", &self.wait_time)
            .field("visibility_timeout", &self.visibility_timeout)
            .field("prefetch", &self.prefetch)
            .field("concurrent_receives", &self.concurrent_receives)
            .field("order_per_key", &self.order_per_key)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("unwrap_sns_envelopes", &self.unwrap_sns_envelopes)
            .field("message_retention", &self.message_retention)
            .field("private_queue_expiry", &self.private_queue_expiry)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .finish()
    }
}

impl AwsConfig {
    /// The defaults, in `region`.
    pub fn new(region: impl Into<String>) -> Self {
        AwsConfig {
            region: Some(region.into()),
            ..AwsConfig::default()
        }
    }

    /// Where requests go, for error messages: the endpoint without credentials, or AWS's
    /// SQS endpoint of the region.
    pub fn address(&self) -> String {
        match (&self.endpoint, &self.region) {
            (Some(endpoint), _) => names::redact(endpoint),
            (None, Some(region)) => format!("sqs.{region}.amazonaws.com"),
            (None, None) => "AWS (region from the environment)".to_owned(),
        }
    }

    /// Checks the values the services would reject, naming the option.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::config(BROKER, m));
        if self.wait_time > Duration::from_secs(20) {
            return bad(format!(
                "wait_time is {:?}; SQS long polling waits 20 s at most",
                self.wait_time
            ));
        }
        let vis = self.visibility_timeout;
        if vis < Duration::from_secs(1) || vis > Duration::from_secs(12 * 3600) {
            return bad(format!(
                "visibility_timeout is {vis:?}; SQS takes 1 s to 12 h"
            ));
        }
        if self.prefetch == 0 {
            return bad("prefetch is 0; a subscription must hold at least one message".into());
        }
        if self.concurrent_receives == 0 {
            return bad("concurrent_receives is 0; at least one receive must run".into());
        }
        if let Some(r) = self.message_retention {
            if r < Duration::from_secs(60) || r > Duration::from_secs(14 * 24 * 3600) {
                return bad(format!(
                    "message_retention is {r:?}; SQS keeps messages 60 s to 14 days"
                ));
            }
        }
        if self.private_queue_expiry < Duration::from_secs(60) {
            return bad(format!(
                "private_queue_expiry is {:?}; at least 60 s (live queues refresh their \
                 heartbeat every quarter of it)",
                self.private_queue_expiry
            ));
        }
        if self.max_message_bytes == 0 {
            return bad("max_message_bytes is 0".into());
        }
        if let Some(endpoint) = &self.endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return bad(format!(
                    "endpoint `{}` is not an http:// or https:// URL",
                    names::redact(endpoint)
                ));
            }
        }
        Ok(())
    }

    /// The SNS topic name of `topic` (Topics mode) or the queue name (Queues mode).
    pub fn topic_name(&self, topic: &str) -> String {
        match self.mode {
            Mode::Topics => {
                names::resource(&self.name_prefix, &[topic], self.fifo, names::TOPIC_MAX)
            }
            Mode::Queues => {
                names::resource(&self.name_prefix, &[topic], self.fifo, names::QUEUE_MAX)
            }
        }
    }

    /// The SQS queue name of consumer group `group` of `topic` (Topics mode), or the topic's
    /// queue (Queues mode, where groups share it).
    pub fn queue_name(&self, topic: &str, group: &str) -> String {
        match self.mode {
            Mode::Topics => names::resource(
                &self.name_prefix,
                &[topic, group],
                self.fifo,
                names::QUEUE_MAX,
            ),
            Mode::Queues => self.topic_name(topic),
        }
    }

    /// The name of a private queue of `topic` (`id`: unique per subscription), and the
    /// prefix every private queue of the topic shares.
    pub fn private_queue_name(&self, topic: &str, id: &str) -> (String, String) {
        let suffix = if self.fifo { ".fifo" } else { "" };
        // "-tp-" + 12 characters of id + suffix must fit after the topic's part.
        let base = names::resource(
            &self.name_prefix,
            &[topic],
            false,
            names::QUEUE_MAX - 4 - 12 - suffix.len(),
        );
        let prefix = format!("{base}-tp-");
        (format!("{prefix}{id}{suffix}"), prefix)
    }

    /// The visibility timeout in whole seconds, as SQS takes it.
    pub(crate) fn visibility_secs(&self) -> i32 {
        self.visibility_timeout.as_secs().clamp(1, 43_200) as i32
    }
}
