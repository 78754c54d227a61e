//! The admin API between `crankctl` and `crank-control`, over the admin
//! Unix socket (mode 0600: file permissions are its access control): the
//! request and answer types, and the small client `crankctl` uses.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::state::{Issued, Phase, RotationKind};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub service: String,
    pub tenant: String,
    /// Seconds; absent: `tokens.default_ttl`.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token: String,
    pub identity: String,
    pub expires_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// A serial (hex, colons allowed) or an identity `<svc>.<tenant>.<td>`.
    pub target: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokeResponse {
    pub revoked: Vec<String>,
    pub revocations_version: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    pub kind: RotationKind,
    /// Root rotation: the new root certificate (PEM). Its key stays offline.
    #[serde(default)]
    pub root_pem: Option<String>,
    pub intermediate_pem: String,
    pub intermediate_key_pem: String,
}

/// One leaf of the inventory, with its status now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertRow {
    #[serde(flatten)]
    pub issued: Issued,
    /// valid, expired or revoked
    pub status: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaEntry {
    pub subject: String,
    pub serial: String,
    pub not_after: i64,
    pub state: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadRow {
    pub identity: String,
    pub instance: String,
    pub serial: String,
    pub issuer: Option<String>,
    #[serde(default)]
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
    pub bundle_version: u64,
    pub last_seen: i64,
    /// active, stale, revoked or expired
    pub state: String,
    /// Why it holds back the current rotation phase.
    pub lagging: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaStatus {
    pub trust_domain: String,
    pub phase: Phase,
    pub rotation_kind: Option<RotationKind>,
    pub rotation_started_at: Option<i64>,
    pub phase_since: Option<i64>,
    /// The bundle version workloads must report to leave the phase.
    pub target_bundle: Option<u64>,
    pub bundle_version: u64,
    pub revocations_version: u64,
    pub revoked_serials: usize,
    pub roots: Vec<CaEntry>,
    pub intermediates: Vec<CaEntry>,
    pub workloads: Vec<WorkloadRow>,
    pub history: Vec<String>,
    pub now: i64,
    /// Seconds the rotation still waits after a control plane restart, so
    /// every live workload reports again before it moves on.
    #[serde(default)]
    pub resync_wait_seconds: Option<u64>,
    /// `workloads.stale_after` in seconds: a workload not seen for this
    /// long no longer counts.
    #[serde(default)]
    pub stale_after_seconds: Option<u64>,
    /// This replica's name (`store: {etcd: ...}` only).
    #[serde(default)]
    pub replica: Option<String>,
    /// The replica that leads (publishes, moves rotations on, prunes);
    /// `None` without a shared store or while nobody leads.
    #[serde(default)]
    pub leader: Option<String>,
}

/// A `crankctl` connection to the admin API: the Unix socket, or
/// `admin_listen` over mTLS (`--server`).
pub struct AdminClient {
    socket: std::path::PathBuf,
    remote: Option<Remote>,
}

/// `--server https://HOST:PORT` with a client certificate.
struct Remote {
    url: String,
    addr: String,
    tls: std::sync::Arc<rustls::ClientConfig>,
    server_name: rustls_pki_types::ServerName<'static>,
}

impl AdminClient {
    pub fn new(socket: &Path) -> Self {
        AdminClient {
            socket: socket.to_path_buf(),
            remote: None,
        }
    }

    /// `url` (`https://HOST:PORT`) with the client certificate `cert` and
    /// key `key` from the mesh CA, trusting the roots in `ca`. The server
    /// must prove `control.crank-system.<trust domain of cert>`.
    pub fn remote(url: &str, cert: &Path, key: &Path, ca: &Path) -> Result<Self> {
        let addr = url
            .strip_prefix("https://")
            .map(|a| a.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .with_context(|| {
                format!("--server {url}: write https://HOST:PORT (crank-control's admin_listen)")
            })?
            .to_string();
        let read = |what: &str, p: &Path| {
            std::fs::read(p).with_context(|| format!("reading {what} {}", p.display()))
        };
        let chain = crank_certs::pem::certs_from_pem(&read("--cert", cert)?)
            .map_err(|e| anyhow::anyhow!("--cert {}: {e}", cert.display()))?;
        let key = crank_certs::pem::key_from_pem(&read("--key", key)?)
            .map_err(|e| anyhow::anyhow!("--key {}: {e}", key.display()))?;
        let td = chain
            .first()
            .and_then(|c| crank_certs::CertSummary::from_der(c).ok())
            .and_then(|s| s.identity)
            .map(|i| i.trust_domain)
            .with_context(|| {
                format!(
                    "--cert {} carries no Crank identity; use a certificate the mesh CA issued",
                    cert.display()
                )
            })?;
        let mut roots = rustls::RootCertStore::empty();
        for r in crank_certs::pem::certs_from_pem(&read("--ca", ca)?)
            .map_err(|e| anyhow::anyhow!("--ca {}: {e}", ca.display()))?
        {
            roots.add(r).context("a root in --ca is not usable")?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("--cert and --key do not belong together")?;
        let name = format!("control.crank-system.{td}");
        let server_name = rustls_pki_types::ServerName::try_from(name)
            .context("the trust domain is not a DNS name")?;
        Ok(AdminClient {
            socket: std::path::PathBuf::new(),
            remote: Some(Remote {
                url: url.to_string(),
                addr,
                tls: std::sync::Arc::new(tls),
                server_name,
            }),
        })
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call("GET", path, None)
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.call("POST", path, Some(serde_json::to_vec(body)?))
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (status, request_id, bytes) = rt.block_on(self.exchange(method, path, body))?;
        if !(200..300).contains(&status) {
            let (code, msg) = serde_json::from_slice::<crank_api::identity::ApiError>(&bytes)
                .map(|e| (e.error, e.message))
                .unwrap_or_else(|_| (String::new(), String::from_utf8_lossy(&bytes).into_owned()));
            let id = request_id
                .map(|i| format!(", request id {i}"))
                .unwrap_or_default();
            bail!("crank-control refused ({status} {code}{id}): {msg}");
        }
        serde_json::from_slice(&bytes).context(
            "crank-control sent an answer crankctl does not understand; are both the same version?",
        )
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Option<String>, bytes::Bytes)> {
        use http_body_util::{BodyExt, Full};
        let mut send = match &self.remote {
            Some(r) => r.connect().await?,
            None => {
                let stream = tokio::net::UnixStream::connect(&self.socket)
                    .await
                    .with_context(|| {
                        format!(
                            "connecting to crank-control's admin socket {} (is crank-control running? pass --control PATH or set CRANK_CONTROL)",
                            self.socket.display()
                        )
                    })?;
                handshake(stream).await?
            }
        };
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "crank-control")
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(body.unwrap_or_default())))?;
        let resp = send.send_request(req).await.with_context(|| match &self.remote {
            Some(r) => format!("{} closed the connection: crank-control accepts only client certificates from the mesh CA (check --cert and --key)", r.url),
            None => "the admin socket closed the connection".to_string(),
        })?;
        let status = resp.status().as_u16();
        let request_id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, request_id, bytes))
    }
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

async fn handshake<I>(io: I) -> Result<Sender>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(send)
}

impl Remote {
    /// TCP, then TLS with the client certificate.
    async fn connect(&self) -> Result<Sender> {
        let fix = "check --server, and that --cert is from the mesh CA (crank-control refuses other certificates) and --ca holds the mesh roots";
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .with_context(|| {
                format!(
                    "connecting to {} (is admin_listen set in crank-control's config?)",
                    self.url
                )
            })?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .with_context(|| format!("TLS with {}: {fix}", self.url))?;
        let send = handshake(tls).await?;
        Ok(send)
    }
}
