//! Transactional inbox: handled message ids recorded in the handler's own transaction, so a
//! redelivered message has no second effect.
//!
//! Every broker delivers at least once: after a crash, a lost ack or a lease that ran out,
//! a message your handler already handled comes again. An [`Inbox`] turns that into
//! **exactly-once effects** for handlers whose effects are writes to PostgreSQL: per
//! message it begins a transaction, records the message's id for its consumer in the
//! `<prefix>inbox` table, and runs your handler *in that transaction*. The record, your
//! writes and the messages your handler returns (its outputs) commit together, or none
//! does. A message whose id is already recorded is not handled again: the inbox returns
//! the outputs it stored the first time, for the router to publish (again), and the
//! message is acked.
//!
//! It works with any subscriber (Kafka, NATS, RabbitMQ, Pub/Sub, Redis, the SQL
//! subscriber, ...): all it needs is a [`PgPool`] on the database your effects go to, and a
//! consumer name. One inbox per handler: the same message handled by two consumers (two
//! inboxes with different names) has one effect in each.
//!
//! ```no_run
//! use tidemill_core::{HandlerResult, Message, Router};
//! use tidemill_sql::inbox::{Inbox, InboxTx};
//! use tidemill_sql::{SqlConfig, SqlPublisher, SqlSubscriber};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = SqlConfig::new("postgres://app:secret@127.0.0.1:5432/app");
//! // Deliveries may come from any broker; here they come from PostgreSQL too.
//! let subscriber = SqlSubscriber::connect(config.clone()).await?;
//! let publisher = SqlPublisher::connect(config.clone()).await?;
//! // The pool your effects are written with.
//! let pool = sqlx::postgres::PgPool::connect(&config.url).await?;
//!
//! let inbox = Inbox::new(pool, "order-projection")?;
//! let router = Router::new();
//! router
//!     .add_handler("order-projection")
//!     .subscribe(subscriber, "orders")
//!     .group("order-projection")
//!     .publish(publisher, "orders-projected")
//!     .service(inbox.handler(|msg: Message, mut tx: InboxTx| async move {
//!         // Runs at most once per message id (for this consumer), in `tx`.
//!         sqlx::query("UPDATE order_counts SET n = n + 1 WHERE day = current_date")
//!             .execute(&mut *tx)
//!             .await?;
//!         let out = Message::new(msg.payload().clone());
//!         // Give the transaction back: the inbox stores `out` with the id and commits, then
//!         // the router publishes `out` (and publishes it again if the message comes again).
//!         HandlerResult::Ok((tx, out))
//!     }))
//!     .await?;
//! router.run().await?;
//! # Ok(()) }
//! ```
//!
//! # What it promises
//!
//! - **One effect per message id and consumer** (while the id is retained, see below):
//!   your handler's writes in the [`InboxTx`] commit together with the id's record. A
//!   redelivery of a committed message does not call the handler: it is counted
//!   ([`Inbox::duplicates`]), logged (`tracing` debug), and gets the stored outputs
//!   (below).
//! - **Failures retry as before.** A handler error (or panic, or a future dropped at
//!   shutdown) rolls the transaction back, record included, and the error goes to the
//!   router unchanged: its nack, backoff, retry, dead-letter and poison rules apply as
//!   without an inbox (a [`permanent`](tidemill_core::permanent) error stays permanent).
//!   The redelivery runs the handler again. A failed commit is an error too (transient when
//!   the connection broke): if it did commit after all, the redelivery finds the id and
//!   returns the stored outputs.
//! - **Concurrent deliveries of one id** (two consumers of a group, after the first one's
//!   lease ran out): the second `INSERT` of the id waits on the first one's uncommitted
//!   row. If the first commits, the second finds the id and returns the first one's
//!   outputs; if it rolls back, the second runs the handler. With the database's default
//!   isolation level (`READ COMMITTED`); under `REPEATABLE READ` or `SERIALIZABLE` as the
//!   default, the second one fails with a serialization error instead (transient: nacked,
//!   and its redelivery finds the id).
//! - **Outputs are at least once, never lost.** The messages your handler returns go to
//!   the router, which publishes them (the router handler's `.publish(publisher, topic)`)
//!   *after* the commit, then acks the input. So that a failed publish, or a crash between
//!   the commit and the broker's confirmation, cannot lose them, the inbox stores them
//!   (uuid, metadata, key and payload of each; see [Schema](#schema)) in the id's row, in
//!   the same transaction. The input is then redelivered (the router nacks it when the
//!   publish fails), the inbox finds the id, does not run the handler, and returns the
//!   stored outputs: the router publishes them again. When the first publish had
//!   succeeded and only the ack was lost, that makes a **duplicate output with the same
//!   uuid** (the uuid is stored, not generated again): deduplicate downstream by uuid, for
//!   instance with an inbox there, which skips the copy. A router handler without
//!   `.publish` fails every message whose handler returns outputs (and every redelivery,
//!   which returns them again) until your poison settings take it out: give it one.
//!   Alternatively, write the outputs in the transaction through the transactional outbox
//!   ([`crate::outbox`], or [`SqlPublisher::publish_in`](crate::SqlPublisher::publish_in)
//!   with `&mut tx`) and return nothing: a forwarder relays them at least once, without
//!   waiting for the input to come again (worth it when the input may not come again
//!   soon, e.g. a poison queue you replay rarely).
//! - **The message id** is the message's uuid by default ([`Message::uuid`]): the same on
//!   every delivery for messages published by Tidemill (it travels in a header) and for
//!   SQL subscriber rows without a uuid (derived from the row). For foreign messages that
//!   carry their id elsewhere (an idempotency key header), pick it with [`Inbox::key_by`].
//!
//! # Retention
//!
//! Recorded ids are kept for [`InboxConfig::retention`] (default 7 days) after they were
//! handled, by the database server's clock; a **redelivery later than that is handled
//! again**. Pick a retention longer than any redelivery can come late (broker retention,
//! dead-letter replays, outbox forwarder outages). Old ids are deleted:
//!
//! - automatically from the handler path, at most once per
//!   [`InboxConfig::cleanup_interval`] (default 1 h; the first message after the process
//!   starts triggers one), in a spawned task so no message waits for it; deletes run in
//!   batches of 10,000 rows (`FOR UPDATE SKIP LOCKED`, so the cleanups of several
//!   processes do not block each other), only for this inbox's consumer;
//! - or when you call [`Inbox::cleanup`] (a cron job, a periodic task), with
//!   `cleanup_interval` zero to turn the automatic cleanup off.
//!
//! # Costs
//!
//! Per message: one transaction (`BEGIN`, `COMMIT`) and one `INSERT … ON CONFLICT DO
//! NOTHING` on the inbox's primary key, a pooled connection held for the handler's
//! duration, and a boxed future; when the handler returned outputs, one `UPDATE` of the
//! row storing them too. The table grows by one row per message and consumer until the
//! cleanup deletes it: small without outputs, about the outputs' size (payloads, keys,
//! metadata, uuids) plus a few bytes each with them (large outputs kept for the whole
//! retention add up: size the retention and the disk for them). Duplicates cost a
//! `BEGIN`, the `INSERT`, a `SELECT` of the stored outputs and a `ROLLBACK`. Size the
//! pool for the messages in flight: every one holds a connection until it commits (a
//! handler's [`concurrency`](tidemill_core::router::HandlerBuilder::concurrency)
//! above the pool's `max_connections` makes messages wait for one, and fail transiently
//! past the pool's acquire timeout).
//!
//! # Schema
//!
//! The table (`<prefix>inbox`: `consumer`, `message_uuid`, `handled_at`, `outputs`,
//! primary key `(consumer, message_uuid)`, and an index on `handled_at` for the cleanup)
//! is part of [`schema_sql`](crate::schema_sql). With [`InboxConfig::create_schema`]
//! (default) the inbox creates that table and its index on first use unless the table
//! exists, and nothing else (an inbox handling Kafka deliveries gets no pub/sub tables).
//! An inbox table of an earlier version, without the `outputs` column, gets it (`ALTER
//! TABLE … ADD COLUMN IF NOT EXISTS outputs BYTEA`, waiting at most 5 s for the table's
//! lock: on a busy table that can fail transiently, and the next message tries again);
//! processes of that earlier version keep working with the altered table. With
//! `create_schema` off, a missing table or column is an error naming it (permanent: the
//! message is not retried into a database without the table forever, see your poison
//! settings).
//!
//! `outputs` is NULL when the handler returned no message, else this encoding (integers
//! big-endian, lengths in bytes):
//!
//! ```text
//! outputs  = version:u8 (1)  count:u32  message{count}
//! message  = uuid:text  metadata  key  payload:bytes
//! metadata = entries:u32  (name:text  value:text){entries}     in name order
//! key      = 0:u8 (no key)  |  1:u8  key:bytes
//! text     = len:u32  UTF-8 bytes{len}
//! bytes    = len:u32  bytes{len}
//! ```
//!
//! Only those four parts of a message are kept: not its receive context nor native broker
//! data (the router and its middleware add their own metadata again when they publish).

