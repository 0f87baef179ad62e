//! Batch handlers on a real backend: per-message settlement with the reliability layers, a
//! panic, a shutdown mid-batch, order per key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidemill_core::router::BatchResult;
use tidemill_core::{
    permanent, Backoff, Message, Publisher, Router, RouterConfig, SubscribeOptions, Subscriber,
};
use tidemill_testkit::{unique_topic, Backend};

use super::{clients, next, start};
use crate::{PoisonQueue, Recoverer};

/// Long enough that a batch is only handled early when it is full (or the handler stops).
const FOREVER: Duration = Duration::from_secs(3600);

fn router() -> Router {
    Router::with_config(RouterConfig {
        close_clients: false,
        redelivery: Backoff::new(Duration::from_millis(20)),
        ..RouterConfig::default()
    })
}

fn text(m: &Message) -> String {
    String::from_utf8_lossy(m.payload()).into_owned()
}

async fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "no {what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A new member of `group` receives a message published now as the first thing: nothing
/// of what came before was left unacked.
async fn nothing_left(
    p: &Arc<dyn Publisher>,
    s: &Arc<dyn Subscriber>,
    topic: &str,
    group: &str,
    within: Duration,
) {
    let mut stream = s
        .subscribe(topic, SubscribeOptions::group(group))
        .await
        .unwrap_or_else(|e| panic!("subscribe {topic} failed: {e}"));
    p.publish_one(topic, Message::new("sentinel"))
        .await
        .unwrap_or_else(|e| panic!("publish failed: {e}"));
    let first = next(&mut stream, within, "sentinel").await;
    assert_eq!(
        text(&first),
        "sentinel",
        "a message of the batches was left unacked on {topic}"
    );
}

/// Batch sizes: with `max_wait` too long to matter only full batches are handled, and the
/// rest is handed over when the handler stops; with a short `max_wait` a partial batch goes
/// when it is over.
pub async fn batch_sizes_are_honoured(b: Arc<dyn Backend>) {
    let f = b.features();
    let t = b.timeout();
    let (p, s) = clients(&b).await;
    let topic = unique_topic("batch-sizes");
    let opts = if f.consumer_groups {
        SubscribeOptions::group("sizes")
    } else {
        SubscribeOptions::new()
    };
    s.initialize(&topic, &opts)
        .await
        .unwrap_or_else(|e| panic!("initialize failed: {e}"));
    let batches: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let reached = Arc::new(AtomicUsize::new(0));
    let router = router();
    let (got, r) = (batches.clone(), reached.clone());
    let mut handler = router.add_handler("sizes").subscribe(s.clone(), &topic);
    if let Some(g) = opts.consumer_group() {
        handler = handler.group(g);
    }
    handler
        .layer(tower::util::MapRequestLayer::new(move |m: Message| {
            r.fetch_add(1, Ordering::SeqCst);
            m
        }))
        .batch(4, FOREVER)
        .handler(move |msgs: Vec<Message>| {
            got.lock().push(msgs.iter().map(text).collect());
            async {}
        })
        .await
        .unwrap_or_else(|e| panic!("adding the batch handler failed: {e}"));
    start(&router, t).await;
    let msgs: Vec<Message> = (0..10).map(|i| Message::new(format!("s{i}"))).collect();
    p.publish(&topic, msgs)
        .await
        .unwrap_or_else(|e| panic!("publish failed: {e}"));
    wait_until("two full batches and the rest gathering", t, || {
        batches.lock().len() >= 2 && reached.load(Ordering::SeqCst) >= 10
    })
    .await;
    router
        .close()
        .await
        .unwrap_or_else(|e| panic!("close failed: {e}"));
    let got = batches.lock().clone();
    let sizes: Vec<usize> = got.iter().map(Vec::len).collect();
    assert_eq!(
        sizes,
        [4, 4, 2],
        "two full batches, then the rest at close: {got:?}"
    );
    let mut all: Vec<String> = got.concat();
    all.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    want.sort();
    assert_eq!(all, want);

    // A short max_wait: three messages go in partial batches.
    let topic = unique_topic("batch-wait");
    s.initialize(&topic, &opts)
        .await
        .unwrap_or_else(|e| panic!("initialize failed: {e}"));
    let batches: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let router = router_with_close(t);
    let got = batches.clone();
    let mut handler = router.add_handler("wait").subscribe(s.clone(), &topic);
    if let Some(g) = opts.consumer_group() {
        handler = handler.group(g);
    }
    handler
        .batch(100, Duration::from_millis(50))
        .handler(move |msgs: Vec<Message>| {
            got.lock().push(msgs.iter().map(text).collect());
            async {}
        })
        .await
        .unwrap_or_else(|e| panic!("adding the batch handler failed: {e}"));
    start(&router, t).await;
    let msgs: Vec<Message> = (0..3).map(|i| Message::new(format!("w{i}"))).collect();
    p.publish(&topic, msgs)
        .await
        .unwrap_or_else(|e| panic!("publish failed: {e}"));
    // Handled while the router runs: max_wait, not the close, ended the batches.
    wait_until("three messages handled", t, || {
        batches.lock().iter().map(Vec::len).sum::<usize>() >= 3
    })
    .await;
    router
        .close()
        .await
        .unwrap_or_else(|e| panic!("close failed: {e}"));
    let mut all: Vec<String> = batches.lock().concat();
    all.sort();
    assert_eq!(all, ["w0", "w1", "w2"]);
    for c in [p.close().await, s.close().await] {
        c.unwrap_or_else(|e| panic!("close failed: {e}"));
    }
}

