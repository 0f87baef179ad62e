//! What the Redis adapter promises beyond the conformance suite, against the Redis server of
//! brokers (`TIDEMILL_REDIS_URL`): entries other clients wrote (any field layout, binary
//! names and values, repeated fields, Watermill's layout) delivered with their fields kept;
//! a hop that changes nothing writing the producer's entry again; attempts counted by the
//! server when a dead consumer's entries are taken over; trimming; private groups deleted;
//! consumers that ended removed later; and the errors (unreachable server, oversized
//! message, missing stream with creation off).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{have_server, ok, raw, redis_url, test_config};
use futures::{FutureExt, StreamExt};
use redis::AsyncCommands;
use tidemill_core::headers::UUID_HEADER;
use tidemill_core::{
    Delivery, DeliveryStream, Error, Message, Publisher, SubscribeOptions, Subscriber,
};
use tidemill_redis::{RedisConfig, RedisPublisher, RedisRecord, RedisSubscriber};
use tidemill_testkit::fault_proxy::FaultProxy;
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

/// Every field-value pair of every entry of `stream`, oldest first.
async fn entries(stream: &str) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut conn = raw().await;
    let reply: redis::Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    let redis::Value::Array(items) = reply else {
        return Vec::new();
    };
    items
        .into_iter()
        .map(|item| {
            let redis::Value::Array(mut parts) = item else {
                panic!("entry shape")
            };
            let redis::Value::Array(flat) = parts.remove(1) else {
                panic!("fields shape")
            };
            flat.chunks(2)
                .map(|kv| match (&kv[0], &kv[1]) {
                    (redis::Value::BulkString(k), redis::Value::BulkString(v)) => {
                        (k.clone(), v.clone())
                    }
                    other => panic!("field shape {other:?}"),
                })
                .collect()
        })
        .collect()
}

async fn delete(streams: &[&str]) {
    let mut conn = raw().await;
    let _: () = conn.del(streams).await.expect("DEL");
}

#[test]
fn foreign_entries_are_delivered_with_their_fields() {
    if !have_server("foreign_entries_are_delivered_with_their_fields") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("redis_foreign");
        let config = test_config(&redis_url());
        let s = ok(RedisSubscriber::connect(config.clone()).await, "connect");
        let opts = SubscribeOptions::group("foreign");
        ok(s.initialize(&topic, &opts).await, "initialize");
        let mut conn = raw().await;
        // What plain clients write: no payload field; a binary payload with a binary field
        // name and value; a repeated field; Watermill's layout.
        let written: Vec<Vec<(&[u8], &[u8])>> = vec![
            vec![(b"name", b"alice"), (b"age", b"7")],
            vec![
                (b"payload", b"\x00\xffbin"),
                (b"\xfeodd", b"v"),
                (b"trace", b"\xff\x01"),
            ],
            vec![(b"tag", b"a"), (b"tag", b"b"), (b"payload", b"p")],
            vec![
                (b"_watermill_message_uuid", b"wm-7"),
                (b"payload", b"from go"),
                (b"metadata", b"\x81\xa1k\xa1v"),
            ],
        ];
        let mut ids = Vec::new();
        for fields in &written {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&topic).arg("*");
            for (k, v) in fields {
                cmd.arg(*k).arg(*v);
            }
            let id: String = cmd.query_async(&mut conn).await.expect("XADD");
            ids.push(id);
        }
        let mut stream = ok(s.subscribe(&topic, opts).await, "subscribe");
        // The first delivery is nacked once: its redelivery has the same uuid (derived from
        // the entry id) and the server's count.
        let mut got: Vec<Message> = Vec::new();
        let mut nacked: Option<String> = None;
        while got.len() < written.len() {
            let d = next(&mut stream, "a foreign entry").await;
            let uuid = d.message().uuid().to_owned();
            match &nacked {
                None => {
                    nacked = Some(uuid);
                    assert_eq!(d.attempt(), Some(1));
                    d.nack().await.expect("nack");
                    continue;
                }
                Some(n) if *n == uuid => assert_eq!(d.attempt(), Some(2), "the redelivery"),
                Some(_) => assert_eq!(d.attempt(), Some(1)),
            }
            got.push(d.message().clone());
            d.ack().await.expect("ack");
        }
        got.sort_by_key(|m| {
            ids.iter()
                .position(|id| RedisRecord::of(m).unwrap().id() == id)
        });
        // 1: no payload field: empty payload, fields as metadata, a stable derived uuid.
        assert!(got[0].payload().is_empty());
        assert_eq!(got[0].metadata().get("name"), Some("alice"));
        assert_eq!(got[0].metadata().get("age"), Some("7"));
        assert_eq!(got[0].uuid().len(), 36, "a uuid: {}", got[0].uuid());
        // 2: binary payload; binary value as name.b64; a non-UTF-8 name shown lossily.
        assert_eq!(got[1].payload().as_ref(), b"\x00\xffbin");
        assert_eq!(got[1].metadata().get("trace.b64"), Some("/wE="));
        assert_eq!(got[1].metadata().get("\u{fffd}odd"), Some("v"));
        // 3: a repeated field shows its last value; the record has both.
        assert_eq!(got[2].metadata().get("tag"), Some("b"));
        assert_eq!(got[2].payload().as_ref(), b"p");
        // 4: Watermill's uuid field is the uuid; its msgpack metadata is kept as bytes.
        assert_eq!(got[3].uuid(), "wm-7");
        assert_eq!(got[3].metadata().get("metadata.b64"), Some("gaFroXY="));
        let uuids: HashSet<&str> = got.iter().map(|m| m.uuid()).collect();
        assert_eq!(uuids.len(), 4, "distinct uuids");
        for (m, fields) in got.iter().zip(&written) {
            let record = RedisRecord::of(m).expect("a record");
            assert_eq!(record.stream(), topic);
            let kept: Vec<(&[u8], &[u8])> = record
                .fields()
                .iter()
                .map(|(k, v)| (&k[..], &v[..]))
                .collect();
            assert_eq!(&kept, fields, "every field as written");
            assert!(record.timestamp().is_some());
        }
        ok(s.close().await, "close");
        delete(&[&topic]).await;
    });
}

