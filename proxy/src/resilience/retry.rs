//! Retries: which failures may be retried, how long to back off, and the
//! budget that keeps retries from multiplying an outage.
//!
//! - A failure before anything was sent (connect, TLS) is retried for any
//!   method, on an endpoint this request has not tried: the upstream never
//!   saw the request, and the same endpoint would refuse it again.
//! - Otherwise the request must be safe to send twice: an idempotent method
//!   (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) or a route marked
//!   `idempotent: true`; and its body must still be held (Pingora keeps the
//!   first 64 KiB of a request body for this; a larger body is not retried).
//! - Retries go to another endpoint when one can take them, after a capped
//!   exponential backoff with full jitter (25 ms, 50 ms, ... up to 250 ms by
//!   default, as Envoy).
//! - The budget (tower's `TpsBudget`, the Finagle/Linkerd design): each
//!   request deposits, each retry withdraws; retries may add `budget_ratio`
//!   of the requests seen over `budget_window`, plus
//!   `budget_min_per_second`. When it is spent, the failure goes back to
//!   the caller and `crank_retry_budget_exhausted_total` counts it.

use std::time::Duration;

use crank_api::proxy::{RetryConfig, RetryOn};
use tower::retry::budget::{Budget as _, TpsBudget};

/// A failed upstream attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Connect, TLS or refused stream: nothing reached the upstream.
    Connect,
    /// The connection reset or closed before a response.
    Reset,
    /// The upstream answered with this status.
    Status(u16),
    /// The request's deadline passed.
    Timeout,
}

impl Failure {
    /// The `reason` label of `crank_retries_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Connect => "connect-failure",
            Failure::Reset => "reset",
            Failure::Status(s) if (502..=504).contains(&s) => "gateway-error",
            Failure::Status(_) => "5xx",
            Failure::Timeout => "timeout",
        }
    }
}

/// Whether the route's retry policy covers this failure for this request.
/// `safe`: the method is idempotent or the route is marked idempotent.
pub fn covers(cfg: &RetryConfig, safe: bool, failure: Failure) -> bool {
    if cfg.attempts == 0 {
        return false;
    }
    match failure {
        Failure::Connect => true,
        Failure::Timeout => false,
        Failure::Reset => safe && cfg.on.contains(&RetryOn::Reset),
        Failure::Status(s) => {
            safe && ((cfg.on.contains(&RetryOn::GatewayError) && (502..=504).contains(&s))
                || (cfg.on.contains(&RetryOn::FiveXx) && s >= 500))
        }
    }
}

/// An upstream failure that is about one request, not about the endpoint:
/// never counted against the endpoint's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRefusal {
    /// The peer reset the request's stream with `PROTOCOL_ERROR` (a header
    /// list or value HTTP/2 does not allow), or the local HTTP/2 client
    /// would not send it: the same request fails everywhere, so it is not
    /// retried either.
    Malformed,
    /// The peer reset the stream with `REFUSED_STREAM` (too many streams,
    /// an oversized header block), or the local HTTP/2 client failed before
    /// sending: nothing was processed, so the request may go elsewhere.
    Refused,
}

/// What an HTTP/2 error on one stream says, from its parts (see
/// [`peer_refusal`]): `reset` and `remote` as `h2::Error` reports them, and
/// whether it was an I/O error or a GOAWAY (connection-level: the endpoint's
/// business).
pub fn classify_h2(
    reset: bool,
    remote: bool,
    io: bool,
    go_away: bool,
    reason: Option<h2::Reason>,
) -> Option<PeerRefusal> {
    match (reset, remote, io, go_away, reason) {
        (true, true, _, _, Some(h2::Reason::PROTOCOL_ERROR)) => Some(PeerRefusal::Malformed),
        (true, true, _, _, Some(h2::Reason::REFUSED_STREAM)) => Some(PeerRefusal::Refused),
        // A local error of the h2 client (a stream id overflow on a long
        // pooled connection, say): not the peer's doing, nothing was sent.
        (false, false, false, false, None) => Some(PeerRefusal::Refused),
        _ => None,
    }
}

/// The [`PeerRefusal`] an upstream error carries, if it is one.
pub fn peer_refusal(e: &pingora_error::Error) -> Option<PeerRefusal> {
    let h2e = e.root_cause().downcast_ref::<h2::Error>()?;
    classify_h2(
        h2e.is_reset(),
        h2e.is_remote(),
        h2e.is_io(),
        h2e.is_go_away(),
        h2e.reason(),
    )
}

/// Whether a peer's `x-crank-error` says it shed the request: the sidecar's
/// concurrency limit or queue timeout, or a worker shim that is not taking
/// work now (job queue full, draining, worker not ready yet or draining). A
/// load signal, not a failure: retried elsewhere, never counted toward
/// ejection.
pub fn is_shedding(crank_error: &[u8]) -> bool {
    matches!(
        crank_error,
        b"overloaded"
            | b"queue-timeout"
            | b"queue-full"
            | b"draining"
            | b"worker-not-ready"
            | b"worker-draining"
    )
}

