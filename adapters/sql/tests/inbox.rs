//! The transactional inbox against the PostgreSQL server of brokers
//! (`TIDEMILL_POSTGRES_URL`): one effect per message id and consumer, rollback of effect
//! and record on handler errors, concurrent deliveries of one id, retention cleanup,
//! outputs stored with the id and returned again for a redelivery (a failed publish loses
//! nothing), the inbox's own DDL and the upgrade of an earlier table, and runs through a
//! real router (SQL pub/sub and the in-memory broker).

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{features, have_server, SqlBackend};
use sqlx::PgPool;
use tidemill_core::{
    is_permanent, permanent, BoxError, HandlerResult, MemoryBroker, Message, Publisher, Router,
    RouterConfig,
};
use tidemill_sql::inbox::{Inbox, InboxConfig, InboxTx};
use tidemill_testkit::Backend;
use tower::{Service, ServiceExt};

/// The value of `r`, or a panic naming `what` and the error.
fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A business table of one test (dropped at the end) and a consumer name of its own.
struct Fixture {
    pool: PgPool,
    table: String,
    consumer: String,
}

impl Fixture {
    async fn new(test: &str) -> Fixture {
        let pool = ok(common::raw().await, "test pool");
        let id = uuid::Uuid::new_v4().simple().to_string();
        let table = format!("inbox_effects_{}", &id[..12]);
        sqlx::query(&format!(
            "CREATE TABLE {table} (message_uuid TEXT NOT NULL, note TEXT NOT NULL DEFAULT '')"
        ))
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("create {table}: {e}"));
        Fixture {
            pool,
            table,
            consumer: format!("{test}-{}", &id[..12]),
        }
    }

    /// An inbox for `consumer` with `config`, its table ensured.
    async fn inbox(&self, consumer: &str, config: InboxConfig) -> Inbox {
        let inbox = ok(
            Inbox::with_config(self.pool.clone(), consumer, config),
            "inbox",
        );
        ok(inbox.ensure_schema().await, "inbox schema");
        inbox
    }

    /// Rows of the business table (all, or for one uuid).
    async fn effects(&self, uuid: Option<&str>) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE $1::text IS NULL OR message_uuid = $1",
            self.table
        ))
        .bind(uuid)
        .fetch_one(&self.pool)
        .await
        .unwrap_or_else(|e| panic!("count effects: {e}"))
    }

    /// Ids recorded for `consumer`.
    async fn recorded(&self, consumer: &str) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT message_uuid FROM tidemill_inbox WHERE consumer = $1 ORDER BY message_uuid",
        )
        .bind(consumer)
        .fetch_all(&self.pool)
        .await
        .unwrap_or_else(|e| panic!("read the inbox: {e}"))
    }

    /// Drops the business table and this test's inbox rows.
    async fn finish(self) {
        let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {}", self.table))
            .execute(&self.pool)
            .await;
        let _ = sqlx::query("DELETE FROM tidemill_inbox WHERE consumer LIKE $1 || '%'")
            .bind(&self.consumer)
            .execute(&self.pool)
            .await;
        self.pool.close().await;
    }
}

