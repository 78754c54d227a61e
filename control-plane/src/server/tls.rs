//! The control plane's own TLS: a server certificate for
//! `control.crank-system.<trust-domain>`, issued by itself from the signing
//! intermediate (reissued when the intermediate changes and at two thirds of
//! its life), and a client verifier over the current bundle (client
//! certificates are optional at the TLS layer; renew and watch require one).

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use crank_certs::{Ca, Identity, LeafRequest};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;

use super::config::CertLimits;
use super::now;

pub struct ServerTls {
    config: ArcSwap<ServerConfig>,
    /// `admin_listen`: the same certificate, a client certificate required.
    admin: ArcSwap<ServerConfig>,
    own: Mutex<Own>,
}

/// What the current server config was built from.
#[derive(Clone)]
struct Own {
    issuer: String,
    bundle: String,
    not_before: i64,
    not_after: i64,
    serial: String,
}

/// The control plane's identity in every trust domain.
pub fn control_identity(trust_domain: &str) -> Identity {
    Identity::new("control", "crank-system", trust_domain).expect("a valid trust domain")
}

impl ServerTls {
    pub fn new(signer: &Ca, bundle_pem: &str, limits: &CertLimits) -> Result<Self> {
        let ((config, admin), own) = build(signer, bundle_pem, limits)?;
        Ok(ServerTls {
            config: ArcSwap::from_pointee(config),
            admin: ArcSwap::from_pointee(admin),
            own: Mutex::new(own),
        })
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    /// The config of `admin_listen` (client certificate required).
    pub fn admin(&self) -> Arc<ServerConfig> {
        self.admin.load_full()
    }

    fn own(&self) -> Own {
        self.own.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Rebuilds when the signer or the bundle changed, or the own cert is
    /// two thirds through its life.
    pub fn update(&self, signer: &Ca, bundle_pem: &str, limits: &CertLimits) -> Result<()> {
        let own = self.own();
        let subject = super::state::summary_of(signer.cert_pem())
            .map_err(anyhow::Error::msg)?
            .subject;
        if own.issuer == subject && own.bundle == bundle_pem && !self.needs_renewal() {
            return Ok(());
        }
        let ((config, admin), own) = build(signer, bundle_pem, limits)?;
        self.admin.store(Arc::new(admin));
        tracing::info!(serial = %own.serial, issuer = %own.issuer, "control plane TLS certificate and client roots updated");
        self.config.store(Arc::new(config));
        *self.own.lock().unwrap_or_else(|e| e.into_inner()) = own;
        Ok(())
    }

    pub fn needs_renewal(&self) -> bool {
        let o = self.own();
        now() >= o.not_before + (o.not_after - o.not_before) * 2 / 3
    }

    /// (serial, not_after) of the own certificate.
    pub fn own_cert(&self) -> (String, i64) {
        let o = self.own();
        (o.serial, o.not_after)
    }
}

/// The workload listener's config (client certificate optional) and the
/// admin listener's (required), with what they were built from.
fn build(
    signer: &Ca,
    bundle_pem: &str,
    limits: &CertLimits,
) -> Result<((ServerConfig, ServerConfig), Own)> {
    let id = control_identity(signer.trust_domain());
    let leaf = signer.issue(&LeafRequest::new(id, limits.leaf_ttl))?;
    let chain =
        crank_certs::pem::certs_from_pem(leaf.cert_pem.as_bytes()).map_err(anyhow::Error::msg)?;
    let key =
        crank_certs::pem::key_from_pem(leaf.key_pem.as_bytes()).map_err(anyhow::Error::msg)?;
    let summary = crank_certs::CertSummary::from_der(&chain[0])?;
    let mut roots = rustls::RootCertStore::empty();
    for r in crank_certs::pem::certs_from_pem(bundle_pem.as_bytes()).map_err(anyhow::Error::msg)? {
        roots.add(r).context("a bundle root is not usable")?;
    }
    let roots = Arc::new(roots);
    let config = server_config(roots.clone(), &chain, &key, true)?;
    let admin = server_config(roots, &chain, &key, false)?;
    let own = Own {
        issuer: super::state::summary_of(signer.cert_pem())
            .map_err(anyhow::Error::msg)?
            .subject,
        bundle: bundle_pem.to_string(),
        not_before: summary.not_before,
        not_after: summary.not_after,
        serial: crank_api::identity::canonical_serial(&summary.serial),
    };
    Ok(((config, admin), own))
}

fn server_config(
    roots: Arc<rustls::RootCertStore>,
    chain: &[rustls_pki_types::CertificateDer<'static>],
    key: &rustls_pki_types::PrivateKeyDer<'static>,
    optional_client: bool,
) -> Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    let builder = if optional_client {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    let verifier = builder.build().context("building the client verifier")?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.to_vec(), key.clone_key())
        .context("the control plane's own certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