#[test]
fn a_hop_that_changes_nothing_writes_the_producers_entry() {
    if !have_server("a_hop_that_changes_nothing_writes_the_producers_entry") {
        return;
    }
    runtime().block_on(async {
        let (from, to) = (unique_topic("redis_hop_from"), unique_topic("redis_hop_to"));
        let config = test_config(&redis_url());
        let s = ok(RedisSubscriber::connect(config.clone()).await, "connect");
        let p = ok(RedisPublisher::connect(config.clone()).await, "connect");
        let opts = SubscribeOptions::group("hop");
        ok(s.initialize(&from, &opts).await, "initialize");
        let mut conn = raw().await;
        let _: String = redis::cmd("XADD")
            .arg(&from)
            .arg("*")
            .arg("b")
            .arg(&b"\xff"[..])
            .arg("a")
            .arg("1")
            .arg("a")
            .arg("2")
            .arg("payload")
            .arg("body")
            .query_async(&mut conn)
            .await
            .expect("XADD");
        let mut stream = ok(s.subscribe(&from, opts).await, "subscribe");
        let d = next(&mut stream, "the foreign entry").await;
        let message = d.message().clone();
        ok(p.publish(&to, vec![message.clone()]).await, "publish");
        d.ack().await.expect("ack");
        let mut changed = message.clone();
        changed.metadata_mut().set("a", "3");
        changed.metadata_mut().set("added", "x");
        ok(p.publish(&to, vec![changed]).await, "publish");
        let written = entries(&to).await;
        let uuid = message.uuid().as_bytes().to_vec();
        let f = |k: &[u8], v: &[u8]| (k.to_vec(), v.to_vec());
        assert_eq!(
            written[0],
            vec![
                f(UUID_HEADER.as_bytes(), &uuid),
                f(b"b", b"\xff"),
                f(b"a", b"1"),
                f(b"a", b"2"),
                f(b"payload", b"body"),
            ],
            "unchanged: the producer's fields in order, plus the uuid"
        );
        assert_eq!(
            written[1],
            vec![
                f(UUID_HEADER.as_bytes(), &uuid),
                f(b"b", b"\xff"),
                f(b"a", b"3"),
                f(b"payload", b"body"),
                f(b"added", b"x"),
            ],
            "changed: only what the handler changed"
        );
        ok(s.close().await, "close");
        delete(&[&from, &to]).await;
    });
}

