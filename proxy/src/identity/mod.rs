//! Workload identity and mTLS between sidecars (rustls).
//!
//! Inbound: a TLS 1.3 listener that asks every peer for a client certificate
//! from the trust bundle ([`MeshClientVerifier`]), refuses clients that do not
//! offer TLS 1.3 ([`MeshCertResolver`]) or speak plaintext ([`PlaintextGuard`]),
//! and attaches the verified peer identity to the connection
//! ([`HandshakeCallbacks`] → [`ConnAuth`]). Each refusal is logged and counted
//! in `crank_tls_handshake_failures_total{reason}`.
//!
//! Outbound: the client cert/key and trust bundle in Pingora's form, so each
//! upstream peer verifies the server's DNS SAN (`<svc>.<tenant>.<td>`) against
//! the route's expected identity.

pub mod admit;

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use crank_api::identity::canonical_serial;
use crank_api::proxy::IdentityConfig;
use crank_certs::{identity_from_der, CertSummary, Identity};
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::listeners::{PreTlsProcess, TlsAccept};
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::tls::TlsRef;
use pingora_core::utils::tls::{CertKey, WrappedX509};
use prometheus::IntCounterVec;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, CipherSuite, DigitallySignedStruct, DistinguishedName, RootCertStore,
    SignatureScheme,
};

use crate::errors::Reason;
use crate::metrics::Metrics;

/// Errors loading this workload's identity material.
#[derive(Debug, thiserror::Error)]
#[error("identity.{field}: {message}")]
pub struct IdentityError {
    pub field: &'static str,
    pub message: String,
}

fn ierr(field: &'static str, message: impl Into<String>) -> IdentityError {
    IdentityError {
        field,
        message: message.into(),
    }
}

/// The loaded identity material, swappable in place: the server cert (via
/// [`MeshCertResolver`]), the client cert, the roots (inbound verifier and
/// outbound bundle) and the deny list. A swap never touches open
/// connections; new handshakes use the new material.
pub struct WorkloadTls {
    /// Our own identity, read from our certificate. A swap never changes it.
    pub identity: Identity,
    summary: ArcSwap<CertSummary>,
    roots: ArcSwap<Vec<CertSummary>>,
    resolver: Arc<MeshCertResolver>,
    verifier: Arc<MeshClientVerifier>,
    client_cert: ArcSwap<CertKey>,
    bundle: ArcSwap<Arc<[WrappedX509]>>,
    deny: DenyList,
    /// Goes up at every root or deny-list change; part of the outbound
    /// connection pool key, so pooled connections made before a change are
    /// not reused after it.
    generation: AtomicU64,
    /// Peers whose pooled connection was refused as revoked, with a count:
    /// their pool key changes so that connection is never picked again.
    retired: ArcSwap<HashMap<SocketAddr, u64>>,
    /// Goes up after any change to what an outbound peer is built from
    /// (client certificate, roots, pool keys), so a peer prepared for an
    /// endpoint is reused until then ([`Self::peer_epoch`]).
    peer_epoch: AtomicU64,
    metrics: Metrics,
}

/// Serials (canonical form) no peer may present any more. Shared by the
/// inbound verifier, the request path and the outbound check.
#[derive(Debug, Clone, Default)]
pub struct DenyList(Arc<ArcSwap<HashSet<String>>>);

impl DenyList {
    /// True when `serial` (any form: colons, upper case) is denied.
    pub fn contains(&self, serial: &str) -> bool {
        let set = self.0.load();
        !set.is_empty() && set.contains(&canonical_serial(serial))
    }
    pub fn len(&self) -> usize {
        self.0.load().len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.load().is_empty()
    }
    fn replace<I: IntoIterator<Item = S>, S: AsRef<str>>(&self, serials: I) {
        let set = serials
            .into_iter()
            .map(|s| canonical_serial(s.as_ref()))
            .collect();
        self.0.store(Arc::new(set));
    }
}

/// What the inbound handshake learned about the peer, attached to the connection.
#[derive(Debug, Clone)]
pub enum PeerAuth {
    Verified(Arc<PeerIdentity>),
    Refused(Reason),
}