use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPool;
use sqlx::{Executor, PgConnection, Postgres, Transaction};
use tidemill_core::router::IntoOutput;
use tidemill_core::{BoxError, Error, Message, Metadata, Result};
use tokio::sync::OnceCell;
use tower::Service;

use crate::config::SqlConfig;
use crate::schema::{self, Tables};
use crate::BROKER;

/// How many old ids one cleanup statement deletes at most.
const CLEANUP_BATCH: i64 = 10_000;

/// Settings of an [`Inbox`]; serde-deserialisable (durations as humantime strings,
/// `"7d"`, `"1h"`).
///
/// ```
/// use std::time::Duration;
/// use tidemill_sql::inbox::InboxConfig;
///
/// let config = InboxConfig {
///     retention: Duration::from_secs(30 * 24 * 3600),
///     ..InboxConfig::default()
/// };
/// assert!(config.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboxConfig {
    /// Prefix of the adapter's tables; the inbox is `<prefix>inbox`. Same rules as
    /// [`SqlConfig::table_prefix`]. Default `tidemill_`.
    pub table_prefix: String,
    /// Create the inbox table and its index on first use unless the table exists, and add
    /// the `outputs` column to an inbox table of an earlier version (see the [module
    /// docs](self#schema)). Default true; with false, a missing table or column is an
    /// error naming it.
    pub create_schema: bool,
    /// How long a handled id is kept: a redelivery later than this is handled again.
    /// Default 7 days.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Ids older than `retention` are deleted at most this often, from the handler path
    /// (in a spawned task). Zero turns that off: call [`Inbox::cleanup`] yourself.
    /// Default 1 h.
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
}

