//! Poison queue: a permanent failure (or one the predicate picks) goes to the poison topic
//! with the reason and where it came from, and is acked; other errors are passed on. The
//! same in every composition.

mod common;

use common::*;
use tidemill_core::{permanent, MemoryBroker, Message, Publisher, SubscribeOptions, Subscriber};
use tidemill_middleware::{headers, PoisonQueue};
use tower::{Layer, Service, ServiceExt};

#[tokio::test(start_paused = true)]
async fn permanent_failures_are_published_with_the_reason_then_acked() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let poison = PoisonQueue::new(h.publisher(), "poison");
        let handler = TestHandler::new(|m, _| match text(m).as_str() {
            "garbage" => Err(permanent("not a number")),
            "flaky" if attempt(m) == 1 => Err("database busy".into()),
            _ => Ok(Vec::new()),
        });
        let bad = Message::new("garbage")
            .with_metadata("customer", "42")
            .with_key("k1");
        let flaky = Message::new("flaky");
        let o = h
            .run(poison.clone(), handler, vec![bad.clone(), flaky.clone()])
            .await;
        assert_eq!(o.settled(bad.uuid()), vec![ack()], "{c:?}: poisoned, acked");
        assert_eq!(o.call_attempts(bad.uuid()), vec![1], "{c:?}");
        // The transient failure was passed on (nacked, redelivered), not poisoned.
        assert_eq!(
            o.settled(flaky.uuid()),
            vec![nack("database busy"), ack()],
            "{c:?}"
        );
        assert_eq!(o.call_attempts(flaky.uuid()), vec![1, 2], "{c:?}");
        let poisoned = h.kept("poison").await;
        assert_eq!(poisoned.len(), 1, "{c:?}");
        let p = &poisoned[0];
        assert_eq!(p.uuid(), bad.uuid());
        assert_eq!(text(p), "garbage");
        assert_eq!(p.key_str(), Some("k1"));
        let md = p.metadata();
        assert_eq!(md.get("customer"), Some("42"));
        assert_eq!(md.get(headers::POISON_REASON), Some("not a number"));
        assert_eq!(md.get(headers::POISON_HANDLER), Some(HANDLER));
        assert_eq!(md.get(headers::POISON_TOPIC), Some(TOPIC));
        assert_eq!(md.get(headers::POISON_GROUP), Some(GROUP));
        let time = md.get(headers::POISON_TIME).expect("time");
        assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
        assert_eq!(
            md.len(),
            6,
            "{c:?}: the input's metadata and five entries: {md:?}"
        );
        assert_eq!(poison.poisoned(), 1, "{c:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn all_errors_or_a_predicate_decide_what_is_poisoned() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let all = PoisonQueue::new(h.publisher(), "poison").all_errors();
        let input = Message::new("1");
        let o = h
            .run(all, TestHandler::failing("any error"), vec![input.clone()])
            .await;
        assert_eq!(o.settled(input.uuid()), vec![ack()], "{c:?}");
        let poisoned = h.kept("poison").await;
        assert_eq!(poisoned.len(), 1, "{c:?}");
        assert_eq!(
            poisoned[0].metadata().get(headers::POISON_REASON),
            Some("any error")
        );

        let h = Harness::new(c);
        let picky = PoisonQueue::new(h.publisher(), "poison").when(|e| e.to_string() == "mine");
        // Fails with its payload on the first delivery.
        let handler = TestHandler::new(|m, _| {
            if attempt(m) > 1 {
                return Ok(Vec::new());
            }
            Err(text(m).into())
        });
        let (other, mine) = (Message::new("other"), Message::new("mine"));
        let o = h
            .run(picky.clone(), handler, vec![other.clone(), mine.clone()])
            .await;
        assert_eq!(o.settled(mine.uuid()), vec![ack()], "{c:?}");
        assert_eq!(o.settled(other.uuid()), vec![nack("other"), ack()], "{c:?}");
        let poisoned = h.kept("poison").await;
        assert_eq!(poisoned.len(), 1, "{c:?}");
        assert_eq!(text(&poisoned[0]), "mine");
        assert_eq!(picky.poisoned(), 1, "{c:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_poison_publish_nacks_the_input() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let closed = h.publisher();
        closed.close().await.expect("closed"); // every publish through it fails
        let poison = PoisonQueue::new(closed, "poison");
        let input = Message::new("x");
        let handler = TestHandler::new(|_, _| Err(permanent("bad")));
        let o = h
            .run_until(poison.clone(), handler, vec![input.clone()], |d| {
                d.len() >= 2
            })
            .await;
        let deliveries = o.deliveries_of(input.uuid());
        assert_eq!(deliveries[0].attempt, Some(1), "{c:?}");
        assert_eq!(
            deliveries[1].attempt,
            Some(2),
            "{c:?}: nacked and redelivered, not lost"
        );
        let Settled::Nack { error, delay } = deliveries[0].settled() else {
            panic!("{c:?}: nacked")
        };
        assert!(
            error.starts_with(&format!(
                "cannot publish message {} to poison topic `poison`",
                input.uuid()
            )) && error.ends_with("handler error: bad"),
            "{c:?}: {error}"
        );
        assert_eq!(delay, None, "{c:?}: the router's own backoff");
        assert_eq!(o.backlog, 1, "{c:?}");
        assert_eq!(poison.poisoned(), 0);
    }
}

