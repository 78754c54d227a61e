//! Resilience: what the proxy does on its own so that one fragile worker,
//! one greedy tenant or one bad deploy does not become everyone's outage.
//!
//! | Mechanism | Module | Answer | Where |
//! |---|---|---|---|
//! | quotas by (tenant, capability) | [`ratelimit`] | 429 `rate-limited`, `Retry-After`, `RateLimit` | inbound (peer tenant), outbound (edge) |
//! | concurrency limit + bounded queue | [`shed`] | 503 `overloaded` / `queue-timeout`, `Retry-After` | inbound (the app), outbound (per route) |
//! | outlier detection | [`breaker`] | 503 `circuit-open`, `Retry-After` | outbound endpoints |
//! | request deadline | `request::resilience` | 504 `request-timeout` | outbound routes |
//! | retries under a budget | [`retry`] | the retried attempt's answer | outbound routes |
//! | `Idempotency-Key` | [`idempotency`] | the stored response, 409, 422 | inbound |
//! | fault injection | [`fault`] | delay, or the configured status | outbound routes |
//!
//! Each module is a state machine over plain data with paused-time unit
//! tests. [`quota`] builds each direction's limits from the config. The
//! request stages that call them are in `crate::request::resilience`.

pub mod breaker;
pub mod fault;
pub mod idempotency;
pub mod quota;
pub mod ratelimit;
pub mod retry;
pub mod shed;

use std::time::Duration;

/// Parses a quota rate (shared with the control plane's `quotas.yaml`).
pub use crank_api::resilience::parse_rate;

/// Whole seconds for `Retry-After`, rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        let ok: &[(&str, u32, u64)] = &[
            ("100/min", 100, 60),
            ("10/s", 10, 1),
            ("5000/h", 5000, 3600),
            (" 7 / second ", 7, 1),
            ("1/minute", 1, 60),
        ];
        for (s, n, secs) in ok {
            assert_eq!(parse_rate(s), Ok((*n, Duration::from_secs(*secs))), "{s}");
        }
        for bad in ["100", "x/min", "0/s", "5/day", "-1/s", ""] {
            let e = parse_rate(bad).unwrap_err();
            assert!(e.contains("N/s, N/min or N/h"), "{bad}: {e}");
        }
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(600)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(30)), 30);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
