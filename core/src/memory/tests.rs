use std::time::Duration;

use futures::StreamExt;

use super::*;
use crate::Delivery;

const WAIT: Duration = Duration::from_secs(10);

async fn next(stream: &mut DeliveryStream) -> Delivery {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a delivery within 10s")
        .expect("stream open")
        .expect("no stream error")
}

/// Asserts nothing arrives for a short while (a negative check that cannot flake).
async fn assert_quiet(stream: &mut DeliveryStream) {
    let got = tokio::time::timeout(Duration::from_millis(100), stream.next()).await;
    assert!(got.is_err(), "unexpected delivery: {got:?}");
}

fn payload(d: &Delivery) -> String {
    String::from_utf8(d.message().payload().to_vec()).unwrap()
}

#[tokio::test]
async fn same_key_waits_for_ack_and_nack_keeps_order() {
    let broker = MemoryBroker::new();
    let mut s = broker
        .subscriber()
        .subscribe("t", SubscribeOptions::new())
        .await
        .unwrap();
    let p = broker.publisher();
    p.publish(
        "t",
        vec![
            Message::new("a1").with_key("a"),
            Message::new("a2").with_key("a"),
            Message::new("b1").with_key("b"),
        ],
    )
    .await
    .unwrap();
    let a1 = next(&mut s).await;
    assert_eq!(payload(&a1), "a1");
    assert_eq!(a1.attempt(), Some(1));
    let b1 = next(&mut s).await;
    assert_eq!(payload(&b1), "b1", "other keys flow while a1 is in flight");
    assert_quiet(&mut s).await;
    a1.nack().await.unwrap();
    let again = next(&mut s).await;
    assert_eq!(
        payload(&again),
        "a1",
        "a nacked message comes back before a2"
    );
    assert_eq!(again.attempt(), Some(2));
    again.ack().await.unwrap();
    let a2 = next(&mut s).await;
    assert_eq!(payload(&a2), "a2");
    assert_eq!(a2.attempt(), Some(1));
    a2.ack().await.unwrap();
    b1.ack().await.unwrap();
}

#[tokio::test]
async fn dropped_delivery_is_redelivered() {
    let broker = MemoryBroker::new();
    let mut s = broker
        .subscriber()
        .subscribe("t", SubscribeOptions::group("g"))
        .await
        .unwrap();
    broker
        .publisher()
        .publish_one("t", Message::with_uuid("m1", "x"))
        .await
        .unwrap();
    drop(next(&mut s).await);
    let d = next(&mut s).await;
    assert_eq!(d.message().uuid(), "m1");
    assert_eq!(d.attempt(), Some(2));
    d.ack().await.unwrap();
    assert_eq!(broker.group_backlog("t", "g"), Some(0));
}

#[tokio::test]
async fn nack_with_delay_redelivers_after_the_delay() {
    let broker = MemoryBroker::new();
    let mut s = broker
        .subscriber()
        .subscribe("t", SubscribeOptions::new())
        .await
        .unwrap();
    broker
        .publisher()
        .publish_one("t", Message::new("x"))
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    next(&mut s)
        .await
        .nack_with_delay(Duration::from_millis(200))
        .await
        .unwrap();
    let d = next(&mut s).await;
    // tokio's timers may fire up to a millisecond early as `Instant` measures it.
    assert!(start.elapsed() >= Duration::from_millis(195));
    assert_eq!(d.attempt(), Some(2));
}

#[tokio::test]
async fn full_queue_makes_publishers_wait() {
    let broker = MemoryBroker::with_config(MemoryConfig {
        capacity: 4,
        retention: 0,
    });
    let mut s = broker
        .subscriber()
        .subscribe("t", SubscribeOptions::new())
        .await
        .unwrap();
    let p = broker.publisher();
    let msgs: Vec<Message> = (0..10).map(|i| Message::new(format!("{i}"))).collect();
    let publishing = tokio::spawn(async move { p.publish("t", msgs).await });
    // Hold four deliveries unacked: the queue is full, so the publisher must be waiting.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(next(&mut s).await);
    }
    assert_quiet(&mut s).await;
    assert!(!publishing.is_finished());
    for d in held {
        d.ack().await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 4..10 {
        let d = next(&mut s).await;
        got.push(payload(&d));
        d.ack().await.unwrap();
    }
    assert_eq!(got, ["4", "5", "6", "7", "8", "9"]);
    publishing.await.unwrap().unwrap();
}

#[tokio::test]
async fn retention_replays_to_new_subscriptions() {
    let broker = MemoryBroker::with_config(MemoryConfig {
        capacity: 100,
        retention: 3,
    });
    let p = broker.publisher();
    for i in 0..5 {
        p.publish_one("t", Message::new(format!("{i}")))
            .await
            .unwrap();
    }
    let mut s = broker
        .subscriber()
        .subscribe("t", SubscribeOptions::new())
        .await
        .unwrap();
    for want in ["2", "3", "4"] {
        let d = next(&mut s).await;
        assert_eq!(payload(&d), want);
        d.ack().await.unwrap();
    }
}

