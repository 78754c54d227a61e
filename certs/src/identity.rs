//! The workload identity type and its two textual forms (DNS SAN, SPIFFE ID).

use std::fmt;
use std::str::FromStr;

/// Trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "crank.local";

/// A workload identity: a service of a tenant inside a trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub service: String,
    pub tenant: String,
    pub trust_domain: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("identity {0:?} is empty; write `<service>.<tenant>.<trust-domain>` or `spiffe://<trust-domain>/tenant/<tenant>/svc/<service>`")]
    Empty(String),
    #[error("identity {input:?}: {reason}; write `<service>.<tenant>.<trust-domain>` or `spiffe://<trust-domain>/tenant/<tenant>/svc/<service>`")]
    Malformed { input: String, reason: &'static str },
}

impl Identity {
    /// Builds an identity, checking that each part is a valid DNS label
    /// (service, tenant) or DNS name (trust domain).
    pub fn new(service: &str, tenant: &str, trust_domain: &str) -> Result<Self, IdentityError> {
        let input = format!("{service}.{tenant}.{trust_domain}");
        if !is_label(service) {
            return Err(malformed(
                &input,
                "the service must be a DNS label (a-z, 0-9, '-', at most 63 characters)",
            ));
        }
        if !is_label(tenant) {
            return Err(malformed(
                &input,
                "the tenant must be a DNS label (a-z, 0-9, '-', at most 63 characters)",
            ));
        }
        if trust_domain.is_empty() || !trust_domain.split('.').all(is_label) {
            return Err(malformed(
                &input,
                "the trust domain must be a DNS name of lower-case labels",
            ));
        }
        Ok(Identity {
            service: service.to_string(),
            tenant: tenant.to_string(),
            trust_domain: trust_domain.to_string(),
        })
    }

    /// `<service>.<tenant>.<trust-domain>`, the DNS SAN and the SNI name.
    pub fn dns_name(&self) -> String {
        format!("{}.{}.{}", self.service, self.tenant, self.trust_domain)
    }

    /// `spiffe://<trust-domain>/tenant/<tenant>/svc/<service>`.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/tenant/{}/svc/{}",
            self.trust_domain, self.tenant, self.service
        )
    }

    /// Parses a SPIFFE ID of the Crank form.
    pub fn from_spiffe(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| malformed(uri, "a SPIFFE ID starts with spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "tenant", tenant, "svc", service] => Identity::new(service, tenant, td)
                .map_err(|_| malformed(uri, "a part of the SPIFFE ID is not a valid DNS label")),
            _ => Err(malformed(
                uri,
                "the SPIFFE path must be /tenant/<tenant>/svc/<service>",
            )),
        }
    }

    /// Parses the DNS form `<service>.<tenant>.<trust-domain>`.
    pub fn from_dns(name: &str) -> Result<Self, IdentityError> {
        let mut it = name.splitn(3, '.');
        match (it.next(), it.next(), it.next()) {
            (Some(s), Some(t), Some(td)) => Identity::new(s, t, td),
            _ => Err(malformed(name, "a DNS identity has at least three labels")),
        }
    }
}

impl FromStr for Identity {
    type Err = IdentityError;
    /// Accepts either form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(IdentityError::Empty(s.to_string()));
        }
        if s.starts_with("spiffe://") {
            Identity::from_spiffe(s)
        } else {
            Identity::from_dns(s)
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spiffe_id())
    }
}

fn malformed(input: &str, reason: &'static str) -> IdentityError {
    IdentityError::Malformed {
        input: input.to_string(),
        reason,
    }
}

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_round_trip() {
        let id = Identity::new("web", "acme", "crank.local").unwrap();
        assert_eq!(id.dns_name(), "web.acme.crank.local");
        assert_eq!(id.spiffe_id(), "spiffe://crank.local/tenant/acme/svc/web");
        assert_eq!(id.dns_name().parse::<Identity>().unwrap(), id);
        assert_eq!(id.spiffe_id().parse::<Identity>().unwrap(), id);
    }

    #[test]
    fn rejects_bad_identities() {
        for bad in [
            "",
            "web",
            "web.acme",
            "Web.acme.crank.local",
            "web_1.acme.crank.local",
            "spiffe://crank.local/svc/web",
            "spiffe://crank.local/tenant/acme/svc/",
            "spiffe://crank.local/tenant/acme/svc/web/extra",
            "-web.acme.crank.local",
        ] {
            assert!(
                bad.parse::<Identity>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn error_names_the_fix() {
        let e = "web".parse::<Identity>().unwrap_err().to_string();
        assert!(e.contains("<service>.<tenant>.<trust-domain>"), "{e}");
    }
}
