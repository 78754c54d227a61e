//! `crankctl cert inspect`: what a certificate file holds, or what chain a
//! server presents over TLS.
//!
//! Both forms build a [`Report`] (plain data, serialisable) and print it
//! either as readable blocks ([`render_human`]) or as JSON
//! ([`render_json`]). The connect form does a TLS 1.3 handshake (ALPN `h2`,
//! `http/1.1`) with a verifier that accepts any chain but still checks the
//! handshake signatures; with `--ca` the chain is verified against the
//! bundle during that same handshake and the outcome is reported, never
//! fatal, so a chain that does not verify is still shown.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Result};
use crank_certs::CertSummary;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
    SignatureScheme,
};
use serde::Serialize;

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

/// The report as pretty JSON.
pub fn render_json(report: &Report) -> Result<String> {
    Ok(serde_json::to_string_pretty(report)?)
}

/// The report as readable text: a header, then one block per certificate.
pub fn render_human(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let n = report.certificates.len();
    let plural = if n == 1 { "" } else { "s" };
    match report.kind {
        SourceKind::File => {
            let _ = writeln!(out, "{}: {n} certificate{plural}", report.source);
        }
        SourceKind::Connect => {
            let name = match &report.server_name {
                Some(name) => format!(" (server name {name})"),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "{}{name}: {}, ALPN {}",
                report.source,
                report
                    .tls_version
                    .as_deref()
                    .unwrap_or("unknown TLS version"),
                report.alpn.as_deref().unwrap_or("none"),
            );
            match &report.verified {
                Some(v) if v.ok => {
                    let _ = writeln!(
                        out,
                        "chain verified against {} for {}",
                        v.bundle, v.server_name
                    );
                }
                Some(v) => {
                    let _ = writeln!(
                        out,
                        "chain NOT verified: {} (against {} for {})",
                        v.error.as_deref().unwrap_or("unknown error"),
                        v.bundle,
                        v.server_name
                    );
                    if let Some(hint) = &v.hint {
                        let _ = writeln!(out, "  hint: {hint}");
                    }
                }
                None => {
                    let _ = writeln!(out, "not verified (pass --ca BUNDLE to verify)");
                }
            }
            if let Some(c) = report.client_cert {
                let line = match (c.requested, c.sent) {
                    (true, true) => "requested by the server, sent",
                    (true, false) => {
                        "requested by the server, none sent (pass --cert and --key to send one)"
                    }
                    (false, true) => "not requested by the server, so not sent",
                    (false, false) => "not requested by the server",
                };
                let _ = writeln!(out, "client certificate: {line}");
            }
            let _ = writeln!(out, "{n} certificate{plural} presented");
        }
    }
    for note in &report.notes {
        let _ = writeln!(out, "note: {note}");
    }
    for (i, c) in report.certificates.iter().enumerate() {
        out.push('\n');
        let _ = writeln!(out, "[{i}] {}", c.position);
        let field = |out: &mut String, name: &str, value: &str| {
            let _ = writeln!(out, "  {:<10} {value}", format!("{name}:"));
        };
        match (&c.identity, &c.identity_error) {
            (Some(id), _) => field(
                &mut out,
                "identity",
                &format!("{} ({})", id.spiffe_id, id.dns_name),
            ),
            (None, Some(why)) => field(&mut out, "identity", &format!("none: {why}")),
            (None, None) => {}
        }
        if !c.dns_sans.is_empty() || !c.is_ca {
            field(&mut out, "DNS SANs", &list(&c.dns_sans));
        }
        if !c.uri_sans.is_empty() || !c.is_ca {
            field(&mut out, "URI SANs", &list(&c.uri_sans));
        }
        let state = if c.expired {
            format!(
                "EXPIRED {} ago",
                short_duration(c.expires_in_seconds.unsigned_abs())
            )
        } else if c.not_yet_valid {
            format!(
                "NOT YET VALID, expires in {}",
                short_duration(c.expires_in_seconds.unsigned_abs())
            )
        } else {
            format!(
                "expires in {}",
                short_duration(c.expires_in_seconds.unsigned_abs())
            )
        };
        field(
            &mut out,
            "valid",
            &format!(
                "{} to {} ({state})",
                c.not_before_rfc3339, c.not_after_rfc3339
            ),
        );
        field(&mut out, "subject", &c.subject);
        field(&mut out, "issuer", &c.issuer);
        field(&mut out, "serial", &c.serial);
        field(&mut out, "CA", if c.is_ca { "yes" } else { "no" });
    }
    out
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

// ---------------------------------------------------------------------------
// --connect

/// Connects (TLS 1.3, ALPN h2 and http/1.1), and builds the report of the
/// presented chain. Runs its own current-thread runtime: call it from
/// synchronous code, not from inside a tokio runtime.
pub fn connect_report(opts: &ConnectOptions) -> Result<Report> {
    let (host, _port) = split_address(&opts.address)?;
    let name_text = opts.server_name.clone().unwrap_or_else(|| host.clone());
    let server_name = ServerName::try_from(name_text.clone()).map_err(|_| {
        anyhow!(
            "{name_text:?} is not a valid server name (a DNS name or an IP address); pass --server-name <service>.<tenant>.<trust-domain>"
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let webpki = match &opts.ca {
        Some(path) => Some(webpki_verifier(path, &provider)?),
        None => None,
    };
    let verifier = Arc::new(InspectVerifier {
        algs: provider.signature_verification_algorithms,
        webpki,
        result: Mutex::new(None),
    });
    let client_auth = Arc::new(ClientAuth::load(opts, &provider)?);

    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| anyhow!("TLS configuration: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_client_cert_resolver(client_auth.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow!("starting the I/O runtime: {e}"))?;
    let handshake = rt.block_on(handshake(
        opts,
        Arc::new(config),
        server_name,
        client_auth.clone(),
    ))?;

    let certificates =
        cert_reports(&handshake.chain, unix_now()).map_err(|e| anyhow!("{}: {e}", opts.address))?;
    let verified = opts.ca.as_ref().map(|bundle| {
        let result = verifier
            .result
            .lock()
            .map(|mut r| r.take())
            .unwrap_or(None)
            .unwrap_or_else(|| Err(VerifyFailure::other("the server sent no certificate")));
        let (ok, error, hint) = match result {
            Ok(()) => (true, None, None),
            Err(f) => (false, Some(f.error), f.hint),
        };
        Verification {
            ok,
            error,
            hint: hint.map(|h| h.replace("BUNDLE", &bundle.display().to_string())),
            bundle: bundle.display().to_string(),
            server_name: name_text.clone(),
        }
    });
    let requested = client_auth.was_requested();
    Ok(Report {
        source: opts.address.clone(),
        kind: SourceKind::Connect,
        server_name: Some(name_text),
        tls_version: handshake.version,
        alpn: handshake.alpn,
        verified,
        client_cert: Some(ClientCertStatus {
            requested,
            sent: requested && client_auth.key.is_some(),
        }),
        notes: handshake.notes,
        certificates,
    })
}

/// `HOST:PORT` or `[V6]:PORT` into the host (no brackets) and port.
fn split_address(address: &str) -> Result<(String, u16)> {
    let bad = || {
        anyhow!(
            "--connect {address:?}: expected HOST:PORT, e.g. web.acme.example:8443, 127.0.0.1:15006 or [::1]:15006"
        )
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let host = match host.strip_prefix('[') {
        Some(rest) => rest.strip_suffix(']').ok_or_else(bad)?,
        None if host.contains(':') => return Err(bad()),
        None => host,
    };
    if host.is_empty() {
        return Err(bad());
    }
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok((host.to_string(), port))
}

fn webpki_verifier(
    path: &Path,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>> {
    let bytes = std::fs::read(path).map_err(|e| {
        anyhow!(
            "cannot read --ca {}: {e}; pass the mesh's CA bundle (bundle.pem from `crankctl ca init`)",
            path.display()
        )
    })?;
    let certs = certs_in(&bytes).map_err(|e| anyhow!("--ca {}: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        bail!(
            "--ca {}: no usable CA certificate in the bundle; pass the mesh's CA bundle (bundle.pem from `crankctl ca init`)",
            path.display()
        );
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| anyhow!("--ca {}: {e}", path.display()))
}

struct Handshake {
    chain: Vec<CertificateDer<'static>>,
    version: Option<String>,
    alpn: Option<String>,
    notes: Vec<String>,
}

async fn handshake(
    opts: &ConnectOptions,
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    client_auth: Arc<ClientAuth>,
) -> Result<Handshake> {
    use tokio::io::AsyncReadExt;
    use tokio::time::timeout_at;

    let addr = &opts.address;
    let limit = humantime::format_duration(opts.timeout);
    let deadline = tokio::time::Instant::from_std(Instant::now() + opts.timeout);

    let addrs: Vec<std::net::SocketAddr> =
        match timeout_at(deadline, tokio::net::lookup_host(addr.as_str())).await {
            Err(_) => bail!(
                "resolving {addr} timed out after {limit}; check the host name and DNS, or raise --timeout"
            ),
            Ok(Err(e)) => bail!("cannot resolve {addr}: {e}; check the host name"),
            Ok(Ok(a)) => a.collect(),
        };
    if addrs.is_empty() {
        bail!("{addr} resolves to no address; check the host name");
    }

    let mut last_err = None;
    let mut tcp = None;
    for a in &addrs {
        match timeout_at(deadline, tokio::net::TcpStream::connect(a)).await {
            Err(_) => bail!(
                "connecting to {addr} timed out after {limit}; check the address and that no firewall drops the traffic, or raise --timeout"
            ),
            Ok(Ok(s)) => {
                tcp = Some(s);
                break;
            }
            Ok(Err(e)) => last_err = Some(e),
        }
    }
    let tcp = match tcp {
        Some(s) => s,
        None => {
            let e = last_err.expect("at least one address was tried");
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                bail!(
                    "connecting to {addr}: connection refused; nothing listens on that port: check the host and port, and that the listener is up"
                );
            }
            bail!("connecting to {addr}: {e}; check the address and the network path to it");
        }
    };
    let _ = tcp.set_nodelay(true);

    let connector = tokio_rustls::TlsConnector::from(config);
    let mut tls = match timeout_at(deadline, connector.connect(server_name, tcp)).await {
        Err(_) => bail!(
            "TLS handshake with {addr} timed out after {limit}: the server accepted the TCP connection but did not answer the ClientHello; is this a TLS port? (or raise --timeout)"
        ),
        Ok(Err(e)) => return Err(handshake_error(addr, &e, client_auth.key.is_some())),
        Ok(Ok(s)) => s,
    };

    let (_, conn) = tls.get_ref();
    let chain: Vec<CertificateDer<'static>> = conn
        .peer_certificates()
        .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
        .unwrap_or_default();
    if chain.is_empty() {
        bail!("{addr} completed the handshake without presenting a certificate");
    }
    let version = conn.protocol_version().map(version_name);
    let alpn = conn
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let mut notes = Vec::new();

    // In TLS 1.3 the server judges the client certificate (or its absence)
    // after the client's handshake is done; a rejection arrives as an alert
    // right after. Wait briefly for one when a certificate was asked for.
    if client_auth.was_requested() {
        let wait = opts.timeout.min(Duration::from_millis(500));
        let mut buf = [0u8; 1];
        match tokio::time::timeout(wait, tls.read(&mut buf)).await {
            Err(_) | Ok(Ok(1..)) => {}
            Ok(Ok(_)) => {
                notes.push("the server closed the connection right after the handshake".to_string())
            }
            Ok(Err(e)) => return Err(handshake_error(addr, &e, client_auth.key.is_some())),
        }
        if client_auth.key.is_none() {
            notes.push(
                "the server asked for a client certificate and accepted the connection without one"
                    .to_string(),
            );
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        use tokio::io::AsyncWriteExt;
        tls.shutdown().await
    })
    .await;

    Ok(Handshake {
        chain,
        version,
        alpn,
        notes,
    })
}

fn version_name(v: rustls::ProtocolVersion) -> String {
    match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".into(),
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".into(),
        other => format!("{other:?}"),
    }
}

/// A handshake failure as an error that names the likely cause and fix.
fn handshake_error(addr: &str, e: &std::io::Error, sent_cert: bool) -> anyhow::Error {
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let why = match tls {
        Some(rustls::Error::InvalidMessage(_)) => format!(
            "{addr} did not answer with TLS ({e}); is this a TLS port? A plain-HTTP or admin port is not"
        ),
        Some(rustls::Error::AlertReceived(alert)) => {
            let fix = match alert {
                AlertDescription::ProtocolVersion => {
                    "the server does not speak TLS 1.3, which Crank listeners always do; is this the right port?"
                        .to_string()
                }
                AlertDescription::CertificateRequired => {
                    "the server requires a client certificate; pass --cert and --key (a leaf from `crankctl cert issue` and its key)"
                        .to_string()
                }
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::AccessDenied
                    if sent_cert =>
                {
                    "the server rejected the client certificate; send one issued by the CA the server trusts, unexpired and unrevoked"
                        .to_string()
                }
                AlertDescription::UnrecognisedName => {
                    "the server does not serve that name; pass --server-name with the name it serves (<service>.<tenant>.<trust-domain>)"
                        .to_string()
                }
                AlertDescription::NoApplicationProtocol => {
                    "the server accepts neither h2 nor http/1.1 (ALPN)".to_string()
                }
                _ => {
                    "check the server name (--server-name) and, when the server requires one, the client certificate (--cert/--key)"
                        .to_string()
                }
            };
            format!("the TLS handshake with {addr} failed: {e}; {fix}")
        }
        Some(other) => format!("the TLS handshake with {addr} failed: {other}"),
        None => match e.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe => format!(
                "{addr} closed the connection during the TLS handshake ({e}); is this a TLS port, and does it serve this server name (--server-name)?"
            ),
            _ => format!("the TLS handshake with {addr} failed: {e}"),
        },
    };
    anyhow!(why)
}

/// Why verification against the bundle failed.
struct VerifyFailure {
    error: String,
    hint: Option<String>,
}

impl VerifyFailure {
    fn other(error: &str) -> Self {
        VerifyFailure {
            error: error.to_string(),
            hint: None,
        }
    }

    fn from_rustls(e: &rustls::Error, server_name: &ServerName<'_>) -> Self {
        let hint = match e {
            rustls::Error::InvalidCertificate(ce) => match ce {
                CertificateError::UnknownIssuer => Some(
                    "the chain does not lead to a certificate in BUNDLE; is it this mesh's bundle (bundle.pem from `crankctl ca init`), and does the server send its intermediate?"
                        .to_string(),
                ),
                CertificateError::BadSignature => Some(
                    "the chain names a CA in BUNDLE but was not signed by it: a different CA with the same name (roots made by `crankctl ca init` before roots were named after their keys all share one name); use the bundle of the CA that issued this chain"
                        .to_string(),
                ),
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => Some(format!(
                    "the leaf has no SAN for {}; pass --server-name with the identity it serves (<service>.<tenant>.<trust-domain>)",
                    server_name.to_str()
                )),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => Some(
                    "a certificate in the chain has expired; renew it".to_string(),
                ),
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Some("a certificate in the chain is not valid yet; check the clocks".to_string())
                }
                _ => None,
            },
            _ => None,
        };
        VerifyFailure {
            error: e.to_string(),
            hint,
        }
    }
}

/// Accepts any chain (its verdict against `--ca`, when given, is recorded,
/// not enforced) but checks the handshake signatures, so the peer did prove
/// it holds the leaf's key.
struct InspectVerifier {
    algs: WebPkiSupportedAlgorithms,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    result: Mutex<Option<Result<(), VerifyFailure>>>,
}

impl fmt::Debug for InspectVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InspectVerifier")
            .field("verifies", &self.webpki.is_some())
            .finish()
    }
}

impl ServerCertVerifier for InspectVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(v) = &self.webpki {
            let r = v
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map(|_| ())
                .map_err(|e| VerifyFailure::from_rustls(&e, server_name));
            if let Ok(mut slot) = self.result.lock() {
                *slot = Some(r);
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The optional client certificate; records whether the server asked.
struct ClientAuth {
    key: Option<Arc<CertifiedKey>>,
    requested: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuth")
            .field("has_cert", &self.key.is_some())
            .finish()
    }
}

impl ClientAuth {
    fn load(opts: &ConnectOptions, provider: &CryptoProvider) -> Result<ClientAuth> {
        let key = match (&opts.cert, &opts.key) {
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                bail!("--cert and --key go together: pass both (the client certificate and its private key) or neither")
            }
            (Some(cert), Some(key)) => {
                let cert_pem = std::fs::read(cert)
                    .map_err(|e| anyhow!("cannot read --cert {}: {e}", cert.display()))?;
                let chain = crank_certs::pem::certs_from_pem(&cert_pem).map_err(|e| {
                    anyhow!("--cert {}: {e}; pass a PEM certificate", cert.display())
                })?;
                let key_pem = std::fs::read(key)
                    .map_err(|e| anyhow!("cannot read --key {}: {e}", key.display()))?;
                let private = crank_certs::pem::key_from_pem(&key_pem)
                    .map_err(|e| anyhow!("--key {}: {e}; pass a PEM private key", key.display()))?;
                let certified = CertifiedKey::from_der(chain, private, provider).map_err(|e| {
                    anyhow!(
                        "--cert {} with --key {}: {e}; pass the key written with that certificate",
                        cert.display(),
                        key.display()
                    )
                })?;
                Some(Arc::new(certified))
            }
        };
        Ok(ClientAuth {
            key,
            requested: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn was_requested(&self) -> bool {
        self.requested.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl ResolvesClientCert for ClientAuth {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.requested
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.key.clone()
    }

    fn has_certs(&self) -> bool {
        // True so rustls calls `resolve` (and records the request) even
        // with no certificate; `None` from it sends an empty one.
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crank_certs::{Ca, Identity, IssuedLeaf, LeafRequest};
    use std::net::SocketAddr;
    use std::sync::mpsc;
    use tempfile::TempDir;

    const DAY: Duration = Duration::from_secs(24 * 3600);
    const WEB: &str = "spiffe://crank.local/tenant/acme/svc/web";

    fn id(service: &str) -> Identity {
        Identity::new(service, "acme", "crank.local").unwrap()
    }

    /// A root, its intermediate, and web's leaf (cert_pem = leaf + intermediate).
    fn pki() -> (Ca, Ca, IssuedLeaf) {
        let root = Ca::generate("crank.local", 30 * DAY).unwrap();
        let inter = root.generate_intermediate(7 * DAY).unwrap();
        let leaf = inter.issue(&LeafRequest::new(id("web"), DAY)).unwrap();
        (root, inter, leaf)
    }

    fn write(dir: &TempDir, name: &str, contents: &[u8]) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }

    #[test]
    fn output_parses_and_names_choices() {
        assert_eq!("human".parse::<Output>().unwrap(), Output::Human);
        assert_eq!("json".parse::<Output>().unwrap(), Output::Json);
        let err = "yaml".parse::<Output>().unwrap_err();
        assert!(err.contains("human") && err.contains("json"), "{err}");
        assert_eq!(Output::Json.to_string(), "json");
    }

    #[test]
    fn short_durations() {
        assert_eq!(short_duration(86_340), "23h 59m");
        assert_eq!(short_duration(300), "5m");
        assert_eq!(short_duration(330), "5m 30s");
        assert_eq!(short_duration(3 * 86_400 + 7_200), "3d 2h");
        assert_eq!(short_duration(86_400), "1d");
        assert_eq!(short_duration(42), "42s");
    }

    #[test]
    fn addresses() {
        assert_eq!(
            split_address("web.acme:8443").unwrap(),
            ("web.acme".into(), 8443)
        );
        assert_eq!(split_address("[::1]:443").unwrap(), ("::1".into(), 443));
        for bad in ["web.acme", "::1:443", ":443", "web:x", "[::1:443"] {
            let e = split_address(bad).unwrap_err().to_string();
            assert!(e.contains("HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn file_with_leaf_and_intermediate() {
        let (_root, _inter, leaf) = pki();
        let dir = TempDir::new().unwrap();
        let path = write(&dir, "web.crt", leaf.cert_pem.as_bytes());
        let report = file_report(&path).unwrap();
        assert_eq!(report.kind, SourceKind::File);
        assert_eq!(report.certificates.len(), 2);
        let l = &report.certificates[0];
        assert_eq!(l.position, "leaf");
        let ident = l.identity.as_ref().unwrap();
        assert_eq!(ident.spiffe_id, WEB);
        assert_eq!(ident.dns_name, "web.acme.crank.local");
        assert!(!l.expired && !l.not_yet_valid && !l.is_ca);
        assert!(l.expires_in_seconds > 86_000 && l.expires_in_seconds <= 86_400);
        assert_eq!(l.dns_sans, vec!["web.acme.crank.local".to_string()]);
        assert_eq!(l.uri_sans, vec![WEB.to_string()]);
        assert!(l.serial.contains(':'), "{}", l.serial);
        assert!(l.not_after_rfc3339.ends_with('Z'));
        let i = &report.certificates[1];
        assert_eq!(i.position, "intermediate");
        assert!(i.is_ca && i.identity.is_none() && i.identity_error.is_none());
        assert_eq!(l.issuer, i.subject);

        let human = render_human(&report);
        assert!(human.starts_with(&format!("{}: 2 certificates", path.display())));
        assert!(
            human.contains("expires in 23h 59m") || human.contains("expires in 1d"),
            "{human}"
        );
        // Identity first in the leaf's block.
        let block = &human[human.find("[0] leaf").unwrap()..];
        let first = block.lines().nth(1).unwrap();
        assert!(
            first.contains("identity:") && first.contains(WEB),
            "{human}"
        );
        assert!(human.contains("[1] intermediate"), "{human}");

        let json: serde_json::Value = serde_json::from_str(&render_json(&report).unwrap()).unwrap();
        assert_eq!(json["certificates"][0]["identity"]["spiffe_id"], WEB);
        assert_eq!(json["certificates"][0]["expired"], false);
        assert_eq!(json["kind"], "file");
        assert!(json["verified"].is_null());
    }

    #[test]
    fn root_file_is_a_root() {
        let (root, _, _) = pki();
        let dir = TempDir::new().unwrap();
        let path = write(&dir, "bundle.pem", root.cert_pem().as_bytes());
        let report = file_report(&path).unwrap();
        assert_eq!(report.certificates.len(), 1);
        assert_eq!(report.certificates[0].position, "root");
        assert!(render_human(&report).contains(": 1 certificate\n"));
    }

    #[test]
    fn expired_leaf_renders_expired() {
        let (_, inter, _) = pki();
        let now = SystemTime::now();
        let mut req = LeafRequest::new(id("web"), DAY);
        req.not_before = Some((now - Duration::from_secs(7200)).into());
        req.not_after = Some((now - Duration::from_secs(300)).into());
        let leaf = inter.issue(&req).unwrap();
        let dir = TempDir::new().unwrap();
        let path = write(&dir, "old.crt", leaf.cert_pem.as_bytes());
        let report = file_report(&path).unwrap();
        let l = &report.certificates[0];
        assert!(l.expired);
        assert!(l.expires_in_seconds <= -300 && l.expires_in_seconds > -400);
        let human = render_human(&report);
        assert!(human.contains("EXPIRED 5m"), "{human}");
        assert!(human.contains(" ago)"), "{human}");
    }

    #[test]
    fn file_errors_name_problem_and_fix() {
        let (_, _, leaf) = pki();
        let dir = TempDir::new().unwrap();
        let empty = write(&dir, "empty.pem", b"\n");
        let e = file_report(&empty).unwrap_err().to_string();
        assert!(e.contains("empty") && e.contains("empty.pem"), "{e}");
        let key = write(&dir, "web.key", leaf.key_pem.as_bytes());
        let e = file_report(&key).unwrap_err().to_string();
        assert!(e.contains("private key"), "{e}");
        let junk = write(&dir, "junk.pem", b"hello");
        let e = file_report(&junk).unwrap_err().to_string();
        assert!(e.contains("BEGIN CERTIFICATE"), "{e}");
        let e = file_report(&dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read") && e.contains("missing.pem"),
            "{e}"
        );
    }

    #[test]
    fn der_file_is_accepted() {
        let (_, _, leaf) = pki();
        let der = crank_certs::pem::certs_from_pem(leaf.cert_pem.as_bytes()).unwrap();
        let dir = TempDir::new().unwrap();
        let path = write(&dir, "web.der", &der[0]);
        let report = file_report(&path).unwrap();
        assert_eq!(report.certificates.len(), 1);
        assert_eq!(
            report.certificates[0].identity.as_ref().unwrap().spiffe_id,
            WEB
        );
    }

    // --- connect ---------------------------------------------------------

    enum ClientAuthMode {
        None,
        Optional,
        Required,
    }

    /// A TLS 1.3 server on 127.0.0.1:0 in its own thread and runtime,
    /// serving `leaf`. Each handshake sends the client's SPIFFE ID (or the
    /// handshake error) on the channel.
    fn serve(
        leaf: &IssuedLeaf,
        client_roots: &str,
        mode: ClientAuthMode,
    ) -> (SocketAddr, mpsc::Receiver<Result<Option<String>, String>>) {
        use rustls::server::WebPkiClientVerifier;
        use tokio::io::AsyncReadExt;

        let certs = crank_certs::pem::certs_from_pem(leaf.cert_pem.as_bytes()).unwrap();
        let key = crank_certs::pem::key_from_pem(leaf.key_pem.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(
            crank_certs::pem::certs_from_pem(client_roots.as_bytes()).unwrap(),
        );
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let builder = match mode {
            ClientAuthMode::None => builder.with_no_client_auth(),
            ClientAuthMode::Optional => {
                builder.with_client_cert_verifier(verifier.allow_unauthenticated().build().unwrap())
            }
            ClientAuthMode::Required => {
                builder.with_client_cert_verifier(verifier.build().unwrap())
            }
        };
        let mut config = builder.with_single_cert(certs, key).unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                while let Ok((tcp, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match acceptor.accept(tcp).await {
                            Ok(mut tls) => {
                                let who = tls
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .and_then(|c| crank_certs::identity_from_der(c).ok())
                                    .map(|i| i.spiffe_id());
                                let _ = tx.send(Ok(who));
                                let mut buf = [0u8; 64];
                                let _ = tls.read(&mut buf).await;
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e.to_string()));
                            }
                        }
                    });
                }
            });
        });
        (addr, rx)
    }

    fn opts(addr: impl ToString) -> ConnectOptions {
        ConnectOptions {
            address: addr.to_string(),
            server_name: None,
            ca: None,
            cert: None,
            key: None,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn connect_reports_chain_and_verification() {
        let (root, _, leaf) = pki();
        let other_root = Ca::generate("other.local", DAY).unwrap();
        let (twin_root, _, _) = pki();
        let dir = TempDir::new().unwrap();
        let good = write(&dir, "bundle.pem", root.cert_pem().as_bytes());
        let bad = write(&dir, "other.pem", other_root.cert_pem().as_bytes());
        let twin = write(&dir, "twin.pem", twin_root.cert_pem().as_bytes());
        let (addr, seen) = serve(&leaf, root.cert_pem(), ClientAuthMode::Optional);

        // Unverified: the chain, TLS 1.3, h2.
        let report = connect_report(&opts(addr)).unwrap();
        assert_eq!(report.kind, SourceKind::Connect);
        assert_eq!(report.certificates.len(), 2);
        assert_eq!(
            report.certificates[0].identity.as_ref().unwrap().spiffe_id,
            WEB
        );
        assert_eq!(report.certificates[1].position, "intermediate");
        assert_eq!(report.tls_version.as_deref(), Some("TLSv1.3"));
        assert_eq!(report.alpn.as_deref(), Some("h2"));
        assert!(report.verified.is_none());
        assert_eq!(
            report.client_cert,
            Some(ClientCertStatus {
                requested: true,
                sent: false
            })
        );
        let human = render_human(&report);
        assert!(
            human.starts_with(&format!(
                "{addr} (server name 127.0.0.1): TLSv1.3, ALPN h2\n"
            )),
            "{human}"
        );
        assert!(
            human.contains("not verified (pass --ca BUNDLE to verify)"),
            "{human}"
        );
        assert!(human.contains("2 certificates presented"), "{human}");
        assert_eq!(seen.recv().unwrap(), Ok(None));

        // Verified against the right root for the leaf's name.
        let mut o = opts(addr);
        o.ca = Some(good.clone());
        o.server_name = Some("web.acme.crank.local".into());
        let report = connect_report(&o).unwrap();
        let v = report.verified.clone().unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!(v.error, None);
        let human = render_human(&report);
        assert!(
            human.contains(&format!(
                "chain verified against {} for web.acme.crank.local",
                good.display()
            )),
            "{human}"
        );
        let json: serde_json::Value = serde_json::from_str(&render_json(&report).unwrap()).unwrap();
        assert_eq!(json["verified"]["ok"], true);
        assert_eq!(json["tls_version"], "TLSv1.3");

        // Another root: the chain is still reported, verification fails.
        o.ca = Some(bad);
        let report = connect_report(&o).unwrap();
        assert_eq!(report.certificates.len(), 2);
        let v = report.verified.clone().unwrap();
        assert!(!v.ok);
        let err = v.error.unwrap();
        assert!(err.contains("UnknownIssuer"), "{err}");
        let human = render_human(&report);
        assert!(
            human.contains("chain NOT verified: invalid peer certificate: UnknownIssuer"),
            "{human}"
        );
        assert!(human.contains("hint: the chain does not lead"), "{human}");

        // A re-made CA (another key) has another name too: it is not taken
        // for the issuer (that failed as BadSignature when roots shared a name).
        o.ca = Some(twin);
        let v = connect_report(&o).unwrap().verified.unwrap();
        assert!(!v.ok);
        assert!(v.error.unwrap().contains("UnknownIssuer"));
        assert!(v.hint.unwrap().contains("does not lead"));

        // The right root, but verified for the IP: the name does not match.
        let mut o = opts(addr);
        o.ca = Some(good);
        let v = connect_report(&o).unwrap().verified.unwrap();
        assert!(!v.ok);
        let err = v.error.unwrap();
        assert!(err.contains("not valid for name"), "{err}");
        assert!(v.hint.unwrap().contains("--server-name"));
    }

    #[test]
    fn connect_with_client_certificate() {
        let (root, inter, leaf) = pki();
        let client = inter.issue(&LeafRequest::new(id("api"), DAY)).unwrap();
        let dir = TempDir::new().unwrap();
        let cert = write(&dir, "api.crt", client.cert_pem.as_bytes());
        let key = write(&dir, "api.key", client.key_pem.as_bytes());
        let (addr, seen) = serve(&leaf, root.cert_pem(), ClientAuthMode::Required);

        let mut o = opts(addr);
        o.cert = Some(cert.clone());
        o.key = Some(key);
        let report = connect_report(&o).unwrap();
        assert_eq!(
            report.client_cert,
            Some(ClientCertStatus {
                requested: true,
                sent: true
            })
        );
        assert_eq!(
            seen.recv().unwrap(),
            Ok(Some("spiffe://crank.local/tenant/acme/svc/api".into()))
        );

        // Without one, the server's rejection is reported with the fix.
        let e = connect_report(&opts(addr)).unwrap_err().to_string();
        assert!(e.contains("--cert and --key"), "{e}");
        assert!(seen.recv().unwrap().is_err());

        // Half a client identity is refused up front.
        let mut o = opts(addr);
        o.cert = Some(cert);
        let e = connect_report(&o).unwrap_err().to_string();
        assert!(e.contains("--cert and --key go together"), "{e}");
    }

    #[test]
    fn connect_without_client_auth_server() {
        let (root, _, leaf) = pki();
        let (addr, _seen) = serve(&leaf, root.cert_pem(), ClientAuthMode::None);
        let report = connect_report(&opts(addr)).unwrap();
        assert_eq!(
            report.client_cert,
            Some(ClientCertStatus {
                requested: false,
                sent: false
            })
        );
        assert!(report.notes.is_empty());
    }

    #[test]
    fn connect_refused_is_clear() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = connect_report(&opts(format!("127.0.0.1:{port}")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("connection refused"), "{e}");
        assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    }

    #[test]
    fn connect_to_plain_http_says_not_tls() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
            }
        });
        let e = connect_report(&opts(addr)).unwrap_err().to_string();
        assert!(e.contains("is this a TLS port"), "{e}");
    }

    #[test]
    fn connect_timeout_is_clear() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // Accepted by the kernel backlog, never answered.
        let mut o = opts(addr);
        o.timeout = Duration::from_millis(300);
        let e = connect_report(&o).unwrap_err().to_string();
        assert!(e.contains("timed out after 300ms"), "{e}");
        assert!(e.contains("TLS port"), "{e}");
        drop(l);
    }

    #[test]
    fn connect_option_errors() {
        let dir = TempDir::new().unwrap();
        let mut o = opts("127.0.0.1:1");
        o.ca = Some(dir.path().join("nope.pem"));
        let e = connect_report(&o).unwrap_err().to_string();
        assert!(e.contains("--ca") && e.contains("bundle.pem"), "{e}");
        let e = connect_report(&opts("no-port")).unwrap_err().to_string();
        assert!(e.contains("HOST:PORT"), "{e}");
    }
}
