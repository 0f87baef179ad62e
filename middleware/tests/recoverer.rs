//! Recoverer: a panic in the handler (in its `call` or while its future runs) becomes a
//! `Panicked` error the layers outside see. The same in every composition.

mod common;

use std::time::Duration;

use common::*;
use tidemill_core::Message;
use tidemill_middleware::{headers, Backoff, Panicked, PoisonQueue, Recoverer, Retry};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

#[tokio::test(start_paused = true)]
async fn recovered_panics_are_retried_and_poisoned() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let stack = ServiceBuilder::new()
            .layer(PoisonQueue::new(h.publisher(), "poison").all_errors())
            .layer(
                Retry::new()
                    .max_attempts(2)
                    .backoff(Backoff::new(Duration::from_millis(10))),
            )
            .layer(Recoverer::new())
            .into_inner();
        let handler = TestHandler::new(|m, n| {
            if text(m) == "always" || n == 1 {
                panic!("kaboom {}", text(m));
            }
            Ok(Vec::new())
        });
        let (once, always) = (Message::new("once"), Message::new("always"));
        let o = h
            .run(stack, handler, vec![once.clone(), always.clone()])
            .await;
        // The panic was retried in-process.
        assert_eq!(o.call_attempts(once.uuid()), vec![1, 1], "{c:?}");
        assert_eq!(o.settled(once.uuid()), vec![ack()], "{c:?}");
        // Both attempts panicked: poisoned with the panic message, acked.
        assert_eq!(o.call_attempts(always.uuid()), vec![1, 1], "{c:?}");
        assert_eq!(o.settled(always.uuid()), vec![ack()], "{c:?}");
        let poisoned = h.kept("poison").await;
        assert_eq!(poisoned.len(), 1, "{c:?}");
        assert_eq!(poisoned[0].uuid(), always.uuid());
        assert_eq!(
            poisoned[0].metadata().get(headers::POISON_REASON),
            Some("handler panicked: kaboom always")
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_call_becomes_an_error_too() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let handler = TestHandler::ok().panicking_in_call(|_, n| n == 1);
        let input = Message::new("x");
        let o = h.run(Recoverer::new(), handler, vec![input.clone()]).await;
        assert_eq!(
            o.settled(input.uuid()),
            vec![nack("handler panicked: panicked in call 1 of x"), ack()],
            "{c:?}"
        );
        assert_eq!(o.call_attempts(input.uuid()), vec![1, 2], "{c:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_error_carries_the_panic_message() {
    let mut service = Recoverer::new().layer(TestHandler::new(|_, _| {
        std::panic::panic_any(42_u32);
    }));
    let err = service
        .ready()
        .await
        .expect("ready")
        .call(received(Message::new("x"), Some(1)))
        .await
        .expect_err("recovered");
    let panicked = err.downcast_ref::<Panicked>().expect("a Panicked error");
    assert_eq!(panicked.message, "non-string panic payload");
    let err = service
        .ready()
        .await
        .expect("ready")
        .call(received(Message::new("x"), Some(1)))
        .await
        .expect_err("recovered");
    assert_eq!(
        err.to_string(),
        "handler panicked: non-string panic payload"
    );
}
