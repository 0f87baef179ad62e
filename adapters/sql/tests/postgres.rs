//! What the PostgreSQL adapter promises beyond the conformance suite, against the server of
//! brokers (`TIDEMILL_POSTGRES_URL`): rows other programs inserted delivered as they are; a
//! row committed late by a long transaction never skipped; scheduled messages neither early
//! nor late; attempts counted in the database across subscribers; a dead consumer's
//! reservations taken over; private groups removed; and the errors (unreachable server,
//! wrong password, missing tables with schema creation off, oversized message).

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{have_server, ok, postgres_url, raw, test_config};
use futures::StreamExt;
use tidemill_core::{
    Delivery, DeliveryStream, Error, Message, Publisher, SubscribeOptions, Subscriber,
};
use tidemill_sql::{DeliverAt, SqlConfig, SqlPublisher, SqlRecord, SqlSubscriber, StartFrom};
use tidemill_testkit::unique_topic;

const LIMIT: Duration = Duration::from_secs(30);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn next(stream: &mut DeliveryStream, what: &str) -> Delivery {
    tokio::time::timeout(LIMIT, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {LIMIT:?}"))
        .unwrap_or_else(|| panic!("the stream ended before the {what}"))
        .unwrap_or_else(|e| panic!("stream error before the {what}: {e}"))
}

async fn connect() -> (SqlPublisher, SqlSubscriber) {
    let config = test_config(&postgres_url());
    (
        ok(
            SqlPublisher::connect(config.clone()).await,
            "connect publisher",
        ),
        ok(SqlSubscriber::connect(config).await, "connect subscriber"),
    )
}

#[test]
fn rows_other_programs_inserted_are_delivered_as_they_are() {
    if !have_server("rows_other_programs_inserted_are_delivered_as_they_are") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("sql_foreign");
        let (_p, s) = connect().await;
        let opts = SubscribeOptions::group("foreign");
        ok(s.initialize(&topic, &opts).await, "initialize");
        let pool = raw().await.expect("raw pool");
        // What a plain `psql` user might write: no uuid, metadata with numbers, objects
        // and nulls, a binary payload; then metadata that is not an object at all.
        sqlx::query(
            "INSERT INTO tidemill_messages (topic, metadata, payload) VALUES \
             ($1, '{\"n\": 1, \"s\": \"x\", \"o\": {\"a\": true}, \"z\": null}', '\\xff00fe'::bytea), \
             ($1, '[1, 2]', 'plain')",
        )
        .bind(&topic)
        .execute(&pool)
        .await
        .expect("insert");
        let mut stream = ok(s.subscribe(&topic, opts).await, "subscribe");

        // Both rows come in one fetch: the second is delivered before the first comes back.
        let first = next(&mut stream, "first foreign row").await;
        let msg = first.message();
        assert_eq!(msg.payload().as_ref(), &[0xff, 0x00, 0xfe]);
        assert_eq!(msg.metadata().get("n"), Some("1"));
        assert_eq!(msg.metadata().get("s"), Some("x"));
        assert_eq!(msg.metadata().get("o"), Some(r#"{"a":true}"#));
        assert_eq!(msg.metadata().get("z"), Some("null"));
        let record = SqlRecord::of(msg).expect("a record");
        assert!(!record.uuid_stored());
        assert_eq!(record.topic(), topic);
        let uuid = msg.uuid().to_owned();
        assert!(!uuid.is_empty());
        ok(first.nack().await, "nack");

        let second = next(&mut stream, "second foreign row").await;
        assert_eq!(second.message().payload().as_ref(), b"plain");
        assert_eq!(second.message().metadata().get("metadata"), Some("[1, 2]"));
        ok(second.ack().await, "ack");

        // The uuid derived for a row without one is the same on every delivery.
        let again = next(&mut stream, "redelivered foreign row").await;
        assert_eq!(again.message().uuid(), uuid);
        assert_eq!(again.attempt(), Some(2));
        ok(again.ack().await, "ack");
        sqlx::query("DELETE FROM tidemill_messages WHERE topic = $1")
            .bind(&topic)
            .execute(&pool)
            .await
            .expect("cleanup");
    });
}

#[test]
fn an_open_transaction_neither_holds_back_later_messages_nor_loses_its_own() {
    if !have_server("an_open_transaction_neither_holds_back_later_messages_nor_loses_its_own") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("sql_late_commit");
        let (p, s) = connect().await;
        let opts = SubscribeOptions::group("late");
        ok(s.initialize(&topic, &opts).await, "initialize");
        let mut stream = ok(s.subscribe(&topic, opts).await, "subscribe");
        // A transaction writes first (lower offset, older transaction id) and stays open.
        let mut tx = p.pool().begin().await.expect("begin");
        ok(
            p.publish_in(&mut tx, &topic, vec![Message::new("written first")])
                .await,
            "publish in transaction",
        );
        // Another session that wrote something elsewhere and idles in its transaction.
        let pool = raw().await.expect("raw pool");
        let mut idle = pool.begin().await.expect("begin");
        sqlx::query("SELECT pg_current_xact_id()")
            .execute(&mut *idle)
            .await
            .expect("take a transaction id");
        // Later messages are delivered while both stay open.
        ok(
            p.publish(&topic, vec![Message::new("committed first")])
                .await,
            "publish",
        );
        let b = next(
            &mut stream,
            "the message committed while transactions are open",
        )
        .await;
        assert_eq!(b.message().payload().as_ref(), b"committed first");
        ok(b.ack().await, "ack");
        // Connecting while a transaction holds rows of the tables neither waits for it nor
        // makes inserts wait (the schema is only created when missing).
        let (p2, _s2) = connect().await;
        ok(
            p2.publish(&unique_topic("sql_late_other"), vec![Message::new("other")])
                .await,
            "publish on a new connection",
        );
        // The row written first arrives once its transaction commits.
        tx.commit().await.expect("commit");
        let a = next(&mut stream, "the message committed last").await;
        assert_eq!(a.message().payload().as_ref(), b"written first");
        ok(a.ack().await, "ack");
        idle.rollback().await.expect("rollback");
        // Nothing came twice: the next message is one published now.
        ok(
            p.publish(&topic, vec![Message::new("sentinel")]).await,
            "publish",
        );
        let c = next(&mut stream, "sentinel").await;
        assert_eq!(c.message().payload().as_ref(), b"sentinel");
        ok(c.ack().await, "ack");
    });
}