#[test]
fn a_dead_consumers_entries_are_taken_over_with_the_servers_count() {
    if !have_server("a_dead_consumers_entries_are_taken_over_with_the_servers_count") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("redis_takeover");
        let mut config = test_config(&redis_url());
        config.claim_idle = Duration::from_millis(300);
        config.claim_interval = Duration::from_millis(100);
        let p = ok(RedisPublisher::connect(config.clone()).await, "connect");
        ok(p.retain_for(&topic, "workers").await, "retain_for");
        let sent = Message::new("work").with_metadata("n", 1);
        ok(p.publish(&topic, vec![sent.clone()]).await, "publish");
        // Another process's consumer reads it and dies without acking. The entry is idle from
        // that read on, so nothing may take it over before `claim_idle` has passed since.
        let mut conn = raw().await;
        let read_at = Instant::now();
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("workers")
            .arg("crashed")
            .arg("COUNT")
            .arg(10)
            .arg("STREAMS")
            .arg(&topic)
            .arg(">")
            .query_async(&mut conn)
            .await
            .expect("XREADGROUP");
        let s = ok(RedisSubscriber::connect(config.clone()).await, "connect");
        let mut stream = ok(
            s.subscribe(&topic, SubscribeOptions::group("workers"))
                .await,
            "subscribe",
        );
        let d = next(&mut stream, "the dead consumer's message").await;
        assert_eq!(d.message().uuid(), sent.uuid());
        assert_eq!(d.message().metadata().get("n"), Some("1"));
        assert_eq!(
            d.attempt(),
            Some(2),
            "the server counted the first delivery"
        );
        assert!(
            read_at.elapsed() >= config.claim_idle,
            "not taken over before claim_idle"
        );
        d.ack().await.expect("ack");
        // The ack is booked; close() writes it.
        ok(s.close().await, "close");
        assert_eq!(pending(&topic, "workers").await, 0, "nothing pending");
        delete(&[&topic]).await;
    });
}

#[test]
fn streams_are_trimmed_to_about_max_len() {
    if !have_server("streams_are_trimmed_to_about_max_len") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("redis_trim");
        let mut config = test_config(&redis_url());
        config.max_len = Some(100);
        let p = ok(RedisPublisher::connect(config).await, "connect");
        for chunk in 0..10 {
            let batch: Vec<Message> = (0..100)
                .map(|i| Message::new(format!("{chunk}-{i}")))
                .collect();
            ok(p.publish(&topic, batch).await, "publish");
        }
        let mut conn = raw().await;
        let len: u64 = conn.xlen(&topic).await.expect("XLEN");
        // Approximate trimming removes whole nodes (100 entries by default).
        assert!(
            (100..=200).contains(&len),
            "about 100 entries kept, got {len}"
        );
        delete(&[&topic]).await;
    });
}

async fn groups(topic: &str) -> usize {
    let mut conn = raw().await;
    let reply: redis::Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(topic)
        .query_async(&mut conn)
        .await
        .expect("XINFO GROUPS");
    match reply {
        redis::Value::Array(groups) => groups.len(),
        other => panic!("XINFO GROUPS reply {other:?}"),
    }
}

#[test]
fn private_groups_are_deleted_when_the_subscription_ends() {
    if !have_server("private_groups_are_deleted_when_the_subscription_ends") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("redis_private");
        let config = test_config(&redis_url());
        let s = ok(RedisSubscriber::connect(config.clone()).await, "connect");
        let p = ok(RedisPublisher::connect(config).await, "connect");
        let mut a = ok(
            s.subscribe(&topic, SubscribeOptions::new()).await,
            "subscribe",
        );
        let token = tidemill_core::CancellationToken::new();
        let mut b = ok(
            s.subscribe(
                &topic,
                SubscribeOptions::new().with_cancellation(token.clone()),
            )
            .await,
            "subscribe",
        );
        assert_eq!(
            groups(&topic).await,
            2,
            "one private group per subscription"
        );
        ok(
            p.publish(&topic, vec![Message::new("both")]).await,
            "publish",
        );
        next(&mut a, "the message on a")
            .await
            .ack()
            .await
            .expect("ack");
        let held = next(&mut b, "the message on b").await;
        token.cancel();
        assert!(tokio::time::timeout(LIMIT, b.next())
            .await
            .expect("b ends")
            .is_none());
        // b's group goes once its task ended; a delivery held from it still settles.
        let deadline = Instant::now() + LIMIT;
        while groups(&topic).await != 1 {
            assert!(
                Instant::now() < deadline,
                "b's private group was not deleted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        held.ack()
            .await
            .expect("an ack after the group is gone succeeds");
        ok(s.close().await, "close");
        assert!(tokio::time::timeout(LIMIT, a.next())
            .await
            .expect("a ends")
            .is_none());
        assert_eq!(
            groups(&topic).await,
            0,
            "every private group deleted at close"
        );
        delete(&[&topic]).await;
    });
}

