//! [`SqlPublisher`]: rows in the messages table, in the pool's transaction or the caller's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{PgConnection, Row};
use tidemill_core::{ConnectionState, Error, Message, Publisher, Result};

use crate::config::SqlConfig;
use crate::schema::{self, StateCell, Tables};
use crate::BROKER;

/// When published messages become deliverable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeliverAt {
    /// At once (when the publishing transaction commits).
    #[default]
    Now,
    /// Not before this time (the database server's clock decides when it has come).
    At(SystemTime),
    /// Not before this long after the publish, by the database server's clock.
    After(Duration),
}

/// Publishes messages as rows of the messages table: one `INSERT` statement per batch,
/// which also wakes the topic's subscriptions (`NOTIFY`).
///
/// `publish` returns once the row are committed (durable with the server's default
/// `synchronous_commit`). [`publish_in`](Self::publish_in) writes into a transaction of
/// yours instead, so the messages commit or roll back with your data: the transactional
/// outbox (see the crate docs). Cloning is cheap; clones share the pool.
#[derive(Clone)]
pub struct SqlPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    config: SqlConfig,
    pool: PgPool,
    tables: Tables,
    insert: String,
    closed: AtomicBool,
    state: StateCell,
}

impl std::fmt::Debug for SqlPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlPublisher")
            .field("database", &self.inner.config.address())
            .field("table_prefix", &self.inner.config.table_prefix)
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl SqlPublisher {
    /// Connects to the database and creates the tables unless they exist (or checks them
    /// when `create_schema` is off); fails within `connect_timeout` naming host and port
    /// (never the password) when it cannot.
    pub async fn connect(config: SqlConfig) -> Result<Self> {
        let pool = schema::connect(&config, "publisher").await?;
        let tables = Tables::new(&config.table_prefix);
        Ok(SqlPublisher {
            inner: Arc::new(Inner {
                insert: insert_sql(&tables),
                tables,
                config,
                pool,
                closed: AtomicBool::new(false),
                state: StateCell::default(),
            }),
        })
    }

    /// The configuration this publisher runs with.
    pub fn config(&self) -> &SqlConfig {
        &self.inner.config
    }

    /// The publisher's connection pool (e.g. to begin the transactions you pass to
    /// [`publish_in`](Self::publish_in)).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Writes `messages` for `topic` in the caller's transaction (or connection): they
    /// become visible to subscribers when it commits and vanish if it rolls back. This is
    /// the transactional outbox: write your business rows and the events about them in
    /// one transaction, and nothing is published for a write that did not happen, nor lost
    /// for one that did.
    ///
    /// ```no_run
    /// # async fn demo(publisher: tidemill_sql::SqlPublisher) -> Result<(), Box<dyn std::error::Error>> {
    /// use tidemill_core::Message;
    ///
    /// let mut tx = publisher.pool().begin().await?;
    /// sqlx::query("INSERT INTO orders (id, total) VALUES ($1, $2)")
    ///     .bind("o-1")
    ///     .bind(42_i64)
    ///     .execute(&mut *tx)
    ///     .await?;
    /// publisher
    ///     .publish_in(&mut tx, "orders", vec![Message::new(r#"{"id":"o-1"}"#).with_key("o-1")])
    ///     .await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish_in(
        &self,
        conn: &mut PgConnection,
        topic: &str,
        messages: Vec<Message>,
    ) -> Result<()> {
        self.publish_in_at(conn, topic, messages, DeliverAt::Now)
            .await
    }

    /// [`publish_in`](Self::publish_in), with the messages deliverable only from `when`
    /// (scheduled messages; a forwarder relays them to their broker once due).
    pub async fn publish_in_at(
        &self,
        conn: &mut PgConnection,
        topic: &str,
        messages: Vec<Message>,
        when: DeliverAt,
    ) -> Result<()> {
        self.check_open(topic)?;
        if messages.is_empty() {
            return Ok(());
        }
        let batch = Batch::encode(&self.inner.config, topic, &messages)?;
        let row = batch
            .query(&self.inner.insert, topic, when, &self.inner.tables)
            .fetch_one(conn)
            .await
            .map_err(|e| {
                schema::error(
                    e,
                    &self.inner.config,
                    topic,
                    "publish (insert in the caller's transaction)",
                )
            })?;
        stored_all(&row, messages.len(), topic, &self.inner.tables)
    }

    /// Publishes `messages`, deliverable only from `when`: not before `SystemTime` (or
    /// `Duration` after now), by the database server's clock. Subscriptions deliver them
    /// within about [`poll_interval`](SqlConfig::poll_interval) of that time.
    pub async fn publish_at(
        &self,
        topic: &str,
        messages: Vec<Message>,
        when: DeliverAt,
    ) -> Result<()> {
        let inner = &self.inner;
        self.check_open(topic)?;
        if messages.is_empty() {
            return Ok(());
        }
        let config = &inner.config;
        let batch = Batch::encode(config, topic, &messages)?;
        let tables = &inner.tables;
        // After a connection failure the batch is sent again once the connection is back
        // (within command_timeout): rows a lost attempt committed come twice, which
        // at-least-once delivery allows; none is lost.
        let deadline = tokio::time::Instant::now() + config.command_timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            let result = batch
                .query(&inner.insert, topic, when, tables)
                .fetch_one(&inner.pool)
                .await;
            schema::saw(&inner.state, &result);
            match result {
                Ok(row) => return stored_all(&row, messages.len(), topic, tables),
                Err(e)
                    if schema::is_transient(&e)
                        && tokio::time::Instant::now() + pause < deadline
                        && !inner.closed.load(Ordering::Acquire) =>
                {
                    tracing::debug!(topic, error = %e, "publish failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(schema::error(e, config, topic, "publish")),
            }
        }
    }

    fn check_open(&self, topic: &str) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::PublisherClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        Ok(())
    }
}

