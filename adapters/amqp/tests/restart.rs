//! Across a real restart of the shared RabbitMQ (`brokers/brokers.sh restart rabbitmq`):
//! persistent messages in durable group queues survive, and the same publisher and the
//! same subscription stream carry on without being re-created.
//!
//! `#[ignore]`d because it restarts the broker every other test uses; `make test` runs
//! ignored tests one at a time after everything else.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use tidemill_amqp::{AmqpConfig, AmqpPublisher, AmqpSubscriber};
use tidemill_core::{DeliveryStream, Message, Publisher, SubscribeOptions, Subscriber};

/// Generous: the restart alone takes 10-15 s on the test machine.
const WAIT: Duration = Duration::from_secs(120);

fn numbered(prefix: &str, n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(format!("{prefix}-{i}")).with_metadata("index", i))
        .collect()
}

/// Receives (acking) until every message of `want` arrived; duplicates are allowed
/// (at least once), anything else is not.
async fn receive_all(stream: &mut DeliveryStream, want: &[Message], what: &str) {
    let expected: HashSet<&str> = want.iter().map(|m| m.uuid()).collect();
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < expected.len() {
        let item = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{what}: only {} of {} within {WAIT:?}",
                    seen.len(),
                    expected.len()
                )
            });
        match item {
            None => panic!("{what}: the stream ended"),
            Some(Err(e)) => eprintln!("{what}: stream error (continuing): {e}"),
            Some(Ok(d)) => {
                let uuid = d.message().uuid().to_owned();
                let original = want.iter().find(|m| m.uuid() == uuid);
                assert_eq!(
                    d.message(),
                    original.unwrap_or_else(|| panic!("{what}: unexpected {:?}", d.message()))
                );
                seen.insert(uuid);
                // A delivery handed out just before the connection died cannot be acked;
                // the broker redelivers it.
                if let Err(e) = d.ack().await {
                    eprintln!("{what}: ack failed (redelivered later): {e}");
                }
            }
        }
    }
}

fn restart_rabbitmq() -> bool {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    // The script itself, not `make brokers-restart`: make turns every failure into exit
    // status 2, hiding the script's 3 ("not a broker these scripts manage").
    let status = Command::new("bash")
        .args(["brokers/brokers.sh", "restart", "rabbitmq"])
        .current_dir(&root)
        .status()
        .unwrap_or_else(|e| panic!("running brokers.sh restart rabbitmq: {e}"));
    match status.code() {
        Some(0) => true,
        // The scripts refuse to restart a broker they do not manage (TIDEMILL_AMQP_URL
        // pointing elsewhere).
        Some(3) => false,
        _ => panic!("brokers.sh restart rabbitmq failed: {status}"),
    }
}

#[test]
#[ignore = "restarts the shared rabbitmq broker; run by make test one at a time"]
fn persistent_messages_and_subscriptions_survive_a_broker_restart() {
    let Some(url) =
        common::broker_url("persistent_messages_and_subscriptions_survive_a_broker_restart")
    else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let topic = common::topic("restart");
        let config = common::config(&url);
        let publisher = AmqpPublisher::connect(config.clone()).await.unwrap();
        // Gives up quickly while the broker is down, so the loop below keeps trying.
        let impatient = AmqpPublisher::connect(AmqpConfig {
            publish_timeout: Duration::from_secs(2),
            ..config.clone()
        })
        .await
        .unwrap();
        let subscriber = AmqpSubscriber::connect(config.clone()).await.unwrap();

        // A group nobody consumes before the restart: its messages must be on disk.
        let parked = SubscribeOptions::group("parked");
        subscriber.initialize(&topic, &parked).await.unwrap();
        // A live subscription that must resume by itself.
        let mut live = subscriber
            .subscribe(&topic, SubscribeOptions::group("live"))
            .await
            .unwrap();

        let before = numbered("before", 50);
        publisher.publish(&topic, before.clone()).await.unwrap();
        receive_all(&mut live, &before, "live, before the restart").await;

        // Restart the broker while publishing one message at a time: every publish that
        // returns Ok must be delivered later; the others must fail (not hang, not lie).
        let restart = tokio::task::spawn_blocking(restart_rabbitmq);
        let mut during = Vec::new();
        let mut failed = 0usize;
        let mut i = 0usize;
        while !restart.is_finished() {
            let m = Message::new(format!("during-{i}")).with_metadata("index", i);
            i += 1;
            match impatient.publish_one(&topic, m.clone()).await {
                Ok(()) => during.push(m),
                Err(e) => {
                    failed += 1;
                    assert!(e.is_transient(), "a restart is a transient failure: {e}");
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !restart.await.unwrap() {
            eprintln!("SKIP: the broker at TIDEMILL_AMQP_URL is not managed by brokers");
            return;
        }
        eprintln!(
            "during the restart: {} publishes confirmed, {failed} failed",
            during.len()
        );
        assert!(
            failed > 0,
            "some publishes must have failed while the broker was down"
        );

        // The same publisher: it reconnects by itself.
        let after = numbered("after", 50);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match publisher.publish(&topic, after.clone()).await {
                Ok(()) => break,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("publish after restart failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("publishing after the restart kept failing: {e}"),
            }
        }
        let after: Vec<Message> = during.iter().chain(after.iter()).cloned().collect();
        // The same stream, resumed.
        receive_all(&mut live, &after, "live, after the restart").await;
        // The parked group kept everything: from before the restart (persisted), every
        // publish confirmed during it, and after.
        let mut resumed = subscriber.subscribe(&topic, parked).await.unwrap();
        let all: Vec<Message> = before.iter().chain(after.iter()).cloned().collect();
        receive_all(&mut resumed, &all, "parked group").await;

        subscriber.close().await.unwrap();
        publisher.close().await.unwrap();
        impatient.close().await.unwrap();
    });
}
