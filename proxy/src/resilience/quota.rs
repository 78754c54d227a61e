//! The quota limits of each direction, built from the config's `quotas`
//! and swapped whole when it changes (a leaf over [`super::ratelimit`]).

use crank_api::proxy::{QuotaConfig, QuotaDirection};

use super::ratelimit::{Limit, Quotas};

/// The quota limits of each direction, rebuilt when the config changes.
pub struct QuotaSet {
    pub inbound: Quotas,
    pub outbound: Quotas,
    pub tenant_header: Option<http::HeaderName>,
    pub headers: crank_api::proxy::RateLimitHeaders,
}

impl QuotaSet {
    /// From a validated config.
    pub fn from_config(q: &QuotaConfig) -> Self {
        let mut inbound = Vec::new();
        let mut outbound = Vec::new();
        for l in &q.limits {
            let Ok((count, per)) = super::parse_rate(&l.rate) else {
                continue; // validated before
            };
            let limit = Limit {
                name: l
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{}/{}", l.tenant, l.capability)),
                tenant: l.tenant.clone(),
                capability: l.capability.clone(),
                count,
                per,
                burst: l.burst.unwrap_or(count),
            };
            if matches!(l.direction, QuotaDirection::Outbound | QuotaDirection::Both) {
                outbound.push(limit.clone());
            }
            if matches!(l.direction, QuotaDirection::Inbound | QuotaDirection::Both) {
                inbound.push(limit);
            }
        }
        QuotaSet {
            inbound: Quotas::new(inbound, q.max_keys),
            outbound: Quotas::new(outbound, q.max_keys),
            tenant_header: q
                .tenant_header
                .as_deref()
                .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()),
            headers: q.response_headers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_directions_split_the_limits() {
        let q: QuotaConfig = serde_yaml::from_str(
            r#"
tenant_header: x-tenant
limits:
  - {tenant: acme, capability: "transcode:v1", rate: 100/min}
  - {tenant: "*", capability: "*", rate: 10/s, direction: outbound}
  - {tenant: "*", capability: "thumb", rate: 1/s, burst: 3, direction: both}
"#,
        )
        .unwrap();
        let s = QuotaSet::from_config(&q);
        let d = s.inbound.check("acme", "transcode:v1").unwrap();
        assert_eq!(
            (&*d.policy, d.quota, d.window_secs),
            ("acme/transcode:v1", 100, 60)
        );
        assert!(s.inbound.check("other", "transcode:v1").is_none());
        assert_eq!(s.outbound.check("x", "y").unwrap().quota, 10);
        assert_eq!(s.inbound.check("x", "thumb").unwrap().remaining, 2);
        assert_eq!(s.tenant_header.unwrap().as_str(), "x-tenant");
        assert_eq!(s.inbound.check("y", "thumb").unwrap().burst, 3);
    }
}
