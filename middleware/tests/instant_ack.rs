//! Instant ack: the input is acked before the handler runs (at most once): a failure is
//! not redelivered; outputs are still published.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tidemill_core::{HandlerResult, MemoryBroker, Message, Publisher, Router};
use tidemill_middleware::InstantAck;
use tokio::sync::{mpsc, Notify};

/// In every composition that hands the layer the input's acknowledgement (the router, and
/// the harness standing in for it): acked first, so a failure is never redelivered.
#[tokio::test(start_paused = true)]
async fn a_failure_after_the_instant_ack_is_not_redelivered() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let (fails, ok) = (Message::new("fails"), Message::new("ok"));
        let handler = TestHandler::new(|m, _| {
            if text(m) == "fails" {
                return Err("fails after the ack".into());
            }
            Ok(vec![Message::new(format!("out-{}", text(m)))])
        });
        let o = h
            .run(InstantAck::new(), handler, vec![fails.clone(), ok.clone()])
            .await;
        assert_eq!(
            o.settled(fails.uuid()),
            vec![nack("fails after the ack")],
            "{c:?}: the error is seen, but the input was acked already: no redelivery"
        );
        assert_eq!(o.calls_of(fails.uuid()).len(), 1, "{c:?}");
        assert_eq!(
            o.settled(ok.uuid()),
            vec![Settled::Ack { outputs: 1 }],
            "{c:?}"
        );
        let outputs: Vec<String> = o.outputs.iter().map(text).collect();
        assert_eq!(
            outputs,
            vec!["out-ok"],
            "{c:?}: outputs are still published"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn instant_ack_acks_before_the_handler_runs_and_never_redelivers() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let release = Arc::new(Notify::new());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let r = release.clone();
    router
        .add_handler("h")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .publish(broker.publisher(), "out")
        .layer(InstantAck::new())
        .handler(move |m: Message| {
            let (tx, r) = (tx.clone(), r.clone());
            async move {
                tx.send(text(&m)).unwrap();
                r.notified().await;
                if text(&m) == "fails" {
                    return Err("fails after the ack".into());
                }
                HandlerResult::Ok(Message::new(format!("out-{}", text(&m))))
            }
        })
        .await
        .unwrap();
    let mut out = watch(&broker, "out").await;
    let _run = start(&router).await;
    broker
        .publisher()
        .publish("in", vec![Message::new("fails"), Message::new("ok")])
        .await
        .unwrap();
    assert_eq!(recv(&mut rx).await, "fails");
    // The handler is still running, yet its input is acked already.
    eventually("acked before handling", || {
        broker.group_backlog("in", "g") == Some(1)
    })
    .await;
    release.notify_one();
    assert_eq!(recv(&mut rx).await, "ok");
    eventually("both acked", || broker.group_backlog("in", "g") == Some(0)).await;
    release.notify_one();
    assert_eq!(
        text(&next(&mut out).await),
        "out-ok",
        "outputs are still published"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.try_recv().is_err(), "the failed one is not redelivered");
    router.close().await.unwrap();
}
