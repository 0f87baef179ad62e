//! Exponential backoff: the delays between redeliveries (router default, delayed
//! redelivery) and between in-process retries.

use std::time::Duration;

/// Exponential backoff: the first delay is `initial`, each next one `multiplier` times the
/// previous, never more than `max_interval`. With `jitter`, each delay is stretched by a
/// random amount of up to itself (so it lies in `[d, 2d)`, and never above twice the cap),
/// which spreads the retries of many consumers apart.
///
/// [`delay`](Backoff::delay) takes the same (constant) time for any attempt and saturates
/// at the cap.
///
/// ```
/// use std::time::Duration;
/// use tidemill_core::Backoff;
///
/// let b = Backoff::new(Duration::from_millis(100))
///     .max_interval(Duration::from_millis(500))
///     .multiplier(3.0);
/// assert_eq!(b.delay(1), Duration::from_millis(100));
/// assert_eq!(b.delay(2), Duration::from_millis(300));
/// assert_eq!(b.delay(3), Duration::from_millis(500)); // capped
/// assert_eq!(b.delay(u32::MAX), Duration::from_millis(500));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max_interval: Duration,
    multiplier: f64,
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

    /// The router's default for redelivering failed messages: 100 ms, doubling, at most
    /// 30 s, with jitter.
    pub fn redelivery() -> Self {
        Backoff::new(Duration::from_millis(100))
            .max_interval(Duration::from_secs(30))
            .jitter(true)
    }

    /// The largest delay (before jitter).
    pub fn max_interval(mut self, max: Duration) -> Self {
        self.max_interval = max;
        self
    }

    /// Factor between consecutive delays (values below 1, and NaN, are treated as 1).
    pub fn multiplier(mut self, multiplier: f32) -> Self {
        self.multiplier = if multiplier >= 1.0 {
            f64::from(multiplier)
        } else {
            1.0
        };
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

    /// The cap (before jitter).
    pub fn max(&self) -> Duration {
        self.max_interval.max(self.initial)
    }

    /// Whether delays are jittered.
    pub fn is_jittered(&self) -> bool {
        self.jitter
    }

    /// The delay before retry number `n` (1 = the first retry; 0 counts as 1), to the
    /// microsecond. Constant time for any `n`.
    pub fn delay(&self, n: u32) -> Duration {
        let base = self.base(n);
        let d = if self.jitter {
            base + base.mul_f64(fastrand::f64())
        } else {
            base
        };
        let micros = (d.as_nanos() + 500) / 1_000;
        Duration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX))
    }

    /// The delay before jitter: `initial × multiplier^(n-1)`, capped.
    fn base(&self, n: u32) -> Duration {
        let max = self.max();
        let exponent = n.max(1) - 1;
        if exponent == 0 || self.multiplier == 1.0 {
            return self.initial.min(max);
        }
        // powi saturates to infinity for large exponents; anything past the cap is the cap.
        let exponent = i32::try_from(exponent).unwrap_or(i32::MAX);
        let factor = self.multiplier.powi(exponent);
        let secs = self.initial.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= max.as_secs_f64() {
            return max;
        }
        Duration::from_secs_f64(secs).min(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_saturate() {
        let b = Backoff::new(Duration::from_millis(100)).max_interval(Duration::from_secs(30));
        let got: Vec<u128> = (1..=10).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(
            got,
            vec![100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000]
        );
        assert_eq!(b.delay(0), Duration::from_millis(100));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(30));
        assert_eq!(b.delay(1_000_000_000), Duration::from_secs(30));
    }

    #[test]
    fn any_attempt_is_computed_at_once() {
        let b = Backoff::redelivery();
        let started = std::time::Instant::now();
        for n in [u32::MAX, u32::MAX - 1, 1 << 31, 1_000_000_000] {
            let d = b.delay(n);
            assert!(
                d >= Duration::from_secs(30) && d < Duration::from_secs(60),
                "{d:?}"
            );
        }
        // Four calls; a loop over n would take seconds (the old implementation: 4.8 s for 1e9).
        assert!(started.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn jitter_stays_within_twice_the_delay() {
        let b = Backoff::new(Duration::from_millis(10)).jitter(true);
        for n in 1..50 {
            let base = Backoff::new(Duration::from_millis(10)).delay(n);
            let d = b.delay(n);
            assert!(d >= base && d <= base * 2, "{n}: {d:?} vs {base:?}");
        }
    }

    #[test]
    fn multiplier_below_one_and_nan_mean_constant() {
        for m in [0.5, f32::NAN, 1.0] {
            let b = Backoff::new(Duration::from_millis(7)).multiplier(m);
            assert_eq!(b.delay(5), Duration::from_millis(7));
        }
    }

    #[test]
    fn a_cap_below_the_initial_delay_is_the_initial_delay() {
        let b = Backoff::new(Duration::from_secs(2)).max_interval(Duration::from_secs(1));
        assert_eq!(b.delay(1), Duration::from_secs(2));
        assert_eq!(b.delay(9), Duration::from_secs(2));
    }
}
