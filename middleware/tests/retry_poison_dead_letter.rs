//! Retry, poison queue, dead letter, delayed redelivery, recoverer: what ends up where.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use parking_lot::Mutex;
use tidemill_core::router::redeliver_after;
use tidemill_core::{
    permanent, HandlerInfo, HandlerResult, MemoryBroker, Message, MessageContext, Publisher, Router,
};
use tidemill_middleware::{
    headers, Backoff, Counting, DeadLetter, DelayedRedelivery, PoisonQueue, Recoverer, Retry,
};
use tokio::sync::mpsc;
use tower::{Layer, Service, ServiceExt};

fn fast() -> Backoff {
    Backoff::new(Duration::from_millis(10))
}

/// tokio's timers have millisecond resolution and may fire up to a millisecond before a
/// deadline as `Instant` measures it: delay checks allow this much (the delays they check
/// are 100 ms and more, so a missing delay still fails them).
const TIMER_SLACK: Duration = Duration::from_millis(5);

#[tokio::test]
async fn retry_calls_again_with_backoff_then_acks() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let calls = Arc::new(AtomicU32::new(0));
    let events = Arc::new(Mutex::new(Vec::new()));
    let (c, ev) = (calls.clone(), events.clone());
    router
        .add_handler("flaky")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .layer(
            Retry::new()
                .max_attempts(3)
                .backoff(fast().multiplier(2.0))
                .on_retry(move |e| ev.lock().push((e.attempt, e.delay, e.error.to_string()))),
        )
        .handler(move |m: Message| {
            let c = c.clone();
            async move {
                // In-process retries: the broker delivered it once.
                assert_eq!(attempt(&m), 1);
                if c.fetch_add(1, Ordering::SeqCst) < 2 {
                    return Err("flaky".into());
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
    eventually("acked", || broker.group_backlog("in", "g") == Some(0)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        *events.lock(),
        vec![
            (1, Duration::from_millis(10), "flaky".to_owned()),
            (2, Duration::from_millis(20), "flaky".to_owned())
        ]
    );
    router.close().await.unwrap();
}

#[tokio::test]
async fn retry_gives_up_after_max_attempts_and_the_router_nacks() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Router level: the layer wraps the boxed handler.
    router.layer(Retry::new().max_attempts(3).backoff(fast()));
    router
        .add_handler("broken")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .handler(move |m: Message| {
            let tx = tx.clone();
            async move {
                tx.send(attempt(&m)).unwrap();
                HandlerResult::<()>::Err("down".into())
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
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(recv(&mut rx).await);
    }
    // Three calls per delivery, then the nack brings delivery 2.
    assert_eq!(seen, vec![1, 1, 1, 2, 2, 2]);
    router.close().await.unwrap();
}

#[tokio::test]
async fn retry_leaves_permanent_errors_and_unlisted_errors_alone() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let poison = PoisonQueue::new(broker.publisher(), "poison");
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("h")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .layer(poison.clone())
        .layer(Retry::new().max_attempts(5).backoff(fast()).retry_if(|e| {
            !tidemill_core::is_permanent(e.as_ref()) && !e.to_string().contains("not-retried")
        }))
        .handler(move |m: Message| {
            let tx = tx.clone();
            async move {
                tx.send((text(&m), attempt(&m))).unwrap();
                let result: HandlerResult = match text(&m).as_str() {
                    "permanent" => Err(permanent("bad payload")),
                    _ if attempt(&m) == 1 => Err("not-retried: bad too".into()),
                    _ => Ok(()),
                };
                result
            }
        })
        .await
        .unwrap();
    let mut poisoned = watch(&broker, "poison").await;
    let _run = start(&router).await;
    broker
        .publisher()
        .publish_one("in", Message::new("permanent"))
        .await
        .unwrap();
    assert_eq!(text(&next(&mut poisoned).await), "permanent");
    assert_eq!(recv(&mut rx).await, ("permanent".into(), 1));
    broker
        .publisher()
        .publish_one("in", Message::new("other"))
        .await
        .unwrap();
    // Not retried in-process: the next call is the broker's redelivery.
    assert_eq!(recv(&mut rx).await, ("other".into(), 1));
    assert_eq!(recv(&mut rx).await, ("other".into(), 2));
    eventually("acked", || broker.group_backlog("in", "g") == Some(0)).await;
    assert!(rx.try_recv().is_err(), "permanent errors are not retried");
    router.close().await.unwrap();
}

#[tokio::test]
async fn each_attempt_gets_a_fresh_timeout() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let calls = Arc::new(AtomicU32::new(0));
    for (name, use_tower) in [("tower-timeout", true), ("attempt-timeout", false)] {
        let c = calls.clone();
        let handler = move |_m: Message| {
            let c = c.clone();
            async move {
                if c.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
                    // The first attempt hangs: only a timeout ends it.
                    std::future::pending::<()>().await;
                }
                HandlerResult::Ok(())
            }
        };
        let b = router
            .add_handler(name)
            .subscribe(broker.subscriber(), name)
            .group("g");
        if use_tower {
            b.layer(Retry::new().max_attempts(2).backoff(fast()))
                .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(
                    200,
                )))
                .handler(handler)
                .await
                .unwrap();
        } else {
            b.layer(
                Retry::new()
                    .max_attempts(2)
                    .backoff(fast())
                    .attempt_timeout(Duration::from_millis(200)),
            )
            .handler(handler)
            .await
            .unwrap();
        }
    }
    let _run = start(&router).await;
    broker
        .publisher()
        .publish_one("tower-timeout", Message::new("x"))
        .await
        .unwrap();
    eventually("tower-timeout acked", || {
        broker.group_backlog("tower-timeout", "g") == Some(0)
    })
    .await;
    broker
        .publisher()
        .publish_one("attempt-timeout", Message::new("x"))
        .await
        .unwrap();
    eventually("attempt-timeout acked", || {
        broker.group_backlog("attempt-timeout", "g") == Some(0)
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 4, "two attempts each");
    router.close().await.unwrap();
}

