//! Raw `sqlx` vs Tidemill on the PostgreSQL of brokers, same server, same run; then the
//! outbox forwarder's throughput to NATS JetStream and Kafka.
//!
//! `make bench-sql` (or `cargo bench -p tidemill-sql --bench throughput` with
//! `TIDEMILL_POSTGRES_URL` set). N messages of 100 bytes, no metadata, no key. Tidemill
//! uses the tables of prefix `tmbench_` (dropped and created again at the start); the raw
//! side has tables of its own of the same shape: `tmbench_raw` (the columns of
//! `tmbench_messages`, with an index on `(topic, offset)`) and `tmbench_raw_groups` (one
//! position per topic and consumer group). Each round uses fresh topics. The tables are new
//! at the start of a run: the planner has no statistics on them until autovacuum analyzes
//! them (within a minute or so), which changes the plans of some of the adapter's
//! statements (see the round-by-round figures).
//!
//! # Pub/sub section
//!
//! - **publish**: batches of 1,000 messages, from the first batch sent to the last one
//!   committed. Raw: one `INSERT … SELECT FROM UNNEST($uuids, $metadata, $payloads)`
//!   statement per batch (uuids, `{}` metadata and payloads made before the clock starts).
//!   Tidemill: `SqlPublisher::publish(topic, batch)`: one statement per batch too (its
//!   `INSERT … SELECT FROM UNNEST` with keys and ordinality, plus a `pg_notify`), with the
//!   messages' encoding (metadata to JSON, payload copied into the bind) inside the clock.
//! - **consume**: from the start of the consumer until the N-th message is handled and its
//!   progress committed, each message committed before the next is handled, as a
//!   sequential handler does. Raw, the hand-written log consumer on a connection of its
//!   own (`pool.acquire()` once): create the group's position row, then loop `SELECT
//!   offset, uuid, metadata, payload … WHERE topic = $1 AND offset > $last ORDER BY offset
//!   LIMIT 64`, decode each row (metadata JSON into a map), and per message `UPDATE
//!   tmbench_raw_groups SET offset = $o` (awaited): 1 statement per message plus 1 per 64.
//!   Tidemill: `SqlSubscriber::subscribe(topic, group)` (prefetch 64, groups start at the
//!   beginning) and `Delivery::ack` awaited per message: the adapter's fetches ("advance"
//!   the group into the pending table, then "take" with `FOR UPDATE SKIP LOCKED`), and its
//!   acks, each statement on its pool. `ack()` returns once the ack is booked (the
//!   subscription's settle task writes the acks booked while its previous statement ran in
//!   one statement), so the clock stops only when the handler saw the N-th message **and**
//!   the group has no unacked row left in the pending table (polled every millisecond on
//!   the bench's own pool, as in the batch section): every ack committed.
//!
//! Sides alternate which goes first; each round is printed, then the median msg/s, the
//! median of the per-round ratios Tidemill / raw, the median process CPU per message
//! (every thread of this process: the client side only, not the server's) and the peak RSS.
//!
//! # Batch section
//!
//! N messages written beforehand to both sides' tables (untimed), then consumed by
//!
//! - (a) raw sqlx in batch mode, the queue-table consumer on a connection of its own:
//!   `SELECT … WHERE topic = $1 AND offset > $last ORDER BY offset LIMIT 500`, then one
//!   `DELETE … WHERE offset = ANY($500 offsets)` awaited before the next select;
//! - (b) the Tidemill router with a single-message handler (default: sequential);
//! - (c) the router with `.batch(500, 50 ms)`;
//!
//! the router variants on a subscriber with prefetch 1,000 (two batches in flight), each in
//! a consumer group of its own starting at the beginning. Timed from the start of the
//! consumer (the router's `run`) until the N-th message is settled: the raw side's last
//! `DELETE` returned; for the router, after its handler saw the N-th message, until the
//! group has no unacked row left in the pending table (polled every millisecond). Variants
//! rotate which goes first each round.
//!
//! # Forwarder section
//!
//! For each destination whose address is set (`TIDEMILL_NATS_URL`: NATS JetStream through
//! `tidemill-nats`; `TIDEMILL_KAFKA_BROKERS`: Kafka through `tidemill-kafka`, acks=all):
//!
//! - **direct**: the destination publisher publishes the N messages itself, one message per
//!   `publish` call, 16 calls in flight (the forwarder's shape: it publishes each outbox
//!   message on its own, `DEFAULT_CONCURRENCY` = 16 at a time);
//! - **forwarder**: N messages written into the outbox beforehand (untimed) with
//!   `Outbox::publish_in`, in transactions of 100, then a `Forwarder` (default settings,
//!   subscriber prefetch 64) on a router, timed from the router's `run` until the
//!   destination confirmed the N-th message (PubAck, delivery report).
//!
//! Both sides count confirmations in the same wrapper around the destination publisher, and
//! each destination topic gets one untimed message first (creating the stream or topic).
//!
//! Environment:
//!
//! - `TIDEMILL_BENCH_MESSAGES`: N (default 10,000);
//! - `TIDEMILL_BENCH_ROUNDS`: rounds (default 3);
//! - `TIDEMILL_BENCH_SECTION`: `pubsub`, `batch`, `forwarder`, or a comma-separated list
//!   (default all);
//! - `TIDEMILL_BENCH_CALL_US`: a wait per handler call in the batch section (per message,
//!   per batch, per raw chunk; default none);
//! - `TIDEMILL_BENCH_RAW_VIA_POOL=1`: the raw sequential consumer runs each statement on the
//!   pool, as the adapter does, instead of a connection of its own (sqlx's pool pings a
//!   connection before handing it out, `test_before_acquire`): what that costs;
//! - `TIDEMILL_BENCH_BACKLOG`: M (default 0): in the pub/sub section, M messages are written
//!   to each topic (untimed) before its consumer group is created at the end of the topic,
//!   so the consumers read N messages behind M others, as a long-lived topic's do.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::Row as _;
use tidemill_core::router::BatchResult;
use tidemill_core::{
    ConnectionState, HandlerResult, Message, Publisher, Router, SubscribeOptions, Subscriber,
};
use tidemill_sql::outbox::{Forwarder, Outbox, DEFAULT_CONCURRENCY};
use tidemill_sql::{SqlConfig, SqlPublisher, SqlSubscriber, StartFrom};
use tidemill_testkit::bench::{
    handler_call, median, mib, record, Clock, Consumed, HandledCounter, Row,
};

