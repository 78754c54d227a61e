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

/// A CA able to sign leaves: its certificate (PEM) and its key. A root is
/// self-signed; an intermediate is signed by a root and sends its own
/// certificate after every leaf it signs ([`Ca::chain_pem`]).
pub struct Ca {
    cert_pem: String,
    key: KeyPair,
    trust_domain: String,
    intermediate: bool,
}

/// A leaf signed from a workload's CSR: the chain to send (leaf, then the
/// intermediate when there is one) and what the inventory keeps.
#[derive(Debug, Clone)]
pub struct SignedLeaf {
    pub chain_pem: String,
    /// Lower-case hex, no separators.
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
}

/// Why a CSR was refused. Each names what the workload must change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("the CSR is not a PEM/DER PKCS#10 request ({0}); send the CSR the proxy generates, unmodified")]
    Malformed(String),
    #[error("the CSR's signature does not verify against its public key; make a new CSR with the key it names")]
    BadSignature,
    #[error("the CSR asks for {asked}, but this request may only be issued {granted}; ask for exactly that identity, or use a token for the other one")]
    IdentityNotGranted { asked: String, granted: String },
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
    /// Its subject names its key (a key id): every root has its own, so a
    /// verifier holding several roots never picks one by a shared name and
    /// fails on its signature.
    pub fn generate(trust_domain: &str, ttl: Duration) -> Result<Ca, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Crank Mesh");
        dn.push(
            DnType::CommonName,
            format!("Crank Mesh root CA ({trust_domain}) {}", key_id(&key)),
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
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key,
            trust_domain: trust_domain.to_string(),
            intermediate: false,
        })
    }

    /// Makes an intermediate CA signed by this root, valid for `ttl` (capped
    /// at the root's own expiry). Its subject carries the time it was made
    /// and its key id, so several generations are told apart in `crankctl ca
    /// status` and no two intermediates share a name.
    pub fn generate_intermediate(&self, ttl: Duration) -> Result<Ca, CaError> {
        if self.intermediate {
            return Err(CaError::Invalid(
                "an intermediate can only be signed by a root; pass the root's directory (made by `crankctl ca init`)".into(),
            ));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let now = OffsetDateTime::now_utc();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Crank Mesh");
        dn.push(
            DnType::CommonName,
            format!(
                "Crank Mesh intermediate CA ({}) {} {}",
                self.trust_domain,
                stamp(now),
                key_id(&key)
            ),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = now - time::Duration::minutes(1);
        let root_end = crate::parse::CertSummary::from_der(
            &crate::pem::certs_from_pem(self.cert_pem.as_bytes()).map_err(CaError::Invalid)?[0],
        )
        .map_err(|e| CaError::Invalid(e.to_string()))?
        .not_after;
        let wanted = now + ttl;
        params.not_after =
            wanted.min(OffsetDateTime::from_unix_timestamp(root_end).unwrap_or(wanted));
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key,
            trust_domain: self.trust_domain.clone(),
            intermediate: true,
        })
    }

    /// True for an intermediate (not self-signed).
    pub fn is_intermediate(&self) -> bool {
        self.intermediate
    }

    /// What follows a leaf signed by this CA on the wire: the intermediate's
    /// certificate, or nothing for a root.
    pub fn chain_pem(&self) -> &str {
        if self.intermediate {
            &self.cert_pem
        } else {
            ""
        }
    }

    /// The private key, PEM (for uploading a new intermediate to crank-control).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Loads a CA from its certificate and key PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str, trust_domain: &str) -> Result<Ca, CaError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| CaError::Invalid(format!("the CA key is not a PEM private key: {e}")))?;
        // Check the certificate parses and matches the key before accepting it.
        Issuer::from_ca_cert_pem(cert_pem, &key)
            .map_err(|e| CaError::Invalid(format!("the CA certificate is not usable: {e}")))?;
        let der = crate::pem::certs_from_pem(cert_pem.as_bytes())
            .map_err(|e| CaError::Invalid(format!("the CA certificate: {e}")))?;
        let summary = crate::parse::CertSummary::from_der(&der[0])
            .map_err(|e| CaError::Invalid(e.to_string()))?;
        if !summary.is_ca {
            return Err(CaError::Invalid(
                "the certificate is not a CA certificate; use ca.crt from `crankctl ca init` or `crankctl ca intermediate`".into(),
            ));
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(&der[0])
            .map_err(|e| CaError::Invalid(e.to_string()))?;
        if &*parsed.public_key().subject_public_key.data != key.public_key_raw() {
            return Err(CaError::Invalid(
                "the CA key does not belong to the CA certificate; use the ca.key written with that ca.crt".into(),
            ));
        }
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            key,
            trust_domain: trust_domain.to_string(),
            intermediate: summary.subject != summary.issuer,
        })
    }

    /// Loads `ca.crt` and `ca.key` from `dir`.
    pub fn load(dir: &Path, trust_domain: &str) -> Result<Ca, CaError> {
        let cert = read(&dir.join("ca.crt"))?;
        let key = read(&dir.join("ca.key"))?;
        Ca::from_pem(&cert, &key, trust_domain)
    }

    /// Writes `ca.crt`, `ca.key` (mode 0600) and `bundle.pem` (the root) into
    /// `dir`. For an intermediate, `root_pem` is its root.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        self.save_with_root(dir, &self.cert_pem)
    }

    /// As [`Ca::save`], with the bundle given: for an intermediate, its root.
    pub fn save_with_root(&self, dir: &Path, root_pem: &str) -> Result<(), CaError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        write(&dir.join("ca.crt"), &self.cert_pem, false)?;
        write(&dir.join("bundle.pem"), root_pem, false)?;
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
        let params = self.leaf_params(&req.identity, req.ttl, req.not_before, req.not_after)?;
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(IssuedLeaf {
            cert_pem: format!("{}{}", cert.pem(), self.chain_pem()),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a workload's CSR for `granted`, valid for `ttl`. Only the CSR's
    /// public key is used; the certificate says what Crank decides (both
    /// identity SANs, leaf usages). The CSR must ask for `granted` and nothing
    /// else: its SPIFFE URI SAN is required, its DNS SAN optional.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        granted: &Identity,
        ttl: Duration,
    ) -> Result<SignedLeaf, SignCsrError> {
        use rcgen::CertificateSigningRequestParams;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
            rcgen::Error::InvalidCertificationRequestSignature => {
                SignCsrError::Csr(CsrError::BadSignature)
            }
            other => SignCsrError::Csr(CsrError::Malformed(other.to_string())),
        })?;
        let asked = csr_identity(&csr.params.subject_alt_names);
        if asked.as_deref() != Some(granted.spiffe_id().as_str()) {
            return Err(SignCsrError::Csr(CsrError::IdentityNotGranted {
                asked: asked.unwrap_or_else(|| "names that are not a Crank identity".into()),
                granted: granted.spiffe_id(),
            }));
        }
        let params = self.leaf_params(granted, ttl, None, None)?;
        let serial = hex(params
            .serial_number
            .as_ref()
            .map(|s| s.as_ref())
            .unwrap_or(&[]));
        let (not_before, not_after) = (
            params.not_before.unix_timestamp(),
            params.not_after.unix_timestamp(),
        );
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(CaError::from)?;
        let cert = signed.signed_by(&issuer).map_err(CaError::from)?;
        Ok(SignedLeaf {
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem()),
            serial: crank_serial(&serial),
            not_before,
            not_after,
        })
    }

    fn leaf_params(
        &self,
        id: &Identity,
        ttl: Duration,
        not_before: Option<OffsetDateTime>,
        not_after: Option<OffsetDateTime>,
    ) -> Result<CertificateParams, CaError> {
        if id.trust_domain != self.trust_domain {
            return Err(CaError::Invalid(format!(
                "identity {} is outside this CA's trust domain {:?}",
                id, self.trust_domain
            )));
        }
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
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        // Backdated for clock skew: a minute, or a tenth of a short lifetime.
        let skew = time::Duration::seconds((ttl.as_secs() / 10).clamp(1, 60) as i64);
        params.not_before = not_before.unwrap_or(now - skew);
        params.not_after = not_after.unwrap_or(now + ttl);
        Ok(params)
    }
}

