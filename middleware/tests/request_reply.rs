//! Request-reply on the in-memory broker: concurrency, timeouts, shutdown, replier crashes,
//! requests without a reply address.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tidemill_core::{HandlerResult, MemoryBroker, Message, Router, RouterConfig};
use tidemill_middleware::request_reply::{
    Replier, ReplyErrorKind, RequestError, Requester, RequesterConfig,
};
use tidemill_middleware::{headers, PoisonQueue};
use tokio::sync::Notify;
use tower::{Layer, Service};

async fn requester(broker: &MemoryBroker, timeout: Duration) -> Requester {
    Requester::connect(
        broker.publisher(),
        broker.subscriber(),
        RequesterConfig::default().timeout(timeout),
    )
    .await
    .expect("requester connects")
}

#[tokio::test]
async fn many_concurrent_requests_over_one_reply_subscription() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    router
        .add_handler("square")
        .subscribe(broker.subscriber(), "squares")
        .group("square")
        .concurrency(8)
        .layer(Replier::new(broker.publisher()))
        .handler(|m: Message| async move {
            let n: u64 = text(&m).parse()?;
            // Replies come back out of order.
            tokio::time::sleep(Duration::from_millis(n % 7)).await;
            HandlerResult::Ok(Message::new((n * n).to_string()))
        })
        .await
        .unwrap();
    let _run = start(&router).await;
    let requester = requester(&broker, WAIT).await;
    let replies = futures::future::join_all((0..200u64).map(|n| {
        let requester = requester.clone();
        async move {
            let reply = requester
                .request("squares", Message::new(n.to_string()))
                .await
                .unwrap();
            (n, text(&reply))
        }
    }))
    .await;
    for (n, reply) in replies {
        assert_eq!(reply, (n * n).to_string());
    }
    assert_eq!(requester.pending(), 0);
    assert_eq!(requester.unknown_replies(), 0);
    eventually("requests acked", || {
        broker.group_backlog("squares", "square") == Some(0)
    })
    .await;
    requester.close().await;
    router.close().await.unwrap();
}

#[tokio::test]
async fn a_late_reply_is_acked_and_counted_after_the_timeout() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let release = Arc::new(Notify::new());
    let r = release.clone();
    router
        .add_handler("slow")
        .subscribe(broker.subscriber(), "slow")
        .group("slow")
        .layer(Replier::new(broker.publisher()))
        .handler(move |_m: Message| {
            let r = r.clone();
            async move {
                r.notified().await;
                HandlerResult::Ok(Message::new("late"))
            }
        })
        .await
        .unwrap();
    let _run = start(&router).await;
    let requester = requester(&broker, WAIT).await;
    let err = requester
        .request_timeout("slow", Message::new("x"), Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::Timeout { .. }), "{err}");
    assert!(
        err.to_string().contains("got no reply within 200ms"),
        "{err}"
    );
    assert_eq!(requester.pending(), 0, "an expired request is forgotten");
    release.notify_one();
    eventually("the late reply is counted", || {
        requester.unknown_replies() == 1
    })
    .await;
    // The reply subscription keeps working.
    let requester2 = requester.clone();
    let next = tokio::spawn(async move { requester2.request("slow", Message::new("y")).await });
    release.notify_one();
    assert_eq!(text(&next.await.unwrap().unwrap()), "late");
    requester.close().await;
    router.close().await.unwrap();
}

#[tokio::test]
async fn closing_the_requester_fails_pending_requests() {
    let broker = MemoryBroker::new();
    let requester = requester(&broker, WAIT).await;
    let r = requester.clone();
    // Nobody answers on this topic.
    let waiting = tokio::spawn(async move { r.request("nobody", Message::new("x")).await });
    eventually("the request is pending", || requester.pending() == 1).await;
    requester.close().await;
    let err = tokio::time::timeout(WAIT, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, RequestError::Closed { .. }), "{err}");
    assert!(err.to_string().contains("requester is closed"), "{err}");
    let err = requester
        .request("nobody", Message::new("y"))
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::Closed { .. }), "{err}");
}

