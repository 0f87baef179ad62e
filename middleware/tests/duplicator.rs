//! Duplicator: the handler runs twice per message; both runs' outputs are published.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use common::*;
use tidemill_core::{HandlerResult, MemoryBroker, Message, Publisher, Router};
use tidemill_middleware::Duplicator;

#[tokio::test(start_paused = true)]
async fn both_runs_are_published_in_every_composition() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let input = Message::new("x");
        let handler = TestHandler::new(|m, n| Ok(vec![Message::new(format!("{}-{n}", text(m)))]));
        let o = h.run(Duplicator::new(), handler, vec![input.clone()]).await;
        assert_eq!(o.calls_of(input.uuid()).len(), 2, "{c:?}");
        assert_eq!(
            o.settled(input.uuid()),
            vec![Settled::Ack { outputs: 2 }],
            "{c:?}"
        );
        let outputs: Vec<String> = o.outputs.iter().map(text).collect();
        assert_eq!(outputs, vec!["x-1", "x-2"], "{c:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn either_run_failing_fails_the_message() {
    for c in Composition::ALL {
        let h = Harness::new(c);
        let input = Message::new("x");
        // The second run of the first delivery fails.
        let o = h
            .run(
                Duplicator::new(),
                TestHandler::new(|_, n| {
                    if n == 2 {
                        Err("second".into())
                    } else {
                        Ok(Vec::new())
                    }
                }),
                vec![input.clone()],
            )
            .await;
        assert_eq!(
            o.settled(input.uuid()),
            vec![nack("second"), ack()],
            "{c:?}"
        );
        assert_eq!(o.call_attempts(input.uuid()), vec![1, 1, 2, 2], "{c:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_duplicator_runs_the_handler_twice() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    router
        .add_handler("h")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .publish(broker.publisher(), "out")
        .layer(Duplicator::new())
        .handler(move |m: Message| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move { HandlerResult::Ok(Message::new(format!("{}-{n}", text(&m)))) }
        })
        .await
        .unwrap();
    let mut out = watch(&broker, "out").await;
    let _run = start(&router).await;
    broker
        .publisher()
        .publish_one("in", Message::new("x"))
        .await
        .unwrap();
    assert_eq!(text(&next(&mut out).await), "x-0");
    assert_eq!(text(&next(&mut out).await), "x-1");
    eventually("acked", || broker.group_backlog("in", "g") == Some(0)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    quiet(&mut out).await;
    router.close().await.unwrap();
}