/// A verified peer: its identity as the later phases (policy, rate limits) see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub spiffe_id: String,
    pub service: String,
    pub tenant: String,
    pub trust_domain: String,
    /// The serial of the certificate the peer presented (canonical form),
    /// checked against the deny list on every request.
    pub serial: String,
}

impl PeerIdentity {
    pub fn new(id: Identity, serial: &str) -> Self {
        PeerIdentity {
            spiffe_id: id.spiffe_id(),
            service: id.service,
            tenant: id.tenant,
            trust_domain: id.trust_domain,
            serial: canonical_serial(serial),
        }
    }
}

/// Stored in Pingora's `SslDigest::extension` for each inbound TLS connection.
pub struct ConnAuth {
    pub auth: PeerAuth,
}

/// Certificate chain, key and roots, decoded.
pub struct Material {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Vec<CertificateDer<'static>>,
}

impl Material {
    /// Decodes PEM chain, key and bundle. `origin` names where they came
    /// from in errors (a file, or "crank-control").
    pub fn from_pem(
        chain: &[u8],
        key: &[u8],
        bundle: &[u8],
        origin: &str,
    ) -> Result<Material, IdentityError> {
        let chain = crank_certs::pem::certs_from_pem(chain)
            .map_err(|e| ierr("cert", format!("{origin}: {e}")))?;
        let key = crank_certs::pem::key_from_pem(key)
            .map_err(|e| ierr("key", format!("{origin}: {e}")))?;
        let roots = crank_certs::pem::certs_from_pem(bundle)
            .map_err(|e| ierr("trust_bundle", format!("{origin}: {e}")))?;
        Ok(Material { chain, key, roots })
    }
}

fn read_material(cfg: &IdentityConfig, base: &Path) -> Result<Material, IdentityError> {
    let read = |field: &'static str, p: &Path| {
        let p = crate::config::resolve(base, p);
        std::fs::read(&p).map_err(|e| ierr(field, format!("cannot read {}: {e}", p.display())))
    };
    let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) else {
        return Err(ierr(
            "cert",
            "static identity needs identity.cert and identity.key",
        ));
    };
    let chain = crank_certs::pem::certs_from_pem(&read("cert", cert)?).map_err(|e| {
        ierr(
            "cert",
            format!(
                "{}: {e}; use the PEM certificate written by `crankctl cert issue`",
                cert.display()
            ),
        )
    })?;
    let key = crank_certs::pem::key_from_pem(&read("key", key)?).map_err(|e| {
        ierr(
            "key",
            format!(
                "{}: {e}; use the PEM key written by `crankctl cert issue`",
                key.display()
            ),
        )
    })?;
    let roots = read_roots(cfg, base)?;
    Ok(Material { chain, key, roots })
}

/// The roots in `identity.trust_bundle`.
pub fn read_roots(
    cfg: &IdentityConfig,
    base: &Path,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let p = crate::config::resolve(base, &cfg.trust_bundle);
    let pem = std::fs::read(&p)
        .map_err(|e| ierr("trust_bundle", format!("cannot read {}: {e}", p.display())))?;
    crank_certs::pem::certs_from_pem(&pem).map_err(|e| {
        ierr(
            "trust_bundle",
            format!(
                "{}: {e}; point it at the CA's PEM bundle (bundle.pem from `crankctl ca init`)",
                cfg.trust_bundle.display()
            ),
        )
    })
}

