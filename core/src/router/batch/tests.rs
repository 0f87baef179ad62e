use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::router::{BatchResult, Router, RouterConfig, RouterError};
use crate::{
    permanent, Error, HandlerResult, MemoryBroker, MemoryPublisher, Message, Publisher,
    SubscribeOptions, Subscriber,
};

const WAIT: Duration = Duration::from_secs(10);
/// Long enough that a batch in these tests is only handled early when it is full.
const FOREVER: Duration = Duration::from_secs(3600);

fn config() -> RouterConfig {
    RouterConfig {
        close_clients: false,
        ..RouterConfig::default()
    }
}

async fn start(router: &Router) {
    let r = router.clone();
    tokio::spawn(async move { r.run().await });
    tokio::time::timeout(WAIT, router.running())
        .await
        .expect("router runs");
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("within 10s")
        .expect("channel open")
}

fn text(m: &Message) -> String {
    String::from_utf8_lossy(m.payload()).into_owned()
}

fn texts(msgs: &[Message]) -> Vec<String> {
    msgs.iter().map(text).collect()
}

async fn publish(broker: &MemoryBroker, topic: &str, payloads: &[&str]) {
    let msgs = payloads
        .iter()
        .map(|p| Message::new(p.to_string()))
        .collect();
    broker.publisher().publish(topic, msgs).await.unwrap();
}

/// Receives the batch of "a" and "b" three times: the first two calls failed it whole.
async fn the_whole_batch_three_times(rx: &mut mpsc::UnboundedReceiver<Vec<String>>) {
    for _ in 0..3 {
        let mut batch = recv(rx).await;
        batch.sort();
        assert_eq!(batch, ["a", "b"], "the whole batch comes back");
    }
}

/// Sends each batch's payloads to `tx`.
fn recording(
    tx: mpsc::UnboundedSender<Vec<String>>,
) -> impl Fn(Vec<Message>) -> futures::future::Ready<()> + Send + Sync + 'static {
    move |msgs: Vec<Message>| {
        let _ = tx.send(texts(&msgs));
        futures::future::ready(())
    }
}

#[tokio::test]
async fn full_batches_are_handled_without_waiting() {
    let broker = MemoryBroker::new();
    let router = Router::with_config(config());
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("store")
        .subscribe(broker.subscriber(), "in")
        .batch(4, FOREVER)
        .handler(recording(tx))
        .await
        .unwrap();
    start(&router).await;
    let payloads: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    publish(&broker, "in", &refs).await;
    // max_wait is an hour: only full batches can have been handled.
    assert_eq!(recv(&mut rx).await, payloads[..4]);
    assert_eq!(recv(&mut rx).await, payloads[4..]);
    router.close().await.unwrap();
}

#[tokio::test]
async fn a_partial_batch_is_handled_after_max_wait() {
    let broker = MemoryBroker::new();
    let router = Router::with_config(config());
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("store")
        .subscribe(broker.subscriber(), "in")
        .batch(100, Duration::from_millis(20))
        .handler(recording(tx))
        .await
        .unwrap();
    start(&router).await;
    publish(&broker, "in", &["a", "b", "c"]).await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let batch = recv(&mut rx).await;
        assert!(batch.len() < 100, "a partial batch");
        seen.extend(batch);
    }
    assert_eq!(seen, ["a", "b", "c"]);
    router.close().await.unwrap();
}

#[tokio::test]
async fn max_bytes_ends_a_batch_before_it_is_crossed() {
    let broker = MemoryBroker::new();
    let router = Router::with_config(config());
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("store")
        .subscribe(broker.subscriber(), "in")
        .batch(100, FOREVER)
        .max_bytes(25)
        .handler(recording(tx))
        .await
        .unwrap();
    start(&router).await;
    // 10 bytes each: two fit, the third would cross 25; the 40-byte one is alone.
    let ten = "0123456789";
    let forty = "0123456789012345678901234567890123456789";
    publish(&broker, "in", &[ten, ten, ten, forty, ten, ten]).await;
    assert_eq!(recv(&mut rx).await, [ten, ten]);
    assert_eq!(recv(&mut rx).await, [ten]);
    assert_eq!(recv(&mut rx).await, [forty]);
    // The rest is not full yet: closing hands it over.
    router.close().await.unwrap();
    assert_eq!(recv(&mut rx).await, [ten, ten]);
}

