//! Dead letter: the N-th failed delivery goes to the dead-letter topic with its history and
//! is acked; earlier ones are passed on (nacked). The same in every composition.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tidemill_core::{
    HandlerResult, MemoryBroker, Message, Publisher, Router, SubscribeOptions, Subscriber,
};
use tidemill_middleware::{
    headers, Backoff, Counting, DeadLetter, DeadLetterService, DelayedRedelivery,
};
use tokio::sync::mpsc;
use tower::{Layer, Service, ServiceExt};

fn input() -> Message {
    Message::new("p1")
        .with_metadata("amount", 12)
        .with_key("acct-1")
}

/// Fails every call with `boom N`, N the broker's delivery attempt.
fn boom_by_attempt() -> TestHandler {
    TestHandler::new(|m, _| Err(format!("boom {}", attempt(m)).into()))
}

/// Fails every call with `boom N`, N the failures a durably counted copy records (0 for
/// the original).
fn boom_by_count() -> TestHandler {
    TestHandler::new(|m, _| {
        Err(format!(
            "boom {}",
            m.metadata().get(headers::FAILURES).unwrap_or("0")
        )
        .into())
    })
}

/// History entry `n` of a dead letter.
fn history(m: &Message, n: u32) -> Option<&str> {
    m.metadata()
        .get(&format!("{}{n}", headers::DEAD_LETTER_ERROR_PREFIX))
}

/// The keys durable counting uses never leak into a dead letter.
fn assert_no_counting_headers(m: &Message) {
    let md = m.metadata();
    assert!(
        md.iter().all(|(k, _)| !k.starts_with("tidemill-failure")),
        "{md:?}"
    );
    assert_eq!(md.get(headers::NOT_BEFORE), None);
}

#[tokio::test(start_paused = true)]
async fn the_nth_delivery_counted_by_the_broker_is_dead_lettered() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let dl = DeadLetter::new(h.publisher(), "dead").max_deliveries(3);
        let input = input();
        let o = h
            .run(dl.clone(), boom_by_attempt(), vec![input.clone()])
            .await;
        let uuid = input.uuid();
        assert_eq!(o.call_attempts(uuid), vec![1, 2, 3], "{c:?}");
        assert_eq!(
            o.settled(uuid),
            vec![nack("boom 1"), nack("boom 2"), ack()],
            "{c:?}: earlier failures passed on (the router nacks), the last acked"
        );
        let dead = h.kept("dead").await;
        assert_eq!(dead.len(), 1, "{c:?}");
        let d = &dead[0];
        assert_eq!(d.uuid(), uuid, "{c:?}");
        assert_eq!(text(d), "p1");
        assert_eq!(d.key_str(), Some("acct-1"));
        let md = d.metadata();
        assert_eq!(md.get("amount"), Some("12"));
        assert_eq!(md.get(headers::DEAD_LETTER_DELIVERIES), Some("3"));
        assert_eq!(md.get(headers::DEAD_LETTER_COUNTING), Some("broker"));
        assert_eq!(md.get(headers::DEAD_LETTER_HANDLER), Some(HANDLER));
        assert_eq!(md.get(headers::DEAD_LETTER_TOPIC), Some(TOPIC));
        assert_eq!(md.get(headers::DEAD_LETTER_GROUP), Some(GROUP));
        assert_eq!(md.get(headers::DEAD_LETTER_REASON), Some("boom 3"));
        let time = md.get(headers::DEAD_LETTER_TIME).expect("time");
        assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
        for n in 1..=3 {
            let entry = history(d, n).unwrap_or_else(|| panic!("{c:?}: entry {n} in {md:?}"));
            assert!(entry.ends_with(&format!(" boom {n}")), "{c:?}: {entry}");
            let stamp = entry.split(' ').next().expect("time first");
            assert!(humantime::parse_rfc3339(stamp).is_ok(), "{entry}");
        }
        assert_eq!(history(d, 4), None);
        assert_no_counting_headers(d);
        assert_eq!(dl.dead_lettered(), 1, "{c:?}");
        assert_eq!(dl.republished(), 0, "{c:?}");
        assert!(o.outputs.is_empty());
    }
}

