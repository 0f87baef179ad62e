//! [`SqlSubscriber`]: consumer groups over the messages table, with reservations (leases)
//! per message in the pending table.
//!
//! Rows are found in the order `(transaction_id, offset)`. A group keeps, in the groups
//! table, an *ahead* position (the last row it found), the ids of the transactions that
//! were still running below it when it looked (*late*: they may still commit rows there),
//! and a *watermark* below which every row has been found for good. A fetch (one statement,
//! the group's row locked) copies into the pending table the rows after the ahead position
//! and the rows of late transactions that have committed since, and moves the three on. A
//! transaction left open therefore holds back neither later messages nor anything else:
//! its own rows are found when it commits. A statement whose snapshot is older than the one
//! the group last moved with (two members racing) leaves the group as it is.
//!
//! Pending rows carry a sequence number in the order they were found. A second statement
//! reserves visible rows (`visible_at` has come), not reserved by a live consumer, and (with
//! order per key) with no earlier unfinished row of their key, with `FOR UPDATE SKIP
//! LOCKED`, so consumers of a group never take the same row. Ack deletes the pending row at
//! or below the watermark and marks it done above it (so it is never found again; done
//! rows go when the watermark passes them); nack gives it back with a `visible_at` in the
//! future.
//!
//! Settlements go through the subscription's settle task, one round at a time: a round
//! takes everything that arrived while the previous one was written and runs one
//! statement per kind. `ack()` only books its ack there and returns (a sequential handler's
//! acks share a statement instead of paying a round trip each); a booked row stays held
//! (counted against `prefetch`, its lease renewed, its key's next message not handed out)
//! until its ack is written. `nack()` waits for its statement. [`SqlSubscriber::close`]
//! waits for what was booked before it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::Row;
use tidemill_core::{
    AckFuture, Acknowledger, ConnectionState, Delivery, DeliveryStream, Error, Message, Metadata,
    Native, Result, SubscribeOptions, Subscriber,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::{SqlConfig, StartFrom};
use crate::listen::Hub;
use crate::record::SqlRecord;
use crate::schema::{self, StateCell, Tables};
use crate::BROKER;

/// Consumes topics from the messages table as consumer groups.
///
/// - **Groups**: subscriptions with the same group compete for the topic's messages; each
///   group sees every message once (at least once). A subscription without a group gets a
///   private group, removed when the subscription ends, that sees what is published while
///   it exists.
/// - **Leases**: a fetched message is reserved for its subscription for
///   [`lease`](SqlConfig::lease), renewed while the subscription holds it; a consumer that
///   died leaves its messages to the rest of the group when the lease runs out.
/// - **Order per key** (default): the next message with a key waits until the previous one
///   was acked; a nacked one comes back first.
/// - **Redelivery**: a nack makes the message visible again (after the delay of
///   `nack_with_delay`); [`Delivery::attempt`] counts deliveries in the database, across
///   restarts.
/// - **Wake-ups**: publishers `NOTIFY` the topic; each subscriber keeps one `LISTEN`
///   connection and polls every [`poll_interval`](SqlConfig::poll_interval) as a fallback.
#[derive(Clone)]
pub struct SqlSubscriber {
    inner: Arc<Inner>,
}

struct Inner {
    config: SqlConfig,
    pool: PgPool,
    tables: Arc<Tables>,
    sql: Arc<Statements>,
    hub: Arc<Hub>,
    closed: CancellationToken,
    state: Arc<StateCell>,
    is_closed: AtomicBool,
    /// The settle tasks of the subscriptions, for [`Subscriber::close`] to wait for the
    /// acks booked with them.
    settlers: Mutex<Vec<mpsc::WeakUnboundedSender<Command>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

impl std::fmt::Debug for SqlSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlSubscriber")
            .field("database", &self.inner.config.address())
            .field("table_prefix", &self.inner.config.table_prefix)
            .field("closed", &self.inner.is_closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl SqlSubscriber {
    /// Connects to the database and creates the tables unless they exist (or checks them
    /// when `create_schema` is off); fails within `connect_timeout` naming host and port
    /// (never the password) when it cannot.
    pub async fn connect(config: SqlConfig) -> Result<Self> {
        let pool = schema::connect(&config, "subscriber").await?;
        let tables = Arc::new(Tables::new(&config.table_prefix));
        Ok(SqlSubscriber {
            inner: Arc::new(Inner {
                sql: Arc::new(Statements::new(&tables)),
                tables,
                config,
                pool,
                hub: Arc::default(),
                closed: CancellationToken::new(),
                state: Arc::default(),
                is_closed: AtomicBool::new(false),
                settlers: Mutex::default(),
            }),
        })
    }

    /// The configuration this subscriber runs with.
    pub fn config(&self) -> &SqlConfig {
        &self.inner.config
    }
}

#[async_trait]
impl Subscriber for SqlSubscriber {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<DeliveryStream> {
        let inner = &self.inner;
        if inner.is_closed.load(Ordering::Acquire) {
            return Err(Error::SubscriberClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        let config = &inner.config;
        let consumer = format!("{}-{}", config.consumer_name, uuid::Uuid::new_v4().simple());
        let (group, private) = match options.consumer_group() {
            Some(group) => (group.to_owned(), false),
            None => (format!("{consumer}-private"), true),
        };
        let err = |e, what: &str| schema::error(e, config, topic, what);
        if private {
            // Private groups of subscriptions that died without removing theirs.
            sqlx::query(&inner.sql.remove_expired)
                .bind(topic)
                .execute(&inner.pool)
                .await
                .map_err(|e| err(e, "remove expired private groups"))?;
        }
        let expiry = private.then_some(config.private_group_expiry);
        ensure_group(
            &inner.pool,
            &inner.tables,
            topic,
            &group,
            config.start_from,
            expiry,
        )
        .await
        .map_err(|e| err(e, "create consumer group"))?;

        let wake = Arc::new(Notify::new());
        inner.hub.register(
            topic,
            &wake,
            &inner.pool,
            &inner.tables.channel,
            &inner.closed,
        );
        let shared = Arc::new(Shared {
            topic: topic.to_owned(),
            group,
            consumer,
            private,
            config: config.clone(),
            pool: inner.pool.clone(),
            tables: Arc::clone(&inner.tables),
            sql: Arc::clone(&inner.sql),
            held: Mutex::default(),
            wake,
            state: Arc::clone(&inner.state),
        });
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        {
            let mut settlers = inner.settlers.lock();
            settlers.retain(|s| s.strong_count() > 0);
            settlers.push(settle_tx.downgrade());
        }
        tokio::spawn(settle_loop(Arc::clone(&shared), settle_rx));
        let (tx, rx) = mpsc::channel(config.prefetch);
        let stop = options.cancellation().map_or_else(
            || inner.closed.child_token(),
            |c| {
                let stop = inner.closed.child_token();
                let both = stop.clone();
                let c = c.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = c.cancelled() => both.cancel(),
                        () = both.cancelled() => {}
                    }
                });
                stop
            },
        );
        let shared_for_stream = Arc::clone(&shared);
        tokio::spawn(fetch_loop(shared, tx, settle_tx, stop));
        let stream = hand_out(rx, shared_for_stream);
        Ok(DeliveryStream::new(stream).with_options(&options))
    }

    /// Creates consumer group `group` on the topic (where `start_from` says), so messages
    /// published from now on wait for it. Nothing for a subscription without a group.
    async fn initialize(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        let Some(group) = options.consumer_group() else {
            return Ok(());
        };
        let inner = &self.inner;
        ensure_group(
            &inner.pool,
            &inner.tables,
            topic,
            group,
            inner.config.start_from,
            None,
        )
        .await
        .map_err(|e| schema::error(e, &inner.config, topic, "create consumer group"))
    }

    /// Stops the subscriptions (the messages they fetched but did not hand out go back to
    /// their groups), then waits, up to `command_timeout`, until the acks booked so far are
    /// written; what could not be written is logged, and those messages are delivered
    /// again once their lease runs out. Deliveries still held can be settled afterwards.
    async fn close(&self) -> Result<()> {
        let inner = &self.inner;
        inner.is_closed.store(true, Ordering::Release);
        inner.closed.cancel();
        let settlers: Vec<_> = inner
            .settlers
            .lock()
            .drain(..)
            .filter_map(|s| s.upgrade())
            .collect();
        let mut written = Vec::with_capacity(settlers.len());
        for settler in settlers {
            let (tx, rx) = oneshot::channel();
            if settler.send(Command::Flush(tx)).is_ok() {
                written.push(rx);
            }
        }
        let all = futures::future::join_all(written);
        if tokio::time::timeout(inner.config.command_timeout, all)
            .await
            .is_err()
        {
            tracing::warn!(
                database = %inner.config.address(),
                timeout = ?inner.config.command_timeout,
                "closing with acknowledgements not yet written; those messages are delivered \
                 again once their lease runs out"
            );
        }
        inner.state.set(ConnectionState::Closed);
        Ok(())
    }

    fn connection_state(&self) -> ConnectionState {
        self.inner.state.get()
    }
}

/// The subscription's stream: hands buffered deliveries out, skipping those the fetch loop
/// released when the subscription was closed (they went back to the group).
fn hand_out(
    mut rx: mpsc::Receiver<(i64, Delivery)>,
    shared: Arc<Shared>,
) -> impl futures::Stream<Item = Result<Delivery>> + Send + 'static {
    futures::stream::poll_fn(move |cx| loop {
        match rx.poll_recv(cx) {
            std::task::Poll::Ready(Some((row, delivery))) => {
                if let Some(state) = shared.held.lock().get_mut(&row) {
                    if *state == Held::Buffered {
                        *state = Held::HandedOut;
                        return std::task::Poll::Ready(Some(Ok(delivery)));
                    }
                }
                // Released: dropping it settles nothing (see `settle`).
            }
            std::task::Poll::Ready(None) => return std::task::Poll::Ready(None),
            std::task::Poll::Pending => return std::task::Poll::Pending,
        }
    })
}

/// Where a reserved message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    /// Fetched, waiting in the subscription's buffer.
    Buffered,
    /// Handed to the application.
    HandedOut,
}