#[tokio::test]
async fn retry_stops_when_the_elapsed_budget_is_spent() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("h")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .layer(
            Retry::new()
                .max_attempts(100)
                .backoff(Backoff::new(Duration::from_millis(100)).multiplier(1.0))
                .max_elapsed(Duration::from_millis(250)),
        )
        .handler(move |m: Message| {
            let tx = tx.clone();
            async move {
                tx.send(attempt(&m)).unwrap();
                HandlerResult::<()>::Err("down".into())
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
    let mut first_delivery = 0;
    while recv(&mut rx).await == 1 {
        first_delivery += 1;
    }
    // Calls at 0, 100, 200 ms; a fourth would start at 300 ms > 250 ms.
    assert_eq!(first_delivery, 3);
    router.close().await.unwrap();
}

#[tokio::test]
async fn poison_publishes_with_reason_then_acks() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let poison = PoisonQueue::new(broker.publisher(), "poison");
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("parse")
        .subscribe(broker.subscriber(), "in")
        .group("parsers")
        .layer(poison.clone())
        .handler(move |m: Message| {
            let tx = tx.clone();
            async move {
                tx.send((text(&m), attempt(&m))).unwrap();
                match text(&m).as_str() {
                    "garbage" => Err(permanent("not a number")),
                    "flaky" if attempt(&m) == 1 => Err("database busy".into()),
                    _ => HandlerResult::Ok(()),
                }
            }
        })
        .await
        .unwrap();
    let mut poisoned = watch(&broker, "poison").await;
    let _run = start(&router).await;
    let bad = Message::new("garbage")
        .with_metadata("customer", "42")
        .with_key("k1");
    broker
        .publisher()
        .publish("in", vec![bad.clone(), Message::new("flaky")])
        .await
        .unwrap();
    let p = next(&mut poisoned).await;
    assert_eq!(p.uuid(), bad.uuid());
    assert_eq!(text(&p), "garbage");
    assert_eq!(p.key_str(), Some("k1"));
    let md = p.metadata();
    assert_eq!(md.get("customer"), Some("42"));
    assert_eq!(md.get(headers::POISON_REASON), Some("not a number"));
    assert_eq!(md.get(headers::POISON_HANDLER), Some("parse"));
    assert_eq!(md.get(headers::POISON_TOPIC), Some("in"));
    assert_eq!(md.get(headers::POISON_GROUP), Some("parsers"));
    let time = md.get(headers::POISON_TIME).unwrap();
    assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
    eventually("both acked", || {
        broker.group_backlog("in", "parsers") == Some(0)
    })
    .await;
    // The transient failure was redelivered, not poisoned.
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(recv(&mut rx).await);
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("flaky".into(), 1),
            ("flaky".into(), 2),
            ("garbage".into(), 1)
        ]
    );
    quiet(&mut poisoned).await;
    assert_eq!(poison.poisoned(), 1);
    router.close().await.unwrap();
}