const PAYLOAD: usize = 100;
/// Messages per publish batch.
const BATCH: usize = 1_000;
/// The consumers' prefetch (Tidemill) and rows per select (raw) in the pub/sub section.
const PREFETCH: usize = 64;
/// Rows per raw batch read and delete, and the batch handler's `max_messages`.
const CONSUME_BATCH: usize = 500;
/// The batch handler's `max_wait`.
const CONSUME_WAIT: Duration = Duration::from_millis(50);
/// The router subscriber's prefetch in the batch section: two batches in flight.
const BATCH_PREFETCH: usize = 1_000;
/// Messages per outbox transaction.
const OUTBOX_TX: usize = 100;
const LIMIT: Duration = Duration::from_secs(300);
/// Tidemill's table prefix.
const PREFIX: &str = "tmbench_";
const RAW: &str = "tmbench_raw";
const RAW_GROUPS: &str = "tmbench_raw_groups";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

fn non_empty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn main() -> Result<(), BoxError> {
    let Some(url) = non_empty("TIDEMILL_POSTGRES_URL") else {
        eprintln!("SKIP: TIDEMILL_POSTGRES_URL is not set (run `make bench-sql`)");
        return Ok(());
    };
    let n = env_usize("TIDEMILL_BENCH_MESSAGES", 10_000);
    let rounds = env_usize("TIDEMILL_BENCH_ROUNDS", 3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(url, n, rounds))
}

/// `TIDEMILL_BENCH_RAW_VIA_POOL=1`: the raw sequential consumer runs each statement on the
/// pool instead of a connection of its own (sqlx pings a pooled connection before handing
/// it out, one more round trip per statement).
fn via_pool() -> bool {
    std::env::var("TIDEMILL_BENCH_RAW_VIA_POOL").as_deref() == Ok("1")
}