/// Backoff before retry number `n` (1-based): uniform in
/// `[0, min(max, base * 2^(n-1))]` (full jitter).
pub fn backoff(cfg: &RetryConfig, n: u32, draw: f64) -> Duration {
    let exp = cfg
        .backoff_base
        .saturating_mul(1u32 << n.saturating_sub(1).min(20));
    exp.min(cfg.backoff_max).mul_f64(draw.clamp(0.0, 1.0))
}

/// The retry budget of one route.
pub struct Budget(TpsBudget);

impl Budget {
    pub fn new(cfg: &RetryConfig) -> Self {
        let window = cfg
            .budget_window
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        Budget(TpsBudget::new(
            window,
            cfg.budget_min_per_second,
            cfg.budget_ratio.clamp(0.0, 1000.0),
        ))
    }

    /// Each request (not each retry) adds to the budget.
    pub fn deposit(&self) {
        self.0.deposit();
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        self.0.withdraw()
    }
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Budget")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_table() {
        let d = RetryConfig::default();
        let five = RetryConfig {
            on: vec![RetryOn::FiveXx],
            ..RetryConfig::default()
        };
        let off = RetryConfig {
            attempts: 0,
            ..RetryConfig::default()
        };
        use Failure::*;
        let cases: &[(&RetryConfig, bool, Failure, bool)] = &[
            (&d, false, Connect, true),
            (&d, true, Connect, true),
            (&d, true, Reset, true),
            (&d, false, Reset, false),
            (&d, true, Status(503), true),
            (&d, true, Status(502), true),
            (&d, false, Status(503), false),
            (&d, true, Status(500), false),
            (&d, true, Status(429), false),
            (&d, true, Timeout, false),
            (&five, true, Status(500), true),
            (&five, true, Reset, false),
            (&five, true, Status(404), false),
            (&off, true, Connect, false),
            (&off, true, Status(503), false),
        ];
        for (cfg, safe, f, want) in cases {
            assert_eq!(
                covers(cfg, *safe, *f),
                *want,
                "{f:?} safe={safe} on={:?}",
                cfg.on
            );
        }
    }

    #[test]
    fn shedding_is_a_load_signal() {
        assert!(is_shedding(b"overloaded"));
        assert!(is_shedding(b"queue-timeout"));
        assert!(is_shedding(b"queue-full"));
        assert!(is_shedding(b"worker-not-ready"));
        assert!(!is_shedding(b"upstream-connect-failed"));
        assert!(!is_shedding(b"circuit-open"));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let d = RetryConfig::default();
        assert_eq!(backoff(&d, 1, 1.0), Duration::from_millis(25));
        assert_eq!(backoff(&d, 2, 1.0), Duration::from_millis(50));
        assert_eq!(backoff(&d, 4, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(&d, 5, 1.0), Duration::from_millis(250));
        assert_eq!(backoff(&d, 40, 1.0), Duration::from_millis(250));
        assert_eq!(backoff(&d, 3, 0.5), Duration::from_millis(50));
        assert_eq!(backoff(&d, 3, 0.0), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_allows_the_ratio_plus_the_floor_and_refills() {
        let cfg = RetryConfig {
            budget_ratio: 0.2,
            budget_min_per_second: 1,
            budget_window: Duration::from_secs(10),
            ..RetryConfig::default()
        };
        let b = Budget::new(&cfg);
        for _ in 0..100 {
            b.deposit();
        }
        // 20% of 100 requests, plus the floor of 1/s over the 10 s window.
        let mut allowed = 0;
        while b.withdraw() {
            allowed += 1;
            assert!(allowed < 1000, "budget never runs out");
        }
        assert!((20..=31).contains(&allowed), "allowed {allowed} retries");
        // Spent: no retry now.
        assert!(!b.withdraw());
        // The window passes: the floor comes back even without requests.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(b.withdraw(), "the floor refills over time");
    }

    #[test]
    fn request_specific_h2_refusals() {
        use h2::Reason as R;
        let cases = [
            // (reset, remote, io, go_away, reason) -> refusal
            (
                (true, true, false, false, Some(R::PROTOCOL_ERROR)),
                Some(PeerRefusal::Malformed),
            ),
            (
                (true, true, false, false, Some(R::REFUSED_STREAM)),
                Some(PeerRefusal::Refused),
            ),
            (
                (false, false, false, false, None),
                Some(PeerRefusal::Refused),
            ),
            // The endpoint's business: its connection broke or went away,
            // or it cancelled the stream itself.
            ((true, true, false, false, Some(R::INTERNAL_ERROR)), None),
            ((true, true, false, false, Some(R::CANCEL)), None),
            ((false, true, false, true, Some(R::PROTOCOL_ERROR)), None),
            ((false, false, true, false, None), None),
            ((true, false, false, false, Some(R::PROTOCOL_ERROR)), None),
        ];
        for ((reset, remote, io, go_away, reason), want) in cases {
            assert_eq!(
                classify_h2(reset, remote, io, go_away, reason),
                want,
                "{reset} {remote} {io} {go_away} {reason:?}"
            );
        }
    }
}
