//! The failover scenarios against the three-node RabbitMQ cluster of brokers
//! (`brokers.sh up rabbitmq-cluster`, `TIDEMILL_AMQP_CLUSTER_URL`: every node's URL,
//! comma-separated, which the adapter takes as its node list), the group's queue a quorum
//! queue (`queue_type=quorum`: three replicas, one per node), the adapter's defaults
//! otherwise:
//!
//! - the broker node hosting the queue's leader killed with SIGKILL mid-stream and started
//!   again, twice (the first time it is also the node every client is connected to: the
//!   adapter tries the node list in order, and the queue's leader is placed on the node
//!   that declared it);
//! - one of three consumer processes killed with SIGKILL and started again;
//! - consumers scaled from 1 to 2 to 4 processes mid-stream.
//!
//! Required: 0 lost, duplicates within the bounds stated at each scenario, and every key
//! making progress again within the documented time (adapters/amqp/README.md, "Clusters").
//! Per-key order is reported, not required: the consumers of a group compete for one queue,
//! each with a prefetch of 128, so a key's messages are spread over them.
//!
//! Run one at a time (`#[ignore]`d: `make test` runs them in its serial phase): they kill
//! nodes of the cluster and start several processes on the 2-core test machine.

mod common;

use std::time::{Duration, Instant};

use common::{
    check_node_kills, cleanup, finish, kill_one_of_three, now_nanos, scale_out, url, Expect, Run,
};

/// The cluster's node list from `TIDEMILL_AMQP_CLUSTER_URL` as a facade URL: the list as it
/// is (`BrokerConfig::from_url` hands everything before the `?` to the adapter's `url`) and
/// quorum queues for the consumer groups.
/// `None` (the test skips, with a note) when the variable is unset or no node of the list
/// accepts a TCP connection (the cluster is not running).
fn cluster_url() -> Option<String> {
    let url = url("TIDEMILL_AMQP_CLUSTER_URL", |list| {
        format!("{}?queue_type=quorum", list.trim().trim_end_matches(','))
    })?;
    // `amqp://user:password@host:port/vhost,...`: each node's `host:port`.
    let list = url.split('?').next().unwrap_or_default();
    let answers = list.split(',').any(|node| {
        let rest = node.trim().split_once("://").map_or(node, |(_, r)| r);
        let authority = rest.split('/').next().unwrap_or_default();
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        std::net::ToSocketAddrs::to_socket_addrs(host_port)
            .into_iter()
            .flatten()
            .any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
    });
    if !answers {
        eprintln!(
            "SKIP: no node of TIDEMILL_AMQP_CLUSTER_URL answers (the cluster is not running)"
        );
        return None;
    }
    Some(url)
}

