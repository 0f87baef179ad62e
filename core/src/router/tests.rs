use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::*;
use crate::{MemoryBroker, MemoryPublisher};

const WAIT: Duration = Duration::from_secs(10);

/// Spawns `router.run()` and waits until it runs.
async fn start(router: &Router) -> tokio::task::JoinHandle<Result<(), RouterError>> {
    let r = router.clone();
    let handle = tokio::spawn(async move { r.run().await });
    tokio::time::timeout(WAIT, router.running())
        .await
        .expect("router runs");
    handle
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("within 10s")
        .expect("channel open")
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn text(m: &Message) -> String {
    String::from_utf8_lossy(m.payload()).into_owned()
}

/// A publisher whose publishes fail while `failing` is set, otherwise forwards.
struct FlakyPublisher {
    inner: MemoryPublisher,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait]
impl Publisher for FlakyPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> crate::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(Error::transient(
                "flaky",
                topic,
                "publish",
                "injected failure",
            ));
        }
        self.inner.publish(topic, messages).await
    }
    async fn close(&self) -> crate::Result<()> {
        self.inner.close().await
    }
}

#[tokio::test]
async fn output_is_published_then_input_acked() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("upper")
        .subscribe(broker.subscriber(), "in")
        .group("upper")
        .publish(broker.publisher(), "out")
        .handler(|m: Message| async move {
            let mut out = Message::new(text(&m).to_uppercase());
            out.metadata_mut().set("source", m.uuid());
            HandlerResult::Ok(out)
        })
        .await
        .unwrap();
    router
        .add_handler("sink")
        .subscribe(broker.subscriber(), "out")
        .handler(move |m: Message| {
            let tx = tx.clone();
            async move {
                let ctx = m.context().expect("router sets the context");
                assert_eq!(ctx.handler().name, "sink");
                assert_eq!(ctx.attempt(), Some(1));
                tx.send(m).unwrap();
                HandlerResult::Ok(())
            }
        })
        .await
        .unwrap();
    let run = start(&router).await;
    let input = Message::new("hello");
    broker
        .publisher()
        .publish_one("in", input.clone())
        .await
        .unwrap();
    let out = recv(&mut rx).await;
    assert_eq!(text(&out), "HELLO");
    assert_eq!(out.metadata().get("source"), Some(input.uuid()));
    eventually("the input is acked", || {
        broker.group_backlog("in", "upper") == Some(0)
    })
    .await;
    router.close().await.unwrap();
    run.await.unwrap().unwrap();
    assert!(router.is_closed());
}

