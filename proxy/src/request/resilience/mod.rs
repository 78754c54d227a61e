//! The resilience stages of a request, in phase order, over the
//! mechanisms in [`crate::resilience`]. Each stage asks the state machine
//! of its mechanism and returns a refusal when that says no; the phases
//! write it (`super::respond`).
//!
//! - [`admit`] (`request_filter`, after policy): quota → fault (outbound)
//!   → idempotency (inbound) → concurrency slot.
//! - [`attempt`] (`upstream_peer` and the response and error phases,
//!   outbound): backoff on a retry → deadline → endpoint pick (balancer);
//!   outlier detection and the balancer's latency estimate record each
//!   attempt, and `may_retry` decides a retry under the route's budget.
//! - [`replay`] (inbound): a duplicate `Idempotency-Key` gets the first
//!   request's response; the first one's response is kept.
//!
//! They live here, beside the phases, rather than in `resilience/`: they
//! join the route ([`crate::routing`]), the peer ([`crate::identity`]) and
//! the mechanisms, and `routing` already stands on `resilience` (a route
//! holds its breakers, budget and limiter).

pub(crate) mod admit;
pub(crate) mod attempt;
pub(crate) mod replay;

use bytes::{Bytes, BytesMut};
use pingora_error::ErrorType;
use tokio::time::Instant;

use crate::resilience::breaker::{InFlight, Pick};
use crate::resilience::idempotency::{Claim, RequestHasher};
use crate::resilience::ratelimit::RateDecision;
use crate::resilience::shed::Permit;

/// The header naming the key of an idempotent request.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set on a response replayed from the idempotency store.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// Custom error types the resilience steps raise from `upstream_peer`.
const CIRCUIT_OPEN: ErrorType = ErrorType::Custom("circuit-open");
const NO_ENDPOINTS: ErrorType = ErrorType::Custom("no-endpoints");
const DEADLINE: ErrorType = ErrorType::Custom("request-timeout");
const RETRY_STATUS: ErrorType = ErrorType::Custom("retry-on-status");

/// Per-request resilience state, part of the proxy's `Ctx`.
#[derive(Default)]
pub struct ResCtx {
    /// The concurrency slot; freed when the request ends.
    permit: Option<Permit>,
    /// The endpoint of the attempt in progress, until its outcome is known.
    pick: Option<Pick>,
    /// The attempt in progress, counted in its endpoint's load until its
    /// outcome is known (or the request ends).
    in_flight: Option<InFlight>,
    /// Endpoints this request tried (a retry avoids them).
    tried: Tried,
    /// The route's request deadline.
    deadline: Option<Instant>,
    pub retries: u32,
    /// Outbound: the hash of the request's `Idempotency-Key`, which picks
    /// its first endpoint.
    affinity: Option<u64>,
    /// The response status that made `upstream_response_filter` ask for a retry.
    status_retry: bool,
    /// The retry in progress follows a connect or TLS failure: it must go
    /// to an endpoint not tried yet.
    connect_retry: bool,
    /// The quota decision, for `RateLimit` headers on the response.
    rate: Option<RateDecision>,
    /// Boxed: rare (requests with an `Idempotency-Key`), and 376 bytes
    /// inline, which every request's future carried (and Pingora copies
    /// once per request; issue #19).
    idem: Option<Box<IdemCtx>>,
    /// Who answered when it was neither the upstream nor an error reason.
    pub answered_by: Option<&'static str>,
    /// The peer sidecar refused the request as malformed: answered as
    /// `peer-refused-request`.
    peer_refused: bool,
}

/// Indices of the endpoints a request tried, in order: held inline for the
/// first few attempts (every outbound request makes at least one), in a
/// vector beyond.
#[derive(Debug, Clone)]
pub(crate) enum Tried {
    Inline([usize; TRIED_INLINE], u8),
    Spilled(Vec<usize>),
}

const TRIED_INLINE: usize = 4;

impl Default for Tried {
    fn default() -> Self {
        Tried::Inline([0; TRIED_INLINE], 0)
    }
}

impl Tried {
    pub(crate) fn push(&mut self, index: usize) {
        match self {
            Tried::Inline(held, n) if usize::from(*n) < TRIED_INLINE => {
                held[usize::from(*n)] = index;
                *n += 1;
            }
            Tried::Inline(held, _) => {
                let mut v = held.to_vec();
                v.push(index);
                *self = Tried::Spilled(v);
            }
            Tried::Spilled(v) => v.push(index),
        }
    }
}

impl std::ops::Deref for Tried {
    type Target = [usize];

    fn deref(&self) -> &[usize] {
        match self {
            Tried::Inline(held, n) => &held[..usize::from(*n)],
            Tried::Spilled(v) => v,
        }
    }
}

/// The first request with an `Idempotency-Key`: its claim, request hash and
/// the response being captured.
pub(crate) struct IdemCtx {
    claim: Claim,
    hasher: Option<RequestHasher>,
    hash: Option<[u8; 32]>,
    status: u16,
    headers: Vec<(String, Bytes)>,
    body: BytesMut,
    too_large: bool,
}

#[cfg(test)]
mod tests {
    use super::Tried;

    #[test]
    fn tried_keeps_every_index_in_order_past_the_inline_ones() {
        let mut t = Tried::default();
        assert!(t.is_empty());
        for i in 0..9 {
            t.push(i * 10);
            assert_eq!(t.len(), i + 1);
        }
        assert_eq!(&*t, &[0, 10, 20, 30, 40, 50, 60, 70, 80]);
        assert!(t.contains(&30) && !t.contains(&31));
        assert!(matches!(t, Tried::Spilled(_)));
        let mut short = Tried::default();
        short.push(7);
        assert_eq!(&*short, &[7]);
        assert!(matches!(short, Tried::Inline(..)));
    }
}