/// Runs `brokers/ARGS...` (`brokers.sh kill-node|start-node`, `rabbitmq-cluster.sh
/// ctl`) and returns its stdout; `None` when the cluster is external (status 3: not ours).
async fn script(args: &[&str]) -> Option<String> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../brokers");
    let out = tokio::process::Command::new("bash")
        .current_dir(&dir)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if out.status.code() == Some(3) {
        return None;
    }
    assert!(out.status.success(), "{args:?}: {}", out.status);
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The quorum queues of the cluster (name, leader's node number, consumers), as node `via`
/// lists them.
async fn queues(via: u8) -> Vec<(String, u8, u64)> {
    let via = via.to_string();
    let Some(table) = script(&[
        "rabbitmq-cluster.sh",
        "ctl",
        &via,
        "-q",
        "list_queues",
        "name",
        "leader",
        "consumers",
        "--no-table-headers",
    ])
    .await
    else {
        return Vec::new();
    };
    // `name<TAB>tidemill-c2@localhost<TAB>3` per queue.
    table
        .lines()
        .filter_map(|line| {
            let mut cols = line.split('\t');
            let name = cols.next()?.to_owned();
            let node = cols
                .next()?
                .strip_prefix("tidemill-c")?
                .split('@')
                .next()?
                .parse()
                .ok()?;
            let consumers = cols.next()?.trim().parse().unwrap_or(0);
            Some((name, node, consumers))
        })
        .collect()
}

/// Deletes the failover runs' queues nobody consumes any more (this run's, once RabbitMQ
/// saw its consumers go, and those an earlier, interrupted run left), so the cluster does
/// not collect quorum queues.
async fn delete_idle_queues() {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ours: Vec<(String, u8, u64)> = queues(2)
            .await
            .into_iter()
            .filter(|(name, _, _)| name.starts_with("failover-amqp-cluster"))
            .collect();
        for (name, _, consumers) in &ours {
            if *consumers == 0 {
                script(&[
                    "rabbitmq-cluster.sh",
                    "ctl",
                    "2",
                    "-q",
                    "delete_queue",
                    name,
                ])
                .await;
            }
        }
        if ours.iter().all(|(_, _, c)| *c == 0) || Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The prefetch of each subscription (the adapter's default): how many messages RabbitMQ
/// hands a consumer ahead of its acks.
const PREFETCH: usize = 128;

/// One of three consumer processes killed: its connection closes with it, RabbitMQ puts
/// back everything delivered to it and not acked (at most the prefetch, 128) and hands it
/// to the two survivors at once; nothing waits for a timeout. Duplicates: only messages the
/// killed process handled (recorded) and whose ack had not reached the broker: one handler
/// at a time plus the acks still in its socket, bounded by the prefetch. Scaling out kills
/// nothing: a new consumer gets only messages nobody holds, so no duplicates.
fn consumer_expect() -> Expect {
    Expect {
        order_per_key: false,
        recover: Duration::from_secs(30),
        max_duplicates: PREFETCH,
        key_recovery: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn amqp_cluster_kill_one_of_three() {
    let Some(url) = cluster_url() else {
        return;
    };
    kill_one_of_three("amqp-cluster", url, consumer_expect()).await;
    delete_idle_queues().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn amqp_cluster_scale_out() {
    let Some(url) = cluster_url() else {
        return;
    };
    scale_out(
        "amqp-cluster",
        url,
        Expect {
            max_duplicates: 0,
            ..consumer_expect()
        },
    )
    .await;
    delete_idle_queues().await;
}

/// What a broker node's death costs (adapters/amqp/README.md, "Clusters"): the connections
/// on it see their sockets closed at once (a process killed on a live host; a host that
/// vanishes is noticed after two missed heartbeats, 20 s by default) and reconnect to the
/// next node of the list within the first reconnection pause (100 ms); the quorum queue's
/// two surviving replicas elect a new leader within about a second; subscriptions consume
/// again on their new connections, and what the dead connections had not acked is
/// delivered again. Every key makes progress again within [`NODE_RECOVERY`].
const NODE_RECOVERY: Duration = Duration::from_secs(30);
/// Duplicates per node kill: messages the consumers on the dead node handled and whose
/// acks died with it (at most the prefetch of each of the three consumers), plus a batch the
/// producer sent again because its confirms died with the node (at most the batch, 100).
const NODE_MAX_DUPLICATES: usize = 3 * PREFETCH + BATCH as usize;
/// The producer's batch size.
const BATCH: u64 = 100;

/// Three consumers and a producer; the node hosting the queue's leader killed with SIGKILL
/// a tenth of the way in, started again once every key made progress again; then the node
/// of the new leader the same way; 20,000 messages over 60 keys meanwhile (about 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn amqp_cluster_kill_leader_node() {
    const COUNT: u64 = 20_000;
    let Some(url) = cluster_url() else {
        return;
    };
    let name = "amqp-cluster-nodes";
    let run = Run::new("amqp-cluster-nodes", url);
    let queue = format!("{}.{}", run.topic, run.group);
    let mut consumers = Vec::new();
    for n in 0..3 {
        consumers.push(run.consumer(n).await);
    }
    let producer = run.producer(COUNT, 60, BATCH, common::PAUSE_MS);
    let mut kills = Vec::new();
    let mut after = 2_000;
    for round in 1..=2 {
        let before = run
            .wait(3, Duration::from_secs(120), |r| r.handled >= after)
            .await;
        assert!(
            before.handled >= after,
            "{name}: no progress before kill {round}: {before}"
        );
        let leader = queues(2)
            .await
            .into_iter()
            .find(|(q, _, _)| *q == queue)
            .map_or(1, |(_, node, _)| node);
        let node = leader.to_string();
        let at = now_nanos();
        let killed = Instant::now();
        if script(&["brokers.sh", "kill-node", "rabbitmq-cluster", &node])
            .await
            .is_none()
        {
            eprintln!("SKIP {name}: the cluster is external, its nodes are not ours to kill");
            cleanup(&run.dir);
            return;
        }
        // Every key made progress again (the keys' next messages were handled).
        let healed = run
            .wait(3, NODE_RECOVERY + Duration::from_secs(30), |r| {
                r.handled > before.handled + 300 && r.recovery_after(at, None).is_some()
            })
            .await;
        let down_for = killed.elapsed();
        assert!(
            script(&["brokers.sh", "start-node", "rabbitmq-cluster", &node])
                .await
                .is_some(),
            "start-node {node}"
        );
        let new_leader = queues(2)
            .await
            .into_iter()
            .find(|(q, _, _)| *q == queue)
            .map(|(_, node, _)| node);
        eprintln!(
            "{name}: node {node} (the queue's leader) killed with {} handled; {} handled \
             {down_for:.1?} later; node back after {:.1?}; leader now on node {new_leader:?}",
            before.handled,
            healed.handled,
            killed.elapsed()
        );
        kills.push((node, at));
        after = run.report(3).handled + 2_000;
    }
    let reports = finish(
        name,
        &run,
        producer,
        consumers,
        3,
        COUNT,
        NODE_RECOVERY + Duration::from_secs(60),
    )
    .await;
    check_node_kills(
        &format!("{name} kill the leader's node twice"),
        COUNT,
        (&reports.0, &reports.1),
        &kills,
        NODE_RECOVERY,
        NODE_MAX_DUPLICATES,
    );
    cleanup(&run.dir);
    delete_idle_queues().await;
}
