//! The multi-process harness the failover scenarios share: a run's processes (consumers of
//! one group and a producer, `src/main.rs`), their logs, the scenarios (kill one of three,
//! scale out) and the checks (0 lost, order per key, duplicates, recovery time).
#![allow(dead_code)] // each test file uses what it needs

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tidemill_failover::Report;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_tidemill-failover");

/// The broker URL from `var`, or `None` (the test skips) when it is unset.
pub fn url(var: &str, make: impl Fn(&str) -> String) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(make(&v)),
        _ => {
            eprintln!("SKIP: {var} is not set (no broker to test against)");
            None
        }
    }
}

pub struct Run {
    pub dir: PathBuf,
    pub url: String,
    pub topic: String,
    pub group: String,
}

impl Run {
    pub fn new(name: &str, url: String) -> Run {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("tidemill-failover-{name}-{stamp}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Run {
            dir,
            url,
            topic: format!("failover-{name}-{stamp}"),
            // A group of its own: members an earlier run left behind (killed, not yet
            // expired) stay out of it.
            group: format!("failover-{stamp}"),
        }
    }

    pub fn consumer_file(&self, n: usize) -> PathBuf {
        self.dir.join(format!("consumer-{n}.log"))
    }

    pub fn confirmed_file(&self) -> PathBuf {
        self.dir.join("confirmed.log")
    }

    /// Starts consumer `n` and waits until it is subscribed.
    pub async fn consumer(&self, n: usize) -> Child {
        let mut child = Command::new(BIN)
            .args(["consume", &self.url, &self.topic, &self.group])
            .arg(self.consumer_file(n))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn consumer");
        forward_stderr(&mut child, format!("consumer {n}"));
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await;
        match ready {
            Ok(Ok(Some(line))) if line == "ready" => {}
            other => panic!("consumer {n} did not get ready: {other:?}"),
        }
        child
    }