#[tokio::test(start_paused = true)]
async fn counts_durably_by_republishing() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let dl = DeadLetter::new(h.publisher(), "dead")
            .max_deliveries(3)
            .counting(Counting::Republish);
        let input = input();
        let o = h
            .run(dl.clone(), boom_by_count(), vec![input.clone()])
            .await;
        let uuid = input.uuid();
        // Every delivery is a fresh copy (broker attempt 1) carrying the count so far; the
        // original and each copy are acked once the next copy is published.
        let counts: Vec<Option<String>> = o
            .calls_of(uuid)
            .iter()
            .map(|call| {
                call.message
                    .metadata()
                    .get(headers::FAILURES)
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(
            counts,
            vec![None, Some("1".into()), Some("2".into())],
            "{c:?}"
        );
        assert_eq!(o.call_attempts(uuid), vec![1, 1, 1], "{c:?}");
        assert_eq!(o.settled(uuid), vec![ack(), ack(), ack()], "{c:?}");
        let copy = &o.calls_of(uuid)[2].message;
        let md = copy.metadata();
        assert_eq!(md.get(headers::FAILURES_HANDLER), Some(HANDLER));
        assert_eq!(md.get(headers::FAILURES_TOPIC), Some(TOPIC));
        assert_eq!(md.get(headers::FAILURES_GROUP), Some(GROUP));
        assert!(md
            .get(&format!("{}2", headers::FAILURE_PREFIX))
            .is_some_and(|e| e.ends_with(" boom 1")));
        assert_eq!(copy.key_str(), Some("acct-1"), "the copy keeps the key");

        let dead = h.kept("dead").await;
        assert_eq!(dead.len(), 1, "{c:?}");
        let d = &dead[0];
        assert_eq!(d.uuid(), uuid);
        assert_eq!(text(d), "p1");
        let md = d.metadata();
        assert_eq!(md.get(headers::DEAD_LETTER_DELIVERIES), Some("3"));
        assert_eq!(md.get(headers::DEAD_LETTER_COUNTING), Some("republish"));
        assert_eq!(md.get(headers::DEAD_LETTER_REASON), Some("boom 2"));
        assert_eq!(md.get(headers::DEAD_LETTER_HANDLER), Some(HANDLER));
        assert_eq!(md.get(headers::DEAD_LETTER_GROUP), Some(GROUP));
        assert_eq!(md.get("amount"), Some("12"));
        for (n, expect) in [(1, "boom 0"), (2, "boom 1"), (3, "boom 2")] {
            let entry = history(d, n).unwrap_or_else(|| panic!("{c:?}: entry {n} in {md:?}"));
            assert!(entry.ends_with(expect), "{c:?}: {entry}");
        }
        assert_no_counting_headers(d);
        assert_eq!(dl.republished(), 2, "{c:?}");
        assert_eq!(dl.dead_lettered(), 1, "{c:?}");
    }
}

