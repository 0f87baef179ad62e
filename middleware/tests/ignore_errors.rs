//! Ignore errors: the listed kinds of error count as success (acked); others are passed
//! on. The same in every composition.

mod common;

use common::*;
use tidemill_core::Message;
use tidemill_middleware::IgnoreErrors;
use tower::{Layer, Service, ServiceExt};

#[derive(Debug, thiserror::Error)]
#[error("already archived")]
struct AlreadyArchived;

fn archive_handler() -> TestHandler {
    TestHandler::new(|m, _| match text(m).as_str() {
        // Wrapped: still found in the source chain.
        "archived" => Err(Box::new(tidemill_core::Error::permanent(
            "db",
            "",
            "archive",
            AlreadyArchived,
        ))),
        "gone" => Err("gone".into()),
        _ if attempt(m) == 1 => Err("other".into()),
        _ => Ok(Vec::new()),
    })
}

#[tokio::test(start_paused = true)]
async fn ignored_errors_ack_and_others_are_passed_on() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let ignore = IgnoreErrors::new()
            .of_type::<AlreadyArchived>()
            .when(|e| e.to_string() == "gone");
        let inputs = vec![
            Message::new("archived"),
            Message::new("gone"),
            Message::new("other"),
        ];
        let o = h
            .run(ignore.clone(), archive_handler(), inputs.clone())
            .await;
        let [archived, gone, other] = &inputs[..] else {
            unreachable!()
        };
        assert_eq!(o.settled(archived.uuid()), vec![ack()], "{c:?}");
        assert_eq!(o.settled(gone.uuid()), vec![ack()], "{c:?}");
        assert_eq!(o.settled(other.uuid()), vec![nack("other"), ack()], "{c:?}");
        let mut calls: Vec<(String, u32)> = o
            .calls
            .iter()
            .map(|c| (text(&c.message), c.attempt()))
            .collect();
        calls.sort();
        assert_eq!(
            calls,
            vec![
                ("archived".into(), 1),
                ("gone".into(), 1),
                ("other".into(), 1),
                ("other".into(), 2)
            ],
            "{c:?}"
        );
        assert_eq!(ignore.ignored(), 2, "{c:?}");
    }
}

/// The layer's future owns what its error path needs.
#[tokio::test(start_paused = true)]
async fn a_future_that_outlives_its_service_still_ignores() {
    let ignore = IgnoreErrors::new().when(|e| e.to_string() == "gone");
    let stats = ignore.clone();
    let mut service = ignore.layer(TestHandler::failing("gone"));
    let fut = service
        .ready()
        .await
        .expect("ready")
        .call(received(Message::new("x"), Some(1)));
    drop(service);
    drop(ignore);
    assert!(tokio::spawn(fut)
        .await
        .expect("no panic")
        .expect("ignored")
        .is_empty());
    assert_eq!(stats.ignored(), 1);
}
