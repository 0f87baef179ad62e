//! Helpers shared by the middleware tests (router on the in-memory broker), and the
//! composition harness ([`compose`]).
#![allow(dead_code)]

mod compose;

#[allow(unused_imports)] // request_reply.rs uses only the helpers below
pub use compose::*;

use std::time::Duration;

use futures::StreamExt;
use tidemill_core::{
    DeliveryStream, MemoryBroker, Message, Router, RouterError, SubscribeOptions, Subscriber,
};
use tokio::sync::mpsc;

/// Generous bound for anything that must happen.
pub const WAIT: Duration = Duration::from_secs(10);

/// Spawns `router.run()` and waits until it runs.
pub async fn start(router: &Router) -> tokio::task::JoinHandle<Result<(), RouterError>> {
    let r = router.clone();
    let handle = tokio::spawn(async move { r.run().await });
    tokio::time::timeout(WAIT, router.running())
        .await
        .expect("router runs");
    handle
}

pub async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("within 10s")
        .expect("channel open")
}

/// Waits (bounded) until `check` holds.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn text(m: &Message) -> String {
    String::from_utf8_lossy(m.payload()).into_owned()
}

/// A subscription to `topic` made now, so it sees everything published afterwards.
pub async fn watch(broker: &MemoryBroker, topic: &str) -> DeliveryStream {
    broker
        .subscriber()
        .subscribe(topic, SubscribeOptions::new())
        .await
        .expect("subscribe")
}

/// The next message on `stream` (acked), within the bound.
pub async fn next(stream: &mut DeliveryStream) -> Message {
    let d = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a message within 10s")
        .expect("stream open")
        .expect("no stream error");
    let m = d.message().clone();
    d.ack().await.expect("ack");
    m
}

/// Asserts nothing arrives on `stream` for a short while.
pub async fn quiet(stream: &mut DeliveryStream) {
    if let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(300), stream.next()).await {
        panic!(
            "unexpected message: {:?}",
            item.map(|d| d.message().clone())
        );
    }
}

/// The delivery attempt the router reported for `m`.
pub fn attempt(m: &Message) -> u32 {
    m.context().and_then(|c| c.attempt()).unwrap_or(0)
}
