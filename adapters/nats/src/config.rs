//! Configuration of the NATS adapter.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidemill_core::{Error, Result};

use crate::naming;
use crate::BROKER;

/// How Tidemill uses NATS: JetStream (persistent, at least once) or core NATS (at most once).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatsMode {
    /// JetStream: topics live in streams, publishing awaits the stream's acknowledgement
    /// (PubAck), subscriptions are pull consumers with explicit acks. At least once.
    #[default]
    JetStream,
    /// Core NATS: plain subjects, no storage, no acknowledgements, no redelivery.
    /// **At most once**: a message published while nobody subscribes, or lost with a
    /// connection, is gone; `nack` does not bring a message back.
    Core,
}

/// Where a consumer the adapter creates starts reading its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliverFrom {
    /// Every message the stream still holds, oldest first.
    All,
    /// Only messages published after the consumer was created.
    New,
    /// The last message the stream holds for the topic, then every newer one.
    Last,
}

/// Where a stream the adapter creates keeps its messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// On disk: survives a server restart.
    #[default]
    File,
    /// In memory: faster, lost when the server restarts.
    Memory,
}

/// When a stream the adapter creates discards messages (besides the `max_*` limits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    /// Keep messages until a `max_*` limit removes them, whoever consumed them. Groups
    /// created later, and subscriptions with [`DeliverFrom::All`], can read them.
    #[default]
    Limits,
    /// Keep a message until every consumer that existed when it arrived acked it; messages
    /// published while no consumer exists are dropped.
    Interest,
    /// Remove a message once one consumer acked it; the stream allows one consumer per
    /// subject, so only one consumer group per topic.
    WorkQueue,
}

/// Which header carries a message's uuid ([`NatsConfig::uuid_header`]).
///
/// Whatever is configured, a received message's uuid is read from the first of: the
/// configured header, `tidemill-uuid`, a `Nats-Msg-Id` Tidemill wrote
/// (`{uuid}.{hash}`), `_watermill_message_uuid`, any other `Nats-Msg-Id` (whole, as the
/// other client wrote it); a message with none of them gets a uuid derived from its
/// stream and sequence (JetStream) or its subject, headers and payload (core NATS).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UuidHeader {
    /// Tidemill's own: the uuid travels in `Nats-Msg-Id` as `{uuid}.{hash}` (16 hex
    /// digits of a hash of uuid, subject, metadata, key and payload), so the stream drops a
    /// retried publish but stores a deliberate republish of the uuid with other content or
    /// to another topic of the same stream; when the
    /// metadata sets its own `Nats-Msg-Id`, that one is sent and the uuid goes in
    /// `tidemill-uuid`.
    #[default]
    Tidemill,
    /// Watermill's: the bare uuid in `_watermill_message_uuid` (what Watermill services
    /// read and write), plus Tidemill's `Nats-Msg-Id` for the stream's deduplication.
    Watermill,
    /// The bare uuid as `Nats-Msg-Id`, JetStream's message id: what plain NATS clients
    /// read. The stream then drops any message whose uuid it saw within
    /// `duplicate_window`, including a deliberate republish of the same uuid with other
    /// content (a dead-letter copy to the same topic) and the message forwarded to another
    /// topic of the same stream.
    NatsMsgId,
    /// The bare uuid in a header of this name, plus Tidemill's `Nats-Msg-Id` for the
    /// stream's deduplication.
    Header(String),
}