/// The layer's future owns what its error path needs: dropping the service (and the
/// layer) before the future runs changes nothing.
#[tokio::test(start_paused = true)]
async fn a_future_that_outlives_its_service_still_dead_letters() {
    let broker = MemoryBroker::new();
    let dl = DeadLetter::new(broker.publisher(), "dead").max_deliveries(2);
    let mut service = dl.clone().layer(TestHandler::failing("down"));
    let first = service
        .ready()
        .await
        .expect("ready")
        .call(received(input(), Some(1)));
    let last = service
        .ready()
        .await
        .expect("ready")
        .call(received(input(), Some(2)));
    drop(service);
    let stats = dl.clone();
    drop(dl);
    let err = first.await.expect_err("delivery 1 of 2: passed on");
    assert_eq!(err.to_string(), "down");
    assert!(
        last.await
            .expect("delivery 2 of 2: dead-lettered")
            .is_empty(),
        "Ok(nothing): the router acks"
    );
    let dead = kept_for(&broker, "dead", "dead").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].metadata().get(headers::DEAD_LETTER_DELIVERIES),
        Some("2")
    );
    assert_eq!(stats.dead_lettered(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_dead_letter_publish_nacks_the_input() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let closed = h.publisher();
        closed.close().await.expect("closed"); // every publish through it fails
        let dl = DeadLetter::new(closed, "dead").max_deliveries(1);
        let input = Message::new("x");
        let o = h
            .run_until(
                dl.clone(),
                TestHandler::failing("down"),
                vec![input.clone()],
                |d| d.len() >= 2,
            )
            .await;
        let deliveries = o.deliveries_of(input.uuid());
        assert_eq!(deliveries[0].attempt, Some(1), "{c:?}");
        assert_eq!(deliveries[1].attempt, Some(2), "{c:?}: nacked, not lost");
        let Settled::Nack { error, delay } = deliveries[0].settled() else {
            panic!("{c:?}: nacked")
        };
        assert!(
            error.starts_with(&format!(
                "cannot publish message {} to dead-letter topic `dead`",
                input.uuid()
            )) && error.ends_with("handler error: down"),
            "{c:?}: {error}"
        );
        assert_eq!(delay, None, "{c:?}: the router's own backoff");
        assert_eq!(o.backlog, 1, "{c:?}: still there");
        assert_eq!(dl.dead_lettered(), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn the_dead_letter_topic_keeps_messages_for_the_chosen_group() {
    for c in Composition::ALL {
        // Default: for a group named like the topic (read above with `kept("dead")`);
        // `retain_for` names another one.
        let h = Harness::new(c);
        let dl = DeadLetter::new(h.publisher(), "dead")
            .max_deliveries(1)
            .retain_for("auditors");
        let input = Message::new("x");
        let o = h
            .run(dl, TestHandler::failing("down"), vec![input.clone()])
            .await;
        assert_eq!(o.settled(input.uuid()), vec![ack()], "{c:?}");
        let dead = h.kept_for("dead", "auditors").await;
        assert_eq!(dead.len(), 1, "{c:?}");
        assert_eq!(dead[0].uuid(), input.uuid());
        assert_eq!(h.broker.group_backlog("dead", "dead"), None);
    }
}

#[tokio::test(start_paused = true)]
async fn without_retention_a_dead_letter_nobody_receives_is_nacked_not_lost() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let dl = DeadLetter::new(h.publisher(), "dead")
            .max_deliveries(1)
            .without_retention();
        let input = Message::new("x");
        let o = h
            .run_until(
                dl.clone(),
                TestHandler::failing("down"),
                vec![input.clone()],
                |d| d.len() >= 2,
            )
            .await;
        let Settled::Nack { error, .. } = &o.settled(input.uuid())[0] else {
            panic!("{c:?}: nacked")
        };
        assert!(error.contains("dead-letter topic `dead`"), "{c:?}: {error}");
        assert_eq!(o.backlog, 1, "{c:?}");
        assert_eq!(dl.dead_lettered(), 0, "{c:?}");

        // A group that exists already (made by hand) receives them.
        let h = Harness::new(c);
        h.broker
            .subscriber()
            .initialize("dead", &SubscribeOptions::group("ops"))
            .await
            .expect("group made");
        let dl = DeadLetter::new(h.publisher(), "dead")
            .max_deliveries(1)
            .without_retention();
        let o = h
            .run(dl, TestHandler::failing("down"), vec![input.clone()])
            .await;
        assert_eq!(o.settled(input.uuid()), vec![ack()], "{c:?}");
        assert_eq!(h.kept_for("dead", "ops").await.len(), 1, "{c:?}");
    }
}

/// A message consumed from the dead-letter topic itself is never dead-lettered there
/// again (a watcher under the same stack would feed the topic forever): the error is
/// passed on and the router redelivers it with its backoff.
#[tokio::test(start_paused = true)]
async fn never_dead_letters_onto_the_topic_the_message_came_from() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let dl = DeadLetter::new(h.publisher(), TOPIC).max_deliveries(1);
        let input = Message::new("x");
        let o = h
            .run_until(
                dl.clone(),
                TestHandler::failing("down"),
                vec![input.clone()],
                |d| d.len() >= 3,
            )
            .await;
        assert_eq!(
            o.settled(input.uuid())[..3],
            [nack("down"), nack("down"), nack("down")],
            "{c:?}"
        );
        assert_eq!(o.call_attempts(input.uuid())[..3], [1, 2, 3], "{c:?}");
        assert_eq!(dl.dead_lettered(), 0, "{c:?}");
        assert_eq!(o.backlog, 1, "{c:?}: only the original, no copy");
    }
}

/// A message dead-lettered before (and sent back by hand) keeps its earlier history; this
/// round's entries come after it.
#[tokio::test(start_paused = true)]
async fn history_is_appended_never_overwritten() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let dl = DeadLetter::new(h.publisher(), "dead").max_deliveries(2);
        let input = Message::new("x")
            .with_metadata(format!("{}1", headers::DEAD_LETTER_ERROR_PREFIX), "earlier")
            .with_metadata(headers::DEAD_LETTER_REASON, "earlier");
        let o = h.run(dl, boom_by_attempt(), vec![input.clone()]).await;
        assert_eq!(
            o.settled(input.uuid()),
            vec![nack("boom 1"), ack()],
            "{c:?}"
        );
        let dead = h.kept("dead").await;
        assert_eq!(dead.len(), 1, "{c:?}");
        let d = &dead[0];
        assert_eq!(history(d, 1), Some("earlier"), "{c:?}");
        assert!(
            history(d, 2).is_some_and(|e| e.ends_with(" boom 1")),
            "{c:?}"
        );
        assert!(
            history(d, 3).is_some_and(|e| e.ends_with(" boom 2")),
            "{c:?}"
        );
        assert_eq!(history(d, 4), None);
        assert_eq!(
            d.metadata().get(headers::DEAD_LETTER_REASON),
            Some("boom 2")
        );
    }
}

/// tokio's timers have millisecond resolution and may fire up to a millisecond before a
/// deadline as `Instant` measures it: on the real clock delay checks allow this much.
const REAL_TIMER_SLACK: Duration = Duration::from_millis(5);

/// Collects every call of an always-failing handler (the router tests below).
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

#[tokio::test(start_paused = true)]
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