#[test]
fn consumers_of_ended_subscriptions_are_removed_later() {
    if !have_server("consumers_of_ended_subscriptions_are_removed_later") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("redis_consumers");
        let config = test_config(&redis_url());
        let p = ok(RedisPublisher::connect(config.clone()).await, "connect");
        for i in 0..2 {
            let s = ok(RedisSubscriber::connect(config.clone()).await, "connect");
            let mut stream = ok(
                s.subscribe(&topic, SubscribeOptions::group("g")).await,
                "subscribe",
            );
            ok(
                p.publish(&topic, vec![Message::new(format!("m{i}"))]).await,
                "publish",
            );
            next(&mut stream, "a message")
                .await
                .ack()
                .await
                .expect("ack");
            ok(s.close().await, "close");
        }
        let mut conn = raw().await;
        let names = |reply: redis::Value| -> Vec<String> {
            let redis::Value::Array(consumers) = reply else {
                panic!("XINFO CONSUMERS reply {reply:?}")
            };
            consumers
                .into_iter()
                .map(|c| {
                    let redis::Value::Array(fields) = c else {
                        panic!("consumer shape {c:?}")
                    };
                    match &fields[1] {
                        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                        other => panic!("name {other:?}"),
                    }
                })
                .collect()
        };
        let cmd = || {
            let mut c = redis::cmd("XINFO");
            c.arg("CONSUMERS").arg(&topic).arg("g");
            c
        };
        let ended = names(cmd().query_async(&mut conn).await.expect("XINFO"));
        assert_eq!(
            ended.len(),
            2,
            "two ended subscriptions left their consumers"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut config = config;
        config.consumer_expiry = Duration::from_millis(1);
        let s = ok(RedisSubscriber::connect(config.clone()).await, "connect");
        let _stream = ok(
            s.subscribe(&topic, SubscribeOptions::group("g")).await,
            "subscribe",
        );
        let now = names(cmd().query_async(&mut conn).await.expect("XINFO"));
        assert!(
            ended.iter().all(|e| !now.contains(e)),
            "the ended consumers {ended:?} are removed, left: {now:?}"
        );
        ok(s.close().await, "close");
        delete(&[&topic]).await;
    });
}

#[test]
fn errors_name_what_went_wrong() {
    if !have_server("errors_name_what_went_wrong") {
        return;
    }
    runtime().block_on(async {
        // Nothing listens on port 1: connecting fails within the timeout, naming the
        // address without the password.
        let mut config = RedisConfig::new("redis://app:hunter2@127.0.0.1:1/0");
        config.connect_timeout = Duration::from_secs(2);
        let started = Instant::now();
        let err = RedisPublisher::connect(config.clone()).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Connect { .. }), "{text}");
        assert!(
            text.contains("127.0.0.1:1") && text.contains("redis"),
            "{text}"
        );
        assert!(
            !text.contains("hunter2") && !format!("{err:?}").contains("hunter2"),
            "{text}"
        );
        let err = RedisSubscriber::connect(config).await.unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "within the timeout"
        );

        // Oversized: refused before sending, naming topic, size and limit.
        let topic = unique_topic("redis_big");
        let mut config = test_config(&redis_url());
        config.max_message_bytes = 1_000;
        let p = ok(RedisPublisher::connect(config.clone()).await, "connect");
        let err = p
            .publish(&topic, vec![Message::new(vec![7u8; 2_000])])
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::MessageTooLarge { limit: 1_000, .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&topic), "{err}");
        let mut conn = raw().await;
        let exists: bool = conn.exists(&topic).await.expect("EXISTS");
        assert!(!exists, "nothing was written");

        // Streams not created when creation is off.
        config.create_streams = false;
        let p = ok(RedisPublisher::connect(config.clone()).await, "connect");
        let err = p
            .publish(&topic, vec![Message::new("x")])
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains(&topic) && err.to_string().contains("create_streams"),
            "{err}"
        );
        let s = ok(RedisSubscriber::connect(config).await, "connect");
        let err = match s.subscribe(&topic, SubscribeOptions::group("g")).await {
            Ok(_) => panic!("subscribing to a missing stream with creation off must fail"),
            Err(e) => e,
        };
        assert!(
            err.to_string().contains(&topic) && err.to_string().contains("create_streams"),
            "{err}"
        );
        let exists: bool = conn.exists(&topic).await.expect("EXISTS");
        assert!(!exists, "no stream was created");
        ok(s.close().await, "close");
    });
}

