//! What the router does with a failed message when no layer settled it: nack with a
//! growing delay, count it, and say so (rate-limited).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::message::Uuid;
use crate::{Backoff, HandlerInfo};

/// At most this many failures are logged one by one per handler and window.
const LOGGED_PER_WINDOW: u32 = 5;
/// The log window.
const WINDOW: Duration = Duration::from_secs(1);
/// How many uuids the router remembers per handler to count deliveries itself when the
/// broker reports no attempt (two generations of this size at most).
const REMEMBERED: usize = 10_000;

/// Counts of one handler's failures (see [`Router::handler_stats`](super::Router::handler_stats)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandlerStats {
    /// Messages whose handler returned an error.
    pub failed: u64,
    /// Messages whose handler panicked.
    pub panicked: u64,
    /// Messages whose output could not be published (or a consumer-only handler returned
    /// messages).
    pub publish_failed: u64,
    /// Messages nacked for redelivery (every failure above, unless a layer settled the
    /// input early).
    pub nacked: u64,
}

/// Why a message failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Handler,
    Panic,
    Publish,
}

impl Kind {
    /// The `kind` label of the failure metric.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Kind::Handler => "error",
            Kind::Panic => "panic",
            Kind::Publish => "publish",
        }
    }

    /// What failed, for tracers: `handler`, `panic` or `publish`.
    pub(crate) fn what(self) -> &'static str {
        match self {
            Kind::Handler => "handler",
            Kind::Panic => "panic",
            Kind::Publish => "publish",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Handler => "handler failed",
            Kind::Panic => "handler panicked",
            Kind::Publish => "publishing the handler's output failed",
        }
    }
}

/// One handler's failure bookkeeping; touched only when a message fails.
pub(crate) struct Failures {
    backoff: Backoff,
    failed: AtomicU64,
    panicked: AtomicU64,
    publish_failed: AtomicU64,
    nacked: AtomicU64,
    log: Mutex<LogWindow>,
    counts: Mutex<Counts>,
}

struct LogWindow {
    started: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// Failed deliveries per uuid, for brokers that report no attempt: two generations, so
/// memory stays bounded and the most recent failures are remembered.
#[derive(Default)]
struct Counts {
    current: HashMap<Box<str>, u32>,
    previous: HashMap<Box<str>, u32>,
}

impl Counts {
    /// Records one more failure of `uuid`; returns how many failures it had before.
    fn bump(&mut self, uuid: &str) -> u32 {
        let before = match self.current.get(uuid) {
            Some(n) => *n,
            None => self.previous.get(uuid).copied().unwrap_or(0),
        };
        if self.current.len() >= REMEMBERED && !self.current.contains_key(uuid) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(uuid.into(), before.saturating_add(1));
        before
    }
}

impl Failures {
    pub(crate) fn new(backoff: Backoff) -> Self {
        Failures {
            backoff,
            failed: AtomicU64::new(0),
            panicked: AtomicU64::new(0),
            publish_failed: AtomicU64::new(0),
            nacked: AtomicU64::new(0),
            log: Mutex::new(LogWindow {
                started: None,
                logged: 0,
                suppressed: 0,
            }),
            counts: Mutex::default(),
        }
    }