/// Checks a chain: every certificate decodes (Pingora's CertKey panics on
/// one that does not) and the leaf carries a Crank identity.
pub fn check_chain(
    chain: &[CertificateDer<'static>],
) -> Result<(CertSummary, Identity), IdentityError> {
    for (i, c) in chain.iter().enumerate().skip(1) {
        CertSummary::from_der(c).map_err(|e| {
            ierr(
                "cert",
                format!("certificate {i} of the chain: {e}; reissue the chain"),
            )
        })?;
    }
    let leaf = chain
        .first()
        .ok_or_else(|| ierr("cert", "the chain is empty"))?;
    let summary = CertSummary::from_der(leaf).map_err(|e| ierr("cert", e.to_string()))?;
    let identity = identity_from_der(leaf).map_err(|e| {
        ierr(
            "cert",
            format!("{e}; issue the certificate with `crankctl cert issue`"),
        )
    })?;
    Ok((summary, identity))
}

fn summaries(roots: &[CertificateDer<'static>]) -> Vec<CertSummary> {
    roots
        .iter()
        .filter_map(|r| CertSummary::from_der(r).ok())
        .collect()
}

impl WorkloadTls {
    /// Loads and checks cert, key and bundle (static mode). Paths resolve
    /// against `base`.
    pub fn load(
        cfg: &IdentityConfig,
        base: &Path,
        metrics: &Metrics,
    ) -> Result<Self, IdentityError> {
        Self::from_material(read_material(cfg, base)?, metrics)
    }

    /// Checks decoded material and builds the swappable TLS state.
    pub fn from_material(m: Material, metrics: &Metrics) -> Result<Self, IdentityError> {
        let (summary, identity) = check_chain(&m.chain)?;
        let certified = certified_key(&m.chain, &m.key)?;
        let roots = root_store(&m.roots)?;
        let deny = DenyList::default();
        let verifier =
            MeshClientVerifier::new(roots, metrics.handshake_failures.clone(), deny.clone())?;
        let resolver = MeshCertResolver {
            current: ArcSwap::from_pointee(certified),
            failures: metrics.handshake_failures.clone(),
        };
        let tls = WorkloadTls {
            identity,
            summary: ArcSwap::from_pointee(summary),
            roots: ArcSwap::from_pointee(summaries(&m.roots)),
            resolver: Arc::new(resolver),
            verifier: Arc::new(verifier),
            client_cert: ArcSwap::from_pointee(client_cert_key(&m.chain, &m.key)),
            bundle: ArcSwap::from_pointee(wrapped_roots(&m.roots).into()),
            deny,
            generation: AtomicU64::new(0),
            retired: ArcSwap::from_pointee(HashMap::new()),
            peer_epoch: AtomicU64::new(0),
            metrics: metrics.clone(),
        };
        tls.publish_expiry();
        Ok(tls)
    }

    /// Swaps in a new certificate chain and key for the same identity. A
    /// chain for another identity is refused and nothing changes.
    pub fn swap_cert(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), IdentityError> {
        let (summary, identity) = check_chain(&chain)?;
        if identity != self.identity {
            return Err(ierr(
                "cert",
                format!(
                    "the new certificate is for {identity}, not this workload's {}; refusing to swap",
                    self.identity
                ),
            ));
        }
        let certified = certified_key(&chain, &key)?;
        self.resolver.current.store(Arc::new(certified));
        self.client_cert
            .store(Arc::new(client_cert_key(&chain, &key)));
        self.summary.store(Arc::new(summary));
        self.peer_epoch.fetch_add(1, Ordering::AcqRel);
        self.publish_expiry();
        Ok(())
    }

    /// Swaps in a new set of roots: the inbound verifier and the outbound
    /// bundle. Pooled outbound connections made under the old roots are
    /// not reused.
    pub fn swap_roots(&self, roots: &[CertificateDer<'static>]) -> Result<(), IdentityError> {
        let store = root_store(roots)?;
        self.verifier.swap_roots(store)?;
        self.bundle.store(Arc::new(wrapped_roots(roots).into()));
        self.roots.store(Arc::new(summaries(roots)));
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.peer_epoch.fetch_add(1, Ordering::AcqRel);
        self.publish_expiry();
        Ok(())
    }

    /// Replaces the deny list. Pooled outbound connections are not reused
    /// after a change, so each peer is checked again on a new connection.
    pub fn set_deny_list<I: IntoIterator<Item = S>, S: AsRef<str>>(&self, serials: I) {
        self.deny.replace(serials);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.peer_epoch.fetch_add(1, Ordering::AcqRel);
        self.metrics
            .identity
            .revoked_serials
            .set(self.deny.len() as i64);
    }

    /// The deny list.
    pub fn deny_list(&self) -> &DenyList {
        &self.deny
    }

    /// True when a peer's certificate serial (any form) is revoked.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.deny.contains(serial)
    }

    /// Our current leaf's subject, serial and validity.
    pub fn summary(&self) -> Arc<CertSummary> {
        self.summary.load_full()
    }

    /// The roots in use.
    pub fn roots(&self) -> Arc<Vec<CertSummary>> {
        self.roots.load_full()
    }

    /// The current root/deny-list generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The outbound pool key part (`HttpPeer::group_key`) for a peer: it
    /// changes at every root or deny-list change and when a connection to
    /// this peer was refused as revoked (an HTTP/2 connection goes back to
    /// Pingora's pool even after an error; this leaves it unused).
    pub fn pool_key(&self, addr: &SocketAddr) -> u64 {
        let retired = self.retired.load().get(addr).copied().unwrap_or(0);
        self.generation() ^ retired.rotate_left(32)
    }

    /// Stops reusing pooled connections to `addr` (see [`Self::pool_key`]).
    pub fn retire_pooled(&self, addr: SocketAddr) {
        self.retired.rcu(|m| {
            let mut m = HashMap::clone(m);
            *m.entry(addr).or_insert(0) += 1;
            m
        });
        self.peer_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Changes after the client certificate, the roots or any pool key
    /// changed: an outbound peer built (from [`Self::client_cert`],
    /// [`Self::bundle`] and [`Self::pool_key`]) after reading an epoch is
    /// current while the epoch still reads the same.
    pub fn peer_epoch(&self) -> u64 {
        self.peer_epoch.load(Ordering::Acquire)
    }

    /// Pingora TLS settings for the inbound listener: TLS 1.3, ALPN h2 then
    /// http/1.1, client certificates verified against the bundle.
    pub fn server_settings(&self, metrics: &Metrics) -> TlsSettings {
        let mut settings = TlsSettings::with_callbacks(Box::new(HandshakeCallbacks {
            failures: metrics.handshake_failures.clone(),
        }))
        .expect("TlsSettings::with_callbacks does not fail");
        settings.set_cert_resolver(self.resolver.clone());
        settings.set_client_cert_verifier(self.verifier.clone());
        settings.enable_h2();
        settings
    }

    /// The client certificate presented to peer sidecars.
    pub fn client_cert(&self) -> Arc<CertKey> {
        self.client_cert.load_full()
    }

    /// The roots peer sidecars' certificates must chain to.
    pub fn bundle(&self) -> Arc<[WrappedX509]> {
        (*self.bundle.load_full()).clone()
    }

    /// `crank_cert_expiry_timestamp_seconds`: our leaf and each root. The
    /// vector is reset first, so retired roots and old leaves disappear.
    fn publish_expiry(&self) {
        let g = &self.metrics.identity.cert_expiry;
        g.reset();
        let leaf = self.summary.load();
        g.with_label_values(&["leaf", &leaf.subject, &canonical_serial(&leaf.serial)])
            .set(leaf.not_after);
        for r in self.roots.load().iter() {
            g.with_label_values(&["root", &r.subject, &canonical_serial(&r.serial)])
                .set(r.not_after);
        }
    }
}

pub(crate) fn certified_key(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<CertifiedKey, IdentityError> {
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| ierr("key", format!("unusable private key: {e}")))?;
    let ck = CertifiedKey::new(chain.to_vec(), signer);
    ck.keys_match()
        .map_err(|e| ierr("key", format!("the key does not match identity.cert ({e}); use the key issued with that certificate")))?;
    Ok(ck)
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, IdentityError> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).map_err(|e| {
            ierr(
                "trust_bundle",
                format!("a root is not a usable CA certificate: {e}"),
            )
        })?;
    }
    Ok(Arc::new(store))
}

fn client_cert_key(chain: &[CertificateDer<'static>], key: &PrivateKeyDer<'static>) -> CertKey {
    let key = match key {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Pkcs1(k) => k.secret_pkcs1_der().to_vec(),
        PrivateKeyDer::Sec1(k) => k.secret_sec1_der().to_vec(),
        _ => key.secret_der().to_vec(),
    };
    CertKey::new(chain.iter().map(|c| c.to_vec()).collect(), key)
}

fn wrapped_roots(roots: &[CertificateDer<'static>]) -> Box<[WrappedX509]> {
    roots
        .iter()
        .map(|r| WrappedX509::new(r.to_vec(), pingora_core::utils::tls::parse_x509))
        .collect()
}

/// Refusal reasons, as counted in `crank_tls_handshake_failures_total`.
pub fn refusal_reason(e: &rustls::Error) -> &'static str {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not-yet-valid"
            }
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown-ca",
            CertificateError::Revoked => "revoked",
            _ => "invalid-cert",
        },
        _ => "invalid-cert",
    }
}

