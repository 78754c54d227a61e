//! The header names the proxy reads and writes by itself. The names are
//! crank-plumbing's, shared with crank-control and crank-shim; the aliases
//! here say what each one means to the proxy.

use crank_plumbing::headers as h;

/// The verified caller identity, to the app (inbound): always set by the
/// inbound sidecar, never trusted from the network.
pub const CLIENT_ID_HEADER: &str = h::X_CRANK_CLIENT_ID;
/// Why the proxy answered by itself.
pub const ERROR_HEADER: &str = h::X_CRANK_ERROR;
/// The capability a route reaches, from the caller's outbound sidecar to
/// the peer's inbound sidecar (policy input). The outbound sidecar always
/// replaces what the app sent.
pub const CAPABILITY_HEADER: &str = h::X_CRANK_CAPABILITY;
/// The policy decision behind a 403.
pub const DECISION_HEADER: &str = h::X_CRANK_DECISION_ID;
/// The trace id on responses the proxy makes itself, so an error a caller
/// sees leads to its trace and log lines.
pub const TRACE_ID_HEADER: &str = h::X_CRANK_TRACE_ID;
/// Which side of which sidecar made a response: `outbound` (the caller's
/// own sidecar) or `inbound` (the peer's sidecar, in front of the app).
/// Next to [`ERROR_SIDECAR_HEADER`].
pub const ERROR_ORIGIN_HEADER: &str = h::X_CRANK_ERROR_ORIGIN;
/// The SPIFFE identity of the sidecar that made a response.
pub const ERROR_SIDECAR_HEADER: &str = h::X_CRANK_ERROR_SIDECAR;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_names_stay_the_same() {
        assert_eq!(
            [
                CLIENT_ID_HEADER,
                ERROR_HEADER,
                CAPABILITY_HEADER,
                DECISION_HEADER,
                TRACE_ID_HEADER,
                ERROR_ORIGIN_HEADER,
                ERROR_SIDECAR_HEADER
            ],
            [
                "x-crank-client-id",
                "x-crank-error",
                "x-crank-capability",
                "x-crank-decision-id",
                "x-crank-trace-id",
                "x-crank-error-origin",
                "x-crank-error-sidecar"
            ]
        );
    }
}
