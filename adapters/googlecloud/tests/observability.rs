//! Observability on the Pub/Sub emulator (`PUBSUB_EMULATOR_HOST`): one trace across two
//! hops (trace context in message attributes), and the router's health following the
//! service: through a fault proxy that cuts and refuses connections, and (`#[ignore]`d: it
//! stops the shared emulator, which forgets everything) with the emulator stopped and
//! started again.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tidemill_core::router::RouterHealth;
use tidemill_core::{
    ConnectionState, HandlerResult, Message, Publisher, Router, RouterConfig, Subscriber,
};
use tidemill_googlecloud::{GoogleCloudConfig, GoogleCloudPublisher, GoogleCloudSubscriber};
use tidemill_testkit::fault_proxy::FaultProxy;
use tokio::sync::mpsc;

/// The longest any single wait of these tests takes.
const WAIT: Duration = Duration::from_secs(90);

fn host(test: &str) -> Option<String> {
    match std::env::var("PUBSUB_EMULATOR_HOST") {
        Ok(host) if !host.is_empty() => Some(host),
        _ => {
            eprintln!("SKIP {test}: PUBSUB_EMULATOR_HOST is not set");
            None
        }
    }
}

#[tokio::test]
async fn one_trace_across_two_hops() {
    let Some(host) = host("one_trace_across_two_hops") else {
        return;
    };
    let config = GoogleCloudConfig::emulator("tidemill-test", host);
    let p = GoogleCloudPublisher::connect(config.clone()).await.unwrap();
    let s = GoogleCloudSubscriber::connect(config).await.unwrap();
    tidemill_otel::testing::one_trace_across_two_hops(Arc::new(p), Arc::new(s), "gcp_pubsub").await;
}

/// Every connection through a fault proxy: cut and refused, the background check finds
/// no answer and the router is not ready; let through again, it is ready and messages
/// flow.
#[tokio::test]
async fn health_follows_the_connection() {
    let Some(host) = host("health_follows_the_connection") else {
        return;
    };
    let proxy = FaultProxy::start(host.as_str()).await.unwrap();
    let mut config = GoogleCloudConfig::emulator("tidemill-test", proxy.addr().to_string());
    config.health_check_interval = Duration::from_millis(200);
    let p = GoogleCloudPublisher::connect(config.clone()).await.unwrap();
    let s = GoogleCloudSubscriber::connect(config).await.unwrap();
    tidemill_otel::testing::health_follows_the_connection(&proxy, Arc::new(p), Arc::new(s)).await;
}

fn brokers_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../brokers/brokers.sh")
}

