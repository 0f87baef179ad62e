//! Consumer processes of one group are killed (SIGKILL), restarted and scaled while a
//! producer publishes; every confirmed message must be handled (0 lost), per-key order kept
//! where the broker promises it, duplicates and the longest stall reported.
//!
//! Run one at a time (`#[ignore]`d: `make test` runs them in its serial phase, after the
//! parallel tests): they start several processes and load the 2-core test machine.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tidemill_failover::Report;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_tidemill-failover");

/// The broker URL from `var`, or `None` (the test skips) when it is unset.
fn url(var: &str, make: impl Fn(&str) -> String) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(make(&v)),
        _ => {
            eprintln!("SKIP: {var} is not set (no broker to test against)");
            None
        }
    }
}

struct Run {
    dir: PathBuf,
    url: String,
    topic: String,
    group: String,
}

impl Run {
    fn new(name: &str, url: String) -> Run {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("tidemill-failover-{name}-{stamp}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Run {
            dir,
            url,
            topic: format!("failover-{name}-{stamp}"),
            group: "failover".to_owned(),
        }
    }

    fn consumer_file(&self, n: usize) -> PathBuf {
        self.dir.join(format!("consumer-{n}.log"))
    }

    fn confirmed_file(&self) -> PathBuf {
        self.dir.join("confirmed.log")
    }

    /// Starts consumer `n` and waits until it is subscribed.
    async fn consumer(&self, n: usize) -> Child {
        let mut child = Command::new(BIN)
            .args(["consume", &self.url, &self.topic, &self.group])
            .arg(self.consumer_file(n))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn consumer");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await;
        match ready {
            Ok(Ok(Some(line))) if line == "ready" => {}
            other => panic!("consumer {n} did not get ready: {other:?}"),
        }
        child
    }

    fn producer(&self, count: u64, keys: u64, batch: u64, pause_ms: u64) -> Child {
        Command::new(BIN)
            .args(["produce", &self.url, &self.topic])
            .arg(self.confirmed_file())
            .args([count, keys, batch, pause_ms].map(|n| n.to_string()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn producer")
    }

    fn report(&self, consumers: usize) -> Report {
        let files: Vec<PathBuf> = (0..consumers).map(|n| self.consumer_file(n)).collect();
        Report::read(&self.confirmed_file(), &files).expect("read the logs")
    }

    /// Waits until `done(report)` or `within` passes; returns the last report.
    async fn wait(&self, consumers: usize, within: Duration, done: impl Fn(&Report) -> bool) -> Report {
        let deadline = Instant::now() + within;
        loop {
            let r = self.report(consumers);
            if done(&r) || Instant::now() >= deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

async fn sigkill(child: &mut Child) {
    child.start_kill().expect("kill");
    let _ = child.wait().await;
}

async fn sigterm(mut child: Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    if tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .is_err()
    {
        sigkill(&mut child).await;
    }
}

fn cleanup(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// Three consumers, one killed with SIGKILL a quarter of the way in and started again ten
/// seconds later; the producer publishes 20,000 messages over 60 keys meanwhile.
async fn kill_one_of_three(name: &str, url: String, order_per_key: bool, recover: Duration) {
    const COUNT: u64 = 20_000;
    let run = Run::new(name, url);
    let mut consumers = Vec::new();
    for n in 0..3 {
        consumers.push(Some(run.consumer(n).await));
    }
    let mut producer = run.producer(COUNT, 60, 100, 20);
    let quarter = run
        .wait(3, Duration::from_secs(120), |r| r.handled >= (COUNT / 4) as usize)
        .await;
    assert!(
        quarter.handled >= (COUNT / 4) as usize,
        "{name}: no progress before the kill: {quarter}"
    );
    let killed_at = Instant::now();
    let mut victim = consumers[1].take().expect("consumer 1");
    sigkill(&mut victim).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    consumers[1] = Some(run.consumer(1).await);
    let status = tokio::time::timeout(Duration::from_secs(300), producer.wait())
        .await
        .expect("the producer finishes")
        .expect("producer status");
    assert!(status.success(), "{name}: producer failed");
    let report = run
        .wait(3, recover + Duration::from_secs(60), |r| {
            r.confirmed as u64 == COUNT && r.lost.is_empty()
        })
        .await;
    let took = killed_at.elapsed();
    for c in consumers.into_iter().flatten() {
        sigterm(c).await;
    }
    let report_after = run.report(3);
    eprintln!("{name} kill_one_of_three: {report_after} (all handled {took:?} after the kill)");
    assert_eq!(report.confirmed as u64, COUNT, "{name}: {report}");
    assert!(
        report.lost.is_empty(),
        "{name}: {} confirmed messages never handled (first: {:?}): {report}",
        report.lost.len(),
        report.lost.iter().take(5).collect::<Vec<_>>()
    );
    if order_per_key {
        assert_eq!(report.order_violations, 0, "{name}: {report}");
    }
    assert!(
        report.longest_gap <= recover,
        "{name}: stalled for {:?} (documented recovery: {recover:?}): {report}",
        report.longest_gap
    );
    cleanup(&run.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn kafka_kill_one_of_three() {
    let Some(url) = url("TIDEMILL_KAFKA_BROKERS", |b| {
        format!("kafka://{b}?partitions=6")
    }) else {
        return;
    };
    kill_one_of_three("kafka", url, true, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn nats_kill_one_of_three() {
    let Some(url) = url("TIDEMILL_NATS_URL", str::to_owned) else {
        return;
    };
    kill_one_of_three("nats", url, false, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn amqp_kill_one_of_three() {
    let Some(url) = url("TIDEMILL_AMQP_URL", str::to_owned) else {
        return;
    };
    kill_one_of_three("amqp", url, false, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-process: run one at a time (make test's serial phase)"]
async fn pubsub_kill_one_of_three() {
    let Some(url) = url("PUBSUB_EMULATOR_HOST", |h| {
        format!("pubsub://tidemill-test?emulator={h}")
    }) else {
        return;
    };
    kill_one_of_three("pubsub", url, false, Duration::from_secs(60)).await;
}
