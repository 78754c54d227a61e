//! Per-request state, filled by the stages in phase order.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::direction::Direction;
use crate::errors::Reason;
use crate::health::InflightGuard;
use crate::identity::PeerIdentity;
use crate::routing::Route;
use crate::tracing::Hop;

use super::resilience::ResCtx;

/// A trace id as text, without a `String`.
pub(crate) enum TraceId<'a> {
    /// This hop's, as 32 lower-case hex digits.
    Hex([u8; 32]),
    /// The caller's, as received.
    Caller(&'a str),
}

impl std::ops::Deref for TraceId<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            // Only ASCII hex digits are written into it.
            TraceId::Hex(b) => std::str::from_utf8(b).unwrap_or_default(),
            TraceId::Caller(s) => s,
        }
    }
}

/// Lower-case hex of `N / 2` bytes.
pub(crate) fn hex<const N: usize>(bytes: &[u8]) -> [u8; N] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'0'; N];
    for (i, b) in bytes.iter().take(N / 2).enumerate() {
        out[2 * i] = DIGITS[(b >> 4) as usize];
        out[2 * i + 1] = DIGITS[(b & 15) as usize];
    }
    out
}

pub struct Ctx {
    pub(crate) start: Instant,
    pub(crate) route: Option<Arc<Route>>,
    pub(crate) peer: Option<Arc<PeerIdentity>>,
    pub(crate) upstream: Option<SocketAddr>,
    /// Whether the upstream connection was new (not from the pool).
    pub(crate) fresh_upstream: bool,
    /// Upstream attempts started (retries after a failed connect add one).
    pub(crate) attempts: usize,
    /// Why the last attempt failed, when it was retried.
    pub(crate) retried_because: Option<Cow<'static, str>>,
    pub(crate) reason: Option<Reason>,
    /// The policy decision: id and result, for the access log.
    pub(crate) policy: Option<(String, &'static str)>,
    /// This hop's trace context and span, when tracing is on.
    pub(crate) hop: Option<Hop>,
    /// The caller's trace id when tracing is off (logs only).
    pub(crate) incoming_trace_id: Option<String>,
    /// Outbound: the identity the chosen endpoint must prove.
    pub(crate) endpoint_identity: Option<Arc<str>>,
    /// Outbound: the peer sidecar's `x-crank-error`, when it answered by
    /// itself (its policy denied the request, say).
    pub(crate) peer_error: Option<String>,
    /// Quota, concurrency slot, retries, deadline, idempotency.
    pub(crate) res: ResCtx,
    _inflight: InflightGuard,
}

impl Ctx {
    pub(crate) fn new(inflight: InflightGuard) -> Ctx {
        Ctx {
            start: Instant::now(),
            route: None,
            peer: None,
            upstream: None,
            fresh_upstream: false,
            attempts: 0,
            retried_because: None,
            reason: None,
            policy: None,
            hop: None,
            incoming_trace_id: None,
            endpoint_identity: None,
            peer_error: None,
            res: Default::default(),
            _inflight: inflight,
        }
    }

    pub(crate) fn route_label(&self, dir: Direction) -> &str {
        match (&self.route, dir) {
            (Some(r), _) => &r.name,
            (None, Direction::Inbound) => "app",
            (None, Direction::Outbound) => "none",
        }
    }

    /// The request's trace id: this hop's, or the caller's when tracing is
    /// off. Formatted on the stack: the policy check, the access log and a
    /// refusal each ask for it.
    pub(crate) fn trace_id(&self) -> Option<TraceId<'_>> {
        match &self.hop {
            Some(h) => Some(TraceId::Hex(hex(&h.trace_id))),
            None => self.incoming_trace_id.as_deref().map(TraceId::Caller),
        }
    }

    /// Who answered, for the access log: the upstream, the idempotency
    /// store, or the mechanism named by the proxy's own reason.
    pub(crate) fn answered_by(&self) -> &'static str {
        match (self.res.answered_by, self.reason) {
            (Some(a), _) => a,
            (None, Some(r)) => r.as_str(),
            (None, None) if self.upstream.is_some() => "upstream",
            (None, None) => "none",
        }
    }

    /// Which sidecar made the response, for the access log and span: this
    /// one (`outbound` or `inbound`), the peer's (`peer`), or none (the app).
    pub(crate) fn error_origin(&self, dir: Direction) -> Option<&'static str> {
        match (self.reason, &self.peer_error) {
            (Some(_), _) => Some(dir.as_str()),
            (None, Some(_)) => Some("peer"),
            (None, None) => None,
        }
    }

    /// The route and endpoint of a failed attempt, for its refusal.
    pub(crate) fn upstream_detail(&self) -> String {
        match (&self.route, self.upstream) {
            (Some(r), Some(a)) => format!("route {}, endpoint {a}", r.name),
            (None, Some(a)) => format!("upstream {a}"),
            _ => String::new(),
        }
    }

    /// The `x-crank-error` a caller saw: this sidecar's reason, or the
    /// peer sidecar's.
    pub(crate) fn crank_error(&self) -> Option<String> {
        match (self.reason, &self.peer_error) {
            (Some(r), _) => Some(r.as_str().to_string()),
            (None, Some(p)) => Some(p.clone()),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_lower_case_hex_on_the_stack() {
        let id = [0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6];
        assert_eq!(&hex::<16>(&id), b"4bf92f3577b34da6");
        let t = TraceId::Hex(hex(&[0xab; 16]));
        assert_eq!(&*t, "ab".repeat(16));
        assert_eq!(&*TraceId::Caller("x"), "x");
    }
}
