//! Circuit breaker: after N consecutive failures the circuit opens and messages are nacked
//! with the time it stays open, unhandled; after that one probe decides.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tidemill_core::{HandlerResult, MemoryBroker, Message, Publisher, Router};
use tidemill_middleware::{CircuitBreaker, CircuitState};

/// In every composition: the failure is passed on and opens the circuit, the redelivery is
/// refused with the time left, the one after that is the probe and closes it.
#[tokio::test(start_paused = true)]
async fn a_refused_message_is_nacked_with_the_time_the_circuit_stays_open() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let breaker = CircuitBreaker::new(1, Duration::from_secs(10));
        let input = Message::new("x");
        let o = h
            .run(
                breaker.clone(),
                TestHandler::failing_first(1, "dependency down"),
                vec![input.clone()],
            )
            .await;
        let settled = o.settled(input.uuid());
        assert_eq!(settled.len(), 3, "{c:?}: {settled:?}");
        assert_eq!(settled[0], nack("dependency down"), "{c:?}");
        let Settled::Nack { error, delay } = &settled[1] else {
            panic!("{c:?}: refused")
        };
        assert!(error.contains("circuit"), "{c:?}: {error}");
        // Opened when delivery 1 failed; delivery 2 came the router's redelivery delay later.
        let left = delay.expect("a delay");
        assert!(
            left <= Duration::from_secs(10) - REDELIVERY + TIMER_SLACK
                && left >= Duration::from_secs(10) - REDELIVERY - Duration::from_millis(20),
            "{c:?}: {left:?}"
        );
        assert_eq!(settled[2], ack(), "{c:?}: the probe");
        assert_eq!(
            o.call_attempts(input.uuid()),
            vec![1, 3],
            "{c:?}: not called while open"
        );
        assert_eq!(breaker.state(), CircuitState::Closed);
    }
}

#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
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