#[tokio::test]
async fn a_failed_message_alone_comes_back() {
    let broker = MemoryBroker::new();
    let router = Router::with_config(config());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let failed_once = Arc::new(AtomicBool::new(false));
    router
        .add_handler("store")
        .subscribe(broker.subscriber(), "in")
        .group("store")
        .batch(4, FOREVER)
        .handler(move |msgs: Vec<Message>| {
            let _ = tx.send(texts(&msgs));
            let mut result = BatchResult::ok();
            for (i, m) in msgs.iter().enumerate() {
                if text(m) == "flaky" && !failed_once.swap(true, Ordering::SeqCst) {
                    result.fail(i, "database busy");
                }
            }
            async move { result }
        })
        .await
        .unwrap();
    start(&router).await;
    publish(&broker, "in", &["a", "flaky", "b", "c"]).await;
    assert_eq!(recv(&mut rx).await, ["a", "flaky", "b", "c"]);
    // Only the failed one is redelivered; then the next batch fills up with new messages.
    publish(&broker, "in", &["d", "e", "f"]).await;
    let mut second = recv(&mut rx).await;
    second.sort();
    assert_eq!(second, ["d", "e", "f", "flaky"]);
    let stats = router.handler_stats("store").unwrap();
    assert_eq!((stats.failed, stats.nacked), (1, 1));
    router.close().await.unwrap();
}

/// A result naming a message the batch does not have fails the whole batch: every message
/// comes back, none is acked on it, and its outputs are not published.
#[tokio::test]
async fn a_result_naming_a_message_outside_the_batch_fails_the_batch() {
    let broker = MemoryBroker::new();
    let router = Router::with_config(config());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut outputs = broker
        .subscriber()
        .subscribe("out", SubscribeOptions::group("check"))
        .await
        .unwrap();
    router
        .add_handler("store")
        .subscribe(broker.subscriber(), "in")
        .group("store")
        .publish(broker.publisher(), "out")
        .batch(2, FOREVER)
        .handler(move |msgs: Vec<Message>| {
            let _ = tx.send(texts(&msgs));
            let mut result = BatchResult::ok();
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 => {
                    result.fail(2, "off by one");
                }
                1 => {
                    result.publish_for(7, Message::new("lost?"));
                }
                _ => {
                    result.publish_for(1, Message::new("kept"));
                }
            }
            async move { result }
        })
        .await
        .unwrap();
    start(&router).await;
    publish(&broker, "in", &["a", "b"]).await;
    the_whole_batch_three_times(&mut rx).await;
    let out = tokio::time::timeout(WAIT, outputs.next())
        .await
        .expect("an output within 10s")
        .expect("stream open")
        .unwrap();
    assert_eq!(
        text(out.message()),
        "kept",
        "the failed results published nothing"
    );
    let stats = router.handler_stats("store").unwrap();
    assert_eq!((stats.failed, stats.nacked), (4, 4));
    router.close().await.unwrap();
}

#[tokio::test]
async fn an_error_fails_the_whole_batch_and_a_panic_too() {
    let broker = MemoryBroker::new();
    let router = Router::with_config(config());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let calls = Arc::new(AtomicUsize::new(0));
    router
        .add_handler("store")
        .subscribe(broker.subscriber(), "in")
        .group("store")
        .batch(2, FOREVER)
        .handler(move |msgs: Vec<Message>| {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            let _ = tx.send(texts(&msgs));
            async move {
                match call {
                    0 => HandlerResult::Err("database down".into()),
                    1 => panic!("bug in the batch handler"),
                    _ => Ok(()),
                }
            }
        })
        .await
        .unwrap();
    start(&router).await;
    publish(&broker, "in", &["a", "b"]).await;
    the_whole_batch_three_times(&mut rx).await;
    let stats = router.handler_stats("store").unwrap();
    assert_eq!((stats.failed, stats.panicked, stats.nacked), (2, 2, 4));
    router.close().await.unwrap();
}

/// A publisher whose publishes fail while `failing` is set, otherwise forwards.
struct FlakyPublisher {
    inner: MemoryPublisher,
    failing: Arc<AtomicBool>,
}

