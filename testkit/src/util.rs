//! Helpers shared by the conformance tests.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tidemill_core::{Delivery, DeliveryStream, Message, Publisher};
use tokio::time::Instant;

/// A topic name unique to this run: `tm-<test>-<12 hex digits>`. It starts with a letter and
/// uses only `[a-z0-9-]`, which every supported broker accepts.
pub fn unique_topic(test: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("tm-{}-{}", test.replace('_', "-"), &id[..12])
}

/// Messages for a test: numbered (`index` metadata), with several metadata entries
/// (including non-ASCII text) and a payload of arbitrary bytes.
pub(crate) fn numbered(test: &str, n: usize, key: Option<&str>) -> Vec<Message> {
    (0..n)
        .map(|i| {
            let mut payload = format!("{test} #{i} ").into_bytes();
            payload.extend([0u8, 0xff, 0xfe, 0x80, b'\n', (i % 256) as u8]);
            let mut m = Message::new(payload)
                .with_metadata("index", i)
                .with_metadata("test", test)
                .with_metadata("greeting", "héllo wörld ✓");
            if let Some(key) = key {
                m = m.with_key(key);
            }
            m
        })
        .collect()
}

/// The `index` metadata written by [`numbered`].
pub(crate) fn index_of(m: &Message) -> usize {
    m.metadata()
        .get_as::<usize>("index")
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("{m:?} has no `index` metadata"))
}

/// The next delivery within `timeout`; panics naming `what` when none arrives.
pub(crate) async fn next(stream: &mut DeliveryStream, timeout: Duration, what: &str) -> Delivery {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => panic!("no delivery within {timeout:?} while waiting for {what}"),
            Ok(None) => panic!("the stream ended while waiting for {what}"),
            Ok(Some(Err(e))) => eprintln!("stream reported an error (continuing): {e}"),
            Ok(Some(Ok(d))) => return d,
        }
    }
}

/// Whether anything arrives within `quiet`; a negative check that cannot flake.
pub(crate) async fn arrives_within(
    stream: &mut DeliveryStream,
    quiet: Duration,
) -> Option<Delivery> {
    match tokio::time::timeout(quiet, stream.next()).await {
        Ok(Some(Ok(d))) => Some(d),
        _ => None,
    }
}

/// Whether the stream ends within `timeout` (deliveries arriving meanwhile are nacked).
pub(crate) async fn ends_within(stream: &mut DeliveryStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => return false,
            Ok(None) => return true,
            Ok(Some(Ok(d))) => {
                let _ = d.nack().await;
            }
            Ok(Some(Err(_))) => {}
        }
    }
}

/// Everything a subscription received, by uuid.
#[derive(Debug, Default, Clone)]
pub struct Received {
    /// Every received message, in arrival order, duplicates included.
    pub messages: Vec<Message>,
}

impl Received {
    /// How often each uuid arrived.
    pub fn counts(&self) -> HashMap<&str, usize> {
        let mut counts = HashMap::new();
        for m in &self.messages {
            *counts.entry(m.uuid()).or_default() += 1;
        }
        counts
    }

    /// Distinct uuids received.
    pub fn unique(&self) -> usize {
        self.counts().len()
    }

    /// Asserts every expected message arrived, with identical payload, metadata and key,
    /// and nothing else did. Duplicates (at-least-once redelivery) are allowed.
    pub fn assert_all_of(&self, expected: &[Message], what: &str) {
        let by_uuid: HashMap<&str, &Message> = expected.iter().map(|m| (m.uuid(), m)).collect();
        for got in &self.messages {
            let Some(want) = by_uuid.get(got.uuid()) else {
                panic!("{what}: unexpected message {got:?}");
            };
            assert_same(want, got, what);
        }
        let counts = self.counts();
        let missing: Vec<&str> = expected
            .iter()
            .map(|m| m.uuid())
            .filter(|u| !counts.contains_key(u))
            .collect();
        assert!(
            missing.is_empty(),
            "{what}: {} of {} messages missing: {missing:?}",
            missing.len(),
            expected.len()
        );
    }

