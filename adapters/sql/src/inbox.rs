//! Transactional inbox: handled message ids recorded in the handler's own transaction, so a
//! redelivered message has no second effect.
//!
//! Every broker delivers at least once: after a crash, a lost ack or a lease that ran out,
//! a message your handler already handled comes again. An [`Inbox`] turns that into
//! **exactly-once effects** for handlers whose effects are writes to PostgreSQL: per
//! message it begins a transaction, records the message's id for its consumer in the
//! `<prefix>inbox` table, and runs your handler *in that transaction*. The record and your
//! writes commit together, or neither does. A message whose id is already recorded is
//! acked without calling your handler.
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
//!         // Give the transaction back: the inbox commits it, then the router publishes `out`.
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
//!   redelivery of a committed message is acked without calling the handler, counted
//!   ([`Inbox::duplicates`]) and logged (`tracing` debug).
//! - **Failures retry as before.** A handler error (or panic, or a future dropped at
//!   shutdown) rolls the transaction back, record included, and the error goes to the
//!   router unchanged: its nack, backoff, retry, dead-letter and poison rules apply as
//!   without an inbox (a [`permanent`](tidemill_core::permanent) error stays permanent).
//!   The redelivery runs the handler again. A failed commit is an error too (transient when
//!   the connection broke): if it did commit after all, the redelivery finds the id and
//!   skips.
//! - **Concurrent deliveries of one id** (two consumers of a group, after the first one's
//!   lease ran out): the second `INSERT` of the id waits on the first one's uncommitted
//!   row. If the first commits, the second finds the id and skips; if it rolls back, the
//!   second runs the handler. With the database's default isolation level (`READ
//!   COMMITTED`); under `REPEATABLE READ` or `SERIALIZABLE` as the default, the second one
//!   fails with a serialization error instead (transient: nacked, and its redelivery
//!   skips).
//! - **Outputs** (the messages your handler returns) are where effects and publishing
//!   meet; pick how they leave:
//!   - returned to the router (the handler's `.publish(publisher, topic)`): published
//!     *after* the commit. If that publish fails, or the process dies between the commit
//!     and the broker's confirmation, the redelivery finds the id and is skipped: those
//!     outputs are **never published (at most once)**;
//!   - published by the inbox before the commit
//!     ([`InboxHandler::publish_before_commit`], no `.publish` on the router handler): a
//!     failed publish rolls back (and the redelivery runs again); if the commit fails or the
//!     process dies between the publish and the commit, the redelivery runs the handler
//!     and publishes again: outputs **at least once** (the same uuids each time when your
//!     handler derives them from the input, so a downstream inbox skips the copies);
//!   - written in the transaction through the transactional outbox ([`crate::outbox`], or
//!     [`SqlPublisher::publish_in`](crate::SqlPublisher::publish_in) with `&mut tx`):
//!     they commit or roll back with the effects and the id, and a forwarder relays them
//!     at least once: **exactly once end to end** with an inbox downstream.
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
//! duration, and a boxed future. The table grows by one small row per message and
//! consumer until the cleanup deletes it. Duplicates cost a `BEGIN`, the `INSERT` and a
//! `ROLLBACK`. Size the pool for the messages in flight: every one holds a connection
//! until it commits (a handler's [`concurrency`](tidemill_core::router::HandlerBuilder::concurrency)
//! above the pool's `max_connections` makes messages wait for one, and fail transiently
//! past the pool's acquire timeout).
//!
//! # Schema
//!
//! The table (`<prefix>inbox`: `consumer`, `message_uuid`, `handled_at`, primary key
//! `(consumer, message_uuid)`) is part of [`schema_sql`](crate::schema_sql). With
//! [`InboxConfig::create_schema`] (default) the adapter's tables are created on first use
//! unless they exist; otherwise a missing table is an error naming it (permanent: the
//! message is not retried into a database without the table forever, see your poison
//! settings).

