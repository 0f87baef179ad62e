//! Correlation id: every output gets the input's correlation id (or, starting a chain, the
//! input's uuid); outputs with their own keep it; the input is left as it is. The same in
//! every composition.

mod common;

use common::*;
use tidemill_core::Message;
use tidemill_middleware::{correlation_id, headers, CorrelationId};
use tower::{Layer, Service, ServiceExt};

/// Returns `a`, `b` and `own` (with correlation id `mine`).
fn splitter() -> TestHandler {
    TestHandler::new(|_, _| {
        let own = Message::new("own").with_metadata(headers::CORRELATION_ID, "mine");
        Ok(vec![Message::new("a"), Message::new("b"), own])
    })
}

fn ids(out: &[Message]) -> Vec<(String, Option<String>)> {
    out.iter()
        .map(|m| (text(m), correlation_id(m).map(str::to_owned)))
        .collect()
}

fn pair(t: &str, id: &str) -> (String, Option<String>) {
    (t.to_owned(), Some(id.to_owned()))
}

#[tokio::test(start_paused = true)]
async fn the_correlation_id_is_copied_to_every_output_and_a_chain_starts_with_the_first_uuid() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let tagged = Message::new("x")
            .with_metadata(headers::CORRELATION_ID, "c-1")
            .with_key("k");
        let origin = Message::new("no id").with_key("k");
        let o = h
            .run(
                CorrelationId::new(),
                splitter(),
                vec![tagged.clone(), origin.clone()],
            )
            .await;
        let calls = o.calls_of(tagged.uuid());
        assert_eq!(correlation_id(&calls[0].message), Some("c-1"), "{c:?}");
        let calls = o.calls_of(origin.uuid());
        assert_eq!(
            correlation_id(&calls[0].message),
            None,
            "{c:?}: the input is left as it is"
        );
        let first = &o.deliveries_of(tagged.uuid())[0];
        assert_eq!(
            ids(first.outputs()),
            vec![pair("a", "c-1"), pair("b", "c-1"), pair("own", "mine")],
            "{c:?}"
        );
        let second = &o.deliveries_of(origin.uuid())[0];
        // A chain starts: the outputs carry the uuid of the message that began it.
        assert_eq!(
            ids(second.outputs()),
            vec![
                pair("a", origin.uuid()),
                pair("b", origin.uuid()),
                pair("own", "mine")
            ],
            "{c:?}"
        );
        // And that is what was published, in order (one key: one at a time).
        assert_eq!(
            ids(&o.outputs),
            vec![
                pair("a", "c-1"),
                pair("b", "c-1"),
                pair("own", "mine"),
                pair("a", origin.uuid()),
                pair("b", origin.uuid()),
                pair("own", "mine")
            ],
            "{c:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_custom_key() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let input = Message::new("x").with_metadata("x-request-id", "r-9");
        let o = h
            .run(
                CorrelationId::key("x-request-id"),
                TestHandler::new(|_, _| Ok(vec![Message::new("o")])),
                vec![input],
            )
            .await;
        assert_eq!(o.outputs.len(), 1, "{c:?}");
        assert_eq!(o.outputs[0].metadata().get("x-request-id"), Some("r-9"));
        assert_eq!(o.outputs[0].metadata().get(headers::CORRELATION_ID), None);
    }
}

#[tokio::test(start_paused = true)]
async fn errors_are_passed_on_unchanged() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let input = Message::new("x").with_metadata(headers::CORRELATION_ID, "c-1");
        let handler = TestHandler::new(|m, _| {
            if attempt(m) == 1 {
                return Err("down".into());
            }
            Ok(vec![Message::new("o")])
        });
        let o = h
            .run(CorrelationId::new(), handler, vec![input.clone()])
            .await;
        assert_eq!(
            o.settled(input.uuid()),
            vec![nack("down"), Settled::Ack { outputs: 1 }],
            "{c:?}"
        );
        assert_eq!(ids(&o.outputs), vec![pair("o", "c-1")], "{c:?}");
    }
}

/// The future owns its copy of the input: dropping the service first changes nothing.
#[tokio::test(start_paused = true)]
async fn a_future_that_outlives_its_service_still_tags_the_outputs() {
    let mut service = CorrelationId::new().layer(splitter());
    let input = received(
        Message::new("x").with_metadata(headers::CORRELATION_ID, "c-7"),
        Some(1),
    );
    let fut = service.ready().await.expect("ready").call(input);
    drop(service);
    let out = tokio::spawn(fut).await.expect("no panic").expect("ok");
    assert_eq!(
        ids(&out),
        vec![pair("a", "c-7"), pair("b", "c-7"), pair("own", "mine")]
    );
}