#[tokio::test]
async fn handler_error_nacks_and_the_message_comes_back() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("fails-once")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .handler(move |m: Message| {
            let tx = tx.clone();
            async move {
                let attempt = m.context().and_then(|c| c.attempt()).unwrap_or(0);
                tx.send(attempt).unwrap();
                if attempt == 1 {
                    return Err("first attempt fails".into());
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
    assert_eq!(recv(&mut rx).await, 1);
    assert_eq!(recv(&mut rx).await, 2);
    eventually("acked after the retry", || {
        broker.group_backlog("in", "g") == Some(0)
    })
    .await;
    router.close().await.unwrap();
}

#[tokio::test]
async fn publish_error_nacks_the_input() {
    let broker = MemoryBroker::new();
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let router = Router::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    router
        .add_handler("forward")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .publish(
            FlakyPublisher {
                inner: broker.publisher(),
                failing: failing.clone(),
            },
            "out",
        )
        .handler(move |m: Message| {
            c.fetch_add(1, Ordering::SeqCst);
            async move { HandlerResult::Ok(Message::new(m.payload().clone())) }
        })
        .await
        .unwrap();
    let mut out = broker
        .subscriber()
        .subscribe("out", SubscribeOptions::new())
        .await
        .unwrap();
    let _run = start(&router).await;
    broker
        .publisher()
        .publish_one("in", Message::new("x"))
        .await
        .unwrap();
    eventually("several failed attempts", || {
        calls.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert_eq!(
        broker.group_backlog("in", "g"),
        Some(1),
        "input not acked while publishing fails"
    );
    failing.store(false, Ordering::SeqCst);
    let d = tokio::time::timeout(WAIT, out.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.message().payload().as_ref(), b"x");
    eventually("acked once published", || {
        broker.group_backlog("in", "g") == Some(0)
    })
    .await;
    router.close().await.unwrap();
}

#[tokio::test]
async fn panics_nack_and_the_router_keeps_running() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("panicky")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .handler(move |m: Message| {
            let tx = tx.clone();
            // A panic before the future exists (in the synchronous part of the call).
            if text(&m) == "sync" && m.context().and_then(|c| c.attempt()) == Some(1) {
                panic!("sync panic");
            }
            async move {
                let attempt = m.context().and_then(|c| c.attempt()).unwrap_or(0);
                if text(&m) == "async" && attempt == 1 {
                    panic!("async panic");
                }
                tx.send((text(&m), attempt)).unwrap();
                HandlerResult::Ok(())
            }
        })
        .await
        .unwrap();
    let _run = start(&router).await;
    let p = broker.publisher();
    p.publish(
        "in",
        vec![
            Message::new("sync"),
            Message::new("async"),
            Message::new("fine"),
        ],
    )
    .await
    .unwrap();
    let mut got = vec![
        recv(&mut rx).await,
        recv(&mut rx).await,
        recv(&mut rx).await,
    ];
    got.sort();
    assert_eq!(
        got,
        vec![("async".into(), 2), ("fine".into(), 1), ("sync".into(), 2)],
        "panicked messages are redelivered and processed"
    );
    assert!(router.is_running());
    router.close().await.unwrap();
}

#[tokio::test]
async fn consumer_only_handler_returning_messages_is_an_error() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    router
        .add_handler("sink")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .handler(move |m: Message| {
            c.fetch_add(1, Ordering::SeqCst);
            async move { HandlerResult::Ok(m) }
        })
        .await
        .unwrap();
    let _run = start(&router).await;
    broker
        .publisher()
        .publish_one("in", Message::new("x"))
        .await
        .unwrap();
    eventually("redeliveries", || calls.load(Ordering::SeqCst) >= 2).await;
    assert_eq!(broker.group_backlog("in", "g"), Some(1), "never acked");
    router.close().await.unwrap();
}

#[tokio::test]
async fn duplicate_names_and_missing_subscription_are_rejected() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let h = |_m: Message| async { HandlerResult::Ok(()) };
    router
        .add_handler("a")
        .subscribe(broker.subscriber(), "t")
        .handler(h)
        .await
        .unwrap();
    let err = router
        .add_handler("a")
        .subscribe(broker.subscriber(), "t")
        .handler(h)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RouterError::DuplicateHandler(ref n) if n == "a"),
        "{err}"
    );
    assert_eq!(err.to_string(), "a handler named `a` already exists");
    let err = router.add_handler("b").handler(h).await.unwrap_err();
    assert!(matches!(err, RouterError::MissingSubscriber(_)), "{err}");
}

