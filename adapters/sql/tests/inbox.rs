//! The transactional inbox against the PostgreSQL server of brokers
//! (`TIDEMILL_POSTGRES_URL`): one effect per message id and consumer, rollback of effect
//! and record on handler errors, concurrent deliveries of one id, retention cleanup, and
//! runs through a real router (SQL pub/sub and the in-memory broker).

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
    assert!(again.is_empty(), "a skipped message publishes nothing");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_before_commit_through_the_router_publishes_and_commits_once() {
    if !have_server("publish_before_commit_through_the_router_publishes_and_commits_once") {
        return;
    }
    let fx = Fixture::new("outputs").await;
    let inbox = fx.inbox(&fx.consumer, InboxConfig::default()).await;
    let broker = MemoryBroker::new();
    let router = quick_router();
    let table = fx.table.clone();
    let projected = Arc::new(AtomicU32::new(0));
    let seen = projected.clone();
    ok(
        router
            .add_handler("downstream")
            .subscribe(broker.subscriber(), "projected")
            .handler(move |_msg: Message| {
                let seen = seen.clone();
                async move {
                    seen.fetch_add(1, Ordering::SeqCst);
                    HandlerResult::Ok(())
                }
            })
            .await,
        "add downstream",
    );
    ok(
        router
            .add_handler("projection")
            .subscribe(broker.subscriber(), "orders")
            .service(
                inbox
                    .handler(move |msg: Message, mut tx: InboxTx| {
                        let table = table.clone();
                        async move {
                            write_effect(&mut tx, &table, &msg).await?;
                            let out = Message::with_uuid(format!("{}-projected", msg.uuid()), "p");
                            HandlerResult::Ok((tx, out))
                        }
                    })
                    .publish_before_commit(broker.publisher(), "projected"),
            )
            .await,
        "add projection",
    );
    let running = router.clone();
    let run = tokio::spawn(async move { running.run().await });
    router.running().await;
    for _ in 0..2 {
        ok(
            broker
                .publisher()
                .publish_one("orders", Message::with_uuid("order-3", "x"))
                .await,
            "publish",
        );
    }
    wait_for("both copies settled and the output consumed", || {
        inbox.handled() + inbox.duplicates() == 2 && projected.load(Ordering::SeqCst) == 1
    })
    .await;
    ok(router.close().await, "close");
    let _ = run.await;
    assert_eq!(projected.load(Ordering::SeqCst), 1, "one output published");
    assert_eq!(fx.effects(None).await, 1);
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