#[test]
fn concurrent_transactions_deliver_exactly_what_committed() {
    if !have_server("concurrent_transactions_deliver_exactly_what_committed") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("sql_concurrent");
        let (p, s) = connect().await;
        let opts = SubscribeOptions::group("concurrent");
        ok(s.initialize(&topic, &opts).await, "initialize");
        let mut stream = ok(s.subscribe(&topic, opts).await, "subscribe");
        // 8 writers, 25 transactions each, 2 messages per transaction, every fifth rolled
        // back; commits interleave in every order while the subscription reads.
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let (p, topic) = (p.clone(), topic.clone());
                tokio::spawn(async move {
                    let mut committed = Vec::new();
                    for t in 0..25 {
                        let mut tx = p.pool().begin().await.expect("begin");
                        let batch: Vec<Message> = (0..2)
                            .map(|i| Message::new(format!("w{w}-t{t}-{i}")))
                            .collect();
                        p.publish_in(&mut tx, &topic, batch.clone())
                            .await
                            .expect("publish in");
                        tokio::task::yield_now().await;
                        if (w + t) % 5 == 0 {
                            tx.rollback().await.expect("rollback");
                        } else {
                            tx.commit().await.expect("commit");
                            committed.extend(batch.iter().map(|m| m.uuid().to_owned()));
                        }
                    }
                    committed
                })
            })
            .collect();
        let mut expected = std::collections::HashSet::new();
        for w in writers {
            expected.extend(w.await.expect("writer"));
        }
        let mut got = std::collections::HashSet::new();
        while got.len() < expected.len() {
            let d = next(&mut stream, "committed message").await;
            let uuid = d.message().uuid().to_owned();
            assert!(
                expected.contains(&uuid),
                "a rolled-back message arrived: {uuid}"
            );
            assert!(got.insert(uuid.clone()), "{uuid} arrived twice");
            ok(d.ack().await, "ack");
        }
        ok(
            p.publish(&topic, vec![Message::new("sentinel")]).await,
            "publish",
        );
        let last = next(&mut stream, "sentinel").await;
        assert_eq!(last.message().payload().as_ref(), b"sentinel");
        ok(last.ack().await, "ack");
    });
}