impl Default for InboxConfig {
    fn default() -> Self {
        InboxConfig {
            table_prefix: "tidemill_".to_owned(),
            create_schema: true,
            retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(3600),
        }
    }
}

impl InboxConfig {
    /// The defaults, with the table prefix and `create_schema` of an adapter's
    /// configuration (to put the inbox beside its tables).
    pub fn from_sql(config: &SqlConfig) -> Self {
        InboxConfig {
            table_prefix: config.table_prefix.clone(),
            create_schema: config.create_schema,
            ..InboxConfig::default()
        }
    }

    /// Checks the table prefix and that `retention` is above zero.
    pub fn validate(&self) -> Result<()> {
        SqlConfig {
            table_prefix: self.table_prefix.clone(),
            ..SqlConfig::default()
        }
        .validate()?;
        if self.retention.is_zero() {
            return Err(Error::config(
                BROKER,
                "inbox retention must be above zero (it is how long handled ids are kept)",
            ));
        }
        Ok(())
    }
}

type KeyFn = Arc<dyn Fn(&Message) -> String + Send + Sync>;

/// Why the schema is not ready.
enum SchemaError {
    Sql(sqlx::Error),
    /// The inbox table is missing and `create_schema` is off.
    Missing,
    /// The inbox table has no `outputs` column (an earlier version's) and `create_schema`
    /// is off.
    MissingColumn,
}

impl From<sqlx::Error> for SchemaError {
    fn from(e: sqlx::Error) -> Self {
        SchemaError::Sql(e)
    }
}

/// A transactional inbox for one consumer: wraps handlers ([`handler`](Self::handler)) so
/// that each message id has its effects once. See the [module docs](self) for what it
/// promises and costs. Cloning is cheap; clones share the pool, counters and cleanup.
#[derive(Clone)]
pub struct Inbox {
    shared: Arc<Shared>,
    key: Option<KeyFn>,
}

struct Shared {
    pool: PgPool,
    consumer: String,
    config: InboxConfig,
    tables: Tables,
    /// For error messages: the database's address (never a password) and the prefix.
    errors: SqlConfig,
    insert: String,
    /// Stores a handled message's encoded outputs in its row.
    store: String,
    /// Reads the outputs stored for a message handled before.
    stored: String,
    cleanup: String,
    schema: OnceCell<()>,
    handled: AtomicU64,
    duplicates: AtomicU64,
    last_cleanup: Mutex<Option<Instant>>,
    cleaning: AtomicBool,
}

impl fmt::Debug for Inbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbox")
            .field("consumer", &self.shared.consumer)
            .field("table", &self.shared.tables.inbox)
            .field("database", &self.shared.errors.address())
            .field("retention", &self.shared.config.retention)
            .field("handled", &self.handled())
            .field("duplicates", &self.duplicates())
            .finish_non_exhaustive()
    }
}

impl Inbox {
    /// An inbox named `consumer` on `pool` (the database your handler writes to), with the
    /// default [`InboxConfig`]. Fails when `consumer` is empty.
    pub fn new(pool: PgPool, consumer: impl Into<String>) -> Result<Self> {
        Self::with_config(pool, consumer, InboxConfig::default())
    }