#[tokio::test]
async fn handler_errors_come_back_typed_and_the_request_is_acked() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    router
        .add_handler("strict")
        .subscribe(broker.subscriber(), "strict")
        .group("strict")
        .layer(Replier::new(broker.publisher()))
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(
            100,
        )))
        .handler(|m: Message| async move {
            match text(&m).as_str() {
                "slow" => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    HandlerResult::Ok(())
                }
                "bad" => HandlerResult::Err(tidemill_core::permanent("no such product")),
                _ => HandlerResult::Err("stock service unavailable".into()),
            }
        })
        .await
        .unwrap();
    let _run = start(&router).await;
    let requester = requester(&broker, WAIT).await;
    for (req, kind, message) in [
        ("bad", ReplyErrorKind::Permanent, "no such product"),
        ("slow", ReplyErrorKind::Timeout, "request timed out"),
        ("other", ReplyErrorKind::Failed, "stock service unavailable"),
    ] {
        match requester.request("strict", Message::new(req)).await {
            Err(RequestError::Handler {
                kind: k,
                message: m,
                topic,
            }) => {
                assert_eq!((k, m.as_str(), topic.as_str()), (kind, message, "strict"));
            }
            other => panic!("{req}: expected a handler error, got {other:?}"),
        }
    }
    eventually("every request acked", || {
        broker.group_backlog("strict", "strict") == Some(0)
    })
    .await;
    requester.close().await;
    router.close().await.unwrap();
}

#[tokio::test]
async fn a_replier_crash_redelivers_and_the_requester_gets_one_result() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    router
        .add_handler("crashy")
        .subscribe(broker.subscriber(), "crashy")
        .group("crashy")
        .layer(Replier::new(broker.publisher()))
        .handler(move |m: Message| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    panic!("replier crashed before replying");
                }
                HandlerResult::Ok(Message::new(format!("{} handled", text(&m))))
            }
        })
        .await
        .unwrap();
    let _run = start(&router).await;
    let requester = requester(&broker, WAIT).await;
    let reply = requester
        .request("crashy", Message::new("order"))
        .await
        .unwrap();
    assert_eq!(text(&reply), "order handled");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "redelivered after the crash"
    );
    assert_eq!(requester.unknown_replies(), 0);
    requester.close().await;
    router.close().await.unwrap();
}

/// Fails after the inner service succeeded: a crash after the reply went out, before the
/// request was acked.
#[derive(Clone)]
struct CrashAfterReply(Arc<AtomicU32>);

impl<S> Layer<S> for CrashAfterReply {
    type Service = CrashAfterReplyService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CrashAfterReplyService(inner, self.0.clone())
    }
}

struct CrashAfterReplyService<S>(S, Arc<AtomicU32>);

impl<S> Service<Message> for CrashAfterReplyService<S>
where
    S: Service<Message, Response = Vec<Message>, Error = tidemill_core::BoxError>,
    S::Future: Send + 'static,
{
    type Response = Vec<Message>;
    type Error = tidemill_core::BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Vec<Message>, Self::Error>>;
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, m: Message) -> Self::Future {
        let first = self.1.fetch_add(1, Ordering::SeqCst) == 0;
        let fut = self.0.call(m);
        Box::pin(async move {
            let out = fut.await?;
            if first {
                return Err("crashed after replying".into());
            }
            Ok(out)
        })
    }
}

#[tokio::test]
async fn a_second_reply_after_a_redelivery_is_counted_not_returned() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let runs = Arc::new(AtomicU32::new(0));
    router
        .add_handler("twice")
        .subscribe(broker.subscriber(), "twice")
        .group("twice")
        .layer(CrashAfterReply(runs.clone()))
        .layer(Replier::new(broker.publisher()))
        .handler(|m: Message| async move { HandlerResult::Ok(Message::new(text(&m))) })
        .await
        .unwrap();
    let _run = start(&router).await;
    let requester = requester(&broker, WAIT).await;
    let reply = requester
        .request("twice", Message::new("once"))
        .await
        .unwrap();
    assert_eq!(text(&reply), "once");
    eventually("the request is finally acked", || {
        broker.group_backlog("twice", "twice") == Some(0)
    })
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    eventually("the duplicate reply is counted", || {
        requester.unknown_replies() == 1
    })
    .await;
    requester.close().await;
    router.close().await.unwrap();
}

