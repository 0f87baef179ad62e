//! Delayed redelivery: a failure asks the router to nack with a delay that grows with the
//! delivery attempt; permanent errors and delays asked for already are passed on as they
//! are. The same in every composition.

mod common;

use std::time::Duration;

use common::*;
use tidemill_core::router::redeliver_after;
use tidemill_core::{permanent, MemoryBroker, Message};
use tidemill_middleware::{Backoff, DelayedRedelivery};
use tower::{Layer, Service, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(start_paused = true)]
async fn nacks_with_growing_delays() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let layer = DelayedRedelivery::new(Backoff::new(ms(100)).multiplier(2.0));
        let handler = TestHandler::new(|m, _| {
            if attempt(m) < 3 {
                return Err("busy".into());
            }
            Ok(Vec::new())
        });
        let input = Message::new("x");
        let o = h.run(layer, handler, vec![input.clone()]).await;
        assert_eq!(o.call_attempts(input.uuid()), vec![1, 2, 3], "{c:?}");
        assert_eq!(
            o.settled(input.uuid()),
            vec![
                nack_after("busy", ms(100)),
                nack_after("busy", ms(200)),
                ack()
            ],
            "{c:?}"
        );
        // The broker held the message back that long (and not much longer).
        let gaps = o.gaps(input.uuid());
        for (gap, delay) in gaps.iter().zip([ms(100), ms(200)]) {
            assert!(
                *gap + TIMER_SLACK >= delay && *gap < delay + ms(20),
                "{c:?}: {gap:?} for {delay:?}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_explicit_redelivery_delay_is_kept() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let layer = DelayedRedelivery::new(Backoff::new(ms(1)));
        let handler = TestHandler::new(|m, _| {
            if attempt(m) == 1 {
                return Err(redeliver_after(ms(200), "rate limited"));
            }
            Ok(Vec::new())
        });
        let input = Message::new("x");
        let o = h.run(layer, handler, vec![input.clone()]).await;
        assert_eq!(
            o.settled(input.uuid()),
            vec![nack_after("rate limited", ms(200)), ack()],
            "{c:?}"
        );
        assert!(o.gaps(input.uuid())[0] + TIMER_SLACK >= ms(200), "{c:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn permanent_errors_are_passed_on_unchanged() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let layer = DelayedRedelivery::new(Backoff::new(Duration::from_secs(5)));
        let handler = TestHandler::new(|m, _| {
            if attempt(m) == 1 {
                return Err(permanent("bad payload"));
            }
            Ok(Vec::new())
        });
        let input = Message::new("x");
        let o = h.run(layer, handler, vec![input.clone()]).await;
        assert_eq!(
            o.settled(input.uuid()),
            vec![nack("bad payload"), ack()],
            "{c:?}: no delay of the layer's: the router's default applies"
        );
        assert!(
            o.deliveries_of(input.uuid())[0]
                .error()
                .is_some_and(permanent_error),
            "{c:?}: still permanent"
        );
        assert!(o.gaps(input.uuid())[0] < Duration::from_secs(5), "{c:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_predicate_picks_the_errors_to_delay() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let layer = DelayedRedelivery::new(Backoff::new(ms(300))).when(|e| e.to_string() == "slow");
        let handler = TestHandler::new(|m, _| {
            if attempt(m) == 1 {
                return Err(text(m).into());
            }
            Ok(Vec::new())
        });
        let (slow, other) = (Message::new("slow"), Message::new("other"));
        let o = h
            .run(layer, handler, vec![slow.clone(), other.clone()])
            .await;
        assert_eq!(
            o.settled(slow.uuid()),
            vec![nack_after("slow", ms(300)), ack()],
            "{c:?}"
        );
        assert_eq!(o.settled(other.uuid()), vec![nack("other"), ack()], "{c:?}");
    }
}

/// The layer's future owns what its error path needs.
#[tokio::test(start_paused = true)]
async fn a_future_that_outlives_its_service_still_asks_for_the_delay() {
    let _broker = MemoryBroker::new();
    let layer = DelayedRedelivery::new(Backoff::new(ms(100)).multiplier(3.0));
    let mut service = layer.layer(TestHandler::failing("busy"));
    let fut = service
        .ready()
        .await
        .expect("ready")
        .call(received(Message::new("x"), Some(2)));
    drop(service);
    drop(layer);
    let err = tokio::spawn(fut)
        .await
        .expect("no panic")
        .expect_err("failed");
    assert_eq!(err.to_string(), "busy");
    assert_eq!(delay_of(&err), Some(ms(300)), "the delay of delivery 2");
}
