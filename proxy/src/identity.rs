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

use std::any::Any;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
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

/// The loaded identity material, swappable in place.
pub struct WorkloadTls {
    /// Our own identity, read from our certificate.
    pub identity: Identity,
    /// Our leaf's validity, for logs and /config_dump.
    pub summary: CertSummary,
    resolver: Arc<MeshCertResolver>,
    verifier: Arc<MeshClientVerifier>,
    client_cert: ArcSwap<CertKey>,
    bundle: ArcSwap<Arc<[WrappedX509]>>,
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
}

impl From<Identity> for PeerIdentity {
    fn from(id: Identity) -> Self {
        PeerIdentity {
            spiffe_id: id.spiffe_id(),
            service: id.service,
            tenant: id.tenant,
            trust_domain: id.trust_domain,
        }
    }
}

/// Stored in Pingora's `SslDigest::extension` for each inbound TLS connection.
pub struct ConnAuth {
    pub auth: PeerAuth,
}

struct Material {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
}

fn read_material(cfg: &IdentityConfig, base: &Path) -> Result<Material, IdentityError> {
    let read = |field: &'static str, p: &Path| {
        let p = crate::config::resolve(base, p);
        std::fs::read(&p).map_err(|e| ierr(field, format!("cannot read {}: {e}", p.display())))
    };
    let chain = crank_certs::pem::certs_from_pem(&read("cert", &cfg.cert)?).map_err(|e| {
        ierr(
            "cert",
            format!(
                "{}: {e}; use the PEM certificate written by `crankctl cert issue`",
                cfg.cert.display()
            ),
        )
    })?;
    let key = crank_certs::pem::key_from_pem(&read("key", &cfg.key)?).map_err(|e| {
        ierr(
            "key",
            format!(
                "{}: {e}; use the PEM key written by `crankctl cert issue`",
                cfg.key.display()
            ),
        )
    })?;
    let roots = crank_certs::pem::certs_from_pem(&read("trust_bundle", &cfg.trust_bundle)?)
        .map_err(|e| {
            ierr(
                "trust_bundle",
                format!(
                    "{}: {e}; point it at the CA's PEM bundle (bundle.pem from `crankctl ca init`)",
                    cfg.trust_bundle.display()
                ),
            )
        })?;
    Ok(Material { chain, key, roots })
}

impl WorkloadTls {
    /// Loads and checks cert, key and bundle. Paths resolve against `base`.
    pub fn load(
        cfg: &IdentityConfig,
        base: &Path,
        metrics: &Metrics,
    ) -> Result<Self, IdentityError> {
        let m = read_material(cfg, base)?;
        // Every certificate must decode: Pingora's CertKey panics on one that does not.
        for (i, c) in m.chain.iter().enumerate().skip(1) {
            CertSummary::from_der(c).map_err(|e| {
                ierr(
                    "cert",
                    format!("certificate {i} of the chain: {e}; reissue the chain"),
                )
            })?;
        }
        let summary =
            CertSummary::from_der(&m.chain[0]).map_err(|e| ierr("cert", e.to_string()))?;
        let identity = identity_from_der(&m.chain[0]).map_err(|e| {
            ierr(
                "cert",
                format!("{e}; issue the certificate with `crankctl cert issue`"),
            )
        })?;
        let certified = certified_key(&m)?;
        let roots = root_store(&m.roots)?;
        let verifier = MeshClientVerifier::new(roots, metrics.handshake_failures.clone())?;
        let resolver = MeshCertResolver {
            current: ArcSwap::from_pointee(certified),
            failures: metrics.handshake_failures.clone(),
        };
        Ok(WorkloadTls {
            identity,
            summary,
            resolver: Arc::new(resolver),
            verifier: Arc::new(verifier),
            client_cert: ArcSwap::from_pointee(client_cert_key(&m)),
            bundle: ArcSwap::from_pointee(wrapped_roots(&m.roots).into()),
        })
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
}

fn certified_key(m: &Material) -> Result<CertifiedKey, IdentityError> {
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(m.key.clone_key())
        .map_err(|e| ierr("key", format!("unusable private key: {e}")))?;
    let ck = CertifiedKey::new(m.chain.clone(), signer);
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

fn client_cert_key(m: &Material) -> CertKey {
    let key = match &m.key {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Pkcs1(k) => k.secret_pkcs1_der().to_vec(),
        PrivateKeyDer::Sec1(k) => k.secret_sec1_der().to_vec(),
        _ => m.key.secret_der().to_vec(),
    };
    CertKey::new(m.chain.iter().map(|c| c.to_vec()).collect(), key)
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

/// Verifies client certificates against the trust bundle and counts refusals.
/// Authentication is requested, not forced at the TLS layer: a peer without a
/// certificate completes the handshake and is then refused on every request
/// with `client-cert-required`, which tells the caller what is wrong. No
/// request from such a peer ever reaches the app.
#[derive(Debug)]
pub struct MeshClientVerifier {
    inner: ArcSwap<Arc<dyn ClientCertVerifier>>,
    failures: IntCounterVec,
}

impl MeshClientVerifier {
    fn new(roots: Arc<RootCertStore>, failures: IntCounterVec) -> Result<Self, IdentityError> {
        let inner = WebPkiClientVerifier::builder(roots)
            .allow_unauthenticated()
            .build()
            .map_err(|e| ierr("trust_bundle", format!("cannot build a verifier: {e}")))?;
        Ok(MeshClientVerifier {
            inner: ArcSwap::from_pointee(inner),
            failures,
        })
    }
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
        let r = self
            .inner
            .load()
            .verify_client_cert(end_entity, intermediates, now);
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
            Some(der) => match identity_from_der(der) {
                Ok(id) => PeerAuth::Verified(Arc::new(id.into())),
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

/// Peeks at the first byte of each inbound connection: a TLS handshake
/// record starts with 0x16. Anything else is plaintext; it gets a short HTTP
/// 400 saying the port needs mTLS, and the connection is closed.
pub struct PlaintextGuard {
    pub failures: IntCounterVec,
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
        let body = "this port accepts mutual TLS from mesh sidecars only; send the request through your local crank-proxy\n";
        let resp = format!(
            "HTTP/1.1 400 Bad Request\r\nx-crank-error: mtls-required\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(resp.as_bytes()).await;
        let _ = stream.flush().await;
        pingora_error::Error::e_explain(
            pingora_error::ErrorType::HandshakeError,
            "plaintext on the mTLS port",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls13_detection() {
        assert!(offers_tls13(&[CipherSuite::TLS13_AES_128_GCM_SHA256]));
        assert!(!offers_tls13(&[
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        ]));
        assert!(!offers_tls13(&[]));
    }

    #[test]
    fn refusal_reasons() {
        use rustls::Error::InvalidCertificate as IC;
        assert_eq!(refusal_reason(&IC(CertificateError::Expired)), "expired");
        assert_eq!(
            refusal_reason(&IC(CertificateError::NotValidYet)),
            "not-yet-valid"
        );
        assert_eq!(
            refusal_reason(&IC(CertificateError::UnknownIssuer)),
            "unknown-ca"
        );
        assert_eq!(
            refusal_reason(&IC(CertificateError::BadEncoding)),
            "invalid-cert"
        );
    }
}