    /// An inbox named `consumer` on `pool`, with `config`. Fails when `consumer` is empty
    /// or `config` is invalid ([`InboxConfig::validate`]). Nothing is sent to the database
    /// yet: the table is created or checked with the first message (or
    /// [`ensure_schema`](Self::ensure_schema)).
    pub fn with_config(
        pool: PgPool,
        consumer: impl Into<String>,
        config: InboxConfig,
    ) -> Result<Self> {
        let consumer = consumer.into();
        if consumer.trim().is_empty() {
            return Err(Error::config(
                BROKER,
                "an inbox needs a consumer name that is not empty (one per handler)",
            ));
        }
        config.validate()?;
        let tables = Tables::new(&config.table_prefix);
        let options = pool.connect_options();
        let errors = SqlConfig {
            url: format!(
                "postgres://{}@{}:{}/{}",
                options.get_username(),
                options.get_host(),
                options.get_port(),
                options.get_database().unwrap_or_default()
            ),
            table_prefix: config.table_prefix.clone(),
            create_schema: config.create_schema,
            ..SqlConfig::default()
        };
        let table = &tables.inbox;
        let insert = format!(
            "INSERT INTO {table} (consumer, message_uuid) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        );
        let store =
            format!("UPDATE {table} SET outputs = $3 WHERE consumer = $1 AND message_uuid = $2");
        let stored =
            format!("SELECT outputs FROM {table} WHERE consumer = $1 AND message_uuid = $2");
        let cleanup = format!(
            "DELETE FROM {table} AS i USING (SELECT message_uuid FROM {table} \
             WHERE consumer = $1 AND handled_at < now() - $2::float8 * interval '1 second' \
             LIMIT $3 FOR UPDATE SKIP LOCKED) AS old \
             WHERE i.consumer = $1 AND i.message_uuid = old.message_uuid"
        );
        Ok(Inbox {
            shared: Arc::new(Shared {
                pool,
                consumer,
                config,
                tables,
                errors,
                insert,
                store,
                stored,
                cleanup,
                schema: OnceCell::new(),
                handled: AtomicU64::new(0),
                duplicates: AtomicU64::new(0),
                last_cleanup: Mutex::new(None),
                cleaning: AtomicBool::new(false),
            }),
            key: None,
        })
    }

    /// Identifies messages by `key` instead of their uuid (e.g. an idempotency key header
    /// of foreign messages); builder style. Messages with equal keys are one message for
    /// this inbox.
    ///
    /// ```no_run
    /// # fn demo(pool: sqlx::PgPool) -> tidemill_core::Result<()> {
    /// use tidemill_sql::inbox::Inbox;
    ///
    /// let inbox = Inbox::new(pool, "payments")?.key_by(|msg| {
    ///     msg.metadata().get("idempotency-key").unwrap_or(msg.uuid()).to_owned()
    /// });
    /// # drop(inbox); Ok(()) }
    /// ```
    pub fn key_by(mut self, key: impl Fn(&Message) -> String + Send + Sync + 'static) -> Self {
        self.key = Some(Arc::new(key));
        self
    }

    /// The consumer name ids are recorded under.
    pub fn consumer(&self) -> &str {
        &self.shared.consumer
    }

    /// The settings.
    pub fn config(&self) -> &InboxConfig {
        &self.shared.config
    }

    /// The pool transactions are begun on.
    pub fn pool(&self) -> &PgPool {
        &self.shared.pool
    }

    /// Messages whose handler ran and committed through this inbox (and its clones) in
    /// this process.
    pub fn handled(&self) -> u64 {
        self.shared.handled.load(Ordering::Relaxed)
    }

    /// Messages acked without calling the handler because their id was recorded.
    pub fn duplicates(&self) -> u64 {
        self.shared.duplicates.load(Ordering::Relaxed)
    }

    /// A handler service (for [`HandlerBuilder::service`](tidemill_core::router::HandlerBuilder::service),
    /// or any `tower::Service<Message>` user) that runs `f` at most once per message id:
    /// `f` gets the message and the transaction the id was recorded in, does its writes
    /// in it, and returns it with what to publish (`()`, `Message`, `Vec<Message>`, ...,
    /// as router handlers do). The inbox stores those outputs in the id's row and commits
    /// the transaction; an `Err` rolls it back. The service returns the outputs, and a
    /// redelivery of a handled id returns the stored ones again without calling `f` (see
    /// the [module docs](self) on outputs).
    ///
    /// ```no_run
    /// # fn demo(inbox: tidemill_sql::inbox::Inbox) {
    /// use tidemill_core::{HandlerResult, Message};
    /// use tidemill_sql::inbox::InboxTx;
    ///
    /// async fn project(msg: Message, mut tx: InboxTx) -> HandlerResult<(InboxTx, ())> {
    ///     sqlx::query("INSERT INTO seen (id) VALUES ($1)")
    ///         .bind(msg.uuid())
    ///         .execute(&mut *tx)
    ///         .await?;
    ///     Ok((tx, ()))
    /// }
    /// let service = inbox.handler(project);
    /// # drop(service); }
    /// ```
    pub fn handler<F, Fut, R, E>(&self, f: F) -> InboxHandler<F>
    where
        F: Fn(Message, InboxTx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(InboxTx, R), E>> + Send + 'static,
        R: IntoOutput + 'static,
        E: Into<BoxError> + 'static,
    {
        InboxHandler {
            inbox: self.clone(),
            f: Arc::new(f),
        }
    }

    /// Checks that the inbox table exists with its `outputs` column. With `create_schema`
    /// on, creates the table and its index when the table is missing (nothing else: no
    /// pub/sub tables), or adds the column to an earlier version's table; with it off,
    /// fails naming what is missing. Once per inbox (and its clones) once it succeeded;
    /// the first message does it otherwise. Call it at startup to fail early.
    pub async fn ensure_schema(&self) -> Result<()> {
        let shared = &self.shared;
        let init = || async {
            let (found, has_outputs): (Option<String>, bool) = sqlx::query_as(
                "SELECT to_regclass($1)::text, EXISTS (SELECT 1 FROM pg_catalog.pg_attribute \
                 WHERE attrelid = to_regclass($1) AND attname = 'outputs' AND NOT attisdropped)",
            )
            .bind(&shared.tables.inbox)
            .fetch_one(&shared.pool)
            .await?;
            let ddl = match (found.is_some(), has_outputs) {
                // No DDL when the table is there: even `CREATE INDEX IF NOT EXISTS` waits
                // for every open transaction that wrote to the table (handlers of other
                // processes), and holds up their next inserts meanwhile.
                (true, true) => return Ok(()),
                (false, _) if shared.config.create_schema => shared.tables.inbox_ddl(),
                // An earlier version's table: `ADD COLUMN` of a nullable column without a
                // default rewrites nothing, but needs the table's exclusive lock (bounded by
                // the lock timeout below).
                (true, false) if shared.config.create_schema => format!(
                    "ALTER TABLE {} ADD COLUMN IF NOT EXISTS outputs BYTEA",
                    shared.tables.inbox
                ),
                // Not cached: the next message checks again.
                (false, _) => return Err(SchemaError::Missing),
                (true, false) => return Err(SchemaError::MissingColumn),
            };
            let mut tx = shared.pool.begin().await?;
            // Never wait long for a lock (the table may be created at this moment by a
            // process whose transaction is slow, or be in use by handlers).
            tx.execute("SET LOCAL lock_timeout = '5s'").await?;
            // The same lock the publisher and subscriber take: one creator at a time.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(format!("tidemill-schema {}", shared.config.table_prefix))
                .execute(&mut *tx)
                .await?;
            tx.execute(sqlx::raw_sql(&ddl)).await?;
            tx.commit().await?;
            tracing::info!(
                consumer = %shared.consumer,
                table = %shared.tables.inbox,
                created = found.is_none(),
                "inbox table {}",
                if found.is_none() { "created" } else { "given its outputs column" }
            );
            Ok(())
        };
        shared
            .schema
            .get_or_try_init(init)
            .await
            .map(drop)
            .map_err(|e| match e {
                SchemaError::Sql(e) => self.error(e, "", "create the inbox table"),
                SchemaError::Missing => Error::permanent(
                    BROKER,
                    "",
                    format!("inbox `{}`: check the inbox table", shared.consumer),
                    format!(
                        "table `{}` does not exist in {} and create_schema is off \
                         (create it with tidemill_sql::schema_sql)",
                        shared.tables.inbox,
                        shared.errors.address()
                    ),
                ),
                SchemaError::MissingColumn => Error::permanent(
                    BROKER,
                    "",
                    format!("inbox `{}`: check the inbox table", shared.consumer),
                    format!(
                        "table `{table}` in {} has no `outputs` column (an earlier version's \
                         table) and create_schema is off (add it with `ALTER TABLE {table} \
                         ADD COLUMN IF NOT EXISTS outputs BYTEA`)",
                        shared.errors.address(),
                        table = shared.tables.inbox,
                    ),
                ),
            })
    }

    /// Deletes this consumer's ids handled more than [`InboxConfig::retention`] ago (by
    /// the database server's clock), in batches of 10,000; returns how many. Rows another
    /// cleanup is deleting at the same moment are skipped, not waited for.
    pub async fn cleanup(&self) -> Result<u64> {
        let shared = &self.shared;
        self.ensure_schema().await?;
        let mut total = 0;
        loop {
            let deleted = sqlx::query(&shared.cleanup)
                .bind(&shared.consumer)
                .bind(shared.config.retention.as_secs_f64())
                .bind(CLEANUP_BATCH)
                .execute(&shared.pool)
                .await
                .map_err(|e| self.error(e, "", "delete old inbox ids"))?
                .rows_affected();
            total += deleted;
            if deleted < CLEANUP_BATCH as u64 {
                break;
            }
        }
        tracing::debug!(
            consumer = %shared.consumer,
            table = %shared.tables.inbox,
            deleted = total,
            retention = ?shared.config.retention,
            "inbox cleanup"
        );
        Ok(total)
    }

    /// Starts a cleanup in a spawned task if the interval has passed and none runs.
    fn maybe_cleanup(&self) {
        let shared = &self.shared;
        let interval = shared.config.cleanup_interval;
        if interval.is_zero() {
            return;
        }
        {
            let mut last = shared.last_cleanup.lock();
            if last.is_some_and(|at| at.elapsed() < interval) {
                return;
            }
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            if shared.cleaning.swap(true, Ordering::AcqRel) {
                return;
            }
            *last = Some(Instant::now());
            let inbox = self.clone();
            runtime.spawn(async move {
                if let Err(e) = inbox.cleanup().await {
                    tracing::warn!(
                        consumer = %inbox.shared.consumer,
                        error = %e,
                        "inbox cleanup failed; it is tried again after the cleanup interval"
                    );
                }
                inbox.shared.cleaning.store(false, Ordering::Release);
            });
        }
    }

    /// The id of `msg` for this inbox.
    fn key_of(&self, msg: &Message) -> String {
        match &self.key {
            Some(key) => key(msg),
            None => msg.uuid().to_owned(),
        }
    }

    fn error(&self, e: sqlx::Error, topic: &str, context: &str) -> Error {
        schema::error(
            e,
            &self.shared.errors,
            topic,
            &format!("inbox `{}`: {context}", self.shared.consumer),
        )
    }

    /// Handles one message: records its id, runs `f` and stores its outputs in one
    /// transaction; or, for an id recorded before, returns the stored outputs.
    async fn handle<F, Fut, R, E>(
        self,
        f: Arc<F>,
        msg: Message,
    ) -> std::result::Result<Vec<Message>, BoxError>
    where
        F: Fn(Message, InboxTx) -> Fut,
        Fut: Future<Output = std::result::Result<(InboxTx, R), E>>,
        R: IntoOutput + 'static,
        E: Into<BoxError> + 'static,
    {
        let shared = &self.shared;
        let key = self.key_of(&msg);
        let topic = msg
            .context()
            .map(|c| c.handler().topic.clone())
            .unwrap_or_default();
        self.ensure_schema().await?;
        let mut tx = shared
            .pool
            .begin()
            .await
            .map_err(|e| self.error(e, &topic, "begin a transaction"))?;
        let inserted = sqlx::query(&shared.insert)
            .bind(&shared.consumer)
            .bind(&key)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error(e, &topic, &format!("record message `{key}`")))?
            .rows_affected();
        if inserted == 0 {
            // A statement of its own (a new snapshot under READ COMMITTED): it sees the row
            // the INSERT found, even when it waited for that row's transaction to commit.
            // None when the cleanup deleted the row in between (past the retention).
            let stored: Option<Option<Vec<u8>>> = sqlx::query_scalar(&shared.stored)
                .bind(&shared.consumer)
                .bind(&key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| {
                    self.error(e, &topic, &format!("read the outputs of message `{key}`"))
                })?;
            // Nothing to keep; a failed rollback only costs the connection.
            let _ = tx.rollback().await;
            let out = match stored.flatten() {
                Some(bytes) => decode(bytes.into()).map_err(|cause| {
                    Error::permanent(
                        BROKER,
                        &topic,
                        format!(
                            "inbox `{}`: read the outputs of message `{key}`",
                            shared.consumer
                        ),
                        format!(
                            "column `outputs` of `{}` in {} is not readable: {cause}",
                            shared.tables.inbox,
                            shared.errors.address()
                        ),
                    )
                })?,
                None => Vec::new(),
            };
            shared.duplicates.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                consumer = %shared.consumer,
                uuid = msg.uuid(),
                key = %key,
                outputs = out.len(),
                "message handled before (inbox); returning its stored outputs without \
                 calling the handler"
            );
            self.maybe_cleanup();
            return Ok(out);
        }
        let (tx, out) = f(msg, InboxTx { tx }).await.map_err(Into::into)?;
        let mut tx = tx.tx;
        // Encoded and stored before the commit: outputs that cannot be stored roll back
        // (`tx` dropped), so a committed id always has its outputs.
        let out = out.into_output()?;
        if !out.is_empty() {
            let encoded = encode(&out).map_err(|cause| {
                Error::permanent(
                    BROKER,
                    &topic,
                    format!(
                        "inbox `{}`: store the outputs of message `{key}`",
                        shared.consumer
                    ),
                    cause,
                )
            })?;
            sqlx::query(&shared.store)
                .bind(&shared.consumer)
                .bind(&key)
                .bind(encoded)
                .execute(&mut *tx)
                .await
                .map_err(|e| {
                    self.error(e, &topic, &format!("store the outputs of message `{key}`"))
                })?;
        }
        tx.commit()
            .await
            .map_err(|e| self.error(e, &topic, &format!("commit message `{key}`")))?;
        shared.handled.fetch_add(1, Ordering::Relaxed);
        self.maybe_cleanup();
        Ok(out)
    }
}

