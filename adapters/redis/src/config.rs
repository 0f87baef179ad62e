//! Configuration of the Redis Streams adapter.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidemill_core::{Error, Result};

use crate::BROKER;

/// Where a consumer group the adapter creates starts reading its stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// Only entries added after the group was created (`XGROUP CREATE … $`).
    #[default]
    New,
    /// Every entry the stream still holds, oldest first (`XGROUP CREATE … 0`).
    Beginning,
}

/// Configuration of [`RedisPublisher`](crate::RedisPublisher) and
/// [`RedisSubscriber`](crate::RedisSubscriber).
///
/// Every field has a default (a local server on port 6379). Durations are humantime strings
/// in configuration files (`"30s"`, `"500ms"`).
///
/// ```
/// use std::time::Duration;
/// use tidemill_redis::RedisConfig;
///
/// let mut config = RedisConfig::new("redis://127.0.0.1:6379/0");
/// config.claim_idle = Duration::from_secs(60);
/// config.max_len = Some(1_000_000);
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// The server: `redis://[user:password@]host:port/db`, or `rediss://…` for TLS (the
    /// system's root certificates). Default `redis://127.0.0.1:6379/0`.
    pub url: String,
    /// With a `rediss://` URL: a PEM file of the certificate authorities to trust instead of
    /// the system's root certificates (a private CA). Default none.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Prepended to every topic to name its stream (e.g. `app:`); default none, so the
    /// stream is named like the topic and other clients can read and write it as is.
    pub stream_prefix: String,
    /// The stream entry field that carries the payload. Default `payload` (what Watermill
    /// writes too). Every other field is metadata, except `tidemill-uuid` and
    /// `tidemill-key`.
    pub payload_field: String,
    /// Entries one subscription holds at most: read but not yet acked (buffered, handed
    /// out, or waiting for a delayed redelivery). Default 64.
    pub prefetch: usize,
    /// How long one `XREADGROUP` waits for new entries before asking again. Default 2 s.
    /// Only affects how often an idle subscription talks to the server.
    #[serde(with = "humantime_serde")]
    pub block: Duration,
    /// An entry another consumer of the group received and has not acked for this long is
    /// taken over (`XAUTOCLAIM`) and delivered again: how long the messages of a consumer
    /// that died (crash, lost network) wait. Live subscriptions keep the entries they hold
    /// fresh, so a slow handler is never overtaken. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub claim_idle: Duration,
    /// How often a subscription looks for entries to take over: those idle for longer than
    /// [`claim_idle`](Self::claim_idle), and those another subscription gave back when it
    /// ended or was closed (taken at once). Default 1 s.
    #[serde(with = "humantime_serde")]
    pub claim_interval: Duration,
    /// Where consumer groups the adapter creates start. Default [`StartFrom::New`].
    pub start_from: StartFrom,
    /// Hand out one message per key at a time within a subscription; a nacked message
    /// comes back before the next message with its key. Default true.
    pub order_per_key: bool,
    /// Trim every stream published to to about this many entries (`XADD … MAXLEN ~ n`).
    /// Default none: streams grow until trimmed otherwise. **Trimming removes entries
    /// whether or not every consumer group has read them**: a group that falls further
    /// behind than this loses messages.
    pub max_len: Option<u64>,
    /// Trim entries older than this from every stream published to (`XADD … MINID ~`).
    /// Default none. The same trade-off as [`max_len`](Self::max_len).
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// The largest message the publisher sends (payload plus fields), in bytes. Default
    /// 16 MiB.
    pub max_message_bytes: usize,
    /// Create streams and consumer groups as needed. Default true; with false, publishing
    /// to or subscribing to a stream that does not exist fails naming it.
    pub create_streams: bool,
    /// Name prefix of this process's consumers in their groups (each subscription adds a
    /// unique suffix). Default `tidemill`.
    pub consumer_name: String,
    /// Consumers of a group that hold no entries and were idle this long are removed when
    /// a subscription to the group starts (subscriptions that ended leave theirs behind).
    /// Default 1 h.
    #[serde(with = "humantime_serde")]
    pub consumer_expiry: Duration,
    /// How long connecting may take before it fails. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a command (publish, ack, claim) may take before it fails. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/0".to_owned(),
            tls_ca_file: None,
            stream_prefix: String::new(),
            payload_field: "payload".to_owned(),
            prefetch: 64,
            block: Duration::from_secs(2),
            claim_idle: Duration::from_secs(30),
            claim_interval: Duration::from_secs(1),
            start_from: StartFrom::New,
            order_per_key: true,
            max_len: None,
            max_age: None,
            max_message_bytes: 16 * 1024 * 1024,
            create_streams: true,
            consumer_name: "tidemill".to_owned(),
            consumer_expiry: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(10),
        }
    }
}

