//! Deduplicator: a message whose key was handled before is acked unhandled and counted; a
//! failed one is not recorded.

mod common;

use std::time::Duration;

use common::*;
use tidemill_core::{HandlerResult, MemoryBroker, Message, Publisher, Router};
use tidemill_middleware::{DedupKey, Deduplicator, MemoryDedupStore};
use tokio::sync::mpsc;

/// In every composition: the second copy of a uuid is acked without a call; a failure is
/// not recorded, so its redelivery is handled.
#[tokio::test(start_paused = true)]
async fn a_duplicate_is_acked_unhandled() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let dedup = Deduplicator::new(MemoryDedupStore::new(Duration::from_secs(60)));
        // One key: one at a time, in order, also with concurrency.
        let once = Message::new("once").with_key("k");
        let flaky = Message::new("flaky").with_key("k");
        let handler = TestHandler::new(|m, n| {
            if text(m) == "flaky" && n == 1 {
                return Err("not yet".into());
            }
            Ok(Vec::new())
        });
        let o = h
            .run(
                dedup.clone(),
                handler,
                vec![once.clone(), once.clone(), flaky.clone(), flaky.clone()],
            )
            .await;
        assert_eq!(o.settled(once.uuid()), vec![ack(), ack()], "{c:?}");
        assert_eq!(o.calls_of(once.uuid()).len(), 1, "{c:?}");
        // flaky: fails (not recorded), redelivered and handled; then its copy is a duplicate.
        assert_eq!(
            o.settled(flaky.uuid()),
            vec![nack("not yet"), ack(), ack()],
            "{c:?}"
        );
        assert_eq!(o.call_attempts(flaky.uuid()), vec![1, 2], "{c:?}");
        assert_eq!(dedup.duplicates(), 2, "{c:?}");
    }
}

#[tokio::test(start_paused = true)]
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