/// A router whose close waits up to `t` for messages in flight.
fn router_with_close(t: Duration) -> Router {
    Router::with_config(RouterConfig {
        close_clients: false,
        close_timeout: t,
        redelivery: Backoff::new(Duration::from_millis(20)),
        ..RouterConfig::default()
    })
}

/// Mixed outcomes in one batch: the message failed with a permanent error goes to the
/// poison topic (and is acked), the one failed with a transient error comes back alone,
/// every other message is handled once and acked; no batch exceeds its size.
pub async fn batch_settles_each_message(b: Arc<dyn Backend>) {
    let f = b.features();
    if !f.redelivers_on_nack || !f.consumer_groups || !f.persistent {
        eprintln!("SKIP batch settlement: needs redelivery and persistent consumer groups");
        return;
    }
    let t = b.timeout();
    let (p, s) = clients(&b).await;
    let topic = unique_topic("batch-settle");
    let poison_topic = format!("{topic}.poison");
    let group = "ledger";
    s.initialize(&topic, &SubscribeOptions::group(group))
        .await
        .unwrap_or_else(|e| panic!("initialize failed: {e}"));
    let poison = PoisonQueue::new(p.clone(), &poison_topic);
    let calls: Arc<Mutex<Vec<String>>> = Arc::default();
    let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
    let failed_once = Arc::new(AtomicUsize::new(0));
    let router = router();
    let (c, z) = (calls.clone(), sizes.clone());
    router
        .add_handler("ledger")
        .subscribe(s.clone(), &topic)
        .group(group)
        .layer(poison.clone())
        .batch(8, Duration::from_millis(100))
        .handler(move |msgs: Vec<Message>| {
            z.lock().push(msgs.len());
            let mut result = BatchResult::ok();
            for (i, m) in msgs.iter().enumerate() {
                let payload = text(m);
                if payload == "m3" {
                    result.fail(i, permanent("not a ledger entry"));
                } else if payload == "m7" && failed_once.fetch_add(1, Ordering::SeqCst) == 0 {
                    result.fail(i, "ledger locked");
                }
                c.lock().push(payload);
            }
            async move { result }
        })
        .await
        .unwrap_or_else(|e| panic!("adding the batch handler failed: {e}"));
    start(&router, t).await;
    let msgs: Vec<Message> = (0..20).map(|i| Message::new(format!("m{i}"))).collect();
    p.publish(&topic, msgs.clone())
        .await
        .unwrap_or_else(|e| panic!("publish failed: {e}"));
    // Every message handled, m7 twice.
    wait_until("batch outcome", t, || calls.lock().len() >= 21).await;
    wait_until("poisoned message", t, || poison.poisoned() >= 1).await;
    let stats = router.handler_stats("ledger").expect("the handler's stats");
    router
        .close()
        .await
        .unwrap_or_else(|e| panic!("close failed: {e}"));
    let mut counts: HashMap<String, usize> = HashMap::new();
    for c in calls.lock().iter() {
        *counts.entry(c.clone()).or_default() += 1;
    }
    for i in 0..20 {
        let want = if i == 7 { 2 } else { 1 };
        assert_eq!(
            counts[&format!("m{i}")],
            want,
            "m{i} handled {want} time(s)"
        );
    }
    assert!(
        sizes.lock().iter().all(|&n| (1..=8).contains(&n)),
        "batch sizes {:?}",
        sizes.lock()
    );
    assert_eq!(poison.poisoned(), 1);
    assert_eq!((stats.failed, stats.nacked), (1, 1), "only m7 was nacked");
    // The poison topic holds m3 with its reason.
    let mut poisoned = s
        .subscribe(
            &poison_topic,
            SubscribeOptions::group(poison_topic.as_str()),
        )
        .await
        .unwrap_or_else(|e| panic!("subscribe failed: {e}"));
    let m = next(&mut poisoned, t, "poisoned message").await;
    assert_eq!((text(&m).as_str(), m.uuid()), ("m3", msgs[3].uuid()));
    let reason = m
        .metadata()
        .get(crate::headers::POISON_REASON)
        .unwrap_or_default();
    assert!(reason.contains("not a ledger entry"), "reason {reason:?}");
    nothing_left(&p, &s, &topic, group, t).await;
    for c in [p.close().await, s.close().await] {
        c.unwrap_or_else(|e| panic!("close failed: {e}"));
    }
}

