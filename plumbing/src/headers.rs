//! Header names the mesh reads or writes on its own, and the hop-by-hop
//! list (RFC 9110 §7.6.1 plus the de-facto ones) that a proxy must not
//! forward.

use http::header::{self, HeaderMap, HeaderName};

/// The reason of a refusal the mesh made on its own (see [`crate::refusal`]).
pub const X_CRANK_ERROR: &str = "x-crank-error";
/// Which side a proxied error came from (`upstream`, `sidecar`, …).
pub const X_CRANK_ERROR_ORIGIN: &str = "x-crank-error-origin";
/// Which sidecar refused (its identity), when a sidecar answered.
pub const X_CRANK_ERROR_SIDECAR: &str = "x-crank-error-sidecar";
/// The trace id of the request, on refusals and the access log.
pub const X_CRANK_TRACE_ID: &str = "x-crank-trace-id";
/// The policy decision id that refused a request.
pub const X_CRANK_DECISION_ID: &str = "x-crank-decision-id";
/// The capability a request was routed by.
pub const X_CRANK_CAPABILITY: &str = "x-crank-capability";
/// The caller's client id, as the sidecar verified it.
pub const X_CRANK_CLIENT_ID: &str = "x-crank-client-id";

/// Headers that describe one connection, not the message: never forwarded.
pub const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

/// Whether `name` (lower case, as `http` stores it) is in [`HOP_BY_HOP`].
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// Drops the hop-by-hop headers and those that `Connection` names (never
/// `Host`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| name != header::HOST)
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_the_list_and_what_connection_names_but_never_host() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "close, x-private, host"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-private", "1"),
            ("host", "a.example"),
            ("x-keep", "1"),
        ] {
            h.append(HeaderName::from_static(k), v.parse().unwrap());
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["host", "x-keep"]);
    }

    #[test]
    fn names_are_valid_lower_case_header_names() {
        for name in HOP_BY_HOP.iter().chain(&[
            X_CRANK_ERROR,
            X_CRANK_ERROR_ORIGIN,
            X_CRANK_ERROR_SIDECAR,
            X_CRANK_TRACE_ID,
            X_CRANK_DECISION_ID,
            X_CRANK_CAPABILITY,
            X_CRANK_CLIENT_ID,
        ]) {
            assert_eq!(HeaderName::from_static(name).as_str(), *name);
        }
        assert!(is_hop_by_hop("transfer-encoding"));
        assert!(!is_hop_by_hop("content-length"));
    }
}
