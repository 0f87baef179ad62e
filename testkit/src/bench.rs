//! Helpers shared by Tidemill's benchmarks (which live apart from the test run): the peak
//! resident set size of one scenario, and a machine-readable row per measurement that
//! `make bench` gathers into `BENCHMARKS.md`.
//!
//! ```no_run
//! use tidemill_testkit::bench::{record, PeakRss, Row};
//!
//! PeakRss::reset();
//! // … run the raw client's scenario, measure msg/s …
//! record(&Row::new("kafka publish", "raw rdkafka", 120_000.0).with_peak_rss(PeakRss::read()));
//! ```

use std::io::Write;

use serde::{Deserialize, Serialize};

/// Environment variable naming the JSON-lines file [`record`] appends to.
pub const REPORT_ENV: &str = "TIDEMILL_BENCH_REPORT";

/// Peak resident set size of this process (Linux `VmHWM`).
pub struct PeakRss;

impl PeakRss {
    /// Resets the peak to the current RSS (Linux ≥ 4.0), so the next [`read`](Self::read)
    /// measures one scenario. Does nothing where that is not supported.
    pub fn reset() {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }

    /// The peak RSS in bytes since start or the last [`reset`](Self::reset), if known.
    pub fn read() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

/// One measurement: `variant` of the scenario `group` reached `msgs_per_sec`.
///
/// Within a group, the first variant recorded is the baseline the others are compared with
/// (the raw client for adapter benches, the plain router for the in-memory ones).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// The scenario, e.g. `"kafka publish"`.
    pub group: String,
    /// What ran it, e.g. `"raw rdkafka"` or `"tidemill"`.
    pub variant: String,
    /// Throughput in messages (or requests) per second.
    pub msgs_per_sec: f64,
    /// Peak RSS during the scenario, in bytes, where measured.
    #[serde(default)]
    pub peak_rss_bytes: Option<u64>,
    /// Anything else worth a column (e.g. `"p50 3 µs, p99 58 µs"`).
    #[serde(default)]
    pub note: Option<String>,
}

impl Row {
    /// A row without peak RSS or note.
    pub fn new(group: impl Into<String>, variant: impl Into<String>, msgs_per_sec: f64) -> Self {
        Self {
            group: group.into(),
            variant: variant.into(),
            msgs_per_sec,
            peak_rss_bytes: None,
            note: None,
        }
    }

    /// Sets the peak RSS (bytes).
    pub fn with_peak_rss(mut self, bytes: Option<u64>) -> Self {
        self.peak_rss_bytes = bytes;
        self
    }

    /// Sets the note.
    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

/// One consume run's figures: msg/s, CPU of the whole process per message, peak RSS.
#[derive(Default, Clone, Copy, Debug)]
pub struct Consumed {
    /// Messages per second.
    pub rate: f64,
    /// CPU time of the whole process per message (µs), where known.
    pub cpu_us: Option<f64>,
    /// Peak RSS during the run, in bytes, where known.
    pub rss: Option<u64>,
}

/// Times one run: wall clock, process CPU ([`process_cpu`]) and peak RSS ([`PeakRss`],
/// reset when the clock starts).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    started: std::time::Instant,
    cpu: Option<std::time::Duration>,
}

impl Clock {
    /// Starts timing.
    pub fn start() -> Clock {
        PeakRss::reset();
        Clock {
            cpu: process_cpu(),
            started: std::time::Instant::now(),
        }
    }

    /// The figures of a run of `n` messages that ends now.
    pub fn stop(self, n: usize) -> Consumed {
        let elapsed = self.started.elapsed().as_secs_f64();
        let cpu = process_cpu()
            .zip(self.cpu)
            .map(|(after, before)| after.saturating_sub(before).as_secs_f64() * 1e6 / n as f64);
        Consumed {
            rate: if elapsed > 0.0 {
                n as f64 / elapsed
            } else {
                0.0
            },
            cpu_us: cpu,
            rss: PeakRss::read(),
        }
    }
}

/// Counts the messages handlers received; wakes whoever waits on [`done`](Self::done) once
/// the target is reached. Cheap to clone (clones share the count).
#[derive(Clone, Debug)]
pub struct HandledCounter {
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    target: usize,
    /// Notified once the count reaches the target.
    pub done: std::sync::Arc<tokio::sync::Notify>,
}

impl HandledCounter {
    /// A counter that fires at `target` messages.
    pub fn new(target: usize) -> HandledCounter {
        HandledCounter {
            seen: std::sync::Arc::default(),
            target,
            done: std::sync::Arc::default(),
        }
    }

    /// How many were counted so far.
    pub fn seen(&self) -> usize {
        self.seen.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Counts `k` more messages.
    pub fn add(&self, k: usize) {
        use std::sync::atomic::Ordering;
        if self.seen.fetch_add(k, Ordering::AcqRel) + k >= self.target {
            self.done.notify_one();
        }
    }
}

/// What one handler call (a message, or a batch) of a bench waits for, like a database
/// round trip: `TIDEMILL_BENCH_CALL_US` microseconds (default 0: nothing).
pub async fn handler_call() {
    static CALL: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    let wait = *CALL.get_or_init(|| {
        std::time::Duration::from_micros(
            std::env::var("TIDEMILL_BENCH_CALL_US")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        )
    });
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}

/// A positive count from the environment variable `name` (e.g. `TIDEMILL_BENCH_MESSAGES`),
/// `default` when it is unset, empty, zero or not a number.
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// The broker address a bench reads from the environment variable `name`; `None` (after
/// printing why the bench skips, naming `make_target`) when it is unset or empty.
pub fn broker_address(name: &str, make_target: &str) -> Option<String> {
    let address = std::env::var(name).ok().filter(|u| !u.is_empty());
    if address.is_none() {
        eprintln!("SKIP: {name} is not set (run `make {make_target}`)");
    }
    address
}

/// CPU time used so far by every thread of this process, from
/// `/proc/self/task/*/schedstat` (Linux; `None` where unavailable). Less sensitive than
/// wall-clock time to other processes on a shared machine, and it counts what a scenario
/// costs even where a thread waits for another (e.g. a handler faster than its publisher).
pub fn process_cpu() -> Option<std::time::Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path().join("schedstat");
        // A thread may have ended since the directory was read.
        let Ok(stat) = std::fs::read_to_string(path) else {
            continue;
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(std::time::Duration::from_nanos(total))
}

/// The median of `values` (the mean of the two middle ones for an even count; NaN for
/// none): what the benches report over their rounds.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[mid],
        _ => (sorted[mid - 1] + sorted[mid]) / 2.0,
    }
}

/// Bytes as MiB for a bench's table, `n/a` where unknown.
pub fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(
        || "n/a".into(),
        |b| format!("{:.1}", b as f64 / 1_048_576.0),
    )
}

/// Appends `row` to the file named by [`REPORT_ENV`], when that variable is set. A bench
/// run by hand (variable unset) only prints its own table.
pub fn record(row: &Row) {
    let Some(path) = std::env::var_os(REPORT_ENV) else {
        return;
    };
    let line = match serde_json::to_string(row) {
        Ok(line) => line,
        Err(e) => {
            eprintln!("bench report: cannot encode {row:?}: {e}");
            return;
        }
    };
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        eprintln!(
            "bench report: cannot append to {}: {e}",
            path.to_string_lossy()
        );
    }
}