/// Checks the count of rows the `INSERT` of `n` messages stored: a trigger or rule on the
/// messages table (installed by someone else) can drop rows without an error, and a
/// message must not be taken as published when it was not stored. Permanent: the rows
/// that were stored stay, so sending the batch again would only repeat them.
fn stored_all(row: &PgRow, n: usize, topic: &str, tables: &Tables) -> Result<()> {
    let stored: i64 = row.try_get(0).unwrap_or(-1);
    if usize::try_from(stored) == Ok(n) {
        return Ok(());
    }
    Err(Error::permanent(
        BROKER,
        topic,
        "publish",
        format!(
            "the database stored {stored} of {n} messages in `{}`: a trigger or rule on the \
             table dropped the others",
            tables.messages
        ),
    ))
}

/// The `INSERT` of one batch: one row per message in order, then a `NOTIFY` of the topic
/// (sent when the transaction commits); returns how many rows it stored.
fn insert_sql(tables: &Tables) -> String {
    format!(
        r#"WITH rows AS (
    INSERT INTO {messages} (topic, uuid, key, metadata, payload, deliver_at)
    SELECT $1, t.u, t.k, t.m::jsonb, t.p,
        CASE WHEN $6::float8 IS NOT NULL THEN to_timestamp($6::float8)
             WHEN $7::float8 IS NOT NULL THEN now() + make_interval(secs => $7::float8)
        END
    FROM UNNEST($2::text[], $3::bytea[], $4::text[], $5::bytea[]) WITH ORDINALITY AS t(u, k, m, p, n)
    ORDER BY t.n
    RETURNING 1
)
SELECT (SELECT count(*) FROM rows) FROM (SELECT pg_notify($8, $1)) AS woken"#,
        messages = tables.messages
    )
}