#[test]
fn tls_with_a_private_ca() {
    let (Some(url), Some(ca)) = (
        std::env::var_os("TIDEMILL_REDIS_TLS_URL"),
        std::env::var_os("TIDEMILL_REDIS_TLS_CA"),
    ) else {
        eprintln!("SKIP tls_with_a_private_ca: TIDEMILL_REDIS_TLS_URL / _CA are not set");
        return;
    };
    runtime().block_on(async {
        let url = url.to_string_lossy().into_owned();
        let mut config = test_config(&url);
        config.tls_ca_file = Some(ca.into());
        let topic = unique_topic("redis_tls");
        let p = ok(
            RedisPublisher::connect(config.clone()).await,
            "connect over TLS",
        );
        let s = ok(
            RedisSubscriber::connect(config.clone()).await,
            "connect over TLS",
        );
        let mut stream = ok(
            s.subscribe(&topic, SubscribeOptions::group("tls")).await,
            "subscribe",
        );
        let sent = Message::new("secret").with_key("k");
        ok(p.publish(&topic, vec![sent.clone()]).await, "publish");
        let d = next(&mut stream, "the message over TLS").await;
        assert_eq!(d.message().uuid(), sent.uuid());
        assert_eq!(d.message().payload(), sent.payload());
        d.ack().await.expect("ack");
        ok(s.close().await, "close");

        // Without the CA, the system's roots do not trust the test certificate.
        let mut untrusted = test_config(&url);
        untrusted.connect_timeout = Duration::from_secs(3);
        let err = RedisPublisher::connect(untrusted).await.unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err}");
        assert!(err.to_string().contains("127.0.0.1"), "{err}");
        delete(&[&topic]).await;
    });
}

#[test]
fn an_abandoned_ack_or_nack_strands_nothing() {
    if !have_server("an_abandoned_ack_or_nack_strands_nothing") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("redis_abandoned");
        let mut config = test_config(&redis_url());
        config.claim_interval = Duration::from_millis(100);
        let p = ok(RedisPublisher::connect(config.clone()).await, "connect");
        let s = ok(RedisSubscriber::connect(config.clone()).await, "connect");
        let opts = SubscribeOptions::group("g");
        ok(s.initialize(&topic, &opts).await, "initialize");
        let sent: Vec<Message> = (0..3)
            .map(|i| Message::new(format!("m{i}")).with_key("k"))
            .collect();
        ok(p.publish(&topic, sent.clone()).await, "publish");
        let mut stream = ok(s.subscribe(&topic, opts).await, "subscribe");
        // An ack future given up after one poll (a timeout around it): the key is free.
        let first = next(&mut stream, "m0").await;
        assert_eq!(first.message().uuid(), sent[0].uuid());
        let _ = tokio::time::timeout(Duration::ZERO, first.ack()).await;
        // A nack future given up the same way: the message comes back.
        let second = next(&mut stream, "m1 after the abandoned ack").await;
        assert_eq!(second.message().uuid(), sent[1].uuid());
        let _ = tokio::time::timeout(Duration::ZERO, second.nack()).await;
        let again = next(&mut stream, "m1 again after the abandoned nack").await;
        assert_eq!(
            again.message().uuid(),
            sent[1].uuid(),
            "m1 before its successor"
        );
        again.ack().await.expect("ack");
        let third = next(&mut stream, "m2").await;
        assert_eq!(third.message().uuid(), sent[2].uuid());
        third.ack().await.expect("ack");
        ok(s.close().await, "close");
        delete(&[&topic]).await;
    });
}

