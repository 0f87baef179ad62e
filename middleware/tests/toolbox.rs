//! Correlation id, throttle, circuit breaker, deduplicator, ignore-errors, instant-ack,
//! duplicator: what ends up where.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use parking_lot::Mutex;
use tidemill_core::{HandlerResult, MemoryBroker, Message, Publisher, Router};
use tidemill_middleware::{
    correlation_id, headers, CircuitBreaker, CircuitState, CorrelationId, DedupKey, Deduplicator,
    Duplicator, IgnoreErrors, InstantAck, MemoryDedupStore, Throttle,
};
use tokio::sync::{mpsc, Notify};

#[tokio::test]
async fn correlation_id_is_copied_to_every_output_and_starts_with_the_first_uuid() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    router.layer(CorrelationId::new());
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("split")
        .subscribe(broker.subscriber(), "in")
        .publish(broker.publisher(), "out")
        .handler(move |m: Message| {
            let tx = tx.clone();
            async move {
                tx.send(correlation_id(&m).map(str::to_owned)).unwrap();
                let own = Message::new("own").with_metadata(headers::CORRELATION_ID, "mine");
                HandlerResult::Ok(vec![Message::new("a"), Message::new("b"), own])
            }
        })
        .await
        .unwrap();
    let mut out = watch(&broker, "out").await;
    let _run = start(&router).await;
    let p = broker.publisher();
    p.publish_one(
        "in",
        Message::new("x").with_metadata(headers::CORRELATION_ID, "c-1"),
    )
    .await
    .unwrap();
    assert_eq!(recv(&mut rx).await.as_deref(), Some("c-1"));
    let mut outs = Vec::new();
    for _ in 0..3 {
        let m = next(&mut out).await;
        outs.push((text(&m), correlation_id(&m).map(str::to_owned)));
    }
    assert_eq!(
        outs,
        vec![
            ("a".into(), Some("c-1".into())),
            ("b".into(), Some("c-1".into())),
            ("own".into(), Some("mine".into()))
        ]
    );
    let origin = Message::new("no id");
    p.publish_one("in", origin.clone()).await.unwrap();
    assert_eq!(recv(&mut rx).await, None, "the input is left as it is");
    for _ in 0..2 {
        // A chain starts: the outputs carry the uuid of the message that began it.
        assert_eq!(correlation_id(&next(&mut out).await), Some(origin.uuid()));
    }
    assert_eq!(correlation_id(&next(&mut out).await), Some("mine"));
    router.close().await.unwrap();
}

#[tokio::test]
async fn correlation_id_under_a_custom_key() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    router
        .add_handler("h")
        .subscribe(broker.subscriber(), "in")
        .publish(broker.publisher(), "out")
        .layer(CorrelationId::key("x-request-id"))
        .handler(|_m: Message| async move { HandlerResult::Ok(Message::new("o")) })
        .await
        .unwrap();
    let mut out = watch(&broker, "out").await;
    let _run = start(&router).await;
    broker
        .publisher()
        .publish_one("in", Message::new("x").with_metadata("x-request-id", "r-9"))
        .await
        .unwrap();
    assert_eq!(
        next(&mut out).await.metadata().get("x-request-id"),
        Some("r-9")
    );
    router.close().await.unwrap();
}