use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPool;
use sqlx::{Executor, PgConnection, Postgres, Transaction};
use tidemill_core::router::IntoOutput;
use tidemill_core::{BoxError, Error, Message, Publisher, Result};
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
    /// Create the adapter's tables ([`schema_sql`](crate::schema_sql)) on first use unless
    /// they exist. Default true; with false, a missing inbox table is an error naming it.
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
    /// as router handlers do). The inbox commits the transaction; an `Err` rolls it
    /// back.
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
            output: None,
        }
    }

    /// Checks that the inbox table exists and, if not, creates the adapter's tables
    /// ([`schema_sql`](crate::schema_sql)) with `create_schema` on, or fails naming it
    /// with `create_schema` off. Once per inbox (and its clones) once it succeeded; the
    /// first message does it otherwise. Call it at startup to fail early.
    pub async fn ensure_schema(&self) -> Result<()> {
        let shared = &self.shared;
        let init = || async {
            let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
                .bind(&shared.tables.inbox)
                .fetch_one(&shared.pool)
                .await?;
            if found.is_some() {
                // No DDL when the table is there: even `CREATE INDEX IF NOT EXISTS` waits
                // for every open transaction that wrote to the table (handlers of other
                // processes), and holds up their next inserts meanwhile.
                Ok(())
            } else if shared.config.create_schema {
                let mut tx = shared.pool.begin().await?;
                // Never wait long for a lock (the table may be created at this moment by
                // a process whose transaction is slow).
                tx.execute("SET LOCAL lock_timeout = '5s'").await?;
                // The same lock the publisher and subscriber take: one creator at a time.
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                    .bind(format!("tidemill-schema {}", shared.config.table_prefix))
                    .execute(&mut *tx)
                    .await?;
                tx.execute(sqlx::raw_sql(&shared.tables.ddl())).await?;
                tx.commit().await?;
                Ok(())
            } else {
                // Not cached: the next message checks again.
                Err(SchemaError::Missing)
            }
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

    /// Handles one message: records its id and runs `f` in one transaction.
    async fn handle<F, Fut, R, E>(
        self,
        f: Arc<F>,
        output: Option<Arc<Output>>,
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
            // Nothing to keep; a failed rollback only costs the connection.
            let _ = tx.rollback().await;
            shared.duplicates.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                consumer = %shared.consumer,
                uuid = msg.uuid(),
                key = %key,
                "message handled before (inbox); acking it without calling the handler"
            );
            self.maybe_cleanup();
            return Ok(Vec::new());
        }
        let (tx, out) = f(msg, InboxTx { tx }).await.map_err(Into::into)?;
        // Encoded before the commit: an output that cannot be encoded rolls back.
        let mut out = out.into_output()?;
        if let Some(output) = output {
            if !out.is_empty() {
                // On failure `tx` is dropped: rolled back.
                output.publisher.publish(&output.topic, out).await?;
            }
            out = Vec::new();
        }
        tx.tx
            .commit()
            .await
            .map_err(|e| self.error(e, &topic, &format!("commit message `{key}`")))?;
        shared.handled.fetch_add(1, Ordering::Relaxed);
        self.maybe_cleanup();
        Ok(out)
    }
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
    output: Option<Arc<Output>>,
}

/// Where an [`InboxHandler`] publishes before committing.
struct Output {
    publisher: Arc<dyn Publisher>,
    topic: String,
}

impl<F> Clone for InboxHandler<F> {
    fn clone(&self) -> Self {
        InboxHandler {
            inbox: self.inbox.clone(),
            f: self.f.clone(),
            output: self.output.clone(),
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

    /// Publishes the handler's outputs to `topic` through `publisher` itself, *before*
    /// committing, and returns nothing to the router (so give the router handler no
    /// `.publish`); builder style. Outputs become at least once instead of at most once
    /// (see the [module docs](self)): a failed publish rolls the transaction back and fails
    /// the message (the publisher's error, transient or permanent, goes to the router), and
    /// a commit that fails after a publish means the redelivery publishes again. The
    /// message's transaction stays open (a pooled connection held) until the broker
    /// confirmed.
    pub fn publish_before_commit(
        mut self,
        publisher: impl Publisher + 'static,
        topic: impl Into<String>,
    ) -> Self {
        self.output = Some(Arc::new(Output {
            publisher: Arc::new(publisher),
            topic: topic.into(),
        }));
        self
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
        Box::pin(
            self.inbox
                .clone()
                .handle(self.f.clone(), self.output.clone(), msg),
        )
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
}
