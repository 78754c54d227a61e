//! When the identity agent acts: the renewal time and the retry backoff.
//! Pure functions of the certificate's validity, the config and a random
//! number, so they are tested without clocks.

use std::time::Duration;

use crank_plumbing::backoff::{Attempts, Backoff, Jitter};

/// The most jitter taken off the renewal time, as a share of the lifetime.
pub const MAX_JITTER: f64 = 0.1;

/// Unix time to renew a certificate valid from `not_before` to
/// `not_after`: `renew_at` of the lifetime, minus `jitter` (0.0..1.0) times
/// 10% of the lifetime, so replicas enrolled together do not renew together.
pub fn renewal_at(not_before: i64, not_after: i64, renew_at: f64, jitter: f64) -> i64 {
    let life = (not_after - not_before).max(0) as f64;
    let offset = renew_at * life - jitter.clamp(0.0, 1.0) * MAX_JITTER * life;
    not_before + offset.max(0.0) as i64
}

/// The backoff of calls to crank-control: `base`, doubling to `max`, each
/// delay drawn from the upper half of its step (crank-plumbing's equal
/// jitter), so replicas that failed together do not retry together.
pub fn backoff(base: Duration, max: Duration) -> Attempts {
    Backoff::new(base, max, Jitter::Equal).attempts()
}

/// The wait before the next renewal attempt after a failure: the backoff,
/// but never past the certificate's expiry (one more try just before it);
/// once expired, every 60 s.
pub fn renew_retry_delay(backoff: Duration, now: i64, not_after: i64) -> Duration {
    if now >= not_after {
        return Duration::from_secs(60);
    }
    backoff.min(Duration::from_secs((not_after - now) as u64))
}

/// Seconds from `now` to `at` (0 when past).
pub fn until(at: i64, now: i64) -> Duration {
    Duration::from_secs((at - now).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_time_is_the_fraction_minus_jitter() {
        // 1000 s lifetime from t=10_000, renew at 0.66.
        assert_eq!(renewal_at(10_000, 11_000, 0.66, 0.0), 10_660);
        assert_eq!(renewal_at(10_000, 11_000, 0.66, 1.0), 10_560);
        assert_eq!(renewal_at(10_000, 11_000, 0.66, 0.5), 10_610);
        // jitter outside 0..1 is clamped
        assert_eq!(renewal_at(10_000, 11_000, 0.66, 7.0), 10_560);
        // the earliest is still after not_before
        assert_eq!(renewal_at(10_000, 11_000, 0.1, 1.0), 10_000);
        // a 24h cert at the default renews between 13.44h and 15.84h
        for j in [0.0, 0.25, 0.999] {
            let t = renewal_at(0, 86_400, 0.66, j);
            assert!((48_384..=57_024).contains(&t), "{t}");
        }
        // a degenerate cert renews at once
        assert_eq!(renewal_at(5, 5, 0.66, 0.3), 5);
        assert_eq!(renewal_at(5, 1, 0.66, 0.3), 5);
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        let mut b = backoff(Duration::from_secs(1), Duration::from_secs(60));
        let tops: Vec<u64> = (0..9).map(|_| b.next_delay_with(1.0).as_secs()).collect();
        assert_eq!(tops, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        b.reset();
        assert_eq!(b.next_delay_with(0.0), Duration::from_millis(500));
        assert_eq!(b.next_delay_with(0.0), Duration::from_secs(1));
        for _ in 0..100 {
            b.next_delay_with(0.3);
        }
        let d = b.next_delay_with(0.0);
        assert_eq!(d, Duration::from_secs(30), "half of the cap at least");
    }

    #[test]
    fn retry_never_sleeps_past_expiry() {
        let b = Duration::from_secs(60);
        assert_eq!(renew_retry_delay(b, 100, 1000), b);
        assert_eq!(renew_retry_delay(b, 990, 1000), Duration::from_secs(10));
        assert_eq!(
            renew_retry_delay(Duration::from_secs(2), 999, 1000),
            Duration::from_secs(1)
        );
        assert_eq!(
            renew_retry_delay(Duration::from_secs(1), 1000, 1000),
            Duration::from_secs(60)
        );
        assert_eq!(
            renew_retry_delay(Duration::from_secs(1), 5000, 1000),
            Duration::from_secs(60)
        );
    }
}