/// A batch's columns, checked and encoded.
/// Keys and payloads are borrowed from the messages (no copy of the bytes).
struct Batch<'m> {
    uuids: Vec<&'m str>,
    keys: Vec<Option<&'m [u8]>>,
    metadata: Vec<String>,
    payloads: Vec<&'m [u8]>,
}

impl<'m> Batch<'m> {
    fn encode(config: &SqlConfig, topic: &str, messages: &'m [Message]) -> Result<Batch<'m>> {
        if topic.contains('\0') {
            return Err(Error::config(
                BROKER,
                format!(
                    "topic `{}` contains a NUL character, which PostgreSQL text cannot store",
                    topic.escape_debug()
                ),
            ));
        }
        let mut batch = Batch {
            uuids: Vec::with_capacity(messages.len()),
            keys: Vec::with_capacity(messages.len()),
            metadata: Vec::with_capacity(messages.len()),
            payloads: Vec::with_capacity(messages.len()),
        };
        for message in messages {
            let mut map = serde_json::Map::with_capacity(message.metadata().len());
            for (k, v) in message.metadata().iter() {
                if k.contains('\0') || v.contains('\0') {
                    return Err(Error::permanent(
                        BROKER,
                        topic,
                        format!("publish message {}", message.uuid()),
                        format!(
                            "metadata entry `{}` contains a NUL character, which PostgreSQL \
                             JSON cannot store",
                            k.escape_debug()
                        ),
                    ));
                }
                map.insert(k.to_owned(), serde_json::Value::String(v.to_owned()));
            }
            let metadata = serde_json::Value::Object(map).to_string();
            let uuid = message.uuid();
            if uuid.contains('\0') {
                return Err(Error::permanent(
                    BROKER,
                    topic,
                    "publish",
                    format!("message uuid {:?} contains a NUL character", uuid),
                ));
            }
            let size = message.payload().len()
                + metadata.len()
                + uuid.len()
                + message.key().map_or(0, |k| k.len());
            if size > config.max_message_bytes {
                return Err(Error::MessageTooLarge {
                    broker: BROKER,
                    topic: topic.to_owned(),
                    uuid: uuid.to_owned(),
                    size,
                    limit: config.max_message_bytes,
                });
            }
            batch.uuids.push(uuid);
            batch.keys.push(message.key().map(|k| k.as_ref()));
            batch.metadata.push(metadata);
            batch.payloads.push(message.payload().as_ref());
        }
        Ok(batch)
    }

    fn query<'q>(
        &'q self,
        sql: &'q str,
        topic: &'q str,
        when: DeliverAt,
        tables: &Tables,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let (at, after) = match when {
            DeliverAt::Now => (None, None),
            DeliverAt::At(t) => {
                let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
                    Ok(d) => d.as_secs_f64(),
                    Err(e) => -e.duration().as_secs_f64(),
                };
                (Some(secs), None)
            }
            DeliverAt::After(d) => (None, Some(d.as_secs_f64())),
        };
        sqlx::query(sql)
            .bind(topic)
            .bind(&self.uuids)
            .bind(&self.keys)
            .bind(&self.metadata)
            .bind(&self.payloads)
            .bind(at)
            .bind(after)
            .bind(tables.channel.clone())
    }
}

#[async_trait]
impl Publisher for SqlPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.publish_at(topic, messages, DeliverAt::Now).await
    }

    /// Creates consumer group `group` on the topic, starting where `start_from` says (by
    /// default at the end), so everything published from now on waits for the group.
    async fn retain_for(&self, topic: &str, group: &str) -> Result<()> {
        let config = &self.inner.config;
        crate::subscriber::ensure_group(
            &self.inner.pool,
            &self.inner.tables,
            topic,
            group,
            config.start_from,
            None,
        )
        .await
        .map_err(|e| schema::error(e, config, topic, "create consumer group"))
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.state.set(ConnectionState::Closed);
        Ok(())
    }

    fn connection_state(&self) -> ConnectionState {
        self.inner.state.get()
    }
}