#[test]
fn a_rolled_back_write_is_never_delivered() {
    if !have_server("a_rolled_back_write_is_never_delivered") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("sql_rollback");
        let (p, s) = connect().await;
        let opts = SubscribeOptions::group("rollback");
        ok(s.initialize(&topic, &opts).await, "initialize");
        let mut tx = p.pool().begin().await.expect("begin");
        ok(
            p.publish_in(&mut tx, &topic, vec![Message::new("rolled back")])
                .await,
            "publish in transaction",
        );
        tx.rollback().await.expect("rollback");
        ok(
            p.publish(&topic, vec![Message::new("sentinel")]).await,
            "publish",
        );
        let mut stream = ok(s.subscribe(&topic, opts).await, "subscribe");
        let first = next(&mut stream, "first message").await;
        assert_eq!(first.message().payload().as_ref(), b"sentinel");
        ok(first.ack().await, "ack");
    });
}

#[test]
fn scheduled_messages_are_delivered_when_due_and_not_before() {
    if !have_server("scheduled_messages_are_delivered_when_due_and_not_before") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("sql_scheduled");
        let (p, s) = connect().await;
        let opts = SubscribeOptions::group("scheduled");
        ok(s.initialize(&topic, &opts).await, "initialize");
        let mut stream = ok(s.subscribe(&topic, opts).await, "subscribe");
        let delay = Duration::from_secs(2);
        let start = Instant::now();
        // Same key as the immediate message after it: a scheduled message does not hold
        // back the messages of its key while it waits for its time.
        ok(
            p.publish_at(
                &topic,
                vec![Message::new("after").with_key("k")],
                DeliverAt::After(delay),
            )
            .await,
            "publish after",
        );
        ok(
            p.publish_at(
                &topic,
                vec![Message::new("at").with_key("k2")],
                DeliverAt::At(SystemTime::now() + delay),
            )
            .await,
            "publish at",
        );
        ok(
            p.publish(&topic, vec![Message::new("now").with_key("k")])
                .await,
            "publish",
        );
        let published = Instant::now();
        let now = next(&mut stream, "immediate message").await;
        assert_eq!(now.message().payload().as_ref(), b"now");
        ok(now.ack().await, "ack");
        let mut due = Vec::new();
        for _ in 0..2 {
            let d = next(&mut stream, "scheduled message").await;
            let elapsed = start.elapsed();
            // The database computed the due time after `start` (same machine clock).
            assert!(
                elapsed >= delay - Duration::from_millis(20),
                "a scheduled message arrived {elapsed:?} after the publish, before its {delay:?}"
            );
            due.push(String::from_utf8_lossy(d.message().payload()).into_owned());
            ok(d.ack().await, "ack");
        }
        // Within a second of their time (the subscription sleeps until the next due row).
        let late = published.elapsed();
        assert!(
            late <= delay + Duration::from_secs(1),
            "scheduled messages took {late:?}, over a second after their {delay:?}"
        );
        due.sort();
        assert_eq!(due, ["after", "at"]);
    });
}

#[test]
fn attempts_are_counted_in_the_database_across_subscribers() {
    if !have_server("attempts_are_counted_in_the_database_across_subscribers") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("sql_attempts");
        let (p, s) = connect().await;
        let opts = SubscribeOptions::group("attempts");
        ok(s.initialize(&topic, &opts).await, "initialize");
        ok(p.publish(&topic, vec![Message::new("x")]).await, "publish");
        let mut stream = ok(s.subscribe(&topic, opts.clone()).await, "subscribe");
        for attempt in 1..=2 {
            let d = next(&mut stream, "delivery").await;
            assert_eq!(d.attempt(), Some(attempt));
            ok(d.nack().await, "nack");
        }
        // The subscription fetched it again (attempt 3) into its buffer; a buffered
        // message released at close does not count as an attempt.
        ok(s.close().await, "close");
        drop(stream);
        let (_, other) = connect().await;
        let mut stream = ok(other.subscribe(&topic, opts).await, "subscribe again");
        let d = next(&mut stream, "delivery to the new subscriber").await;
        assert_eq!(d.attempt(), Some(3));
        ok(d.ack().await, "ack");
    });
}