/// Polls every future once, all in one poll of the calling task (so nothing they start can
/// finish in between), then awaits them all; their outputs in order.
async fn all_started_together(
    futures: Vec<futures::future::BoxFuture<'static, Result<(), Error>>>,
) -> Vec<Result<(), Error>> {
    let mut futures: Vec<_> = futures
        .into_iter()
        .map(futures::future::maybe_done)
        .collect();
    futures::future::poll_fn(|cx| {
        for f in futures.iter_mut() {
            let _ = f.poll_unpin(cx);
        }
        std::task::Poll::Ready(())
    })
    .await;
    let mut out = Vec::with_capacity(futures.len());
    for mut f in futures {
        (&mut f).await;
        out.push(std::pin::Pin::new(&mut f).take_output().expect("output"));
    }
    out
}

/// The `XACK`s of `stream` the server ran, as seen by `MONITOR`: the ids of each, until
/// `ids` ids were seen.
async fn xacks_seen(
    lines: &mut (impl futures::Stream<Item = String> + Unpin),
    stream: &str,
    ids: usize,
) -> Vec<usize> {
    let quoted = format!("\"XACK\" \"{stream}\"");
    let mut seen = Vec::new();
    while seen.iter().sum::<usize>() < ids {
        let line = tokio::time::timeout(LIMIT, lines.next())
            .await
            .unwrap_or_else(|_| {
                panic!("saw {seen:?} XACKs of {stream} within {LIMIT:?}, not {ids} ids")
            })
            .expect("monitor ended");
        if let Some(at) = line.find(&quoted) {
            // "XACK" "stream" "group" "id" ...: quoted words after the group.
            let words = line[at..].matches("\" \"").count() + 1;
            seen.push(words - 3);
        }
    }
    seen
}

#[test]
fn acks_booked_together_go_in_one_xack() {
    if !have_server("acks_booked_together_go_in_one_xack") {
        return;
    }
    // One thread: the subscription's ack writer runs only once the test's task waits, so
    // every ack below is booked before the writer takes the first.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        const N: usize = 500;
        const NACKED: usize = 7;
        let topic = unique_topic("redis_bulk_ack");
        let mut config = test_config(&redis_url());
        config.prefetch = 1000;
        let p = ok(RedisPublisher::connect(config.clone()).await, "connect");
        let s = ok(RedisSubscriber::connect(config.clone()).await, "connect");
        let opts = SubscribeOptions::group("g");
        ok(s.initialize(&topic, &opts).await, "initialize");
        let sent: Vec<Message> = (0..N).map(|i| Message::new(format!("m{i}"))).collect();
        ok(p.publish(&topic, sent.clone()).await, "publish");
        let mut stream = ok(s.subscribe(&topic, opts).await, "subscribe");
        let mut deliveries = Vec::with_capacity(N);
        for i in 0..N {
            deliveries.push(next(&mut stream, &format!("m{i}")).await);
        }
        let client = redis::Client::open(redis_url().as_str()).expect("url");
        let monitor = client.get_async_monitor().await.expect("MONITOR");
        let mut lines = Box::pin(monitor.into_on_message::<String>());
        // Everything acked at the same moment (one nacked among them), as a batch handler
        // settles its batch.
        let futures = deliveries
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                if i == NACKED {
                    d.nack().boxed()
                } else {
                    d.ack().boxed()
                }
            })
            .collect();
        for (i, result) in all_started_together(futures).await.into_iter().enumerate() {
            assert!(result.is_ok(), "settling m{i}: {result:?}");
        }
        let xacks = xacks_seen(&mut lines, &topic, N - 1).await;
        // The writer takes every booked ack at once.
        assert_eq!(xacks, vec![N - 1], "ids per XACK");
        // The nack was no ack: the message comes back, and nothing else does.
        let again = next(&mut stream, "the nacked message again").await;
        assert_eq!(again.message().uuid(), sent[NACKED].uuid());
        assert_eq!(again.attempt(), Some(2));
        again.ack().await.expect("ack");
        assert_eq!(xacks_seen(&mut lines, &topic, 1).await, vec![1]);
        let mut conn = raw().await;
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg(&topic)
            .arg("g")
            .query_async(&mut conn)
            .await
            .expect("XPENDING");
        let redis::Value::Array(summary) = pending else {
            panic!("XPENDING shape {pending:?}")
        };
        assert_eq!(
            summary.first(),
            Some(&redis::Value::Int(0)),
            "nothing pending"
        );
        ok(s.close().await, "close");
        delete(&[&topic]).await;
    });
}

