//! Counts that must hold under load, against the emulator (`PUBSUB_EMULATOR_HOST`):
//!
//! - a poison storm (2,000 messages, 5% always failing, a consumer group, `concurrency(4)`,
//!   the recommended reliability stack with `DeadLetter::max_deliveries(3)`): every good
//!   message handled, duplicates within the in-flight window, exactly one dead-letter record
//!   per poison message;
//! - a handler slower than twice the ack deadline is not redelivered while it runs, and the
//!   messages waiting behind it are not redelivered either.
//!
//! Both would fail if the adapter left messages the server had sent unleased until the
//! application asked for them: the emulator redelivers them after the subscription's ack
//! deadline (10 s) while their first copy is still on its way, so acked messages come back
//! and a poison message starts a second dead-letter count.
//!
//! Every test skips (passing, with a note) when `PUBSUB_EMULATOR_HOST` is unset.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tidemill_core::{
    HandlerResult, Message, Publisher, Router, RouterConfig, SubscribeOptions, Subscriber,
};
use tidemill_googlecloud::{GoogleCloudConfig, GoogleCloudPublisher, GoogleCloudSubscriber};
use tidemill_middleware::{
    Backoff, CorrelationId, DeadLetter, DelayedRedelivery, PoisonQueue, Recoverer, Retry,
};
use tidemill_testkit::unique_topic;
use tokio::time::Instant;

const PROJECT: &str = "tidemill-test";
/// Generous bound for the whole run (never reached when things work).
const LIMIT: Duration = Duration::from_secs(600);
/// Messages a handler works on at once.
const CONCURRENCY: usize = 4;
/// How long the storm's handler takes per call.
const HANDLER_TIME: Duration = Duration::from_millis(20);
/// How long nothing may happen before the counts are final: more than twice the
/// subscription's ack deadline, so a message that was going to come back has come back.
const QUIET: Duration = Duration::from_secs(25);

fn emulator() -> Option<String> {
    match std::env::var("PUBSUB_EMULATOR_HOST") {
        Ok(host) if !host.is_empty() => Some(host),
        _ => {
            eprintln!("SKIP: PUBSUB_EMULATOR_HOST is not set (no emulator to test against)");
            None
        }
    }
}

/// What the handler saw.
#[derive(Default)]
struct Calls {
    /// Handler calls per uuid: (calls, successful calls).
    per_uuid: HashMap<String, (u32, u32)>,
    /// When something last happened (a handler call or a dead-letter record).
    last: Option<Instant>,
}

impl Calls {
    fn touch(&mut self) {
        self.last = Some(Instant::now());
    }

    fn quiet_for(&self, d: Duration) -> bool {
        self.last.is_some_and(|l| l.elapsed() >= d)
    }
}

async fn clients(config: &GoogleCloudConfig) -> (GoogleCloudPublisher, GoogleCloudSubscriber) {
    (
        GoogleCloudPublisher::connect(config.clone()).await.unwrap(),
        GoogleCloudSubscriber::connect(config.clone())
            .await
            .unwrap(),
    )
}

