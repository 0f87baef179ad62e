//! Backend-generic checks of the dead-letter and request-reply paths, for adapter crates to
//! run against their real broker (feature `testing`), on top of tidemill-testkit's
//! [`Backend`]. [`middleware_tests!`](crate::middleware_tests) expands to one `#[test]` per
//! check; this crate runs them on the in-memory broker.
//!
//! ```no_run
//! // tests/middleware.rs of an adapter crate (dev-dependency:
//! // tidemill-middleware = { workspace = true, features = ["testing"] }):
//! mod nats {
//!     tidemill_middleware::middleware_tests!(
//!         skip_unless_env = "TIDEMILL_NATS_URL",
//!         tidemill_testkit::MemoryBackend::new(Default::default()) // your Backend here
//!     );
//! }
//! # fn main() {}
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tidemill_core::{
    permanent, DeliveryStream, HandlerResult, Message, Publisher, Router, RouterConfig,
    SubscribeOptions, Subscriber,
};
pub use tidemill_testkit;
use tidemill_testkit::{unique_topic, Backend};
use tokio::sync::mpsc;

use crate::request_reply::{Replier, ReplyErrorKind, RequestError, Requester, RequesterConfig};
use crate::{headers, Counting, DeadLetter};

/// Expands to one `#[test]` per check of this module, each against a fresh backend built by
/// the given expression (which may `.await`). With `skip_unless_env = "VAR",` first, each
/// test passes after printing `SKIP` when `VAR` is unset (no broker to test against).
#[macro_export]
macro_rules! middleware_tests {
    (skip_unless_env = $var:literal, $backend:expr $(,)?) => {
        $crate::middleware_tests!(@each $var, $backend;
            dead_letter_after_max_deliveries,
            dead_letter_durable_counting,
            request_reply_round_trip,
        );
    };
    ($backend:expr $(,)?) => {
        $crate::middleware_tests!(skip_unless_env = "", $backend);
    };
    (@each $var:literal, $backend:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if !$var.is_empty() && ::std::env::var_os($var).is_none() {
                    eprintln!("SKIP {}: {} is not set", stringify!($name), $var);
                    return;
                }
                $crate::testing::tidemill_testkit::run(
                    stringify!($name),
                    || async { $backend },
                    |backend| ::std::boxed::Box::pin($crate::testing::$name(backend)),
                );
            }
        )*
    };
}

async fn clients(b: &Arc<dyn Backend>) -> (Arc<dyn Publisher>, Arc<dyn Subscriber>) {
    let p = b
        .publisher()
        .await
        .unwrap_or_else(|e| panic!("creating a publisher failed: {e}"));
    let s = b
        .subscriber()
        .await
        .unwrap_or_else(|e| panic!("creating a subscriber failed: {e}"));
    (p, s)
}

/// A consumer-group subscription to `topic`, created before anything is published to it.
async fn watch(s: &Arc<dyn Subscriber>, topic: &str) -> DeliveryStream {
    let opts = SubscribeOptions::group("tidemill-test");
    s.initialize(topic, &opts)
        .await
        .unwrap_or_else(|e| panic!("initialize {topic} failed: {e}"));
    s.subscribe(topic, opts)
        .await
        .unwrap_or_else(|e| panic!("subscribe {topic} failed: {e}"))
}

