//! The header names the mesh reads and writes by itself. A leaf.

/// Header carrying the verified caller identity to the app (inbound) —
/// always set by the inbound sidecar, never trusted from the network.
pub const CLIENT_ID_HEADER: &str = "x-crank-client-id";
/// Header naming why the proxy answered by itself.
pub const ERROR_HEADER: &str = "x-crank-error";
/// Header carrying the capability a route reaches, from the caller's
/// outbound sidecar to the peer's inbound sidecar (policy input). The
/// outbound sidecar always replaces what the app sent.
pub const CAPABILITY_HEADER: &str = "x-crank-capability";
/// Header naming the policy decision behind a 403.
pub const DECISION_HEADER: &str = "x-crank-decision-id";
/// Header carrying the trace id on responses the proxy makes itself, so an
/// error a caller sees leads to its trace and log lines.
pub const TRACE_ID_HEADER: &str = "x-crank-trace-id";
/// Header saying which side of which sidecar made a response:
/// `outbound` (the caller's own sidecar) or `inbound` (the peer's sidecar,
/// in front of the app). Next to [`ERROR_SIDECAR_HEADER`].
pub const ERROR_ORIGIN_HEADER: &str = "x-crank-error-origin";
/// Header carrying the SPIFFE identity of the sidecar that made a response.
pub const ERROR_SIDECAR_HEADER: &str = "x-crank-error-sidecar";
