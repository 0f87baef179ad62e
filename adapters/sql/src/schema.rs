//! The adapter's tables, connection pools and error mapping.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Executor;
use tidemill_core::{ConnectionState, Error, Result};

use crate::config::SqlConfig;
use crate::BROKER;

/// The names of the adapter's tables for one [`SqlConfig::table_prefix`].
#[derive(Clone, Debug)]
pub(crate) struct Tables {
    pub(crate) messages: String,
    pub(crate) groups: String,
    pub(crate) pending: String,
    pub(crate) inbox: String,
    /// Prefix of index names (the table prefix without its schema).
    index: String,
    /// The `NOTIFY` channel publishers wake subscriptions on (payload: the topic).
    pub(crate) channel: String,
}

impl Tables {
    pub(crate) fn new(prefix: &str) -> Self {
        let index = prefix.rsplit('.').next().unwrap_or(prefix).to_owned();
        Tables {
            messages: format!("{prefix}messages"),
            groups: format!("{prefix}groups"),
            pending: format!("{prefix}pending"),
            inbox: format!("{prefix}inbox"),
            index,
            channel: format!("{prefix}messages"),
        }
    }

    /// Every table and index, schema-qualified as the prefix is.
    fn objects(&self) -> Vec<String> {
        let schema = self
            .messages
            .rsplit_once('.')
            .map_or(String::new(), |(s, _)| format!("{s}."));
        let index = &self.index;
        vec![
            self.messages.clone(),
            self.groups.clone(),
            self.pending.clone(),
            self.inbox.clone(),
            format!("{schema}{index}messages_position"),
            format!("{schema}{index}pending_seq"),
            format!("{schema}{index}pending_order"),
            format!("{schema}{index}pending_key"),
            format!("{schema}{index}pending_done"),
            format!("{schema}{index}inbox_handled_at"),
        ]
    }

    /// The DDL creating every table and index (idempotent).
    pub(crate) fn ddl(&self) -> String {
        let Tables {
            messages,
            groups,
            pending,
            index,
            ..
        } = self;
        let inbox = self.inbox_ddl();
        format!(
            r#"CREATE TABLE IF NOT EXISTS {messages} (
    "offset" BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic TEXT NOT NULL,
    uuid TEXT,
    key BYTEA,
    metadata JSONB NOT NULL DEFAULT '{{}}'::jsonb,
    payload BYTEA NOT NULL DEFAULT ''::bytea,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    deliver_at TIMESTAMPTZ,
    transaction_id XID8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX IF NOT EXISTS {index}messages_position ON {messages} (topic, transaction_id, "offset");
CREATE TABLE IF NOT EXISTS {groups} (
    topic TEXT NOT NULL,
    consumer_group TEXT NOT NULL,
    transaction_id XID8 NOT NULL,
    "offset" BIGINT NOT NULL,
    ahead_transaction_id XID8 NOT NULL,
    ahead_offset BIGINT NOT NULL,
    late XID8[] NOT NULL DEFAULT '{{}}',
    snapshot_xmax XID8 NOT NULL DEFAULT '0',
    expires_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, consumer_group)
);
CREATE TABLE IF NOT EXISTS {pending} (
    topic TEXT NOT NULL,
    consumer_group TEXT NOT NULL,
    transaction_id XID8 NOT NULL,
    "offset" BIGINT NOT NULL,
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    key BYTEA,
    attempts INTEGER NOT NULL DEFAULT 0,
    visible_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    locked_by TEXT,
    lease_until TIMESTAMPTZ,
    done BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (topic, consumer_group, "offset")
);
CREATE UNIQUE INDEX IF NOT EXISTS {index}pending_seq ON {pending} (seq);
CREATE INDEX IF NOT EXISTS {index}pending_order ON {pending} (topic, consumer_group, seq);
CREATE INDEX IF NOT EXISTS {index}pending_key ON {pending} (topic, consumer_group, key, seq) WHERE key IS NOT NULL;
CREATE INDEX IF NOT EXISTS {index}pending_done ON {pending} (topic, consumer_group, transaction_id, "offset") WHERE done;
{inbox}"#
        )
    }

    /// The DDL creating the inbox table and its index only (idempotent): what an
    /// [`Inbox`](crate::inbox::Inbox) runs when its table is missing. `outputs` holds the
    /// messages the handler returned, encoded (see the inbox module), NULL when none.
    pub(crate) fn inbox_ddl(&self) -> String {
        let Tables { inbox, index, .. } = self;
        format!(
            r#"CREATE TABLE IF NOT EXISTS {inbox} (
    consumer TEXT NOT NULL,
    message_uuid TEXT NOT NULL,
    handled_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    outputs BYTEA,
    PRIMARY KEY (consumer, message_uuid)
);
CREATE INDEX IF NOT EXISTS {index}inbox_handled_at ON {inbox} (handled_at);
"#
        )
    }
}