    /// Like [`assert_all_of`](Self::assert_all_of), and additionally each exactly once.
    pub fn assert_exactly(&self, expected: &[Message], what: &str) {
        self.assert_all_of(expected, what);
        let dups: Vec<(&str, usize)> = self.counts().into_iter().filter(|(_, n)| *n > 1).collect();
        assert!(dups.is_empty(), "{what}: duplicates {dups:?}");
        assert_eq!(self.messages.len(), expected.len(), "{what}: message count");
    }
}

/// Asserts `got` is `want` as sent: uuid, payload, metadata and key.
pub(crate) fn assert_same(want: &Message, got: &Message, what: &str) {
    assert_eq!(got.uuid(), want.uuid(), "{what}: uuid");
    assert_eq!(
        got.payload(),
        want.payload(),
        "{what}: payload of {}",
        want.uuid()
    );
    assert_eq!(
        got.metadata(),
        want.metadata(),
        "{what}: metadata of {}",
        want.uuid()
    );
    assert_eq!(got.key(), want.key(), "{what}: key of {}", want.uuid());
}

/// Receives (acking each delivery) until every uuid in `expected` arrived at least once.
pub(crate) async fn receive_all(
    stream: &mut DeliveryStream,
    expected: &[Message],
    timeout: Duration,
    what: &str,
) -> Received {
    let want: HashSet<&str> = expected.iter().map(|m| m.uuid()).collect();
    let mut seen = HashSet::new();
    let mut received = Received::default();
    let deadline = Instant::now() + timeout;
    while seen.len() < want.len() {
        let d = match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => break,
            Ok(None) => panic!(
                "{what}: the stream ended with {} of {} received",
                seen.len(),
                want.len()
            ),
            Ok(Some(Err(e))) => {
                eprintln!("{what}: stream reported an error (continuing): {e}");
                continue;
            }
            Ok(Some(Ok(d))) => d,
        };
        let m = d.message().clone();
        if want.contains(m.uuid()) {
            seen.insert(m.uuid().to_owned());
        }
        received.messages.push(m);
        d.ack()
            .await
            .unwrap_or_else(|e| panic!("{what}: ack failed: {e}"));
    }
    if seen.len() < want.len() {
        let missing: Vec<&&str> = want.iter().filter(|u| !seen.contains(**u)).collect();
        panic!(
            "{what}: only {} of {} messages within {timeout:?}; missing {missing:?}",
            seen.len(),
            want.len()
        );
    }
    received
}

/// Publishes `messages`, retrying the whole batch on error until `timeout` (used while a
/// broker is being disrupted; at-least-once makes the retries safe).
pub(crate) async fn publish_retrying(
    publisher: &Arc<dyn Publisher>,
    topic: &str,
    messages: Vec<Message>,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        match publisher.publish(topic, messages.clone()).await {
            Ok(()) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("publish failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("publish to {topic} kept failing for {timeout:?}: {e}"),
        }
    }
}

/// Message count for bulk tests (`TIDEMILL_CONFORMANCE_MESSAGES`, default 100).
pub(crate) fn bulk() -> usize {
    std::env::var("TIDEMILL_CONFORMANCE_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(100)
}

pub(crate) fn skip(test: &str, why: &str) {
    eprintln!("SKIP {test}: {why}");
}

/// Restarts test broker `name` of this repository's `brokers/brokers.sh` (e.g. `redis`,
/// `postgres`, `aws`) and waits until it is ready again, echoing the script's output.
/// Returns `false` when the broker is external (an address variable points elsewhere: the
/// script refuses, status 3), so the caller skips its restart test; panics when the script
/// fails.
pub async fn restart_broker(name: &str) -> bool {
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../brokers/brokers.sh");
    let broker = name.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash")
            .arg(script)
            .arg("restart")
            .arg(broker)
            .output()
    })
    .await
    .unwrap_or_else(|e| panic!("restart task failed: {e}"))
    .unwrap_or_else(|e| panic!("cannot run brokers.sh: {e}"));
    eprint!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.code() == Some(3) {
        eprintln!("SKIP restart: the {name} broker is external, not restarted");
        return false;
    }
    assert!(
        out.status.success(),
        "brokers.sh restart {name} failed: {}",
        out.status
    );
    true
}
