//! Configuration of the PostgreSQL adapter.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidemill_core::{Error, Result};

use crate::BROKER;

/// Where a consumer group the adapter creates starts reading its topic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// Only messages published after the group was created.
    #[default]
    New,
    /// Every message the table still holds for the topic, oldest first.
    Beginning,
}

/// Configuration of [`SqlPublisher`](crate::SqlPublisher) and
/// [`SqlSubscriber`](crate::SqlSubscriber).
///
/// Every field has a default (a local server on port 5432, database `postgres`). Durations
/// are humantime strings in configuration files (`"30s"`, `"500ms"`).
///
/// ```
/// use std::time::Duration;
/// use tidemill_sql::SqlConfig;
///
/// let mut config = SqlConfig::new("postgres://app:secret@127.0.0.1:5432/app");
/// config.table_prefix = "events_".into();
/// config.lease = Duration::from_secs(60);
/// // The password never shows in Debug output or errors.
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqlConfig {
    /// The database: `postgres://[user[:password]@]host[:port]/database[?sslmode=…]`
    /// (`postgresql://` too). TLS with `sslmode=require` (or `verify-ca`/`verify-full`,
    /// with `sslrootcert=…`) trusts the system's root certificates. Default
    /// `postgres://127.0.0.1:5432/postgres`.
    pub url: String,
    /// Prefix of the adapter's tables (`<prefix>messages`, `<prefix>groups`,
    /// `<prefix>pending`, `<prefix>inbox`) and of its notification channel. Letters,
    /// digits and `_` only; may name a schema too (`app.tidemill_`). Default `tidemill_`.
    pub table_prefix: String,
    /// Create the tables and indexes on first use (`CREATE … IF NOT EXISTS`, serialised by
    /// an advisory lock). Default true; with false, a missing table is an error naming it
    /// (create them with [`schema_sql`](crate::schema_sql)).
    pub create_schema: bool,
    /// Connections of one publisher's or subscriber's pool at most. Default 10.
    pub max_connections: u32,
    /// How long connecting (or waiting for a free pooled connection) may take before it
    /// fails naming the host. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a publish (or an ack) keeps retrying after a lost connection before it
    /// fails. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Messages one subscription holds at most: fetched but not yet settled. Default 64.
    pub prefetch: usize,
    /// How often a subscription with nothing to do looks for messages anyway. Publishers
    /// wake subscriptions at once with `NOTIFY`; this is the fallback when a notification
    /// is missed (a connection lost) and the cadence for messages another consumer of the
    /// group gave back. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a fetched message stays reserved for its subscription. A live
    /// subscription renews the reservations it holds every third of this, so a slow
    /// handler is never overtaken; a subscription that died (crash, lost network) leaves
    /// its messages to the group after this long. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Where consumer groups the adapter creates start. Default [`StartFrom::New`].
    pub start_from: StartFrom,
    /// Hand out one message per key at a time within a consumer group: the next message
    /// with a key waits until the previous one is acked (a nacked one comes back first).
    /// Default true.
    pub order_per_key: bool,
    /// The largest message the publisher writes (payload, metadata, key and uuid), in
    /// bytes. Default 16 MiB.
    pub max_message_bytes: usize,
    /// Name prefix of this process's consumers (shown in the `locked_by` column and in
    /// private groups' names). Default `tidemill`.
    pub consumer_name: String,
    /// A private group (a subscription without a consumer group) that was not renewed for
    /// this long belongs to a process that died; subscriptions to its topic remove it.
    /// Default 1 h.
    #[serde(with = "humantime_serde")]
    pub private_group_expiry: Duration,
    /// Delete messages of a subscribed topic once they are older than this **and** every
    /// consumer group of the topic has acked them (each subscription does so for its topic
    /// about every tenth of this, at least every second and at most every five minutes).
    /// Default none: rows are kept, so a new group starting at the beginning reads them
    /// all. Set it for outbox topics and other work queues (e.g. `"1h"`).
    #[serde(with = "humantime_serde")]
    pub retention: Option<Duration>,
}

impl Default for SqlConfig {
    fn default() -> Self {
        SqlConfig {
            url: "postgres://127.0.0.1:5432/postgres".to_owned(),
            table_prefix: "tidemill_".to_owned(),
            create_schema: true,
            max_connections: 10,
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(10),
            prefetch: 64,
            poll_interval: Duration::from_secs(1),
            lease: Duration::from_secs(30),
            start_from: StartFrom::New,
            order_per_key: true,
            max_message_bytes: 16 * 1024 * 1024,
            consumer_name: "tidemill".to_owned(),
            private_group_expiry: Duration::from_secs(3600),
            retention: None,
        }
    }
}