/// The group's count of pending entries (`XPENDING` summary).
async fn pending(topic: &str, group: &str) -> i64 {
    let mut conn = raw().await;
    let reply: redis::Value = redis::cmd("XPENDING")
        .arg(topic)
        .arg(group)
        .query_async(&mut conn)
        .await
        .expect("XPENDING");
    match reply {
        redis::Value::Array(summary) => match summary.first() {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("XPENDING count shape {other:?}"),
        },
        other => panic!("XPENDING shape {other:?}"),
    }
}

#[test]
fn a_sequential_consumers_booked_acks_are_written_by_close() {
    if !have_server("a_sequential_consumers_booked_acks_are_written_by_close") {
        return;
    }
    runtime().block_on(async {
        const N: usize = 300;
        let topic = unique_topic("redis_booked_close");
        let config = test_config(&redis_url());
        let p = ok(RedisPublisher::connect(config.clone()).await, "connect");
        let s = ok(RedisSubscriber::connect(config.clone()).await, "connect");
        let opts = SubscribeOptions::group("g");
        ok(s.initialize(&topic, &opts).await, "initialize");
        let sent: Vec<Message> = (0..N)
            .map(|i| Message::new(format!("m{i}")).with_key(format!("k{}", i % 3)))
            .collect();
        ok(p.publish(&topic, sent.clone()).await, "publish");
        let mut stream = ok(s.subscribe(&topic, opts).await, "subscribe");
        // One by one, as a sequential handler: each ack returns once booked.
        for (i, m) in sent.iter().enumerate() {
            let d = next(&mut stream, &format!("m{i}")).await;
            assert_eq!(d.message().uuid(), m.uuid(), "m{i} in order");
            d.ack().await.expect("ack");
        }
        // At once: close() writes what is booked before it returns.
        ok(s.close().await, "close");
        drop(stream);
        assert_eq!(pending(&topic, "g").await, 0, "pending after close");
        ok(p.close().await, "close");
        delete(&[&topic]).await;
    });
}

#[test]
fn a_dropped_streams_booked_acks_are_written() {
    if !have_server("a_dropped_streams_booked_acks_are_written") {
        return;
    }
    runtime().block_on(async {
        const N: usize = 300;
        let topic = unique_topic("redis_booked_drop");
        let config = test_config(&redis_url());
        let p = ok(RedisPublisher::connect(config.clone()).await, "connect");
        let s = ok(RedisSubscriber::connect(config.clone()).await, "connect");
        let opts = SubscribeOptions::group("g");
        ok(s.initialize(&topic, &opts).await, "initialize");
        let sent: Vec<Message> = (0..N).map(|i| Message::new(format!("m{i}"))).collect();
        ok(p.publish(&topic, sent).await, "publish");
        let mut stream = ok(s.subscribe(&topic, opts.clone()).await, "subscribe");
        for i in 0..N {
            next(&mut stream, &format!("m{i}"))
                .await
                .ack()
                .await
                .expect("ack");
        }
        // The subscription ends with its stream; a new one of the group finds nothing:
        // everything acked was written, nothing was given back to be delivered again.
        drop(stream);
        ok(
            p.publish(&topic, vec![Message::new("last")]).await,
            "publish",
        );
        let mut again = ok(s.subscribe(&topic, opts).await, "subscribe again");
        let d = next(&mut again, "the message published after the drop").await;
        assert_eq!(
            d.message().payload().as_ref(),
            b"last",
            "only the new message"
        );
        d.ack().await.expect("ack");
        ok(s.close().await, "close");
        assert_eq!(pending(&topic, "g").await, 0, "pending after close");
        ok(p.close().await, "close");
        delete(&[&topic]).await;
    });
}