    pub fn producer(&self, count: u64, keys: u64, batch: u64, pause_ms: u64) -> Child {
        let mut child = Command::new(BIN)
            .args(["produce", &self.url, &self.topic])
            .arg(self.confirmed_file())
            .args([count, keys, batch, pause_ms].map(|n| n.to_string()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn producer");
        forward_stderr(&mut child, "producer".to_owned());
        child
    }

    pub fn report(&self, consumers: usize) -> Report {
        let files: Vec<PathBuf> = (0..consumers).map(|n| self.consumer_file(n)).collect();
        Report::read(&self.confirmed_file(), &files).expect("read the logs")
    }

    /// Waits until `done(report)` or `within` passes; returns the last report.
    pub async fn wait(
        &self,
        consumers: usize,
        within: Duration,
        done: impl Fn(&Report) -> bool,
    ) -> Report {
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

/// Copies what `child` writes to stderr to the test's stderr, each line prefixed with
/// `who` and the process id (the processes log with `RUST_LOG`, warnings by default).
pub fn forward_stderr(child: &mut Child, who: String) {
    let pid = child.id().unwrap_or(0);
    let Some(stderr) = child.stderr.take() else {
        return;
    };
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[{who} pid {pid}] {line}");
        }
    });
}

pub async fn sigkill(child: &mut Child) {
    child.start_kill().expect("kill");
    let _ = child.wait().await;
}

pub async fn sigterm(mut child: Child) {
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

pub fn cleanup(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// Wall-clock nanoseconds since the Unix epoch (the clock the processes record with).
pub fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The producer's pause between batches of 100: 20,000 messages take about half a minute,
/// so the stream goes on well past a kill, the restart ten seconds later and the
/// rebalances they cause.
pub const PAUSE_MS: u64 = 100;

/// What a broker promises in these scenarios.
pub struct Expect {
    /// Per-key order is kept (Kafka: keys map to partitions, each read by one member).
    pub order_per_key: bool,
    /// The documented time for the keys of a killed or rebalanced consumer to make
    /// progress again, with room for a loaded test machine.
    pub recover: Duration,
    /// At most this many messages handled twice over the run.
    pub max_duplicates: usize,
    /// Whether [`Expect::recover`] also bounds how long the concerned keys wait (else that
    /// figure is only reported).
    pub key_recovery: bool,
}

/// Three consumers, one killed with SIGKILL a quarter of the way in and started again once
/// the others took over its keys (brokers that promise that recovery time), else ten
/// seconds later; the producer publishes 20,000 messages over 60 keys meanwhile (about
/// 30 s).
pub async fn kill_one_of_three(name: &str, url: String, expect: Expect) {
    const COUNT: u64 = 20_000;
    let run = Run::new(name, url);
    let mut consumers = Vec::new();
    for n in 0..3 {
        consumers.push(Some(run.consumer(n).await));
    }
    let producer = run.producer(COUNT, 60, 100, PAUSE_MS);
    let quarter = run
        .wait(3, Duration::from_secs(120), |r| {
            r.handled >= (COUNT / 4) as usize
        })
        .await;
    assert!(
        quarter.handled >= (COUNT / 4) as usize,
        "{name}: no progress before the kill: {quarter}"
    );
    let killed_at = Instant::now();
    let killed_nanos = now_nanos();
    let mut victim = consumers[1].take().expect("consumer 1");
    let victim_pid = victim.id().expect("pid");
    sigkill(&mut victim).await;
    if expect.key_recovery {
        // The survivors take over the killed consumer's keys first (bounded by the
        // documented recovery time); the restart then joins a group that recovered
        // without it, so the test shows the failover and the rejoin apart.
        run.wait(3, expect.recover, |r| {
            r.recovery_after(killed_nanos, Some(victim_pid)).is_some()
        })
        .await;
    } else {
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    let restarted_after = killed_at.elapsed();
    consumers[1] = Some(run.consumer(1).await);
    let (report, report_after) = finish(
        name,
        &run,
        producer,
        consumers.into_iter().flatten(),
        3,
        COUNT,
        expect.recover + Duration::from_secs(60),
    )
    .await;
    let took = killed_at.elapsed();
    let recovery = report_after.recovery_after(killed_nanos, Some(victim_pid));
    eprintln!(
        "{name} kill_one_of_three: {report_after}; the killed consumer's keys recovered \
         {recovery:.1?} after the kill; restarted {restarted_after:.1?} after the kill; all \
         handled {took:.1?} after the kill"
    );
    check(name, COUNT, &report, &expect);
    check_recovery(name, "the kill", recovery, &expect, &report_after);
    cleanup(&run.dir);
}

/// One consumer, a second one started a quarter of the way in, two more at half way
/// (1 -> 2 -> 4 processes); the producer publishes 20,000 messages over 60 keys meanwhile
/// (about 30 s).
pub async fn scale_out(name: &str, url: String, expect: Expect) {
    const COUNT: u64 = 20_000;
    let run = Run::new(name, url);
    let mut consumers = vec![run.consumer(0).await];
    let producer = run.producer(COUNT, 60, 100, PAUSE_MS);
    let mut events = Vec::new();
    for (share, add) in [(4, 1..2), (2, 2..4)] {
        let r = run
            .wait(consumers.len(), Duration::from_secs(120), |r| {
                r.handled >= (COUNT / share) as usize
            })
            .await;
        assert!(
            r.handled >= (COUNT / share) as usize,
            "{name}: no progress with {} consumers: {r}",
            consumers.len()
        );
        let at = now_nanos();
        for n in add {
            consumers.push(run.consumer(n).await);
        }
        events.push((consumers.len(), at));
    }
    let (report, report_after) = finish(
        name,
        &run,
        producer,
        consumers,
        4,
        COUNT,
        expect.recover + Duration::from_secs(60),
    )
    .await;
    let recoveries: Vec<(usize, Option<Duration>)> = events
        .iter()
        .map(|&(n, at)| (n, report_after.recovery_after(at, None)))
        .collect();
    eprintln!(
        "{name} scale_out 1 -> 2 -> 4: {report_after}; every key made progress again within \
         {:.1?} after the scale-up (to 2, to 4)",
        recoveries.iter().map(|(_, r)| *r).collect::<Vec<_>>()
    );
    check(name, COUNT, &report, &expect);
    for (n, recovery) in recoveries {
        check_recovery(
            name,
            &format!("scaling to {n}"),
            recovery,
            &expect,
            &report_after,
        );
    }
    assert!(
        report_after.per_process.len() >= 4,
        "{name}: not every consumer got work: {report_after}"
    );
    cleanup(&run.dir);
}

pub fn check(name: &str, count: u64, report: &Report, expect: &Expect) {
    assert_eq!(report.confirmed as u64, count, "{name}: {report}");
    assert!(
        report.lost.is_empty(),
        "{name}: {} confirmed messages never handled (first: {:?}): {report}",
        report.lost.len(),
        report.lost.iter().take(5).collect::<Vec<_>>()
    );
    if expect.order_per_key {
        assert_eq!(report.order_violations, 0, "{name}: {report}");
    }
    assert!(
        report.longest_gap <= expect.recover,
        "{name}: no message handled for {:?} (documented recovery: {:?}): {report}",
        report.longest_gap,
        expect.recover
    );
    assert!(
        report.duplicates <= expect.max_duplicates,
        "{name}: {} messages handled twice (bound: {}): {report}",
        report.duplicates,
        expect.max_duplicates
    );
}

pub fn check_recovery(
    name: &str,
    event: &str,
    recovery: Option<Duration>,
    expect: &Expect,
    report: &Report,
) {
    if !expect.key_recovery {
        return;
    }
    match recovery {
        Some(r) => assert!(
            r <= expect.recover,
            "{name}: keys waited {r:?} after {event} (documented recovery: {:?}): {report}",
            expect.recover
        ),
        None => panic!("{name}: some keys never made progress after {event}: {report}"),
    }
}

/// The end of a scenario: waits for the producer, then until every confirmed message was
/// handled (or `within` passed), stops the consumers and returns the report taken then and
/// the one after the consumers stopped (the logs complete).
pub async fn finish(
    name: &str,
    run: &Run,
    producer: Child,
    consumers: impl IntoIterator<Item = Child>,
    processes: usize,
    count: u64,
    within: Duration,
) -> (Report, Report) {
    let mut producer = producer;
    let status = tokio::time::timeout(Duration::from_secs(300), producer.wait())
        .await
        .expect("the producer finishes")
        .expect("producer status");
    assert!(status.success(), "{name}: producer failed");
    let report = run
        .wait(processes, within, |r| {
            r.confirmed as u64 == count && r.lost.is_empty()
        })
        .await;
    for c in consumers {
        sigterm(c).await;
    }
    (report, run.report(processes))
}

/// Checks a run in which broker nodes were killed (`kills`: the node and when, in
/// nanoseconds since the epoch): nothing lost, at most `per_kill` duplicates per kill, and
/// every key making progress again within `recover` after each kill.
pub fn check_node_kills<N: std::fmt::Debug>(
    name: &str,
    count: u64,
    (report, report_after): (&Report, &Report),
    kills: &[(N, u128)],
    recover: Duration,
    per_kill: usize,
) {
    let recoveries: Vec<(&N, Option<Duration>)> = kills
        .iter()
        .map(|(node, at)| (node, report_after.recovery_after(*at, None)))
        .collect();
    eprintln!(
        "{name}: {report_after}; every key made progress again within {recoveries:.1?} after \
         each kill (node, time)"
    );
    let expect = Expect {
        order_per_key: false,
        recover,
        max_duplicates: per_kill * kills.len(),
        key_recovery: true,
    };
    check(name, count, report, &expect);
    for (node, recovery) in recoveries {
        check_recovery(
            name,
            &format!("killing node {node:?}"),
            recovery,
            &expect,
            report_after,
        );
    }
}