#[tokio::test]
async fn retention_does_not_keep_a_mandatory_publish() {
    let broker = MemoryBroker::with_config(MemoryConfig {
        capacity: 100,
        retention: 3,
    });
    let p = broker.publisher();
    let batch: Vec<Message> = (0..5).map(|i| Message::new(format!("{i}"))).collect();
    // The ring would keep only the last 3 (and later publishes push those out too).
    let err = p.publish_mandatory("t", batch.clone()).await.unwrap_err();
    assert!(
        matches!(&err, Error::Unroutable { uuid, .. } if uuid == batch[0].uuid()),
        "{err}"
    );
    // A group made to keep the topic's messages receives them all.
    p.retain_for("t", "g").await.unwrap();
    p.publish_mandatory("t", batch.clone()).await.unwrap();
    let mut s = broker
        .subscriber()
        .subscribe("t", SubscribeOptions::group("g"))
        .await
        .unwrap();
    for want in ["0", "1", "2", "3", "4"] {
        let d = next(&mut s).await;
        assert_eq!(payload(&d), want);
        d.ack().await.unwrap();
    }
}

#[tokio::test]
async fn group_members_compete_and_groups_are_independent() {
    let broker = MemoryBroker::new();
    let sub = broker.subscriber();
    let mut g1a = sub
        .subscribe("t", SubscribeOptions::group("g1"))
        .await
        .unwrap();
    let mut g1b = sub
        .subscribe("t", SubscribeOptions::group("g1"))
        .await
        .unwrap();
    let mut g2 = sub
        .subscribe("t", SubscribeOptions::group("g2"))
        .await
        .unwrap();
    let p = broker.publisher();
    p.publish("t", (0..2).map(|i| Message::new(format!("{i}"))).collect())
        .await
        .unwrap();
    // g1a takes both (its prefetch); dropping it hands them to g1b.
    let first = next(&mut g1a).await;
    drop(first);
    drop(g1a);
    let mut g1_seen = Vec::new();
    for _ in 0..2 {
        let d = next(&mut g1b).await;
        g1_seen.push(payload(&d));
        d.ack().await.unwrap();
    }
    g1_seen.sort();
    assert_eq!(g1_seen, ["0", "1"]);
    for want in ["0", "1"] {
        let d = next(&mut g2).await;
        assert_eq!(payload(&d), want);
        d.ack().await.unwrap();
    }
}

#[tokio::test]
async fn closed_publisher_and_subscriber_report_errors() {
    let broker = MemoryBroker::new();
    let p = broker.publisher();
    p.close().await.unwrap();
    let err = p
        .publish_one("orders", Message::new("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PublisherClosed { .. }));
    assert!(err.to_string().contains("orders"), "{err}");
    let s = broker.subscriber();
    let mut stream = s
        .subscribe("orders", SubscribeOptions::new())
        .await
        .unwrap();
    s.close().await.unwrap();
    assert!(tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap()
        .is_none());
    assert!(s
        .subscribe("orders", SubscribeOptions::new())
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_publisher_and_consumer_never_stall() {
    for round in 0..30 {
        let broker = MemoryBroker::new();
        let mut s = broker
            .subscriber()
            .subscribe("t", SubscribeOptions::new())
            .await
            .unwrap();
        let p = broker.publisher();
        let n = 20_000usize;
        let publishing = tokio::spawn(async move {
            let mut left = n;
            while left > 0 {
                let batch = left.min(1000);
                p.publish("t", (0..batch).map(|_| Message::new("x")).collect())
                    .await
                    .unwrap();
                left -= batch;
            }
        });
        let consuming = tokio::spawn(async move {
            for _ in 0..n {
                let d = s.next().await.unwrap().unwrap();
                d.ack().await.unwrap();
            }
        });
        let both = async {
            publishing.await.unwrap();
            consuming.await.unwrap();
        };
        if tokio::time::timeout(Duration::from_secs(20), both)
            .await
            .is_err()
        {
            let topics = broker.shared.topics.read();
            let topic = topics.get("t").unwrap();
            let targets = topic.targets.read().clone();
            for q in targets.iter() {
                eprintln!("round {round}: queue {}", q.debug_state());
            }
            panic!("stalled in round {round}");
        }
    }
}

#[test]
fn a_capacity_of_zero_is_refused_not_clamped() {
    let err = MemoryBroker::try_with_config(MemoryConfig {
        capacity: 0,
        retention: 0,
    })
    .err()
    .expect("refused");
    assert!(err.to_string().contains("capacity"), "{err}");
}