/// The SQL that creates the adapter's tables and indexes for `table_prefix` (what the
/// adapter runs on first use unless [`SqlConfig::create_schema`] is off), for migrations of
/// your own:
///
/// - `<prefix>messages`: every published message, one row each, in publish order per
///   topic (`offset`, and the publishing transaction's id so consumers never skip a row
///   committed late);
/// - `<prefix>groups`: each consumer group's read position per topic;
/// - `<prefix>pending`: each group's messages not yet acked (attempts, when visible
///   again, which consumer holds them until when);
/// - `<prefix>inbox`: message ids an [`Inbox`](crate::inbox::Inbox) recorded as handled,
///   with the outputs their handler returned.
///
/// ```
/// let sql = tidemill_sql::schema_sql("tidemill_");
/// assert!(sql.contains("CREATE TABLE IF NOT EXISTS tidemill_messages"));
/// ```
pub fn schema_sql(table_prefix: &str) -> String {
    Tables::new(table_prefix).ddl()
}

/// A pool of connections to the configured database, checked by connecting once within
/// `connect_timeout`, with the schema created (or checked) once.
pub(crate) async fn connect(config: &SqlConfig, role: &str) -> Result<PgPool> {
    config.validate()?;
    let options = PgConnectOptions::from_str(&config.url)
        .map_err(|e| {
            Error::config(
                BROKER,
                format!(
                    "url `{}` cannot be parsed: {}",
                    config.address(),
                    scrub(&e.to_string(), config)
                ),
            )
        })?
        .application_name(&format!("{}-{role}", config.consumer_name));
    // No ping before each use (a round trip per statement): a connection that broke fails
    // its statement, which the callers retry on a fresh one.
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.connect_timeout)
        .test_before_acquire(false)
        .connect_lazy_with(options);
    let tables = Tables::new(&config.table_prefix);
    let setup = async {
        let mut conn = pool.acquire().await?;
        // Look before creating: `CREATE … IF NOT EXISTS` of an existing table or index still
        // queues for a lock on it, behind every open transaction that wrote to it (and
        // every insert queues behind that request).
        let missing: Vec<String> = sqlx::query_scalar(
            "SELECT n FROM unnest($1::text[]) AS n WHERE to_regclass(n) IS NULL",
        )
        .bind(tables.objects())
        .fetch_all(&mut *conn)
        .await?;
        if missing.is_empty() {
            return outdated(&mut conn, &tables)
                .await
                .map(|o| o.map(Setup::Outdated));
        }
        if !config.create_schema {
            return Ok(Some(Setup::Missing(missing[0].clone())));
        }
        // One creator at a time (concurrent `CREATE … IF NOT EXISTS` of one table can fail
        // on the catalog's unique index), and never waiting long for a lock.
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        tx.execute(sqlx::raw_sql(&format!(
            "SET LOCAL lock_timeout = '{}ms'",
            config.connect_timeout.as_millis().max(1)
        )))
        .await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("tidemill-schema {}", config.table_prefix))
            .execute(&mut *tx)
            .await?;
        tx.execute(sqlx::raw_sql(&tables.ddl())).await?;
        tx.commit().await?;
        outdated(&mut conn, &tables)
            .await
            .map(|o| o.map(Setup::Outdated))
    };
    let setup: std::result::Result<Option<Setup>, sqlx::Error> =
        match tokio::time::timeout(config.connect_timeout + Duration::from_secs(1), setup).await {
            Ok(r) => r,
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        };
    match setup {
        Ok(None) => Ok(pool),
        Ok(Some(Setup::Outdated(column))) => Err(Error::permanent(
            BROKER,
            "",
            "check the schema",
            format!(
                "`{column}` is missing in {}: the table was created by an earlier version of \
                 tidemill-sql; drop its tables (or migrate them to tidemill_sql::schema_sql)",
                config.address()
            ),
        )),
        Ok(Some(Setup::Missing(table))) => Err(Error::permanent(
            BROKER,
            "",
            "check the schema",
            format!(
                "table or index `{table}` does not exist in {} and create_schema is off (create it \
                 with tidemill_sql::schema_sql)",
                config.address()
            ),
        )),
        Err(e) if is_connect_error(&e) => Err(Error::Connect {
            broker: BROKER,
            address: config.host_port(),
            source: scrub(&describe(&e, config), config).into(),
        }),
        Err(e) => Err(error(e, config, "", "create the schema")),
    }
}

/// What `connect` found wrong with the schema.
enum Setup {
    /// A table or index that does not exist (schema creation off).
    Missing(String),
    /// A column of this version missing from an existing table (`table.column`).
    Outdated(String),
}