#[tokio::test]
async fn poison_predicate_and_all_errors() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    router
        .add_handler("all")
        .subscribe(broker.subscriber(), "a")
        .layer(PoisonQueue::new(broker.publisher(), "poison").all_errors())
        .handler(|_m: Message| async move { HandlerResult::<()>::Err("any error".into()) })
        .await
        .unwrap();
    router
        .add_handler("picky")
        .subscribe(broker.subscriber(), "b")
        .layer(PoisonQueue::new(broker.publisher(), "poison").when(|e| e.to_string() == "mine"))
        .handler(|m: Message| async move {
            if attempt(&m) > 1 {
                return HandlerResult::Ok(());
            }
            HandlerResult::<()>::Err(text(&m).into())
        })
        .await
        .unwrap();
    let mut poisoned = watch(&broker, "poison").await;
    let _run = start(&router).await;
    let p = broker.publisher();
    p.publish_one("a", Message::new("1")).await.unwrap();
    assert_eq!(
        next(&mut poisoned)
            .await
            .metadata()
            .get(headers::POISON_REASON),
        Some("any error")
    );
    p.publish("b", vec![Message::new("other"), Message::new("mine")])
        .await
        .unwrap();
    let got = next(&mut poisoned).await;
    assert_eq!(text(&got), "mine");
    quiet(&mut poisoned).await;
    router.close().await.unwrap();
}

