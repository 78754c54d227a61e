//! Reading identities and validity back out of DER certificates (x509-parser).

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("the certificate is not valid DER X.509: {0}")]
    Der(String),
    #[error("the certificate has no Crank identity: {0}")]
    NoIdentity(String),
}

/// What a certificate says, in plain data.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertSummary {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub dns_sans: Vec<String>,
    pub uri_sans: Vec<String>,
    pub is_ca: bool,
    /// The identity, when the DNS and SPIFFE SANs agree on one.
    pub identity: Option<Identity>,
}

impl CertSummary {
    pub fn from_der(der: &[u8]) -> Result<Self, ParseError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| ParseError::Der(e.to_string()))?;
        let mut dns_sans = Vec::new();
        let mut uri_sans = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns_sans.push(d.to_string()),
                    GeneralName::URI(u) => uri_sans.push(u.to_string()),
                    _ => {}
                }
            }
        }
        let identity = identity_of(&dns_sans, &uri_sans).ok();
        Ok(CertSummary {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            dns_sans,
            uri_sans,
            is_ca: cert.is_ca(),
            identity,
        })
    }
}

/// The Crank identity of a leaf certificate. The SPIFFE URI SAN is
/// authoritative; when a DNS SAN of the Crank form is present too, it must
/// name the same identity.
pub fn identity_from_der(der: &[u8]) -> Result<Identity, ParseError> {
    let s = CertSummary::from_der(der)?;
    identity_of(&s.dns_sans, &s.uri_sans)
}

fn identity_of(dns: &[String], uris: &[String]) -> Result<Identity, ParseError> {
    let spiffe: Vec<&String> = uris.iter().filter(|u| u.starts_with("spiffe://")).collect();
    let id = match spiffe.as_slice() {
        [one] => Identity::from_spiffe(one).map_err(|e| ParseError::NoIdentity(e.to_string()))?,
        [] => return Err(ParseError::NoIdentity("no spiffe:// URI SAN".into())),
        _ => {
            return Err(ParseError::NoIdentity(
                "more than one spiffe:// URI SAN".into(),
            ))
        }
    };
    let suffix = format!(".{}", id.trust_domain);
    for d in dns.iter().filter(|d| d.ends_with(&suffix)) {
        if *d != id.dns_name() {
            return Err(ParseError::NoIdentity(format!(
                "DNS SAN {d} disagrees with SPIFFE ID {}",
                id.spiffe_id()
            )));
        }
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn identity_rules() {
        let spiffe = "spiffe://crank.local/tenant/acme/svc/web";
        assert!(identity_of(&s(&["web.acme.crank.local"]), &s(&[spiffe])).is_ok());
        assert!(identity_of(&s(&[]), &s(&[spiffe])).is_ok());
        assert!(identity_of(&s(&["web.acme.crank.local"]), &s(&[])).is_err());
        assert!(identity_of(&s(&["api.acme.crank.local"]), &s(&[spiffe])).is_err());
        assert!(identity_of(&s(&[]), &s(&[spiffe, spiffe])).is_err());
    }
}