/// Why [`Ca::sign_csr`] refused.
#[derive(Debug, thiserror::Error)]
pub enum SignCsrError {
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// The SPIFFE ID a CSR asks for, when it asks for exactly one Crank
/// identity (a SPIFFE URI SAN, plus at most the matching DNS SAN).
fn csr_identity(sans: &[SanType]) -> Option<String> {
    let mut spiffe = None;
    let mut dns = Vec::new();
    for san in sans {
        match san {
            SanType::URI(u) if spiffe.is_none() => spiffe = Some(u.as_str().to_string()),
            SanType::DnsName(d) => dns.push(d.as_str().to_string()),
            _ => return None,
        }
    }
    let id = Identity::from_spiffe(spiffe.as_deref()?).ok()?;
    if dns.iter().any(|d| *d != id.dns_name()) {
        return None;
    }
    Some(id.spiffe_id())
}

fn random_serial() -> rcgen::SerialNumber {
    let mut b = [0u8; 16];
    rand_bytes(&mut b);
    b[0] &= 0x7f; // positive
    b[0] |= 0x10; // no leading zero byte, so every form of it agrees
    rcgen::SerialNumber::from_slice(&b)
}

fn rand_bytes(out: &mut [u8]) {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new()
        .fill(out)
        .expect("the system random source works");
}

/// Random bytes as lower-case hex (tokens, instance ids).
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand_bytes(&mut b);
    hex(&b)
}

/// A short id of a CA key for its subject name: the first 8 bytes of the
/// SHA-256 of its public key, lower-case hex. The same key always gives the
/// same id.
fn key_id(key: &KeyPair) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key_raw());
    hex(&digest.as_ref()[..8])
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn crank_serial(s: &str) -> String {
    s.trim_start_matches("00").to_string()
}

