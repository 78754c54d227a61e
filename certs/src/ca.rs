//! A certificate authority that signs workload leaves (rcgen).
//!
//! `Ca::generate` makes a self-signed root; `Ca::issue` signs a leaf carrying
//! both forms of an [`Identity`]. The CA is saved and loaded as PEM files so
//! `crankctl` can keep it on disk.

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::identity::Identity;

/// Errors from making, loading or using a CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// A CA able to sign leaves: its certificate (PEM) and its key.
pub struct Ca {
    cert_pem: String,
    key: KeyPair,
    trust_domain: String,
}

/// What a leaf should say. `not_before`/`not_after` default to now-1min and now+ttl.
#[derive(Debug, Clone)]
pub struct LeafRequest {
    pub identity: Identity,
    pub ttl: Duration,
    pub not_before: Option<OffsetDateTime>,
    pub not_after: Option<OffsetDateTime>,
}

impl LeafRequest {
    pub fn new(identity: Identity, ttl: Duration) -> Self {
        LeafRequest {
            identity,
            ttl,
            not_before: None,
            not_after: None,
        }
    }
}

/// A signed leaf with its freshly generated key, both PEM.
pub struct IssuedLeaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    /// Makes a new self-signed root CA for `trust_domain`, valid for `ttl`.
    pub fn generate(trust_domain: &str, ttl: Duration) -> Result<Ca, CaError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Crank Mesh");
        dn.push(
            DnType::CommonName,
            format!("Crank Mesh root CA ({trust_domain})"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + ttl;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key,
            trust_domain: trust_domain.to_string(),
        })
    }

    /// Loads a CA from its certificate and key PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str, trust_domain: &str) -> Result<Ca, CaError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| CaError::Invalid(format!("the CA key is not a PEM private key: {e}")))?;
        // Check the certificate parses and matches the key before accepting it.
        Issuer::from_ca_cert_pem(cert_pem, &key)
            .map_err(|e| CaError::Invalid(format!("the CA certificate is not usable: {e}")))?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            key,
            trust_domain: trust_domain.to_string(),
        })
    }

    /// Loads `ca.crt` and `ca.key` from `dir`.
    pub fn load(dir: &Path, trust_domain: &str) -> Result<Ca, CaError> {
        let cert = read(&dir.join("ca.crt"))?;
        let key = read(&dir.join("ca.key"))?;
        Ca::from_pem(&cert, &key, trust_domain)
    }

    /// Writes `ca.crt`, `ca.key` (mode 0600) and `bundle.pem` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        write(&dir.join("ca.crt"), &self.cert_pem, false)?;
        write(&dir.join("bundle.pem"), &self.cert_pem, false)?;
        write(&dir.join("ca.key"), &self.key.serialize_pem(), true)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Signs a leaf for `req.identity` with a new P-256 key.
    pub fn issue(&self, req: &LeafRequest) -> Result<IssuedLeaf, CaError> {
        if req.identity.trust_domain != self.trust_domain {
            return Err(CaError::Invalid(format!(
                "identity {} is outside this CA's trust domain {:?}",
                req.identity, self.trust_domain
            )));
        }
        let id = &req.identity;
        let mut params = CertificateParams::new(vec![id.dns_name()])?;
        params
            .subject_alt_names
            .push(SanType::URI(id.spiffe_id().try_into()?));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, id.tenant.clone());
        dn.push(DnType::CommonName, id.dns_name());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = req.not_before.unwrap_or(now - time::Duration::minutes(1));
        params.not_after = req.not_after.unwrap_or(now + req.ttl);
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(IssuedLeaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl IssuedLeaf {
    /// Writes `<name>.crt` and `<name>.key` (mode 0600) into `dir`; returns their paths.
    pub fn save(&self, dir: &Path, name: &str) -> Result<(String, String), CaError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let crt = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        write(&crt, &self.cert_pem, false)?;
        write(&key, &self.key_pem, true)?;
        Ok((crt.display().to_string(), key.display().to_string()))
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|e| io(path, e))
}

fn write(path: &Path, contents: &str, secret: bool) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| io(path, e))?;
    f.write_all(contents.as_bytes()).map_err(|e| io(path, e))
}

fn io(path: &Path, source: std::io::Error) -> CaError {
    CaError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::CertSummary;

    #[test]
    fn issued_leaf_carries_both_identity_forms() {
        let ca = Ca::generate("crank.local", Duration::from_secs(3600)).unwrap();
        let id = Identity::new("web", "acme", "crank.local").unwrap();
        let leaf = ca
            .issue(&LeafRequest::new(id.clone(), Duration::from_secs(600)))
            .unwrap();
        let der = crate::pem::certs_from_pem(leaf.cert_pem.as_bytes()).unwrap();
        let summary = CertSummary::from_der(&der[0]).unwrap();
        assert_eq!(summary.dns_sans, vec![id.dns_name()]);
        assert_eq!(summary.uri_sans, vec![id.spiffe_id()]);
        assert_eq!(summary.identity.unwrap(), id);
        assert!(!summary.is_ca);
        let lifetime = summary.not_after - summary.not_before;
        assert!((600..=661).contains(&lifetime), "lifetime {lifetime}");
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("crank.local", Duration::from_secs(3600)).unwrap();
        ca.save(dir.path()).unwrap();
        let loaded = Ca::load(dir.path(), "crank.local").unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn refuses_identity_outside_trust_domain() {
        let ca = Ca::generate("crank.local", Duration::from_secs(3600)).unwrap();
        let id = Identity::new("web", "acme", "other.domain").unwrap();
        let err = ca
            .issue(&LeafRequest::new(id, Duration::from_secs(60)))
            .err()
            .unwrap();
        assert!(err.to_string().contains("outside this CA's trust domain"));
    }
}
