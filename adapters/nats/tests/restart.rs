//! Across a restart of the shared NATS server (`brokers/brokers.sh restart nats`,
//! what `make brokers-restart NAME=nats` runs): the conformance `reconnect` test with a
//! real restart, for JetStream and core NATS, and a JetStream group resuming with the
//! messages stored before the restart.
//!
//! Restarting breaks every other test using the server, so these are `#[ignore]`d;
//! `make test` runs ignored tests after the others, one at a time. Skipped when
//! `TIDEMILL_NATS_URL` is unset or names an external server (which is not restarted).

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{delete_streams, jetstream_features, ok, restart_nats, test_config, NatsBackend};
use futures::StreamExt;
use tidemill_core::{Message, Publisher, SubscribeOptions, Subscriber};
use tidemill_nats::{NatsMode, NatsPublisher, NatsSubscriber};
use tidemill_testkit::{unique_topic, Backend, Features};

const LIMIT: Duration = Duration::from_secs(60);

fn have_server(test: &str) -> bool {
    if std::env::var_os("TIDEMILL_NATS_URL").is_none() {
        eprintln!("SKIP {test}: TIDEMILL_NATS_URL is not set (no broker to test against)");
        return false;
    }
    true
}

#[test]
#[ignore = "restarts the shared nats broker; run by make test one at a time"]
fn jetstream_reconnects_across_a_server_restart() {
    if !have_server("jetstream_reconnects_across_a_server_restart") {
        return;
    }
    tidemill_testkit::run(
        "reconnect",
        || async { NatsBackend::restarting(jetstream_features(), |_| {}) },
        |b: Arc<dyn Backend>| Box::pin(tidemill_testkit::suite::reconnect(b)),
    );
}

#[test]
#[ignore = "restarts the shared nats broker; run by make test one at a time"]
fn core_nats_reconnects_across_a_server_restart() {
    if !have_server("core_nats_reconnects_across_a_server_restart") {
        return;
    }
    let features = Features {
        consumer_groups: true,
        reconnect: true,
        ..Features::default()
    };
    tidemill_testkit::run(
        "reconnect",
        || async { NatsBackend::restarting(features.clone(), |c| c.mode = NatsMode::Core) },
        |b: Arc<dyn Backend>| Box::pin(tidemill_testkit::suite::reconnect(b)),
    );
}

/// Messages stored before the restart and not yet consumed, and the group's position,
/// survive it; the same publisher and the same stream carry on.
#[tokio::test]
#[ignore = "restarts the shared nats broker; run by make test one at a time"]
async fn a_group_resumes_with_stored_messages_after_a_restart() {
    if !have_server("a_group_resumes_with_stored_messages_after_a_restart") {
        return;
    }
    let url = common::nats_url();
    let config = test_config(&url);
    let topic = unique_topic("restart_group");
    let p = ok(NatsPublisher::connect(config.clone()).await, "publisher");
    let s = ok(NatsSubscriber::connect(config.clone()).await, "subscriber");
    let group = SubscribeOptions::group("survivors");
    ok(s.initialize(&topic, &group).await, "initialize");
    let before: Vec<Message> = (0..20)
        .map(|i| Message::new(format!("before {i}")))
        .collect();
    ok(p.publish(&topic, before.clone()).await, "publish");
    let mut stream = ok(s.subscribe(&topic, group).await, "subscribe");
    let mut acked = HashSet::new();
    while acked.len() < 5 {
        let d = tokio::time::timeout(LIMIT, stream.next())
            .await
            .unwrap_or_else(|_| panic!("nothing before the restart"))
            .unwrap_or_else(|| panic!("stream ended"))
            .unwrap_or_else(|e| panic!("{e}"));
        acked.insert(d.message().uuid().to_owned());
        ok(d.ack().await, "ack");
    }
    // The acks were sent; make sure the server processed them before it stops.
    ok(s.flush().await, "flush the acks");
    if !restart_nats().await {
        return;
    }
    let after: Vec<Message> = (0..5).map(|i| Message::new(format!("after {i}"))).collect();
    // Retries inside `publish` ride out the restart (up to `publish_timeout`).
    ok(
        p.publish(&topic, after.clone()).await,
        "publish after the restart",
    );
    let want: HashSet<String> = before
        .iter()
        .chain(after.iter())
        .map(|m| m.uuid().to_owned())
        .filter(|u| !acked.contains(u))
        .collect();
    let mut got = HashSet::new();
    while !want.is_subset(&got) {
        match tokio::time::timeout(LIMIT, stream.next()).await {
            Err(_) => panic!(
                "{} of {} messages after the restart within {LIMIT:?}",
                got.len(),
                want.len()
            ),
            Ok(None) => panic!("the stream ended after the restart"),
            Ok(Some(Err(e))) => eprintln!("stream error (continuing): {e}"),
            Ok(Some(Ok(d))) => {
                assert!(
                    !acked.contains(d.message().uuid()),
                    "a message acked before the restart came back"
                );
                got.insert(d.message().uuid().to_owned());
                ok(d.ack().await, "ack");
            }
        }
    }
    ok(s.close().await, "close");
    ok(p.close().await, "close");
    delete_streams(&url, &[topic]).await;
}