async fn start(router: &Router) -> tokio::task::JoinHandle<()> {
    let r = router.clone();
    let running = tokio::spawn(async move {
        r.run()
            .await
            .unwrap_or_else(|e| panic!("router failed: {e}"));
    });
    tokio::time::timeout(LIMIT, router.running())
        .await
        .expect("the router starts");
    running
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_storm_counts_hold() {
    let Some(host) = emulator() else { return };
    let config = GoogleCloudConfig::emulator(PROJECT, &host);
    let topic = unique_topic("storm");
    let dead = format!("{topic}.dead");
    let (p, s) = clients(&config).await;
    s.initialize(&topic, &SubscribeOptions::group("storm"))
        .await
        .unwrap();
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        ..RouterConfig::default()
    });
    let dl = DeadLetter::new(p.clone(), &dead).max_deliveries(3);
    router
        .layer(CorrelationId::new())
        .layer(dl.clone())
        .layer(PoisonQueue::new(p.clone(), format!("{topic}.poison")))
        .layer(DelayedRedelivery::new(Backoff::new(Duration::from_secs(1))))
        .layer(
            Retry::new()
                .max_attempts(3)
                .backoff(Backoff::new(Duration::from_millis(100))),
        )
        .layer(Recoverer::new());
    let calls = Arc::new(Mutex::new(Calls::default()));
    let c = calls.clone();
    router
        .add_handler("storm")
        .subscribe(s.clone(), &topic)
        .group("storm")
        .concurrency(CONCURRENCY)
        .handler(move |m: Message| {
            let c = c.clone();
            async move {
                // A realistic handler takes a little while: the 2,000 messages then take
                // longer than the ack deadline to work through.
                tokio::time::sleep(HANDLER_TIME).await;
                let bad = m.payload().starts_with(b"poison");
                let mut c = c.lock().unwrap();
                c.touch();
                let e = c.per_uuid.entry(m.uuid().to_owned()).or_default();
                e.0 += 1;
                if bad {
                    return Err("always fails".into());
                }
                e.1 += 1;
                HandlerResult::Ok(())
            }
        })
        .await
        .unwrap();
    let running = start(&router).await;

    let msgs: Vec<Message> = (0..2000)
        .map(|i| {
            let kind = if i % 20 == 7 { "poison" } else { "good" };
            Message::new(format!("{kind} {i}"))
        })
        .collect();
    let (poison, good): (Vec<&Message>, Vec<&Message>) = msgs
        .iter()
        .partition(|m| m.payload().starts_with(b"poison"));
    assert_eq!(poison.len(), 100);
    let started = Instant::now();
    for chunk in msgs.chunks(500) {
        p.publish(&topic, chunk.to_vec()).await.unwrap();
    }

    // Dead-letter records, consumed as they come (the layer's retention group).
    let mut dl_stream = s
        .subscribe(&dead, SubscribeOptions::group(dead.as_str()))
        .await
        .unwrap();
    let records: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let (r, c) = (records.clone(), calls.clone());
    let watcher = tokio::spawn(async move {
        while let Some(d) = dl_stream.next().await {
            let Ok(d) = d else { continue };
            *r.lock()
                .unwrap()
                .entry(d.message().uuid().to_owned())
                .or_default() += 1;
            c.lock().unwrap().touch();
            d.ack().await.unwrap();
        }
    });

    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let done = {
            let c = calls.lock().unwrap();
            let handled = good
                .iter()
                .filter(|m| c.per_uuid.get(m.uuid()).is_some_and(|(_, ok)| *ok > 0))
                .count();
            let dead_lettered = records.lock().unwrap().len();
            assert!(
                started.elapsed() < LIMIT,
                "after {LIMIT:?}: {handled} of {} good messages handled, {dead_lettered} of {} \
                 poison messages dead-lettered",
                good.len(),
                poison.len()
            );
            handled == good.len() && dead_lettered == poison.len() && c.quiet_for(QUIET)
        };
        if done {
            break;
        }
    }
    router.close().await.unwrap();
    running.await.unwrap();
    watcher.abort();

    let c = std::mem::take(&mut *calls.lock().unwrap());
    let records = std::mem::take(&mut *records.lock().unwrap());
    let duplicates = good.iter().filter(|m| c.per_uuid[m.uuid()].1 > 1).count();
    let poison_calls: Vec<u32> = poison.iter().map(|m| c.per_uuid[m.uuid()].0).collect();
    eprintln!(
        "poison storm: {} good messages handled in {:?}, {duplicates} handled twice or more; \
         {} dead-letter records; handler calls per poison message {}..={}",
        good.len(),
        started.elapsed() - QUIET,
        records.values().sum::<u32>(),
        poison_calls.iter().min().unwrap(),
        poison_calls.iter().max().unwrap()
    );
    assert!(
        duplicates <= CONCURRENCY,
        "{duplicates} good messages were handled again after a successful handling"
    );
    for m in &poison {
        assert_eq!(
            records.get(m.uuid()).copied(),
            Some(1),
            "dead-letter records for poison message {}",
            m.uuid()
        );
    }
    assert_eq!(
        records.len(),
        poison.len(),
        "only poison messages are dead-lettered"
    );
    // 3 deliveries of 3 in-process attempts each, plus at most one more delivery per
    // message in flight.
    let extra: u32 = poison_calls.iter().map(|n| n.saturating_sub(9)).sum();
    assert!(
        extra <= 3 * CONCURRENCY as u32,
        "{extra} handler calls beyond 9 per poison message"
    );
    assert_eq!(dl.dead_lettered(), poison.len() as u64);
    p.close().await.unwrap();
    s.close().await.unwrap();
}

/// One handler call takes 25 s, 2.5 times the subscription's ack deadline (10 s), with
/// `concurrency(1)`, so the other messages wait in the adapter meanwhile: neither the slow
/// message nor the waiting ones are redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_is_not_redelivered_while_it_runs() {
    let Some(host) = emulator() else { return };
    let config = GoogleCloudConfig::emulator(PROJECT, &host);
    assert_eq!(config.ack_deadline, Duration::from_secs(10));
    let slow_for = config.ack_deadline * 5 / 2;
    let topic = unique_topic("slow");
    let (p, s) = clients(&config).await;
    s.initialize(&topic, &SubscribeOptions::group("slow"))
        .await
        .unwrap();
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        ..RouterConfig::default()
    });
    let calls = Arc::new(Mutex::new(Calls::default()));
    let c = calls.clone();
    router
        .add_handler("slow")
        .subscribe(s.clone(), &topic)
        .group("slow")
        .concurrency(1)
        .handler(move |m: Message| {
            let c = c.clone();
            async move {
                {
                    let mut c = c.lock().unwrap();
                    c.touch();
                    c.per_uuid.entry(m.uuid().to_owned()).or_default().0 += 1;
                }
                if m.payload().as_ref() == b"slow" {
                    tokio::time::sleep(slow_for).await;
                }
                let mut c = c.lock().unwrap();
                c.touch();
                c.per_uuid.entry(m.uuid().to_owned()).or_default().1 += 1;
                HandlerResult::Ok(())
            }
        })
        .await
        .unwrap();
    let running = start(&router).await;
    let mut msgs = vec![Message::new("slow")];
    msgs.extend((0..50).map(|i| Message::new(format!("waiting {i}"))));
    let started = Instant::now();
    p.publish(&topic, msgs.clone()).await.unwrap();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let c = calls.lock().unwrap();
        let finished = msgs
            .iter()
            .filter(|m| c.per_uuid.get(m.uuid()).is_some_and(|(_, ok)| *ok > 0))
            .count();
        assert!(
            started.elapsed() < LIMIT,
            "{finished} of {} handled within {LIMIT:?}",
            msgs.len()
        );
        if finished == msgs.len() && c.quiet_for(QUIET) {
            break;
        }
    }
    router.close().await.unwrap();
    running.await.unwrap();
    let c = std::mem::take(&mut *calls.lock().unwrap());
    for m in &msgs {
        assert_eq!(
            c.per_uuid[m.uuid()],
            (1, 1),
            "{:?}: handler calls (started, finished)",
            m.payload()
        );
    }
    eprintln!(
        "slow handler: {} messages each handled once; the slow one took {slow_for:?}",
        msgs.len()
    );
    p.close().await.unwrap();
    s.close().await.unwrap();
}