/// A batch handler without layers (batches straight from the subscription): a message
/// failed alone comes back alone, a panic brings back its whole batch, every other message
/// is handled once and acked; no batch exceeds its size.
pub async fn batch_without_layers_settles_each_message(b: Arc<dyn Backend>) {
    let f = b.features();
    if !f.redelivers_on_nack || !f.consumer_groups || !f.persistent {
        eprintln!(
            "SKIP batch settlement without layers: needs redelivery and persistent consumer groups"
        );
        return;
    }
    let t = b.timeout();
    let (p, s) = clients(&b).await;
    let topic = unique_topic("batch-direct");
    let group = "direct";
    s.initialize(&topic, &SubscribeOptions::group(group))
        .await
        .unwrap_or_else(|e| panic!("initialize failed: {e}"));
    let calls: Arc<Mutex<Vec<String>>> = Arc::default();
    let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
    let panicked: Arc<Mutex<Option<usize>>> = Arc::default();
    let failed_once = Arc::new(AtomicUsize::new(0));
    let router = router();
    let (c, z, x) = (calls.clone(), sizes.clone(), panicked.clone());
    router
        .add_handler("direct")
        .subscribe(s.clone(), &topic)
        .group(group)
        .batch(8, Duration::from_millis(100))
        .handler(move |msgs: Vec<Message>| {
            z.lock().push(msgs.len());
            let payloads: Vec<String> = msgs.iter().map(text).collect();
            {
                let mut x = x.lock();
                if x.is_none() && payloads.iter().any(|m| m == "m12") {
                    *x = Some(payloads.len());
                    drop(x);
                    panic!("the bulk insert hit a bug");
                }
            }
            let mut result = BatchResult::ok();
            for (i, payload) in payloads.iter().enumerate() {
                if payload == "m7" && failed_once.fetch_add(1, Ordering::SeqCst) == 0 {
                    result.fail(i, "ledger locked");
                }
            }
            c.lock().extend(payloads);
            async move { result }
        })
        .await
        .unwrap_or_else(|e| panic!("adding the batch handler failed: {e}"));
    start(&router, t).await;
    let msgs: Vec<Message> = (0..20).map(|i| Message::new(format!("m{i}"))).collect();
    p.publish(&topic, msgs)
        .await
        .unwrap_or_else(|e| panic!("publish failed: {e}"));
    // Every message handled (after the panic), m7 twice.
    wait_until("batch outcome", t, || calls.lock().len() >= 21).await;
    let stats = router.handler_stats("direct").expect("the handler's stats");
    router
        .close()
        .await
        .unwrap_or_else(|e| panic!("close failed: {e}"));
    let mut counts: HashMap<String, usize> = HashMap::new();
    for c in calls.lock().iter() {
        *counts.entry(c.clone()).or_default() += 1;
    }
    for i in 0..20 {
        let want = if i == 7 { 2 } else { 1 };
        assert_eq!(
            counts.get(&format!("m{i}")).copied().unwrap_or(0),
            want,
            "m{i} handled {want} time(s) (after the panic)"
        );
    }
    assert!(
        sizes.lock().iter().all(|&n| (1..=8).contains(&n)),
        "batch sizes {:?}",
        sizes.lock()
    );
    let panicked = panicked.lock().expect("a batch panicked") as u64;
    assert_eq!(
        (stats.failed, stats.panicked, stats.nacked),
        (1, panicked, 1 + panicked),
        "m7 and the panicked batch's messages nacked"
    );
    nothing_left(&p, &s, &topic, group, t).await;
    for c in [p.close().await, s.close().await] {
        c.unwrap_or_else(|e| panic!("close failed: {e}"));
    }
}