fn section(name: &str) -> bool {
    match std::env::var("TIDEMILL_BENCH_SECTION") {
        Ok(list) if !list.is_empty() => list.split(',').any(|s| s.trim() == name),
        _ => true,
    }
}

fn payload(i: usize) -> Bytes {
    let mut p = format!("{i:010}").into_bytes();
    p.resize(PAYLOAD, b'x');
    Bytes::from(p)
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

fn config(url: &str, prefetch: usize) -> SqlConfig {
    let mut config = SqlConfig::new(url);
    config.table_prefix = PREFIX.to_owned();
    config.prefetch = prefetch;
    config.start_from = StartFrom::Beginning;
    config
}

async fn run(url: String, n: usize, rounds: usize) -> Result<(), BoxError> {
    let address = SqlConfig::new(url.as_str()).address();
    println!("PostgreSQL at {address}: {n} messages of {PAYLOAD} bytes, {rounds} rounds (median reported)");
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect(&url)
        .await?;
    reset_tables(&pool).await?;
    let publisher = SqlPublisher::connect(config(&url, PREFETCH)).await?;
    let bench = Bench {
        url,
        pool,
        publisher,
        n,
        rounds,
        backlog: std::env::var("TIDEMILL_BENCH_BACKLOG")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    };
    if section("pubsub") {
        bench.pubsub().await?;
    }
    if section("batch") {
        bench.batch().await?;
    }
    if section("forwarder") {
        bench.forwarder().await?;
    }
    bench.publisher.close().await?;
    sqlx::raw_sql(&drop_tables()).execute(&bench.pool).await?;
    Ok(())
}

fn drop_tables() -> String {
    format!(
        "DROP TABLE IF EXISTS {PREFIX}messages, {PREFIX}groups, {PREFIX}pending, {PREFIX}inbox, \
         {RAW}, {RAW_GROUPS};"
    )
}

/// Drops the tables of earlier runs and creates the raw side's (Tidemill's are created by
/// its first `connect`).
async fn reset_tables(pool: &PgPool) -> Result<(), BoxError> {
    sqlx::raw_sql(&format!(
        r#"{drop}
CREATE TABLE {RAW} (
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
CREATE INDEX {RAW}_position ON {RAW} (topic, "offset");
CREATE TABLE {RAW_GROUPS} (
    topic TEXT NOT NULL,
    consumer_group TEXT NOT NULL,
    "offset" BIGINT NOT NULL,
    PRIMARY KEY (topic, consumer_group)
);"#,
        drop = drop_tables()
    ))
    .execute(pool)
    .await?;
    Ok(())
}

struct Bench {
    url: String,
    /// The raw side's pool (also used for untimed bookkeeping).
    pool: PgPool,
    publisher: SqlPublisher,
    n: usize,
    rounds: usize,
    /// Rows already in each pub/sub topic, behind the consumer group's start.
    backlog: usize,
}

/// The rows of one raw publish, made before the clock starts.
struct RawRows {
    uuids: Vec<String>,
    metadata: Vec<String>,
    payloads: Vec<Vec<u8>>,
}

impl RawRows {
    fn new(n: usize) -> Self {
        RawRows {
            uuids: (0..n)
                .map(|_| tidemill_core::new_uuid().to_string())
                .collect(),
            metadata: vec!["{}".to_owned(); n],
            payloads: (0..n).map(|i| payload(i).to_vec()).collect(),
        }
    }
}

fn raw_insert() -> String {
    format!(
        "INSERT INTO {RAW} (topic, uuid, metadata, payload) \
         SELECT $1, t.u, t.m::jsonb, t.p FROM UNNEST($2::text[], $3::text[], $4::bytea[]) AS t(u, m, p)"
    )
}

fn raw_select() -> String {
    format!(
        "SELECT \"offset\", uuid, metadata::text AS metadata, payload FROM {RAW} \
         WHERE topic = $1 AND \"offset\" > $2 ORDER BY \"offset\" LIMIT $3"
    )
}

/// What a hand-written consumer makes of a row.
struct RawMessage {
    offset: i64,
    _uuid: Option<String>,
    _metadata: HashMap<String, String>,
    payload: Vec<u8>,
}

fn raw_message(row: &PgRow) -> Result<RawMessage, BoxError> {
    let metadata: String = row.try_get("metadata")?;
    Ok(RawMessage {
        offset: row.try_get("offset")?,
        _uuid: row.try_get("uuid")?,
        _metadata: serde_json::from_str(&metadata)?,
        payload: row.try_get("payload")?,
    })
}

/// Raw publish: one `INSERT … UNNEST` per batch of 1,000.
async fn raw_publish(pool: &PgPool, topic: &str, rows: &RawRows) -> Result<(), BoxError> {
    let sql = raw_insert();
    for start in (0..rows.uuids.len()).step_by(BATCH) {
        let end = (start + BATCH).min(rows.uuids.len());
        sqlx::query(&sql)
            .bind(topic)
            .bind(&rows.uuids[start..end])
            .bind(&rows.metadata[start..end])
            .bind(&rows.payloads[start..end])
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Tidemill publish: `publish` per batch of 1,000.
async fn tidemill_publish(
    publisher: &SqlPublisher,
    topic: &str,
    mut messages: Vec<Message>,
) -> Result<(), BoxError> {
    while !messages.is_empty() {
        let rest = messages.split_off(BATCH.min(messages.len()));
        publisher.publish(topic, messages).await?;
        messages = rest;
    }
    Ok(())
}

/// Runs `f` under a [`Clock`] (and [`LIMIT`]).
async fn timed<Fut>(n: usize, f: Fut) -> Result<Consumed, BoxError>
where
    Fut: std::future::Future<Output = Result<(), BoxError>>,
{
    let clock = Clock::start();
    tokio::time::timeout(LIMIT, f)
        .await
        .map_err(|_| format!("no end within {LIMIT:?}"))??;
    Ok(clock.stop(n))
}

/// Prints the medians of `runs` (one row per round, one column per variant, the first the
/// baseline) and records them as rows of `group`.
fn report(group: &str, names: &[&str], runs: &[Vec<Consumed>], n: usize) {
    let rounds = runs.len();
    println!(
        "{group}: median of {rounds} rounds, {n} x {PAYLOAD} B      msg/s   ÷ {} (median per round)   CPU µs/msg   peak RSS MiB",
        names[0]
    );
    for (at, name) in names.iter().enumerate() {
        let rate = median(&runs.iter().map(|r| r[at].rate).collect::<Vec<_>>());
        let ratio = median(
            &runs
                .iter()
                .map(|r| r[at].rate / r[0].rate)
                .collect::<Vec<_>>(),
        );
        let cpu = median(
            &runs
                .iter()
                .map(|r| r[at].cpu_us.unwrap_or(f64::NAN))
                .collect::<Vec<_>>(),
        );
        let rss = runs.iter().filter_map(|r| r[at].rss).max();
        println!(
            "  {name:<52} {rate:>9.0}   {ratio:>5.2}   {cpu:>7.1}   {}",
            mib(rss)
        );
        let mut note = format!("{cpu:.1} µs CPU/msg; median of {rounds} rounds");
        if at > 0 {
            note.push_str(&format!(
                "; median per-round ratio to {} {ratio:.2}",
                names[0]
            ));
        }
        record(
            &Row::new(group, *name, rate)
                .with_peak_rss(rss)
                .with_note(note),
        );
    }
    println!();
}

fn cpu(c: &Consumed) -> f64 {
    c.cpu_us.unwrap_or(f64::NAN)
}

impl Bench {
    /// Deletes what a round left in both sides' tables (untimed).
    async fn clean(&self, topics: &[&str]) -> Result<(), BoxError> {
        for table in [
            format!("{PREFIX}messages"),
            format!("{PREFIX}pending"),
            format!("{PREFIX}groups"),
            RAW.to_owned(),
            RAW_GROUPS.to_owned(),
        ] {
            sqlx::query(&format!("DELETE FROM {table} WHERE topic = ANY($1)"))
                .bind(topics)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Returns once `group` has no unacked row of `topic` left in the pending table
    /// (polled every millisecond).
    async fn wait_acked(&self, topic: &str, group: &str) -> Result<(), BoxError> {
        let pending = format!(
            "SELECT count(*) FROM {PREFIX}pending WHERE topic = $1 AND consumer_group = $2 \
             AND NOT done"
        );
        loop {
            let left: i64 = sqlx::query_scalar(&pending)
                .bind(topic)
                .bind(group)
                .fetch_one(&self.pool)
                .await?;
            if left == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    // ---- Pub/sub section ----

    async fn pubsub(&self) -> Result<(), BoxError> {
        let n = self.n;
        println!();
        println!("pub/sub section: publish in batches of {BATCH}; consume with prefetch {PREFETCH}, each message committed before the next");
        if self.backlog > 0 {
            println!(
                "  each topic holds {} messages before the group's start",
                self.backlog
            );
        }
        let subscriber = SqlSubscriber::connect(config(&self.url, PREFETCH)).await?;
        // Creates groups at the end of a topic (behind the backlog).
        let at_end = SqlSubscriber::connect(SqlConfig {
            start_from: StartFrom::New,
            ..config(&self.url, PREFETCH)
        })
        .await?;
        let (mut publish, mut consume) = (Vec::new(), Vec::new());
        for round in 1..=self.rounds {
            let (r, t) = if round % 2 == 1 {
                let r = self.raw_round().await?;
                (r, self.tidemill_round(&subscriber, &at_end).await?)
            } else {
                let t = self.tidemill_round(&subscriber, &at_end).await?;
                (self.raw_round().await?, t)
            };
            println!(
                "  round {round}: publish raw {:>7.0} tidemill {:>7.0} msg/s | consume raw {:>6.0} tidemill {:>6.0} msg/s | CPU µs/msg publish {:.1}/{:.1} consume {:.1}/{:.1}",
                r[0].rate, t[0].rate, r[1].rate, t[1].rate, cpu(&r[0]), cpu(&t[0]), cpu(&r[1]), cpu(&t[1])
            );
            publish.push(vec![r[0], t[0]]);
            consume.push(vec![r[1], t[1]]);
        }
        subscriber.close().await?;
        at_end.close().await?;
        println!();
        report(
            "postgres publish",
            &["raw sqlx (INSERT … UNNEST per 1,000)", "tidemill-sql"],
            &publish,
            n,
        );
        report(
            "postgres consume",
            &[
                "raw sqlx (SELECT 64, UPDATE position per message)",
                "tidemill-sql",
            ],
            &consume,
            n,
        );
        Ok(())
    }

    /// The raw side's publish and consume figures.
    async fn raw_round(&self) -> Result<[Consumed; 2], BoxError> {
        let (n, pool) = (self.n, &self.pool);
        let topic = unique("raw");
        if self.backlog > 0 {
            raw_publish(pool, &topic, &RawRows::new(self.backlog)).await?;
            sqlx::query(&format!(
                "INSERT INTO {RAW_GROUPS} (topic, consumer_group, \"offset\") \
                 SELECT $1, $2, max(\"offset\") FROM {RAW} WHERE topic = $1"
            ))
            .bind(&topic)
            .bind("g")
            .execute(pool)
            .await?;
        }
        let rows = RawRows::new(n);
        let publish = timed(n, raw_publish(pool, &topic, &rows)).await?;
        drop(rows);
        let consume = timed(n, async {
            sqlx::query(&format!(
                "INSERT INTO {RAW_GROUPS} (topic, consumer_group, \"offset\") VALUES ($1, $2, 0) \
                 ON CONFLICT DO NOTHING"
            ))
            .bind(&topic)
            .bind("g")
            .execute(pool)
            .await?;
            let mut last: i64 = sqlx::query_scalar(&format!(
                "SELECT \"offset\" FROM {RAW_GROUPS} WHERE topic = $1 AND consumer_group = $2"
            ))
            .bind(&topic)
            .bind("g")
            .fetch_one(pool)
            .await?;
            let (select, commit) = (
                raw_select(),
                format!(
                    "UPDATE {RAW_GROUPS} SET \"offset\" = $3 WHERE topic = $1 AND consumer_group = $2"
                ),
            );
            // The consumer's own connection (see the module docs for `RAW_VIA_POOL`).
            let mut held = if via_pool() {
                None
            } else {
                Some(pool.acquire().await?)
            };
            let mut done = 0;
            while done < n {
                let query = sqlx::query(&select)
                    .bind(&topic)
                    .bind(last)
                    .bind(PREFETCH as i64);
                let rows = match held.as_mut() {
                    Some(conn) => query.fetch_all(&mut **conn).await?,
                    None => query.fetch_all(pool).await?,
                };
                if rows.is_empty() {
                    return Err(format!("raw consume: nothing after offset {last}").into());
                }
                for row in rows {
                    let m = raw_message(&row)?;
                    std::hint::black_box(&m.payload);
                    last = m.offset;
                    let query = sqlx::query(&commit).bind(&topic).bind("g").bind(last);
                    match held.as_mut() {
                        Some(conn) => query.execute(&mut **conn).await?,
                        None => query.execute(pool).await?,
                    };
                    done += 1;
                }
            }
            Ok(())
        })
        .await?;
        self.clean(&[&topic]).await?;
        Ok([publish, consume])
    }

    /// Tidemill's publish and consume figures.
    async fn tidemill_round(
        &self,
        subscriber: &SqlSubscriber,
        at_end: &SqlSubscriber,
    ) -> Result<[Consumed; 2], BoxError> {
        let n = self.n;
        let topic = unique("tidemill");
        if self.backlog > 0 {
            let backlog = (0..self.backlog)
                .map(|i| Message::new(payload(i)))
                .collect();
            tidemill_publish(&self.publisher, &topic, backlog).await?;
            at_end
                .initialize(&topic, &SubscribeOptions::group("g"))
                .await?;
        }
        let messages: Vec<Message> = (0..n).map(|i| Message::new(payload(i))).collect();
        let publish = timed(n, tidemill_publish(&self.publisher, &topic, messages)).await?;
        let consume = timed(n, async {
            let mut stream = subscriber
                .subscribe(&topic, SubscribeOptions::group("g"))
                .await?;
            for _ in 0..n {
                let d = stream.next().await.ok_or("stream ended")??;
                std::hint::black_box(d.message().payload());
                d.ack().await?;
            }
            // Acks are booked: wait until the last ones are committed.
            self.wait_acked(&topic, "g").await
        })
        .await?;
        self.clean(&[&topic]).await?;
        Ok([publish, consume])
    }

    // ---- Batch section ----

    async fn batch(&self) -> Result<(), BoxError> {
        let n = self.n;
        println!();
        println!("batch section: {n} pre-published messages per variant, router prefetch {BATCH_PREFETCH}");
        let mut runs = Vec::new();
        for round in 0..self.rounds {
            let (raw_topic, topic) = (unique("raw-batch"), unique("batch"));
            raw_publish(&self.pool, &raw_topic, &RawRows::new(n)).await?;
            let messages: Vec<Message> = (0..n).map(|i| Message::new(payload(i))).collect();
            tidemill_publish(&self.publisher, &topic, messages).await?;
            let mut results = vec![Consumed::default(); 3];
            let mut order = [0, 1, 2];
            order.rotate_left(round % 3);
            for variant in order {
                results[variant] = match variant {
                    0 => self.raw_batches(&raw_topic).await?,
                    v => self.router(&topic, v == 2).await?,
                };
            }
            println!(
                "  round {}: raw batch {:>7.0} | single {:>7.0} | batch {:>7.0} msg/s | CPU µs/msg {:.1} / {:.1} / {:.1}",
                round + 1,
                results[0].rate,
                results[1].rate,
                results[2].rate,
                cpu(&results[0]),
                cpu(&results[1]),
                cpu(&results[2])
            );
            runs.push(results);
            self.clean(&[&raw_topic, &topic]).await?;
        }
        println!();
        report(
            "postgres batch consume",
            &[
                "raw sqlx (SELECT 500 + one DELETE of the 500)",
                "tidemill router, single-message handler",
                "tidemill router, batch(500, 50 ms)",
            ],
            &runs,
            n,
        );
        Ok(())
    }

    /// (a) raw sqlx: select 500, handle, delete the 500 in one statement.
    async fn raw_batches(&self, topic: &str) -> Result<Consumed, BoxError> {
        let (n, pool) = (self.n, &self.pool);
        timed(n, async {
            let select = raw_select();
            let delete = format!("DELETE FROM {RAW} WHERE topic = $1 AND \"offset\" = ANY($2)");
            let mut conn = pool.acquire().await?;
            let (mut last, mut done) = (0_i64, 0);
            while done < n {
                let rows = sqlx::query(&select)
                    .bind(topic)
                    .bind(last)
                    .bind(CONSUME_BATCH as i64)
                    .fetch_all(&mut *conn)
                    .await?;
                if rows.is_empty() {
                    return Err(format!("raw batch: nothing after offset {last}").into());
                }
                let mut offsets = Vec::with_capacity(rows.len());
                for row in &rows {
                    let m = raw_message(row)?;
                    std::hint::black_box(&m.payload);
                    offsets.push(m.offset);
                }
                handler_call().await;
                last = *offsets.last().expect("not empty");
                sqlx::query(&delete)
                    .bind(topic)
                    .bind(&offsets)
                    .execute(&mut *conn)
                    .await?;
                done += offsets.len();
            }
            Ok(())
        })
        .await
    }

    /// (b) and (c): the router, with a single-message handler or a batch handler.
    async fn router(&self, topic: &str, batch: bool) -> Result<Consumed, BoxError> {
        let n = self.n;
        let group = if batch { "batch" } else { "single" };
        let subscriber = SqlSubscriber::connect(config(&self.url, BATCH_PREFETCH)).await?;
        let router = Router::new();
        let counter = HandledCounter::new(n);
        let handler = router
            .add_handler("bench")
            .subscribe(subscriber, topic)
            .group(group);
        let c = counter.clone();
        if batch {
            handler
                .batch(CONSUME_BATCH, CONSUME_WAIT)
                .handler(move |msgs: Vec<Message>| {
                    let c = c.clone();
                    async move {
                        for m in &msgs {
                            std::hint::black_box(m.payload());
                        }
                        handler_call().await;
                        c.add(msgs.len());
                        HandlerResult::Ok(BatchResult::ok())
                    }
                })
                .await?;
        } else {
            handler
                .handler(move |m: Message| {
                    let c = c.clone();
                    async move {
                        std::hint::black_box(m.payload());
                        handler_call().await;
                        c.add(1);
                        HandlerResult::Ok(())
                    }
                })
                .await?;
        }
        let clock = Clock::start();
        let running = router.clone();
        let task = tokio::spawn(async move { running.run().await });
        let done = counter.done.notified();
        if counter.seen() < n {
            tokio::time::timeout(LIMIT, done).await.map_err(|_| {
                format!(
                    "router (batch: {batch}): stalled after {} of {n}",
                    counter.seen()
                )
            })?;
        }
        // Handled is not acked yet: wait for the group's last acks.
        self.wait_acked(topic, group).await?;
        let figures = clock.stop(n);
        router.close().await?;
        task.await??;
        Ok(figures)
    }

    // ---- Forwarder section ----

    async fn forwarder(&self) -> Result<(), BoxError> {
        let mut destinations: Vec<(&str, Arc<dyn Publisher>)> = Vec::new();
        match non_empty("TIDEMILL_NATS_URL") {
            Some(url) => {
                let mut config = tidemill_nats::NatsConfig::new(url);
                // Bench streams expire on the shared server.
                config.jetstream.max_age = Some(Duration::from_secs(3600));
                destinations.push((
                    "nats jetstream",
                    Arc::new(tidemill_nats::NatsPublisher::connect(config).await?),
                ));
            }
            None => eprintln!("SKIP forwarder → NATS: TIDEMILL_NATS_URL is not set"),
        }
        match non_empty("TIDEMILL_KAFKA_BROKERS") {
            Some(brokers) => destinations.push((
                "kafka",
                Arc::new(
                    tidemill_kafka::KafkaPublisher::connect(tidemill_kafka::KafkaConfig::new(
                        brokers,
                    ))
                    .await?,
                ),
            )),
            None => eprintln!("SKIP forwarder → Kafka: TIDEMILL_KAFKA_BROKERS is not set"),
        }
        for (name, destination) in destinations {
            println!();
            println!("forwarder section → {name}: {} messages, outbox transactions of {OUTBOX_TX}, {DEFAULT_CONCURRENCY} publishes in flight", self.n);
            let mut runs = Vec::new();
            for round in 0..self.rounds {
                let (d, f) = if round % 2 == 0 {
                    let d = self.direct(&destination).await?;
                    (d, self.forward(&destination).await?)
                } else {
                    let f = self.forward(&destination).await?;
                    (self.direct(&destination).await?, f)
                };
                println!(
                    "  round {}: direct {:>7.0} | forwarder {:>7.0} msg/s | CPU µs/msg {:.1} / {:.1}",
                    round + 1,
                    d.rate,
                    f.rate,
                    cpu(&d),
                    cpu(&f)
                );
                runs.push(vec![d, f]);
            }
            println!();
            report(
                &format!("postgres outbox → {name}"),
                &[
                    "direct publish (1 message per call, 16 in flight)",
                    "tidemill-sql Forwarder (outbox → destination)",
                ],
                &runs,
                self.n,
            );
            destination.close().await?;
        }
        Ok(())
    }

    /// The destination publisher on its own.
    async fn direct(&self, destination: &Arc<dyn Publisher>) -> Result<Consumed, BoxError> {
        let n = self.n;
        let topic = unique("direct");
        destination
            .publish(&topic, vec![Message::new("warm-up")])
            .await?;
        let counting = Counting::new(Arc::clone(destination), n);
        let messages: Vec<Message> = (0..n).map(|i| Message::new(payload(i))).collect();
        timed(n, async {
            futures::stream::iter(messages)
                .map(|m| counting.publish(&topic, vec![m]))
                .buffer_unordered(DEFAULT_CONCURRENCY)
                .try_for_each(|()| futures::future::ready(Ok(())))
                .await?;
            Ok(())
        })
        .await
    }

    /// Outbox → forwarder → destination.
    async fn forward(&self, destination: &Arc<dyn Publisher>) -> Result<Consumed, BoxError> {
        let n = self.n;
        let (outbox_topic, topic) = (unique("outbox"), unique("forwarded"));
        destination
            .publish(&topic, vec![Message::new("warm-up")])
            .await?;
        let outbox = Outbox::new(self.publisher.clone()).with_topic(outbox_topic.as_str());
        let messages: Vec<Message> = (0..n).map(|i| Message::new(payload(i))).collect();
        for chunk in messages.chunks(OUTBOX_TX) {
            let mut tx = outbox.pool().begin().await?;
            outbox.publish_in(&mut tx, &topic, chunk.to_vec()).await?;
            tx.commit().await?;
        }
        let counting = Arc::new(Counting::new(Arc::clone(destination), n));
        let router = Router::new();
        let subscriber = SqlSubscriber::connect(config(&self.url, PREFETCH)).await?;
        Forwarder::new(subscriber, outbox_topic.as_str(), counting.clone())
            .register(&router)
            .await?;
        let clock = Clock::start();
        let running = router.clone();
        let task = tokio::spawn(async move { running.run().await });
        let done = counting.counter.done.notified();
        if counting.counter.seen() < n {
            tokio::time::timeout(LIMIT, done).await.map_err(|_| {
                format!(
                    "forwarder: stalled after {} of {n}",
                    counting.counter.seen()
                )
            })?;
        }
        let figures = clock.stop(n);
        router.close().await?;
        task.await??;
        self.clean(&[&outbox_topic]).await?;
        Ok(figures)
    }
}

/// The destination publisher, counting confirmed messages.
struct Counting {
    inner: Arc<dyn Publisher>,
    counter: HandledCounter,
}

impl Counting {
    fn new(inner: Arc<dyn Publisher>, n: usize) -> Self {
        Counting {
            inner,
            counter: HandledCounter::new(n),
        }
    }
}

#[async_trait]
impl Publisher for Counting {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> tidemill_core::Result<()> {
        let k = messages.len();
        self.inner.publish(topic, messages).await?;
        self.counter.add(k);
        Ok(())
    }

    /// The destination is closed by the bench, not by the router.
    async fn close(&self) -> tidemill_core::Result<()> {
        Ok(())
    }

    fn connection_state(&self) -> ConnectionState {
        self.inner.connection_state()
    }
}