/// Creates `group` on `topic` unless it exists, positioned at the end of the topic
/// ([`StartFrom::New`]) or before its first row. `expiry`: a private group's lifetime
/// without renewal.
pub(crate) async fn ensure_group(
    pool: &PgPool,
    tables: &Tables,
    topic: &str,
    group: &str,
    start: StartFrom,
    expiry: Option<Duration>,
) -> std::result::Result<(), sqlx::Error> {
    // New: every transaction older than the oldest one running has committed (or
    // aborted); rows of those are "before" the group. Rows of transactions still running
    // or later are the group's.
    sqlx::query(&format!(
        "WITH start AS (SELECT CASE WHEN $3 THEN '0'::xid8 \
                                    ELSE pg_snapshot_xmin(pg_current_snapshot()) END AS tx) \
         INSERT INTO {groups} (topic, consumer_group, transaction_id, \"offset\", \
             ahead_transaction_id, ahead_offset, expires_at) \
         SELECT $1, $2, tx, -1, tx, -1, now() + make_interval(secs => $4::float8) FROM start \
         ON CONFLICT (topic, consumer_group) DO NOTHING",
        groups = tables.groups
    ))
    .bind(topic)
    .bind(group)
    .bind(start == StartFrom::Beginning)
    .bind(expiry.map(|d| d.as_secs_f64()))
    .execute(pool)
    .await
    .map(|_| ())
}