impl RedisConfig {
    /// The defaults, with the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            ..RedisConfig::default()
        }
    }

    /// The name of the stream holding `topic`.
    pub fn stream(&self, topic: &str) -> String {
        format!("{}{topic}", self.stream_prefix)
    }

    /// The URL with its password hidden, for errors and logs.
    pub fn address(&self) -> String {
        redact(&self.url)
    }

    /// Checks the values that have no meaningful fallback (the URL's scheme, a zero
    /// `prefetch`, an empty or reserved `payload_field`, too short `claim_idle`, zero
    /// `block` or `claim_interval`); `connect` does too.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::config(BROKER, what.to_owned()));
        if !(self.url.starts_with("redis://")
            || self.url.starts_with("rediss://")
            || self.url.starts_with("redis+unix://")
            || self.url.starts_with("unix://"))
        {
            return Err(Error::config(
                BROKER,
                format!(
                    "url `{}` must start with redis://, rediss:// or unix://",
                    self.address()
                ),
            ));
        }
        if self.tls_ca_file.is_some() && !self.url.starts_with("rediss://") {
            return bad("tls_ca_file needs a rediss:// url");
        }
        if self.prefetch == 0 {
            return bad("prefetch must be at least 1");
        }
        if self.payload_field.is_empty() {
            return bad("payload_field must not be empty");
        }
        if self.payload_field == tidemill_core::headers::UUID_HEADER
            || self.payload_field == tidemill_core::headers::KEY_HEADER
        {
            return bad("payload_field must not be tidemill-uuid or tidemill-key");
        }
        if self.claim_idle < Duration::from_millis(100) {
            return bad("claim_idle must be at least 100ms");
        }
        if self.claim_interval.is_zero() || self.block.is_zero() {
            return bad("claim_interval and block must be above zero");
        }
        Ok(())
    }
}

impl fmt::Debug for RedisConfig {
    /// Every field, the URL's password as `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.address())
            .field("tls_ca_file", &self.tls_ca_file)
            .field("stream_prefix", &self.stream_prefix)
            .field("payload_field", &self.payload_field)
            .field("prefetch", &self.prefetch)
            .field("block", &self.block)
            .field("claim_idle", &self.claim_idle)
            .field("claim_interval", &self.claim_interval)
            .field("start_from", &self.start_from)
            .field("order_per_key", &self.order_per_key)
            .field("max_len", &self.max_len)
            .field("max_age", &self.max_age)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("create_streams", &self.create_streams)
            .field("consumer_name", &self.consumer_name)
            .field("consumer_expiry", &self.consumer_expiry)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .finish()
    }
}

/// `url` with the userinfo (`user:password@`) replaced by `***@`.
pub(crate) fn redact(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    // The last `@` before the query: a password may itself hold `@` or `/` (a Redis URL's
    // path is a database number, never an `@`), so in doubt more is hidden, never less.
    let query = rest.find(['?', '#']).unwrap_or(rest.len());
    match rest[..query].rfind('@') {
        Some(at) => format!("{scheme}***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials() {
        assert_eq!(
            redact("redis://app:hunter2@cache:6379/0"),
            "redis://***@cache:6379/0"
        );
        assert_eq!(redact("rediss://:s3cr3t@cache/1"), "rediss://***@cache/1");
        assert_eq!(redact("redis://a:p@ss/w@rd@h:1/0"), "redis://***@h:1/0");
        assert_eq!(
            redact("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        let c = RedisConfig::new("redis://u:hunter2@h:1/0");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn validates() {
        assert!(RedisConfig::default().validate().is_ok());
        let e = RedisConfig::new("http://u:hunter2@h")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("redis://") && !e.to_string().contains("hunter2"));
        let c = RedisConfig {
            prefetch: 0,
            ..RedisConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("prefetch"));
    }

    #[test]
    fn deserializes_with_defaults() {
        let c: RedisConfig = serde_json_like();
        assert_eq!(c.claim_idle, Duration::from_secs(45));
        assert_eq!(c.prefetch, 64);
    }

    fn serde_json_like() -> RedisConfig {
        // humantime strings, other fields defaulted
        let value = serde::de::value::MapDeserializer::<_, serde::de::value::Error>::new(
            [("claim_idle", "45s")].into_iter(),
        );
        RedisConfig::deserialize(value).expect("deserializes")
    }
}