    pub(crate) fn stats(&self) -> HandlerStats {
        HandlerStats {
            failed: self.failed.load(Ordering::Relaxed),
            panicked: self.panicked.load(Ordering::Relaxed),
            publish_failed: self.publish_failed.load(Ordering::Relaxed),
            nacked: self.nacked.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn nacked(&self) {
        self.nacked.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failure of the delivery `attempt` (the broker's; the router counts itself
    /// when there is none) and works out its redelivery delay: the one a layer asked for,
    /// else the router's backoff for the attempt. Logs it, rate-limited.
    pub(crate) fn record(
        &self,
        info: &HandlerInfo,
        kind: Kind,
        uuid: &Uuid,
        attempt: Option<u32>,
        asked: Option<Duration>,
        error: &dyn fmt::Display,
    ) -> Duration {
        match kind {
            Kind::Handler => &self.failed,
            Kind::Panic => &self.panicked,
            Kind::Publish => &self.publish_failed,
        }
        .fetch_add(1, Ordering::Relaxed);
        if super::observe::metrics_enabled() {
            metrics::counter!(
                super::observe::names::FAILURES,
                "handler" => info.name.clone(),
                "topic" => info.topic.clone(),
                "kind" => kind.label(),
            )
            .increment(1);
        }
        let attempt = match attempt {
            Some(n) => n,
            None => self.counts.lock().bump(uuid.as_str()).saturating_add(1),
        };
        let delay = asked.unwrap_or_else(|| self.backoff.delay(attempt));
        if let Some(suppressed) = self.may_log() {
            if suppressed > 0 {
                emit(format_args!(
                    "handler `{}` (topic `{}`): {suppressed} more failures in the last {:?} \
                     were not logged one by one",
                    info.name, info.topic, WINDOW
                ));
            }
            tracing::error!(
                handler = %info.name,
                topic = %info.topic,
                uuid = uuid.as_str(),
                attempt,
                redeliver_in = ?delay,
                error = %error,
                "{}; nacking for redelivery",
                kind.describe()
            );
            if !tracing::dispatcher::has_been_set() {
                emit(format_args!(
                    "handler `{}` (topic `{}`): {} on message {} (delivery {attempt}): {error}; \
                     redelivering in {delay:?}",
                    info.name,
                    info.topic,
                    kind.describe(),
                    uuid.as_str()
                ));
            }
        }
        delay
    }

    /// Whether this failure may be logged; `Some(n)`: yes, and `n` failures were not
    /// logged in the window that just ended.
    fn may_log(&self) -> Option<u64> {
        let now = Instant::now();
        let mut log = self.log.lock();
        let expired = log
            .started
            .is_none_or(|started| now.duration_since(started) >= WINDOW);
        if expired {
            let suppressed = std::mem::take(&mut log.suppressed);
            log.started = Some(now);
            log.logged = 1;
            return Some(suppressed);
        }
        if log.logged < LOGGED_PER_WINDOW {
            log.logged += 1;
            return Some(0);
        }
        log.suppressed += 1;
        None
    }
}

/// A line for whoever watches: the tracing subscriber if the application set one, else
/// standard error (failures must be visible without any setup).
fn emit(line: fmt::Arguments<'_>) {
    if tracing::dispatcher::has_been_set() {
        tracing::warn!("{line}");
    } else {
        eprintln!("tidemill: {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_remember_recent_uuids_within_bounds() {
        let mut counts = Counts::default();
        assert_eq!(counts.bump("a"), 0);
        assert_eq!(counts.bump("a"), 1);
        for i in 0..REMEMBERED {
            counts.bump(&i.to_string());
        }
        // "a" moved to the previous generation and is still counted.
        assert_eq!(counts.bump("a"), 2);
        assert!(counts.current.len() + counts.previous.len() <= 2 * REMEMBERED);
    }

    #[test]
    fn logs_are_rate_limited_per_window() {
        let f = Failures::new(Backoff::redelivery());
        let allowed = (0..100).filter(|_| f.may_log().is_some()).count();
        assert_eq!(allowed, LOGGED_PER_WINDOW as usize);
        assert_eq!(f.log.lock().suppressed, 100 - u64::from(LOGGED_PER_WINDOW));
    }

    #[test]
    fn the_router_counts_attempts_when_the_broker_does_not() {
        let f = Failures::new(
            Backoff::new(Duration::from_millis(100)).max_interval(Duration::from_secs(30)),
        );
        let info = HandlerInfo {
            name: "h".into(),
            topic: "t".into(),
            group: None,
            publish_topic: None,
        };
        let uuid = Uuid::Given("u-1".into());
        let delays: Vec<_> = (0..4)
            .map(|_| f.record(&info, Kind::Handler, &uuid, None, None, &"boom"))
            .collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800].map(Duration::from_millis).to_vec()
        );
        // The broker's attempt wins; an asked-for delay wins over the backoff.
        assert_eq!(
            f.record(&info, Kind::Panic, &uuid, Some(3), None, &"boom"),
            Duration::from_millis(400)
        );
        assert_eq!(
            f.record(
                &info,
                Kind::Publish,
                &uuid,
                Some(3),
                Some(Duration::from_secs(7)),
                &"boom"
            ),
            Duration::from_secs(7)
        );
        let stats = f.stats();
        assert_eq!(
            (stats.failed, stats.panicked, stats.publish_failed),
            (4, 1, 1)
        );
    }
}