/// A message consumed from the poison topic itself is never poisoned there again: the
/// error is passed on and the router redelivers it with its backoff.
#[tokio::test(start_paused = true)]
async fn never_poisons_onto_the_topic_the_message_came_from() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let poison = PoisonQueue::new(h.publisher(), TOPIC);
        let input = Message::new("x");
        let handler = TestHandler::new(|_, _| Err(permanent("bad")));
        let o = h
            .run_until(poison.clone(), handler, vec![input.clone()], |d| {
                d.len() >= 2
            })
            .await;
        assert_eq!(
            o.settled(input.uuid())[..2],
            [nack("bad"), nack("bad")],
            "{c:?}"
        );
        assert!(
            o.deliveries_of(input.uuid())[0]
                .error()
                .is_some_and(permanent_error),
            "{c:?}: the handler's own (permanent) error"
        );
        assert_eq!(poison.poisoned(), 0, "{c:?}");
        assert_eq!(o.backlog, 1, "{c:?}: only the original, no copy");
    }
}

#[tokio::test(start_paused = true)]
async fn the_poison_topic_keeps_messages_for_the_chosen_group() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let poison = PoisonQueue::new(h.publisher(), "poison").retain_for("auditors");
        let input = Message::new("x");
        let o = h
            .run(
                poison,
                TestHandler::new(|_, _| Err(permanent("bad"))),
                vec![input.clone()],
            )
            .await;
        assert_eq!(o.settled(input.uuid()), vec![ack()], "{c:?}");
        let kept = h.kept_for("poison", "auditors").await;
        assert_eq!(kept.len(), 1, "{c:?}");
        assert_eq!(kept[0].uuid(), input.uuid());
        assert_eq!(h.broker.group_backlog("poison", "poison"), None);
    }
}

#[tokio::test(start_paused = true)]
async fn without_retention_a_poisoned_message_nobody_receives_is_nacked_not_lost() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let poison = PoisonQueue::new(h.publisher(), "poison").without_retention();
        let input = Message::new("x");
        let handler = TestHandler::new(|_, _| Err(permanent("bad")));
        let o = h
            .run_until(poison.clone(), handler.clone(), vec![input.clone()], |d| {
                d.len() >= 2
            })
            .await;
        let Settled::Nack { error, .. } = &o.settled(input.uuid())[0] else {
            panic!("{c:?}: nacked")
        };
        assert!(error.contains("poison topic `poison`"), "{c:?}: {error}");
        assert_eq!(o.backlog, 1, "{c:?}");
        assert_eq!(poison.poisoned(), 0);

        // A group that exists already (made by hand) receives them.
        let h = Harness::new(c);
        h.broker
            .subscriber()
            .initialize("poison", &SubscribeOptions::group("ops"))
            .await
            .expect("group made");
        let poison = PoisonQueue::new(h.publisher(), "poison").without_retention();
        let o = h
            .run(
                poison,
                TestHandler::new(|_, _| Err(permanent("bad"))),
                vec![input.clone()],
            )
            .await;
        assert_eq!(o.settled(input.uuid()), vec![ack()], "{c:?}");
        assert_eq!(h.kept_for("poison", "ops").await.len(), 1, "{c:?}");
    }
}

/// The layer's future owns what its error path needs: dropping the service (and the
/// layer) before the future runs changes nothing.
#[tokio::test(start_paused = true)]
async fn a_future_that_outlives_its_service_still_poisons() {
    let broker = MemoryBroker::new();
    let poison = PoisonQueue::new(broker.publisher(), "poison");
    let stats = poison.clone();
    let mut service = poison.layer(TestHandler::new(|_, _| Err(permanent("bad"))));
    let fut = service
        .ready()
        .await
        .expect("ready")
        .call(received(Message::new("x"), Some(1)));
    drop(service);
    drop(poison);
    assert!(
        fut.await.expect("poisoned").is_empty(),
        "Ok(nothing): the router acks"
    );
    let kept = kept_for(&broker, "poison", "poison").await;
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].metadata().get(headers::POISON_REASON), Some("bad"));
    assert_eq!(stats.poisoned(), 1);
}
