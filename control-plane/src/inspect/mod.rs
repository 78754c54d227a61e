//! `crankctl cert inspect`: what a certificate file holds, or what chain a
//! server presents over TLS.
//!
//! Both forms build a [`Report`] (plain data, serialisable) and print it
//! either as readable blocks ([`render_human`]) or as JSON
//! ([`render_json`]), in [`render`]; the connect form is [`connect`]. The connect form does a TLS 1.3 handshake (ALPN `h2`,
//! `http/1.1`) with a verifier that accepts any chain but still checks the
//! handshake signatures; with `--ca` the chain is verified against the
//! bundle during that same handshake and the outcome is reported, never
//! fatal, so a chain that does not verify is still shown.

mod connect;
mod render;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use crank_certs::CertSummary;
use rustls::pki_types::CertificateDer;
use serde::Serialize;

pub use connect::connect_report;
pub use render::{render_human, render_json};

/// How a report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    #[default]
    Human,
    Json,
}

impl FromStr for Output {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "human" => Ok(Output::Human),
            "json" => Ok(Output::Json),
            other => Err(format!(
                "unknown output format {other:?}; choose one of: human, json"
            )),
        }
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Output::Human => "human",
            Output::Json => "json",
        })
    }
}

/// What `--connect` needs.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `HOST:PORT` (`[v6]:PORT` for an IPv6 literal).
    pub address: String,
    /// The server name to send (SNI) and to verify the leaf against. Default:
    /// the host part of `address` (an IP literal is verified as an IP SAN
    /// and sends no SNI).
    pub server_name: Option<String>,
    /// A PEM bundle of trusted roots: the chain is verified against it.
    /// Without it the chain is shown unverified.
    pub ca: Option<PathBuf>,
    /// A client certificate chain (PEM) for servers that ask for one.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key: Option<PathBuf>,
    /// Limit for the TCP connect and the TLS handshake together.
    pub timeout: Duration,
}

/// Where a report came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    File,
    Connect,
}

/// Everything `cert inspect` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The file path, or the `HOST:PORT` connected to.
    pub source: String,
    pub kind: SourceKind,
    /// The server name sent and verified against (connect only; an IP
    /// literal is not sent as SNI).
    pub server_name: Option<String>,
    /// `TLSv1.3` (connect only).
    pub tls_version: Option<String>,
    /// The negotiated ALPN protocol (connect only; None when the server
    /// chose none).
    pub alpn: Option<String>,
    /// The outcome of verifying the chain against `--ca` (connect only;
    /// None when no bundle was given).
    pub verified: Option<Verification>,
    /// Whether the server asked for a client certificate and whether one
    /// was sent (connect only).
    pub client_cert: Option<ClientCertStatus>,
    /// Anything else worth knowing, one sentence each.
    pub notes: Vec<String>,
    /// Leaf first, then the rest of the chain, in the order given.
    pub certificates: Vec<CertReport>,
}

/// The result of verifying the presented chain against a bundle.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Verification {
    pub ok: bool,
    /// rustls's reason, e.g. `invalid peer certificate: UnknownIssuer`.
    pub error: Option<String>,
    /// What to check or change, when the reason is a common one.
    pub hint: Option<String>,
    /// The bundle verified against.
    pub bundle: String,
    /// The name the leaf was verified for.
    pub server_name: String,
}

/// Client certificate exchange on a connect.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct ClientCertStatus {
    pub requested: bool,
    pub sent: bool,
}

/// A Crank workload identity, both forms.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IdentityReport {
    pub spiffe_id: String,
    pub dns_name: String,
    pub service: String,
    pub tenant: String,
    pub trust_domain: String,
}

/// One certificate of a chain.
#[derive(Debug, Clone, Serialize)]
pub struct CertReport {
    /// `leaf`, `intermediate`, `root`, or `chain[i]` for a non-CA
    /// certificate after the first.
    pub position: String,
    pub subject: String,
    pub issuer: String,
    /// Hex bytes separated by colons.
    pub serial: String,
    /// The Crank identity, when the SPIFFE and DNS SANs name one.
    pub identity: Option<IdentityReport>,
    /// Why a non-CA certificate has no Crank identity.
    pub identity_error: Option<String>,
    pub dns_sans: Vec<String>,
    pub uri_sans: Vec<String>,
    /// Unix seconds.
    pub not_before: i64,
    pub not_before_rfc3339: String,
    /// Unix seconds.
    pub not_after: i64,
    pub not_after_rfc3339: String,
    /// Seconds from the time of inspection to `not_after`; negative when
    /// expired.
    pub expires_in_seconds: i64,
    pub expired: bool,
    pub not_yet_valid: bool,
    pub is_ca: bool,
}

/// Inspect every certificate in a PEM file (leaf first, then chain).
pub fn inspect_file(path: &Path, output: Output) -> Result<()> {
    let report = file_report(path)?;
    print_report(&report, output)
}

