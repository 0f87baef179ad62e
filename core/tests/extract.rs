//! Handlers with state and extractors on the in-memory broker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tidemill_core::extract::{FromRef, Json, Key, MessageContext, MessageUuid, Metadata, State};
use tidemill_core::marshal::CONTENT_TYPE_KEY;
use tidemill_core::router::{HandlerResult, Router, RouterError};
use tidemill_core::{
    is_permanent, BoxError, MemoryBroker, Message, Publisher, SubscribeOptions, Subscriber,
};
use tokio::sync::mpsc;
use tower::{Layer, Service};

const WAIT: Duration = Duration::from_secs(10);

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

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Order {
    id: String,
    cents: u64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Priced {
    id: String,
    total: u64,
}

/// The application state of these tests: a counter and a channel to report to.
#[derive(Clone)]
struct App {
    calls: Arc<AtomicUsize>,
    seen: mpsc::UnboundedSender<String>,
}

/// A part of [`App`], taken with `State<Calls>`.
#[derive(Clone)]
struct Calls(Arc<AtomicUsize>);

impl FromRef<App> for Calls {
    fn from_ref(app: &App) -> Calls {
        Calls(app.calls.clone())
    }
}

fn app() -> (App, mpsc::UnboundedReceiver<String>) {
    let (seen, rx) = mpsc::unbounded_channel();
    (
        App {
            calls: Arc::default(),
            seen,
        },
        rx,
    )
}

#[tokio::test]
async fn handler_state_is_handed_to_every_message() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (app, mut seen) = app();
    router
        .add_handler("count")
        .subscribe(broker.subscriber(), "in")
        .state(app.clone())
        .handler(|State(app): State<App>, msg: Message| async move {
            app.calls.fetch_add(1, Ordering::SeqCst);
            app.seen
                .send(String::from_utf8_lossy(msg.payload()).into())?;
            HandlerResult::Ok(())
        })
        .await
        .unwrap();
    let run = start(&router).await;
    for text in ["a", "b", "c"] {
        broker
            .publisher()
            .publish_one("in", Message::new(text))
            .await
            .unwrap();
    }
    for text in ["a", "b", "c"] {
        assert_eq!(recv(&mut seen).await, text);
    }
    assert_eq!(app.calls.load(Ordering::SeqCst), 3);
    router.close().await.unwrap();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn router_state_reaches_handlers_and_parts_of_it_through_from_ref() {
    let broker = MemoryBroker::new();
    let (app, mut seen) = app();
    let router = Router::new().with_state(app.clone());
    router
        .add_handler("whole")
        .subscribe(broker.subscriber(), "in")
        .handler(|State(app): State<App>, text: String| async move {
            app.seen.send(format!("whole {text}"))
        })
        .await
        .unwrap();
    router
        .add_handler("part")
        .subscribe(broker.subscriber(), "in")
        .handler(|State(Calls(calls)): State<Calls>| async move {
            calls.fetch_add(1, Ordering::SeqCst);
        })
        .await
        .unwrap();
    // A handler's own state replaces the router's (here: of another type).
    let (other, mut other_seen) = mpsc::unbounded_channel::<String>();
    router
        .add_handler("own")
        .subscribe(broker.subscriber(), "in")
        .state(other)
        .handler(
            |State(tx): State<mpsc::UnboundedSender<String>>, text: String| async move {
                tx.send(format!("own {text}"))
            },
        )
        .await
        .unwrap();
    assert!(router.state().calls.load(Ordering::SeqCst) == 0);
    let run = start(&router).await;
    broker
        .publisher()
        .publish_one("in", Message::new("x"))
        .await
        .unwrap();
    assert_eq!(recv(&mut seen).await, "whole x");
    assert_eq!(recv(&mut other_seen).await, "own x");
    tokio::time::timeout(WAIT, async {
        while app.calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the part handler ran");
    router.close().await.unwrap();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn json_in_json_out_with_content_type() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    router
        .add_handler("price")
        .subscribe(broker.subscriber(), "orders")
        .publish(broker.publisher(), "priced")
        .handler(|Json(order): Json<Order>| async move {
            HandlerResult::Ok(Json(Priced {
                id: order.id,
                total: order.cents * 3,
            }))
        })
        .await
        .unwrap();
    let mut priced = broker
        .subscriber()
        .subscribe("priced", SubscribeOptions::new())
        .await
        .unwrap();
    let run = start(&router).await;
    broker
        .publisher()
        .publish_one("orders", Message::new(r#"{"id":"o-1","cents":250}"#))
        .await
        .unwrap();
    let out = tokio::time::timeout(WAIT, priced.next())
        .await
        .expect("within 10s")
        .expect("open")
        .unwrap();
    assert_eq!(
        out.message().metadata().get(CONTENT_TYPE_KEY),
        Some("application/json")
    );
    let value: Priced = serde_json::from_slice(out.message().payload()).unwrap();
    assert_eq!(
        value,
        Priced {
            id: "o-1".into(),
            total: 750
        }
    );
    out.ack().await.unwrap();
    router.close().await.unwrap();
    run.await.unwrap().unwrap();
}

/// A layer reporting each handler error (its text and whether it is permanent), then
/// acking the input (like a poison queue would).
#[derive(Clone)]
struct ReportErrors(mpsc::UnboundedSender<(String, bool)>);

impl<S> Layer<S> for ReportErrors {
    type Service = ReportErrorsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ReportErrorsService(inner, self.0.clone())
    }
}

struct ReportErrorsService<S>(S, mpsc::UnboundedSender<(String, bool)>);

impl<S> Service<Message> for ReportErrorsService<S>
where
    S: Service<Message, Response = Vec<Message>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Vec<Message>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let fut = self.0.call(msg);
        let tx = self.1.clone();
        Box::pin(async move {
            match fut.await {
                Ok(out) => Ok(out),
                Err(e) => {
                    let _ = tx.send((e.to_string(), is_permanent(e.as_ref())));
                    Ok(Vec::new())
                }
            }
        })
    }
}

#[tokio::test]
async fn a_payload_that_does_not_decode_fails_permanently_without_calling_the_handler() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (errors_tx, mut errors) = mpsc::unbounded_channel();
    let calls = Arc::new(AtomicUsize::new(0));
    router
        .add_handler("price")
        .subscribe(broker.subscriber(), "orders")
        .layer(ReportErrors(errors_tx))
        .state(calls.clone())
        .handler(
            |State(calls): State<Arc<AtomicUsize>>, Json(_order): Json<Order>| async move {
                calls.fetch_add(1, Ordering::SeqCst);
            },
        )
        .await
        .unwrap();
    let run = start(&router).await;
    let garbled = Message::new(r#"{"id": "o-2", "cents": "#);
    let uuid = garbled.uuid().to_owned();
    broker
        .publisher()
        .publish_one("orders", garbled)
        .await
        .unwrap();
    let (text, permanent) = recv(&mut errors).await;
    assert!(permanent, "a decode failure is permanent: {text}");
    assert!(
        text.contains(&format!("message {uuid} on topic `orders`"))
            && text.contains("cannot decode the payload as JSON `Order`"),
        "the reason names message, topic and type: {text}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler never ran");
    router.close().await.unwrap();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn message_parts_extractors() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("parts")
        .subscribe(broker.subscriber(), "in")
        .group("g")
        .state(tx)
        .handler(
            |State(tx): State<mpsc::UnboundedSender<String>>,
             md: Metadata,
             key: Option<Key>,
             MessageUuid(uuid): MessageUuid,
             ctx: MessageContext,
             payload: Bytes,
             msg: Message| async move {
                let key = key.and_then(|k| k.as_str().map(str::to_owned));
                let line = format!(
                    "{} {:?} {} {}/{}/{:?} {:?} {}",
                    md.get("kind").unwrap_or("-"),
                    key,
                    uuid == msg.uuid(),
                    ctx.handler().name,
                    ctx.handler().topic,
                    ctx.handler().group,
                    ctx.attempt(),
                    String::from_utf8_lossy(&payload),
                );
                tx.send(line)
            },
        )
        .await
        .unwrap();
    let run = start(&router).await;
    let publisher = broker.publisher();
    publisher
        .publish_one(
            "in",
            Message::new("one")
                .with_metadata("kind", "k1")
                .with_key("key-1"),
        )
        .await
        .unwrap();
    publisher
        .publish_one("in", Message::new("two"))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut rx).await,
        r#"k1 Some("key-1") true parts/in/Some("g") Some(1) one"#
    );
    assert_eq!(
        recv(&mut rx).await,
        r#"- None true parts/in/Some("g") Some(1) two"#
    );
    router.close().await.unwrap();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_missing_key_or_non_utf8_text_is_refused_permanently() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (errors_tx, mut errors) = mpsc::unbounded_channel();
    router
        .add_handler("keyed")
        .subscribe(broker.subscriber(), "keyed")
        .layer(ReportErrors(errors_tx.clone()))
        .handler(|_key: Key| async {})
        .await
        .unwrap();
    router
        .add_handler("text")
        .subscribe(broker.subscriber(), "text")
        .layer(ReportErrors(errors_tx))
        .handler(|_text: String| async {})
        .await
        .unwrap();
    let run = start(&router).await;
    let publisher = broker.publisher();
    publisher
        .publish_one("keyed", Message::new("no key"))
        .await
        .unwrap();
    let (text, permanent) = recv(&mut errors).await;
    assert!(permanent && text.ends_with("it has no key"), "{text}");
    publisher
        .publish_one("text", Message::new(vec![0xff, 0xfe]))
        .await
        .unwrap();
    let (text, permanent) = recv(&mut errors).await;
    assert!(
        permanent && text.contains("its payload is not UTF-8"),
        "{text}"
    );
    router.close().await.unwrap();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn failing_handlers_need_no_turbofish_and_plain_ones_keep_working() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let (errors_tx, mut errors) = mpsc::unbounded_channel();
    // Always fails: the async closure names its result type.
    router
        .add_handler("fails")
        .subscribe(broker.subscriber(), "in")
        .layer(ReportErrors(errors_tx))
        .handler(async |_msg: Message| -> HandlerResult { Err("not yet".into()) })
        .await
        .unwrap();
    // The plain style, and handler_fn, unchanged.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let tx2 = tx.clone();
    router
        .add_handler("plain")
        .subscribe(broker.subscriber(), "in")
        .handler(move |msg: Message| {
            let tx = tx.clone();
            async move {
                tx.send(format!("plain {}", String::from_utf8_lossy(msg.payload())))?;
                HandlerResult::Ok(())
            }
        })
        .await
        .unwrap();
    router
        .add_handler("handler_fn")
        .subscribe(broker.subscriber(), "in")
        .service(tidemill_core::handler_fn(move |msg: Message| {
            let tx = tx2.clone();
            async move {
                tx.send(format!("fn {}", String::from_utf8_lossy(msg.payload())))?;
                HandlerResult::Ok(())
            }
        }))
        .await
        .unwrap();
    // No arguments at all.
    let ticks = Arc::new(AtomicUsize::new(0));
    let t = ticks.clone();
    router
        .add_handler("tick")
        .subscribe(broker.subscriber(), "in")
        .handler(move || {
            t.fetch_add(1, Ordering::SeqCst);
            async {}
        })
        .await
        .unwrap();
    let run = start(&router).await;
    broker
        .publisher()
        .publish_one("in", Message::new("m"))
        .await
        .unwrap();
    let (text, permanent) = recv(&mut errors).await;
    assert_eq!((text.as_str(), permanent), ("not yet", false));
    let mut got = [recv(&mut rx).await, recv(&mut rx).await];
    got.sort();
    assert_eq!(got, ["fn m", "plain m"]);
    router.close().await.unwrap();
    run.await.unwrap().unwrap();
    assert_eq!(ticks.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn state_with_concurrent_handlers() {
    let broker = MemoryBroker::new();
    let (app, mut seen) = app();
    let router = Router::new().with_state(app.clone());
    router
        .add_handler("parallel")
        .subscribe(broker.subscriber(), "in")
        .concurrency(4)
        .handler(|State(app): State<App>, key: Key| async move {
            app.calls.fetch_add(1, Ordering::SeqCst);
            app.seen.send(key.as_str().unwrap_or("?").to_owned())
        })
        .await
        .unwrap();
    let run = start(&router).await;
    let msgs: Vec<Message> = (0..20)
        .map(|i| Message::new("x").with_key(format!("k{i}")))
        .collect();
    broker.publisher().publish("in", msgs).await.unwrap();
    let mut keys = Vec::new();
    for _ in 0..20 {
        keys.push(recv(&mut seen).await);
    }
    keys.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    want.sort();
    assert_eq!(keys, want);
    assert_eq!(app.calls.load(Ordering::SeqCst), 20);
    router.close().await.unwrap();
    run.await.unwrap().unwrap();
}
