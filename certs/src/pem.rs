//! PEM reading helpers shared by the proxy and the CLI.

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Every certificate in a PEM blob, in order. An empty result is an error.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut rd = pem;
    let certs = rustls_pemfile::certs(&mut rd)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no `-----BEGIN CERTIFICATE-----` block found".into());
    }
    Ok(certs)
}

/// The first private key in a PEM blob (PKCS#8, PKCS#1 or SEC1).
pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    let mut rd = pem;
    rustls_pemfile::private_key(&mut rd)
        .map_err(|e| format!("not valid PEM: {e}"))?
        .ok_or_else(|| "no `-----BEGIN PRIVATE KEY-----` block found".to_string())
}
