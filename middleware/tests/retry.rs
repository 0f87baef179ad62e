//! Retry: calls the handler again in-process with backoff, up to its limits, and passes
//! the last error on unchanged. The same in every composition.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::FutureExt;
use parking_lot::Mutex;
use tidemill_core::{permanent, BoxError, Message};
use tidemill_middleware::{headers, AttemptTimedOut, Backoff, PoisonQueue, Retry};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

fn fast() -> Backoff {
    Backoff::new(Duration::from_millis(10))
}

/// The times of the calls of `uuid`, from the first.
fn call_times(o: &Outcome, uuid: &str) -> Vec<Duration> {
    let calls = o.calls_of(uuid);
    calls.iter().map(|c| c.at - calls[0].at).collect()
}

#[tokio::test(start_paused = true)]
async fn calls_again_with_backoff_then_succeeds() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        let retry = Retry::new()
            .max_attempts(3)
            .backoff(fast().multiplier(2.0))
            .on_retry(move |e| {
                ev.lock()
                    .push((e.attempt, e.delay, e.error.to_string(), text(e.message)))
            });
        let input = Message::new("x");
        let o = h
            .run(
                retry,
                TestHandler::failing_first(2, "flaky"),
                vec![input.clone()],
            )
            .await;
        let uuid = input.uuid();
        // In-process retries: the broker delivered it once.
        assert_eq!(o.call_attempts(uuid), vec![1, 1, 1], "{c:?}");
        assert_eq!(o.settled(uuid), vec![ack()], "{c:?}");
        assert_eq!(
            call_times(&o, uuid),
            vec![
                Duration::ZERO,
                Duration::from_millis(10),
                Duration::from_millis(30)
            ],
            "{c:?}: the backoff's delays between calls"
        );
        assert_eq!(
            *events.lock(),
            vec![
                (
                    1,
                    Duration::from_millis(10),
                    "flaky".to_owned(),
                    "x".to_owned()
                ),
                (
                    2,
                    Duration::from_millis(20),
                    "flaky".to_owned(),
                    "x".to_owned()
                )
            ],
            "{c:?}"
        );
        // Every attempt gets the message as the layer received it, context included.
        for call in o.calls_of(uuid) {
            assert_eq!(call.message.uuid(), uuid);
            let ctx = call.message.context().expect("receive context");
            assert_eq!(ctx.handler().name, HANDLER);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn gives_up_after_max_attempts_and_passes_the_last_error_on() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let retry = Retry::new().max_attempts(3).backoff(fast());
        let input = Message::new("x");
        // Three calls per delivery: the first delivery fails all three (the error goes to
        // the router, which nacks), the second succeeds on its second call.
        let handler = TestHandler::new(|_, n| {
            if n <= 4 {
                return Err(format!("down {n}").into());
            }
            Ok(Vec::new())
        });
        let o = h.run(retry, handler, vec![input.clone()]).await;
        assert_eq!(o.call_attempts(input.uuid()), vec![1, 1, 1, 2, 2], "{c:?}");
        assert_eq!(
            o.settled(input.uuid()),
            vec![nack("down 3"), ack()],
            "{c:?}: the last error, unchanged, with no delay of its own"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn leaves_permanent_errors_and_unlisted_errors_alone() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let poison = PoisonQueue::new(h.publisher(), "poison");
        let stack = ServiceBuilder::new().layer(poison.clone()).layer(
            Retry::new().max_attempts(5).backoff(fast()).retry_if(|e| {
                !tidemill_core::is_permanent(e.as_ref()) && !e.to_string().contains("not-retried")
            }),
        );
        let handler = TestHandler::new(|m, _| match text(m).as_str() {
            "permanent" => Err(permanent("bad payload")),
            _ if attempt(m) == 1 => Err("not-retried: bad too".into()),
            _ => Ok(Vec::new()),
        });
        let (bad, other) = (Message::new("permanent"), Message::new("other"));
        let o = h
            .run(
                stack.into_inner(),
                handler,
                vec![bad.clone(), other.clone()],
            )
            .await;
        // Permanent: one call, poisoned by the layer outside.
        assert_eq!(o.call_attempts(bad.uuid()), vec![1], "{c:?}");
        assert_eq!(o.settled(bad.uuid()), vec![ack()], "{c:?}");
        let poisoned = h.kept("poison").await;
        assert_eq!(poisoned.len(), 1, "{c:?}");
        assert_eq!(text(&poisoned[0]), "permanent");
        // Not retried in-process: the next call is the broker's redelivery.
        assert_eq!(o.call_attempts(other.uuid()), vec![1, 2], "{c:?}");
        assert_eq!(
            o.settled(other.uuid()),
            vec![nack("not-retried: bad too"), ack()],
            "{c:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn each_attempt_gets_a_fresh_timeout() {
    for c in Composition::ALL {
        // The first call of each message hangs: only a timeout ends it.
        let hangs_first = || {
            TestHandler::with_future(|_, n| {
                async move {
                    if n == 1 {
                        std::future::pending::<()>().await;
                    }
                    Ok(Vec::new())
                }
                .boxed()
            })
        };
        let errors = Arc::new(Mutex::new(Vec::new()));
        let record = |errors: &Arc<Mutex<Vec<String>>>| {
            let errors = errors.clone();
            move |e: &tidemill_middleware::RetryEvent<'_>| {
                let kind = if e.error.is::<AttemptTimedOut>() {
                    "attempt timeout"
                } else if e.error.is::<tower::timeout::error::Elapsed>() {
                    "tower timeout"
                } else {
                    "other"
                };
                errors.lock().push(format!("{} {kind}", e.attempt));
            }
        };
        // tower's TimeoutLayer inside the retry layer.
        let h = Harness::new(c);
        let stack = ServiceBuilder::new()
            .layer(
                Retry::new()
                    .max_attempts(2)
                    .backoff(fast())
                    .on_retry(record(&errors)),
            )
            .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(
                200,
            )))
            .into_inner();
        let input = Message::new("x");
        let o = h.run(stack, hangs_first(), vec![input.clone()]).await;
        assert_eq!(o.settled(input.uuid()), vec![ack()], "{c:?}");
        assert_eq!(
            call_times(&o, input.uuid()),
            vec![Duration::ZERO, Duration::from_millis(210)],
            "{c:?}: timed out at 200 ms, retried 10 ms later"
        );
        // Retry's own attempt timeout.
        let h = Harness::new(c);
        let retry = Retry::new()
            .max_attempts(2)
            .backoff(fast())
            .attempt_timeout(Duration::from_millis(200))
            .on_retry(record(&errors));
        let o = h.run(retry, hangs_first(), vec![input.clone()]).await;
        assert_eq!(o.settled(input.uuid()), vec![ack()], "{c:?}");
        assert_eq!(
            call_times(&o, input.uuid()),
            vec![Duration::ZERO, Duration::from_millis(210)],
            "{c:?}"
        );
        assert_eq!(
            std::mem::take(&mut *errors.lock()),
            vec!["1 tower timeout", "1 attempt timeout"],
            "{c:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn stops_when_the_elapsed_budget_is_spent() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let retry = Retry::new()
            .max_attempts(100)
            .backoff(Backoff::new(Duration::from_millis(100)).multiplier(1.0))
            .max_elapsed(Duration::from_millis(250));
        let input = Message::new("x");
        let o = h
            .run(
                retry,
                TestHandler::failing_first(3, "down"),
                vec![input.clone()],
            )
            .await;
        // Calls at 0, 100, 200 ms; a fourth would start at 300 ms > 250 ms: the error goes
        // to the router, and the redelivery's first call succeeds.
        assert_eq!(o.call_attempts(input.uuid()), vec![1, 1, 1, 2], "{c:?}");
        assert_eq!(
            call_times(&o, input.uuid())[..3],
            [
                Duration::ZERO,
                Duration::from_millis(100),
                Duration::from_millis(200)
            ],
            "{c:?}"
        );
        assert_eq!(o.settled(input.uuid()), vec![nack("down"), ack()], "{c:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn one_attempt_means_no_retry() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let input = Message::new("x");
        let o = h
            .run(
                Retry::new().max_attempts(1),
                TestHandler::failing_first(1, "down"),
                vec![input.clone()],
            )
            .await;
        assert_eq!(o.call_attempts(input.uuid()), vec![1, 2], "{c:?}");
        assert_eq!(o.settled(input.uuid()), vec![nack("down"), ack()], "{c:?}");
    }
}

/// Each attempt sees the message retry was given, with the changes of layers outside it.
#[tokio::test(start_paused = true)]
async fn retries_get_the_message_an_outer_layer_changed() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let stamp = tower::util::MapRequestLayer::new(|mut m: Message| {
            m.metadata_mut().set("outer", "stamped");
            m
        });
        let stack = ServiceBuilder::new()
            .layer(stamp)
            .layer(Retry::new().backoff(fast()))
            .into_inner();
        let input = Message::new("x");
        let o = h
            .run(
                stack,
                TestHandler::failing_first(1, "once"),
                vec![input.clone()],
            )
            .await;
        let calls = o.calls_of(input.uuid());
        assert_eq!(calls.len(), 2, "{c:?}");
        for call in calls {
            assert_eq!(call.message.metadata().get("outer"), Some("stamped"));
            assert_eq!(
                call.message.context().map(|c| c.handler().name.as_str()),
                Some(HANDLER)
            );
        }
    }
}

