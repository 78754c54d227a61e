//! `crankctl cert inspect --connect`: the TLS 1.3 handshake (ALPN `h2`,
//! `http/1.1`) with a verifier that accepts any chain but still checks the
//! handshake signatures; with `--ca` the chain is verified against the
//! bundle during that same handshake and the outcome is reported, never
//! fatal. Handshake failures become errors that name the likely cause.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
    SignatureScheme,
};
use tokio::net::TcpStream;
use tokio::time::timeout_at;

use super::{
    cert_reports, certs_in, unix_now, ClientCertStatus, ConnectOptions, Report, SourceKind,
    Verification,
};

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
    let config = client_config(provider, verifier.clone(), client_auth.clone())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow!("starting the I/O runtime: {e}"))?;
    let handshake = rt.block_on(handshake(opts, config, server_name, client_auth.clone()))?;
    let certificates =
        cert_reports(&handshake.chain, unix_now()).map_err(|e| anyhow!("{}: {e}", opts.address))?;
    let verified = opts
        .ca
        .as_ref()
        .map(|bundle| verification(&verifier, bundle, &name_text));
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

/// TLS 1.3 only, ALPN h2 then http/1.1, with the inspecting verifier.
fn client_config(
    provider: Arc<CryptoProvider>,
    verifier: Arc<InspectVerifier>,
    client_auth: Arc<ClientAuth>,
) -> Result<Arc<ClientConfig>> {
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| anyhow!("TLS configuration: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(client_auth);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What verifying against `bundle` during the handshake found.
fn verification(verifier: &InspectVerifier, bundle: &Path, name: &str) -> Verification {
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
        server_name: name.to_string(),
    }
}

/// `HOST:PORT` or `[V6]:PORT` into the host (no brackets) and port.
pub(super) fn split_address(address: &str) -> Result<(String, u16)> {
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

pub(super) struct Handshake {
    chain: Vec<CertificateDer<'static>>,
    version: Option<String>,
    alpn: Option<String>,
    notes: Vec<String>,
}

pub(super) async fn handshake(
    opts: &ConnectOptions,
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    client_auth: Arc<ClientAuth>,
) -> Result<Handshake> {
    let addr = &opts.address;
    let deadline = tokio::time::Instant::from_std(Instant::now() + opts.timeout);
    let tcp = dial(opts, deadline).await?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut tls = match timeout_at(deadline, connector.connect(server_name, tcp)).await {
        Err(_) => bail!(
            "TLS handshake with {addr} timed out after {}: the server accepted the TCP connection but did not answer the ClientHello; is this a TLS port? (or raise --timeout)",
            humantime::format_duration(opts.timeout)
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
    let notes = client_cert_notes(opts, &mut tls, &client_auth).await?;
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

/// Resolves the address and connects TCP to the first address that answers.
async fn dial(opts: &ConnectOptions, deadline: tokio::time::Instant) -> Result<TcpStream> {
    let addr = &opts.address;
    let limit = humantime::format_duration(opts.timeout);
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
    for a in &addrs {
        match timeout_at(deadline, TcpStream::connect(a)).await {
            Err(_) => bail!(
                "connecting to {addr} timed out after {limit}; check the address and that no firewall drops the traffic, or raise --timeout"
            ),
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last_err = Some(e),
        }
    }
    match last_err {
        Some(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => bail!(
            "connecting to {addr}: connection refused; nothing listens on that port: check the host and port, and that the listener is up"
        ),
        Some(e) => bail!("connecting to {addr}: {e}; check the address and the network path to it"),
        None => bail!("{addr} resolves to no address; check the host name"),
    }
}

/// In TLS 1.3 the server judges the client certificate (or its absence)
/// after the client's handshake is done; a rejection arrives as an alert
/// right after. Waits briefly for one when a certificate was asked for.
async fn client_cert_notes(
    opts: &ConnectOptions,
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    client_auth: &ClientAuth,
) -> Result<Vec<String>> {
    use tokio::io::AsyncReadExt;
    let mut notes = Vec::new();
    if !client_auth.was_requested() {
        return Ok(notes);
    }
    let wait = opts.timeout.min(Duration::from_millis(500));
    let mut buf = [0u8; 1];
    match tokio::time::timeout(wait, tls.read(&mut buf)).await {
        Err(_) | Ok(Ok(1..)) => {}
        Ok(Ok(_)) => {
            notes.push("the server closed the connection right after the handshake".to_string())
        }
        Ok(Err(e)) => {
            let sent = client_auth.key.is_some();
            return Err(handshake_error(&opts.address, &e, sent));
        }
    }
    if client_auth.key.is_none() {
        notes.push(
            "the server asked for a client certificate and accepted the connection without one"
                .to_string(),
        );
    }
    Ok(notes)
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
pub(super) struct ClientAuth {
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