#[async_trait]
impl Publisher for FlakyPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> crate::Result<()> {
        if self.failing.swap(false, Ordering::SeqCst) {
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
async fn outputs_are_published_before_the_batch_is_acked() {
    let broker = MemoryBroker::new();
    let router = Router::with_config(config());
    let out = broker.subscriber();
    let mut outputs = out.subscribe("out", SubscribeOptions::new()).await.unwrap();
    let failing = Arc::new(AtomicBool::new(true));
    let publisher = FlakyPublisher {
        inner: broker.publisher(),
        failing: failing.clone(),
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("sum")
        .subscribe(broker.subscriber(), "in")
        .group("sum")
        .publish(publisher, "out")
        .batch(3, FOREVER)
        .handler(move |msgs: Vec<Message>| {
            let _ = tx.send(texts(&msgs));
            let mut result = BatchResult::ok();
            // One output for the batch, one for its first message.
            result.publish(Message::new(format!("{} readings", msgs.len())));
            result.publish_for(0, Message::new(format!("first: {}", text(&msgs[0]))));
            async move { result }
        })
        .await
        .unwrap();
    start(&router).await;
    publish(&broker, "in", &["a", "b", "c"]).await;
    // The first publish fails: the whole batch comes back (nothing acked early).
    assert_eq!(recv(&mut rx).await.len(), 3);
    let mut again = recv(&mut rx).await;
    again.sort();
    assert_eq!(again, ["a", "b", "c"]);
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(WAIT, outputs.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.push(text(d.message()));
        d.ack().await.unwrap();
    }
    assert_eq!(got[0], "3 readings");
    assert!(got[1].starts_with("first: "), "{got:?}");
    let stats = router.handler_stats("sum").unwrap();
    assert_eq!((stats.failed, stats.nacked), (3, 3));
    router.close().await.unwrap();
}

#[tokio::test]
async fn a_batch_holds_one_message_per_key_in_order() {
    let broker = MemoryBroker::new();
    let router = Router::with_config(config());
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("store")
        .subscribe(broker.subscriber(), "in")
        .batch(10, Duration::from_millis(20))
        .handler(move |msgs: Vec<Message>| {
            let keys: Vec<(String, String)> = msgs
                .iter()
                .map(|m| {
                    let key = String::from_utf8_lossy(m.key().unwrap()).into_owned();
                    (key, text(m))
                })
                .collect();
            let _ = tx.send(keys);
            async {}
        })
        .await
        .unwrap();
    start(&router).await;
    let msgs: Vec<Message> = (0..12)
        .map(|i| Message::new(i.to_string()).with_key(["a", "b", "c"][i % 3]))
        .collect();
    broker.publisher().publish("in", msgs).await.unwrap();
    let mut per_key: HashMap<String, Vec<u32>> = HashMap::new();
    let mut total = 0;
    while total < 12 {
        let batch = recv(&mut rx).await;
        let mut keys: Vec<&String> = batch.iter().map(|(k, _)| k).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), batch.len(), "one message per key in {batch:?}");
        for (k, v) in batch {
            per_key.entry(k).or_default().push(v.parse().unwrap());
            total += 1;
        }
    }
    for (key, seen) in per_key {
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, sorted, "key {key} in order");
    }
    router.close().await.unwrap();
}