/// Configuration shared by [`NatsPublisher`](crate::NatsPublisher) and
/// [`NatsSubscriber`](crate::NatsSubscriber).
///
/// Every field has a default (a local server, JetStream). Durations are humantime strings in
/// configuration files (`"30s"`, `"1h 30m"`, `"250ms"`).
///
/// ```
/// use tidemill_nats::{NatsConfig, NatsMode};
///
/// let config: NatsConfig = serde_json::from_str(r#"{
///     "url": "nats://nats-1:4222,nats://nats-2:4222",
///     "connect_timeout": "5s",
///     "jetstream": { "ack_wait": "1m", "max_ack_pending": 1, "max_age": "7days" }
/// }"#).unwrap();
/// assert_eq!(config.mode, NatsMode::JetStream); // a default
/// assert_eq!(config.jetstream.ack_wait, std::time::Duration::from_secs(60));
/// config.validate().unwrap();
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// The server(s): one URL or several separated by commas (`nats://host:4222`,
    /// `tls://host:4222`; `host:port` works too). The client connects to one and fails over
    /// to the others. Default: `nats://127.0.0.1:4222`.
    pub url: String,

    /// JetStream (default) or core NATS. See [`NatsMode`].
    pub mode: NatsMode,

    /// Connection name shown by the server's monitoring (`/connz`). Default: unset.
    pub connection_name: Option<String>,

    /// User name for user/password authentication (with [`password`](Self::password)).
    /// Default: unset (or the user in the URL).
    pub user: Option<String>,

    /// Password for user/password authentication. Default: unset.
    pub password: Option<String>,

    /// Token authentication. Default: unset.
    pub token: Option<String>,

    /// A `.creds` file (JWT and NKey seed) for decentralized authentication. Default: unset.
    pub credentials_file: Option<PathBuf>,

    /// Require TLS (also implied by `tls://` URLs). Default: `false`.
    pub tls_required: bool,

    /// PEM file with extra root certificates to trust for TLS. Default: unset (the system's).
    pub root_certificates: Option<PathBuf>,

    /// How long connecting to one server may take (TCP, TLS, the server's greeting).
    /// Creating a publisher or subscriber tries each server of [`url`](Self::url) once, in
    /// random order, and fails with `Error::Connect` naming the addresses when none
    /// answered (so after at most this times the number of servers); it also bounds each
    /// reconnect attempt to one server, so a node that hangs costs one timeout before the
    /// next is tried. Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,

    /// Time limit of each request to the server: JetStream API calls (creating streams and
    /// consumers), the wait for each PubAck, and core NATS's publish confirmation.
    /// Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,

    /// How long `publish` keeps retrying transient failures (connection loss, PubAck timeout,
    /// JetStream unavailable) before it fails. Default: `60s`.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,

    /// How often the client pings the server; two unanswered pings count as a lost
    /// connection (then the client reconnects). Default: `20s`.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,

    /// Reconnect attempts after a lost connection before the client gives up; `None`
    /// retries forever. Default: `None`.
    #[serde(deserialize_with = "strict::max_reconnects")]
    pub max_reconnects: Option<usize>,

    /// Reconnect only to the configured servers, not to servers the cluster announces.
    /// Needed when the client reaches the server through a proxy or NAT. Default: `false`.
    pub ignore_discovered_servers: bool,

    /// Which header carries the message uuid (see [`UuidHeader`]). Default: `tidemill`.
    /// In configuration files: `"tidemill"`, `"watermill"`, `"nats_msg_id"` or
    /// `{ "header": "x-message-id" }`.
    pub uuid_header: UuidHeader,

    /// Prepended to every topic to form its subject (both modes): topic `orders` is
    /// subject `{subject_prefix}orders`. Default: `""`.
    pub subject_prefix: String,

    /// JetStream settings (used when [`mode`](Self::mode) is [`NatsMode::JetStream`]).
    pub jetstream: JetStreamConfig,
}