fn stamp(t: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A new P-256 key and a CSR for `id` (both SANs), both PEM. The key stays
/// with the caller.
pub fn new_key_and_csr(id: &Identity) -> Result<(String, String), CaError> {
    let mut params = CertificateParams::new(vec![id.dns_name()])?;
    params
        .subject_alt_names
        .push(SanType::URI(id.spiffe_id().try_into()?));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id.dns_name());
    params.distinguished_name = dn;
    let key = KeyPair::generate()?;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
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
    fn intermediate_signs_leaves_that_carry_it() {
        let root = Ca::generate("crank.local", Duration::from_secs(3600)).unwrap();
        let inter = root
            .generate_intermediate(Duration::from_secs(7200))
            .unwrap();
        assert!(inter.is_intermediate() && !root.is_intermediate());
        assert!(inter
            .generate_intermediate(Duration::from_secs(60))
            .is_err());
        let s = CertSummary::from_der(
            &crate::pem::certs_from_pem(inter.cert_pem().as_bytes()).unwrap()[0],
        )
        .unwrap();
        let r = CertSummary::from_der(
            &crate::pem::certs_from_pem(root.cert_pem().as_bytes()).unwrap()[0],
        )
        .unwrap();
        assert!(s.is_ca);
        assert_eq!(s.issuer, r.subject);
        assert!(s.not_after <= r.not_after, "capped at the root's expiry");
        let id = Identity::new("web", "acme", "crank.local").unwrap();
        let leaf = inter
            .issue(&LeafRequest::new(id, Duration::from_secs(60)))
            .unwrap();
        let chain = crate::pem::certs_from_pem(leaf.cert_pem.as_bytes()).unwrap();
        assert_eq!(chain.len(), 2, "leaf then intermediate");
        // Reloaded from PEM it is still an intermediate.
        let again = Ca::from_pem(inter.cert_pem(), &inter.key_pem(), "crank.local").unwrap();
        assert!(again.is_intermediate());
        assert!(
            Ca::from_pem(inter.cert_pem(), &root.key_pem(), "crank.local").is_err(),
            "key of another CA"
        );
    }

    #[test]
    fn csr_signing_grants_only_the_token_identity() {
        let root = Ca::generate("crank.local", Duration::from_secs(3600)).unwrap();
        let inter = root
            .generate_intermediate(Duration::from_secs(3600))
            .unwrap();
        let web = Identity::new("web", "acme", "crank.local").unwrap();
        let api = Identity::new("api", "acme", "crank.local").unwrap();
        let (_, csr) = new_key_and_csr(&web).unwrap();
        let signed = inter
            .sign_csr(&csr, &web, Duration::from_secs(600))
            .unwrap();
        let chain = crate::pem::certs_from_pem(signed.chain_pem.as_bytes()).unwrap();
        let s = CertSummary::from_der(&chain[0]).unwrap();
        assert_eq!(s.identity.as_ref(), Some(&web));
        assert_eq!(s.serial.replace(':', ""), signed.serial);
        assert!(matches!(
            inter.sign_csr(&csr, &api, Duration::from_secs(600)),
            Err(SignCsrError::Csr(CsrError::IdentityNotGranted { .. }))
        ));
        assert!(matches!(
            inter.sign_csr("not a csr", &web, Duration::from_secs(600)),
            Err(SignCsrError::Csr(CsrError::Malformed(_)))
        ));
    }

    fn subject(pem: &str) -> String {
        CertSummary::from_der(&crate::pem::certs_from_pem(pem.as_bytes()).unwrap()[0])
            .unwrap()
            .subject
    }

    #[test]
    fn every_root_and_intermediate_has_its_own_subject() {
        let a = Ca::generate("crank.local", Duration::from_secs(3600)).unwrap();
        let b = Ca::generate("crank.local", Duration::from_secs(3600)).unwrap();
        let (sa, sb) = (subject(a.cert_pem()), subject(b.cert_pem()));
        assert_ne!(sa, sb, "two roots of one trust domain");
        // The name says which key: stable for a key, and it survives a reload.
        assert!(sa.contains(&key_id(&a.key)), "{sa}");
        assert!(sa.contains("Crank Mesh root CA (crank.local) "), "{sa}");
        let again = Ca::from_pem(a.cert_pem(), &a.key_pem(), "crank.local").unwrap();
        assert_eq!(key_id(&again.key), key_id(&a.key));
        let (ia, ib) = (
            a.generate_intermediate(Duration::from_secs(60)).unwrap(),
            a.generate_intermediate(Duration::from_secs(60)).unwrap(),
        );
        let (sia, sib) = (subject(ia.cert_pem()), subject(ib.cert_pem()));
        assert_ne!(sia, sib, "two intermediates made in the same second");
        assert!(sia.contains(&key_id(&ia.key)), "{sia}");
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