#[tokio::test]
async fn closing_handles_a_partial_batch_at_once() {
    let broker = MemoryBroker::new();
    let router = Router::with_config(RouterConfig {
        close_timeout: FOREVER,
        ..config()
    });
    let reached = Arc::new(AtomicUsize::new(0));
    let batches = Arc::new(Mutex::new(Vec::new()));
    let (r, b) = (reached.clone(), batches.clone());
    router
        .add_handler("store")
        .subscribe(broker.subscriber(), "in")
        .group("store")
        .layer(tower::util::MapRequestLayer::new(move |m: Message| {
            r.fetch_add(1, Ordering::SeqCst);
            m
        }))
        .batch(10, FOREVER)
        .handler(move |msgs: Vec<Message>| {
            b.lock().push(texts(&msgs));
            async {}
        })
        .await
        .unwrap();
    start(&router).await;
    publish(&broker, "in", &["a", "b", "c"]).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while reached.load(Ordering::SeqCst) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "3 messages in flight"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Neither the batch's hour nor the close timeout's: the partial batch goes now.
    tokio::time::timeout(WAIT, router.close())
        .await
        .expect("closed without waiting for the batch")
        .unwrap();
    assert_eq!(*batches.lock(), [["a", "b", "c"]]);
    // Acked: a new member of the group gets nothing of them.
    let mut again = broker
        .subscriber()
        .subscribe("in", SubscribeOptions::group("store"))
        .await
        .unwrap();
    publish(&broker, "in", &["after"]).await;
    let d = tokio::time::timeout(WAIT, again.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(text(d.message()), "after");
}

#[tokio::test]
async fn invalid_batch_settings_are_refused() {
    let broker = MemoryBroker::new();
    let router = Router::new();
    let zero = router
        .add_handler("zero")
        .subscribe(broker.subscriber(), "in")
        .batch(0, FOREVER)
        .handler(|_: Vec<Message>| async {})
        .await;
    assert!(
        matches!(zero, Err(RouterError::InvalidHandler { reason, .. }) if reason.contains("at least 1 message")),
        "{zero:?}"
    );
    let bytes = router
        .add_handler("bytes")
        .subscribe(broker.subscriber(), "in")
        .batch(10, FOREVER)
        .max_bytes(0)
        .handler(|_: Vec<Message>| async {})
        .await;
    assert!(matches!(bytes, Err(RouterError::InvalidHandler { .. })));
}

#[tokio::test]
async fn a_permanent_failure_stays_permanent_through_the_batch() {
    // Layers see each message's own error: its kind survives the batch.
    let broker = MemoryBroker::new();
    let router = Router::with_config(config());
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, bool)>();
    router
        .add_handler("store")
        .subscribe(broker.subscriber(), "in")
        .layer(tower::util::MapResultLayer::new(
            move |r: Result<Vec<Message>, crate::BoxError>| {
                if let Err(e) = &r {
                    let _ = tx.send((e.to_string(), crate::is_permanent(e.as_ref())));
                }
                Ok::<_, crate::BoxError>(Vec::new())
            },
        ))
        .batch(2, FOREVER)
        .handler(|msgs: Vec<Message>| async move {
            if msgs.len() == 2 {
                let mut r = BatchResult::ok();
                r.fail(1, permanent("not a reading"));
                return Ok(r);
            }
            Err(permanent("never"))
        })
        .await
        .unwrap();
    start(&router).await;
    publish(&broker, "in", &["ok", "bad"]).await;
    assert_eq!(recv(&mut rx).await, ("not a reading".to_owned(), true));
    router.close().await.unwrap();
}

#[tokio::test]
async fn a_layer_that_waits_for_capacity_gets_it_back() {
    // Messages in flight of a batch handler are polled by the handler's own task: a
    // concurrency limit's permits come back while it waits for one.
    let broker = MemoryBroker::new();
    let router = Router::with_config(config());
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("store")
        .subscribe(broker.subscriber(), "in")
        .layer(tower::limit::ConcurrencyLimitLayer::new(3))
        .batch(5, Duration::from_millis(10))
        .handler(recording(tx))
        .await
        .unwrap();
    start(&router).await;
    let payloads: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    publish(&broker, "in", &refs).await;
    let mut seen = Vec::new();
    while seen.len() < 10 {
        let batch = recv(&mut rx).await;
        assert!(batch.len() <= 3, "at most 3 in flight: {batch:?}");
        seen.extend(batch);
    }
    seen.sort();
    let mut want = payloads.clone();
    want.sort();
    assert_eq!(seen, want);
    router.close().await.unwrap();
}

/// How the scripted subscription's deliveries were settled: (payload, acked, nack delay).
type SettleLog = Arc<Mutex<Vec<(String, bool, Option<Duration>)>>>;

/// Records how its delivery was settled.
struct Logged(String, SettleLog);

impl crate::Acknowledger for Logged {
    fn ack(self: Box<Self>) -> crate::AckFuture {
        self.1.lock().push((self.0.clone(), true, None));
        crate::AckFuture::ready(Ok(()))
    }
    fn nack(self: Box<Self>, delay: Option<Duration>) -> crate::AckFuture {
        self.1.lock().push((self.0.clone(), false, delay));
        crate::AckFuture::ready(Ok(()))
    }
}

/// A subscription that hands out a fixed list of deliveries at once, all of them before any
/// is settled (as a log broker does within a partition), then waits.
struct Scripted {
    deliveries: Mutex<Vec<crate::Delivery>>,
}