/// Runs `brokers.sh <command> [pubsub]` and returns its standard output; panics unless it
/// succeeded.
fn brokers(command: &str, name: Option<&str>) -> String {
    let out = Command::new("bash")
        .arg(brokers_script())
        .arg(command)
        .args(name)
        .output()
        .unwrap_or_else(|e| panic!("cannot run brokers.sh {command}: {e}"));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "brokers.sh {command} failed: {}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stops the emulator; starts it again when dropped unless `start` did (so a failing test
/// does not leave it down).
struct StoppedEmulator {
    up: bool,
}

impl StoppedEmulator {
    fn stop() -> Self {
        brokers("down", Some("pubsub"));
        StoppedEmulator { up: false }
    }

    fn start(&mut self) {
        brokers("up", Some("pubsub"));
        self.up = true;
    }
}

impl Drop for StoppedEmulator {
    fn drop(&mut self) {
        if !self.up {
            brokers("up", Some("pubsub"));
        }
    }
}

/// Waits (bounded) until `check` holds for the router's health.
async fn until_health(router: &Router, what: &str, check: impl Fn(&RouterHealth) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let health = router.health();
        if check(&health) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not {what} within {WAIT:?}:\n{health}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A router consuming and publishing through Pub/Sub is ready; with the emulator stopped
/// it becomes not ready (still live), subscriber and publisher disconnected; with the
/// emulator back (empty: it keeps nothing) it is ready again, the adapter re-creates the
/// topics and subscriptions, and messages flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared broker: stops the pubsub emulator (which forgets every topic) until the router is not ready; run one at a time"]
async fn health_follows_the_emulator() {
    let Some(host) = host("health_follows_the_emulator") else {
        return;
    };
    if !brokers("running", None)
        .split_whitespace()
        .any(|n| n == "pubsub")
    {
        eprintln!("SKIP: the emulator at {host} is not managed by brokers");
        return;
    }
    let mut config = GoogleCloudConfig::emulator("tidemill-test", host);
    config.health_check_interval = Duration::from_millis(200);
    let publisher = Arc::new(GoogleCloudPublisher::connect(config.clone()).await.unwrap());
    let subscriber = Arc::new(GoogleCloudSubscriber::connect(config).await.unwrap());
    let id = tidemill_core::new_uuid();
    let (input, output) = (format!("health-in-{id}"), format!("health-out-{id}"));
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        ..RouterConfig::default()
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("forward")
        .subscribe(subscriber.clone(), input.clone())
        .group("health")
        .publish(publisher.clone(), output.clone())
        .handler(|m: Message| async move { Message::new(m.payload().clone()) })
        .await
        .unwrap();
    router
        .add_handler("sink")
        .subscribe(subscriber.clone(), output)
        .group("health")
        .handler(move |m: Message| {
            let _ = tx.send(m);
            async { HandlerResult::Ok(()) }
        })
        .await
        .unwrap();
    let r = router.clone();
    tokio::spawn(async move { r.run().await });
    tokio::time::timeout(WAIT, router.running())
        .await
        .expect("router running");
    publisher
        .publish_one(&input, Message::new("before"))
        .await
        .unwrap();
    let m = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the message before the stop")
        .unwrap();
    assert_eq!(m.payload().as_ref(), b"before");
    until_health(&router, "ready", RouterHealth::is_ready).await;

    let mut emulator = tokio::task::block_in_place(StoppedEmulator::stop);
    let stopped = std::time::Instant::now();
    until_health(&router, "subscriber and publisher disconnected", |h| {
        h.handlers.iter().all(|h| {
            h.subscriber == Some(ConnectionState::Disconnected)
                && h.publisher
                    .is_none_or(|p| p == ConnectionState::Disconnected)
        })
    })
    .await;
    eprintln!("disconnected {:?} after the stop", stopped.elapsed());
    let health = router.health();
    assert!(!health.is_ready(), "{health}");
    assert!(
        health.is_live(),
        "a stopped emulator leaves the router live: {health}"
    );
    assert_eq!(publisher.connection_state(), ConnectionState::Disconnected);

    tokio::task::block_in_place(|| emulator.start());
    let started = std::time::Instant::now();
    until_health(
        &router,
        "ready with the emulator back",
        RouterHealth::is_ready,
    )
    .await;
    eprintln!("ready again {:?} after the start", started.elapsed());
    // The emulator forgot everything: until the subscriptions are re-created, what is
    // published is dropped, so publish until one message makes it through both hops.
    let deadline = tokio::time::Instant::now() + WAIT;
    'flowing: loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no message went through both hops after the restart within {WAIT:?}"
        );
        if let Err(e) = publisher.publish_one(&input, Message::new("after")).await {
            eprintln!("publishing after the restart failed (retrying): {e}");
        }
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            if m.payload().as_ref() == b"after" {
                break 'flowing;
            }
        }
    }
    eprintln!("flowing again {:?} after the start", started.elapsed());
    router.close().await.unwrap();
    subscriber.close().await.unwrap();
    publisher.close().await.unwrap();
    assert_eq!(subscriber.connection_state(), ConnectionState::Closed);
    assert_eq!(publisher.connection_state(), ConnectionState::Closed);
}
