//! Metric values after a run with known outcomes, read from metrics-util's debugging
//! recorder (installed for this thread; the test runs on a current-thread runtime).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tidemill_core::router::metric_names as names;
use tidemill_core::{
    permanent, Backoff, HandlerResult, MemoryBroker, Message, Publisher, Router, RouterConfig,
    SubscribeOptions, Subscriber,
};
use tidemill_middleware::{DeadLetter, PoisonQueue, Retry};
use tidemill_otel::InstrumentedPublisher;

/// Values by `name{label=value,...}` (labels sorted).
fn values(snapshotter: &Snapshotter) -> HashMap<String, DebugValue> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            (format!("{}{{{}}}", key.name(), labels.join(",")), value)
        })
        .collect()
}

fn counter(values: &HashMap<String, DebugValue>, key: &str) -> u64 {
    match values.get(key) {
        Some(DebugValue::Counter(n)) => *n,
        None => 0,
        other => panic!("{key} is not a counter: {other:?}"),
    }
}

/// 5 messages succeed at once, 2 after one in-process retry, 1 always fails (retried once
/// per delivery, dead-lettered on its second delivery), 1 is poison (a permanent error).
#[tokio::test]
async fn counters_after_known_outcomes() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let broker = MemoryBroker::new();
    let publisher = InstrumentedPublisher::new(broker.publisher());
    let router = Router::with_config(RouterConfig {
        redelivery: Backoff::new(Duration::from_millis(1)),
        ..RouterConfig::default()
    });
    router
        .layer(DeadLetter::new(publisher.clone(), "dead-letters").max_deliveries(2))
        .layer(PoisonQueue::new(publisher.clone(), "poison"))
        .layer(
            Retry::new()
                .max_attempts(2)
                .backoff(Backoff::new(Duration::from_millis(1))),
        );
    let seen = Arc::new(Mutex::new(HashSet::new()));
    router
        .add_handler("orders")
        .subscribe(broker.subscriber(), "orders")
        .group("orders")
        .handler(move |m: Message| {
            // Retry hands the same message again: a flaky one fails on its first call only.
            let first_call = seen.lock().unwrap().insert(m.uuid().to_owned());
            async move {
                match m.payload().as_ref() {
                    b"ok" => HandlerResult::Ok(()),
                    b"flaky" if first_call => Err("flaky backend".into()),
                    b"flaky" => Ok(()),
                    b"poison" => Err(permanent("malformed order")),
                    _ => Err("always fails".into()),
                }
            }
        })
        .await
        .unwrap();
    // The failure destinations, consumed by the groups they are kept for.
    let mut dead = broker
        .subscriber()
        .subscribe("dead-letters", SubscribeOptions::group("dead-letters"))
        .await
        .unwrap();
    let mut poison = broker
        .subscriber()
        .subscribe("poison", SubscribeOptions::group("poison"))
        .await
        .unwrap();
    let (ok, flaky) = (5, 2);
    let r = router.clone();
    tokio::spawn(async move { r.run().await });
    router.running().await;
    let mut sent = Vec::new();
    sent.extend(std::iter::repeat_n("ok", ok));
    sent.extend(std::iter::repeat_n("flaky", flaky));
    sent.extend(["dead", "poison"]);
    for payload in &sent {
        publisher
            .publish_one("orders", Message::new(*payload))
            .await
            .unwrap();
    }
    let d = dead.next().await.unwrap().unwrap();
    assert_eq!(d.message().payload().as_ref(), b"dead");
    d.ack().await.unwrap();
    let p = poison.next().await.unwrap().unwrap();
    assert_eq!(p.message().payload().as_ref(), b"poison");
    p.ack().await.unwrap();
    // Closing drains: every message the router took is settled (and counted) by then.
    // The successes went before the dead letter: each handler call finishes before the
    // next delivery, so by the time both destinations got theirs every message was handled.
    router.close().await.unwrap();

    let v = values(&snapshotter);
    let h = "handler=orders,topic=orders";
    // ok 5 + flaky 2 + dead twice + poison 1.
    let received = (ok + flaky + 2 + 1) as u64;
    assert_eq!(
        counter(&v, &format!("{}{{{h}}}", names::RECEIVED)),
        received
    );
    // Everything but the dead message's first delivery (nacked) is acked in the end.
    assert_eq!(
        counter(&v, &format!("{}{{{h}}}", names::ACKED)),
        received - 1
    );
    assert_eq!(counter(&v, &format!("{}{{{h}}}", names::NACKED)), 1);
    // Labels are sorted: kind between handler and topic.
    assert_eq!(
        counter(
            &v,
            &format!(
                "{}{{handler=orders,kind=error,topic=orders}}",
                names::FAILURES
            )
        ),
        1
    );
    // flaky: one retry each; dead: one retry per delivery.
    assert_eq!(
        counter(&v, &format!("{}{{{h}}}", names::RETRIED)),
        (flaky + 2) as u64
    );
    assert_eq!(counter(&v, &format!("{}{{{h}}}", names::DEAD_LETTERED)), 1);
    assert_eq!(counter(&v, &format!("{}{{{h}}}", names::POISONED)), 1);
    match v.get(&format!("{}{{{h}}}", names::DURATION)) {
        Some(DebugValue::Histogram(samples)) => assert_eq!(samples.len() as u64, received),
        other => panic!("duration histogram: {other:?}"),
    }
    match v.get(&format!("{}{{{h}}}", names::IN_FLIGHT)) {
        Some(DebugValue::Gauge(g)) => assert_eq!(g.into_inner(), 0.0),
        other => panic!("in-flight gauge: {other:?}"),
    }
    // The publisher's share: inputs, one dead letter, one poison message.
    assert_eq!(
        counter(&v, &format!("{}{{topic=orders}}", names::PUBLISHED)),
        sent.len() as u64
    );
    assert_eq!(
        counter(&v, &format!("{}{{topic=dead-letters}}", names::PUBLISHED)),
        1
    );
    assert_eq!(
        counter(&v, &format!("{}{{topic=poison}}", names::PUBLISHED)),
        1
    );
    assert_eq!(
        counter(&v, &format!("{}{{topic=orders}}", names::PUBLISH_ERRORS)),
        0
    );
    match v.get(&format!("{}{{topic=orders}}", names::PUBLISH_DURATION)) {
        Some(DebugValue::Histogram(samples)) => assert_eq!(samples.len(), sent.len()),
        other => panic!("publish duration: {other:?}"),
    }
}