#[tokio::test]
async fn a_failed_poison_publish_nacks_the_input() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let closed = broker.publisher();
    closed.close().await.unwrap(); // every publish through it fails
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("h")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .layer(PoisonQueue::new(closed, "poison"))
        .handler(move |m: Message| {
            let tx = tx.clone();
            async move {
                tx.send(attempt(&m)).unwrap();
                HandlerResult::<()>::Err(permanent("bad"))
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
    assert_eq!(recv(&mut rx).await, 1);
    assert_eq!(recv(&mut rx).await, 2, "nacked and redelivered, not lost");
    assert_eq!(broker.group_backlog("in", "g"), Some(1));
    router.close().await.unwrap();
}

/// Collects every call of an always-failing handler.
fn failing(
    tx: mpsc::UnboundedSender<Message>,
) -> impl Fn(Message) -> futures::future::Ready<HandlerResult> + Clone {
    move |m: Message| {
        let _ = tx.send(m.clone());
        futures::future::ready(Err(format!(
            "boom {}",
            m.metadata().get(headers::FAILURES).unwrap_or("0")
        )
        .into()))
    }
}

#[tokio::test]
async fn dead_letter_by_broker_attempt() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let dl = DeadLetter::new(broker.publisher(), "dead").max_deliveries(3);
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("pay")
        .subscribe(broker.subscriber(), "payments")
        .group("billing")
        .layer(dl.clone())
        .handler(failing(tx))
        .await
        .unwrap();
    let mut dead = watch(&broker, "dead").await;
    let _run = start(&router).await;
    let input = Message::new("p1")
        .with_metadata("amount", 12)
        .with_key("acct-1");
    broker
        .publisher()
        .publish_one("payments", input.clone())
        .await
        .unwrap();
    let d = next(&mut dead).await;
    let attempts: Vec<u32> = (0..3)
        .map(|_| rx.try_recv().map(|m| attempt(&m)).unwrap())
        .collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    assert_eq!(d.uuid(), input.uuid());
    assert_eq!(text(&d), "p1");
    assert_eq!(d.key_str(), Some("acct-1"));
    let md = d.metadata();
    assert_eq!(md.get("amount"), Some("12"));
    assert_eq!(md.get(headers::DEAD_LETTER_DELIVERIES), Some("3"));
    assert_eq!(md.get(headers::DEAD_LETTER_COUNTING), Some("broker"));
    assert_eq!(md.get(headers::DEAD_LETTER_HANDLER), Some("pay"));
    assert_eq!(md.get(headers::DEAD_LETTER_TOPIC), Some("payments"));
    assert_eq!(md.get(headers::DEAD_LETTER_GROUP), Some("billing"));
    assert_eq!(md.get(headers::DEAD_LETTER_REASON), Some("boom 0"));
    for n in 1..=3 {
        let entry = md
            .get(&format!("{}{n}", headers::DEAD_LETTER_ERROR_PREFIX))
            .unwrap_or_else(|| panic!("history entry {n} in {md:?}"));
        assert!(entry.ends_with(" boom 0"), "{entry}");
    }
    eventually("acked", || {
        broker.group_backlog("payments", "billing") == Some(0)
    })
    .await;
    assert!(rx.try_recv().is_err(), "no fourth delivery");
    quiet(&mut dead).await;
    assert_eq!(dl.dead_lettered(), 1);
    router.close().await.unwrap();
}

#[tokio::test]
async fn dead_letter_counts_durably_by_republishing() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let dl = DeadLetter::new(broker.publisher(), "dead")
        .max_deliveries(3)
        .counting(Counting::Republish);
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("pay")
        .subscribe(broker.subscriber(), "payments")
        .group("billing")
        .layer(dl.clone())
        .handler(failing(tx))
        .await
        .unwrap();
    let mut dead = watch(&broker, "dead").await;
    let _run = start(&router).await;
    let input = Message::new("p1").with_metadata("amount", 12);
    broker
        .publisher()
        .publish_one("payments", input.clone())
        .await
        .unwrap();
    let d = next(&mut dead).await;
    let seen: Vec<Message> = (0..3).map(|_| rx.try_recv().unwrap()).collect();
    // Every delivery is a fresh copy (broker attempt 1) carrying the count so far.
    let counts: Vec<Option<&str>> = seen
        .iter()
        .map(|m| m.metadata().get(headers::FAILURES))
        .collect();
    assert_eq!(counts, vec![None, Some("1"), Some("2")]);
    assert!(seen
        .iter()
        .all(|m| attempt(m) == 1 && m.uuid() == input.uuid()));
    let md = d.metadata();
    assert_eq!(md.get(headers::DEAD_LETTER_DELIVERIES), Some("3"));
    assert_eq!(md.get(headers::DEAD_LETTER_COUNTING), Some("republish"));
    assert_eq!(md.get(headers::DEAD_LETTER_REASON), Some("boom 2"));
    assert_eq!(md.get("amount"), Some("12"));
    for (n, expect) in [(1, "boom 0"), (2, "boom 1"), (3, "boom 2")] {
        let entry = md
            .get(&format!("{}{n}", headers::DEAD_LETTER_ERROR_PREFIX))
            .unwrap();
        assert!(entry.ends_with(expect), "{entry}");
    }
    // The counting headers do not leak into the dead letter.
    assert!(
        md.iter().all(|(k, _)| !k.starts_with("tidemill-failure")),
        "{md:?}"
    );
    eventually("acked", || {
        broker.group_backlog("payments", "billing") == Some(0)
    })
    .await;
    assert_eq!(dl.republished(), 2);
    assert_eq!(dl.dead_lettered(), 1);
    router.close().await.unwrap();
}

#[tokio::test]
async fn the_durable_count_survives_a_consumer_restart() {
    let broker = MemoryBroker::new();
    let mut dead = watch(&broker, "dead").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    for counting in [Counting::Republish, Counting::Broker] {
        let topic = format!("payments-{counting:?}");
        let dl = || {
            DeadLetter::new(broker.publisher(), "dead")
                .max_deliveries(4)
                .counting(counting)
        };
        // First consumer: two failures, then it goes away.
        let first = Router::new();
        first
            .add_handler("pay")
            .subscribe(broker.subscriber(), &topic)
            .group("billing")
            .layer(dl())
            .handler(failing(tx.clone()))
            .await
            .unwrap();
        let run = start(&first).await;
        broker
            .publisher()
            .publish_one(&topic, Message::new("p"))
            .await
            .unwrap();
        recv(&mut rx).await;
        recv(&mut rx).await;
        first.stop_handler("pay").await.unwrap();
        first.close().await.unwrap();
        run.await.unwrap().unwrap();
        // A new consumer of the same group carries on counting.
        let second = Router::new();
        second
            .add_handler("pay")
            .subscribe(broker.subscriber(), &topic)
            .group("billing")
            .layer(dl())
            .handler(failing(tx.clone()))
            .await
            .unwrap();
        let _run = start(&second).await;
        let d = next(&mut dead).await;
        assert_eq!(
            d.metadata().get(headers::DEAD_LETTER_DELIVERIES),
            Some("4"),
            "{counting:?}"
        );
        // At most 4 deliveries in total (the first consumer may have seen a third).
        let mut total = 2;
        while rx.try_recv().is_ok() {
            total += 1;
        }
        assert_eq!(total, 4, "{counting:?}: deliveries before dead-lettering");
        eventually("acked", || {
            broker.group_backlog(&topic, "billing") == Some(0)
        })
        .await;
        second.close().await.unwrap();
    }
}