/// Connect to HOST:PORT with TLS 1.3 (ALPN h2, http/1.1), print the chain
/// the server presents.
pub fn inspect_connect(opts: &ConnectOptions, output: Output) -> Result<()> {
    let report = connect_report(opts)?;
    print_report(&report, output)
}

fn print_report(report: &Report, output: Output) -> Result<()> {
    match output {
        Output::Human => print!("{}", render_human(report)),
        Output::Json => println!("{}", render_json(report)?),
    }
    Ok(())
}

/// The report for a certificate file (PEM; a single DER certificate is
/// accepted too).
pub fn file_report(path: &Path) -> Result<Report> {
    let bytes = std::fs::read(path).map_err(|e| {
        anyhow!(
            "cannot read {}: {e}; pass the path of a PEM certificate file (e.g. the .crt written by `crankctl cert issue`)",
            path.display()
        )
    })?;
    let ders = certs_in(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let certificates =
        cert_reports(&ders, unix_now()).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(Report {
        source: path.display().to_string(),
        kind: SourceKind::File,
        server_name: None,
        tls_version: None,
        alpn: None,
        verified: None,
        client_cert: None,
        notes: Vec::new(),
        certificates,
    })
}

/// The certificates in `bytes`: every PEM certificate block, or the whole
/// input as one DER certificate.
fn certs_in(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(
            "the file is empty; pass a PEM certificate file (-----BEGIN CERTIFICATE-----)".into(),
        );
    }
    match crank_certs::pem::certs_from_pem(bytes) {
        Ok(certs) => Ok(certs),
        // Binary DER (starts with a SEQUENCE): one certificate.
        Err(_) if bytes[0] == 0x30 && CertSummary::from_der(bytes).is_ok() => {
            Ok(vec![CertificateDer::from(bytes.to_vec())])
        }
        Err(e) => {
            let hint = if contains(bytes, b"PRIVATE KEY-----") {
                "this looks like a private key; pass the certificate (.crt) instead"
            } else if contains(bytes, b"CERTIFICATE REQUEST-----") {
                "this is a certificate request (CSR), not a certificate"
            } else {
                "pass a PEM certificate file (-----BEGIN CERTIFICATE-----)"
            };
            Err(format!("{e}; {hint}"))
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// One [`CertReport`] per certificate, times relative to `now` (unix
/// seconds).
pub fn cert_reports(ders: &[CertificateDer<'_>], now: i64) -> Result<Vec<CertReport>, String> {
    ders.iter()
        .enumerate()
        .map(|(i, der)| {
            let s = CertSummary::from_der(der).map_err(|e| {
                format!("certificate [{i}] is not valid X.509 ({e}); the file or chain is damaged")
            })?;
            let identity_error = match (&s.identity, s.is_ca) {
                (None, false) => crank_certs::identity_from_der(der)
                    .err()
                    .map(|e| e.to_string()),
                _ => None,
            };
            Ok(cert_report(i, s, identity_error, now))
        })
        .collect()
}

fn cert_report(
    index: usize,
    s: CertSummary,
    identity_error: Option<String>,
    now: i64,
) -> CertReport {
    let self_signed = s.subject == s.issuer;
    let position = if s.is_ca && self_signed {
        "root".to_string()
    } else if s.is_ca {
        "intermediate".to_string()
    } else if index == 0 {
        "leaf".to_string()
    } else {
        format!("chain[{index}]")
    };
    let expires_in_seconds = s.not_after - now;
    CertReport {
        position,
        identity: s.identity.as_ref().map(|id| IdentityReport {
            spiffe_id: id.spiffe_id(),
            dns_name: id.dns_name(),
            service: id.service.clone(),
            tenant: id.tenant.clone(),
            trust_domain: id.trust_domain.clone(),
        }),
        identity_error,
        not_before_rfc3339: rfc3339(s.not_before),
        not_after_rfc3339: rfc3339(s.not_after),
        expires_in_seconds,
        expired: expires_in_seconds < 0,
        not_yet_valid: s.not_before > now,
        subject: s.subject,
        issuer: s.issuer,
        serial: s.serial,
        dns_sans: s.dns_sans,
        uri_sans: s.uri_sans,
        not_before: s.not_before,
        not_after: s.not_after,
        is_ca: s.is_ca,
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn rfc3339(ts: i64) -> String {
    let t = if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    };
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A duration in the two largest units: `23h 59m`, `5m`, `3d 2h`, `40s`.
pub fn short_duration(secs: u64) -> String {
    const M: u64 = 60;
    const H: u64 = 60 * M;
    const D: u64 = 24 * H;
    let two = |big: u64, bu: &str, small: u64, su: &str| {
        if small == 0 {
            format!("{big}{bu}")
        } else {
            format!("{big}{bu} {small}{su}")
        }
    };
    if secs >= D {
        two(secs / D, "d", secs % D / H, "h")
    } else if secs >= H {
        two(secs / H, "h", secs % H / M, "m")
    } else if secs >= M {
        two(secs / M, "m", secs % M, "s")
    } else {
        format!("{secs}s")
    }
}