/// The statements of a subscription, made once per subscriber.
struct Statements {
    advance: String,
    take: String,
    ack: String,
    nack: String,
    release: String,
    still_pending: String,
    renew: String,
    renew_group: String,
    remove_group: String,
    remove_expired: String,
    drop_missing: String,
    cleanup: String,
}

impl Statements {
    fn new(t: &Tables) -> Self {
        let (messages, groups, pending) = (&t.messages, &t.groups, &t.pending);
        Statements {
            // $1 topic, $2 group, $3 how many rows may wait in pending (visible, not
            // reserved) at most. Returns whether the group exists, and the seconds until
            // its next invisible row becomes visible (none: null).
            advance: format!(
                r#"WITH g AS (
    SELECT transaction_id AS wtx, "offset" AS woff, ahead_transaction_id AS atx,
        ahead_offset AS aoff, late, snapshot_xmax
    FROM {groups} WHERE topic = $1 AND consumer_group = $2 FOR UPDATE
), s AS (
    SELECT pg_current_snapshot() AS snap
), ok AS (
    SELECT g.* FROM g, s WHERE pg_snapshot_xmax(s.snap) >= g.snapshot_xmax
), room AS (
    SELECT GREATEST(0, $3 - (SELECT count(*) FROM {pending}
        WHERE topic = $1 AND consumer_group = $2 AND NOT done AND locked_by IS NULL
          AND visible_at <= now())) AS n
), ahead AS (
    SELECT m.transaction_id, m."offset", m.key, m.deliver_at FROM {messages} m
    WHERE m.topic = $1
      AND (m.transaction_id, m."offset") > ((SELECT atx FROM ok), (SELECT aoff FROM ok))
    ORDER BY m.transaction_id, m."offset"
    LIMIT (SELECT n FROM room)
), behind AS (
    SELECT m.transaction_id, m."offset", m.key, m.deliver_at FROM {messages} m
    WHERE m.topic = $1 AND m.transaction_id = ANY((SELECT late FROM ok)::xid8[])
      AND (m.transaction_id, m."offset") > ((SELECT wtx FROM ok), (SELECT woff FROM ok))
      AND (m.transaction_id, m."offset") <= ((SELECT atx FROM ok), (SELECT aoff FROM ok))
), ins AS (
    INSERT INTO {pending} (topic, consumer_group, transaction_id, "offset", key, visible_at)
    SELECT $1, $2, transaction_id, "offset", key, GREATEST(COALESCE(deliver_at, now()), now())
    FROM (SELECT * FROM behind UNION ALL SELECT * FROM ahead) found
    ORDER BY transaction_id, "offset"
    ON CONFLICT DO NOTHING
), na AS (
    SELECT COALESCE(a.transaction_id, ok.atx) AS atx, COALESCE(a."offset", ok.aoff) AS aoff
    FROM ok LEFT JOIN (
        SELECT transaction_id, "offset" FROM ahead
        ORDER BY transaction_id DESC, "offset" DESC LIMIT 1
    ) a ON true
), nl AS (
    SELECT na.atx, na.aoff, ARRAY(
        SELECT x FROM pg_snapshot_xip((SELECT snap FROM s)) AS x WHERE x < na.atx ORDER BY x
    ) AS late FROM na
), mark AS (
    SELECT CASE WHEN cardinality(nl.late) = 0 THEN nl.atx ELSE nl.late[1] END AS tx,
        CASE WHEN cardinality(nl.late) = 0 THEN nl.aoff ELSE -1 END AS off
    FROM nl
), upd AS (
    UPDATE {groups} gr SET ahead_transaction_id = nl.atx, ahead_offset = nl.aoff,
        late = nl.late, snapshot_xmax = pg_snapshot_xmax((SELECT snap FROM s)),
        transaction_id = CASE WHEN (mark.tx, mark.off) > (ok.wtx, ok.woff) THEN mark.tx ELSE ok.wtx END,
        "offset" = CASE WHEN (mark.tx, mark.off) > (ok.wtx, ok.woff) THEN mark.off ELSE ok.woff END
    FROM ok, nl, mark
    WHERE gr.topic = $1 AND gr.consumer_group = $2
    RETURNING gr.transaction_id, gr."offset"
), compact AS (
    DELETE FROM {pending} p USING upd
    WHERE p.topic = $1 AND p.consumer_group = $2 AND p.done
      AND (p.transaction_id, p."offset") <= (upd.transaction_id, upd."offset")
)
SELECT (SELECT count(*) FROM g) AS found,
    (SELECT EXTRACT(EPOCH FROM min(visible_at) - now())::float8 FROM {pending}
     WHERE topic = $1 AND consumer_group = $2 AND NOT done AND visible_at > now()) AS next_visible"#
            ),
            // $1 topic, $2 group, $3 consumer, $4 how many, $5 order per key,
            // $6 lease in seconds.
            take: format!(
                r#"WITH c AS (
    SELECT p.ctid AS row_id FROM {pending} p
    WHERE p.topic = $1 AND p.consumer_group = $2 AND NOT p.done AND p.visible_at <= now()
      AND (p.locked_by IS NULL OR p.lease_until < now())
      AND (NOT $5 OR p.key IS NULL OR NOT EXISTS (
          SELECT 1 FROM {pending} q
          WHERE q.topic = p.topic AND q.consumer_group = p.consumer_group AND q.key = p.key
            AND q.seq < p.seq AND NOT q.done
            AND (q.attempts > 0 OR q.visible_at <= now())))
    ORDER BY p.seq
    LIMIT $4
    FOR UPDATE SKIP LOCKED
), t AS (
    UPDATE {pending} p SET locked_by = $3, attempts = p.attempts + 1,
        lease_until = now() + make_interval(secs => $6::float8)
    WHERE p.ctid = ANY(ARRAY(SELECT row_id FROM c))
    RETURNING p.seq, p."offset", p.attempts
)
SELECT t.seq, t."offset", t.attempts, m."offset" IS NOT NULL AS found, m.uuid, m.key,
    m.metadata::text AS metadata, m.payload,
    EXTRACT(EPOCH FROM m.created_at)::float8 AS created_at
FROM t LEFT JOIN LATERAL (
    SELECT mm."offset", mm.uuid, mm.key, mm.metadata, mm.payload, mm.created_at
    FROM {messages} mm WHERE mm."offset" = t."offset" OFFSET 0
) m ON true
ORDER BY t.seq"#
            ),
            // Deleted at or below the group's watermark; above it (where the group may still
            // come across the row again) kept as done.
            ack: format!(
                r#"WITH g AS (
    SELECT transaction_id AS tx, "offset" AS off FROM {groups}
    WHERE topic = $1 AND consumer_group = $2
), gone AS (
    DELETE FROM {pending} p USING g
    WHERE p.seq = ANY($3) AND p.locked_by = $4 AND NOT p.done
      AND (p.transaction_id, p."offset") <= (g.tx, g.off)
    RETURNING p.seq
), kept AS (
    UPDATE {pending} p SET done = true, locked_by = NULL, lease_until = NULL FROM g
    WHERE p.seq = ANY($3) AND p.locked_by = $4 AND NOT p.done
      AND (p.transaction_id, p."offset") > (g.tx, g.off)
    RETURNING p.seq
)
SELECT seq FROM gone UNION ALL SELECT seq FROM kept"#
            ),
            // Rows are found by their unique seq alone (the pending_seq index), whatever
            // the planner's statistics say about the group: $1 rows, $2 consumer, $3
            // delay in seconds.
            nack: format!(
                r#"UPDATE {pending} SET locked_by = NULL, lease_until = NULL,
    visible_at = now() + make_interval(secs => $3::float8)
WHERE seq = ANY($1) AND locked_by = $2
RETURNING seq"#
            ),
            release: format!(
                r#"UPDATE {pending} SET locked_by = NULL, lease_until = NULL, visible_at = now(),
    attempts = GREATEST(attempts - 1, 0)
WHERE seq = ANY($1) AND locked_by = $2
RETURNING seq"#
            ),
            still_pending: format!(r#"SELECT seq FROM {pending} WHERE seq = ANY($1) AND NOT done"#),
            renew: format!(
                r#"UPDATE {pending} SET lease_until = now() + make_interval(secs => $3::float8)
WHERE seq = ANY($1) AND locked_by = $2"#
            ),
            renew_group: format!(
                r#"UPDATE {groups} SET expires_at = now() + make_interval(secs => $3::float8)
WHERE topic = $1 AND consumer_group = $2"#
            ),
            remove_group: format!(
                r#"WITH g AS (DELETE FROM {groups} WHERE topic = $1 AND consumer_group = $2)
DELETE FROM {pending} WHERE topic = $1 AND consumer_group = $2"#
            ),
            remove_expired: format!(
                r#"WITH g AS (
    DELETE FROM {groups} WHERE topic = $1 AND expires_at < now() RETURNING consumer_group
)
DELETE FROM {pending} WHERE topic = $1 AND consumer_group IN (SELECT consumer_group FROM g)"#
            ),
            // $1 topic, $2 retention in seconds: rows older than that which every group
            // of the topic has passed and acked, at most 10,000 per statement.
            cleanup: format!(
                r#"DELETE FROM {messages} WHERE "offset" IN (
    SELECT m."offset" FROM {messages} m
    WHERE m.topic = $1 AND m.created_at < now() - make_interval(secs => $2::float8)
      AND NOT EXISTS (SELECT 1 FROM {groups} g WHERE g.topic = $1
          AND (m.transaction_id, m."offset") > (g.transaction_id, g."offset"))
      AND NOT EXISTS (SELECT 1 FROM {pending} p
          WHERE p.topic = $1 AND p."offset" = m."offset" AND NOT p.done)
    ORDER BY m."offset" LIMIT 10000)"#
            ),
            drop_missing: format!(r#"DELETE FROM {pending} WHERE seq = ANY($1)"#),
        }
    }
}