/// Start times of every call, per handler.
type Starts = Arc<Mutex<Vec<(&'static str, tokio::time::Instant)>>>;

async fn throttled_router(
    broker: &MemoryBroker,
    throttle_a: Throttle,
    throttle_b: Throttle,
    starts: Starts,
) -> Router {
    let router = Router::new();
    for (name, throttle) in [("a", throttle_a), ("b", throttle_b)] {
        let s = starts.clone();
        router
            .add_handler(name)
            .subscribe(broker.subscriber(), name)
            .group(name)
            .layer(throttle)
            .handler(move |_m: Message| {
                s.lock().push((name, tokio::time::Instant::now()));
                async { HandlerResult::Ok(()) }
            })
            .await
            .unwrap();
    }
    router
}

/// The k-th call (in time order) cannot start before slot k of the throttle, and slot 0
/// is no earlier than `t0` (taken before publishing): call k starts at least k intervals
/// after `t0`. A lower bound only, so a slow machine cannot make it fail.
fn assert_spaced(what: &str, t0: tokio::time::Instant, starts: &mut [tokio::time::Instant]) {
    starts.sort();
    for (k, t) in starts.iter().enumerate() {
        let earliest = Duration::from_millis(50) * k as u32;
        assert!(
            *t - t0 >= earliest,
            "{what}: call {k} started {:?} after t0",
            *t - t0
        );
    }
}

#[tokio::test]
async fn a_shared_throttle_spaces_messages_of_all_handlers() {
    let broker = MemoryBroker::new();
    let starts: Starts = Arc::default();
    let shared = Throttle::new(20, Duration::from_secs(1)); // one every 50 ms
    let router = throttled_router(&broker, shared.clone(), shared, starts.clone()).await;
    let _run = start(&router).await;
    let p = broker.publisher();
    let t0 = tokio::time::Instant::now();
    for topic in ["a", "b"] {
        p.publish(topic, (0..4).map(|i| Message::new(i.to_string())).collect())
            .await
            .unwrap();
    }
    eventually("all handled", || starts.lock().len() == 8).await;
    let mut all: Vec<_> = starts.lock().iter().map(|(_, t)| *t).collect();
    assert_spaced("both handlers", t0, &mut all);
    router.close().await.unwrap();
}

#[tokio::test]
async fn a_per_handler_throttle_spaces_each_handler_on_its_own() {
    let broker = MemoryBroker::new();
    let starts: Starts = Arc::default();
    let per = Throttle::per_handler(20, Duration::from_secs(1));
    let router = throttled_router(&broker, per.clone(), per, starts.clone()).await;
    let _run = start(&router).await;
    let p = broker.publisher();
    let t0 = tokio::time::Instant::now();
    for topic in ["a", "b"] {
        p.publish(topic, (0..4).map(|i| Message::new(i.to_string())).collect())
            .await
            .unwrap();
    }
    eventually("all handled", || starts.lock().len() == 8).await;
    for name in ["a", "b"] {
        let mut mine: Vec<_> = starts
            .lock()
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .collect();
        assert_eq!(mine.len(), 4);
        assert_spaced(name, t0, &mut mine);
    }
    router.close().await.unwrap();
}

#[tokio::test]
async fn the_circuit_opens_nacks_while_open_and_closes_after_a_probe() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let breaker = CircuitBreaker::new(3, Duration::from_secs(2));
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = Arc::new(AtomicU32::new(0));
    let (c, h) = (calls.clone(), healthy.clone());
    router
        .add_handler("charge")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .layer(breaker.clone())
        .handler(move |_m: Message| {
            c.fetch_add(1, Ordering::SeqCst);
            let ok = h.load(Ordering::SeqCst);
            async move {
                if ok {
                    HandlerResult::Ok(())
                } else {
                    HandlerResult::<()>::Err("dependency down".into())
                }
            }
        })
        .await
        .unwrap();
    let _run = start(&router).await;
    broker
        .publisher()
        .publish("in", (0..5).map(|i| Message::new(i.to_string())).collect())
        .await
        .unwrap();
    eventually("the circuit opens", || {
        breaker.state() == CircuitState::Open
    })
    .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "opened after three failures"
    );
    // While open, messages are nacked with a delay without reaching the handler.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3, "no calls while open");
    assert_eq!(
        broker.group_backlog("in", "g"),
        Some(5),
        "nothing acked, nothing lost"
    );
    healthy.store(true, Ordering::SeqCst);
    eventually("every message handled after the probe", || {
        broker.group_backlog("in", "g") == Some(0)
    })
    .await;
    assert_eq!(breaker.state(), CircuitState::Closed);
    assert_eq!(calls.load(Ordering::SeqCst), 3 + 5);
    router.close().await.unwrap();
}