/// A panicking batch handler fails every message of its batch; the recoverer sees each as a
/// failure and they all come back, to be handled once it stops panicking.
pub async fn batch_panic_redelivers_the_batch(b: Arc<dyn Backend>) {
    let f = b.features();
    if !f.redelivers_on_nack || !f.consumer_groups || !f.persistent {
        eprintln!("SKIP batch panic: needs redelivery and persistent consumer groups");
        return;
    }
    let t = b.timeout();
    let (p, s) = clients(&b).await;
    let topic = unique_topic("batch-panic");
    let group = "panicky";
    s.initialize(&topic, &SubscribeOptions::group(group))
        .await
        .unwrap_or_else(|e| panic!("initialize failed: {e}"));
    let first_batch: Arc<Mutex<Option<Vec<String>>>> = Arc::default();
    let handled: Arc<Mutex<Vec<String>>> = Arc::default();
    let router = router();
    let (first, done) = (first_batch.clone(), handled.clone());
    router
        .add_handler("panicky")
        .subscribe(s.clone(), &topic)
        .group(group)
        .layer(Recoverer::new())
        .batch(5, Duration::from_millis(200))
        .handler(move |msgs: Vec<Message>| {
            let payloads: Vec<String> = msgs.iter().map(text).collect();
            let mut first = first.lock();
            if first.is_none() {
                *first = Some(payloads);
                drop(first);
                panic!("index out of bounds in the bulk insert");
            }
            done.lock().extend(payloads);
            async {}
        })
        .await
        .unwrap_or_else(|e| panic!("adding the batch handler failed: {e}"));
    start(&router, t).await;
    let msgs: Vec<Message> = (0..5).map(|i| Message::new(format!("p{i}"))).collect();
    p.publish(&topic, msgs)
        .await
        .unwrap_or_else(|e| panic!("publish failed: {e}"));
    wait_until("every message handled", t, || handled.lock().len() >= 5).await;
    let stats = router
        .handler_stats("panicky")
        .expect("the handler's stats");
    router
        .close()
        .await
        .unwrap_or_else(|e| panic!("close failed: {e}"));
    let panicked = first_batch.lock().clone().expect("a first batch");
    let mut all = handled.lock().clone();
    all.sort();
    assert_eq!(
        all,
        ["p0", "p1", "p2", "p3", "p4"],
        "each handled once after the panic"
    );
    // The recoverer turned the panic into an error per message.
    assert_eq!(
        (stats.failed, stats.panicked, stats.nacked),
        (panicked.len() as u64, 0, panicked.len() as u64),
        "every message of the panicked batch {panicked:?} nacked"
    );
    nothing_left(&p, &s, &topic, group, t).await;
    for c in [p.close().await, s.close().await] {
        c.unwrap_or_else(|e| panic!("close failed: {e}"));
    }
}

