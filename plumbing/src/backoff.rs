//! One exponential backoff with an explicit jitter rule.
//!
//! The delay of attempt `n` (0-based) is `min(max, base · 2ⁿ)`, then the
//! [`Jitter`] rule spreads it with a random draw in `[0, 1)`. The draw is a
//! parameter ([`Backoff::delay`], [`Attempts::next_delay_with`]) so that tables of
//! tests can pin it; [`Attempts::next_delay`] draws from `rand`.

use std::time::Duration;

/// How a delay is spread so that many clients do not retry in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly the exponential delay (for accept errors: no crowd to spread).
    None,
    /// Uniform in `[0, d]`: the widest spread (retries of requests).
    Full,
    /// Uniform in `[d/2, d]`: spread, but never much sooner than planned
    /// (reconnects to the control plane).
    Equal,
}

/// `base · 2ⁿ`, capped at `max`, spread by `jitter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    pub jitter: Jitter,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration, jitter: Jitter) -> Self {
        Backoff { base, max, jitter }
    }

    /// The wait after a failed `accept`: 10 ms doubling to 1 s, no jitter.
    pub const ACCEPT: Backoff = Backoff::new(
        Duration::from_millis(10),
        Duration::from_secs(1),
        Jitter::None,
    );

    /// The delay before attempt `attempt` (0-based), with `draw` in
    /// `[0, 1)` (clamped) as the random part.
    pub fn delay(&self, attempt: u32, draw: f64) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        let draw = if draw.is_nan() {
            0.0
        } else {
            draw.clamp(0.0, 1.0)
        };
        match self.jitter {
            Jitter::None => step,
            Jitter::Full => step.mul_f64(draw),
            Jitter::Equal => step.mul_f64(0.5 + 0.5 * draw),
        }
    }

    /// A counter of attempts that starts at 0.
    pub fn attempts(&self) -> Attempts {
        Attempts {
            backoff: *self,
            attempt: 0,
        }
    }
}

/// A [`Backoff`] with its attempt count: each [`Attempts::next_delay`] doubles,
/// [`Attempts::reset`] starts over after a success.
#[derive(Debug, Clone)]
pub struct Attempts {
    backoff: Backoff,
    attempt: u32,
}

impl Attempts {
    /// The next delay, with a random draw.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(rand::random::<f64>())
    }

    /// The next delay, with `draw` in `[0, 1)` as the random part.
    pub fn next_delay_with(&mut self, draw: f64) -> Duration {
        let d = self.backoff.delay(self.attempt, draw);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// After a success: the next delay is `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many delays were handed out since the last reset.
    pub fn count(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn delays_by_rule_attempt_and_draw() {
        let b = |jitter| Backoff::new(MS(100), MS(1000), jitter);
        let cases = [
            (Jitter::None, 0, 0.7, MS(100)),
            (Jitter::None, 1, 0.7, MS(200)),
            (Jitter::None, 3, 0.7, MS(800)),
            (Jitter::None, 4, 0.7, MS(1000)),
            (Jitter::None, 63, 0.7, MS(1000)),
            (Jitter::Full, 0, 0.0, MS(0)),
            (Jitter::Full, 1, 0.5, MS(100)),
            (Jitter::Full, 9, 0.25, MS(250)),
            (Jitter::Full, 2, 7.0, MS(400)),
            (Jitter::Full, 2, -1.0, MS(0)),
            (Jitter::Full, 2, f64::NAN, MS(0)),
            (Jitter::Equal, 0, 0.0, MS(50)),
            (Jitter::Equal, 2, 1.0, MS(400)),
            (Jitter::Equal, 2, 0.5, MS(300)),
        ];
        for (jitter, attempt, draw, want) in cases {
            assert_eq!(
                b(jitter).delay(attempt, draw),
                want,
                "{jitter:?} attempt {attempt} draw {draw}"
            );
        }
    }

    #[test]
    fn attempts_double_then_reset() {
        let mut a = Backoff::ACCEPT.attempts();
        let got: Vec<_> = (0..9).map(|_| a.next_delay()).collect();
        let want = [10, 20, 40, 80, 160, 320, 640, 1000, 1000].map(MS);
        assert_eq!(got, want);
        assert_eq!(a.count(), 9);
        a.reset();
        assert_eq!(a.next_delay_with(0.3), MS(10));
    }

    #[test]
    fn random_draws_stay_in_the_window() {
        let mut a = Backoff::new(MS(100), MS(100), Jitter::Equal).attempts();
        for _ in 0..200 {
            let d = a.next_delay();
            assert!(d >= MS(50) && d <= MS(100), "{d:?}");
        }
    }
}
