//! The identity stages of a request. Inbound: the peer sidecar's verified
//! identity (attached to the connection at the handshake), refused when it
//! is missing, invalid or revoked. Outbound: this sidecar's own
//! certificate must be usable, and a peer whose certificate was revoked
//! since its connection was pooled is refused before the request is sent.

use std::net::SocketAddr;
use std::sync::Arc;

use pingora_core::protocols::Digest;
use pingora_error::Error;

use super::{ConnAuth, PeerAuth, PeerIdentity, WorkloadTls};
use crate::errors::{Reason, Refusal};
use crate::health::Health;
use crate::metrics::Metrics;

/// The inbound peer's verified identity, or the refusal. A revoked peer's
/// identity comes back with its refusal (the access log names it).
pub fn inbound_peer(
    digest: Option<&Digest>,
    tls: &WorkloadTls,
) -> (Option<Arc<PeerIdentity>>, Option<Refusal>) {
    let auth = digest
        .and_then(|d| d.ssl_digest.as_ref())
        .and_then(|ssl| ssl.extension.get::<ConnAuth>());
    match auth.map(|a| &a.auth) {
        Some(PeerAuth::Verified(id)) if tls.is_revoked(&id.serial) => {
            let r = Refusal::new(Reason::PeerCertRevoked, format!("serial {}", id.serial));
            (Some(id.clone()), Some(r))
        }
        Some(PeerAuth::Verified(id)) => (Some(id.clone()), None),
        Some(PeerAuth::Refused(r)) => (None, Some(Refusal::new(*r, ""))),
        None => (None, Some(Refusal::new(Reason::ClientCertRequired, ""))),
    }
}

/// Outbound: a revoked or expired own certificate is refused by every
/// peer, so the request is answered with the local cause instead.
pub fn own_cert(health: &Health, spiffe_id: &str) -> Result<(), Refusal> {
    let Some(problem) = health.own_cert_problem(crate::clock::unix_now()) else {
        return Ok(());
    };
    let reason = match problem {
        "cert-revoked" => Reason::OwnCertRevoked,
        _ => Reason::OwnCertExpired,
    };
    Err(Refusal::new(reason, format!("identity {spiffe_id}")))
}

/// Outbound: an error when the peer's certificate (from the TLS digest
/// Pingora keeps per connection) is on the deny list. The connection's
/// pool key is retired so it is not picked again.
pub fn outbound_peer(
    digest: Option<&Digest>,
    reused: bool,
    upstream: Option<SocketAddr>,
    tls: &WorkloadTls,
    metrics: &Metrics,
) -> pingora_error::Result<()> {
    let serial = digest
        .and_then(|d| d.ssl_digest.as_ref())
        .and_then(|s| s.serial_number.as_deref());
    let Some(serial) = serial.filter(|s| tls.is_revoked(s)) else {
        return Ok(());
    };
    let serial = crank_api::identity::canonical_serial(serial);
    tracing::warn!(upstream = ?upstream, serial, reused, "refused peer sidecar: its certificate is revoked");
    if let Some(addr) = upstream {
        tls.retire_pooled(addr);
    }
    // Counted here, once per refused connection: the request may still
    // succeed on another endpoint.
    metrics
        .handshake_failures
        .with_label_values(&["outbound", "revoked"])
        .inc();
    Err(Error::explain(
        crate::errors::UPSTREAM_REVOKED,
        format!("the peer's certificate (serial {serial}) is revoked"),
    )
    .into_up())
}
