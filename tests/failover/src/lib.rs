//! Multi-process failover harness: what the consumer and producer processes record, and
//! the report made of it.
//!
//! Each consumer process appends one line per handled message to its own file and syncs
//! it before the message is acked (`id key seq nanos pid`); the producer appends the ids
//! the broker confirmed (`id key seq`). [`Report::read`] counts, by message id: confirmed,
//! handled, lost (confirmed but never handled), duplicates (handled more than once) and
//! per-key order violations (a message whose first handling came after the first handling
//! of a later message of the same key), and the longest gap without progress.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// One handled message as a consumer recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handled {
    /// Message id.
    pub id: String,
    /// Ordering key.
    pub key: String,
    /// Sequence number within the key.
    pub seq: u64,
    /// Wall-clock nanoseconds since the Unix epoch when it was handled.
    pub at: u128,
    /// The consumer process.
    pub pid: u32,
}

/// What a run came to.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Messages the broker confirmed to the producer.
    pub confirmed: usize,
    /// Distinct messages handled.
    pub handled: usize,
    /// Confirmed messages never handled.
    pub lost: Vec<String>,
    /// Handlings beyond the first, summed over messages.
    pub duplicates: usize,
    /// Messages first handled after a later message of their key.
    pub order_violations: usize,
    /// The longest time between two consecutive first handlings.
    pub longest_gap: Duration,
    /// Handlings per consumer process.
    pub per_process: BTreeMap<u32, usize>,
}

impl Report {
    /// Reads the producer's file and every consumer file.
    pub fn read(confirmed: &Path, handled: &[impl AsRef<Path>]) -> std::io::Result<Report> {
        let confirmed_ids = read_lines(confirmed)?
            .into_iter()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect::<Vec<_>>();
        let mut all = Vec::new();
        for file in handled {
            for line in read_lines(file.as_ref())? {
                if let Some(h) = parse_handled(&line) {
                    all.push(h);
                }
            }
        }
        Ok(Report::of(&confirmed_ids, all))
    }

    /// The report for these confirmed ids and handlings.
    pub fn of(confirmed: &[String], mut handled: Vec<Handled>) -> Report {
        handled.sort_by_key(|h| h.at);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        let mut per_process = BTreeMap::new();
        let mut last_seq: HashMap<&str, u64> = HashMap::new();
        let mut order_violations = 0;
        let mut longest_gap = Duration::ZERO;
        let mut previous_first: Option<u128> = None;
        for h in &handled {
            *per_process.entry(h.pid).or_insert(0) += 1;
            let n = counts.entry(h.id.as_str()).or_insert(0);
            *n += 1;
            if *n > 1 {
                continue;
            }
            if let Some(prev) = previous_first {
                let gap = Duration::from_nanos(u64::try_from(h.at - prev).unwrap_or(u64::MAX));
                longest_gap = longest_gap.max(gap);
            }
            previous_first = Some(h.at);
            match last_seq.get(h.key.as_str()) {
                Some(&last) if last > h.seq => order_violations += 1,
                _ => {
                    last_seq.insert(h.key.as_str(), h.seq);
                }
            }
        }
        let handled_ids: HashSet<&str> = counts.keys().copied().collect();
        let lost = confirmed
            .iter()
            .filter(|id| !handled_ids.contains(id.as_str()))
            .cloned()
            .collect();
        Report {
            confirmed: confirmed.len(),
            handled: counts.len(),
            lost,
            duplicates: counts.values().map(|n| n - 1).sum(),
            order_violations,
            longest_gap,
            per_process,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "confirmed {}, handled {}, lost {}, duplicates {}, per-key order violations {}, \
             longest gap {:?}, per process {:?}",
            self.confirmed,
            self.handled,
            self.lost.len(),
            self.duplicates,
            self.order_violations,
            self.longest_gap,
            self.per_process
        )
    }
}

/// One line of a consumer file: `id key seq nanos pid`.
pub fn parse_handled(line: &str) -> Option<Handled> {
    let mut parts = line.split_whitespace();
    Some(Handled {
        id: parts.next()?.to_owned(),
        key: parts.next()?.to_owned(),
        seq: parts.next()?.parse().ok()?,
        at: parts.next()?.parse().ok()?,
        pid: parts.next()?.parse().ok()?,
    })
}

fn read_lines(path: &Path) -> std::io::Result<Vec<String>> {
    match std::fs::read_to_string(path) {
        // A process killed mid-line leaves a partial last line: parse what is whole.
        Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(id: &str, key: &str, seq: u64, at: u128) -> Handled {
        Handled {
            id: id.into(),
            key: key.into(),
            seq,
            at,
            pid: 1,
        }
    }

    #[test]
    fn counts_lost_duplicates_and_order() {
        let confirmed: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let r = Report::of(
            &confirmed,
            vec![
                h("a", "k", 1, 10),
                h("c", "k", 3, 20),
                h("b", "k", 2, 30), // after c: a violation
                h("a", "k", 1, 40), // a duplicate, not a violation
            ],
        );
        assert_eq!(r.handled, 3);
        assert_eq!(r.lost, vec!["d".to_owned()]);
        assert_eq!(r.duplicates, 1);
        assert_eq!(r.order_violations, 1);
        assert_eq!(r.longest_gap, Duration::from_nanos(10));
    }
}