async fn next(stream: &mut DeliveryStream, within: Duration, what: &str) -> Message {
    let d = tokio::time::timeout(within, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {within:?}"))
        .unwrap_or_else(|| panic!("stream ended before the {what}"))
        .unwrap_or_else(|e| panic!("stream error before the {what}: {e}"));
    let m = d.message().clone();
    d.ack()
        .await
        .unwrap_or_else(|e| panic!("acking the {what} failed: {e}"));
    m
}

async fn start(router: &Router, within: Duration) {
    let r = router.clone();
    tokio::spawn(async move {
        if let Err(e) = r.run().await {
            panic!("router failed: {e}");
        }
    });
    tokio::time::timeout(within, router.running())
        .await
        .unwrap_or_else(|_| panic!("router not running within {within:?}"));
}

/// An always-failing handler behind a dead-letter layer; returns the router and the channel
/// of its calls.
async fn failing_router(
    s: &Arc<dyn Subscriber>,
    dl: DeadLetter,
    topic: &str,
    tx: mpsc::UnboundedSender<Message>,
) -> Router {
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        ..RouterConfig::default()
    });
    router
        .add_handler("failing")
        .subscribe(s.clone(), topic)
        .group("payments")
        .layer(dl)
        .handler(move |m: Message| {
            let _ = tx.send(m.clone());
            async move { HandlerResult::<()>::Err("payment provider down".into()) }
        })
        .await
        .unwrap_or_else(|e| panic!("adding the handler failed: {e}"));
    router
}

/// A message whose handler always fails reaches the dead-letter topic after exactly
/// `max_deliveries` deliveries, with its payload, metadata and history; counting is the
/// default ([`Counting::Auto`]: the broker's attempt where it reports one, else durable).
pub async fn dead_letter_after_max_deliveries(b: Arc<dyn Backend>) {
    dead_letter_run(b, Counting::Auto, false).await;
}

/// The same with durable counting forced ([`Counting::Republish`]), also on brokers that
/// report attempts; on persistent backends with consumer groups, the consumer is replaced
/// midway and the count carries on.
pub async fn dead_letter_durable_counting(b: Arc<dyn Backend>) {
    let f = b.features();
    dead_letter_run(b, Counting::Republish, f.persistent && f.consumer_groups).await;
}