/// What a `tls-identity-mismatch` was: `expected <spiffe id>, presented
/// <spiffe id>[, <spiffe id>…]`, read from the handshake error's text.
///
/// Outbound, Pingora's rustls verifier checks the peer's DNS SAN against the
/// endpoint's `<svc>.<tenant>.<trust-domain>`; its error says `certificate
/// not valid for name "…"; certificate is only valid for DnsName("…") or
/// UniformResourceIdentifier("spiffe://…")`. `expected` is the endpoint's
/// SPIFFE ID when the caller knows it (else the name in the error, as a
/// SPIFFE ID); the presented identities are the certificate's SPIFFE URIs
/// (else its DNS names, as SPIFFE IDs when they are Crank names). `None`
/// when the text is not a name mismatch.
pub fn mismatch_detail(error_text: &str, expected: Option<&str>) -> Option<String> {
    let (_, rest) = error_text.split_once("not valid for name \"")?;
    let (name, presented_text) = rest.split_once('"')?;
    let as_spiffe = |dns: &str| {
        Identity::from_dns(dns)
            .map(|id| id.spiffe_id())
            .unwrap_or_else(|_| dns.to_string())
    };
    let expected = expected.map_or_else(|| as_spiffe(name), str::to_string);
    let quoted = |kind: &str| -> Vec<String> {
        presented_text
            .split(&format!("{kind}(\""))
            .skip(1)
            .filter_map(|s| s.split_once('"').map(|(v, _)| v.to_string()))
            .collect()
    };
    let mut presented: Vec<String> = quoted("UniformResourceIdentifier")
        .into_iter()
        .filter(|u| u.starts_with("spiffe://"))
        .collect();
    if presented.is_empty() {
        presented = quoted("DnsName").iter().map(|d| as_spiffe(d)).collect();
    }
    let presented = if presented.is_empty() {
        "no identity".to_string()
    } else {
        presented.join(", ")
    };
    Some(format!("expected {expected}, presented {presented}"))
}