#[tokio::test]
async fn auto_counting_republishes_when_the_broker_reports_no_attempt() {
    let broker = MemoryBroker::new();
    let mut source = watch(&broker, "orders").await;
    let mut dead = watch(&broker, "dead").await;
    let dl = DeadLetter::new(broker.publisher(), "dead").max_deliveries(2);
    let mut service = dl.layer(tidemill_core::handler_fn(|_m: Message| async {
        HandlerResult::<()>::Err("down".into())
    }));
    let info = Arc::new(HandlerInfo {
        name: "h".into(),
        topic: "orders".into(),
        group: Some("g".into()),
        publish_topic: None,
    });
    // As delivered by a broker without a delivery count (Kafka): attempt None.
    let mut msg = Message::new("x");
    msg.set_context(Some(MessageContext::new(info.clone(), None)));
    let out = service.ready().await.unwrap().call(msg).await.unwrap();
    assert!(out.is_empty(), "Ok(empty): the router acks the original");
    let mut copy = next(&mut source).await;
    assert_eq!(copy.metadata().get(headers::FAILURES), Some("1"));
    assert_eq!(copy.metadata().get(headers::FAILURES_GROUP), Some("g"));
    copy.set_context(Some(MessageContext::new(info, None)));
    service.ready().await.unwrap().call(copy).await.unwrap();
    let d = next(&mut dead).await;
    assert_eq!(d.metadata().get(headers::DEAD_LETTER_DELIVERIES), Some("2"));
    assert_eq!(
        d.metadata().get(headers::DEAD_LETTER_COUNTING),
        Some("republish")
    );
}

#[tokio::test]
async fn other_groups_ack_retry_copies_that_are_not_theirs() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let dl = DeadLetter::new(broker.publisher(), "dead")
        .max_deliveries(3)
        .counting(Counting::Republish);
    router.layer(dl.clone());
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("billing")
        .subscribe(broker.subscriber(), "orders")
        .group("billing")
        .handler(failing(tx))
        .await
        .unwrap();
    let shipped = Arc::new(AtomicU32::new(0));
    let s = shipped.clone();
    router
        .add_handler("shipping")
        .subscribe(broker.subscriber(), "orders")
        .group("shipping")
        .handler(move |_m: Message| {
            s.fetch_add(1, Ordering::SeqCst);
            async { HandlerResult::Ok(()) }
        })
        .await
        .unwrap();
    let mut dead = watch(&broker, "dead").await;
    let _run = start(&router).await;
    broker
        .publisher()
        .publish_one("orders", Message::new("o1"))
        .await
        .unwrap();
    let d = next(&mut dead).await;
    assert_eq!(
        d.metadata().get(headers::DEAD_LETTER_GROUP),
        Some("billing")
    );
    eventually("shipping saw the copies", || dl.skipped() == 2).await;
    eventually("all acked", || {
        broker.group_backlog("orders", "shipping") == Some(0)
            && broker.group_backlog("orders", "billing") == Some(0)
    })
    .await;
    assert_eq!(
        shipped.load(Ordering::SeqCst),
        1,
        "shipping handled the order once"
    );
    let mut billing = 0;
    while rx.try_recv().is_ok() {
        billing += 1;
    }
    assert_eq!(billing, 3);
    router.close().await.unwrap();
}

#[tokio::test]
async fn a_failed_dead_letter_publish_nacks_the_input() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let closed = broker.publisher();
    closed.close().await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("h")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .layer(DeadLetter::new(closed, "dead").max_deliveries(1))
        .handler(failing(tx))
        .await
        .unwrap();
    let _run = start(&router).await;
    broker
        .publisher()
        .publish_one("in", Message::new("x"))
        .await
        .unwrap();
    assert_eq!(attempt(&recv(&mut rx).await), 1);
    assert_eq!(attempt(&recv(&mut rx).await), 2, "nacked, not lost");
    assert_eq!(broker.group_backlog("in", "g"), Some(1));
    router.close().await.unwrap();
}

