//! Backend-generic checks of the dead-letter, request-reply and batch-handler paths, for adapter crates to
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

mod batch;
pub use batch::{
    batch_keeps_order_per_key, batch_panic_redelivers_the_batch, batch_settles_each_message,
    batch_shutdown_hands_over_a_partial_batch, batch_sizes_are_honoured,
    batch_without_layers_settles_each_message,
};

use crate::request_reply::{Replier, ReplyErrorKind, RequestError, Requester, RequesterConfig};
use crate::{headers, Counting, DeadLetter, PoisonQueue};

/// Expands to one `#[test]` per check of this module, each against a fresh backend built by
/// the given expression (which may `.await`). With `skip_unless_env = "VAR",` first, each
/// test passes after printing `SKIP` when `VAR` is unset (no broker to test against).
#[macro_export]
macro_rules! middleware_tests {
    (skip_unless_env = $var:literal, $backend:expr $(,)?) => {
        $crate::middleware_tests!(@each $var, $backend;
            dead_letter_after_max_deliveries,
            dead_letter_durable_counting,
            dead_letter_retry_topic_waits_for_its_handler,
            request_reply_round_trip,
            failing_message_backs_off,
            permanent_error_backs_off,
            failure_destinations_keep_messages,
            dead_letter_watcher_does_not_loop,
            batch_sizes_are_honoured,
            batch_settles_each_message,
            batch_without_layers_settles_each_message,
            batch_panic_redelivers_the_batch,
            batch_shutdown_hands_over_a_partial_batch,
            batch_keeps_order_per_key,
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

/// The clients of a dead-letter check, its topic (with the group `payments` created on it),
/// and a watch on its dead-letter topic `{topic}.dead`.
struct DeadLetterCase {
    p: Arc<dyn Publisher>,
    s: Arc<dyn Subscriber>,
    topic: String,
    dead_topic: String,
    dead: DeliveryStream,
}

async fn dead_letter_case(b: &Arc<dyn Backend>, name: &str) -> DeadLetterCase {
    let (p, s) = clients(b).await;
    let topic = unique_topic(name);
    let dead_topic = format!("{topic}.dead");
    let dead = watch(&s, &dead_topic).await;
    s.initialize(&topic, &SubscribeOptions::group("payments"))
        .await
        .unwrap_or_else(|e| panic!("initialize failed: {e}"));
    DeadLetterCase {
        p,
        s,
        topic,
        dead_topic,
        dead,
    }
}

/// The message the dead-letter checks fail on.
fn payment() -> Message {
    Message::new("payment 42")
        .with_metadata("amount", "12.50")
        .with_key("acct-7")
}

/// Durable counting with a [`retry_topic`](DeadLetter::retry_topic) whose handler has not
/// subscribed yet: the copy of the failed message waits on the retry topic for the group
/// (nothing is lost while the original is acked), and once the retry handler runs, the
/// count carries on there up to the dead letter.
pub async fn dead_letter_retry_topic_waits_for_its_handler(b: Arc<dyn Backend>) {
    let f = b.features();
    if !f.redelivers_on_nack || !f.consumer_groups {
        eprintln!("SKIP retry topic: the backend does not redeliver or has no consumer groups");
        return;
    }
    let t = b.timeout();
    let DeadLetterCase {
        p,
        s,
        topic,
        dead_topic,
        mut dead,
    } = dead_letter_case(&b, "retry_topic").await;
    let retry_topic = format!("{topic}.retry");
    let max = 3;
    let dl = DeadLetter::new(p.clone(), &dead_topic)
        .max_deliveries(max)
        .counting(Counting::Republish)
        .retry_topic(&retry_topic);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let first = failing_router(&s, dl.clone(), &topic, tx.clone()).await;
    start(&first, t).await;
    if let Err(e) = p.retain_for(&format!("{topic}.probe"), "payments").await {
        eprintln!(
            "SKIP retry topic: the broker cannot make a topic keep messages for a group that \
             is consuming another one ({e})"
        );
        first
            .close()
            .await
            .unwrap_or_else(|e| panic!("close failed: {e}"));
        return;
    }
    let input = payment();
    p.publish_one(&topic, input.clone())
        .await
        .unwrap_or_else(|e| panic!("publish failed: {e}"));
    let call = tokio::time::timeout(t, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no delivery within {t:?}"))
        .unwrap_or_else(|| panic!("channel closed"));
    assert_eq!(call.uuid(), input.uuid());
    // The copy is confirmed on the retry topic (and the original acked) before the retry
    // handler exists.
    tokio::time::timeout(t, async {
        while dl.republished() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the failed message was not republished within {t:?}"));
    first
        .close()
        .await
        .unwrap_or_else(|e| panic!("close failed: {e}"));
    let retry = failing_router(&s, dl.clone(), &retry_topic, tx.clone()).await;
    start(&retry, t).await;
    let d = next(&mut dead, t, "dead letter").await;
    check_dead_letter(&d, &input, max, Counting::Republish, false, &retry_topic);
    retry
        .close()
        .await
        .unwrap_or_else(|e| panic!("close failed: {e}"));
    let mut calls = vec![call];
    while let Ok(m) = rx.try_recv() {
        calls.push(m);
    }
    assert_eq!(
        calls.len(),
        max as usize,
        "handler calls before the dead letter"
    );
    assert!(calls.iter().all(|m| m.uuid() == input.uuid()));
    for c in [p.close().await, s.close().await] {
        c.unwrap_or_else(|e| panic!("close failed: {e}"));
    }
}

async fn dead_letter_run(b: Arc<dyn Backend>, counting: Counting, restart: bool) {
    let f = b.features();
    if !f.redelivers_on_nack {
        eprintln!("SKIP dead letter: the backend does not redeliver");
        return;
    }
    let t = b.timeout();
    let DeadLetterCase {
        p,
        s,
        topic,
        dead_topic,
        mut dead,
    } = dead_letter_case(&b, "dead_letter").await;
    let max = 3;
    let dl = DeadLetter::new(p.clone(), &dead_topic)
        .max_deliveries(max)
        .counting(counting);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let router = failing_router(&s, dl.clone(), &topic, tx.clone()).await;
    start(&router, t).await;
    let input = payment();
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
        check_dead_letter(&d, &input, max, counting, durable_attempts(&calls), &topic);
        second
            .close()
            .await
            .unwrap_or_else(|e| panic!("close failed: {e}"));
    } else {
        let d = next(&mut dead, t, "dead letter").await;
        let mut seen = calls.clone();
        while let Ok(m) = rx.try_recv() {
            seen.push(m);
        }
        check_dead_letter(&d, &input, max, counting, durable_attempts(&seen), &topic);
        calls = seen;
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

/// Whether the handler's deliveries carried a broker-kept attempt count (what
/// [`Counting::Auto`] counts with).
fn durable_attempts(calls: &[Message]) -> bool {
    calls.first().and_then(Message::context).is_some_and(|c| {
        c.attempt().is_some() && c.attempt_origin() == tidemill_core::AttemptOrigin::Broker
    })
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

/// How long the safe-default checks watch a failing message.
const WATCH: Duration = Duration::from_secs(10);
/// The most deliveries a failing message may get in [`WATCH`] without any middleware (the
/// router's default backoff gives about 7; 20 leaves room for jitter and brokers that
/// round delays).
const MAX_DELIVERIES_IN_WATCH: usize = 20;

/// With no middleware at all, one message whose handler always fails is redelivered with a
/// growing delay (at most 20 deliveries in 10 s, and more than
/// one: it is not lost), while 1,000 good messages on other keys are all handled.
pub async fn failing_message_backs_off(b: Arc<dyn Backend>) {
    backoff_run(b, false).await;
}

/// The same for a permanent error ([`tidemill_core::permanent`]) with no poison queue: never
/// redelivered at full speed either.
pub async fn permanent_error_backs_off(b: Arc<dyn Backend>) {
    backoff_run(b, true).await;
}

async fn backoff_run(b: Arc<dyn Backend>, permanent_error: bool) {
    let f = b.features();
    if !f.redelivers_on_nack {
        eprintln!("SKIP backoff: the backend does not redeliver");
        return;
    }
    let t = b.timeout();
    let (p, s) = clients(&b).await;
    let topic = unique_topic("backoff");
    let opts = if f.consumer_groups {
        SubscribeOptions::group("backoff")
    } else {
        SubscribeOptions::new()
    };
    s.initialize(&topic, &opts)
        .await
        .unwrap_or_else(|e| panic!("initialize failed: {e}"));
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        ..RouterConfig::default()
    });
    let (tx, mut rx) = mpsc::unbounded_channel::<(bool, String, Instant)>();
    let mut handler = router.add_handler("backoff").subscribe(s.clone(), &topic);
    if let Some(g) = opts.consumer_group() {
        handler = handler.group(g);
    }
    handler
        .handler(move |m: Message| {
            let bad = m.payload().as_ref() == b"bad";
            let _ = tx.send((bad, m.uuid().to_owned(), Instant::now()));
            async move {
                if !bad {
                    return HandlerResult::Ok(());
                }
                if permanent_error {
                    Err(permanent("undecodable"))
                } else {
                    Err("always fails".into())
                }
            }
        })
        .await
        .unwrap_or_else(|e| panic!("adding the handler failed: {e}"));
    start(&router, t).await;
    let bad = Message::new("bad").with_key("bad");
    p.publish_one(&topic, bad.clone())
        .await
        .unwrap_or_else(|e| panic!("publish failed: {e}"));
    let good: Vec<Message> = (0..1000)
        .map(|i| Message::new(format!("good {i}")).with_key(format!("key-{}", i % 50)))
        .collect();
    for chunk in good.chunks(100) {
        p.publish(&topic, chunk.to_vec())
            .await
            .unwrap_or_else(|e| panic!("publish failed: {e}"));
    }
    let mut handled = std::collections::HashSet::new();
    let mut bad_deliveries = Vec::new();
    let deadline = Instant::now() + t + WATCH;
    loop {
        let watched_enough = bad_deliveries
            .first()
            .is_some_and(|first: &Instant| first.elapsed() >= WATCH);
        if handled.len() == good.len() && watched_enough {
            break;
        }
        let now = Instant::now();
        assert!(
            now < deadline,
            "after {:?}: {} of {} good messages handled, the failing one delivered {} times",
            t + WATCH,
            handled.len(),
            good.len(),
            bad_deliveries.len()
        );
        let wait = deadline - now;
        match tokio::time::timeout(wait.min(Duration::from_millis(200)), rx.recv()).await {
            Ok(Some((true, uuid, at))) => {
                assert_eq!(uuid, bad.uuid());
                bad_deliveries.push(at);
            }
            Ok(Some((false, uuid, _))) => {
                handled.insert(uuid);
            }
            Ok(None) => panic!("handler channel closed"),
            Err(_) => {}
        }
    }
    let stats = router
        .handler_stats("backoff")
        .unwrap_or_else(|| panic!("the handler runs"));
    router
        .close()
        .await
        .unwrap_or_else(|e| panic!("close failed: {e}"));
    assert!(
        stats.failed >= 2 && stats.nacked >= 2,
        "failures are counted: {stats:?}"
    );
    let first = bad_deliveries[0];
    let within: Vec<Duration> = bad_deliveries
        .iter()
        .map(|at| at.duration_since(first))
        .filter(|d| *d <= WATCH)
        .collect();
    eprintln!(
        "failing message ({}): {} deliveries in {WATCH:?}, at {within:?}",
        if permanent_error {
            "permanent"
        } else {
            "transient"
        },
        within.len()
    );
    assert!(
        within.len() <= MAX_DELIVERIES_IN_WATCH,
        "a failing message must not spin: {} deliveries in {WATCH:?}",
        within.len()
    );
    assert!(
        within.len() >= 2,
        "a failing message must be redelivered (nothing is lost): {} deliveries in {WATCH:?}",
        within.len()
    );
    for c in [p.close().await, s.close().await] {
        c.unwrap_or_else(|e| panic!("close failed: {e}"));
    }
}

/// Dead letters and poisoned messages published while nobody consumes their topics are
/// kept: a consumer started afterwards (with the layers' retention group, the topic's name
/// by default) receives every one of them.
pub async fn failure_destinations_keep_messages(b: Arc<dyn Backend>) {
    let f = b.features();
    if !f.redelivers_on_nack || !f.consumer_groups || !f.persistent {
        eprintln!("SKIP failure destinations: needs redelivery and persistent consumer groups");
        return;
    }
    let t = b.timeout();
    let (p, s) = clients(&b).await;
    let topic = unique_topic("destinations");
    let dead_topic = format!("{topic}.dead");
    let poison_topic = format!("{topic}.poison");
    s.initialize(&topic, &SubscribeOptions::group("orders"))
        .await
        .unwrap_or_else(|e| panic!("initialize failed: {e}"));
    let dl = DeadLetter::new(p.clone(), &dead_topic).max_deliveries(2);
    let poison = PoisonQueue::new(p.clone(), &poison_topic);
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        redelivery: crate::Backoff::new(Duration::from_millis(20)),
        ..RouterConfig::default()
    });
    router
        .add_handler("orders")
        .subscribe(s.clone(), &topic)
        .group("orders")
        .layer(dl.clone())
        .layer(poison.clone())
        .handler(|m: Message| async move {
            if m.payload().starts_with(b"garbage") {
                return Err(permanent("not an order"));
            }
            HandlerResult::<()>::Err("warehouse down".into())
        })
        .await
        .unwrap_or_else(|e| panic!("adding the handler failed: {e}"));
    start(&router, t).await;
    let stuck: Vec<Message> = (0..3).map(|i| Message::new(format!("stuck {i}"))).collect();
    let garbage: Vec<Message> = (0..2)
        .map(|i| Message::new(format!("garbage {i}")))
        .collect();
    p.publish(&topic, stuck.iter().chain(&garbage).cloned().collect())
        .await
        .unwrap_or_else(|e| panic!("publish failed: {e}"));
    let started = Instant::now();
    while dl.dead_lettered() < 3 || poison.poisoned() < 2 {
        assert!(
            started.elapsed() < t,
            "within {t:?}: {} dead-lettered, {} poisoned",
            dl.dead_lettered(),
            poison.poisoned()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    router
        .close()
        .await
        .unwrap_or_else(|e| panic!("close failed: {e}"));
    // Only now does anybody consume the failure topics.
    for (topic, expected) in [(&dead_topic, &stuck), (&poison_topic, &garbage)] {
        let mut stream = s
            .subscribe(topic, SubscribeOptions::group(topic.as_str()))
            .await
            .unwrap_or_else(|e| panic!("subscribe {topic} failed: {e}"));
        let mut got = Vec::new();
        for _ in 0..expected.len() {
            got.push(next(&mut stream, t, "kept failure").await);
        }
        let mut got_ids: Vec<&str> = got.iter().map(Message::uuid).collect();
        let mut want: Vec<&str> = expected.iter().map(Message::uuid).collect();
        got_ids.sort_unstable();
        want.sort_unstable();
        assert_eq!(got_ids, want, "every message kept on {topic}");
    }
    for c in [p.close().await, s.close().await] {
        c.unwrap_or_else(|e| panic!("close failed: {e}"));
    }
}

/// The recommended stack as router-level layers, and a dead-letter watcher on the same
/// router that always fails: the watcher's failures are not dead-lettered onto its own
/// topic (the message is dead-lettered once, the watcher sees a bounded number of
/// deliveries) and every delivery carries the original history.
pub async fn dead_letter_watcher_does_not_loop(b: Arc<dyn Backend>) {
    let f = b.features();
    if !f.redelivers_on_nack || !f.consumer_groups {
        eprintln!("SKIP watcher loop: needs redelivery and consumer groups");
        return;
    }
    let t = b.timeout();
    let (p, s) = clients(&b).await;
    let topic = unique_topic("watcher");
    let dead_topic = format!("{topic}.dead");
    s.initialize(&topic, &SubscribeOptions::group("orders"))
        .await
        .unwrap_or_else(|e| panic!("initialize failed: {e}"));
    s.initialize(&dead_topic, &SubscribeOptions::group(dead_topic.as_str()))
        .await
        .unwrap_or_else(|e| panic!("initialize failed: {e}"));
    let dl = DeadLetter::new(p.clone(), &dead_topic).max_deliveries(2);
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        ..RouterConfig::default()
    });
    router.layer(dl.clone());
    router
        .add_handler("orders")
        .subscribe(s.clone(), &topic)
        .group("orders")
        .handler(|_m: Message| async move { HandlerResult::<()>::Err("warehouse down".into()) })
        .await
        .unwrap_or_else(|e| panic!("adding the handler failed: {e}"));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Message, Instant)>();
    router
        .add_handler("watcher")
        .subscribe(s.clone(), &dead_topic)
        .group(dead_topic.as_str())
        .handler(move |m: Message| {
            let _ = tx.send((m, Instant::now()));
            async move { HandlerResult::<()>::Err("alerting down".into()) }
        })
        .await
        .unwrap_or_else(|e| panic!("adding the watcher failed: {e}"));
    start(&router, t).await;
    let input = Message::new("order 9");
    p.publish_one(&topic, input.clone())
        .await
        .unwrap_or_else(|e| panic!("publish failed: {e}"));
    let (first, first_at) = tokio::time::timeout(t, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("the watcher got nothing within {t:?}"))
        .unwrap_or_else(|| panic!("channel closed"));
    let mut seen = vec![first];
    while first_at.elapsed() < WATCH {
        if let Ok(Some((m, _))) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
        {
            seen.push(m);
        }
    }
    router
        .close()
        .await
        .unwrap_or_else(|e| panic!("close failed: {e}"));
    eprintln!("watcher deliveries in {WATCH:?}: {}", seen.len());
    assert!(
        seen.len() <= MAX_DELIVERIES_IN_WATCH,
        "the watcher's message must not loop: {} deliveries in {WATCH:?}",
        seen.len()
    );
    assert_eq!(dl.dead_lettered(), 1, "dead-lettered exactly once");
    for m in &seen {
        assert_eq!(m.uuid(), input.uuid());
        let md = m.metadata();
        assert_eq!(md.get(headers::DEAD_LETTER_HANDLER), Some("orders"));
        assert_eq!(md.get(headers::DEAD_LETTER_TOPIC), Some(topic.as_str()));
        assert_eq!(md.get(headers::DEAD_LETTER_REASON), Some("warehouse down"));
        for n in 1..=2 {
            let key = format!("{}{n}", headers::DEAD_LETTER_ERROR_PREFIX);
            assert!(
                md.get(&key).is_some_and(|e| e.ends_with("warehouse down")),
                "history entry {key} intact in {md:?}"
            );
        }
        let extra = format!("{}3", headers::DEAD_LETTER_ERROR_PREFIX);
        assert!(md.get(&extra).is_none(), "no history added: {md:?}");
    }
    for c in [p.close().await, s.close().await] {
        c.unwrap_or_else(|e| panic!("close failed: {e}"));
    }
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