#[test]
fn a_dead_consumers_reservation_is_taken_over_when_its_lease_ran_out() {
    if !have_server("a_dead_consumers_reservation_is_taken_over_when_its_lease_ran_out") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("sql_takeover");
        let (p, s) = connect().await;
        let opts = SubscribeOptions::group("takeover");
        ok(s.initialize(&topic, &opts).await, "initialize");
        ok(p.publish(&topic, vec![Message::new("held")]).await, "publish");
        let pool = raw().await.expect("raw pool");
        // What a consumer that died holding the message leaves: a reservation of a consumer
        // that will never renew it. First, while its lease runs: nobody else gets it.
        sqlx::query(
                "WITH g AS (UPDATE tidemill_groups g SET transaction_id = m.transaction_id, \
                 \"offset\" = m.\"offset\" FROM tidemill_messages m \
                 WHERE g.topic = $1 AND g.consumer_group = 'takeover' AND m.topic = $1 \
                 RETURNING m.transaction_id, m.\"offset\") \
                 INSERT INTO tidemill_pending (topic, consumer_group, transaction_id, \"offset\", \
                 attempts, locked_by, lease_until) SELECT $1, 'takeover', transaction_id, \"offset\", \
                 1, 'dead-consumer', now() + interval '1 hour' FROM g",
        )
        .bind(&topic)
            .execute(&pool)
            .await
            .expect("reserve");
        let mut stream = ok(s.subscribe(&topic, opts).await, "subscribe");
        ok(
            p.publish(&topic, vec![Message::new("sentinel")]).await,
            "publish",
        );
        let first = next(&mut stream, "sentinel").await;
        assert_eq!(first.message().payload().as_ref(), b"sentinel");
        ok(first.ack().await, "ack");
        // The lease runs out: the group gets it, as its second attempt.
        sqlx::query(
            "UPDATE tidemill_pending SET lease_until = now() - interval '1 second' \
             WHERE topic = $1 AND locked_by = 'dead-consumer'",
        )
        .bind(&topic)
        .execute(&pool)
        .await
        .expect("expire");
        let taken = next(&mut stream, "taken over message").await;
        assert_eq!(taken.message().payload().as_ref(), b"held");
        assert_eq!(taken.attempt(), Some(2));
        ok(taken.ack().await, "ack");
    });
}

#[test]
fn private_groups_are_removed_when_their_subscription_ends() {
    if !have_server("private_groups_are_removed_when_their_subscription_ends") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("sql_private");
        let (p, s) = connect().await;
        let pool = raw().await.expect("raw pool");
        let groups = || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tidemill_groups WHERE topic = $1")
                .bind(&topic)
                .fetch_one(&pool)
                .await
                .expect("count")
        };
        let mut stream = ok(
            s.subscribe(&topic, SubscribeOptions::new()).await,
            "subscribe",
        );
        assert_eq!(groups().await, 1);
        ok(p.publish(&topic, vec![Message::new("x")]).await, "publish");
        let d = next(&mut stream, "message").await;
        ok(d.ack().await, "ack");
        drop(stream);
        let deadline = Instant::now() + LIMIT;
        while groups().await != 0 {
            assert!(
                Instant::now() < deadline,
                "the private group is still there"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM tidemill_pending WHERE topic = $1")
                .bind(&topic)
                .fetch_one(&pool)
                .await
                .expect("count");
        assert_eq!(pending, 0);
    });
}

