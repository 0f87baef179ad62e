//! Throttle: at most N messages per duration, one budget per value or per handler.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use parking_lot::Mutex;
use tidemill_core::{HandlerResult, MemoryBroker, Message, Publisher, Router};
use tidemill_middleware::Throttle;

/// In every composition the calls are spaced by the interval (tokio's clock is paused, so
/// the spacing is exact).
#[tokio::test(start_paused = true)]
async fn calls_are_spaced_by_the_interval() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let throttle = Throttle::new(10, Duration::from_secs(1)); // one every 100 ms
        let inputs: Vec<Message> = (0..4)
            .map(|i| Message::new(i.to_string()).with_key("k"))
            .collect();
        let o = h.run(throttle, TestHandler::ok(), inputs.clone()).await;
        let mut starts: Vec<_> = o.calls.iter().map(|c| c.at).collect();
        starts.sort();
        assert_eq!(starts.len(), 4, "{c:?}");
        for pair in starts.windows(2) {
            assert!(
                pair[1] - pair[0] + TIMER_SLACK >= Duration::from_millis(100),
                "{c:?}: {:?}",
                pair[1] - pair[0]
            );
        }
        for m in &inputs {
            assert_eq!(o.settled(m.uuid()), vec![ack()], "{c:?}");
        }
    }
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

#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
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
