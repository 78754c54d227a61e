//! Egress: destinations outside the mesh. The config's `egress` section
//! (pushed from the mesh config's `egress.yaml`) declares them; a route
//! whose `egress` names one sends there instead of to peer sidecars, with
//! the route's timeouts, retries, quotas, policy, metrics and spans.
//!
//! [`EgressTable`] holds the declared destinations, each with its upstream
//! peer built once (TLS roots parsed at load, never per request), and the
//! mode for destinations nothing declares. [`decide`] is the one decision
//! for a destination, shared by the HTTP proxy listener and the capture
//! listeners: declared, passed through (`allow`, `audit`) or refused
//! (`deny`, 403 `egress-not-declared`).

mod dest;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crank_api::proxy::{EgressConfig, EgressHost, EgressMode};

pub use crate::config::egress::{inline_cas, problems};
pub use dest::Destination;

/// The route name of requests passed through to an undeclared destination
/// (metrics, logs and spans; never the destination itself, so the label
/// set stays bounded).
pub const UNDECLARED_ROUTE: &str = "egress-undeclared";

/// The declared destinations and the mode.
#[derive(Debug, Default)]
pub struct EgressTable {
    mode: Option<EgressMode>,
    dests: Vec<Arc<Destination>>,
    by_name: HashMap<String, usize>,
    /// `(host, port)` of each destination: its DNS name or IP as written.
    by_authority: HashMap<(String, u16), usize>,
}

/// A destination as a caller names it: a socket address (a captured
/// connection's original destination) or an authority (`host[:port]`).
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Addr(SocketAddr),
    /// `host` or `host:port`; `default_port` applies without a port.
    Authority {
        authority: &'a str,
        default_port: u16,
    },
}

/// What to do with traffic to a destination nothing declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undeclared {
    /// No `egress.mode`: the HTTP proxy listener answers `no-route` for a
    /// host no route takes; a captured connection goes on unchanged.
    Uncontrolled,
    /// `allow`: passed through.
    Allow,
    /// `audit`: passed through and logged as `egress-not-declared`.
    Audit,
    /// `deny`: refused, 403 `egress-not-declared`.
    Deny,
}

impl Undeclared {
    /// Whether the traffic may go on to its destination.
    pub fn passes(self) -> bool {
        !matches!(self, Undeclared::Deny)
    }
}

/// The decision for one destination.
#[derive(Debug, Clone)]
pub enum Decision {
    Declared(Arc<Destination>),
    Undeclared(Undeclared),
}

impl EgressTable {
    /// The table of a validated config. A destination whose CA does not
    /// load (possible only for a config that skipped validation) is left
    /// out, with an error logged: its routes answer `no-endpoints`.
    pub fn from_config(cfg: &EgressConfig) -> EgressTable {
        let mut t = EgressTable {
            mode: cfg.mode,
            ..Default::default()
        };
        for d in &cfg.destinations {
            match Destination::build(d) {
                Ok(dest) => {
                    let idx = t.dests.len();
                    t.by_name.insert(dest.name.clone(), idx);
                    t.by_authority.insert(dest.authority_key(), idx);
                    t.dests.push(Arc::new(dest));
                }
                Err(e) => {
                    tracing::error!(destination = %d.name, error = %e, "egress destination left out")
                }
            }
        }
        t
    }

    /// The destination a route's `egress` names.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Destination>> {
        self.by_name.get(name).map(|i| &self.dests[*i])
    }

    pub fn mode(&self) -> Option<EgressMode> {
        self.mode
    }

    /// What happens to a destination nothing declares.
    pub fn undeclared(&self) -> Undeclared {
        match self.mode {
            None => Undeclared::Uncontrolled,
            Some(EgressMode::Allow) => Undeclared::Allow,
            Some(EgressMode::Audit) => Undeclared::Audit,
            Some(EgressMode::Deny) => Undeclared::Deny,
        }
    }

    pub fn destinations(&self) -> &[Arc<Destination>] {
        &self.dests
    }
}

/// The declared destination `dst` is, if any: by IP address and port as
/// written, by a DNS name's last resolution (a captured connection sees
/// only the address), or by authority.
pub fn lookup(t: &EgressTable, dst: Target<'_>) -> Option<Arc<Destination>> {
    let idx = match dst {
        Target::Addr(a) => t
            .by_authority
            .get(&(a.ip().to_string(), a.port()))
            .copied()
            .or_else(|| t.dests.iter().position(|d| d.last_resolved(a))),
        Target::Authority {
            authority,
            default_port,
        } => {
            let (host, port) = split_authority(authority, default_port)?;
            t.by_authority.get(&(host, port)).copied()
        }
    }?;
    t.dests.get(idx).cloned()
}

/// [`lookup`], or what the mode says for an undeclared destination.
pub fn decide(t: &EgressTable, dst: Target<'_>) -> Decision {
    match lookup(t, dst) {
        Some(d) => Decision::Declared(d),
        None => Decision::Undeclared(t.undeclared()),
    }
}

/// `host[:port]` lower-cased without a trailing dot; IPv6 in brackets.
pub fn split_authority(authority: &str, default_port: u16) -> Option<(String, u16)> {
    let a = authority.trim();
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, tail) = rest.split_once(']')?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if tail.is_empty() => default_port,
            None => return None,
        };
        (h.to_string(), port)
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()?),
            None => (a.to_string(), default_port),
        }
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() || port == 0 {
        return None;
    }
    let host = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => host,
    };
    Some((host, port))
}

/// The `destination` label of a request outside the mesh: the declared
/// name, or `undeclared`.
pub fn destination_label(d: &Destination) -> &str {
    if d.name == UNDECLARED_ROUTE {
        "undeclared"
    } else {
        &d.name
    }
}

/// What a request passed through to an undeclared destination carries in
/// `Via`, so that a sidecar it reaches again refuses it instead of looping.
pub const VIA: &str = "1.1 crank-egress";

/// Whether the request went through an undeclared pass-through before.
pub fn passed_through_before(req: &pingora_http::RequestHeader) -> bool {
    req.headers
        .get_all(http::header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|hop| hop.trim() == VIA))
}

/// The key of a destination's host as written.
fn host_key(h: &EgressHost) -> String {
    match h {
        EgressHost::Name(n) => n.clone(),
        EgressHost::Ip(ip) => ip.to_string(),
    }
}

#[cfg(test)]
mod tests;