impl SqlConfig {
    /// The defaults, with the database at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        SqlConfig {
            url: url.into(),
            ..SqlConfig::default()
        }
    }

    /// The URL with its password hidden, for errors and logs.
    pub fn address(&self) -> String {
        redact(&self.url)
    }

    /// `host:port` of the URL, for errors.
    pub(crate) fn host_port(&self) -> String {
        let rest = self.url.split("://").nth(1).unwrap_or(&self.url);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        let hp = rest.split(['/', '?']).next().unwrap_or(rest);
        if hp.is_empty() {
            "localhost:5432".to_owned()
        } else if hp.contains(':') && !hp.ends_with(']') {
            hp.to_owned()
        } else {
            format!("{hp}:5432")
        }
    }

    /// Checks the values that have no meaningful fallback (the URL's scheme, the table
    /// prefix, zero `prefetch`, too short `lease`, zero `poll_interval`); `connect` does
    /// too.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::config(BROKER, what.to_owned()));
        if !(self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")) {
            return Err(Error::config(
                BROKER,
                format!(
                    "url `{}` must start with postgres:// or postgresql://",
                    self.address()
                ),
            ));
        }
        let valid_prefix = !self.table_prefix.is_empty()
            && !self
                .table_prefix
                .starts_with(|c: char| c.is_ascii_digit() || c == '.')
            && self.table_prefix.matches('.').count() <= 1
            && self
                .table_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            && self.table_prefix.len() <= 40;
        if !valid_prefix {
            return Err(Error::config(
                BROKER,
                format!(
                    "table_prefix `{}` must be 1 to 40 letters, digits or `_` (optionally \
                     `schema.` first), not starting with a digit",
                    self.table_prefix
                ),
            ));
        }
        if self.prefetch == 0 {
            return bad("prefetch must be at least 1");
        }
        if self.max_connections == 0 {
            return bad("max_connections must be at least 1");
        }
        if self.lease < Duration::from_millis(300) {
            return bad("lease must be at least 300ms");
        }
        if self.poll_interval.is_zero() {
            return bad("poll_interval must be above zero");
        }
        Ok(())
    }
}

impl fmt::Debug for SqlConfig {
    /// Every field, the URL's password as `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlConfig")
            .field("url", &self.address())
            .field("table_prefix", &self.table_prefix)
            .field("create_schema", &self.create_schema)
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("prefetch", &self.prefetch)
            .field("poll_interval", &self.poll_interval)
            .field("lease", &self.lease)
            .field("start_from", &self.start_from)
            .field("order_per_key", &self.order_per_key)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("consumer_name", &self.consumer_name)
            .field("private_group_expiry", &self.private_group_expiry)
            .field("retention", &self.retention)
            .finish()
    }
}

/// `url` with the password (between `user:` and `@`) and any `password=` query value
/// replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let mut out = match url.split_once("://") {
        Some((scheme, rest)) => {
            let (auth, host) = match rest.rsplit_once('@') {
                Some((auth, host)) => (Some(auth), host),
                None => (None, rest),
            };
            match auth {
                Some(auth) => match auth.split_once(':') {
                    Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                    None => format!("{scheme}://{auth}@{host}"),
                },
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    };
    if let Some(at) = out.find("password=") {
        let start = at + "password=".len();
        let end = out[start..].find('&').map_or(out.len(), |e| start + e);
        out.replace_range(start..end, "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://u:s3cret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact("postgres://h/db?user=u&password=s3cret&sslmode=require"),
            "postgres://h/db?user=u&password=***&sslmode=require"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn host_port_of_urls() {
        assert_eq!(
            SqlConfig::new("postgres://u:p@db.local:5433/x").host_port(),
            "db.local:5433"
        );
        assert_eq!(
            SqlConfig::new("postgresql://db.local/x?sslmode=require").host_port(),
            "db.local:5432"
        );
    }

    #[test]
    fn validation_names_the_option() {
        let mut c = SqlConfig::new("mysql://x");
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("postgres://"));
        c.url = "postgres://x".into();
        c.table_prefix = "bad-prefix".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("table_prefix"));
        c.table_prefix = "app.events_".into();
        assert!(c.validate().is_ok());
        c.prefetch = 0;
        assert!(c.validate().unwrap_err().to_string().contains("prefetch"));
    }
}
