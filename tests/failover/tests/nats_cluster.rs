//! The failover scenarios against the three-node NATS JetStream cluster of brokers
//! (`brokers.sh up nats-cluster`, `TIDEMILL_NATS_CLUSTER_URL`), every stream with three
//! replicas (`jetstream.replicas=3`), the adapter's defaults otherwise:
//!
//! - each broker node in turn killed with SIGKILL mid-stream and started again (the
//!   consumers' and the producer's connections are on the three nodes, and so are the
//!   stream's and the group consumer's Raft leaders: every kill hits some of them);
//! - one of three consumer processes killed with SIGKILL and started again;
//! - consumers scaled from 1 to 2 to 4 processes mid-stream.
//!
//! Required: 0 lost, duplicates within the bounds stated at each scenario, and every key
//! making progress again within the documented time. Per-key order is reported, not
//! required: a JetStream group spreads each key's messages over its members
//! (adapters/nats/README.md, "Order per key").
//!
//! Run one at a time (`#[ignore]`d: `make test` runs them in its serial phase): they kill
//! nodes of the cluster and start several processes on the 2-core test machine.

mod common;

use std::time::{Duration, Instant};

use common::{
    check_node_kills, cleanup, finish, kill_one_of_three, now_nanos, scale_out, url, Expect, Run,
};

/// The cluster's seed list from `TIDEMILL_NATS_CLUSTER_URL` (every node's URL) as a facade
/// URL, with three replicas for the streams the adapter creates and an age limit so test
/// streams do not pile up on the cluster.
fn cluster_url() -> Option<String> {
    url("TIDEMILL_NATS_CLUSTER_URL", |list| {
        format!("{list}?jetstream.replicas=3&jetstream.max_age=1h")
    })
}

/// `ack_wait`, the adapter's default: how long a message delivered to a connection or
/// process that died stays unavailable before the server redelivers it.
const ACK_WAIT: Duration = Duration::from_secs(30);

