//! Enrolling again without a restart: the pure decisions.
//!
//! A sidecar whose certificate is revoked (crank-control answers 403
//! `cert-revoked`) or expired cannot renew. It enrolls again by itself when
//! `token_file` holds a join token it has not used yet: the SHA-256 of the
//! token of the last enrollment is kept in `state_dir/token.used`, and a
//! token crank-control refused is not tried again until it changes. When it
//! enrolls (at start or again), crank-control is verified against the
//! bootstrap bundle and the roots saved in `state_dir/bundle.pem`, so a root
//! rotation the sidecar followed does not lock it out.

use rustls::pki_types::CertificateDer;

/// The SHA-256 of a join token, lower-case hex: what `token.used` keeps.
pub fn token_digest(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.trim().as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What to do with the token found in `token_file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenVerdict {
    /// Not used by this sidecar yet: enroll with it.
    Fresh,
    /// The last enrollment used it; crank-control would refuse it as reused.
    AlreadyUsed,
    /// crank-control refused it already; wait for another one.
    Refused,
}

/// Judges a token by its digest against the one last used and the one
/// last refused.
pub fn judge_token(digest: &str, used: Option<&str>, refused: Option<&str>) -> TokenVerdict {
    if used == Some(digest) {
        TokenVerdict::AlreadyUsed
    } else if refused == Some(digest) {
        TokenVerdict::Refused
    } else {
        TokenVerdict::Fresh
    }
}

/// Why the current certificate can no longer be renewed, if it cannot:
/// `cert-revoked` or `cert-expired` (the names /ready uses).
pub fn stuck_reason(revoked: bool, not_after: i64, now: i64) -> Option<&'static str> {
    if revoked {
        Some("cert-revoked")
    } else if now >= not_after {
        Some("cert-expired")
    } else {
        None
    }
}

/// The roots that verify crank-control when enrolling: the bootstrap
/// bundle's, then the saved (current) ones not already in it.
pub fn union_roots(
    bootstrap: Vec<CertificateDer<'static>>,
    saved: Vec<CertificateDer<'static>>,
) -> Vec<CertificateDer<'static>> {
    let mut all = bootstrap;
    for r in saved {
        if !all.contains(&r) {
            all.push(r);
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use TokenVerdict::*;

    #[test]
    fn a_token_is_used_once_and_a_refused_one_is_not_retried() {
        let t = token_digest("crank-jt-1");
        assert_eq!(t.len(), 64);
        assert_eq!(t, token_digest(" crank-jt-1\n"), "as read from the file");
        assert_ne!(t, token_digest("crank-jt-2"));
        let other = token_digest("crank-jt-2");
        let cases: &[(Option<&str>, Option<&str>, TokenVerdict)] = &[
            (None, None, Fresh),
            (Some(&other), None, Fresh),
            (Some(&t), None, AlreadyUsed),
            (None, Some(&t), Refused),
            (Some(&other), Some(&other), Fresh),
            (Some(&t), Some(&t), AlreadyUsed),
        ];
        for (used, refused, want) in cases {
            assert_eq!(
                judge_token(&t, *used, *refused),
                *want,
                "{used:?} {refused:?}"
            );
        }
    }

    #[test]
    fn only_a_revoked_or_expired_certificate_is_stuck() {
        let cases = [
            (false, 100, 99, None),
            (false, 100, 100, Some("cert-expired")),
            (false, 100, 500, Some("cert-expired")),
            (true, 100, 50, Some("cert-revoked")),
            (true, 100, 500, Some("cert-revoked")),
        ];
        for (revoked, not_after, now, want) in cases {
            assert_eq!(stuck_reason(revoked, not_after, now), want);
        }
    }

    #[test]
    fn enrollment_trusts_the_bootstrap_and_the_saved_roots_once_each() {
        let der = |b: &[u8]| CertificateDer::from(b.to_vec());
        let got = union_roots(
            vec![der(b"old")],
            vec![der(b"new"), der(b"old"), der(b"newer")],
        );
        assert_eq!(got, vec![der(b"old"), der(b"new"), der(b"newer")]);
        assert_eq!(union_roots(vec![der(b"old")], vec![]), vec![der(b"old")]);
    }
}
