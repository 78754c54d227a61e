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
}

/// A `crankctl` connection to the admin socket.
pub struct AdminClient {
    socket: std::path::PathBuf,
}

impl AdminClient {
    pub fn new(socket: &Path) -> Self {
        AdminClient {
            socket: socket.to_path_buf(),
        }
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
        let (status, bytes) = rt.block_on(self.exchange(method, path, body))?;
        if !(200..300).contains(&status) {
            let msg = serde_json::from_slice::<crank_api::identity::ApiError>(&bytes)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            bail!("crank-control refused ({status}): {msg}");
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
    ) -> Result<(u16, bytes::Bytes)> {
        use http_body_util::{BodyExt, Full};
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .with_context(|| {
                format!(
                    "connecting to crank-control's admin socket {} (is crank-control running? pass --control PATH or set CRANK_CONTROL)",
                    self.socket.display()
                )
            })?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "crank-control")
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(body.unwrap_or_default())))?;
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }
}