#[test]
fn errors_name_what_went_wrong_without_the_password() {
    if !have_server("errors_name_what_went_wrong_without_the_password") {
        return;
    }
    runtime().block_on(async {
        // Unreachable: a port nothing listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let mut config = SqlConfig::new(format!("postgres://app:s3cr3t-pw@127.0.0.1:{port}/db"));
        config.connect_timeout = Duration::from_secs(2);
        let started = Instant::now();
        let err = SqlPublisher::connect(config.clone()).await.unwrap_err();
        let text = err.to_string();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert!(matches!(err, Error::Connect { .. }), "{text}");
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
        assert!(
            !text.contains("s3cr3t-pw") && !format!("{err:?}").contains("s3cr3t-pw"),
            "{text}"
        );
        assert!(!format!("{config:?}").contains("s3cr3t-pw"));

        // Wrong password.
        let url = postgres_url();
        let wrong = url.replacen("tidemill:tidemill@", "tidemill:not-the-pw@", 1);
        assert_ne!(
            wrong, url,
            "the test URL has the expected user and password"
        );
        let err = SqlSubscriber::connect(SqlConfig::new(wrong))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("127.0.0.1"), "{text}");
        assert!(text.contains("password authentication failed"), "{text}");
        assert!(
            !text.contains("not-the-pw") && !format!("{err:?}").contains("not-the-pw"),
            "{text}"
        );

        // Missing tables, creation off.
        let mut config = test_config(&url);
        config.table_prefix = "tidemill_never_created_".into();
        config.create_schema = false;
        let err = SqlPublisher::connect(config).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("tidemill_never_created_messages"), "{text}");
        assert!(text.contains("create_schema is off"), "{text}");

        // Tables of an earlier version (a column missing): named, not half-used.
        let pool = raw().await.expect("raw pool");
        let old = format!("tidemill_v0_{}_", std::process::id());
        sqlx::query(&format!("CREATE TABLE {old}groups (topic TEXT)"))
            .execute(&pool)
            .await
            .expect("create an old table");
        let mut config = test_config(&url);
        config.table_prefix = old.clone();
        let err = SqlSubscriber::connect(config).await.unwrap_err();
        for table in ["groups", "pending", "messages", "inbox"] {
            sqlx::query(&format!("DROP TABLE IF EXISTS {old}{table}"))
                .execute(&pool)
                .await
                .expect("drop");
        }
        let text = err.to_string();
        assert!(
            text.contains(&format!("{old}groups.ahead_transaction_id")),
            "{text}"
        );
        assert!(text.contains("earlier version"), "{text}");

        // Over the size limit.
        let mut config = test_config(&url);
        config.max_message_bytes = 1024;
        let p = ok(SqlPublisher::connect(config).await, "connect");
        let topic = unique_topic("sql_too_large");
        let big = Message::new(vec![b'x'; 2000]);
        let uuid = big.uuid().to_owned();
        let err = p.publish(&topic, vec![big]).await.unwrap_err();
        match &err {
            Error::MessageTooLarge {
                topic: t,
                uuid: u,
                limit,
                ..
            } => {
                assert_eq!((t, u, *limit), (&topic, &uuid, 1024));
            }
            other => panic!("expected MessageTooLarge, got {other}"),
        }

        // Bad table prefix: named.
        let mut config = test_config(&url);
        config.table_prefix = "drop table x;".into();
        let err = SqlPublisher::connect(config).await.unwrap_err();
        assert!(err.to_string().contains("table_prefix"), "{err}");
    });
}

/// A trigger on the messages table that drops rows (someone else's, e.g. a filter) makes
/// publishing fail naming the table, in the pool's transaction and in the caller's: a
/// message is never taken as published when it was not stored.
#[test]
fn a_row_dropped_by_a_trigger_fails_the_publish() {
    if !have_server("a_row_dropped_by_a_trigger_fails_the_publish") {
        return;
    }
    runtime().block_on(async {
        let prefix = format!("tidemill_trigger_{}_", std::process::id());
        let mut config = test_config(&postgres_url());
        config.table_prefix = prefix.clone();
        let p = ok(SqlPublisher::connect(config).await, "connect");
        let pool = raw().await.expect("raw pool");
        for sql in [
            format!(
                "CREATE FUNCTION {prefix}skip() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN IF NEW.payload = 'skip me'::bytea THEN RETURN NULL; END IF; \
                 RETURN NEW; END $$"
            ),
            format!(
                "CREATE TRIGGER {prefix}skip BEFORE INSERT ON {prefix}messages \
                 FOR EACH ROW EXECUTE FUNCTION {prefix}skip()"
            ),
        ] {
            sqlx::query(&sql).execute(&pool).await.expect("trigger");
        }
        let topic = unique_topic("sql_trigger");
        ok(
            p.publish(&topic, vec![Message::new("kept"), Message::new("also kept")])
                .await,
            "publish of rows the trigger keeps",
        );
        let err = p
            .publish(&topic, vec![Message::new("kept"), Message::new("skip me")])
            .await
            .expect_err("a dropped row fails the publish");
        let text = err.to_string();
        assert!(!err.is_transient(), "{text}");
        assert!(text.contains("stored 1 of 2"), "{text}");
        assert!(text.contains(&format!("{prefix}messages")), "{text}");
        assert!(text.contains(&topic), "{text}");
        let mut tx = pool.begin().await.expect("begin");
        let err = p
            .publish_in(&mut tx, &topic, vec![Message::new("skip me")])
            .await
            .expect_err("in the caller's transaction too");
        assert!(err.to_string().contains("stored 0 of 1"), "{err}");
        drop(tx);
        for sql in [
            format!("DROP TABLE IF EXISTS {prefix}messages, {prefix}groups, {prefix}pending, {prefix}inbox"),
            format!("DROP FUNCTION IF EXISTS {prefix}skip()"),
        ] {
            sqlx::query(&sql).execute(&pool).await.expect("clean up");
        }
    });
}