/// What a subscription's fetch loop, settle loop and acknowledgers share.
struct Shared {
    topic: String,
    group: String,
    consumer: String,
    private: bool,
    config: SqlConfig,
    pool: PgPool,
    tables: Arc<Tables>,
    sql: Arc<Statements>,
    /// Pending rows (by `seq`) reserved by this subscription and not settled yet. A buffered message
    /// released at close is removed from here, so its acknowledger settles nothing.
    held: Mutex<HashMap<i64, Held>>,
    /// Wakes the fetch loop: a notification for the topic, or a settled message.
    wake: Arc<Notify>,
    state: Arc<StateCell>,
}

/// Fetches while there is room, hands deliveries out, and waits for a wake-up, the next
/// visible message or the poll interval.
async fn fetch_loop(
    shared: Arc<Shared>,
    tx: mpsc::Sender<(i64, Delivery)>,
    settle: mpsc::UnboundedSender<Command>,
    stop: CancellationToken,
) {
    let config = &shared.config;
    let window = (config.prefetch as i64).saturating_mul(4).max(256);
    let mut pause = Duration::from_millis(100);
    let mut cleaned = tokio::time::Instant::now();
    loop {
        if stop.is_cancelled() || tx.is_closed() {
            break;
        }
        if let Some(retention) = config.retention {
            let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(300));
            if cleaned.elapsed() >= every {
                cleaned = tokio::time::Instant::now();
                cleanup(&shared, retention).await;
            }
        }
        let (room, buffered) = {
            let held = shared.held.lock();
            let buffered = held.values().filter(|s| **s == Held::Buffered).count();
            (config.prefetch.saturating_sub(held.len()), buffered)
        };
        let mut wait = config.poll_interval;
        // Fetch when the buffer ran dry or half the room is free: not after every ack
        // (two statements for one message).
        if room > 0 && (buffered == 0 || room * 2 >= config.prefetch) {
            match fetch(&shared, room, window).await {
                Ok((rows, next)) => {
                    pause = Duration::from_millis(100);
                    let full = rows.len() == room;
                    for delivery in rows {
                        let row = delivery.row;
                        let delivery = delivery.into_delivery(&shared, &settle);
                        if tx.send((row, delivery)).await.is_err() {
                            break;
                        }
                    }
                    if full {
                        continue;
                    }
                    if let Some(next) = next {
                        wait = wait.min(next);
                    }
                }
                Err(e) => {
                    if schema::is_transient(&e) {
                        shared.state.set(ConnectionState::Disconnected);
                    }
                    tracing::warn!(
                        topic = %shared.topic,
                        group = %shared.group,
                        error = %schema::error(e, config, &shared.topic, "fetch"),
                        "fetching messages failed; retrying"
                    );
                    wait = pause;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
        tokio::select! {
            () = shared.wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => break,
            () = tx.closed() => break,
        }
    }
    if stop.is_cancelled() {
        release_buffered(&shared).await;
    }
    // Otherwise the stream was dropped, and the deliveries buffered in it with it (each
    // nacked on drop).
}

/// Deletes the topic's rows older than `retention` that every group has acked.
async fn cleanup(shared: &Shared, retention: Duration) {
    let result = sqlx::query(&shared.sql.cleanup)
        .bind(&shared.topic)
        .bind(retention.as_secs_f64())
        .execute(&shared.pool)
        .await;
    match result {
        Ok(done) if done.rows_affected() > 0 => {
            tracing::debug!(topic = %shared.topic, deleted = done.rows_affected(), "deleted messages past retention")
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(topic = %shared.topic, error = %e, "deleting messages past retention failed; trying again later")
        }
    }
}

/// At close: gives the messages still waiting in the buffer back to the group at once, so
/// other members get them without waiting for the stream to be polled or dropped.
async fn release_buffered(shared: &Shared) {
    let rows: Vec<i64> = {
        let mut held = shared.held.lock();
        let rows: Vec<i64> = held
            .iter()
            .filter(|(_, s)| **s == Held::Buffered)
            .map(|(o, _)| *o)
            .collect();
        for o in &rows {
            held.remove(o);
        }
        rows
    };
    if rows.is_empty() {
        return;
    }
    match run_settle(shared, Outcome::Release, &rows).await {
        Ok(_) => {
            tracing::debug!(topic = %shared.topic, count = rows.len(), "released buffered messages at close")
        }
        Err(e) => {
            tracing::warn!(topic = %shared.topic, error = %e, "releasing buffered messages at close failed; they return to the group when their lease runs out")
        }
    }
}

/// A reserved row, before it becomes a delivery.
struct Fetched {
    /// The pending row (its `seq`).
    row: i64,
    attempts: i32,
    message: Message,
}

impl Fetched {
    /// The delivery, counted as held until it is settled.
    fn into_delivery(self, shared: &Shared, settle: &mpsc::UnboundedSender<Command>) -> Delivery {
        shared.held.lock().insert(self.row, Held::Buffered);
        Delivery::new(
            self.message,
            SqlAcker {
                row: self.row,
                settle: settle.clone(),
            },
        )
        .with_attempt(self.attempts.max(1) as u32)
    }
}

/// One fetch: advance the group into pending, reserve up to `room` rows; with the time
/// until the group's next invisible row becomes visible, if it has one.
async fn fetch(
    shared: &Shared,
    room: usize,
    window: i64,
) -> std::result::Result<(Vec<Fetched>, Option<Duration>), sqlx::Error> {
    let sql = &shared.sql;
    let (found, next_visible): (i64, Option<f64>) = sqlx::query_as(&sql.advance)
        .bind(&shared.topic)
        .bind(&shared.group)
        .bind(window)
        .fetch_one(&shared.pool)
        .await?;
    if found == 0 {
        // Removed behind our back (an expired private group, an operator): recreate it.
        tracing::warn!(topic = %shared.topic, group = %shared.group, "consumer group was missing; recreating it at the end of the topic");
        let expiry = shared.private.then_some(shared.config.private_group_expiry);
        ensure_group(
            &shared.pool,
            &shared.tables,
            &shared.topic,
            &shared.group,
            StartFrom::New,
            expiry,
        )
        .await?;
    }
    let rows: Vec<PgRow> = sqlx::query(&sql.take)
        .bind(&shared.topic)
        .bind(&shared.group)
        .bind(&shared.consumer)
        .bind(room as i64)
        .bind(shared.config.order_per_key)
        .bind(shared.config.lease.as_secs_f64())
        .fetch_all(&shared.pool)
        .await?;
    shared.state.set(ConnectionState::Connected);
    let mut out = Vec::with_capacity(rows.len());
    let mut missing = Vec::new();
    for row in rows {
        let seq: i64 = row.try_get("seq")?;
        let offset: i64 = row.try_get("offset")?;
        if !row.try_get::<bool, _>("found")? {
            missing.push(seq);
            continue;
        }
        out.push(decode(shared, seq, offset, &row)?);
    }
    if !missing.is_empty() {
        tracing::warn!(topic = %shared.topic, group = %shared.group, ?missing, "pending messages whose rows were deleted from the messages table; dropping them");
        sqlx::query(&sql.drop_missing)
            .bind(&missing)
            .execute(&shared.pool)
            .await?;
    }
    let next = next_visible.map(|s| Duration::from_secs_f64(s.max(0.0)) + Duration::from_millis(5));
    Ok((out, next))
}

/// The message of a reserved row. Metadata that is not a JSON object of strings (a row
/// another program wrote) is kept: other values as their JSON text, anything but an object
/// whole under `metadata`.
fn decode(
    shared: &Shared,
    seq: i64,
    offset: i64,
    row: &PgRow,
) -> std::result::Result<Fetched, sqlx::Error> {
    let attempts: i32 = row.try_get("attempts")?;
    let uuid: Option<String> = row.try_get("uuid")?;
    let key: Option<Vec<u8>> = row.try_get("key")?;
    let metadata_text: String = row.try_get("metadata")?;
    let payload: Vec<u8> = row.try_get("payload")?;
    let created_at: f64 = row.try_get("created_at")?;
    let mut metadata = Metadata::new();
    match serde_json::from_str::<serde_json::Value>(&metadata_text) {
        Ok(serde_json::Value::Object(map)) => {
            for (k, v) in map {
                match v {
                    serde_json::Value::String(s) => metadata.set(k, s),
                    other => metadata.set(k, other.to_string()),
                }
            }
        }
        _ => metadata.set("metadata", metadata_text),
    }
    let uuid_stored = uuid.is_some();
    let uuid: Arc<str> = match uuid {
        Some(u) => Arc::from(u),
        None => tidemill_core::headers::stable_uuid(&[
            BROKER.as_bytes(),
            shared.topic.as_bytes(),
            &offset.to_be_bytes(),
        ]),
    };
    let record = SqlRecord {
        topic: shared.topic.clone(),
        offset,
        created_at: SystemTime::UNIX_EPOCH + Duration::from_secs_f64(created_at.max(0.0)),
        group: shared.group.clone(),
        uuid_stored,
    };
    let native = Native::new(BROKER, record, &metadata);
    let mut message = Message::with_uuid(uuid, Bytes::from(payload)).with_metadata_map(metadata);
    if let Some(key) = key {
        message = message.with_key_bytes(Bytes::from(key));
    }
    Ok(Fetched {
        row: seq,
        attempts,
        message: message.with_native(native),
    })
}

/// What a subscription's settle task receives.
enum Command {
    Settle(Settle),
    /// Answered once everything sent before it was settled ([`Subscriber::close`]).
    Flush(oneshot::Sender<()>),
}

/// A settlement request from an acknowledger.
struct Settle {
    /// The pending row (its `seq`).
    row: i64,
    outcome: Outcome,
    /// The acknowledger waiting for the outcome; none for a booked ack or a dropped
    /// delivery's nack (a failure is logged).
    reply: Option<oneshot::Sender<Result<()>>>,
}

/// What becomes of a reserved message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Done: the pending row goes.
    Ack,
    /// Delivered again after the delay.
    Nack(Duration),
    /// Never handed out (buffered when the subscription ended): back to the group at once,
    /// the attempt it was fetched with not counted.
    Release,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Ack => "ack",
            Outcome::Nack(_) => "nack",
            Outcome::Release => "release",
        }
    }
}

