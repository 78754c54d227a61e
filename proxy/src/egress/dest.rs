//! One declared destination outside the mesh: where it is, and its
//! upstream peer (plain HTTP, or TLS verified against the destination's own
//! CA, with no client certificate), built once when the config loads.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crank_api::proxy::{EgressDestination, EgressHost};
use pingora_core::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::utils::tls::WrappedX509;

use super::host_key;

#[derive(Debug)]
pub struct Destination {
    pub name: String,
    /// The address as written (`ray-head.internal:8000`); sent as `Host`.
    pub address: String,
    pub host: EgressHost,
    pub port: u16,
    pub tls: bool,
    /// The peer every attempt copies; only its socket address changes.
    template: HttpPeer,
    /// A DNS name's addresses at its last resolution.
    resolved: Mutex<Vec<SocketAddr>>,
}

impl Destination {
    /// Builds the destination and its peer. `ca` must be PEM text by now
    /// ([`super::inline_cas`] reads files).
    pub fn build(d: &EgressDestination) -> Result<Destination, String> {
        let (host, port) = d.host_port()?;
        let nominal = match &host {
            EgressHost::Ip(ip) => SocketAddr::new(*ip, port),
            EgressHost::Name(_) => SocketAddr::from(([0, 0, 0, 0], port)),
        };
        let sni = d.server_name().unwrap_or_default();
        let mut template = HttpPeer::new(nominal, d.tls.is_some(), sni);
        // Pingora's connection pool key leaves the roots out: each
        // destination (name, address, CA) pools its connections apart, so
        // a connection verified for one is never reused for another.
        template.group_key = pool_key(d);
        if let Some(tls) = &d.tls {
            template.options.ca = Some(roots(&tls.ca)?);
            // Plain HTTP stays HTTP/1.1; TLS offers h2 first.
            template.options.set_http_version(2, 1);
        } else {
            template.options.set_http_version(1, 1);
        }
        Ok(Destination {
            name: d.name.clone(),
            address: d.address.clone(),
            host,
            port,
            tls: d.tls.is_some(),
            template,
            resolved: Mutex::new(Vec::new()),
        })
    }

    /// A destination for an undeclared authority, passed through as plain
    /// HTTP (`allow` and `audit` modes).
    pub fn undeclared(host: &str, port: u16) -> Result<Destination, String> {
        let address = match host.parse::<std::net::Ipv6Addr>() {
            Ok(_) => format!("[{host}]:{port}"),
            Err(_) => format!("{host}:{port}"),
        };
        Destination::build(&EgressDestination {
            name: super::UNDECLARED_ROUTE.into(),
            address,
            tls: None,
        })
    }

    /// The address an attempt connects to: the IP as written, or the DNS
    /// name resolved now (the first address; the last resolution is kept
    /// for [`super::lookup`]).
    pub async fn resolve(&self) -> Result<SocketAddr, String> {
        let name = match &self.host {
            EgressHost::Ip(ip) => return Ok(SocketAddr::new(*ip, self.port)),
            EgressHost::Name(n) => n,
        };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), self.port))
            .await
            .map_err(|e| format!("resolving {name}: {e}"))?
            .collect();
        let first = *addrs
            .first()
            .ok_or_else(|| format!("resolving {name}: no address"))?;
        if let Ok(mut r) = self.resolved.lock() {
            *r = addrs;
        }
        Ok(first)
    }

    /// The peer for one attempt to `addr`.
    pub fn peer(&self, addr: SocketAddr) -> HttpPeer {
        let mut p = self.template.clone();
        p._address = PeerAddr::Inet(addr);
        p
    }

    /// Whether `a` was among the DNS name's addresses at its last resolution.
    pub(super) fn last_resolved(&self, a: SocketAddr) -> bool {
        self.resolved
            .lock()
            .map(|r| r.contains(&a))
            .unwrap_or(false)
    }

    pub(super) fn authority_key(&self) -> (String, u16) {
        (host_key(&self.host), self.port)
    }

    /// `host` (or `[v6]`) for metrics, logs and policy input.
    pub fn host_str(&self) -> String {
        host_key(&self.host)
    }
}

/// The pool key of a destination's connections.
fn pool_key(d: &EgressDestination) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        &d.name,
        &d.address,
        d.tls.as_ref().map(|t| (&t.ca, &t.server_name)),
    )
        .hash(&mut h);
    h.finish()
}

/// The CA's certificates, for the peer's `ca`.
fn roots(pem: &str) -> Result<Arc<[WrappedX509]>, String> {
    let certs = crank_certs::pem::certs_from_pem(pem.as_bytes())?;
    Ok(certs
        .iter()
        .map(|c| WrappedX509::new(c.to_vec(), pingora_core::utils::tls::parse_x509))
        .collect::<Vec<_>>()
        .into())
}