/// Verifies client certificates against the trust bundle and counts refusals.
/// Authentication is requested, not forced at the TLS layer: a peer without a
/// certificate completes the handshake and is then refused on every request
/// with `client-cert-required`, which tells the caller what is wrong. No
/// request from such a peer ever reaches the app.
#[derive(Debug)]
pub struct MeshClientVerifier {
    inner: ArcSwap<Arc<dyn ClientCertVerifier>>,
    failures: IntCounterVec,
    deny: DenyList,
}

impl MeshClientVerifier {
    /// A verifier for `roots` that also refuses leaves whose serial is in `deny`.
    pub fn new(
        roots: Arc<RootCertStore>,
        failures: IntCounterVec,
        deny: DenyList,
    ) -> Result<Self, IdentityError> {
        Ok(MeshClientVerifier {
            inner: ArcSwap::from_pointee(webpki_verifier(roots)?),
            failures,
            deny,
        })
    }

    fn swap_roots(&self, roots: Arc<RootCertStore>) -> Result<(), IdentityError> {
        self.inner.store(Arc::new(webpki_verifier(roots)?));
        Ok(())
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if !self.deny.is_empty() {
            if let Ok(s) = CertSummary::from_der(end_entity) {
                if self.deny.contains(&s.serial) {
                    return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
                }
            }
        }
        self.inner
            .load()
            .verify_client_cert(end_entity, intermediates, now)
    }
}

fn webpki_verifier(
    roots: Arc<RootCertStore>,
) -> Result<Arc<dyn ClientCertVerifier>, IdentityError> {
    WebPkiClientVerifier::builder(roots)
        .allow_unauthenticated()
        .build()
        .map_err(|e| ierr("trust_bundle", format!("cannot build a verifier: {e}")))
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; sending none keeps this verifier swappable.
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let r = self.verify(end_entity, intermediates, now);
        if let Err(e) = &r {
            let reason = refusal_reason(e);
            self.failures.with_label_values(&["inbound", reason]).inc();
            tracing::warn!(reason, error = %e, "refused inbound mTLS handshake");
        }
        r
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.load().verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.load().verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.load().supported_verify_schemes()
    }
}