#[tokio::test]
async fn delayed_redelivery_nacks_with_growing_delays() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("h")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .layer(DelayedRedelivery::new(
            Backoff::new(Duration::from_millis(100)).multiplier(2.0),
        ))
        .handler(move |m: Message| {
            let tx = tx.clone();
            async move {
                tx.send((attempt(&m), tokio::time::Instant::now())).unwrap();
                if attempt(&m) < 3 {
                    return Err("busy".into());
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
    let (a1, t1) = recv(&mut rx).await;
    let (a2, t2) = recv(&mut rx).await;
    let (a3, t3) = recv(&mut rx).await;
    assert_eq!((a1, a2, a3), (1, 2, 3));
    assert!(
        t2 - t1 >= Duration::from_millis(100) - TIMER_SLACK,
        "{:?}",
        t2 - t1
    );
    assert!(
        t3 - t2 >= Duration::from_millis(200) - TIMER_SLACK,
        "{:?}",
        t3 - t2
    );
    eventually("acked", || broker.group_backlog("in", "g") == Some(0)).await;
    router.close().await.unwrap();
}

#[tokio::test]
async fn delays_travel_with_durably_counted_copies() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("h")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .layer(
            DeadLetter::new(broker.publisher(), "dead")
                .max_deliveries(3)
                .counting(Counting::Republish),
        )
        .layer(DelayedRedelivery::new(Backoff::new(Duration::from_millis(
            150,
        ))))
        .handler(move |_m: Message| {
            let tx = tx.clone();
            async move {
                tx.send(tokio::time::Instant::now()).unwrap();
                HandlerResult::<()>::Err("busy".into())
            }
        })
        .await
        .unwrap();
    let mut dead = watch(&broker, "dead").await;
    let _run = start(&router).await;
    broker
        .publisher()
        .publish_one("in", Message::new("x"))
        .await
        .unwrap();
    next(&mut dead).await;
    let t: Vec<_> = (0..3).map(|_| rx.try_recv().unwrap()).collect();
    assert!(
        t[1] - t[0] >= Duration::from_millis(150) - TIMER_SLACK,
        "{:?}",
        t[1] - t[0]
    );
    assert!(
        t[2] - t[1] >= Duration::from_millis(300) - TIMER_SLACK,
        "{:?}",
        t[2] - t[1]
    );
    router.close().await.unwrap();
}

#[tokio::test]
async fn an_explicit_redelivery_delay_is_kept() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("h")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .layer(DelayedRedelivery::new(Backoff::new(Duration::from_millis(
            1,
        ))))
        .handler(move |m: Message| {
            let tx = tx.clone();
            async move {
                tx.send(tokio::time::Instant::now()).unwrap();
                if attempt(&m) == 1 {
                    return Err(redeliver_after(Duration::from_millis(200), "rate limited"));
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
    let t1 = recv(&mut rx).await;
    let t2 = recv(&mut rx).await;
    assert!(
        t2 - t1 >= Duration::from_millis(200) - TIMER_SLACK,
        "{:?}",
        t2 - t1
    );
    router.close().await.unwrap();
}

#[tokio::test]
async fn recovered_panics_are_retried_and_poisoned() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    router
        .add_handler("h")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .layer(PoisonQueue::new(broker.publisher(), "poison").all_errors())
        .layer(Retry::new().max_attempts(2).backoff(fast()))
        .layer(Recoverer::new())
        .handler(move |m: Message| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if text(&m) == "always" || n == 0 {
                    panic!("kaboom {}", text(&m));
                }
                HandlerResult::Ok(())
            }
        })
        .await
        .unwrap();
    let mut poisoned = watch(&broker, "poison").await;
    let _run = start(&router).await;
    broker
        .publisher()
        .publish_one("in", Message::new("once"))
        .await
        .unwrap();
    eventually("acked", || broker.group_backlog("in", "g") == Some(0)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the panic was retried in-process"
    );
    broker
        .publisher()
        .publish_one("in", Message::new("always"))
        .await
        .unwrap();
    let p = next(&mut poisoned).await;
    assert_eq!(
        p.metadata().get(headers::POISON_REASON),
        Some("handler panicked: kaboom always")
    );
    eventually("acked", || broker.group_backlog("in", "g") == Some(0)).await;
    router.close().await.unwrap();
}