#[test]
fn close_waits_for_acks_booked_after_the_subscription_ended() {
    if !have_server("close_waits_for_acks_booked_after_the_subscription_ended") {
        return;
    }
    runtime().block_on(async {
        const N: usize = 50;
        let topic = unique_topic("redis_booked_late");
        let upstream = common::host_port(&redis_url());
        let proxy = FaultProxy::start(upstream.as_str())
            .await
            .expect("fault proxy");
        let proxied = test_config(&format!("redis://{}/0", proxy.addr()));
        let p = ok(
            RedisPublisher::connect(test_config(&redis_url())).await,
            "connect",
        );
        let s = ok(RedisSubscriber::connect(proxied).await, "connect");
        let opts = SubscribeOptions::group("g");
        ok(s.initialize(&topic, &opts).await, "initialize");
        let sent: Vec<Message> = (0..N).map(|i| Message::new(format!("m{i}"))).collect();
        ok(p.publish(&topic, sent).await, "publish");
        let mut stream = ok(s.subscribe(&topic, opts).await, "subscribe");
        let mut held = Vec::with_capacity(N);
        for i in 0..N {
            held.push(next(&mut stream, &format!("m{i}")).await);
        }
        // The subscription ends (its reading connection closes); its deliveries stay out.
        drop(stream);
        let started = Instant::now();
        while proxy.active_connections() > 1 {
            assert!(
                started.elapsed() < LIMIT,
                "the reading connection stayed open"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Acked while the connection hangs: booked, the XACK waits in the proxy.
        proxy.stall();
        for d in held {
            d.ack().await.expect("ack");
        }
        let proxy = std::sync::Arc::new(proxy);
        let resume = {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                proxy.resume();
            })
        };
        // close() returns only once the XACK got through.
        ok(s.close().await, "close");
        assert_eq!(pending(&topic, "g").await, 0, "pending after close");
        resume.await.expect("resume");
        ok(p.close().await, "close");
        delete(&[&topic]).await;
    });
}

#[test]
fn a_failed_xack_leaves_its_entries_pending_for_take_over() {
    if !have_server("a_failed_xack_leaves_its_entries_pending_for_take_over") {
        return;
    }
    runtime().block_on(async {
        let topic = unique_topic("redis_booked_ack_err");
        // A user of its own that may do everything but XACK: every ack's write fails.
        let user = format!("noack-{}", uuid::Uuid::new_v4().simple());
        let mut conn = raw().await;
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&user)
            .arg("on")
            .arg(">secret")
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .arg("-xack")
            .query_async(&mut conn)
            .await
            .expect("ACL SETUSER");
        let url = redis_url();
        let (scheme, rest) = url.split_once("://").expect("scheme");
        let mut no_ack = test_config(&format!("{scheme}://{user}:secret@{rest}"));
        no_ack.command_timeout = Duration::from_secs(2);
        let config = test_config(&url);
        let p = ok(RedisPublisher::connect(config.clone()).await, "connect");
        let s = ok(RedisSubscriber::connect(no_ack).await, "connect");
        let opts = SubscribeOptions::group("billing");
        ok(s.initialize(&topic, &opts).await, "initialize");
        let sent: Vec<Message> = (0..5).map(|i| Message::new(format!("m{i}"))).collect();
        ok(p.publish(&topic, sent.clone()).await, "publish");
        let mut stream = ok(s.subscribe(&topic, opts.clone()).await, "subscribe");
        for i in 0..5 {
            // Booked: the failure is the writer's to log, not the ack's.
            next(&mut stream, &format!("m{i}"))
                .await
                .ack()
                .await
                .expect("ack");
        }
        ok(s.close().await, "close");
        drop(stream);
        assert_eq!(pending(&topic, "billing").await, 5, "still pending");
        // Another subscriber of the group takes them over and they are delivered again.
        let mut taker = config.clone();
        taker.claim_idle = Duration::from_millis(200);
        taker.claim_interval = Duration::from_millis(100);
        let s2 = ok(RedisSubscriber::connect(taker).await, "connect");
        let mut stream = ok(s2.subscribe(&topic, opts).await, "subscribe");
        let mut seen = HashSet::new();
        while seen.len() < 5 {
            let d = next(&mut stream, "an entry whose ack was not written").await;
            assert!(d.attempt() >= Some(2), "delivered again: {:?}", d.attempt());
            seen.insert(d.message().uuid().to_owned());
            d.ack().await.expect("ack");
        }
        let expected: HashSet<_> = sent.iter().map(|m| m.uuid().to_owned()).collect();
        assert_eq!(seen, expected);
        ok(s2.close().await, "close");
        assert_eq!(pending(&topic, "billing").await, 0, "pending after close");
        let _: () = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&user)
            .query_async(&mut conn)
            .await
            .expect("ACL DELUSER");
        ok(p.close().await, "close");
        delete(&[&topic]).await;
    });
}