/// Stopping the router while a batch is still gathering hands the partial batch to the
/// handler at once (not after `max_wait`) and acks it; nothing is left unacked.
pub async fn batch_shutdown_hands_over_a_partial_batch(b: Arc<dyn Backend>) {
    let f = b.features();
    if !f.consumer_groups || !f.persistent {
        eprintln!("SKIP batch shutdown: needs persistent consumer groups");
        return;
    }
    let t = b.timeout();
    let (p, s) = clients(&b).await;
    let topic = unique_topic("batch-shutdown");
    let group = "drain";
    s.initialize(&topic, &SubscribeOptions::group(group))
        .await
        .unwrap_or_else(|e| panic!("initialize failed: {e}"));
    let reached = Arc::new(AtomicUsize::new(0));
    let batches: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        close_timeout: FOREVER,
        ..RouterConfig::default()
    });
    let (r, got) = (reached.clone(), batches.clone());
    router
        .add_handler("drain")
        .subscribe(s.clone(), &topic)
        .group(group)
        .layer(tower::util::MapRequestLayer::new(move |m: Message| {
            r.fetch_add(1, Ordering::SeqCst);
            m
        }))
        .batch(50, FOREVER)
        .handler(move |msgs: Vec<Message>| {
            got.lock().push(msgs.iter().map(text).collect());
            async {}
        })
        .await
        .unwrap_or_else(|e| panic!("adding the batch handler failed: {e}"));
    start(&router, t).await;
    let msgs: Vec<Message> = (0..5).map(|i| Message::new(format!("d{i}"))).collect();
    p.publish(&topic, msgs)
        .await
        .unwrap_or_else(|e| panic!("publish failed: {e}"));
    wait_until("5 messages gathering", t, || {
        reached.load(Ordering::SeqCst) >= 5
    })
    .await;
    tokio::time::timeout(t, router.close())
        .await
        .unwrap_or_else(|_| panic!("close waited for the batch's max_wait"))
        .unwrap_or_else(|e| panic!("close failed: {e}"));
    let mut got = batches.lock().clone();
    assert_eq!(got.len(), 1, "one partial batch: {got:?}");
    got[0].sort();
    assert_eq!(got[0], ["d0", "d1", "d2", "d3", "d4"]);
    nothing_left(&p, &s, &topic, group, t).await;
    for c in [p.close().await, s.close().await] {
        c.unwrap_or_else(|e| panic!("close failed: {e}"));
    }
}

/// One batch's (key, payload as a number) pairs.
type KeyedBatch = Vec<(String, u32)>;