#[tokio::test]
async fn a_failed_probe_opens_the_circuit_again() {
    let breaker = CircuitBreaker::new(1, Duration::from_millis(100));
    let broker = MemoryBroker::new();
    let router = Router::new();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    router
        .add_handler("h")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .layer(breaker.clone())
        .handler(move |_m: Message| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    return HandlerResult::<()>::Err("down".into());
                }
                HandlerResult::Ok(())
            }
        })
        .await
        .unwrap();
    let _run = start(&router).await;
    broker
        .publisher()
        .publish_one("in", Message::new("x"))
        .await
        .unwrap();
    eventually("handled", || broker.group_backlog("in", "g") == Some(0)).await;
    // First call opened it; the probe failed and reopened it; the next probe succeeded.
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(breaker.state(), CircuitState::Closed);
    router.close().await.unwrap();
}

#[tokio::test]
async fn duplicates_are_acked_unhandled_and_counted() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let store = MemoryDedupStore::new(Duration::from_secs(60));
    let by_uuid = Deduplicator::new(store.clone());
    let by_hash = Deduplicator::new(store.clone()).key(DedupKey::PayloadHash);
    let by_key = Deduplicator::new(store).key(DedupKey::Metadata("idempotency-key".into()));
    let (tx, mut rx) = mpsc::unbounded_channel();
    for (name, dedup) in [("uuid", &by_uuid), ("hash", &by_hash), ("key", &by_key)] {
        let tx = tx.clone();
        router
            .add_handler(name)
            .subscribe(broker.subscriber(), name)
            .group("g")
            .layer(dedup.clone())
            .handler(move |m: Message| {
                let tx = tx.clone();
                async move {
                    tx.send((name, text(&m), attempt(&m))).unwrap();
                    if text(&m) == "fails-once" && attempt(&m) == 1 {
                        return Err("not yet".into());
                    }
                    HandlerResult::Ok(())
                }
            })
            .await
            .unwrap();
    }
    let _run = start(&router).await;
    let p = broker.publisher();
    let m = Message::new("one");
    p.publish("uuid", vec![m.clone(), m.clone(), Message::new("two")])
        .await
        .unwrap();
    p.publish(
        "hash",
        vec![
            Message::new("same"),
            Message::new("same"),
            Message::new("other"),
        ],
    )
    .await
    .unwrap();
    p.publish(
        "key",
        vec![
            Message::new("fails-once").with_metadata("idempotency-key", "k1"),
            Message::new("no key"),
            Message::new("no key"),
        ],
    )
    .await
    .unwrap();
    for topic in ["uuid", "hash", "key"] {
        eventually("acked", || broker.group_backlog(topic, "g") == Some(0)).await;
    }
    let mut calls = Vec::new();
    while let Ok(c) = rx.try_recv() {
        calls.push(c);
    }
    calls.sort();
    assert_eq!(
        calls,
        vec![
            ("hash", "other".into(), 1),
            ("hash", "same".into(), 1),
            // A failed message is not recorded: its redelivery is handled.
            ("key", "fails-once".into(), 1),
            ("key", "fails-once".into(), 2),
            // Without the key, no deduplication.
            ("key", "no key".into(), 1),
            ("key", "no key".into(), 1),
            ("uuid", "one".into(), 1),
            ("uuid", "two".into(), 1),
        ]
    );
    assert_eq!(
        (
            by_uuid.duplicates(),
            by_hash.duplicates(),
            by_key.duplicates()
        ),
        (1, 1, 0)
    );
    router.close().await.unwrap();
}

#[derive(Debug, thiserror::Error)]
#[error("already archived")]
struct AlreadyArchived;

