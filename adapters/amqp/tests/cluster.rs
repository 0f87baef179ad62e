//! Against the three-node RabbitMQ cluster (`brokers/brokers.sh up rabbitmq-cluster`;
//! `TIDEMILL_AMQP_CLUSTER_URL` lists every node's URL, comma-separated): a node list with a
//! node that does not answer still connects; connections on a node that is killed (SIGKILL)
//! move to a surviving node, and a subscription to a quorum queue goes on consuming.
//!
//! Tests that kill a node are `#[ignore]`d (run them one at a time, with nothing else using
//! the cluster); every test skips with a note when the variable is unset.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tidemill_amqp::{AmqpConfig, AmqpPublisher, AmqpSubscriber, QueueType};
use tidemill_core::{DeliveryStream, Message, Publisher, SubscribeOptions, Subscriber};

const CLUSTER_ENV: &str = "TIDEMILL_AMQP_CLUSTER_URL";

/// Generous: a node's restart alone takes about 6 s on the 2-core test machine.
const WAIT: Duration = Duration::from_secs(120);

/// The cluster's node list, or `None` (after printing SKIP for `test`) when the variable is
/// unset or no node of the list accepts a TCP connection (the cluster is not running).
fn cluster_url(test: &str) -> Option<String> {
    let url = match std::env::var(CLUSTER_ENV) {
        Ok(url) if !url.is_empty() => url,
        _ => {
            eprintln!(
                "SKIP {test}: {CLUSTER_ENV} is not set (no RabbitMQ cluster to test against)"
            );
            return None;
        }
    };
    let answers = url.split(',').any(|node| {
        let Ok(uri) = node.trim().parse::<lapin::uri::AMQPUri>() else {
            return false;
        };
        let addr = (uri.authority.host.as_str(), uri.authority.port);
        std::net::ToSocketAddrs::to_socket_addrs(&addr)
            .into_iter()
            .flatten()
            .any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
    });
    if !answers {
        eprintln!("SKIP {test}: no node of {CLUSTER_ENV} answers (the cluster is not running)");
        return None;
    }
    Some(url)
}

/// Quorum group queues that expire after ten unused minutes, and a connection name to find
/// this test's connections with `rabbitmqctl list_connections`.
fn config(url: &str, name: &str) -> AmqpConfig {
    let mut config = AmqpConfig {
        queue_type: QueueType::Quorum,
        connection_name: Some(name.to_owned()),
        ..AmqpConfig::new(url)
    };
    config
        .queue_arguments
        .insert("x-expires".to_owned(), serde_json::json!(600_000));
    config
}

fn numbered(prefix: &str, n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(format!("{prefix}-{i}")).with_metadata("index", i))
        .collect()
}

/// Receives (acking) until every message of `want` arrived; duplicates are allowed (at
/// least once), anything else is not. Returns how long the first one took.
async fn receive_all(stream: &mut DeliveryStream, want: &[Message], what: &str) -> Duration {
    let started = Instant::now();
    let mut first = None;
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
                if !expected.contains(uuid.as_str()) {
                    panic!("{what}: unexpected {:?}", d.message());
                }
                first.get_or_insert_with(|| started.elapsed());
                seen.insert(uuid);
                if let Err(e) = d.ack().await {
                    eprintln!("{what}: ack failed (redelivered later): {e}");
                }
            }
        }
    }
    first.unwrap_or_default()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `brokers.sh CMD rabbitmq-cluster I`; `false` when the cluster is not ours (exit 3).
fn node(cmd: &str, i: u8) -> bool {
    let status = Command::new("bash")
        .args([
            "brokers/brokers.sh",
            cmd,
            "rabbitmq-cluster",
            &i.to_string(),
        ])
        .current_dir(root())
        .status()
        .unwrap_or_else(|e| panic!("running brokers.sh {cmd} rabbitmq-cluster {i}: {e}"));
    match status.code() {
        Some(0) => true,
        Some(3) => false,
        _ => panic!("brokers.sh {cmd} rabbitmq-cluster {i} failed: {status}"),
    }
}