/// JetStream settings: how topics map to streams, how consumers are created, flow control.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JetStreamConfig {
    /// JetStream domain (leaf nodes); the API prefix becomes `$JS.{domain}.API`.
    /// Default: unset.
    pub domain: Option<String>,

    /// One stream for every topic: the adapter creates it (when missing) with the subjects
    /// `{subject_prefix}>`, so [`NatsConfig::subject_prefix`] must be set and end
    /// with `.`. Default: unset, i.e. the topic's subject is looked up among the existing
    /// streams and, when no stream captures it, a stream of its own is created (see
    /// [`stream_prefix`](Self::stream_prefix)).
    pub stream: Option<String>,

    /// Name prefix of the stream created for a topic: `{stream_prefix}{topic}`, with
    /// characters a stream name cannot hold (`.`, `*`, `>`, spaces, ...) replaced by `_` and
    /// a short hash of the topic appended when anything was replaced. Default: `""`.
    pub stream_prefix: String,

    /// Create missing streams. When `false`, publishing or subscribing to a topic no stream
    /// captures fails with an error naming the subject. Default: `true`.
    pub create_streams: bool,

    /// Storage of the streams the adapter creates. Default: `file`.
    pub storage: Storage,

    /// Retention of the streams the adapter creates. Default: `limits`.
    pub retention: Retention,

    /// Replicas of the streams the adapter creates (1 to 5, clustered JetStream).
    /// Default: `1`.
    #[serde(deserialize_with = "strict::replicas")]
    pub replicas: usize,

    /// Streams the adapter creates drop messages older than this. Default: unset (no age
    /// limit).
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,

    /// Streams the adapter creates keep at most this many messages (oldest dropped first).
    /// Default: unset (no limit).
    #[serde(deserialize_with = "strict::max_messages")]
    pub max_messages: Option<i64>,

    /// Streams the adapter creates keep at most this many bytes. Default: unset (no limit).
    #[serde(deserialize_with = "strict::max_bytes")]
    pub max_bytes: Option<i64>,

    /// How long the streams the adapter creates remember message ids (`Nats-Msg-Id`: the
    /// message uuid and a hash of its subject and content) to drop duplicates, e.g. from a retried
    /// publish. Default: `2m`.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,

    /// How long the server waits for an ack before redelivering. The adapter keeps a held
    /// delivery alive with in-progress acks (`+WPI`) every `ack_wait / 2` (up to
    /// [`max_in_progress`](Self::max_in_progress)), so slow handlers are not redelivered
    /// underneath; `ack_wait` matters when a process dies or hangs. Default: `30s`.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,

    /// Deliveries of a message by the server before JetStream gives up on it (then it is
    /// neither delivered nor removed; a dead-letter middleware should act before). Local
    /// redeliveries of keyed messages ([`order_per_key`](Self::order_per_key)) do not count.
    /// `None`: no limit. Default: `None`.
    #[serde(deserialize_with = "strict::max_deliver")]
    pub max_deliver: Option<i64>,

    /// Unacked messages a consumer (a group, or a subscription without group) may have
    /// outstanding, including those a subscription holds back for
    /// [`order_per_key`](Self::order_per_key); the server delivers no more until some are
    /// settled. `1` delivers one message at a time in stream order across all keys and
    /// group members (a nacked message then comes back before any other). Default: `1000`.
    #[serde(deserialize_with = "strict::max_ack_pending")]
    pub max_ack_pending: i64,

    /// Keep order per key within each subscription: of the messages with the same key,
    /// one at a time is handed out (in stream order); the next waits until it is acked; a
    /// nacked one is handed out again (after its delay) before its successors, by the
    /// subscription itself, and the server is asked to redeliver it only if the
    /// subscription ended meanwhile. Messages without a key are not held back. With several
    /// subscribers in one group, JetStream spreads a key's messages over them, so order per
    /// key then holds only within each subscriber. Default: `true`.
    pub order_per_key: bool,

    /// Where a consumer group starts when its consumer is first created. Default: `all`
    /// (everything the stream holds; like Kafka's `earliest`).
    pub group_deliver: DeliverFrom,

    /// Where a subscription without a consumer group starts. Default: `new` (messages
    /// published after `subscribe` returned); `all` makes a new subscriber see the messages
    /// the stream already holds.
    pub subscription_deliver: DeliverFrom,

    /// The server deletes the consumer of a subscription without group after this long
    /// without a client pulling (the adapter deletes it itself when the subscription ends).
    /// Default: `5m`.
    #[serde(with = "humantime_serde")]
    pub inactive_threshold: Duration,

    /// Messages requested per pull request; another request goes out when half were
    /// received. Default: `500`.
    #[serde(deserialize_with = "strict::pull_batch")]
    pub pull_batch: usize,

    /// Lifetime of a pull request on the server. Default: `30s`.
    #[serde(with = "humantime_serde")]
    pub pull_expires: Duration,

    /// The server sends a heartbeat this often while a pull request waits; after two missed
    /// heartbeats the subscription sends a new pull request (and re-creates its consumer if
    /// it vanished). At most half of [`pull_expires`](Self::pull_expires). Default: `5s`.
    #[serde(with = "humantime_serde")]
    pub idle_heartbeat: Duration,

    /// The longest a delivery is kept alive with in-progress acks while the application
    /// holds it; afterwards the server redelivers it after `ack_wait`. Default: `1h`.
    #[serde(with = "humantime_serde")]
    pub max_in_progress: Duration,

    /// Publishing pipelines this many messages before awaiting their PubAcks (a batch
    /// larger than this goes out in several windows). At most
    /// [`max_ack_inflight`](Self::max_ack_inflight). Default: `1000`.
    #[serde(deserialize_with = "strict::publish_window")]
    pub publish_window: usize,

    /// PubAcks one publisher awaits at most at a time, across all concurrent `publish`
    /// calls. Default: `5000`.
    #[serde(deserialize_with = "strict::max_ack_inflight")]
    pub max_ack_inflight: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            mode: NatsMode::JetStream,
            connection_name: None,
            user: None,
            password: None,
            token: None,
            credentials_file: None,
            tls_required: false,
            root_certificates: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(60),
            ping_interval: Duration::from_secs(20),
            max_reconnects: None,
            ignore_discovered_servers: false,
            uuid_header: UuidHeader::Tidemill,
            subject_prefix: String::new(),
            jetstream: JetStreamConfig::default(),
        }
    }
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            domain: None,
            stream: None,
            stream_prefix: String::new(),
            create_streams: true,
            storage: Storage::File,
            retention: Retention::Limits,
            replicas: 1,
            max_age: None,
            max_messages: None,
            max_bytes: None,
            duplicate_window: Duration::from_secs(120),
            ack_wait: Duration::from_secs(30),
            max_deliver: None,
            max_ack_pending: 1000,
            order_per_key: true,
            group_deliver: DeliverFrom::All,
            subscription_deliver: DeliverFrom::New,
            inactive_threshold: Duration::from_secs(300),
            pull_batch: 500,
            pull_expires: Duration::from_secs(30),
            idle_heartbeat: Duration::from_secs(5),
            max_in_progress: Duration::from_secs(3600),
            publish_window: 1000,
            max_ack_inflight: 5000,
        }
    }
}