/// Settles one delivery through the subscription's settle loop.
struct SqlAcker {
    /// The pending row (its `seq`).
    row: i64,
    settle: mpsc::UnboundedSender<Command>,
}

/// The error of a settlement whose settle task has ended (the runtime shutting down).
fn settle_task_ended(what: &str) -> Error {
    Error::transient(
        BROKER,
        "",
        what,
        "the subscription's settle task has ended; the message is delivered again once its \
         lease runs out",
    )
}

impl SqlAcker {
    /// Sends the settlement without waiting for it.
    fn book(&self, outcome: Outcome) -> bool {
        self.settle
            .send(Command::Settle(Settle {
                row: self.row,
                outcome,
                reply: None,
            }))
            .is_ok()
    }
}

impl Acknowledger for SqlAcker {
    /// Books the ack with the subscription's settle task and returns: the task writes it
    /// with the acks booked while its previous statement ran. A write that fails (the lease
    /// was lost, the database stayed unreachable for `command_timeout`) is logged at `warn`
    /// level and the message is delivered again; [`Subscriber::close`] waits for booked
    /// acks. Fails at once only when the settle task has ended.
    fn ack(self: Box<Self>) -> AckFuture {
        if self.book(Outcome::Ack) {
            AckFuture::ready(Ok(()))
        } else {
            AckFuture::ready(Err(settle_task_ended("ack")))
        }
    }