async fn dead_letter_run(b: Arc<dyn Backend>, counting: Counting, restart: bool) {
    let f = b.features();
    if !f.redelivers_on_nack {
        eprintln!("SKIP dead letter: the backend does not redeliver");
        return;
    }
    let t = b.timeout();
    let (p, s) = clients(&b).await;
    let topic = unique_topic("dead_letter");
    let dead_topic = format!("{topic}.dead");
    let mut dead = watch(&s, &dead_topic).await;
    s.initialize(&topic, &SubscribeOptions::group("payments"))
        .await
        .unwrap_or_else(|e| panic!("initialize failed: {e}"));
    let max = 3;
    let dl = DeadLetter::new(p.clone(), &dead_topic)
        .max_deliveries(max)
        .counting(counting);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let router = failing_router(&s, dl.clone(), &topic, tx.clone()).await;
    start(&router, t).await;
    let input = Message::new("payment 42")
        .with_metadata("amount", "12.50")
        .with_key("acct-7");
    p.publish_one(&topic, input.clone())
        .await
        .unwrap_or_else(|e| panic!("publish failed: {e}"));
    let mut calls = Vec::new();
    if restart {
        // The first consumer sees one failure and goes away; a new one carries on.
        calls.push(
            tokio::time::timeout(t, rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no delivery within {t:?}"))
                .unwrap_or_else(|| panic!("channel closed")),
        );
        router
            .close()
            .await
            .unwrap_or_else(|e| panic!("close failed: {e}"));
        let second = failing_router(&s, dl.clone(), &topic, tx.clone()).await;
        start(&second, t).await;
        let d = next(&mut dead, t, "dead letter").await;
        check_dead_letter(&d, &input, max, counting, f.delivery_attempt, &topic);
        second
            .close()
            .await
            .unwrap_or_else(|e| panic!("close failed: {e}"));
    } else {
        let d = next(&mut dead, t, "dead letter").await;
        check_dead_letter(&d, &input, max, counting, f.delivery_attempt, &topic);
        router
            .close()
            .await
            .unwrap_or_else(|e| panic!("close failed: {e}"));
    }
    while let Ok(m) = rx.try_recv() {
        calls.push(m);
    }
    assert_eq!(
        calls.len(),
        max as usize,
        "the handler must be called exactly {max} times before dead-lettering"
    );
    assert!(calls
        .iter()
        .all(|m| m.uuid() == input.uuid() && m.payload() == input.payload()));
    if let Ok(Some(Ok(extra))) = tokio::time::timeout(Duration::from_millis(500), dead.next()).await
    {
        panic!("a second dead letter arrived: {:?}", extra.message());
    }
    for c in [p.close().await, s.close().await] {
        c.unwrap_or_else(|e| panic!("close failed: {e}"));
    }
}

fn check_dead_letter(
    d: &Message,
    input: &Message,
    max: u32,
    counting: Counting,
    broker_attempts: bool,
    topic: &str,
) {
    assert_eq!(d.uuid(), input.uuid());
    assert_eq!(d.payload(), input.payload());
    let md = d.metadata();
    assert_eq!(md.get("amount"), Some("12.50"));
    assert_eq!(
        md.get(headers::DEAD_LETTER_DELIVERIES),
        Some(max.to_string().as_str())
    );
    let expected = match counting {
        Counting::Auto if broker_attempts => "broker",
        Counting::Broker => "broker",
        _ => "republish",
    };
    assert_eq!(md.get(headers::DEAD_LETTER_COUNTING), Some(expected));
    assert_eq!(md.get(headers::DEAD_LETTER_TOPIC), Some(topic));
    assert_eq!(md.get(headers::DEAD_LETTER_HANDLER), Some("failing"));
    assert_eq!(md.get(headers::DEAD_LETTER_GROUP), Some("payments"));
    assert_eq!(
        md.get(headers::DEAD_LETTER_REASON),
        Some("payment provider down")
    );
    let last = format!("{}{max}", headers::DEAD_LETTER_ERROR_PREFIX);
    assert!(
        md.get(&last)
            .is_some_and(|e| e.ends_with("payment provider down")),
        "history entry {last} in {md:?}"
    );
}

/// Round trips through a [`Replier`] handler: a reply with payload and metadata, a typed
/// error reply, a streamed three-part reply, and a timeout with nobody answering.
pub async fn request_reply_round_trip(b: Arc<dyn Backend>) {
    let t = b.timeout();
    let (p, s) = clients(&b).await;
    let topic = unique_topic("request_reply");
    s.initialize(&topic, &SubscribeOptions::group("replier"))
        .await
        .unwrap_or_else(|e| panic!("initialize failed: {e}"));
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        ..RouterConfig::default()
    });
    router
        .add_handler("replier")
        .subscribe(s.clone(), &topic)
        .group("replier")
        .layer(Replier::new(p.clone()))
        .handler(|req: Message| async move {
            let text = String::from_utf8_lossy(req.payload()).into_owned();
            let result: HandlerResult<Vec<Message>> = match text.as_str() {
                "invalid" => Err(permanent("invalid request")),
                "three" => Ok((1..=3).map(|i| Message::new(format!("part {i}"))).collect()),
                _ => Ok(vec![
                    Message::new(text.to_uppercase()).with_metadata("echo", "yes")
                ]),
            };
            result
        })
        .await
        .unwrap_or_else(|e| panic!("adding the replier failed: {e}"));
    start(&router, t).await;
    let requester = Requester::connect(p.clone(), s.clone(), RequesterConfig::default().timeout(t))
        .await
        .unwrap_or_else(|e| panic!("connecting the requester failed: {e}"));

    let reply = requester
        .request(&topic, Message::new("hello").with_metadata("k", "v"))
        .await
        .unwrap_or_else(|e| panic!("request failed: {e}"));
    assert_eq!(reply.payload().as_ref(), b"HELLO");
    assert_eq!(reply.metadata().get("echo"), Some("yes"));
    assert_eq!(reply.metadata().get(headers::REPLY_STATUS), Some("ok"));

    match requester.request(&topic, Message::new("invalid")).await {
        Err(RequestError::Handler { kind, message, .. }) => {
            assert_eq!(kind, ReplyErrorKind::Permanent);
            assert_eq!(message, "invalid request");
        }
        other => panic!("expected a handler error, got {other:?}"),
    }

    let stream = requester
        .request_stream(&topic, Message::new("three"))
        .await
        .unwrap_or_else(|e| panic!("request_stream failed: {e}"));
    let mut parts: Vec<String> = stream
        .map(|r| {
            let m = r.unwrap_or_else(|e| panic!("stream reply failed: {e}"));
            String::from_utf8_lossy(m.payload()).into_owned()
        })
        .collect()
        .await;
    parts.sort();
    assert_eq!(parts, vec!["part 1", "part 2", "part 3"]);

    let nobody = unique_topic("request_reply_nobody");
    let started = Instant::now();
    match requester
        .request_timeout(&nobody, Message::new("anyone?"), Duration::from_millis(500))
        .await
    {
        Err(RequestError::Timeout { .. }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    // tokio's timers may fire up to a millisecond early as `Instant` measures it.
    assert!(started.elapsed() >= Duration::from_millis(495));
    assert_eq!(requester.pending(), 0);

    requester.close().await;
    router
        .close()
        .await
        .unwrap_or_else(|e| panic!("close failed: {e}"));
    for c in [p.close().await, s.close().await] {
        c.unwrap_or_else(|e| panic!("close failed: {e}"));
    }
}

/// Round-trip figures of [`request_reply_load`].
#[derive(Clone, Debug)]
pub struct RoundTrips {
    /// Requests answered.
    pub requests: usize,
    /// Requests per second over the whole run.
    pub per_second: f64,
    /// Median round trip.
    pub p50: Duration,
    /// 99th percentile round trip.
    pub p99: Duration,
}

/// Sends `requests` requests, `concurrency` at a time, to an echo [`Replier`] on the same
/// broker and measures the round trips (for benches; panics on any failure).
pub async fn request_reply_load(
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
    requests: usize,
    concurrency: usize,
) -> RoundTrips {
    let topic = unique_topic("rr_bench");
    subscriber
        .initialize(&topic, &SubscribeOptions::group("echo"))
        .await
        .unwrap_or_else(|e| panic!("initialize failed: {e}"));
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        ..RouterConfig::default()
    });
    router
        .add_handler("echo")
        .subscribe(subscriber.clone(), &topic)
        .group("echo")
        .concurrency(concurrency.max(1))
        .layer(Replier::new(publisher.clone()))
        .handler(|m: Message| async move { HandlerResult::Ok(Message::new(m.payload().clone())) })
        .await
        .unwrap_or_else(|e| panic!("adding the replier failed: {e}"));
    start(&router, Duration::from_secs(60)).await;
    let requester = Requester::connect(
        publisher.clone(),
        subscriber.clone(),
        RequesterConfig::default().timeout(Duration::from_secs(60)),
    )
    .await
    .unwrap_or_else(|e| panic!("connecting the requester failed: {e}"));
    let per_worker = requests.div_ceil(concurrency.max(1));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (requester, topic) = (requester.clone(), topic.clone());
            tokio::spawn(async move {
                let mut rtts = Vec::with_capacity(per_worker);
                for i in 0..per_worker {
                    let sent = Instant::now();
                    let reply = requester
                        .request(&topic, Message::new(i.to_string()))
                        .await
                        .unwrap_or_else(|e| panic!("request failed: {e}"));
                    assert_eq!(reply.payload().as_ref(), i.to_string().as_bytes());
                    rtts.push(sent.elapsed());
                }
                rtts
            })
        })
        .collect();
    let mut rtts = Vec::with_capacity(per_worker * concurrency.max(1));
    for w in workers {
        rtts.extend(w.await.unwrap_or_else(|e| panic!("worker failed: {e}")));
    }
    let elapsed = started.elapsed();
    requester.close().await;
    router
        .close()
        .await
        .unwrap_or_else(|e| panic!("close failed: {e}"));
    rtts.sort();
    let pct = |q: f64| rtts[((rtts.len() as f64 * q) as usize).min(rtts.len() - 1)];
    RoundTrips {
        requests: rtts.len(),
        per_second: rtts.len() as f64 / elapsed.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

#[cfg(test)]
mod memory {
    crate::middleware_tests!(tidemill_testkit::MemoryBackend::new(Default::default()));
}