/// The layer's future owns the message and a handle on the service: dropping the service
/// (and the layer) before the future runs changes nothing.
#[tokio::test(start_paused = true)]
async fn a_future_that_outlives_its_service_still_retries() {
    let handler = TestHandler::failing_first(2, "flaky");
    let retry = Retry::new().max_attempts(3).backoff(fast());
    let mut service = retry.layer(handler.clone());
    let fut = service
        .ready()
        .await
        .expect("ready")
        .call(received(Message::new("x"), Some(1)));
    drop(service);
    drop(retry);
    let out = tokio::spawn(fut).await.expect("no panic");
    assert!(out.expect("the third call succeeds").is_empty());
    assert_eq!(handler.calls().len(), 3);
}

/// Two futures of one service retry at the same time without getting in each other's way.
#[tokio::test(start_paused = true)]
async fn concurrent_futures_of_one_service_each_retry() {
    let handler = TestHandler::failing_first(2, "flaky");
    let mut service = Retry::new()
        .max_attempts(3)
        .backoff(fast())
        .layer(handler.clone());
    let (a, b) = (Message::new("a"), Message::new("b"));
    let fa = service
        .ready()
        .await
        .expect("ready")
        .call(received(a.clone(), Some(1)));
    let fb = service
        .ready()
        .await
        .expect("ready")
        .call(received(b.clone(), Some(1)));
    let (ra, rb) = tokio::join!(tokio::spawn(fa), tokio::spawn(fb));
    assert!(ra.expect("no panic").is_ok());
    assert!(rb.expect("no panic").is_ok());
    let calls = handler.calls();
    for m in [&a, &b] {
        assert_eq!(
            calls
                .iter()
                .filter(|c| c.message.uuid() == m.uuid())
                .count(),
            3
        );
    }
}

/// The broker is untouched by retries: a handler's outputs of the successful attempt are
/// all that is published.
#[tokio::test(start_paused = true)]
async fn only_the_successful_attempt_s_outputs_are_published() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let handler = TestHandler::new(|_, n| {
            if n < 3 {
                return Err(BoxError::from(format!("attempt {n}")));
            }
            Ok(vec![
                Message::new(format!("out {n}")).with_metadata(headers::CORRELATION_ID, "c")
            ])
        });
        let input = Message::new("x");
        let o = h
            .run(Retry::new().backoff(fast()), handler, vec![input.clone()])
            .await;
        assert_eq!(
            o.settled(input.uuid()),
            vec![Settled::Ack { outputs: 1 }],
            "{c:?}"
        );
        let outputs: Vec<String> = o.outputs.iter().map(text).collect();
        assert_eq!(outputs, vec!["out 3"], "{c:?}");
    }
}