/// Serves our certificate, only to clients that offer TLS 1.3.
#[derive(Debug)]
pub struct MeshCertResolver {
    current: ArcSwap<CertifiedKey>,
    failures: IntCounterVec,
}

/// True when a ClientHello offers at least one TLS 1.3 cipher suite.
pub fn offers_tls13(suites: &[CipherSuite]) -> bool {
    suites.iter().any(|s| {
        matches!(
            s,
            CipherSuite::TLS13_AES_128_GCM_SHA256
                | CipherSuite::TLS13_AES_256_GCM_SHA384
                | CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        )
    })
}

impl ResolvesServerCert for MeshCertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if !offers_tls13(hello.cipher_suites()) {
            self.failures
                .with_label_values(&["inbound", "tls-version"])
                .inc();
            tracing::warn!(
                reason = "tls-version",
                "refused inbound handshake: the client does not offer TLS 1.3"
            );
            return None;
        }
        Some(self.current.load_full())
    }
}

/// Reads the verified peer certificate into a [`PeerIdentity`] after each handshake.
pub struct HandshakeCallbacks {
    failures: IntCounterVec,
}

#[async_trait]
impl TlsAccept for HandshakeCallbacks {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let auth = match tls.peer_certificate_der() {
            None => {
                self.failures
                    .with_label_values(&["inbound", "no-client-cert"])
                    .inc();
                tracing::warn!(
                    reason = "no-client-cert",
                    "refused inbound peer: no client certificate"
                );
                PeerAuth::Refused(Reason::ClientCertRequired)
            }
            Some(der) => match peer_identity(der) {
                Ok(id) => PeerAuth::Verified(Arc::new(id)),
                Err(e) => {
                    self.failures
                        .with_label_values(&["inbound", "no-identity"])
                        .inc();
                    tracing::warn!(reason = "no-identity", error = %e, "refused inbound peer");
                    PeerAuth::Refused(Reason::PeerIdentityInvalid)
                }
            },
        };
        Some(Arc::new(ConnAuth { auth }))
    }
}

/// The identity and serial of a verified peer certificate.
fn peer_identity(der: &[u8]) -> Result<PeerIdentity, crank_certs::ParseError> {
    let summary = CertSummary::from_der(der)?;
    let id = match summary.identity {
        Some(id) => id,
        None => identity_from_der(der)?,
    };
    Ok(PeerIdentity::new(id, &summary.serial))
}

/// Peeks at the first byte of each inbound connection: a TLS handshake
/// record starts with 0x16. Anything else is plaintext; it gets a short HTTP
/// 400 saying the port needs mTLS, and the connection is closed.
pub struct PlaintextGuard {
    pub failures: IntCounterVec,
    /// This sidecar's SPIFFE identity, for `x-crank-error-sidecar`.
    pub identity: String,
}

#[async_trait]
impl PreTlsProcess for PlaintextGuard {
    async fn process(&self, stream: &mut L4Stream) -> pingora_error::Result<()> {
        use pingora_core::protocols::Peek;
        use tokio::io::AsyncWriteExt;
        let mut first = [0u8; 1];
        stream.try_peek(&mut first).await.map_err(|e| {
            pingora_error::Error::because(
                pingora_error::ErrorType::ReadError,
                "peeking the first byte",
                e,
            )
        })?;
        if first[0] == 0x16 {
            return Ok(());
        }
        self.failures
            .with_label_values(&["inbound", "plaintext"])
            .inc();
        tracing::warn!(
            reason = "plaintext",
            "refused inbound connection: plaintext on the mTLS port"
        );
        let resp = crate::errors::raw_refusal(
            "400 Bad Request",
            "mtls-required",
            "this port accepts mutual TLS from mesh sidecars only; send the request through your local crank-proxy",
            "inbound",
            &self.identity,
        );
        let _ = stream.write_all(&resp).await;
        let _ = stream.flush().await;
        pingora_error::Error::e_explain(
            pingora_error::ErrorType::HandshakeError,
            "plaintext on the mTLS port",
        )
    }
}

#[cfg(test)]
pub(crate) mod tests;