impl NatsConfig {
    /// The defaults (JetStream) for the server(s) at `url`.
    ///
    /// ```
    /// let config = tidemill_nats::NatsConfig::new("nats://127.0.0.1:4222");
    /// assert_eq!(config.url, "nats://127.0.0.1:4222");
    /// ```
    pub fn new(url: impl Into<String>) -> Self {
        NatsConfig {
            url: url.into(),
            ..Self::default()
        }
    }

    /// The defaults in core NATS mode (at most once) for the server(s) at `url`.
    ///
    /// ```
    /// use tidemill_nats::{NatsConfig, NatsMode};
    /// assert_eq!(NatsConfig::core("nats://127.0.0.1:4222").mode, NatsMode::Core);
    /// ```
    pub fn core(url: impl Into<String>) -> Self {
        NatsConfig {
            mode: NatsMode::Core,
            ..Self::new(url)
        }
    }

    /// The server addresses, parsed.
    pub(crate) fn server_addrs(&self) -> Result<Vec<async_nats::ServerAddr>> {
        let mut addrs = Vec::new();
        for part in self.url.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let addr = async_nats::ServerAddr::from_str(part).map_err(|e| {
                Error::config(
                    BROKER,
                    format!(
                        "`url` entry {:?} is not a NATS URL: {}",
                        redact_urls(part),
                        redact_text(&e.to_string(), self)
                    ),
                )
            })?;
            // A server URL has no path: `nats://nats://host:4222` (a scheme repeated by
            // whoever joined the list) would otherwise be read as host `nats`, port 4222.
            let path = addr.clone().into_inner().path().to_owned();
            if !path.is_empty() && path != "/" {
                return Err(Error::config(
                    BROKER,
                    format!(
                        "`url` entry {:?} is not one server address: a NATS server URL \
                         has no path (a scheme written twice?)",
                        redact_urls(part),
                    ),
                ));
            }
            addrs.push(addr);
        }
        if addrs.is_empty() {
            return Err(Error::config(BROKER, "`url` names no server"));
        }
        Ok(addrs)
    }

    /// Checks every field; the error names the offending one.
    ///
    /// ```
    /// let mut config = tidemill_nats::NatsConfig::default();
    /// config.jetstream.pull_batch = 0;
    /// let err = config.validate().unwrap_err();
    /// assert!(err.to_string().contains("pull_batch"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::config(BROKER, msg));
        self.server_addrs()?;
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("publish_timeout", self.publish_timeout),
            ("ping_interval", self.ping_interval),
        ] {
            if value.is_zero() {
                return bad(format!("`{name}` must be positive"));
            }
        }
        if self.max_reconnects == Some(0) {
            return bad(
                "`max_reconnects` must be at least 1 (or unset to retry forever), got 0".into(),
            );
        }
        if self.user.is_some() != self.password.is_some() {
            return bad("`user` and `password` must be set together".into());
        }
        if let Some(name) = &self.connection_name {
            if name.contains(['\r', '\n']) {
                return bad("`connection_name` must be one line".into());
            }
        }
        if !self.subject_prefix.is_empty() && !naming::is_subject_prefix(&self.subject_prefix) {
            return bad(format!(
                "`subject_prefix` {:?} must be the start of a subject (tokens separated by `.`, no spaces or wildcards)",
                self.subject_prefix
            ));
        }
        if self.mode == NatsMode::JetStream {
            self.jetstream.validate()?;
            if self.jetstream.stream.is_some()
                && self.jetstream.create_streams
                && !self.subject_prefix.ends_with('.')
            {
                return bad(
                    "`jetstream.stream` needs `subject_prefix` ending with `.`: the shared stream is created with the subjects `{subject_prefix}>`"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

impl JetStreamConfig {
    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::config(BROKER, msg));
        if let Some(domain) = &self.domain {
            if domain.is_empty() || !naming::is_subject_token(domain) {
                return bad(format!(
                    "`jetstream.domain` {domain:?} must be one subject token (no `.`, spaces or wildcards)"
                ));
            }
        }
        if let Some(stream) = &self.stream {
            if !naming::is_stream_name(stream) {
                return bad(format!(
                    "`jetstream.stream` {stream:?} is not a valid stream name (letters, digits, `-` and `_`)"
                ));
            }
        }
        if !self.stream_prefix.is_empty() && !naming::is_stream_name(&self.stream_prefix) {
            return bad(format!(
                "`jetstream.stream_prefix` {:?} may only hold letters, digits, `-` and `_`",
                self.stream_prefix
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return bad(format!(
                "`jetstream.replicas` must be between 1 and 5, got {}",
                self.replicas
            ));
        }
        for (name, value) in [
            ("jetstream.max_messages", self.max_messages),
            ("jetstream.max_bytes", self.max_bytes),
            ("jetstream.max_deliver", self.max_deliver),
        ] {
            if let Some(v) = value {
                if v < 1 {
                    return bad(format!(
                        "`{name}` must be at least 1 (or unset for no limit), got {v}"
                    ));
                }
            }
        }
        if self.max_ack_pending < 1 {
            return bad(format!(
                "`jetstream.max_ack_pending` must be at least 1, got {}",
                self.max_ack_pending
            ));
        }
        for (name, value) in [
            ("jetstream.duplicate_window", self.duplicate_window),
            ("jetstream.ack_wait", self.ack_wait),
            ("jetstream.inactive_threshold", self.inactive_threshold),
            ("jetstream.pull_expires", self.pull_expires),
            ("jetstream.idle_heartbeat", self.idle_heartbeat),
            ("jetstream.max_in_progress", self.max_in_progress),
        ] {
            if value.is_zero() {
                return bad(format!("`{name}` must be positive"));
            }
        }
        if self.max_age.is_some_and(|d| d.is_zero()) {
            return bad("`jetstream.max_age` must be positive (or unset for no limit)".into());
        }
        if self.ack_wait < Duration::from_secs(1) {
            return bad(format!(
                "`jetstream.ack_wait` must be at least 1s, got {:?}",
                self.ack_wait
            ));
        }
        if self.pull_expires < Duration::from_secs(1) {
            return bad(format!(
                "`jetstream.pull_expires` must be at least 1s, got {:?}",
                self.pull_expires
            ));
        }
        if self.idle_heartbeat * 2 > self.pull_expires {
            return bad(format!(
                "`jetstream.idle_heartbeat` ({:?}) must be at most half of `jetstream.pull_expires` ({:?})",
                self.idle_heartbeat, self.pull_expires
            ));
        }
        if self.pull_batch == 0 {
            return bad("`jetstream.pull_batch` must be at least 1".into());
        }
        if self.max_ack_inflight == 0 {
            return bad("`jetstream.max_ack_inflight` must be at least 1".into());
        }
        if self.publish_window == 0 || self.publish_window > self.max_ack_inflight {
            return bad(format!(
                "`jetstream.publish_window` must be between 1 and `jetstream.max_ack_inflight` ({}), got {}",
                self.max_ack_inflight, self.publish_window
            ));
        }
        Ok(())
    }

    /// The JetStream API prefix.
    pub(crate) fn api_prefix(&self) -> String {
        match &self.domain {
            Some(domain) => format!("$JS.{domain}.API"),
            None => "$JS.API".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_strict_and_name_their_range() {
        let cases = [
            (
                r#"{"jetstream":{"replicas":-5}}"#,
                "between 1 and 5, got -5",
            ),
            (
                r#"{"jetstream":{"replicas":"-5"}}"#,
                "between 1 and 5, got -5",
            ),
            (r#"{"jetstream":{"replicas":6}}"#, "between 1 and 5, got 6"),
            (
                r#"{"jetstream":{"pull_batch":0}}"#,
                "`jetstream.pull_batch` must be an integer between 1 and",
            ),
            (
                r#"{"jetstream":{"max_ack_pending":1.5}}"#,
                "got the fraction 1.5",
            ),
            (
                r#"{"jetstream":{"max_ack_pending":2.0}}"#,
                "`jetstream.max_ack_pending`",
            ),
            (
                r#"{"jetstream":{"max_ack_pending":99999999999999999999999}}"#,
                "between 1 and 9223372036854775807",
            ),
            (
                r#"{"jetstream":{"max_ack_pending":"99999999999999999999999"}}"#,
                "got 99999999999999999999999",
            ),
            (
                r#"{"jetstream":{"max_deliver":"yes"}}"#,
                "`jetstream.max_deliver`",
            ),
            (
                r#"{"jetstream":{"max_deliver":true}}"#,
                "got the boolean true",
            ),
            (
                r#"{"jetstream":{"max_messages":-1}}"#,
                "or unset for no limit), got -1",
            ),
            (
                r#"{"jetstream":{"max_ack_inflight":0}}"#,
                "`jetstream.max_ack_inflight`",
            ),
            (
                r#"{"max_reconnects":0}"#,
                "or unset to retry forever), got 0",
            ),
            (r#"{"max_reconnects":-1}"#, "`max_reconnects`"),
        ];
        for (json, want) in cases {
            let err = serde_json::from_str::<NatsConfig>(json).expect_err(json);
            assert!(err.to_string().contains(want), "{json}: {err}");
        }
        let ok: NatsConfig = serde_json::from_str(
            r#"{"max_reconnects": null, "jetstream": {"replicas": "3", "max_deliver": 5}}"#,
        )
        .unwrap();
        assert_eq!(ok.jetstream.replicas, 3);
        assert_eq!(ok.jetstream.max_deliver, Some(5));
        assert_eq!(ok.max_reconnects, None);
        let zero = NatsConfig {
            max_reconnects: Some(0),
            ..NatsConfig::default()
        };
        assert!(zero
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_reconnects"));
    }

    #[test]
    fn secrets_stay_out_of_debug_and_errors() {
        let config = NatsConfig {
            password: Some("pw-s3cret".into()),
            user: Some("bob".into()),
            token: Some("tok-s3cret".into()),
            ..NatsConfig::new("nats://alice:hunter2@a:4222, tls://t0ken-s3cret@b:4222")
        };
        let debug = format!("{config:?}");
        for secret in ["pw-s3cret", "tok-s3cret", "hunter2", "t0ken-s3cret"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        assert!(
            debug.contains("***@a:4222") && debug.contains("bob"),
            "{debug}"
        );
        let bad = NatsConfig::new("nats://carol:pa55word@host:notaport");
        let err = bad.validate().unwrap_err().to_string();
        assert!(!err.contains("pa55word") && err.contains("url"), "{err}");
        assert_eq!(
            redact_text("auth failed for carol:pa55word", &bad),
            "auth failed for ***"
        );
    }

    #[test]
    fn defaults_are_valid() {
        NatsConfig::default().validate().unwrap();
        NatsConfig::core("127.0.0.1:4222").validate().unwrap();
        NatsConfig::new("nats://a:4222, tls://b:4222")
            .validate()
            .unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let mut cases: Vec<(NatsConfig, &str)> = Vec::new();
        let with = |f: &dyn Fn(&mut NatsConfig)| {
            let mut c = NatsConfig::default();
            f(&mut c);
            c
        };
        cases.push((with(&|c| c.url = " , ".into()), "url"));
        cases.push((with(&|c| c.url = "nats://host:notaport".into()), "url"));
        cases.push((
            with(&|c| c.url = "nats://a:4222,nats://nats://b:4222".into()),
            "has no path",
        ));
        cases.push((
            with(&|c| c.connect_timeout = Duration::ZERO),
            "connect_timeout",
        ));
        cases.push((with(&|c| c.user = Some("u".into())), "password"));
        cases.push((with(&|c| c.jetstream.pull_batch = 0), "pull_batch"));
        cases.push((
            with(&|c| c.jetstream.stream = Some("bad.name".into())),
            "jetstream.stream",
        ));
        cases.push((
            with(&|c| c.jetstream.stream = Some("SHARED".into())),
            "subject_prefix",
        ));
        cases.push((
            with(&|c| c.subject_prefix = "a b.".into()),
            "subject_prefix",
        ));
        cases.push((
            with(&|c| c.jetstream.max_ack_pending = 0),
            "max_ack_pending",
        ));
        cases.push((
            with(&|c| c.jetstream.idle_heartbeat = Duration::from_secs(20)),
            "idle_heartbeat",
        ));
        cases.push((
            with(&|c| c.jetstream.publish_window = 6000),
            "publish_window",
        ));
        cases.push((with(&|c| c.jetstream.replicas = 0), "replicas"));
        cases.push((with(&|c| c.jetstream.max_deliver = Some(0)), "max_deliver"));
        cases.push((
            with(&|c| c.jetstream.ack_wait = Duration::from_millis(10)),
            "ack_wait",
        ));
        for (config, field) in cases {
            let err = config.validate().expect_err(field);
            assert!(matches!(err, Error::Config { .. }), "{err}");
            assert!(err.to_string().contains(field), "{err} should name {field}");
            assert!(err.to_string().starts_with("nats:"), "{err}");
        }
    }

    #[test]
    fn jetstream_settings_do_not_matter_in_core_mode() {
        let mut config = NatsConfig::core("127.0.0.1:4222");
        config.jetstream.pull_batch = 0;
        config.validate().unwrap();
    }

    #[test]
    fn deserializes_with_defaults_and_rejects_unknown_fields() {
        let config: NatsConfig = serde_json::from_str(
            r#"{"mode": "core", "publish_timeout": "5s",
                "jetstream": {"group_deliver": "new", "storage": "memory", "max_age": "1h"}}"#,
        )
        .unwrap();
        assert_eq!(config.mode, NatsMode::Core);
        assert_eq!(config.publish_timeout, Duration::from_secs(5));
        assert_eq!(config.jetstream.group_deliver, DeliverFrom::New);
        assert_eq!(config.jetstream.storage, Storage::Memory);
        assert_eq!(config.jetstream.max_age, Some(Duration::from_secs(3600)));
        assert_eq!(config.jetstream.pull_batch, 500);
        let err = serde_json::from_str::<NatsConfig>(r#"{"urls": "x"}"#).expect_err("unknown");
        assert!(err.to_string().contains("urls"), "{err}");
        let err =
            serde_json::from_str::<NatsConfig>(r#"{"mode": "jetstreams"}"#).expect_err("bad mode");
        assert!(err.to_string().contains("jetstreams"), "{err}");
        let err = serde_json::from_str::<NatsConfig>(r#"{"jetstream": {"ack_wait": "soon"}}"#)
            .expect_err("bad duration");
        assert!(err.to_string().contains("soon"), "{err}");
    }
}

impl fmt::Debug for NatsConfig {
    /// Shows every field but the secrets: `password` and `token` as `***`, credentials in
    /// the URLs as `***@` (the credentials file is named, never read).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| HIDDEN);
        f.debug_struct("NatsConfig")
            .field("url", &redact_urls(&self.url))
            .field("mode", &self.mode)
            .field("connection_name", &self.connection_name)
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("credentials_file", &self.credentials_file)
            .field("tls_required", &self.tls_required)
            .field("root_certificates", &self.root_certificates)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field("ping_interval", &self.ping_interval)
            .field("max_reconnects", &self.max_reconnects)
            .field("ignore_discovered_servers", &self.ignore_discovered_servers)
            .field("uuid_header", &self.uuid_header)
            .field("subject_prefix", &self.subject_prefix)
            .field("jetstream", &self.jetstream)
            .finish()
    }
}

/// What replaces a secret in messages.
const HIDDEN: &str = "***";

/// `urls` (one or several, comma-separated) with every userinfo (`user:password@`, or a
/// bare token before `@`) replaced by `***@`.
pub(crate) fn redact_urls(urls: &str) -> String {
    urls.split(',')
        .map(|part| {
            let (scheme, rest) = match part.find("://") {
                Some(i) => part.split_at(i + 3),
                None => ("", part),
            };
            match rest.rfind('@') {
                Some(at) => format!("{scheme}{HIDDEN}{}", &rest[at..]),
                None => part.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `text` (an error from a client library) with every secret of `config` replaced:
/// passwords, tokens and URL userinfo.
pub(crate) fn redact_text(text: &str, config: &NatsConfig) -> String {
    let mut out = text.to_owned();
    let mut secrets: Vec<String> = Vec::new();
    secrets.extend(config.password.clone());
    secrets.extend(config.token.clone());
    for part in config.url.split(',') {
        let rest = part.split_once("://").map_or(part, |(_, r)| r);
        if let Some(at) = rest.rfind('@') {
            let userinfo = &rest[..at];
            secrets.push(userinfo.to_owned());
            secrets.extend(userinfo.split(':').map(str::to_owned));
        }
    }
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(secret.as_str(), HIDDEN);
    }
    out
}

/// Strict integer fields: integers (or strings holding one) within the field's range;
/// floats, booleans and values out of range are errors naming the range.
mod strict {
    use std::fmt;

    use serde::de::{self, Deserializer, Visitor};

    struct Int {
        field: &'static str,
        min: i128,
        max: i128,
        unset: &'static str,
    }

    impl Int {
        fn range<E: de::Error>(&self, got: impl fmt::Display) -> E {
            E::custom(format!(
                "`{}` must be an integer between {} and {}{}, got {got}",
                self.field, self.min, self.max, self.unset
            ))
        }

        fn check<E: de::Error>(&self, v: i128) -> Result<i128, E> {
            if v < self.min || v > self.max {
                Err(self.range(v))
            } else {
                Ok(v)
            }
        }
    }

    impl<'de> Visitor<'de> for Int {
        type Value = i128;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "an integer between {} and {}", self.min, self.max)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i128, E> {
            self.check(i128::from(v))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i128, E> {
            self.check(i128::from(v))
        }

        fn visit_i128<E: de::Error>(self, v: i128) -> Result<i128, E> {
            self.check(v)
        }

        fn visit_u128<E: de::Error>(self, v: u128) -> Result<i128, E> {
            self.check(i128::try_from(v).unwrap_or(i128::MAX))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<i128, E> {
            if v.fract() == 0.0 && v.is_finite() && (v < self.min as f64 || v > self.max as f64) {
                return Err(self.range(v));
            }
            Err(E::custom(format!(
                "`{}` must be an integer between {} and {}{}, got the fraction {v} (not rounded)",
                self.field, self.min, self.max, self.unset
            )))
        }

        fn visit_bool<E: de::Error>(self, v: bool) -> Result<i128, E> {
            Err(E::custom(format!(
                "`{}` must be an integer between {} and {}{}, got the boolean {v}",
                self.field, self.min, self.max, self.unset
            )))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<i128, E> {
            let t = v.trim();
            let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                return match t.parse::<i128>() {
                    Ok(n) => self.check(n),
                    Err(_) => Err(self.range(t)),
                };
            }
            Err(E::custom(format!(
                "`{}` must be an integer between {} and {}{}, got {v:?}",
                self.field, self.min, self.max, self.unset
            )))
        }
    }

    macro_rules! field {
        ($fn:ident, $ty:ty, $field:literal, $min:expr, $max:expr) => {
            pub(super) fn $fn<'de, D: Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
                let v = d.deserialize_any(Int {
                    field: $field,
                    min: $min as i128,
                    max: $max as i128,
                    unset: "",
                })?;
                Ok(v as $ty)
            }
        };
        ($fn:ident, Option<$ty:ty>, $field:literal, $min:expr, $max:expr, $unset:literal) => {
            pub(super) fn $fn<'de, D: Deserializer<'de>>(d: D) -> Result<Option<$ty>, D::Error> {
                struct Opt;
                impl<'de> Visitor<'de> for Opt {
                    type Value = Option<$ty>;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "an integer or null")
                    }
                    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                        Ok(None)
                    }
                    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                        Ok(None)
                    }
                    fn visit_some<D2: Deserializer<'de>>(
                        self,
                        d: D2,
                    ) -> Result<Self::Value, D2::Error> {
                        let v = d.deserialize_any(Int {
                            field: $field,
                            min: $min as i128,
                            max: $max as i128,
                            unset: $unset,
                        })?;
                        Ok(Some(v as $ty))
                    }
                }
                d.deserialize_option(Opt)
            }
        };
    }

    field!(replicas, usize, "jetstream.replicas", 1, 5);
    field!(
        max_ack_pending,
        i64,
        "jetstream.max_ack_pending",
        1,
        i64::MAX
    );
    field!(pull_batch, usize, "jetstream.pull_batch", 1, 1_000_000);
    field!(
        publish_window,
        usize,
        "jetstream.publish_window",
        1,
        u32::MAX
    );
    field!(
        max_ack_inflight,
        usize,
        "jetstream.max_ack_inflight",
        1,
        u32::MAX
    );
    field!(
        max_reconnects,
        Option<usize>,
        "max_reconnects",
        1,
        u32::MAX,
        " (or unset to retry forever)"
    );
    field!(
        max_messages,
        Option<i64>,
        "jetstream.max_messages",
        1,
        i64::MAX,
        " (or unset for no limit)"
    );
    field!(
        max_bytes,
        Option<i64>,
        "jetstream.max_bytes",
        1,
        i64::MAX,
        " (or unset for no limit)"
    );
    field!(
        max_deliver,
        Option<i64>,
        "jetstream.max_deliver",
        1,
        i64::MAX,
        " (or unset for no limit)"
    );
}
