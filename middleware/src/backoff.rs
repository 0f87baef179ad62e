//! Exponential backoff settings shared by [`Retry`](crate::Retry) and
//! [`DelayedRedelivery`](crate::DelayedRedelivery), computed by [`backon`].

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Exponential backoff: the first delay is `initial`, each next one `multiplier` times the
/// previous, never more than `max_interval`; with `jitter`, each delay is stretched by a
/// random amount of up to itself (so it lies in `[d, 2d)`), which spreads retries of many
/// consumers apart.
///
/// ```
/// use std::time::Duration;
/// use tidemill_middleware::Backoff;
///
/// let b = Backoff::new(Duration::from_millis(100))
///     .max_interval(Duration::from_millis(500))
///     .multiplier(3.0);
/// assert_eq!(b.delay(1), Duration::from_millis(100));
/// assert_eq!(b.delay(2), Duration::from_millis(300));
/// assert_eq!(b.delay(3), Duration::from_millis(500)); // capped
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max_interval: Duration,
    multiplier: f32,
    jitter: bool,
}

impl Default for Backoff {
    /// 100 ms, doubling, at most 10 s, no jitter.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max_interval: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: false,
        }
    }
}

impl Backoff {
    /// Starts at `initial`, doubling, at most 10 s (or `initial` if larger), no jitter.
    pub fn new(initial: Duration) -> Self {
        Backoff {
            initial,
            max_interval: Duration::from_secs(10).max(initial),
            ..Backoff::default()
        }
    }

    /// The largest delay.
    pub fn max_interval(mut self, max: Duration) -> Self {
        self.max_interval = max;
        self
    }

    /// Factor between consecutive delays (values below 1 are treated as 1).
    pub fn multiplier(mut self, multiplier: f32) -> Self {
        self.multiplier = multiplier.max(1.0);
        self
    }

    /// Randomly stretches each delay by up to itself.
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// The first delay.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The delay before retry number `n` (1 = the first retry), to the microsecond.
    pub fn delay(&self, n: u32) -> Duration {
        let n = n.max(1) as usize;
        let d = self
            .delays()
            .nth(n - 1)
            .unwrap_or(self.max_interval)
            .min(self.capped_max());
        // backon multiplies in f32: 100 ms × 3 comes out as 300.000012 ms.
        let micros = (d.as_nanos() + 500) / 1_000;
        Duration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX))
    }

    /// The endless sequence of delays.
    pub(crate) fn delays(&self) -> impl Iterator<Item = Duration> {
        self.builder().without_max_times().build()
    }

    fn builder(&self) -> ExponentialBuilder {
        let b = ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_max_delay(self.max_interval.max(self.initial))
            .with_factor(self.multiplier);
        if self.jitter {
            b.with_jitter()
        } else {
            b
        }
    }

    /// The largest delay `delay` returns (jitter can double the cap).
    fn capped_max(&self) -> Duration {
        let max = self.max_interval.max(self.initial);
        if self.jitter {
            max.saturating_mul(2)
        } else {
            max
        }
    }
}