/// The AMQP ports (5681..5683: which node) of the connections named `name`, as node `via`
/// of the cluster lists them.
fn connection_ports(name: &str, via: u8) -> Vec<u64> {
    let out = Command::new("bash")
        .args(["brokers/rabbitmq-cluster.sh", "ctl", &via.to_string()])
        .args(["-q", "list_connections", "port", "client_properties"])
        .args(["--formatter", "json"])
        .current_dir(root())
        .output()
        .expect("rabbitmqctl list_connections");
    assert!(out.status.success(), "list_connections: {out:?}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    let mut ports: Vec<u64> = rows
        .iter()
        .filter(|r| r["client_properties"].to_string().contains(name))
        .filter_map(|r| r["port"].as_u64())
        .collect();
    ports.sort_unstable();
    ports
}

/// Starts node `i` again when dropped (also when the test fails), so the cluster is whole
/// for whatever runs next.
struct Restart(u8);

impl Drop for Restart {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .args(["brokers/brokers.sh", "start-node", "rabbitmq-cluster"])
            .arg(self.0.to_string())
            .current_dir(root())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_answer_is_skipped() {
    let Some(url) = cluster_url("a_node_that_does_not_answer_is_skipped") else {
        return;
    };
    // Port 1 on loopback refuses connections: the next node of the list is used.
    let list = format!("amqp://guest:guest@127.0.0.1:1/%2f,{url}");
    let config = config(&list, "tidemill-cluster-skip");
    let publisher = AmqpPublisher::connect(config.clone()).await.unwrap();
    let subscriber = AmqpSubscriber::connect(config).await.unwrap();
    let topic = tidemill_testkit::unique_topic("cluster-skip");
    let mut stream = subscriber
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    let messages = numbered("m", 20);
    publisher.publish(&topic, messages.clone()).await.unwrap();
    receive_all(&mut stream, &messages, "after skipping a node").await;
    subscriber.close().await.unwrap();
    publisher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills and restarts node 1 of rabbitmq-cluster: run one at a time"]
async fn connections_on_a_killed_node_move_to_a_survivor() {
    let Some(url) = cluster_url("connections_on_a_killed_node_move_to_a_survivor") else {
        return;
    };
    let name = format!("tidemill-cluster-{}", std::process::id());
    let config = config(&url, &name);
    let publisher = AmqpPublisher::connect(config.clone()).await.unwrap();
    let subscriber = AmqpSubscriber::connect(config).await.unwrap();
    let topic = tidemill_testkit::unique_topic("cluster-kill");
    let mut stream = subscriber
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .unwrap();
    // The nodes are tried in list order: both connections are on node 1 (port 5681), and
    // node 1 hosts the quorum queue's leader (declared through it).
    assert_eq!(connection_ports(&name, 2), [5681, 5681]);

    let before = numbered("before", 100);
    publisher.publish(&topic, before.clone()).await.unwrap();
    receive_all(&mut stream, &before, "before the kill").await;

    if !node("kill-node", 1) {
        eprintln!("SKIP: rabbitmq-cluster is not managed by brokers");
        return;
    }
    let restart = Restart(1);
    let killed = Instant::now();
    // Publish one message at a time: every publish that returns Ok must be delivered.
    let mut during = Vec::new();
    let mut failed = 0usize;
    let mut first_confirm = None;
    for i in 0..100 {
        let m = Message::new(format!("during-{i}")).with_metadata("index", i);
        let deadline = Instant::now() + WAIT;
        loop {
            match publisher.publish_one(&topic, m.clone()).await {
                Ok(()) => break,
                Err(e) => {
                    failed += 1;
                    assert!(
                        e.is_transient(),
                        "a node's death is a transient failure: {e}"
                    );
                    assert!(Instant::now() < deadline, "publishing kept failing: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        first_confirm.get_or_insert_with(|| killed.elapsed());
        during.push(m);
    }
    receive_all(&mut stream, &during, "after the kill").await;
    let all_delivered = killed.elapsed();
    let ports = connection_ports(&name, 2);
    eprintln!(
        "node 1 killed: first publish confirmed {:.1?} after the kill ({failed} attempts \
         failed), all 100 delivered {all_delivered:.1?} after the kill; connections now on \
         ports {ports:?}",
        first_confirm.unwrap_or_default(),
    );
    assert_eq!(ports.len(), 2, "both connections are back: {ports:?}");
    assert!(
        ports.iter().all(|&p| p == 5682 || p == 5683),
        "the connections moved to a surviving node: {ports:?}"
    );

    // Node 1 back: nothing moves back, nothing is lost.
    drop(restart);
    let after = numbered("after", 50);
    publisher.publish(&topic, after.clone()).await.unwrap();
    receive_all(&mut stream, &after, "after the restart").await;
    subscriber.close().await.unwrap();
    publisher.close().await.unwrap();
}