/// One of three consumer processes killed: the survivors keep pulling (a JetStream group
/// has no rebalance), so the keys of the killed consumer make progress again as soon as the
/// survivors' next pull brings their next messages; the messages the dead process had
/// pulled and not acked come back after `ack_wait` (30 s). Duplicates: only messages the
/// killed process handled (recorded) and whose ack the server had not processed when it
/// died: one handler at a time plus the acks still in its socket, a handful per kill (the
/// bound, 100, leaves room); scaling out kills nothing and causes none.
fn consumer_expect() -> Expect {
    Expect {
        order_per_key: false,
        recover: ACK_WAIT + Duration::from_secs(30),
        max_duplicates: 100,
        key_recovery: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn nats_cluster_kill_one_of_three() {
    let Some(url) = cluster_url() else {
        return;
    };
    kill_one_of_three("nats-cluster", url, consumer_expect()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn nats_cluster_scale_out() {
    let Some(url) = cluster_url() else {
        return;
    };
    scale_out(
        "nats-cluster",
        url,
        Expect {
            max_duplicates: 0,
            ..consumer_expect()
        },
    )
    .await;
}

/// Runs `brokers/brokers.sh ARGS...` (kill-node, start-node); `false` when the
/// cluster is external (status 3: not ours to kill).
async fn brokers(args: &[&str]) -> bool {
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../brokers/brokers.sh");
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let out = tokio::process::Command::new("bash")
        .arg(script)
        .args(&args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run brokers.sh: {e}"));
    eprint!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.code() == Some(3) {
        return false;
    }
    assert!(out.status.success(), "brokers.sh {args:?}: {}", out.status);
    true
}

/// Starts the killed node again when dropped without [`Killed::start_again`] (the test
/// failed while it was down), so the next test finds the cluster whole.
struct Killed(Option<&'static str>);

impl Killed {
    async fn start_again(mut self) {
        if let Some(node) = self.0.take() {
            assert!(
                brokers(&["start-node", "nats-cluster", node]).await,
                "start-node {node}"
            );
        }
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        if let Some(node) = self.0.take() {
            let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../brokers/brokers.sh");
            let status = std::process::Command::new("bash")
                .arg(script)
                .args(["start-node", "nats-cluster", node])
                .status();
            eprintln!("node {node} started again after a failure: {status:?}");
        }
    }
}

/// What a broker node's death costs (adapters/nats/README.md, "Clusters"): the connections
/// on it reconnect to a surviving node at once; the Raft groups that had their leader on it
/// (the stream, the group's consumer, the JetStream meta group) elect a new one among the
/// two survivors after the server's election timeout (a few seconds); until then the
/// consumer's pulls meet "no responders" and are repeated every second, and PubAcks of
/// messages in flight never come (sent again after `request_timeout`, 10 s); a pull
/// request left waiting on the dead node is replaced after two missed heartbeats
/// (`idle_heartbeat` 5 s: 11 s); messages in transit through it are redelivered after
/// `ack_wait`. Every key makes progress again within [`NODE_RECOVERY`] (an election, a
/// `request_timeout`, a heartbeat round, and room for the loaded machine); no message
/// waits longer than [`NODE_MAX_WAIT`] from its confirmation to its first handling.
const NODE_RECOVERY: Duration = Duration::from_secs(45);
/// `ack_wait` plus an election, a missed-heartbeat round and room for the loaded machine.
const NODE_MAX_WAIT: Duration = Duration::from_secs(90);
/// Duplicates per node kill: messages handled whose acks died with the node (acks are sent
/// without waiting for a confirmation) or were not yet replicated to the consumer's new
/// leader; at most what the group had delivered and not acked, `max_ack_pending` (1,000).
const NODE_MAX_DUPLICATES: usize = 1_000;

/// Three consumers and a producer; node 1, then 2, then 3 killed with SIGKILL (each once
/// every key made progress again after the previous one, and the node before it is back),
/// each started again; 30,000 messages over 60 keys meanwhile (about 80 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn nats_cluster_kill_each_node() {
    const COUNT: u64 = 30_000;
    let Some(url) = cluster_url() else {
        return;
    };
    let name = "nats-cluster-nodes";
    let run = Run::new(name, url);
    let mut consumers = Vec::new();
    for n in 0..3 {
        consumers.push(run.consumer(n).await);
    }
    let producer = run.producer(COUNT, 60, 50, 100);
    let mut kills = Vec::new();
    let mut after = 2_000;
    for node in ["1", "2", "3"] {
        let before = run
            .wait(3, Duration::from_secs(120), |r| r.handled >= after)
            .await;
        assert!(
            before.handled >= after,
            "{name}: no progress before killing node {node}: {before}"
        );
        let at = now_nanos();
        let killed = Instant::now();
        if !brokers(&["kill-node", "nats-cluster", node]).await {
            eprintln!("SKIP {name}: the cluster is external, its nodes are not ours to kill");
            cleanup(&run.dir);
            return;
        }
        let down = Killed(Some(node));
        // Every key made progress again (the keys' next messages were handled).
        let healed = run
            .wait(3, NODE_RECOVERY + Duration::from_secs(30), |r| {
                r.handled > before.handled + 300 && r.recovery_after(at, None).is_some()
            })
            .await;
        let down_for = killed.elapsed();
        down.start_again().await;
        eprintln!(
            "{name}: node {node} killed with {} handled; {} handled {down_for:.1?} later, \
             node back after {:.1?}",
            before.handled,
            healed.handled,
            killed.elapsed()
        );
        kills.push((node, at));
        // The next kill once the cluster is whole again and the stream went on.
        after = run.report(3).handled + 2_000;
    }
    let reports = finish(
        name,
        &run,
        producer,
        consumers,
        3,
        COUNT,
        NODE_MAX_WAIT + Duration::from_secs(60),
    )
    .await;
    check_node_kills(
        &format!("{name} kill each node"),
        COUNT,
        (&reports.0, &reports.1),
        &kills,
        NODE_RECOVERY,
        NODE_MAX_DUPLICATES,
    );
    let report = reports.0;
    assert!(
        report.max_wait <= NODE_MAX_WAIT,
        "{name}: a message waited {:?} from its confirmation to its handling (documented: \
         at most {NODE_MAX_WAIT:?}): {report}",
        report.max_wait
    );
    cleanup(&run.dir);
}