#[test]
fn start_from_beginning_gives_a_new_group_every_row() {
    if !have_server("start_from_beginning_gives_a_new_group_every_row") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("sql_beginning");
        let mut config = test_config(&postgres_url());
        config.start_from = StartFrom::Beginning;
        let p = ok(SqlPublisher::connect(config.clone()).await, "connect");
        let s = ok(SqlSubscriber::connect(config).await, "connect");
        let sent: Vec<Message> = (0..5).map(|i| Message::new(format!("m{i}"))).collect();
        ok(p.publish(&topic, sent).await, "publish");
        let mut stream = ok(
            s.subscribe(&topic, SubscribeOptions::group("late")).await,
            "subscribe",
        );
        for i in 0..5 {
            let d = next(&mut stream, "old message").await;
            assert_eq!(d.message().payload().as_ref(), format!("m{i}").as_bytes());
            ok(d.ack().await, "ack");
        }
    });
}

#[test]
fn retention_deletes_only_what_every_group_acked() {
    if !have_server("retention_deletes_only_what_every_group_acked") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("sql_retention");
        let mut config = test_config(&postgres_url());
        config.retention = Some(Duration::from_millis(500));
        let p = ok(SqlPublisher::connect(config.clone()).await, "connect");
        let s = ok(SqlSubscriber::connect(config).await, "connect");
        let (all, some) = (SubscribeOptions::group("acks-all"), SubscribeOptions::group("acks-one"));
        ok(s.initialize(&topic, &all).await, "initialize");
        ok(s.initialize(&topic, &some).await, "initialize");
        let sent: Vec<Message> = (0..3).map(|i| Message::new(format!("m{i}"))).collect();
        ok(p.publish(&topic, sent).await, "publish");
        let mut a = ok(s.subscribe(&topic, all).await, "subscribe");
        let mut b = ok(s.subscribe(&topic, some).await, "subscribe");
        for _ in 0..3 {
            ok(next(&mut a, "message").await.ack().await, "ack");
        }
        let first = next(&mut b, "message").await;
        assert_eq!(first.message().payload().as_ref(), b"m0");
        ok(first.ack().await, "ack");
        let _held = (next(&mut b, "message").await, next(&mut b, "message").await);
        let pool = raw().await.expect("raw pool");
        let left = || async {
            sqlx::query_scalar::<_, String>(
                "SELECT convert_from(payload, 'UTF8') FROM tidemill_messages WHERE topic = $1 ORDER BY \"offset\"",
            )
            .bind(&topic)
            .fetch_all(&pool)
            .await
            .expect("select")
        };
        let deadline = Instant::now() + LIMIT;
        while left().await.len() == 3 {
            assert!(Instant::now() < deadline, "nothing was deleted past the retention");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Only the message both groups acked; the ones the second group still holds stay.
        assert_eq!(left().await, ["m1", "m2"]);
    });
}

/// The group's pending rows not acked yet (done rows are acked ones the watermark has not
/// passed).
async fn unacked(pool: &sqlx::PgPool, topic: &str, group: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM tidemill_pending WHERE topic = $1 AND consumer_group = $2 \
         AND NOT done",
    )
    .bind(topic)
    .bind(group)
    .fetch_one(pool)
    .await
    .expect("count")
}