/// The first column this version needs that an existing table lacks (tables of an earlier
/// version: `CREATE TABLE IF NOT EXISTS` leaves them as they are).
async fn outdated(
    conn: &mut sqlx::PgConnection,
    tables: &Tables,
) -> std::result::Result<Option<String>, sqlx::Error> {
    let needed = [
        (&tables.groups, "ahead_transaction_id"),
        (&tables.groups, "late"),
        (&tables.groups, "snapshot_xmax"),
        (&tables.pending, "seq"),
        (&tables.pending, "done"),
    ];
    let names: Vec<&str> = needed.iter().map(|(t, _)| t.as_str()).collect();
    let columns: Vec<&str> = needed.iter().map(|(_, c)| *c).collect();
    sqlx::query_scalar(
        "SELECT x.t || '.' || x.c FROM unnest($1::text[], $2::text[]) AS x(t, c)
         WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = to_regclass(x.t) AND a.attname = x.c AND NOT a.attisdropped)
         LIMIT 1",
    )
    .bind(&names)
    .bind(&columns)
    .fetch_optional(&mut *conn)
    .await
}

/// Whether `e` says the database could not be reached or refused the login.
fn is_connect_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Configuration(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("28") || c == "3D000"),
        _ => false,
    }
}

/// Whether retrying what failed with `e` may succeed.
pub(crate) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            // connection exceptions, serialization failures and deadlocks, insufficient
            // resources, operator intervention (server shutting down or starting), a lock
            // not granted within lock_timeout.
            c == "55P03"
                || c.starts_with("08")
                || c.starts_with("40")
                || c.starts_with("53")
                || c.starts_with("57P")
        }),
        _ => false,
    }
}

/// A readable cause: for a pool timeout, what it means here.
fn describe(e: &sqlx::Error, config: &SqlConfig) -> String {
    match e {
        sqlx::Error::PoolTimedOut => format!(
            "no connection within connect_timeout ({:?}): the server does not answer or \
             every pooled connection is busy",
            config.connect_timeout
        ),
        other => other.to_string(),
    }
}

/// `text` with the configured password (if any) replaced by `***`.
pub(crate) fn scrub(text: &str, config: &SqlConfig) -> String {
    match password(&config.url) {
        Some(p) if !p.is_empty() => text.replace(p, "***"),
        _ => text.to_owned(),
    }
}

fn password(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    if let Some((auth, _)) = rest.rsplit_once('@') {
        if let Some((_, p)) = auth.split_once(':') {
            return Some(p);
        }
    }
    let at = url.find("password=")? + "password=".len();
    let end = url[at..].find('&').map_or(url.len(), |e| at + e);
    Some(&url[at..end])
}

/// A tidemill error for `e`, naming the topic, what was being done and the server; a
/// missing table is named with a hint.
pub(crate) fn error(e: sqlx::Error, config: &SqlConfig, topic: &str, context: &str) -> Error {
    if let sqlx::Error::Database(db) = &e {
        if db.code().as_deref() == Some("42P01") {
            return Error::permanent(
                BROKER,
                topic,
                context,
                format!(
                    "{} in {} (create_schema is {}; tidemill_sql::schema_sql has the DDL)",
                    db.message(),
                    config.address(),
                    if config.create_schema { "on" } else { "off" }
                ),
            );
        }
    }
    let cause = format!("{} (database {})", describe(&e, config), config.address());
    let cause = scrub(&cause, config);
    if is_transient(&e) {
        Error::transient(BROKER, topic, context, cause)
    } else {
        Error::permanent(BROKER, topic, context, cause)
    }
}

/// A connection's state as queries found it, for health checks.
pub(crate) type StateCell = tidemill_core::ConnectionStateCell;

/// Records what a query's outcome says about the connection.
pub(crate) fn saw<T>(state: &StateCell, result: &std::result::Result<T, sqlx::Error>) {
    match result {
        Ok(_) => state.set(ConnectionState::Connected),
        Err(e) if is_connect_error(e) || is_transient(e) => {
            state.set(ConnectionState::Disconnected)
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubs_the_password_from_text() {
        let config = SqlConfig::new("postgres://u:s3cret@h/db");
        assert_eq!(scrub("auth s3cret failed", &config), "auth *** failed");
        let config = SqlConfig::new("postgres://h/db?password=s3cret&user=u");
        assert_eq!(scrub("s3cret", &config), "***");
    }

    #[test]
    fn index_names_have_no_schema() {
        let ddl = schema_sql("app.events_");
        assert!(ddl.contains("CREATE TABLE IF NOT EXISTS app.events_pending"));
        assert!(ddl.contains("INDEX IF NOT EXISTS events_pending_key ON app.events_pending"));
    }
}
