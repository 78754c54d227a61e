//! The identity API (`/v1/identity/...`) between workloads and the CA in
//! `crank-control`: enrollment with a one-time join token, renewal with the
//! current certificate, and the long-poll watch that carries trust bundles,
//! the revocation deny list and reissue requests during a CA rotation.
//!
//! Every body is JSON. Errors are `{"error": "<code>", "message": "<what and the fix>"}`
//! with a 4xx/5xx status ([`ApiError`]).

use serde::{Deserialize, Serialize};

/// `POST /v1/identity/enroll` (server-authenticated TLS, no client cert).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The one-time join token from `crankctl token create`.
    pub token: String,
    /// PKCS#10 CSR (PEM) for the identity the token grants: the SPIFFE URI SAN
    /// `spiffe://<td>/tenant/<t>/svc/<s>` and/or the DNS SAN `<s>.<t>.<td>`.
    /// The key is made on the workload's host and never leaves it.
    pub csr: String,
    /// A stable id of this workload instance (random, kept in its state dir),
    /// so `crankctl ca status` can tell replicas of one identity apart.
    pub instance: String,
}

/// `POST /v1/identity/renew` (mTLS: the caller's current, valid, unrevoked cert).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// A CSR for the same identity as the client certificate, with a new key.
    pub csr: String,
    pub instance: String,
}

/// The answer to enroll and renew.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IssueResponse {
    /// Leaf then intermediate, PEM.
    pub chain: String,
    /// The leaf's serial (hex, as `crankctl cert list` shows it).
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    /// The trust bundle at the time of issue.
    pub bundle: Bundle,
}

/// The roots every workload must trust, versioned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// Goes up by one at every change of the root set.
    pub version: u64,
    /// PEM, one or more roots (two during a root rotation).
    pub pem: String,
}

/// `GET /v1/identity/watch?instance=I&serial=S&bundle=V&revocations=R&wait=30`
/// (mTLS). Returns as soon as anything the caller does not have changes, or
/// after `wait` seconds (at most 60) with the current state. The query is also
/// the caller's report: the bundle version it applied and the serial it serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchResponse {
    pub bundle: Bundle,
    pub revocations: Revocations,
    /// True when the CA wants this workload to renew now (its cert was issued
    /// by an intermediate that is being retired). The workload renews after a
    /// short random delay.
    pub renew: bool,
}

/// The deny list: serials (hex, lower case, no separators) that no workload
/// may accept any more, versioned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    pub version: u64,
    pub serials: Vec<String>,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// A stable code, e.g. `token-reused`.
    pub error: String,
    /// What is wrong and how to fix it. `detail` (the shim's old name
    /// for it) is read too, for one release.
    #[serde(alias = "detail")]
    pub message: String,
}

/// Serial numbers in one canonical form: lower-case hex, no `:` separators,
/// no leading zero bytes. `crankctl` accepts the colon form as well.
pub fn canonical_serial(s: &str) -> String {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let trimmed = hex.trim_start_matches("00");
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_forms_agree() {
        assert_eq!(canonical_serial("00:AB:0c"), "ab0c");
        assert_eq!(canonical_serial("ab0c"), "ab0c");
        assert_eq!(canonical_serial("00"), "0");
    }
}