/// Keyed messages (a batch handler without layers, so batches come straight from the
/// subscription): each key's messages come in publish order within each batch and, the
/// first time each is handled, across batches; when one fails, the later ones of its key in
/// that batch are not acked ahead of it (they come back too).
pub async fn batch_keeps_order_per_key(b: Arc<dyn Backend>) {
    let f = b.features();
    if !f.order_per_key || !f.redelivers_on_nack {
        eprintln!("SKIP batch order per key: the backend does not keep order per key");
        return;
    }
    let t = b.timeout();
    let (p, s) = clients(&b).await;
    let topic = unique_topic("batch-keys");
    let opts = if f.consumer_groups {
        SubscribeOptions::group("keys")
    } else {
        SubscribeOptions::new()
    };
    s.initialize(&topic, &opts)
        .await
        .unwrap_or_else(|e| panic!("initialize failed: {e}"));
    let batches: Arc<Mutex<Vec<KeyedBatch>>> = Arc::default();
    let failed_once = Arc::new(AtomicUsize::new(0));
    let router = router();
    let got = batches.clone();
    let mut handler = router.add_handler("keys").subscribe(s.clone(), &topic);
    if let Some(g) = opts.consumer_group() {
        handler = handler.group(g);
    }
    handler
        .batch(10, Duration::from_millis(50))
        .handler(move |msgs: Vec<Message>| {
            let batch: KeyedBatch = msgs
                .iter()
                .map(|m| {
                    let key = String::from_utf8_lossy(m.key().map_or(&[][..], |k| k)).into_owned();
                    (key, text(m).parse().unwrap_or(u32::MAX))
                })
                .collect();
            let mut result = BatchResult::ok();
            // Message 4 (key k1) fails the first time it is handled.
            if let Some(i) = batch.iter().position(|(_, v)| *v == 4) {
                if failed_once.fetch_add(1, Ordering::SeqCst) == 0 {
                    result.fail(i, "store busy");
                }
            }
            got.lock().push(batch);
            async move { result }
        })
        .await
        .unwrap_or_else(|e| panic!("adding the batch handler failed: {e}"));
    start(&router, t).await;
    let msgs: Vec<Message> = (0..30u32)
        .map(|i| Message::new(i.to_string()).with_key(["k0", "k1", "k2"][i as usize % 3]))
        .collect();
    p.publish(&topic, msgs)
        .await
        .unwrap_or_else(|e| panic!("publish failed: {e}"));
    // The later messages of k1 in the batch where 4 failed must come back, as 4 does.
    let must_return = |batches: &[KeyedBatch]| -> Vec<u32> {
        let Some(failed) = batches.iter().find(|b| b.iter().any(|(_, v)| *v == 4)) else {
            return Vec::new();
        };
        failed
            .iter()
            .skip_while(|(_, v)| *v != 4)
            .skip(1)
            .filter(|(k, _)| k == "k1")
            .map(|(_, v)| *v)
            .collect()
    };
    wait_until("30 messages handled, the failed ones again", t, || {
        let batches = batches.lock();
        let count = |x: u32| batches.iter().flatten().filter(|(_, v)| *v == x).count();
        (0..30).all(|x| count(x) >= 1)
            && count(4) >= 2
            && must_return(&batches).iter().all(|&x| count(x) >= 2)
    })
    .await;
    let stats = router.handler_stats("keys").expect("the handler's stats");
    router
        .close()
        .await
        .unwrap_or_else(|e| panic!("close failed: {e}"));
    let batches = batches.lock().clone();
    // 4 failed, and each later k1 message of its batch with it (none on a backend that hands
    // out a key's next message only after the one before is acked).
    let cascaded = must_return(&batches).len() as u64;
    eprintln!("batch order per key: {cascaded} later k1 message(s) failed with 4");
    assert_eq!(
        (stats.failed, stats.nacked),
        (1 + cascaded, 1 + cascaded),
        "4 and the later k1 messages of its batch nacked: {batches:?}"
    );
    let mut first: HashMap<String, Vec<u32>> = HashMap::new();
    for batch in &batches {
        for key in ["k0", "k1", "k2"] {
            let values: Vec<u32> = batch
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| *v)
                .collect();
            assert!(
                values.windows(2).all(|w| w[0] < w[1]),
                "key {key} out of order in the batch {batch:?}"
            );
        }
        for (k, v) in batch {
            let seen = first.entry(k.clone()).or_default();
            if !seen.contains(v) {
                seen.push(*v);
            }
        }
    }
    for (key, seen) in first {
        let want: Vec<u32> = (0..30).filter(|i| format!("k{}", i % 3) == key).collect();
        assert_eq!(seen, want, "key {key}: first handled in publish order");
    }
    for c in [p.close().await, s.close().await] {
        c.unwrap_or_else(|e| panic!("close failed: {e}"));
    }
}
