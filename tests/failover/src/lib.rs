//! Multi-process failover harness: what the consumer and producer processes record, and
//! the report made of it.
//!
//! Each consumer process appends one line per handled message to its own file and syncs
//! it before the message is acked (`id key seq nanos pid`); the producer appends the
//! messages the broker confirmed (`id key seq nanos`, the time of the confirmation).
//! [`Report::read`] counts, by message id: confirmed, handled, lost (confirmed but never
//! handled), duplicates (handled more than once) and per-key order violations (a message
//! whose first handling came after the first handling of a later message of the same key),
//! and measures the longest gap without progress, the longest wait of a message (from its
//! confirmation to its first handling) and, for an event such as a kill, how long the keys
//! it concerned waited until they made progress again ([`Report::recovery_after`]).
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

/// One message the broker confirmed to the producer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confirmed {
    /// Message id.
    pub id: String,
    /// Ordering key.
    pub key: String,
    /// Wall-clock nanoseconds since the Unix epoch when the publish returned (0 if the
    /// line does not say).
    pub at: u128,
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
    /// The longest time from a message's confirmation to its first handling.
    pub max_wait: Duration,
    /// The message that waited longest.
    pub slowest: Option<String>,
    /// The confirmed messages.
    confirmed_messages: Vec<Confirmed>,
    /// First handling of each message id: (time, pid).
    first: HashMap<String, (u128, u32)>,
    /// Every handling, ordered by time.
    handlings: Vec<Handled>,
}

impl Report {
    /// Reads the producer's file and every consumer file.
    pub fn read(confirmed: &Path, handled: &[impl AsRef<Path>]) -> std::io::Result<Report> {
        let confirmed = read_lines(confirmed)?
            .iter()
            .filter_map(|l| parse_confirmed(l))
            .collect::<Vec<_>>();
        let mut all = Vec::new();
        for file in handled {
            for line in read_lines(file.as_ref())? {
                if let Some(h) = parse_handled(&line) {
                    all.push(h);
                }
            }
        }
        Ok(Report::of(confirmed, all))
    }

    /// The report for these confirmed messages and handlings.
    pub fn of(confirmed: Vec<Confirmed>, mut handled: Vec<Handled>) -> Report {
        handled.sort_by_key(|h| h.at);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        let mut first: HashMap<String, (u128, u32)> = HashMap::new();
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
            first.insert(h.id.clone(), (h.at, h.pid));
            if let Some(prev) = previous_first {
                longest_gap = longest_gap.max(nanos(h.at.saturating_sub(prev)));
            }
            previous_first = Some(h.at);
            match last_seq.get(h.key.as_str()) {
                Some(&last) if last > h.seq => order_violations += 1,
                _ => {
                    last_seq.insert(h.key.as_str(), h.seq);
                }
            }
        }
        let mut lost = Vec::new();
        let mut max_wait = Duration::ZERO;
        let mut slowest = None;
        for c in &confirmed {
            match first.get(&c.id) {
                None => lost.push(c.id.clone()),
                Some(&(at, _)) if c.at > 0 => {
                    let wait = nanos(at.saturating_sub(c.at));
                    if wait > max_wait {
                        max_wait = wait;
                        slowest = Some(c.id.clone());
                    }
                }
                Some(_) => {}
            }
        }
        let duplicates = counts.values().map(|n| n - 1).sum();
        let handled_count = counts.len();
        Report {
            confirmed: confirmed.len(),
            handled: handled_count,
            lost,
            duplicates,
            order_violations,
            longest_gap,
            per_process,
            max_wait,
            slowest,
            confirmed_messages: confirmed,
            first,
            handlings: handled,
        }
    }

    /// How long after `event` (wall-clock nanoseconds since the Unix epoch) the keys that
    /// process `pid` had handled before it (every key when `pid` is `None`) made progress
    /// again: for each such key with a message not handled by `event`, the time from
    /// `event` (or from that message's confirmation, if later) until the key's next first
    /// handling; the longest of these. `None` when such a message was never handled (the
    /// key did not recover), `Some(ZERO)` when no key had anything left.
    pub fn recovery_after(&self, event: u128, pid: Option<u32>) -> Option<Duration> {
        let keys: HashSet<&str> = match pid {
            Some(pid) => self
                .handlings
                .iter()
                .filter(|h| h.pid == pid && h.at <= event)
                .map(|h| h.key.as_str())
                .collect(),
            None => self
                .confirmed_messages
                .iter()
                .map(|c| c.key.as_str())
                .collect(),
        };
        // Per key, the first message (in confirmation order) not first-handled by `event`.
        let mut waiting: HashMap<&str, &Confirmed> = HashMap::new();
        for c in &self.confirmed_messages {
            if !keys.contains(c.key.as_str()) || waiting.contains_key(c.key.as_str()) {
                continue;
            }
            match self.first.get(&c.id) {
                Some(&(at, _)) if at <= event => {}
                _ => {
                    waiting.insert(c.key.as_str(), c);
                }
            }
        }
        // Per key, its first handling after `event`.
        let mut progress: HashMap<&str, u128> = HashMap::new();
        for h in &self.handlings {
            if h.at > event
                && waiting.contains_key(h.key.as_str())
                && self.first.get(&h.id).is_some_and(|&(at, _)| at == h.at)
            {
                progress.entry(h.key.as_str()).or_insert(h.at);
            }
        }
        let mut longest = Duration::ZERO;
        for (key, c) in waiting {
            let at = progress.get(key)?;
            longest = longest.max(nanos(at.saturating_sub(event.max(c.at))));
        }
        Some(longest)
    }
}