    /// Resolves once the nack statement ran (with the acks booked before it).
    fn nack(self: Box<Self>, delay: Option<Duration>) -> AckFuture {
        let (reply, rx) = oneshot::channel();
        let sent = self.settle.send(Command::Settle(Settle {
            row: self.row,
            outcome: Outcome::Nack(delay.unwrap_or_default()),
            reply: Some(reply),
        }));
        if sent.is_err() {
            return AckFuture::ready(Err(settle_task_ended("nack")));
        }
        AckFuture::boxed(async move { rx.await.unwrap_or_else(|_| Err(settle_task_ended("nack"))) })
    }

    /// Nacks at once; a delivery still in the subscription's buffer (the stream was dropped
    /// with it) is released instead, its attempt not counted.
    fn nack_on_drop(self: Box<Self>) {
        self.book(Outcome::Nack(Duration::ZERO));
    }
}

/// Settles what acknowledgers send, one round at a time, each round taking what arrived
/// while the previous one ran (one statement per kind); renews the leases of what the
/// subscription holds every third of the lease. Ends when the fetch loop and every
/// acknowledger are gone (after settling everything they sent); then a private group is
/// removed.
async fn settle_loop(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Command>) {
    let lease = shared.config.lease;
    let mut renew = tokio::time::interval(lease / 3);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            first = rx.recv() => {
                let Some(first) = first else { break };
                // Let a burst of acks (a batch handler's) queue up behind the first.
                tokio::task::yield_now().await;
                let (mut batch, mut flushes) = (Vec::new(), Vec::new());
                let mut next = Some(first);
                while let Some(command) = next {
                    match command {
                        Command::Settle(s) => batch.push(s),
                        Command::Flush(done) => flushes.push(done),
                    }
                    next = if batch.len() < 1000 { rx.try_recv().ok() } else { None };
                }
                if !batch.is_empty() {
                    settle(&shared, batch).await;
                    shared.wake.notify_one();
                }
                for done in flushes {
                    let _ = done.send(());
                }
            }
            _ = renew.tick() => renew_leases(&shared).await,
        }
    }
    if shared.private {
        let result = sqlx::query(&shared.sql.remove_group)
            .bind(&shared.topic)
            .bind(&shared.group)
            .execute(&shared.pool)
            .await;
        if let Err(e) = result {
            tracing::warn!(topic = %shared.topic, group = %shared.group, error = %e,
                "removing the private group failed; a later subscription to the topic removes it once expired");
        }
    }
}

