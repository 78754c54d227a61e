//! Registering the worker's endpoint, capabilities and labels.
//!
//! The control plane's registry (with leases renewed by heartbeats) is issue
//! 4. Until it lands the shim runs standalone behind its sidecar and
//! publishes its registration locally: in a file that an operator or a
//! deploy script can read, and at `GET /v1/registration`. The trait is the
//! seam where the control-plane client goes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

/// What the shim announces about its worker.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Registration {
    /// `serve` or `exec`.
    pub mode: &'static str,
    /// The address the sidecar reaches the shim on.
    pub address: String,
    /// The mesh identity, when configured (`spiffe://…` or `service.tenant`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    pub capabilities: Vec<String>,
    /// Labels from config plus the ones detected on the host (`gpu=nvidia`).
    pub labels: BTreeMap<String, String>,
}

/// Where registrations go.
#[async_trait::async_trait]
pub trait Registrar: Send + Sync {
    async fn register(&self, reg: &Registration) -> anyhow::Result<()>;
    /// Called first on a graceful shutdown, before in-flight work drains.
    async fn deregister(&self) -> anyhow::Result<()>;
}

/// Writes the registration as JSON to a file (atomically) and removes the
/// file on deregistration.
pub struct FileRegistrar {
    pub path: PathBuf,
}

#[async_trait::async_trait]
impl Registrar for FileRegistrar {
    async fn register(&self, reg: &Registration) -> anyhow::Result<()> {
        let body = serde_json::to_vec_pretty(reg)?;
        if let Some(dir) = self.path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let tmp = self.path.with_extension("tmp");
        tokio::fs::write(&tmp, body).await?;
        tokio::fs::rename(&tmp, &self.path).await?;
        Ok(())
    }

    async fn deregister(&self) -> anyhow::Result<()> {
        match tokio::fs::remove_file(&self.path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Registers nowhere (no `registration_file` configured).
pub struct NoRegistrar;

#[async_trait::async_trait]
impl Registrar for NoRegistrar {
    async fn register(&self, _reg: &Registration) -> anyhow::Result<()> {
        Ok(())
    }
    async fn deregister(&self) -> anyhow::Result<()> {
        Ok(())
    }
}