fn nanos(n: u128) -> Duration {
    Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "confirmed {}, handled {}, lost {}, duplicates {}, per-key order violations {}, \
             longest gap {:.1?}, longest wait {:.1?} ({}), per process {:?}",
            self.confirmed,
            self.handled,
            self.lost.len(),
            self.duplicates,
            self.order_violations,
            self.longest_gap,
            self.max_wait,
            self.slowest.as_deref().unwrap_or("-"),
            self.per_process
        )
    }
}

/// One line of the producer's file: `id key seq [nanos]`.
pub fn parse_confirmed(line: &str) -> Option<Confirmed> {
    let mut parts = line.split_whitespace();
    let id = parts.next()?.to_owned();
    let key = parts.next()?.to_owned();
    let _seq = parts.next()?;
    let at = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    Some(Confirmed { id, key, at })
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

    fn h(id: &str, key: &str, seq: u64, at: u128, pid: u32) -> Handled {
        Handled {
            id: id.into(),
            key: key.into(),
            seq,
            at,
            pid,
        }
    }

    fn c(id: &str, key: &str, at: u128) -> Confirmed {
        Confirmed {
            id: id.into(),
            key: key.into(),
            at,
        }
    }

    #[test]
    fn counts_lost_duplicates_and_order() {
        let confirmed = vec![
            c("a", "k", 5),
            c("b", "k", 6),
            c("c", "k", 7),
            c("d", "k", 8),
        ];
        let r = Report::of(
            confirmed,
            vec![
                h("a", "k", 1, 10, 1),
                h("c", "k", 3, 20, 1),
                h("b", "k", 2, 30, 1), // after c: a violation
                h("a", "k", 1, 40, 1), // a duplicate, not a violation
            ],
        );
        assert_eq!(r.handled, 3);
        assert_eq!(r.lost, vec!["d".to_owned()]);
        assert_eq!(r.duplicates, 1);
        assert_eq!(r.order_violations, 1);
        assert_eq!(r.longest_gap, Duration::from_nanos(10));
        assert_eq!(r.max_wait, Duration::from_nanos(24)); // b: confirmed 6, handled 30
        assert_eq!(r.slowest.as_deref(), Some("b"));
    }

    #[test]
    fn recovery_is_measured_on_the_keys_of_the_killed_process() {
        // Process 1 handles key x, process 2 key y; process 1 is killed at 100; x's next
        // message (confirmed at 90) is handled at 150 by process 3, y goes on at 105.
        let confirmed = vec![
            c("x1", "x", 10),
            c("y1", "y", 10),
            c("x2", "x", 90),
            c("y2", "y", 95),
            c("x3", "x", 120),
        ];
        let handled = vec![
            h("x1", "x", 1, 20, 1),
            h("y1", "y", 1, 20, 2),
            h("y2", "y", 2, 105, 2),
            h("x2", "x", 2, 150, 3),
            h("x3", "x", 3, 160, 3),
        ];
        let r = Report::of(confirmed.clone(), handled.clone());
        assert_eq!(
            r.recovery_after(100, Some(1)),
            Some(Duration::from_nanos(50))
        );
        assert_eq!(r.recovery_after(100, None), Some(Duration::from_nanos(50)));
        assert_eq!(
            r.recovery_after(100, Some(2)),
            Some(Duration::from_nanos(5))
        );
        // x3, confirmed before 155, waits from the event to 160.
        assert_eq!(r.recovery_after(155, None), Some(Duration::from_nanos(5)));
        // A message confirmed after the event waits from its confirmation: z1 from 130.
        let r2 = Report::of(
            vec![c("z0", "z", 10), c("z1", "z", 130)],
            vec![h("z0", "z", 1, 20, 2), h("z1", "z", 2, 140, 4)],
        );
        assert_eq!(
            r2.recovery_after(100, Some(2)),
            Some(Duration::from_nanos(10))
        );
        // Nothing left after everything was handled.
        assert_eq!(r.recovery_after(200, None), Some(Duration::ZERO));
        // x2 never handled: x did not recover.
        let r = Report::of(
            confirmed,
            handled
                .into_iter()
                .filter(|h| h.key != "x" || h.seq == 1)
                .collect(),
        );
        assert_eq!(r.recovery_after(100, Some(1)), None);
    }

    #[test]
    fn producer_lines_without_a_time_still_count() {
        assert_eq!(parse_confirmed("m-1 k1 3"), Some(c("m-1", "k1", 0)));
        assert_eq!(parse_confirmed("m-1 k1 3 77"), Some(c("m-1", "k1", 77)));
        assert_eq!(parse_confirmed("m-1"), None);
    }
}