#[tokio::test]
async fn concurrency_keeps_order_per_key_and_runs_keys_in_parallel() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let seen: Arc<Mutex<HashMap<String, Vec<usize>>>> = Arc::default();
    let (in_flight, max_in_flight) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (s, f, mx) = (seen.clone(), in_flight.clone(), max_in_flight.clone());
    router
        .add_handler("ordered")
        .subscribe(broker.subscriber(), "in")
        .concurrency(8)
        .handler(move |m: Message| {
            let (s, f, mx) = (s.clone(), f.clone(), mx.clone());
            async move {
                let now = f.fetch_add(1, Ordering::SeqCst) + 1;
                mx.fetch_max(now, Ordering::SeqCst);
                let seq: usize = m.metadata().get_as("seq")?.unwrap_or_default();
                // Random-ish delays (from the uuid's random bits) shuffle completion order.
                let jitter = m.uuid().bytes().rev().take(4).map(u64::from).sum::<u64>() % 7;
                tokio::time::sleep(Duration::from_millis(jitter)).await;
                s.lock()
                    .entry(m.key_str().unwrap_or_default().to_owned())
                    .or_default()
                    .push(seq);
                f.fetch_sub(1, Ordering::SeqCst);
                HandlerResult::Ok(())
            }
        })
        .await
        .unwrap();
    let _run = start(&router).await;
    let per_key = 30;
    let msgs: Vec<Message> = (0..per_key)
        .flat_map(|seq| {
            (0..6).map(move |k| {
                Message::new("x")
                    .with_key(format!("k{k}"))
                    .with_metadata("seq", seq)
            })
        })
        .collect();
    broker.publisher().publish("in", msgs).await.unwrap();
    eventually("all processed", || {
        seen.lock().values().map(Vec::len).sum::<usize>() == 6 * per_key
    })
    .await;
    for (key, seqs) in seen.lock().iter() {
        assert_eq!(*seqs, (0..per_key).collect::<Vec<_>>(), "order of {key}");
    }
    assert!(
        max_in_flight.load(Ordering::SeqCst) > 1,
        "different keys ran in parallel"
    );
    assert!(
        max_in_flight.load(Ordering::SeqCst) <= 8,
        "never above the limit"
    );
    router.close().await.unwrap();
}

#[tokio::test]
async fn concurrency_limit_orders_keys_even_when_the_broker_does_not_gate() {
    // The router's own per-key sequencing, independent of the broker: messages of one key
    // delivered together (no gating) still run one after another.
    let broker = MemoryBroker::new();
    let router = Router::new();
    let seen: Arc<Mutex<Vec<usize>>> = Arc::default();
    let s = seen.clone();
    router
        .add_handler("h")
        .subscribe(broker.subscriber(), "in")
        .concurrency(4)
        .handler(move |m: Message| {
            let s = s.clone();
            async move {
                let seq: usize = m.metadata().get_as("seq")?.unwrap_or_default();
                tokio::time::sleep(Duration::from_millis((5 - seq as u64 % 5) * 2)).await;
                s.lock().push(seq);
                HandlerResult::Ok(())
            }
        })
        .await
        .unwrap();
    let _run = start(&router).await;
    // Keyless messages: no ordering promise, but all are processed.
    let msgs: Vec<Message> = (0..20)
        .map(|i| Message::new("x").with_metadata("seq", i))
        .collect();
    broker.publisher().publish("in", msgs).await.unwrap();
    eventually("all processed", || seen.lock().len() == 20).await;
    let mut got = seen.lock().clone();
    got.sort();
    assert_eq!(got, (0..20).collect::<Vec<_>>());
    router.close().await.unwrap();
}

#[tokio::test]
async fn shutdown_drains_in_flight_and_starts_nothing_new() {
    let broker = MemoryBroker::new();
    let router = Router::with_config(RouterConfig {
        close_timeout: Duration::from_secs(30),
        ..Default::default()
    });
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let finished = Arc::new(AtomicUsize::new(0));
    let fin = finished.clone();
    let release = Arc::new(tokio::sync::Notify::new());
    let rel = release.clone();
    router
        .add_handler("slow")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .handler(move |m: Message| {
            let (tx, fin, rel) = (started_tx.clone(), fin.clone(), rel.clone());
            async move {
                tx.send(text(&m)).unwrap();
                rel.notified().await;
                fin.fetch_add(1, Ordering::SeqCst);
                HandlerResult::Ok(())
            }
        })
        .await
        .unwrap();
    let _run = start(&router).await;
    broker
        .publisher()
        .publish("in", vec![Message::new("first"), Message::new("second")])
        .await
        .unwrap();
    assert_eq!(recv(&mut started_rx).await, "first");
    let closing = tokio::spawn({
        let r = router.clone();
        async move { r.close().await }
    });
    eventually("closing", || !router.is_running()).await;
    release.notify_one();
    tokio::time::timeout(WAIT, closing)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        finished.load(Ordering::SeqCst),
        1,
        "the in-flight message finished"
    );
    assert!(
        started_rx.try_recv().is_err(),
        "nothing new started after shutdown began"
    );
    assert_eq!(
        broker.group_backlog("in", "g"),
        Some(1),
        "first acked, second kept for later"
    );
}