/// Calls `dl` around an always-failing handler: through `kept`, or a service made for
/// the call and dropped right after it (`oneshot`).
async fn call(
    dl: &DeadLetter,
    kept: &mut DeadLetterService<TestHandler>,
    fresh: bool,
    msg: Message,
) -> HandlerResult<Vec<Message>> {
    if fresh {
        dl.layer(TestHandler::failing("down")).oneshot(msg).await
    } else {
        kept.ready().await?.call(msg).await
    }
}

/// A broker without a delivery count (Kafka): attempt `None`, so `Counting::Auto` counts
/// by republishing; the same whether the service lives on or is made for each call.
#[tokio::test(start_paused = true)]
async fn auto_counting_republishes_when_the_broker_reports_no_attempt() {
    for fresh in [false, true] {
        let broker = MemoryBroker::new();
        let mut source = watch(&broker, TOPIC).await;
        let dl = DeadLetter::new(broker.publisher(), "dead").max_deliveries(2);
        let mut kept = dl.layer(TestHandler::failing("down"));
        let out = call(&dl, &mut kept, fresh, received(Message::new("x"), None))
            .await
            .expect("republished");
        assert!(out.is_empty(), "Ok(empty): the router acks the original");
        let copy = next(&mut source).await;
        assert_eq!(copy.metadata().get(headers::FAILURES), Some("1"));
        assert_eq!(copy.metadata().get(headers::FAILURES_GROUP), Some(GROUP));
        let out = call(&dl, &mut kept, fresh, received(copy, None))
            .await
            .expect("dead-lettered");
        assert!(out.is_empty());
        let dead = kept_for(&broker, "dead", "dead").await;
        assert_eq!(dead.len(), 1, "fresh service per call: {fresh}");
        let md = dead[0].metadata();
        assert_eq!(md.get(headers::DEAD_LETTER_DELIVERIES), Some("2"));
        assert_eq!(md.get(headers::DEAD_LETTER_COUNTING), Some("republish"));
    }
}

/// Durable counting: when the broker delivers an earlier copy again after a newer one was
/// published (the earlier one's ack was lost), the layer acks it unhandled instead of
/// starting a second count (which would end in a second dead-letter record).
#[tokio::test(start_paused = true)]
async fn a_stale_copy_is_acked_not_counted_again() {
    let broker = MemoryBroker::new();
    let mut source = watch(&broker, TOPIC).await;
    let dl = DeadLetter::new(broker.publisher(), "dead")
        .max_deliveries(3)
        .counting(Counting::Republish);
    let handler = TestHandler::failing("down");
    let mut service = dl.layer(handler.clone());
    let original = Message::new("x");
    service
        .ready()
        .await
        .unwrap()
        .call(received(original.clone(), Some(1)))
        .await
        .expect("republished");
    let first_copy = next(&mut source).await;
    assert_eq!(first_copy.metadata().get(headers::FAILURES), Some("1"));
    // The original comes back (its ack was lost): acked unhandled.
    let stale = service
        .ready()
        .await
        .unwrap()
        .call(received(original.clone(), Some(2)))
        .await;
    assert!(stale.is_ok_and(|out| out.is_empty()), "acked");
    assert_eq!(
        handler.calls().len(),
        1,
        "the stale original is not handled"
    );
    assert_eq!(dl.skipped(), 1);
    // The copy itself is handled and counted on.
    service
        .ready()
        .await
        .unwrap()
        .call(received(first_copy.clone(), Some(1)))
        .await
        .expect("republished again");
    let second_copy = next(&mut source).await;
    assert_eq!(second_copy.metadata().get(headers::FAILURES), Some("2"));
    assert_eq!(handler.calls().len(), 2);
    // The first copy again (stale now), then the second: one dead letter in all.
    let stale = service
        .ready()
        .await
        .unwrap()
        .call(received(first_copy, Some(2)))
        .await;
    assert!(stale.is_ok_and(|out| out.is_empty()));
    service
        .ready()
        .await
        .unwrap()
        .call(received(second_copy, Some(1)))
        .await
        .expect("dead-lettered");
    assert_eq!(handler.calls().len(), 3);
    assert_eq!(kept_for(&broker, "dead", "dead").await.len(), 1);
    assert_eq!(dl.dead_lettered(), 1);
}

#[tokio::test(start_paused = true)]
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

/// The delay travels in the copy's metadata as a wall-clock time, so this test runs on
/// the real clock; it checks lower bounds only.
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
        t[1] - t[0] >= Duration::from_millis(150) - REAL_TIMER_SLACK,
        "{:?}",
        t[1] - t[0]
    );
    assert!(
        t[2] - t[1] >= Duration::from_millis(300) - REAL_TIMER_SLACK,
        "{:?}",
        t[2] - t[1]
    );
    router.close().await.unwrap();
}
