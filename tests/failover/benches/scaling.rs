//! Consume throughput with 1, 2 and 4 consumer processes of one group, in one run, on the
//! 3-node NATS JetStream cluster (streams with 3 replicas), the 3-node RabbitMQ cluster
//! (quorum queues) and a 6-partition Kafka topic; the scaling factor is the throughput with
//! k processes over the throughput with one.
//!
//! ```text
//! eval "$(bash brokers/brokers.sh env)"
//! eval "$(bash brokers/brokers.sh env nats-cluster rabbitmq-cluster)"
//! cargo bench -p tidemill-failover --bench scaling [-- --write-benchmarks]
//! ```
//!
//! For every setup, ROUNDS rounds (default 3): a fresh topic, one group per process count
//! initialized on it (so each group keeps what is published before it first subscribes),
//! COUNT messages over KEYS keys published from this process; then for k = 1, 2, 4 in turn,
//! k `tidemill-failover consume` processes of that k's group start at once (the binary
//! cargo builds with this bench's profile, release: `CARGO_BIN_EXE_tidemill-failover`).
//! Each handles one message at a time (router concurrency 1) by appending a line to its own
//! file and syncing it before the ack; the files are on tmpfs (`/dev/shm` where it exists),
//! so the sync is free and the figure is the adapter's and the broker's, not the disk's.
//! The throughput is the messages first handled once every process handled its first one,
//! over the time from then to the last one handled (timestamps the processes write): the
//! rate with all k at work; the rate from spawning the processes (startup, joins and
//! rebalances included) is shown beside it. Setups whose variable
//! (`TIDEMILL_NATS_CLUSTER_URL`, `TIDEMILL_AMQP_CLUSTER_URL`, `TIDEMILL_KAFKA_BROKERS`) is
//! unset are skipped with a message.
//!
//! Prints a Markdown table; `--write-benchmarks` also replaces (or appends) the section
//! "Consume scaling across processes" of the workspace's BENCHMARKS.md, and with
//! `TIDEMILL_BENCH_REPORT` set every figure is appended there as a row for `make bench`'s
//! report (group: the setup; variant: the process count; ratio: the scaling factor).
//! `TIDEMILL_BENCH_SCALING_COUNT` (default 100,000; 200,000 on Kafka, whose members take
//! seconds to join), `TIDEMILL_BENCH_SCALING_KEYS` (default 1,000) and
//! `TIDEMILL_BENCH_SCALING_ROUNDS` (default 3) change the load.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tidemill::{BrokerConfig, Message, SubscribeOptions};
use tidemill_failover::parse_handled;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_tidemill-failover");

/// Consumer process counts measured, the first being the baseline of the scaling factor.
const PROCESSES: [usize; 3] = [1, 2, 4];

/// Messages published per `publish` call while filling a topic.
const PUBLISH_BATCH: usize = 500;

/// Where the section starts in BENCHMARKS.md.
const SECTION: &str = "## Consume scaling across processes";

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// One broker setup of the run.
struct Setup {
    /// Short name, in topic names.
    short: &'static str,
    /// What the table calls it.
    name: &'static str,
    /// The variable holding its address(es).
    var: &'static str,
    /// The facade URL built from the variable's value.
    url: fn(&str) -> String,
    /// Messages per round: enough that the window with every process at work lasts
    /// seconds (Kafka consumes fast once its members are assigned, and joining takes
    /// seconds).
    count: usize,
}

fn setups() -> Vec<Setup> {
    vec![
        Setup {
            short: "nats",
            name: "NATS JetStream cluster (3 nodes, streams with 3 replicas)",
            var: "TIDEMILL_NATS_CLUSTER_URL",
            // As tests/nats_cluster.rs: one scheme, every host:port.
            url: |list| {
                let servers: Vec<&str> = list
                    .split(',')
                    .map(|s| s.trim().trim_start_matches("nats://"))
                    .filter(|s| !s.is_empty())
                    .collect();
                format!(
                    "nats://{}?jetstream.replicas=3&jetstream.max_age=1h",
                    servers.join(",")
                )
            },
            count: 100_000,
        },
        Setup {
            short: "amqp",
            name: "RabbitMQ cluster (3 nodes, quorum queues)",
            var: "TIDEMILL_AMQP_CLUSTER_URL",
            // As tests/amqp_cluster.rs: the node list as it is, quorum queues for groups.
            url: |list| format!("{}?queue_type=quorum", list.trim().trim_end_matches(',')),
            count: 100_000,
        },
        Setup {
            short: "kafka",
            name: "Kafka (Nisshi, 1 node, SQLite store), topic with 6 partitions",
            var: "TIDEMILL_KAFKA_BROKERS",
            url: |brokers| format!("kafka://{}?partitions=6", brokers.trim()),
            count: 200_000,
        },
    ]
}