#[tokio::test]
async fn a_request_abandoned_by_a_stopped_replier_is_answered_by_the_next() {
    let broker = MemoryBroker::new();
    let requester = requester(&broker, WAIT).await;
    let first = Router::with_config(RouterConfig {
        close_timeout: Duration::from_millis(100),
        ..RouterConfig::default()
    });
    let started = Arc::new(Notify::new());
    let s = started.clone();
    first
        .add_handler("stuck")
        .subscribe(broker.subscriber(), "work")
        .group("workers")
        .layer(Replier::new(broker.publisher()))
        .handler(move |_m: Message| {
            let s = s.clone();
            async move {
                s.notify_one();
                std::future::pending::<()>().await;
                HandlerResult::Ok(())
            }
        })
        .await
        .unwrap();
    let _run = start(&first).await;
    let r = requester.clone();
    let waiting = tokio::spawn(async move { r.request("work", Message::new("job")).await });
    started.notified().await;
    first.close().await.unwrap(); // abandons (nacks) the request
    let second = Router::new();
    second
        .add_handler("healthy")
        .subscribe(broker.subscriber(), "work")
        .group("workers")
        .layer(Replier::new(broker.publisher()))
        .handler(|m: Message| async move {
            HandlerResult::Ok(Message::new(format!("{} done", text(&m))))
        })
        .await
        .unwrap();
    let _run2 = start(&second).await;
    let reply = tokio::time::timeout(WAIT, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(text(&reply), "job done");
    requester.close().await;
    second.close().await.unwrap();
}

#[tokio::test]
async fn a_message_without_reply_address_takes_the_failure_path() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    router
        .add_handler("answers")
        .subscribe(broker.subscriber(), "questions")
        .group("g")
        .layer(PoisonQueue::new(broker.publisher(), "poison"))
        .layer(Replier::new(broker.publisher()))
        .handler(move |_m: Message| {
            c.fetch_add(1, Ordering::SeqCst);
            async { HandlerResult::Ok(Message::new("42")) }
        })
        .await
        .unwrap();
    let mut poisoned = watch(&broker, "poison").await;
    let _run = start(&router).await;
    // Published directly, not through a Requester.
    tidemill_core::Publisher::publish_one(&broker.publisher(), "questions", Message::new("?"))
        .await
        .unwrap();
    let p = next(&mut poisoned).await;
    let reason = p.metadata().get(headers::POISON_REASON).unwrap();
    assert!(
        reason.contains("no `tidemill-reply-to` metadata"),
        "{reason}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler is not called");
    eventually("acked", || {
        broker.group_backlog("questions", "g") == Some(0)
    })
    .await;
    router.close().await.unwrap();
}

#[tokio::test]
async fn streaming_replies_arrive_in_order_and_end() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    router
        .add_handler("count")
        .subscribe(broker.subscriber(), "count")
        .layer(Replier::new(broker.publisher()))
        .handler(|m: Message| async move {
            let n: usize = text(&m).parse()?;
            HandlerResult::Ok(
                (1..=n)
                    .map(|i| Message::new(i.to_string()))
                    .collect::<Vec<_>>(),
            )
        })
        .await
        .unwrap();
    let _run = start(&router).await;
    let requester = requester(&broker, WAIT).await;
    use futures::StreamExt;
    let stream = requester
        .request_stream("count", Message::new("5"))
        .await
        .unwrap();
    let got: Vec<(String, Option<String>)> = stream
        .map(|r| {
            let m = r.unwrap();
            (
                text(&m),
                m.metadata().get(headers::REPLY_SEQ).map(str::to_owned),
            )
        })
        .collect()
        .await;
    let expected: Vec<(String, Option<String>)> = (1..=5)
        .map(|i| (i.to_string(), Some(i.to_string())))
        .collect();
    assert_eq!(got, expected);
    // An error ends the stream with the error.
    let mut stream = requester
        .request_stream("count", Message::new("NaN"))
        .await
        .unwrap();
    match stream.next().await {
        Some(Err(RequestError::Handler { kind, .. })) => assert_eq!(kind, ReplyErrorKind::Failed),
        other => panic!("expected an error reply, got {other:?}"),
    }
    assert!(stream.next().await.is_none());
    assert_eq!(requester.pending(), 0);
    requester.close().await;
    router.close().await.unwrap();
}