async fn renew_leases(shared: &Shared) {
    let held: Vec<i64> = shared.held.lock().keys().copied().collect();
    let lease = shared.config.lease.as_secs_f64();
    if !held.is_empty() {
        let result = sqlx::query(&shared.sql.renew)
            .bind(&held)
            .bind(&shared.consumer)
            .bind(lease)
            .execute(&shared.pool)
            .await;
        if let Err(e) = result {
            tracing::debug!(topic = %shared.topic, error = %e, "renewing leases failed");
        }
    }
    if shared.private {
        let _ = sqlx::query(&shared.sql.renew_group)
            .bind(&shared.topic)
            .bind(&shared.group)
            .bind(shared.config.private_group_expiry.as_secs_f64())
            .execute(&shared.pool)
            .await;
    }
}

/// Runs the settlements of `batch` (one statement per outcome), retrying a lost connection
/// within `command_timeout`, and replies to each.
async fn settle(shared: &Shared, batch: Vec<Settle>) {
    let mut groups: Vec<(Outcome, Vec<Settle>)> = Vec::new();
    for mut s in batch {
        match shared.held.lock().get(&s.row) {
            // Released at close (or settled already): nothing to do.
            None => {
                if let Some(reply) = s.reply {
                    let _ = reply.send(Ok(()));
                }
                continue;
            }
            Some(Held::Buffered) => s.outcome = Outcome::Release,
            Some(Held::HandedOut) => {}
        }
        match groups.iter_mut().find(|(k, _)| *k == s.outcome) {
            Some((_, list)) => list.push(s),
            None => groups.push((s.outcome, vec![s])),
        }
    }
    for (outcome, list) in groups {
        let rows: Vec<i64> = list.iter().map(|s| s.row).collect();
        let result = run_settle(shared, outcome, &rows).await;
        {
            let mut held = shared.held.lock();
            for r in &rows {
                held.remove(r);
            }
        }
        let what = outcome.name();
        match result {
            Ok(lost) => {
                for s in list {
                    let r = if lost.contains(&s.row) {
                        Err(Error::transient(
                            BROKER,
                            shared.topic.clone(),
                            what,
                            format!(
                                "a message of group `{}` (pending row {}) was no longer reserved \
                                 for this subscription (its lease of {:?} ran out and another \
                                 consumer may have taken it): it will be delivered again",
                                shared.group, s.row, shared.config.lease
                            ),
                        ))
                    } else {
                        Ok(())
                    };
                    if let Err(e) = &r {
                        if s.reply.is_none() {
                            tracing::warn!(topic = %shared.topic, group = %shared.group,
                                row = s.row, outcome = what, error = %e,
                                "a booked settlement (an ack, or a dropped delivery's nack) \
                                 failed; the message is delivered again");
                        }
                    }
                    if let Some(reply) = s.reply {
                        let _ = reply.send(r);
                    }
                }
            }
            Err(e) => {
                let transient = schema::is_transient(&e);
                let e = schema::error(e, &shared.config, &shared.topic, what);
                let booked = list.iter().filter(|s| s.reply.is_none()).count();
                tracing::warn!(topic = %shared.topic, group = %shared.group, outcome = what,
                    error = %e, count = list.len(), booked,
                    "settling failed; the messages are delivered again once their lease runs out");
                let cause = e.to_string();
                for s in list {
                    if let Some(reply) = s.reply {
                        let e = if transient {
                            Error::transient(BROKER, shared.topic.clone(), what, cause.clone())
                        } else {
                            Error::permanent(BROKER, shared.topic.clone(), what, cause.clone())
                        };
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
    }
}

/// One settle statement for the pending `rows`; returns those still pending but not
/// reserved by this subscription any more (lease lost). Rows gone from pending were
/// settled already (e.g. a retried statement that had succeeded) and count as done.
async fn run_settle(
    shared: &Shared,
    outcome: Outcome,
    rows: &[i64],
) -> std::result::Result<Vec<i64>, sqlx::Error> {
    let deadline = tokio::time::Instant::now() + shared.config.command_timeout;
    let mut pause = Duration::from_millis(50);
    loop {
        let result = async {
            let query = match outcome {
                Outcome::Ack => sqlx::query_scalar(&shared.sql.ack)
                    .bind(&shared.topic)
                    .bind(&shared.group)
                    .bind(rows)
                    .bind(&shared.consumer),
                Outcome::Nack(delay) => sqlx::query_scalar(&shared.sql.nack)
                    .bind(rows)
                    .bind(&shared.consumer)
                    .bind(delay.as_secs_f64()),
                Outcome::Release => sqlx::query_scalar(&shared.sql.release)
                    .bind(rows)
                    .bind(&shared.consumer),
            };
            let done: Vec<i64> = query.fetch_all(&shared.pool).await?;
            if done.len() == rows.len() {
                return Ok(Vec::new());
            }
            let rest: Vec<i64> = rows.iter().copied().filter(|o| !done.contains(o)).collect();
            let still: Vec<i64> = sqlx::query_scalar(&shared.sql.still_pending)
                .bind(&rest)
                .fetch_all(&shared.pool)
                .await?;
            Ok(still)
        }
        .await;
        schema::saw(&shared.state, &result);
        match result {
            Err(e)
                if schema::is_transient(&e) && tokio::time::Instant::now() + pause < deadline =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}