/// What one (setup, k) measurement found.
struct Measured {
    /// Messages first handled once every process handled its first one, per second from
    /// then to the last one handled: the rate with all k processes at work.
    msgs_per_sec: f64,
    /// All the messages over the time from spawning the processes to the last one handled
    /// (startup, joins and rebalances included).
    drain_per_sec: f64,
    /// From spawning the processes to every one of them having handled a message.
    all_active_after: Duration,
    /// Messages counted in `msgs_per_sec`.
    in_window: usize,
    /// Messages handled more than once.
    duplicates: usize,
    /// Messages handled per process, largest first.
    shares: Vec<usize>,
    /// CPU time of the consumer processes together, per message handled.
    cpu_per_msg: Option<Duration>,
    /// Share of the machine's CPU time busy (any process, brokers included) from all
    /// `ready` to the last message seen handled.
    machine_busy: Option<f64>,
}

/// One process count's rounds.
struct Summary {
    processes: usize,
    /// Messages per round.
    count: usize,
    /// msg/s with all processes at work, per round.
    rates: Vec<f64>,
    /// The round with the median rate (its other figures go in the table).
    median: Measured,
    /// Median over the rounds of the drain rate.
    drain_per_sec: f64,
}

#[tokio::main]
async fn main() {
    let write = std::env::args().any(|a| a == "--write-benchmarks");
    let load = Load {
        count: std::env::var("TIDEMILL_BENCH_SCALING_COUNT")
            .ok()
            .and_then(|v| v.parse().ok()),
        keys: env_number("TIDEMILL_BENCH_SCALING_KEYS", 1_000),
        rounds: env_number("TIDEMILL_BENCH_SCALING_ROUNDS", 3).max(1),
    };
    let load_before = shell("cut -d' ' -f1-3 /proc/loadavg");
    let mut results: Vec<(&'static str, Result<Vec<Summary>, String>)> = Vec::new();
    for setup in setups() {
        let Some(value) = std::env::var(setup.var)
            .ok()
            .filter(|v| !v.trim().is_empty())
        else {
            eprintln!("SKIP: {}: {} is not set", setup.name, setup.var);
            results.push((setup.name, Err(format!("skipped: {} unset", setup.var))));
            continue;
        };
        let url = (setup.url)(&value);
        let result = run_setup(&setup, &url, &load).await;
        if let Ok(summaries) = &result {
            record_rows(setup.name, summaries, &load);
        }
        results.push((setup.name, result));
    }
    let table = table(&results);
    println!("{table}");
    if write {
        let section = section(&table, &load, &load_before);
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../BENCHMARKS.md");
        match replace_section(&path, &section) {
            Ok(()) => eprintln!("wrote the section to {}", path.display()),
            Err(e) => {
                eprintln!("cannot update {}: {e}", path.display());
                std::process::exit(1);
            }
        }
    }
}

/// The messages of every measurement, and how often each is repeated.
struct Load {
    /// Overrides every setup's own count.
    count: Option<usize>,
    keys: usize,
    rounds: usize,
}

/// Every round of every process count on one setup (the process counts alternate within a
/// round, so a drift of the machine's load touches them alike).
async fn run_setup(setup: &Setup, url: &str, load: &Load) -> Result<Vec<Summary>, String> {
    let mut by_k: Vec<Vec<Measured>> = PROCESSES.iter().map(|_| Vec::new()).collect();
    let count = load.count.unwrap_or(setup.count);
    for round in 1..=load.rounds {
        // One topic per round, a group of its own per process count, every group
        // initialized before the messages are published, so each keeps all of them.
        let stamp = now_nanos();
        let topic = format!("scaling-{}-{stamp}", setup.short);
        let groups: Vec<String> = PROCESSES
            .iter()
            .map(|k| format!("scaling-{stamp}-{k}"))
            .collect();
        eprintln!(
            "==> {}: round {round}/{}: publishing {count} messages for {} groups",
            setup.name,
            load.rounds,
            groups.len()
        );
        match fill(url, &topic, &groups, count, load.keys).await {
            Ok(rate) => eprintln!("    published at {rate:.0} msg/s"),
            Err(e) => return Err(format!("round {round}, publishing: {e}")),
        }
        for (i, k) in PROCESSES.into_iter().enumerate() {
            eprintln!(
                "==> {}: round {round}/{}, {k} consumer process(es)",
                setup.name, load.rounds
            );
            match measure(setup, url, &topic, &groups[i], k, count).await {
                Ok(m) => {
                    eprintln!(
                        "    {:.0} msg/s with all at work ({} messages), {:.0} msg/s from the \
                         spawn; all at work after {:.1?}; per process {:?}",
                        m.msgs_per_sec, m.in_window, m.drain_per_sec, m.all_active_after, m.shares
                    );
                    by_k[i].push(m);
                }
                Err(e) => {
                    eprintln!("    FAILED: {e}");
                    return Err(format!("round {round}, {k} processes: {e}"));
                }
            }
        }
    }
    Ok(PROCESSES
        .into_iter()
        .zip(by_k)
        .map(|(processes, mut rounds)| {
            let rates: Vec<f64> = rounds.iter().map(|m| m.msgs_per_sec).collect();
            let mut drains: Vec<f64> = rounds.iter().map(|m| m.drain_per_sec).collect();
            drains.sort_by(f64::total_cmp);
            rounds.sort_by(|a, b| a.msgs_per_sec.total_cmp(&b.msgs_per_sec));
            let drain_per_sec = median(&drains);
            let median = rounds.swap_remove((rounds.len() - 1) / 2);
            Summary {
                processes,
                count,
                rates,
                median,
                drain_per_sec,
            }
        })
        .collect())
}

/// The median of sorted `values` (the lower middle one for an even count).
fn median(sorted: &[f64]) -> f64 {
    sorted
        .get((sorted.len().max(1) - 1) / 2)
        .copied()
        .unwrap_or(f64::NAN)
}

fn env_number(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `k` consumer processes in `group` (initialized before `count` messages were
/// published to `topic`) until they handled every message.
async fn measure(
    setup: &Setup,
    url: &str,
    topic: &str,
    group: &str,
    k: usize,
    count: usize,
) -> Result<Measured, Failure> {
    let stamp = now_nanos();

    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("tidemill-scaling-{stamp}"));
    std::fs::create_dir_all(&dir)?;
    let files: Vec<PathBuf> = (0..k)
        .map(|n| dir.join(format!("consumer-{n}.log")))
        .collect();

    let spawned_at = now_nanos();
    let mut children = Vec::new();
    for (n, file) in files.iter().enumerate() {
        let mut child = Command::new(BIN)
            .args(["consume", url, topic, group])
            .arg(file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        forward_stderr(&mut child, format!("{} consumer {n}", setup.short));
        children.push(child);
    }
    let mut stdouts = Vec::new();
    for (n, child) in children.iter_mut().enumerate() {
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        match tokio::time::timeout(Duration::from_secs(180), lines.next_line()).await {
            Ok(Ok(Some(line))) if line == "ready" => {}
            other => {
                terminate(children).await;
                return Err(format!("consumer {n} did not get ready: {other:?}").into());
            }
        }
        // Kept open: the processes may write to stdout again.
        stdouts.push(lines);
    }
    let busy_from = machine_cpu();

    // Until every message was handled, or no progress for a minute. Polling counts the new
    // lines only (cheap beside the consumers on a small machine); the whole files are read
    // once the count is reached, to count every message once.
    let mut last_progress = (0, Instant::now());
    let mut tails: Vec<Tail> = files.iter().map(|f| Tail::new(f)).collect();
    let handled = loop {
        let mut lines = 0;
        for tail in &mut tails {
            lines += tail.count_new_lines()?;
        }
        let mut distinct = lines;
        if lines >= count {
            let handled = read_handled(&files)?;
            distinct = handled
                .iter()
                .map(|h| h.0.as_str())
                .collect::<HashSet<_>>()
                .len();
            if distinct >= count {
                break handled;
            }
        }
        if distinct > last_progress.0 {
            last_progress = (distinct, Instant::now());
        } else if last_progress.1.elapsed() > Duration::from_secs(60) {
            terminate(children).await;
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("stalled at {distinct} of {count} messages handled").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let busy_to = machine_cpu();
    let cpu: Option<Duration> = children.iter().map(|c| c.id().and_then(process_cpu)).sum();
    terminate(children).await;
    drop(stdouts);
    let _ = std::fs::remove_dir_all(&dir);

    let mut first_seen: BTreeMap<&str, u128> = BTreeMap::new();
    let mut per_pid: BTreeMap<u32, (usize, u128)> = BTreeMap::new();
    for (id, at, pid) in &handled {
        let first = first_seen.entry(id.as_str()).or_insert(*at);
        *first = (*first).min(*at);
        let (n, first_of_pid) = per_pid.entry(*pid).or_insert((0, *at));
        *n += 1;
        *first_of_pid = (*first_of_pid).min(*at);
    }
    if per_pid.len() < k {
        return Err(format!(
            "only {} of {k} processes handled a message (all {count} went to the first ones: \
             raise TIDEMILL_BENCH_SCALING_COUNT)",
            per_pid.len()
        )
        .into());
    }
    let active_at = per_pid.values().map(|p| p.1).max().unwrap_or(spawned_at);
    let last = handled.iter().map(|h| h.1).max().unwrap_or(active_at);
    let in_window = first_seen.values().filter(|&&at| at >= active_at).count();
    let nanos = |from: u128, to: u128| Duration::from_nanos(to.saturating_sub(from) as u64);
    let mut shares: Vec<usize> = per_pid.into_values().map(|p| p.0).collect();
    shares.sort_unstable_by(|a, b| b.cmp(a));
    Ok(Measured {
        msgs_per_sec: in_window as f64 / nanos(active_at, last).as_secs_f64().max(1e-9),
        drain_per_sec: count as f64 / nanos(spawned_at, last).as_secs_f64().max(1e-9),
        all_active_after: nanos(spawned_at, active_at),
        in_window,
        duplicates: handled.len() - first_seen.len(),
        shares,
        cpu_per_msg: cpu.map(|c| c / u32::try_from(handled.len().max(1)).unwrap_or(u32::MAX)),
        machine_busy: match (busy_from, busy_to) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                Some((b1 - b0) as f64 / (t1 - t0) as f64)
            }
            _ => None,
        },
    })
}

/// Initializes `groups` on `topic` and publishes `count` messages over `keys` keys; returns
/// the publish rate.
async fn fill(
    url: &str,
    topic: &str,
    groups: &[String],
    count: usize,
    keys: usize,
) -> Result<f64, Failure> {
    let broker = BrokerConfig::from_url(url)?.connect().await?;
    for group in groups {
        broker
            .subscriber
            .initialize(topic, &SubscribeOptions::group(group.as_str()))
            .await?;
    }
    let started = Instant::now();
    let mut seq_of_key = vec![0u64; keys.max(1)];
    let mut n = 0;
    while n < count {
        let mut messages = Vec::with_capacity(PUBLISH_BATCH);
        for i in n..(n + PUBLISH_BATCH).min(count) {
            let k = i % keys.max(1);
            seq_of_key[k] += 1;
            messages.push(
                Message::with_uuid(format!("m-{i}"), format!("payload {i}"))
                    .with_key(format!("k{k}"))
                    .with_metadata("seq", seq_of_key[k]),
            );
        }
        n += messages.len();
        broker.publisher.publish(topic, messages).await?;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    broker.publisher.close().await?;
    broker.subscriber.close().await?;
    Ok(rate)
}

/// The complete lines of a growing file, counted as they come.
struct Tail {
    path: PathBuf,
    /// Bytes up to the end of the last complete line counted.
    offset: u64,
    lines: usize,
}

impl Tail {
    fn new(path: &Path) -> Tail {
        Tail {
            path: path.to_owned(),
            offset: 0,
            lines: 0,
        }
    }

    /// The complete lines so far.
    fn count_new_lines(&mut self) -> std::io::Result<usize> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(self.lines),
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut new = Vec::new();
        file.read_to_end(&mut new)?;
        if let Some(end) = new.iter().rposition(|&b| b == b'\n') {
            self.lines += new[..=end].iter().filter(|&&b| b == b'\n').count();
            self.offset += end as u64 + 1;
        }
        Ok(self.lines)
    }
}

/// Every line of the consumers' files as (id, nanos, pid).
fn read_handled(files: &[PathBuf]) -> std::io::Result<Vec<(String, u128, u32)>> {
    let mut out = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // A line being written is incomplete: parse what is whole.
        out.extend(
            text.lines()
                .filter_map(parse_handled)
                .map(|h| (h.id, h.at, h.pid)),
        );
    }
    Ok(out)
}

/// SIGTERM to every child, SIGKILL to those still running 30 s later.
async fn terminate(children: Vec<Child>) {
    for child in &children {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for mut child in children {
        if tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .is_err()
        {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}

fn forward_stderr(child: &mut Child, who: String) {
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

/// User + system CPU time of process `pid` so far (`/proc/PID/stat`, clock ticks of 1/100 s).
fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 1000 / clock_ticks()))
}

fn clock_ticks() -> u64 {
    shell("getconf CLK_TCK").parse().unwrap_or(100)
}

/// (busy, total) CPU ticks of the whole machine so far (`/proc/stat`).
fn machine_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    // idle and iowait
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn shell(cmd: &str) -> String {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

fn thousands(v: f64) -> String {
    let digits = format!("{v:.0}");
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn micros(d: Option<Duration>) -> String {
    d.map_or("–".into(), |c| {
        format!("{:.0} µs/msg", c.as_secs_f64() * 1e6)
    })
}

fn percent(share: Option<f64>) -> String {
    share.map_or("–".into(), |b| format!("{:.0} %", b * 100.0))
}

fn table(results: &[(&str, Result<Vec<Summary>, String>)]) -> String {
    let mut out = String::from(
        "| setup | messages | consumer processes | msg/s, all at work | scaling | per round | msg/s from \
         the spawn | scaling | consumer CPU | machine CPU busy | all at work after | per process \
         | duplicates |\n\
         |---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|\n",
    );
    for (name, result) in results {
        let summaries = match result {
            Ok(s) => s,
            Err(why) => {
                out.push_str(&format!(
                    "| {name} | – | – | – | – | {why} | – | – | – | – | – | – | – |\n"
                ));
                continue;
            }
        };
        let Some(base) = summaries.first() else {
            continue;
        };
        let base_rate = median(&sorted(&base.rates));
        for s in summaries {
            let rate = median(&sorted(&s.rates));
            let (scaling, drain_scaling) = if std::ptr::eq(s, base) {
                ("baseline".to_string(), "baseline".to_string())
            } else {
                (
                    format!("{:.2}×", rate / base_rate),
                    format!("{:.2}×", s.drain_per_sec / base.drain_per_sec),
                )
            };
            let m = &s.median;
            out.push_str(&format!(
                "| {name} | {} | {} | {} | {scaling} | {} | {} | {drain_scaling} | {} | {} | {:.1} s | \
                 {} | {} |\n",
                thousands(s.count as f64),
                s.processes,
                thousands(rate),
                s.rates
                    .iter()
                    .map(|r| thousands(*r))
                    .collect::<Vec<_>>()
                    .join(", "),
                thousands(s.drain_per_sec),
                micros(m.cpu_per_msg),
                percent(m.machine_busy),
                m.all_active_after.as_secs_f64(),
                m.shares
                    .iter()
                    .map(|n| thousands(*n as f64))
                    .collect::<Vec<_>>()
                    .join(" / "),
                m.duplicates,
            ));
        }
    }
    out
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

fn section(table: &str, load: &Load, load_before: &str) -> String {
    format!(
        "{SECTION}\n\n\
         Written by `cargo bench -p tidemill-failover --bench scaling -- --write-benchmarks` \
         (with the single-node brokers' and the clusters' variables from `brokers.sh env`) on \
         {date}; not part of `make bench`'s table above. Issue 27: consume throughput of one \
         group with 1, 2 and 4 consumer processes, the three setups in the same run. Machine: \
         {cpu} ({cores} cores), {mem} memory, {kernel}, {rustc}; load before the run: \
         {load_before}.\n\n\
         For each setup, {rounds} rounds: a fresh topic with one group per process count, \
         the messages of the table (over {keys} keys) published first, then 1, 2 and 4 \
         processes in turn, each count on its own group, the processes of a count started at \
         once (`tidemill-failover consume`, release build, router concurrency 1: one message \
         at a time per process, each recorded by appending a line to a file on tmpfs, synced, \
         before the ack). \"msg/s, all at work\" counts the messages first \
         handled after every process handled its first one, over the time from then to the \
         last one handled (median of the rounds, each round listed); scaling is that figure \
         over the one with one process. \"msg/s from the spawn\" is every message over the \
         time from starting the processes to the last one handled: startup, joins and \
         rebalances included. From the median round: consumer CPU (user + system time of the \
         consumer processes together, per message), machine CPU busy (the whole machine, \
         brokers included, from every process `ready` to the end), when every process had \
         handled a message, and how many each handled.\n\n\
         {table}\n\
         Notes: the machine has 2 cores and the brokers (three RabbitMQ nodes, three NATS \
         servers, Nisshi, and the idle single-node brokers) run on it beside the consumers, so \
         more processes compete with the brokers for the same cores: the factor shows what the \
         adapter and the group protocol let through on one small machine (where it is busy \
         near 100 %, the cores are the limit), not what the brokers scale to on machines of \
         their own. On Kafka a group's unit of work is a partition: 6 partitions over 4 \
         processes is 2/2/1/1, and every member that joins costs a rebalance. Where the \
         machine stays well below 100 % busy, the limit is not the cores: on the Kafka test \
         broker, Nisshi's process used 85-100 % of one core while the consumers fetched \
         (sampled from `/proc` during a run of this bench): its SQLite store serves them from \
         about one core, so more consumers add fetch requests, not throughput. Duplicates: \
         messages handled twice (there is no failure here; a Kafka one is a message handled \
         again after a rebalance).\n",
        keys = load.keys,
        rounds = load.rounds,
        date = shell("date -u '+%Y-%m-%d %H:%M UTC'"),
        cpu = shell("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'"),
        cores = shell("nproc"),
        mem = shell("free -h | awk '/^Mem:/{print $2}'"),
        kernel = shell("uname -sr"),
        rustc = shell("rustc -V"),
    )
}

/// Replaces the section starting with [`SECTION`] (up to the next `## ` heading) in the
/// file at `path`, or appends it.
fn replace_section(path: &Path, section: &str) -> std::io::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let new = match text.find(SECTION) {
        Some(start) => {
            let after = start + SECTION.len();
            let end = text[after..]
                .find("\n## ")
                .map_or(text.len(), |i| after + i + 1);
            format!("{}{section}{}", &text[..start], &text[end..])
        }
        None => format!(
            "{}\n{section}",
            text.trim_end_matches('\n').to_owned() + "\n"
        ),
    };
    std::fs::write(path, new)
}

/// Appends one row per process count to `TIDEMILL_BENCH_REPORT` (the JSON lines `make
/// bench` turns into its table), when that variable is set.
fn record_rows(name: &str, summaries: &[Summary], load: &Load) {
    let Some(path) = std::env::var_os("TIDEMILL_BENCH_REPORT") else {
        return;
    };
    let mut lines = String::new();
    for s in summaries {
        let group = format!("consume scaling, {name}");
        let variant = match s.processes {
            1 => "1 consumer process".to_string(),
            k => format!("{k} consumer processes"),
        };
        let note = format!(
            "{} messages over {} keys published first; msg/s with every process at work, \
             median of {} rounds; consumer CPU {}; machine busy {}; 2 cores shared with the \
             brokers",
            s.count,
            load.keys,
            load.rounds,
            micros(s.median.cpu_per_msg),
            percent(s.median.machine_busy),
        );
        lines.push_str(&format!(
            "{{\"group\":{},\"variant\":{},\"msgs_per_sec\":{},\"peak_rss_bytes\":null,\"note\":{}}}\n",
            json_string(&group),
            json_string(&variant),
            median(&sorted(&s.rates)),
            json_string(&note)
        ));
    }
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, lines.as_bytes()));
    if let Err(e) = written {
        eprintln!(
            "bench report: cannot append to {}: {e}",
            Path::new(&path).display()
        );
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
