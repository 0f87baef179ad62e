//! Consumer processes of one group are killed (SIGKILL), restarted and scaled while a
//! producer publishes; every confirmed message must be handled (0 lost), per-key order kept
//! where the broker promises it, the keys a change concerned must make progress again within
//! the broker's documented recovery time, and duplicates stay within a stated bound (each
//! scenario prints its report: duplicates, recovery, longest gap, longest wait).
//!
//! Run one at a time (`#[ignore]`d: `make test` runs them in its serial phase, after the
//! parallel tests): they start several processes and load the 2-core test machine.

mod common;

use std::time::Duration;

use common::{kill_one_of_three, scale_out, url, Expect};

/// The Kafka scenarios' expectations: a killed member's partitions move after
/// `session.timeout.ms` (the adapter's default: 10 s) plus a rebalance; a joining member
/// costs one rebalance (every member rejoins within its heartbeat interval, 1 s). See
/// adapters/kafka/README.md, "Failover and scaling".
fn kafka_expect() -> Expect {
    Expect {
        order_per_key: true,
        recover: Duration::from_secs(40),
        max_duplicates: 2_000,
        key_recovery: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn kafka_kill_one_of_three() {
    let Some(url) = url("TIDEMILL_KAFKA_BROKERS", |b| {
        format!("kafka://{b}?partitions=6")
    }) else {
        return;
    };
    kill_one_of_three("kafka", url, kafka_expect()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn kafka_scale_out() {
    // A second bootstrap address that answers nothing (port 1): the seed list is used as a
    // list, the reachable broker is found.
    let Some(url) = url("TIDEMILL_KAFKA_BROKERS", |b| {
        format!("kafka://127.0.0.1:1,{b}?partitions=6")
    }) else {
        return;
    };
    scale_out("kafka", url, kafka_expect()).await;
}

/// Single-node NATS JetStream, a consumer killed: its unacked messages come again after
/// `ack_wait` (30 s); duplicates are the message it was handling and the acks still in its
/// socket (the cluster scenario's bound, nats_cluster.rs).
fn nats_expect() -> Expect {
    Expect {
        order_per_key: false,
        recover: Duration::from_secs(60),
        max_duplicates: 100,
        key_recovery: true,
    }
}

/// Single-node RabbitMQ, a consumer killed: the broker requeues its unacked messages as
/// soon as the connection closes; duplicates are bounded by the prefetch (128).
fn amqp_expect() -> Expect {
    Expect {
        order_per_key: false,
        recover: Duration::from_secs(30),
        max_duplicates: 128,
        key_recovery: true,
    }
}

/// The Pub/Sub emulator, a consumer killed: what it leased comes again once the lease runs
/// out (`ack_deadline` 10 s, extended while held); duplicates are bounded by what one
/// subscriber may hold (`max_outstanding_messages`, 1,000).
fn pubsub_expect() -> Expect {
    Expect {
        order_per_key: false,
        recover: Duration::from_secs(60),
        max_duplicates: 1_000,
        key_recovery: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn nats_kill_one_of_three() {
    let Some(url) = url("TIDEMILL_NATS_URL", str::to_owned) else {
        return;
    };
    kill_one_of_three("nats", url, nats_expect()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn amqp_kill_one_of_three() {
    let Some(url) = url("TIDEMILL_AMQP_URL", str::to_owned) else {
        return;
    };
    kill_one_of_three("amqp", url, amqp_expect()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn pubsub_kill_one_of_three() {
    let Some(url) = url("PUBSUB_EMULATOR_HOST", |h| {
        format!("pubsub://tidemill-test?emulator={h}")
    }) else {
        return;
    };
    kill_one_of_three("pubsub", url, pubsub_expect()).await;
}