/// `ack()` books the ack with the subscription's settle task and returns, so a sequential
/// consumer's acks share statements; `close()` waits until they are written. The last ack's
/// statement is held up by a lock another transaction holds on its pending row: `ack()`
/// returns anyway, `close()` does not return before the lock is released, and once it
/// returns the group has no unacked row; a new subscriber of the group gets a sentinel
/// published afterwards as its first message.
#[test]
fn acks_booked_before_close_are_written_when_close_returns() {
    if !have_server("acks_booked_before_close_are_written_when_close_returns") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("sql_booked");
        let (p, s) = connect().await;
        let pool = raw().await.expect("raw pool");
        let opts = SubscribeOptions::group("booked");
        ok(s.initialize(&topic, &opts).await, "initialize");
        let sent: Vec<Message> = (0..300).map(|i| Message::new(format!("m{i}"))).collect();
        ok(p.publish(&topic, sent.clone()).await, "publish");
        let mut stream = ok(s.subscribe(&topic, opts.clone()).await, "subscribe");
        let (last, rest) = sent.split_last().expect("messages");
        for m in rest {
            let d = next(&mut stream, "next message").await;
            assert_eq!(d.message().uuid(), m.uuid(), "in order");
            ok(d.ack().await, "ack");
        }
        let d = next(&mut stream, "last message").await;
        assert_eq!(d.message().uuid(), last.uuid(), "in order");
        let mut lock = pool.begin().await.expect("begin");
        let locked: Vec<i64> = sqlx::query_scalar(
            "SELECT seq FROM tidemill_pending WHERE topic = $1 AND consumer_group = 'booked' \
             AND NOT done FOR UPDATE",
        )
        .bind(&topic)
        .fetch_all(&mut *lock)
        .await
        .expect("lock the unacked rows");
        assert!(!locked.is_empty(), "the last message's row is unacked");
        let acked = tokio::time::timeout(LIMIT, d.ack()).await;
        ok(
            acked.expect("ack() returns while its row is locked: it only books"),
            "ack",
        );
        let closing = tokio::spawn({
            let s = s.clone();
            async move { s.close().await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !closing.is_finished(),
            "close() returned while a booked ack could not be written yet"
        );
        lock.rollback().await.expect("release the lock");
        ok(closing.await.expect("close task"), "close");
        assert_eq!(
            unacked(&pool, &topic, "booked").await,
            0,
            "every ack booked before close() was written when it returned"
        );
        drop(stream);
        let (_, again) = connect().await;
        let mut stream = ok(again.subscribe(&topic, opts).await, "subscribe again");
        let sentinel = Message::new("sentinel");
        ok(p.publish(&topic, vec![sentinel.clone()]).await, "publish");
        let d = next(&mut stream, "sentinel").await;
        assert_eq!(
            d.message().uuid(),
            sentinel.uuid(),
            "no acked message came back"
        );
        ok(d.ack().await, "ack");
        ok(again.close().await, "close");
    });
}

/// A booked ack that cannot be written because the message's reservation went to another
/// consumer (its lease ran out) is not returned to the caller (`ack()` returned when it was
/// booked): it is logged, and the row stays with the consumer that holds it now. A nack is
/// awaited and says so.
#[test]
fn an_ack_after_the_lease_was_lost_leaves_the_message_to_its_new_holder() {
    if !have_server("an_ack_after_the_lease_was_lost_leaves_the_message_to_its_new_holder") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("sql_lost_lease");
        let (p, s) = connect().await;
        let opts = SubscribeOptions::group("lost");
        ok(s.initialize(&topic, &opts).await, "initialize");
        let sent = vec![Message::new("acked late"), Message::new("nacked late")];
        ok(p.publish(&topic, sent).await, "publish");
        let mut stream = ok(s.subscribe(&topic, opts).await, "subscribe");
        let (first, second) = (
            next(&mut stream, "first").await,
            next(&mut stream, "second").await,
        );
        let pool = raw().await.expect("raw pool");
        // What another member does once the lease ran out: it reserves the rows.
        sqlx::query(
            "UPDATE tidemill_pending SET locked_by = 'other-member', \
             lease_until = now() + interval '1 hour' WHERE topic = $1 AND consumer_group = 'lost'",
        )
        .bind(&topic)
        .execute(&pool)
        .await
        .expect("take over");
        ok(first.ack().await, "a booked ack returns Ok");
        assert!(
            second.nack().await.is_err(),
            "a nack waits for its statement and reports the lost reservation"
        );
        ok(s.close().await, "close");
        let holders: Vec<String> = sqlx::query_scalar(
            "SELECT locked_by FROM tidemill_pending WHERE topic = $1 AND consumer_group = 'lost' \
             AND NOT done ORDER BY seq",
        )
        .bind(&topic)
        .fetch_all(&pool)
        .await
        .expect("select");
        assert_eq!(
            holders,
            ["other-member", "other-member"],
            "both messages stay with their new holder"
        );
    });
}