/// Version byte of the outputs encoding (see the module docs).
const OUTPUTS_V1: u8 = 1;

/// Appends `len` as a big-endian u32, or fails naming `what`.
fn put_len(buf: &mut Vec<u8>, len: usize, what: &str) -> std::result::Result<(), String> {
    let len = u32::try_from(len)
        .map_err(|_| format!("{what} of {len} bytes is over the 4 GiB an inbox stores"))?;
    buf.extend_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Appends a length-prefixed field.
fn put(buf: &mut Vec<u8>, bytes: &[u8], what: &str) -> std::result::Result<(), String> {
    put_len(buf, bytes.len(), what)?;
    buf.extend_from_slice(bytes);
    Ok(())
}

/// Encodes the uuid, metadata, key and payload of `messages` (the module docs' format).
fn encode(messages: &[Message]) -> std::result::Result<Vec<u8>, String> {
    let size: usize = messages
        .iter()
        .map(|m| {
            let metadata: usize = m
                .metadata()
                .iter()
                .map(|(k, v)| 8 + k.len() + v.len())
                .sum();
            13 + m.uuid().len() + metadata + m.key().map_or(0, |k| 4 + k.len()) + m.payload().len()
        })
        .sum();
    let mut buf = Vec::with_capacity(5 + size);
    buf.push(OUTPUTS_V1);
    put_len(&mut buf, messages.len(), "a list of outputs")?;
    for m in messages {
        put(&mut buf, m.uuid().as_bytes(), "an output's uuid")?;
        put_len(&mut buf, m.metadata().len(), "an output's metadata")?;
        for (name, value) in m.metadata().iter() {
            put(&mut buf, name.as_bytes(), "a metadata name")?;
            put(&mut buf, value.as_bytes(), "a metadata value")?;
        }
        match m.key() {
            None => buf.push(0),
            Some(key) => {
                buf.push(1);
                put(&mut buf, key, "an output's key")?;
            }
        }
        put(&mut buf, m.payload(), "an output's payload")?;
    }
    Ok(buf)
}

/// Reads what [`encode`] wrote; payloads and keys share `bytes` (no copies).
struct Reader {
    bytes: Bytes,
    at: usize,
}

impl Reader {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<Bytes, String> {
        if self.bytes.len() - self.at < n {
            return Err(format!(
                "{what} ({n} bytes) runs past the end ({} bytes) at byte {}",
                self.bytes.len(),
                self.at
            ));
        }
        let part = self.bytes.slice(self.at..self.at + n);
        self.at += n;
        Ok(part)
    }

    fn byte(&mut self, what: &str) -> std::result::Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    fn length(&mut self, what: &str) -> std::result::Result<usize, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn bytes(&mut self, what: &str) -> std::result::Result<Bytes, String> {
        let n = self.length(what)?;
        self.take(n, what)
    }

    fn text(&mut self, what: &str) -> std::result::Result<String, String> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
}

/// Decodes stored outputs (the module docs' format).
fn decode(bytes: Bytes) -> std::result::Result<Vec<Message>, String> {
    let mut r = Reader { bytes, at: 0 };
    let version = r.byte("the version")?;
    if version != OUTPUTS_V1 {
        return Err(format!(
            "encoding version {version} is unknown (this version reads {OUTPUTS_V1})"
        ));
    }
    let count = r.length("the number of outputs")?;
    // Not trusting `count` for the allocation: every message takes 13 bytes at least.
    let mut out = Vec::with_capacity(count.min(r.bytes.len() / 13));
    for _ in 0..count {
        let uuid = r.text("an output's uuid")?;
        let entries = r.length("an output's metadata")?;
        let mut metadata = Metadata::new();
        for _ in 0..entries {
            let name = r.text("a metadata name")?;
            let value = r.text("a metadata value")?;
            metadata.set(name, value);
        }
        let key = match r.byte("an output's key flag")? {
            0 => None,
            1 => Some(r.bytes("an output's key")?),
            other => return Err(format!("key flag {other} is neither 0 nor 1")),
        };
        let payload = r.bytes("an output's payload")?;
        let mut msg = Message::with_uuid(uuid, payload).with_metadata_map(metadata);
        msg.set_key(key);
        out.push(msg);
    }
    if r.at != r.bytes.len() {
        return Err(format!(
            "{} bytes left after {count} outputs",
            r.bytes.len() - r.at
        ));
    }
    Ok(out)
}

/// The transaction an [`Inbox`] recorded a message's id in, handed to the handler: do your
/// writes in it (`&mut *tx` is a `&mut PgConnection`, as with a sqlx `Transaction`) and give
/// it back; the inbox commits it. Dropping it rolls back.
pub struct InboxTx {
    tx: Transaction<'static, Postgres>,
}

impl InboxTx {
    /// The sqlx transaction, for APIs that take one (savepoints with
    /// `sqlx::Acquire::begin`, helpers of yours taking `&mut Transaction`). Do not replace
    /// it: only the transaction the inbox began holds the id's record.
    pub fn transaction(&mut self) -> &mut Transaction<'static, Postgres> {
        &mut self.tx
    }
}