#[tokio::test]
async fn close_timeout_abandons_and_nacks_stuck_handlers() {
    let broker = MemoryBroker::new();
    let router = Router::with_config(RouterConfig {
        close_timeout: Duration::from_millis(200),
        ..Default::default()
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("stuck")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .concurrency(2)
        .handler(move |_m: Message| {
            let tx = tx.clone();
            async move {
                tx.send(()).unwrap();
                std::future::pending::<()>().await;
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
    recv(&mut rx).await;
    tokio::time::timeout(WAIT, router.close())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(broker.group_backlog("in", "g"), Some(1), "not acked");
    // The abandoned message is back in the group for the next consumer.
    let mut s = broker
        .subscriber()
        .subscribe("in", SubscribeOptions::group("g"))
        .await
        .unwrap();
    let d = tokio::time::timeout(WAIT, s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.attempt(), Some(2));
}

#[tokio::test]
async fn handlers_can_be_added_and_stopped_while_running() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, String)>();
    let make = |name: &'static str| {
        let tx = tx.clone();
        move |m: Message| {
            let tx = tx.clone();
            async move {
                tx.send((name.to_owned(), text(&m))).unwrap();
                HandlerResult::Ok(())
            }
        }
    };
    router
        .add_handler("a")
        .subscribe(broker.subscriber(), "t")
        .handler(make("a"))
        .await
        .unwrap();
    let run = start(&router).await;
    router
        .add_handler("b")
        .subscribe(broker.subscriber(), "t")
        .handler(make("b"))
        .await
        .unwrap();
    let p = broker.publisher();
    p.publish_one("t", Message::new("1")).await.unwrap();
    let mut got = vec![recv(&mut rx).await, recv(&mut rx).await];
    got.sort();
    assert_eq!(
        got,
        vec![("a".into(), "1".into()), ("b".into(), "1".into())]
    );
    router.stop_handler("a").await.unwrap();
    assert_eq!(router.handlers(), vec!["b".to_owned()]);
    p.publish_one("t", Message::new("2")).await.unwrap();
    assert_eq!(recv(&mut rx).await, ("b".into(), "2".into()));
    assert!(matches!(
        router.stop_handler("nope").await,
        Err(RouterError::UnknownHandler(_))
    ));
    router.stop_handler("b").await.unwrap();
    // Every handler stopped: the router closes by itself.
    tokio::time::timeout(WAIT, router.closed()).await.unwrap();
    run.await.unwrap().unwrap();
    let err = router
        .add_handler("c")
        .subscribe(broker.subscriber(), "t")
        .handler(make("c"))
        .await
        .unwrap_err();
    assert!(matches!(err, RouterError::Closed(_)), "{err}");
}

#[tokio::test]
async fn tower_layers_work_out_of_the_box() {
    use tower::limit::{ConcurrencyLimitLayer, RateLimitLayer};
    use tower::timeout::TimeoutLayer;

    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let (f, mx) = (in_flight.clone(), max_seen.clone());
    router
        .add_handler("layered")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .concurrency(8)
        .layer(TimeoutLayer::new(Duration::from_millis(300)))
        .layer(ConcurrencyLimitLayer::new(2))
        .layer(RateLimitLayer::new(1000, Duration::from_secs(1)))
        .handler(move |m: Message| {
            let (tx, f, mx) = (tx.clone(), f.clone(), mx.clone());
            async move {
                let now = f.fetch_add(1, Ordering::SeqCst) + 1;
                mx.fetch_max(now, Ordering::SeqCst);
                let attempt = m.context().and_then(|c| c.attempt()).unwrap_or(0);
                if text(&m) == "slow" && attempt == 1 {
                    // Longer than the timeout: the timeout layer fails it, it is redelivered.
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                f.fetch_sub(1, Ordering::SeqCst);
                tx.send((text(&m), attempt)).unwrap();
                HandlerResult::Ok(())
            }
        })
        .await
        .unwrap();
    let _run = start(&router).await;
    let mut msgs: Vec<Message> = (0..10).map(|i| Message::new(format!("m{i}"))).collect();
    msgs.push(Message::new("slow"));
    broker.publisher().publish("in", msgs).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..11 {
        got.push(recv(&mut rx).await);
    }
    assert!(
        got.contains(&("slow".into(), 2)),
        "timed out once, then succeeded: {got:?}"
    );
    assert!(
        max_seen.load(Ordering::SeqCst) <= 2,
        "concurrency limit held"
    );
    eventually("all acked", || broker.group_backlog("in", "g") == Some(0)).await;
    router.close().await.unwrap();
}

/// A pass-through layer that records the order layers run in.
#[derive(Clone)]
struct Tag(&'static str, Arc<Mutex<Vec<&'static str>>>);

impl<S> Layer<S> for Tag {
    type Service = Tagged<S>;
    fn layer(&self, inner: S) -> Tagged<S> {
        Tagged(self.clone(), inner)
    }
}

struct Tagged<S>(Tag, S);

impl<S: Service<Message>> Service<Message> for Tagged<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.1.poll_ready(cx)
    }
    fn call(&mut self, m: Message) -> S::Future {
        self.0 .1.lock().push(self.0 .0);
        self.1.call(m)
    }
}

#[tokio::test]
async fn router_layers_wrap_handler_layers_in_order() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let order = Arc::new(Mutex::new(Vec::new()));
    router.layer(Tag("router-1", order.clone()));
    router.layer(Tag("router-2", order.clone()));
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("h")
        .subscribe(broker.subscriber(), "in")
        .layer(Tag("handler-1", order.clone()))
        .layer(Tag("handler-2", order.clone()))
        .handler(move |_m: Message| {
            let tx = tx.clone();
            async move {
                tx.send(()).unwrap();
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
    recv(&mut rx).await;
    assert_eq!(
        *order.lock(),
        vec!["router-1", "router-2", "handler-1", "handler-2"]
    );
    router.close().await.unwrap();
}

#[tokio::test]
async fn close_before_run_and_run_after_close() {
    let router = Router::new();
    router.close().await.unwrap();
    assert!(router.is_closed());
    assert!(matches!(router.run().await, Err(RouterError::Closed(_))));
}

#[tokio::test]
async fn failing_subscription_fails_run_with_the_handler_and_topic() {
    let broker = MemoryBroker::new();
    let subscriber = broker.subscriber();
    subscriber.close().await.unwrap();
    let router = Router::new();
    router
        .add_handler("h")
        .subscribe(subscriber, "orders")
        .handler(|_m: Message| async { HandlerResult::Ok(()) })
        .await
        .unwrap();
    let err = router.run().await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("`h`") && text.contains("`orders`"), "{text}");
    assert!(router.is_closed());
}

#[tokio::test]
async fn redeliver_after_nacks_with_the_delay() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("delayed")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .handler(move |m: Message| {
            let tx = tx.clone();
            async move {
                let attempt = m.context().and_then(|c| c.attempt()).unwrap_or(0);
                tx.send((attempt, tokio::time::Instant::now())).unwrap();
                if attempt == 1 {
                    // Deep in a chain: the router still finds the delay.
                    let inner = redeliver_after(Duration::from_millis(300), "busy");
                    return Err(Box::new(Error::transient("db", "", "query", inner)) as BoxError);
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
    let (first, t1) = recv(&mut rx).await;
    let (second, t2) = recv(&mut rx).await;
    assert_eq!((first, second), (1, 2));
    assert!(
        // tokio's timers may fire up to a millisecond early as `Instant` measures it.
        t2 - t1 >= Duration::from_millis(295),
        "redelivered after {:?}, before the requested delay",
        t2 - t1
    );
    eventually("acked", || broker.group_backlog("in", "g") == Some(0)).await;
    router.close().await.unwrap();
}

/// A layer that acks the input before the handler runs, through the context hook.
#[derive(Clone)]
struct AckFirst;

impl<S> Layer<S> for AckFirst {
    type Service = AckFirstService<S>;
    fn layer(&self, inner: S) -> AckFirstService<S> {
        AckFirstService(inner)
    }
}

struct AckFirstService<S>(S);

impl<S> Service<Message> for AckFirstService<S>
where
    S: Service<Message, Response = Vec<Message>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Vec<Message>, BoxError>>;
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, m: Message) -> Self::Future {
        let handle = m.context().and_then(|c| c.take_ack());
        let fut = self.0.call(m);
        Box::pin(async move {
            if let Some(handle) = handle {
                handle.ack().await?;
            }
            fut.await
        })
    }
}

#[tokio::test]
async fn an_input_taken_from_the_context_is_not_settled_again() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stash = Arc::new(Mutex::new(Vec::new()));
    let kept = stash.clone();
    router
        .add_handler("early")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .publish(broker.publisher(), "out")
        .layer(AckFirst)
        .handler(move |m: Message| {
            let (tx, kept) = (tx.clone(), kept.clone());
            async move {
                // The handle is gone already; a clone of the input cannot take it again.
                assert!(m.context().and_then(|c| c.take_ack()).is_none());
                kept.lock().push(m.clone());
                tx.send(text(&m)).unwrap();
                if text(&m) == "fails" {
                    return Err("fails after the early ack".into());
                }
                HandlerResult::Ok(Message::new(format!("out-{}", text(&m))))
            }
        })
        .await
        .unwrap();
    let mut out = broker
        .subscriber()
        .subscribe("out", SubscribeOptions::new())
        .await
        .unwrap();
    let _run = start(&router).await;
    broker
        .publisher()
        .publish("in", vec![Message::new("fails"), Message::new("ok")])
        .await
        .unwrap();
    assert_eq!(recv(&mut rx).await, "fails");
    assert_eq!(recv(&mut rx).await, "ok");
    // The output of the successful one is still published.
    let d = tokio::time::timeout(WAIT, out.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(text(d.message()), "out-ok");
    eventually("both acked", || broker.group_backlog("in", "g") == Some(0)).await;
    // The failed one is not redelivered: it was acked before the handler ran.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.try_recv().is_err(), "no redelivery after an early ack");
    router.close().await.unwrap();
    assert_eq!(stash.lock().len(), 2);
}

#[tokio::test]
async fn abandoned_inputs_are_nacked_even_when_clones_are_kept() {
    let broker = MemoryBroker::new();
    let router = Router::with_config(RouterConfig {
        close_timeout: Duration::from_millis(200),
        ..Default::default()
    });
    let stash = Arc::new(Mutex::new(Vec::new()));
    let kept = stash.clone();
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("stuck")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .handler(move |m: Message| {
            let (tx, kept) = (tx.clone(), kept.clone());
            async move {
                kept.lock().push(m);
                tx.send(()).unwrap();
                std::future::pending::<()>().await;
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
    recv(&mut rx).await;
    router.close().await.unwrap();
    assert_eq!(stash.lock().len(), 1, "the clone is still alive");
    let mut s = broker
        .subscriber()
        .subscribe("in", SubscribeOptions::group("g"))
        .await
        .unwrap();
    let d = tokio::time::timeout(WAIT, s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.attempt(), Some(2), "nacked when abandoned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_means_subscribed_and_nothing_stalls() {
    // Publishing right after `running()` must reach the handlers (they are subscribed by
    // then), and publisher and handler must never stall each other; repeated to catch races.
    for round in 0..30 {
        let broker = MemoryBroker::new();
        let router = Router::new();
        let n = 5_000usize;
        let count = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(tokio::sync::Notify::new());
        let (c, d) = (count.clone(), done.clone());
        router
            .add_handler("count")
            .subscribe(broker.subscriber(), "in")
            .handler(move |_m: Message| {
                if c.fetch_add(1, Ordering::Relaxed) + 1 == n {
                    d.notify_one();
                }
                async { HandlerResult::Ok(()) }
            })
            .await
            .unwrap();
        let stage = Arc::new(Mutex::new("start"));
        let st = stage.clone();
        let b2 = broker.clone();
        let work = async move {
            let running = router.clone();
            let run = tokio::spawn(async move { running.run().await });
            *st.lock() = "waiting for running";
            router.running().await;
            *st.lock() = "publishing";
            let p = broker.publisher();
            let publishing = tokio::spawn(async move {
                let mut left = n;
                while left > 0 {
                    let batch = left.min(1000);
                    p.publish("in", (0..batch).map(|_| Message::new("x")).collect())
                        .await
                        .unwrap();
                    left -= batch;
                }
            });
            *st.lock() = "waiting for the count";
            done.notified().await;
            *st.lock() = "joining the publisher";
            publishing.await.unwrap();
            *st.lock() = "closing";
            router.close().await.unwrap();
            *st.lock() = "joining run";
            run.await.unwrap().unwrap();
        };
        if tokio::time::timeout(Duration::from_secs(20), work)
            .await
            .is_err()
        {
            panic!(
                "round {round} stalled at: {} (count {})\n{}",
                stage.lock(),
                count.load(Ordering::Relaxed),
                b2.debug_dump()
            );
        }
    }
}

/// A subscriber that reports a connection state set by the test.
struct Flaky {
    inner: crate::MemorySubscriber,
    state: Arc<Mutex<crate::ConnectionState>>,
}

#[async_trait]
impl Subscriber for Flaky {
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> crate::Result<DeliveryStream> {
        self.inner.subscribe(topic, options).await
    }
    async fn close(&self) -> crate::Result<()> {
        self.inner.close().await
    }
    fn connection_state(&self) -> crate::ConnectionState {
        *self.state.lock()
    }
}

#[tokio::test]
async fn health_follows_connections_and_handlers() {
    let broker = MemoryBroker::new();
    let state = Arc::new(Mutex::new(crate::ConnectionState::Connected));
    let ending = broker.subscriber();
    let router = Router::new();
    router
        .add_handler("flaky")
        .subscribe(
            Flaky {
                inner: broker.subscriber(),
                state: state.clone(),
            },
            "a",
        )
        .handler(|_m: Message| async { HandlerResult::Ok(()) })
        .await
        .unwrap();
    router
        .add_handler("ending")
        .subscribe(ending.clone(), "b")
        .publish(broker.publisher(), "c")
        .handler(|_m: Message| async { HandlerResult::Ok(()) })
        .await
        .unwrap();
    let health = router.health();
    assert_eq!(health.status, RouterStatus::Created);
    assert!(health
        .handlers
        .iter()
        .all(|h| h.status == HandlerStatus::Pending));
    assert!(!health.is_ready() && health.is_live());
    let run = start(&router).await;
    let health = router.health();
    assert!(health.is_ready() && health.is_live(), "{health}");
    assert_eq!(
        health.handlers[0].publisher,
        Some(crate::ConnectionState::Connected),
        "handlers sorted by name: `ending` first, with its output"
    );

    // A lost connection: not ready, still live; back when it returns.
    *state.lock() = crate::ConnectionState::Disconnected;
    let health = router.health();
    assert!(!health.is_ready() && health.is_live(), "{health}");
    *state.lock() = crate::ConnectionState::Connected;
    assert!(router.health().is_ready());

    // A subscription that ends on its own: the handler is gone for good, so not live.
    ending.close().await.unwrap();
    tokio::time::timeout(WAIT, async {
        while !router
            .health()
            .handlers
            .iter()
            .any(|h| h.name == "ending" && h.status == HandlerStatus::Ended)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the handler is reported ended");
    let health = router.health();
    assert!(!health.is_ready() && !health.is_live(), "{health}");
    let json = serde_json::to_value(&health).unwrap();
    assert_eq!(json["handlers"][0]["status"], "ended");

    router.close().await.unwrap();
    let _ = run.await;
    let health = router.health();
    assert_eq!(health.status, RouterStatus::Closed);
    assert!(!health.is_live());
}