/// A publish that fails counts as an error, not as published.
#[tokio::test]
async fn publish_errors_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let broker = MemoryBroker::new();
    let publisher = InstrumentedPublisher::new(broker.publisher());
    publisher.close().await.unwrap();
    assert!(publisher.publish_one("t", Message::new("x")).await.is_err());
    let v = values(&snapshotter);
    assert_eq!(
        counter(&v, &format!("{}{{topic=t}}", names::PUBLISH_ERRORS)),
        1
    );
    assert_eq!(counter(&v, &format!("{}{{topic=t}}", names::PUBLISHED)), 0);
}

/// A batch handler records each call's size; every message is counted as usual.
#[tokio::test]
async fn batch_sizes_are_recorded() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    router
        .add_handler("rows")
        .subscribe(broker.subscriber(), "rows")
        .batch(3, Duration::from_secs(3600))
        .handler(move |msgs: Vec<Message>| {
            let _ = tx.send(msgs.len());
            async {}
        })
        .await
        .unwrap();
    let running = router.clone();
    tokio::spawn(async move { running.run().await });
    router.running().await;
    let msgs = (0..6).map(|i| Message::new(i.to_string())).collect();
    broker.publisher().publish("rows", msgs).await.unwrap();
    assert_eq!((rx.recv().await, rx.recv().await), (Some(3), Some(3)));
    router.close().await.unwrap();

    let v = values(&snapshotter);
    let h = "handler=rows,topic=rows";
    match v.get(&format!("{}{{{h}}}", names::BATCH_SIZE)) {
        Some(DebugValue::Histogram(samples)) => {
            let sizes: Vec<f64> = samples.iter().map(|s| s.into_inner()).collect();
            assert_eq!(sizes, [3.0, 3.0]);
        }
        other => panic!("batch size histogram: {other:?}"),
    }
    assert_eq!(counter(&v, &format!("{}{{{h}}}", names::ACKED)), 6);
}