impl Deref for InboxTx {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.tx
    }
}

impl DerefMut for InboxTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.tx
    }
}

impl fmt::Debug for InboxTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxTx").finish_non_exhaustive()
    }
}

/// The handler service made by [`Inbox::handler`]: a `tower::Service<Message>` returning
/// the messages to publish. Cloning is cheap.
pub struct InboxHandler<F> {
    inbox: Inbox,
    f: Arc<F>,
}

impl<F> Clone for InboxHandler<F> {
    fn clone(&self) -> Self {
        InboxHandler {
            inbox: self.inbox.clone(),
            f: self.f.clone(),
        }
    }
}

impl<F> fmt::Debug for InboxHandler<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxHandler")
            .field("inbox", &self.inbox)
            .finish_non_exhaustive()
    }
}

impl<F> InboxHandler<F> {
    /// The inbox it records ids in.
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }
}

impl<F, Fut, R, E> Service<Message> for InboxHandler<F>
where
    F: Fn(Message, InboxTx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(InboxTx, R), E>> + Send + 'static,
    R: IntoOutput + 'static,
    E: Into<BoxError> + 'static,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = BoxFuture<'static, std::result::Result<Vec<Message>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        Box::pin(self.inbox.clone().handle(self.f.clone(), msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked() {
        assert!(InboxConfig::default().validate().is_ok());
        let zero = InboxConfig {
            retention: Duration::ZERO,
            ..InboxConfig::default()
        };
        assert!(zero
            .validate()
            .unwrap_err()
            .to_string()
            .contains("retention"));
        let bad = InboxConfig {
            table_prefix: "bad-prefix".into(),
            ..InboxConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("table_prefix"));
    }

    #[test]
    fn config_reads_humantime() {
        let config: InboxConfig =
            serde_json::from_str(r#"{"retention": "30d", "cleanup_interval": "0s"}"#)
                .expect("valid config");
        assert_eq!(config.retention, Duration::from_secs(30 * 24 * 3600));
        assert!(config.cleanup_interval.is_zero());
        assert_eq!(config.table_prefix, "tidemill_");
    }

    #[test]
    fn outputs_round_trip_with_uuid_metadata_key_and_payload() {
        let messages = vec![
            Message::with_uuid("out-1", &b"\x00\xffbinary"[..])
                .with_metadata("content-type", "application/octet-stream")
                .with_metadata("é", "ü ")
                .with_key(b"\x01key"),
            Message::with_uuid("out-2", ""),
            Message::new("fresh uuid").with_key(""),
        ];
        let encoded = encode(&messages).expect("encodes");
        let decoded = decode(encoded.into()).expect("decodes");
        // Equality is uuid, payload, key and metadata.
        assert_eq!(decoded, messages);
        assert_eq!(decoded[1].key(), None);
        assert_eq!(decoded[2].key().map(|k| k.len()), Some(0));
        assert!(decode(encode(&[]).expect("encodes").into())
            .expect("decodes")
            .is_empty());
    }

    #[test]
    fn unreadable_outputs_are_named() {
        let good = encode(&[Message::with_uuid("u", "p").with_key("k")]).expect("encodes");
        for cut in 0..good.len() {
            let err = decode(Bytes::copy_from_slice(&good[..cut])).expect_err("truncated");
            assert!(err.contains("past the end"), "{cut}: {err}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(decode(longer.into()).unwrap_err().contains("left after"));
        let mut version = good.clone();
        version[0] = 9;
        assert!(decode(version.into()).unwrap_err().contains("version 9"));
        // A count far above what the bytes hold fails without allocating for it.
        let huge = [OUTPUTS_V1, 0xff, 0xff, 0xff, 0xff];
        assert!(decode(Bytes::copy_from_slice(&huge)).is_err());
    }
}