/// Inserts the effect of `msg` into `table` in `tx`.
async fn write_effect(tx: &mut InboxTx, table: &str, msg: &Message) -> Result<(), BoxError> {
    sqlx::query(&format!(
        "INSERT INTO {table} (message_uuid, note) VALUES ($1, $2)"
    ))
    .bind(msg.uuid())
    .bind(String::from_utf8_lossy(msg.payload()).into_owned())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Waits (at most 30 s) until `done` holds; panics naming `what` otherwise.
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Router settings with a short redelivery delay.
fn quick_router() -> Router {
    Router::with_config(RouterConfig {
        redelivery: tidemill_core::Backoff::new(Duration::from_millis(20))
            .max_interval(Duration::from_millis(200)),
        ..RouterConfig::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_message_delivered_three_times_through_sql_pubsub_has_one_effect() {
    if !have_server("same_message_delivered_three_times_through_sql_pubsub_has_one_effect") {
        return;
    }
    let fx = Fixture::new("three").await;
    let inbox = fx.inbox(&fx.consumer, InboxConfig::default()).await;
    let backend = SqlBackend::restarting(features(), |_| {});
    let topic = format!("{}-orders", fx.consumer);
    let calls = Arc::new(AtomicU32::new(0));
    let router = quick_router();
    let table = fx.table.clone();
    let counted = calls.clone();
    ok(
        router
            .add_handler("projection")
            .subscribe(ok(backend.subscriber().await, "subscriber"), &topic)
            .group("projection")
            .service(inbox.handler(move |msg: Message, mut tx: InboxTx| {
                let table = table.clone();
                let calls = counted.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    write_effect(&mut tx, &table, &msg).await?;
                    HandlerResult::Ok((tx, ()))
                }
            }))
            .await,
        "add handler",
    );
    let running = router.clone();
    let run = tokio::spawn(async move { running.run().await });
    router.running().await;
    let publisher = ok(backend.publisher().await, "publisher");
    // The same message three times: what a redelivering broker (or a republishing
    // producer) does.
    for copy in 0..3 {
        ok(
            publisher
                .publish(
                    &topic,
                    vec![Message::with_uuid("order-1", format!("copy {copy}"))],
                )
                .await,
            "publish",
        );
    }
    wait_for("three deliveries settled", || {
        inbox.handled() + inbox.duplicates() == 3
    })
    .await;
    ok(router.close().await, "close");
    let _ = run.await;
    assert_eq!(fx.effects(None).await, 1, "one effect for three deliveries");
    assert_eq!(fx.effects(Some("order-1")).await, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(inbox.handled(), 1);
    assert_eq!(inbox.duplicates(), 2);
    assert_eq!(fx.recorded(&fx.consumer).await, vec!["order-1".to_owned()]);
    drop(backend);
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_error_after_the_effect_rolls_back_and_the_redelivery_commits_once() {
    if !have_server("handler_error_after_the_effect_rolls_back_and_the_redelivery_commits_once") {
        return;
    }
    let fx = Fixture::new("rollback").await;
    let inbox = fx.inbox(&fx.consumer, InboxConfig::default()).await;
    let broker = MemoryBroker::new();
    let router = quick_router();
    let calls = Arc::new(AtomicU32::new(0));
    let (table, counted) = (fx.table.clone(), calls.clone());
    ok(
        router
            .add_handler("projection")
            .subscribe(broker.subscriber(), "orders")
            .service(inbox.handler(move |msg: Message, mut tx: InboxTx| {
                let table = table.clone();
                let calls = counted.clone();
                async move {
                    let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    write_effect(&mut tx, &table, &msg).await?;
                    if call < 3 {
                        // After the effect, on purpose: it must roll back with the record.
                        return Err(format!("failure {call} after the effect").into());
                    }
                    HandlerResult::Ok((tx, ()))
                }
            }))
            .await,
        "add handler",
    );
    let running = router.clone();
    let run = tokio::spawn(async move { running.run().await });
    router.running().await;
    let publisher = broker.publisher();
    ok(
        publisher
            .publish_one("orders", Message::with_uuid("order-7", "placed"))
            .await,
        "publish",
    );
    wait_for("the third attempt committed", || inbox.handled() == 1).await;
    // A later copy of the same message: skipped.
    ok(
        publisher
            .publish_one("orders", Message::with_uuid("order-7", "placed again"))
            .await,
        "publish the copy",
    );
    wait_for("the copy skipped", || inbox.duplicates() == 1).await;
    ok(router.close().await, "close");
    let _ = run.await;
    assert_eq!(calls.load(Ordering::SeqCst), 3, "two failures, one success");
    assert_eq!(
        fx.effects(None).await,
        1,
        "the failed attempts' effects rolled back"
    );
    assert_eq!(fx.recorded(&fx.consumer).await, vec!["order-7".to_owned()]);
    fx.finish().await;
}

#[tokio::test]
async fn a_failed_handler_leaves_no_effect_and_no_record_and_errors_keep_their_kind() {
    if !have_server("a_failed_handler_leaves_no_effect_and_no_record_and_errors_keep_their_kind") {
        return;
    }
    let fx = Fixture::new("kinds").await;
    let inbox = fx.inbox(&fx.consumer, InboxConfig::default()).await;
    let table = fx.table.clone();
    let mut failing = inbox.handler(move |msg: Message, mut tx: InboxTx| {
        let table = table.clone();
        async move {
            write_effect(&mut tx, &table, &msg).await?;
            Err::<(InboxTx, ()), _>(permanent("bad order"))
        }
    });
    let err = failing
        .ready()
        .await
        .expect("ready")
        .call(Message::with_uuid("order-9", "x"))
        .await
        .expect_err("the handler failed");
    assert!(is_permanent(err.as_ref()), "still permanent: {err}");
    assert_eq!(fx.effects(None).await, 0, "effect rolled back");
    assert!(
        fx.recorded(&fx.consumer).await.is_empty(),
        "id not recorded"
    );
    // The redelivery runs the handler again, and commits.
    let table = fx.table.clone();
    let mut working = inbox.handler(move |msg: Message, mut tx: InboxTx| {
        let table = table.clone();
        async move {
            write_effect(&mut tx, &table, &msg).await?;
            HandlerResult::Ok((tx, Message::new("projected")))
        }
    });
    let out = working
        .ready()
        .await
        .expect("ready")
        .call(Message::with_uuid("order-9", "x"))
        .await
        .expect("handled");
    assert_eq!(out.len(), 1, "the output goes to the router");
    let again = working
        .call(Message::with_uuid("order-9", "x"))
        .await
        .expect("skipped");
    // The handler did not run again (one effect, below), yet the output comes back: the
    // one stored the first time, with the uuid `Message::new` generated then.
    assert_eq!(again, out, "a redelivery returns the stored output");
    assert_eq!(fx.effects(None).await, 1);
    assert_eq!(fx.recorded(&fx.consumer).await, vec!["order-9".to_owned()]);
    assert_eq!((inbox.handled(), inbox.duplicates()), (1, 1));
    fx.finish().await;
}

#[tokio::test]
async fn two_consumers_each_handle_the_same_uuid_once() {
    if !have_server("two_consumers_each_handle_the_same_uuid_once") {
        return;
    }
    let fx = Fixture::new("two").await;
    let first = fx
        .inbox(&format!("{}-a", fx.consumer), InboxConfig::default())
        .await;
    let second = fx
        .inbox(&format!("{}-b", fx.consumer), InboxConfig::default())
        .await;
    for inbox in [&first, &second] {
        let table = fx.table.clone();
        let mut service = inbox.handler(move |msg: Message, mut tx: InboxTx| {
            let table = table.clone();
            async move {
                write_effect(&mut tx, &table, &msg).await?;
                HandlerResult::Ok((tx, ()))
            }
        });
        for _ in 0..2 {
            service
                .ready()
                .await
                .expect("ready")
                .call(Message::with_uuid("shared-1", "x"))
                .await
                .expect("handled or skipped");
        }
    }
    assert_eq!(fx.effects(None).await, 2, "one effect per consumer");
    assert_eq!((first.handled(), first.duplicates()), (1, 1));
    assert_eq!((second.handled(), second.duplicates()), (1, 1));
    for inbox in [&first, &second] {
        assert_eq!(
            fx.recorded(inbox.consumer()).await,
            vec!["shared-1".to_owned()]
        );
    }
    fx.finish().await;
}

/// Two deliveries of one id at once: the second waits for the first's transaction.
async fn concurrent_delivery(first_commits: bool) {
    let fx = Fixture::new(if first_commits { "race-c" } else { "race-r" }).await;
    let inbox = fx.inbox(&fx.consumer, InboxConfig::default()).await;
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel::<u32>();
    let release = Arc::new(tokio::sync::Notify::new());
    let calls = Arc::new(AtomicU32::new(0));
    let (table, gate, counted) = (fx.table.clone(), release.clone(), calls.clone());
    let service = inbox.handler(move |msg: Message, mut tx: InboxTx| {
        let (table, gate, calls, entered) = (
            table.clone(),
            gate.clone(),
            counted.clone(),
            entered_tx.clone(),
        );
        async move {
            let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
            write_effect(&mut tx, &table, &msg).await?;
            let _ = entered.send(call);
            if call == 1 {
                gate.notified().await;
                if !first_commits {
                    return Err("the first delivery fails".into());
                }
            }
            HandlerResult::Ok((tx, ()))
        }
    });
    let mut one = service.clone();
    let first = tokio::spawn(async move { one.call(Message::with_uuid("race-1", "a")).await });
    assert_eq!(entered.recv().await, Some(1), "the first delivery runs");
    let mut two = service.clone();
    let second = tokio::spawn(async move { two.call(Message::with_uuid("race-1", "b")).await });
    // The second one's INSERT waits on the first one's uncommitted row.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "the second delivery waits");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    release.notify_one();
    let first = first.await.expect("first task");
    let second = second.await.expect("second task");
    if first_commits {
        first.expect("the first delivery commits");
        assert!(second.expect("skipped").is_empty());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the second one skipped");
        assert_eq!(inbox.duplicates(), 1);
    } else {
        assert!(first.is_err(), "the first delivery failed");
        second.expect("the second delivery runs and commits");
        assert_eq!(entered.recv().await, Some(2));
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the second one ran");
        assert_eq!(inbox.duplicates(), 0);
    }
    assert_eq!(inbox.handled(), 1);
    assert_eq!(fx.effects(None).await, 1);
    assert_eq!(fx.recorded(&fx.consumer).await, vec!["race-1".to_owned()]);
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_delivery_waits_and_skips_once_the_first_commits() {
    if !have_server("a_concurrent_delivery_waits_and_skips_once_the_first_commits") {
        return;
    }
    concurrent_delivery(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_delivery_waits_and_runs_once_the_first_rolls_back() {
    if !have_server("a_concurrent_delivery_waits_and_runs_once_the_first_rolls_back") {
        return;
    }
    concurrent_delivery(false).await;
}

/// Inserts an id handled `age` ago.
async fn insert_aged(pool: &PgPool, consumer: &str, uuid: &str, age: Duration) {
    sqlx::query(
        "INSERT INTO tidemill_inbox (consumer, message_uuid, handled_at) \
         VALUES ($1, $2, now() - $3::float8 * interval '1 second')",
    )
    .bind(consumer)
    .bind(uuid)
    .bind(age.as_secs_f64())
    .execute(pool)
    .await
    .unwrap_or_else(|e| panic!("insert an aged id: {e}"));
}

#[tokio::test]
async fn cleanup_removes_ids_older_than_the_retention_of_its_consumer_only() {
    if !have_server("cleanup_removes_ids_older_than_the_retention_of_its_consumer_only") {
        return;
    }
    let fx = Fixture::new("retention").await;
    let config = InboxConfig {
        retention: Duration::from_secs(3600),
        cleanup_interval: Duration::ZERO,
        ..InboxConfig::default()
    };
    let inbox = fx.inbox(&fx.consumer, config).await;
    let other = format!("{}-other", fx.consumer);
    let day = Duration::from_secs(24 * 3600);
    insert_aged(&fx.pool, &fx.consumer, "old-1", day).await;
    insert_aged(&fx.pool, &fx.consumer, "old-2", 2 * day).await;
    insert_aged(&fx.pool, &fx.consumer, "fresh", Duration::from_secs(60)).await;
    insert_aged(&fx.pool, &other, "old-other", day).await;
    // A fresh id recorded by the handler path.
    let table = fx.table.clone();
    let mut service = inbox.handler(move |msg: Message, mut tx: InboxTx| {
        let table = table.clone();
        async move {
            write_effect(&mut tx, &table, &msg).await?;
            HandlerResult::Ok((tx, ()))
        }
    });
    service
        .ready()
        .await
        .expect("ready")
        .call(Message::with_uuid("handled-now", "x"))
        .await
        .expect("handled");
    assert_eq!(ok(inbox.cleanup().await, "cleanup"), 2);
    assert_eq!(
        fx.recorded(&fx.consumer).await,
        vec!["fresh".to_owned(), "handled-now".to_owned()]
    );
    assert_eq!(
        fx.recorded(&other).await,
        vec!["old-other".to_owned()],
        "another consumer's ids are its own inbox's business"
    );
    // Past the retention, a redelivery is handled again.
    service
        .call(Message::with_uuid("old-1", "late redelivery"))
        .await
        .expect("handled");
    assert_eq!(fx.effects(Some("old-1")).await, 1);
    assert_eq!(ok(inbox.cleanup().await, "second cleanup"), 0);
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_path_starts_the_cleanup() {
    if !have_server("the_handler_path_starts_the_cleanup") {
        return;
    }
    let fx = Fixture::new("autoclean").await;
    let config = InboxConfig {
        retention: Duration::from_secs(3600),
        cleanup_interval: Duration::from_secs(3600),
        ..InboxConfig::default()
    };
    let inbox = fx.inbox(&fx.consumer, config).await;
    insert_aged(
        &fx.pool,
        &fx.consumer,
        "old",
        Duration::from_secs(24 * 3600),
    )
    .await;
    let table = fx.table.clone();
    let mut service = inbox.handler(move |msg: Message, mut tx: InboxTx| {
        let table = table.clone();
        async move {
            write_effect(&mut tx, &table, &msg).await?;
            HandlerResult::Ok((tx, ()))
        }
    });
    // The first message after the start triggers a cleanup (in a task of its own).
    service
        .ready()
        .await
        .expect("ready")
        .call(Message::with_uuid("new", "x"))
        .await
        .expect("handled");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while fx.recorded(&fx.consumer).await != vec!["new".to_owned()] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old id was not cleaned up: {:?}",
            fx.recorded(&fx.consumer).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fx.finish().await;
}

/// A publisher that fails its first publish (before the broker sees anything), then
/// publishes through `inner`: a publish that fails after the inbox committed.
struct FailFirst<P> {
    inner: P,
    attempts: Arc<AtomicU32>,
}

#[async_trait::async_trait]
impl<P: Publisher> Publisher for FailFirst<P> {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> tidemill_core::Result<()> {
        if self.attempts.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(tidemill_core::Error::transient(
                "fault-injection",
                topic,
                "publish",
                "the first publish fails on purpose",
            ));
        }
        self.inner.publish(topic, messages).await
    }

    async fn close(&self) -> tidemill_core::Result<()> {
        self.inner.close().await
    }
}

/// The parts an output keeps: uuid, payload, key and its metadata entries.
type Parts = (String, Vec<u8>, Option<Vec<u8>>, Vec<(String, String)>);

/// The [`Parts`] of `msg`.
fn parts(msg: &Message) -> Parts {
    (
        msg.uuid().to_owned(),
        msg.payload().to_vec(),
        msg.key().map(|k| k.to_vec()),
        msg.metadata()
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_whose_publish_failed_after_the_commit_are_published_by_the_redelivery() {
    if !have_server("outputs_whose_publish_failed_after_the_commit_are_published_by_the_redelivery")
    {
        return;
    }
    let fx = Fixture::new("outputs").await;
    let inbox = fx.inbox(&fx.consumer, InboxConfig::default()).await;
    let broker = MemoryBroker::new();
    let router = quick_router();
    let received = Arc::new(parking_lot::Mutex::new(Vec::<Message>::new()));
    let seen = received.clone();
    ok(
        router
            .add_handler("downstream")
            .subscribe(broker.subscriber(), "projected")
            .handler(move |msg: Message| {
                let seen = seen.clone();
                async move {
                    seen.lock().push(msg);
                    HandlerResult::Ok(())
                }
            })
            .await,
        "add downstream",
    );
    // What the handler returned, each time it ran.
    let returned = Arc::new(parking_lot::Mutex::new(Vec::<Message>::new()));
    let calls = Arc::new(AtomicU32::new(0));
    let publishes = Arc::new(AtomicU32::new(0));
    let (table, kept, counted) = (fx.table.clone(), returned.clone(), calls.clone());
    ok(
        router
            .add_handler("projection")
            .subscribe(broker.subscriber(), "orders")
            .publish(
                FailFirst {
                    inner: broker.publisher(),
                    attempts: publishes.clone(),
                },
                "projected",
            )
            .service(inbox.handler(move |msg: Message, mut tx: InboxTx| {
                let (table, kept, calls) = (table.clone(), kept.clone(), counted.clone());
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    write_effect(&mut tx, &table, &msg).await?;
                    let out = vec![
                        // A fresh uuid: generated once, stored, the same on every publish.
                        Message::new(&b"\x00binary\xff payload"[..])
                            .with_metadata("kind", "OrderProjected")
                            .with_metadata("order", msg.uuid())
                            .with_key(b"customer-\x017"),
                        Message::with_uuid(format!("{}-audit", msg.uuid()), ""),
                    ];
                    kept.lock().extend(out.iter().cloned());
                    HandlerResult::Ok((tx, out))
                }
            }))
            .await,
        "add projection",
    );
    let running = router.clone();
    let run = tokio::spawn(async move { running.run().await });
    router.running().await;
    ok(
        broker
            .publisher()
            .publish_one("orders", Message::with_uuid("order-3", "x"))
            .await,
        "publish",
    );
    // The first publish fails after the commit; the redelivery finds the id and returns
    // the stored outputs, which the second publish delivers.
    wait_for("the stored outputs published by the redelivery", || {
        received.lock().len() == 2
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(
        publishes.load(Ordering::SeqCst),
        2,
        "a failed publish, then one"
    );
    assert_eq!((inbox.handled(), inbox.duplicates()), (1, 1));
    let expected: Vec<_> = returned.lock().iter().map(parts).collect();
    assert_eq!(expected.len(), 2);
    let got: Vec<_> = received.lock().iter().map(parts).collect();
    for (want, got) in expected.iter().zip(&got) {
        assert_eq!(got.0, want.0, "same uuid");
        assert_eq!(got.1, want.1, "same payload");
        assert_eq!(got.2, want.2, "same key");
        for entry in &want.3 {
            assert!(
                got.3.contains(entry),
                "metadata {entry:?} kept: {:?}",
                got.3
            );
        }
    }
    // A later copy of the input (a lost ack, a republish): the outputs again, with the
    // same uuids, which downstream deduplication by uuid drops. Still one effect.
    ok(
        broker
            .publisher()
            .publish_one("orders", Message::with_uuid("order-3", "copy"))
            .await,
        "publish the copy",
    );
    wait_for("the copy's outputs", || received.lock().len() == 4).await;
    ok(router.close().await, "close");
    let _ = run.await;
    let uuids: Vec<String> = received
        .lock()
        .iter()
        .map(|m| m.uuid().to_owned())
        .collect();
    assert_eq!(uuids[2..], uuids[..2], "the copies have the same uuids");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the handler still ran once"
    );
    assert_eq!(fx.effects(None).await, 1, "one effect");
    assert_eq!(fx.recorded(&fx.consumer).await, vec!["order-3".to_owned()]);
    fx.finish().await;
}

#[tokio::test]
async fn a_duplicate_of_a_message_without_outputs_returns_none() {
    if !have_server("a_duplicate_of_a_message_without_outputs_returns_none") {
        return;
    }
    let fx = Fixture::new("no-outputs").await;
    let inbox = fx.inbox(&fx.consumer, InboxConfig::default()).await;
    let table = fx.table.clone();
    let mut service = inbox.handler(move |msg: Message, mut tx: InboxTx| {
        let table = table.clone();
        async move {
            write_effect(&mut tx, &table, &msg).await?;
            // Outputs that come to nothing: an empty list.
            HandlerResult::Ok((tx, Vec::<Message>::new()))
        }
    });
    for copy in 0..3 {
        let out = service
            .ready()
            .await
            .expect("ready")
            .call(Message::with_uuid("quiet-1", "x"))
            .await
            .unwrap_or_else(|e| panic!("copy {copy}: {e}"));
        assert!(out.is_empty(), "copy {copy} returned {out:?}");
    }
    assert_eq!((inbox.handled(), inbox.duplicates()), (1, 2));
    assert_eq!(fx.effects(None).await, 1);
    let stored: Option<Vec<u8>> = ok(
        sqlx::query_scalar(
            "SELECT outputs FROM tidemill_inbox WHERE consumer = $1 AND message_uuid = $2",
        )
        .bind(&fx.consumer)
        .bind("quiet-1")
        .fetch_one(&fx.pool)
        .await,
        "read the row",
    );
    assert_eq!(stored, None, "no outputs, NULL");
    fx.finish().await;
}

/// A table prefix of one test, and its tables dropped at the end.
struct Prefix(String);

impl Prefix {
    fn new(what: &str) -> Prefix {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Prefix(format!("tidemill_{what}{}_", &id[..10]))
    }

    /// Whether `<prefix><name>` (table or index) exists.
    async fn exists(&self, pool: &PgPool, name: &str) -> bool {
        let found: Option<String> = ok(
            sqlx::query_scalar("SELECT to_regclass($1)::text")
                .bind(format!("{}{name}", self.0))
                .fetch_one(pool)
                .await,
            "look the table up",
        );
        found.is_some()
    }

    /// An inbox table as the first version of the inbox created it (no `outputs`).
    async fn create_old_inbox(&self, pool: &PgPool) {
        ok(
            sqlx::raw_sql(&format!(
                "CREATE TABLE {p}inbox (consumer TEXT NOT NULL, message_uuid TEXT NOT NULL, \
                 handled_at TIMESTAMPTZ NOT NULL DEFAULT now(), \
                 PRIMARY KEY (consumer, message_uuid)); \
                 CREATE INDEX {p}inbox_handled_at ON {p}inbox (handled_at)",
                p = self.0
            ))
            .execute(pool)
            .await,
            "create an old inbox table",
        );
    }

    async fn drop(&self, pool: &PgPool) {
        let p = &self.0;
        let _ = sqlx::raw_sql(&format!(
            "DROP TABLE IF EXISTS {p}inbox, {p}messages, {p}groups, {p}pending"
        ))
        .execute(pool)
        .await;
    }
}

#[tokio::test]
async fn the_inbox_creates_its_own_table_and_index_only() {
    if !have_server("the_inbox_creates_its_own_table_and_index_only") {
        return;
    }
    let fx = Fixture::new("own-ddl").await;
    let prefix = Prefix::new("own");
    let config = InboxConfig {
        table_prefix: prefix.0.clone(),
        ..InboxConfig::default()
    };
    let inbox = fx.inbox(&fx.consumer, config).await;
    assert!(prefix.exists(&fx.pool, "inbox").await, "the inbox table");
    assert!(
        prefix.exists(&fx.pool, "inbox_handled_at").await,
        "its index"
    );
    for other in ["messages", "groups", "pending"] {
        assert!(
            !prefix.exists(&fx.pool, other).await,
            "no {other} table for an inbox"
        );
    }
    // And it works: outputs stored and returned again.
    let mut service = inbox.handler(|msg: Message, tx: InboxTx| async move {
        HandlerResult::Ok((tx, Message::with_uuid(format!("{}-out", msg.uuid()), "o")))
    });
    let first = ok(service.call(Message::with_uuid("m-1", "x")).await, "handle");
    let second = ok(service.call(Message::with_uuid("m-1", "x")).await, "again");
    assert_eq!(first, second);
    assert_eq!(second[0].uuid(), "m-1-out");
    prefix.drop(&fx.pool).await;
    fx.finish().await;
}

#[tokio::test]
async fn an_inbox_table_without_the_outputs_column_gets_it() {
    if !have_server("an_inbox_table_without_the_outputs_column_gets_it") {
        return;
    }
    let fx = Fixture::new("upgrade").await;
    let prefix = Prefix::new("old");
    prefix.create_old_inbox(&fx.pool).await;
    // An id the earlier version recorded.
    ok(
        sqlx::query(&format!(
            "INSERT INTO {}inbox (consumer, message_uuid) VALUES ($1, 'before')",
            prefix.0
        ))
        .bind(&fx.consumer)
        .execute(&fx.pool)
        .await,
        "record an old id",
    );
    // With create_schema off, the missing column is named, with the statement adding it.
    let strict = ok(
        Inbox::with_config(
            fx.pool.clone(),
            &fx.consumer,
            InboxConfig {
                table_prefix: prefix.0.clone(),
                create_schema: false,
                ..InboxConfig::default()
            },
        ),
        "strict inbox",
    );
    let err = strict.ensure_schema().await.expect_err("no outputs column");
    let text = err.to_string();
    assert!(
        text.contains("outputs") && text.contains(&format!("{}inbox", prefix.0)),
        "{text}"
    );
    assert!(
        text.contains("ADD COLUMN IF NOT EXISTS outputs BYTEA"),
        "{text}"
    );
    // With it on (the default), the column is added and messages are handled.
    let config = InboxConfig {
        table_prefix: prefix.0.clone(),
        ..InboxConfig::default()
    };
    let inbox = fx.inbox(&fx.consumer, config).await;
    let column: Option<String> = ok(
        sqlx::query_scalar(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attname = 'outputs' AND NOT attisdropped",
        )
        .bind(format!("{}inbox", prefix.0))
        .fetch_optional(&fx.pool)
        .await,
        "look the column up",
    );
    assert_eq!(column.as_deref(), Some("bytea"));
    ok(
        strict.ensure_schema().await,
        "the strict inbox is satisfied now",
    );
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let mut service = inbox.handler(move |_msg: Message, tx: InboxTx| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move { HandlerResult::Ok((tx, Message::with_uuid("out", "o"))) }
    });
    // Handled by the earlier version: nothing stored, nothing returned.
    let before = ok(
        service.call(Message::with_uuid("before", "x")).await,
        "old id",
    );
    assert!(before.is_empty());
    let after = ok(
        service.call(Message::with_uuid("after", "x")).await,
        "new id",
    );
    let again = ok(service.call(Message::with_uuid("after", "x")).await, "copy");
    assert_eq!(after.len(), 1);
    assert_eq!(again, after, "the stored output");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the handler ran for `after` only"
    );
    prefix.drop(&fx.pool).await;
    fx.finish().await;
}

#[tokio::test]
async fn a_missing_table_with_schema_creation_off_is_named() {
    if !have_server("a_missing_table_with_schema_creation_off_is_named") {
        return;
    }
    let fx = Fixture::new("missing").await;
    let config = InboxConfig {
        table_prefix: "tidemill_absent_".into(),
        create_schema: false,
        ..InboxConfig::default()
    };
    let inbox = ok(
        Inbox::with_config(fx.pool.clone(), &fx.consumer, config),
        "inbox",
    );
    let err = inbox.ensure_schema().await.expect_err("no table");
    let text = err.to_string();
    assert!(text.contains("tidemill_absent_inbox"), "{text}");
    assert!(!text.contains("tidemill:tidemill@"), "no password: {text}");
    let mut service =
        inbox.handler(|_msg: Message, tx: InboxTx| async move { HandlerResult::Ok((tx, ())) });
    let err = service.call(Message::new("x")).await.expect_err("no table");
    assert!(is_permanent(err.as_ref()), "permanent: {err}");
    assert!(
        Inbox::new(fx.pool.clone(), " ").is_err(),
        "an empty consumer name"
    );
    fx.finish().await;
}
