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

/// The other brokers' scenarios as they were first written (their owners tighten them).
fn other_expect() -> Expect {
    Expect {
        order_per_key: false,
        recover: Duration::from_secs(60),
        max_duplicates: usize::MAX,
        key_recovery: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn nats_kill_one_of_three() {
    let Some(url) = url("TIDEMILL_NATS_URL", str::to_owned) else {
        return;
    };
    kill_one_of_three("nats", url, other_expect()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn amqp_kill_one_of_three() {
    let Some(url) = url("TIDEMILL_AMQP_URL", str::to_owned) else {
        return;
    };
    kill_one_of_three("amqp", url, other_expect()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn pubsub_kill_one_of_three() {
    let Some(url) = url("PUBSUB_EMULATOR_HOST", |h| {
        format!("pubsub://tidemill-test?emulator={h}")
    }) else {
        return;
    };
    kill_one_of_three("pubsub", url, other_expect()).await;
}