#[tokio::test]
async fn ignored_errors_ack_and_others_nack() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let ignore = IgnoreErrors::new()
        .of_type::<AlreadyArchived>()
        .when(|e| e.to_string() == "gone");
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("h")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .layer(ignore.clone())
        .handler(move |m: Message| {
            let tx = tx.clone();
            async move {
                tx.send((text(&m), attempt(&m))).unwrap();
                let result: HandlerResult = match text(&m).as_str() {
                    // Wrapped: still found in the source chain.
                    "archived" => Err(Box::new(tidemill_core::Error::permanent(
                        "db",
                        "",
                        "archive",
                        AlreadyArchived,
                    ))),
                    "gone" => Err("gone".into()),
                    _ if attempt(&m) == 1 => Err("other".into()),
                    _ => Ok(()),
                };
                result
            }
        })
        .await
        .unwrap();
    let _run = start(&router).await;
    broker
        .publisher()
        .publish(
            "in",
            vec![
                Message::new("archived"),
                Message::new("gone"),
                Message::new("other"),
            ],
        )
        .await
        .unwrap();
    eventually("acked", || broker.group_backlog("in", "g") == Some(0)).await;
    let mut calls = Vec::new();
    while let Ok(c) = rx.try_recv() {
        calls.push(c);
    }
    calls.sort();
    assert_eq!(
        calls,
        vec![
            ("archived".into(), 1),
            ("gone".into(), 1),
            ("other".into(), 1),
            ("other".into(), 2)
        ]
    );
    assert_eq!(ignore.ignored(), 2);
    router.close().await.unwrap();
}

#[tokio::test]
async fn instant_ack_acks_before_the_handler_runs_and_never_redelivers() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let release = Arc::new(Notify::new());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let r = release.clone();
    router
        .add_handler("h")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .publish(broker.publisher(), "out")
        .layer(InstantAck::new())
        .handler(move |m: Message| {
            let (tx, r) = (tx.clone(), r.clone());
            async move {
                tx.send(text(&m)).unwrap();
                r.notified().await;
                if text(&m) == "fails" {
                    return Err("fails after the ack".into());
                }
                HandlerResult::Ok(Message::new(format!("out-{}", text(&m))))
            }
        })
        .await
        .unwrap();
    let mut out = watch(&broker, "out").await;
    let _run = start(&router).await;
    broker
        .publisher()
        .publish("in", vec![Message::new("fails"), Message::new("ok")])
        .await
        .unwrap();
    assert_eq!(recv(&mut rx).await, "fails");
    // The handler is still running, yet its input is acked already.
    eventually("acked before handling", || {
        broker.group_backlog("in", "g") == Some(1)
    })
    .await;
    release.notify_one();
    assert_eq!(recv(&mut rx).await, "ok");
    eventually("both acked", || broker.group_backlog("in", "g") == Some(0)).await;
    release.notify_one();
    assert_eq!(
        text(&next(&mut out).await),
        "out-ok",
        "outputs are still published"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.try_recv().is_err(), "the failed one is not redelivered");
    router.close().await.unwrap();
}

#[tokio::test]
async fn the_duplicator_runs_the_handler_twice() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    router
        .add_handler("h")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .publish(broker.publisher(), "out")
        .layer(Duplicator::new())
        .handler(move |m: Message| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move { HandlerResult::Ok(Message::new(format!("{}-{n}", text(&m)))) }
        })
        .await
        .unwrap();
    let mut out = watch(&broker, "out").await;
    let _run = start(&router).await;
    broker
        .publisher()
        .publish_one("in", Message::new("x"))
        .await
        .unwrap();
    assert_eq!(text(&next(&mut out).await), "x-0");
    assert_eq!(text(&next(&mut out).await), "x-1");
    eventually("acked", || broker.group_backlog("in", "g") == Some(0)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    quiet(&mut out).await;
    router.close().await.unwrap();
}