#[async_trait]
impl Subscriber for Scripted {
    async fn subscribe(
        &self,
        _topic: &str,
        _options: SubscribeOptions,
    ) -> crate::Result<crate::DeliveryStream> {
        let deliveries = std::mem::take(&mut *self.deliveries.lock());
        Ok(crate::DeliveryStream::new(
            futures::stream::iter(deliveries.into_iter().map(Ok)).chain(futures::stream::pending()),
        ))
    }
    async fn close(&self) -> crate::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_batch_keeps_a_keys_messages_in_order_and_none_is_acked_ahead_of_a_failed_one() {
    let log: SettleLog = Arc::default();
    let script = [
        ("a1", "a"),
        ("b1", "b"),
        ("a2", "a"),
        ("a3", "a"),
        ("b2", "b"),
    ];
    let deliveries = script
        .iter()
        .enumerate()
        .map(|(i, (payload, key))| {
            let msg = Message::new(*payload).with_key(*key);
            // a3 has been delivered more often than a2, so its own backoff would be longer:
            // it still goes back no sooner than a2.
            let attempt = if *payload == "a3" { 1 } else { 3 + i as u32 };
            crate::Delivery::new(msg, Logged(payload.to_string(), log.clone()))
                .with_attempt(attempt)
        })
        .collect();
    let router = Router::with_config(config());
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("store")
        .subscribe(
            Scripted {
                deliveries: Mutex::new(deliveries),
            },
            "in",
        )
        .batch(5, FOREVER)
        .handler(move |msgs: Vec<Message>| {
            let _ = tx.send(texts(&msgs));
            let mut result = BatchResult::ok();
            result.fail(2, "store busy");
            async move { result }
        })
        .await
        .unwrap();
    start(&router).await;
    assert_eq!(recv(&mut rx).await, ["a1", "b1", "a2", "a3", "b2"]);
    let stats = tokio::time::timeout(WAIT, async {
        loop {
            let stats = router.handler_stats("store").unwrap();
            if stats.nacked == 2 {
                break stats;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("both settled within 10s");
    assert_eq!(stats.failed, 2);
    router.close().await.unwrap();
    let log = log.lock().clone();
    let settled: Vec<(&str, bool)> = log.iter().map(|(p, a, _)| (p.as_str(), *a)).collect();
    assert_eq!(
        settled,
        [
            ("a1", true),
            ("b1", true),
            ("a2", false),
            ("a3", false),
            ("b2", true)
        ],
        "a3 nacked with a2, the others acked"
    );
    let (a2, a3) = (log[2].2.unwrap(), log[3].2.unwrap());
    assert!(
        a3 >= a2,
        "a3 redelivered no sooner than a2: {a3:?} < {a2:?}"
    );
}

#[tokio::test]
async fn with_a_router_layer_each_message_takes_it_on_its_way_into_a_batch() {
    let broker = MemoryBroker::new();
    let router = Router::with_config(config());
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = seen.clone();
    router.layer(tower::util::MapRequestLayer::new(move |m: Message| {
        counted.fetch_add(1, Ordering::SeqCst);
        m
    }));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let failed_once = Arc::new(AtomicBool::new(false));
    router
        .add_handler("store")
        .subscribe(broker.subscriber(), "in")
        .group("store")
        .batch(4, FOREVER)
        .handler(move |msgs: Vec<Message>| {
            let _ = tx.send(texts(&msgs));
            let mut result = BatchResult::ok();
            for (i, m) in msgs.iter().enumerate() {
                if text(m) == "flaky" && !failed_once.swap(true, Ordering::SeqCst) {
                    result.fail(i, "database busy");
                }
            }
            async move { result }
        })
        .await
        .unwrap();
    start(&router).await;
    publish(&broker, "in", &["a", "flaky", "b", "c"]).await;
    let mut first = recv(&mut rx).await;
    first.sort();
    assert_eq!(first, ["a", "b", "c", "flaky"]);
    publish(&broker, "in", &["d", "e", "f"]).await;
    let mut second = recv(&mut rx).await;
    second.sort();
    assert_eq!(second, ["d", "e", "f", "flaky"]);
    // Eight calls through the layer: seven messages, one of them twice.
    assert_eq!(seen.load(Ordering::SeqCst), 8);
    let stats = router.handler_stats("store").unwrap();
    assert_eq!((stats.failed, stats.nacked), (1, 1));
    router.close().await.unwrap();
}
