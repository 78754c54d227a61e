//! Registering the worker's endpoint, capabilities and labels.
//!
//! The shim holds no certificate: it publishes its registration locally, in
//! a file ([`FileRegistrar`]) that the worker's sidecar reads
//! (`mesh.register.from_file`) and registers in crank-control's registry,
//! and at `GET /v1/registration`. The file's type,
//! [`ShimRegistration`], lives in crank-api, shared with the sidecar that
//! reads it.

use std::path::PathBuf;

pub use crank_api::registration::ShimRegistration;

/// Where registrations go.
#[async_trait::async_trait]
pub trait Registrar: Send + Sync {
    async fn register(&self, reg: &ShimRegistration) -> anyhow::Result<()>;
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
    async fn register(&self, reg: &ShimRegistration) -> anyhow::Result<()> {
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
    async fn register(&self, _reg: &ShimRegistration) -> anyhow::Result<()> {
        Ok(())
    }
    async fn deregister(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file the sidecar reads: written whole, then removed on
    /// deregistration (twice is fine).
    #[tokio::test]
    async fn file_registrar_writes_the_shared_type_and_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/registration.json");
        let r = FileRegistrar { path: path.clone() };
        let reg = ShimRegistration {
            mode: "exec".into(),
            address: "127.0.0.1:9000".into(),
            identity: None,
            capabilities: vec!["transcode".into()],
            labels: [("gpu".to_string(), "none".to_string())].into(),
        };
        r.register(&reg).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("identity"),
            "absent identity is left out: {text}"
        );
        let read: ShimRegistration = serde_json::from_str(&text).unwrap();
        assert_eq!(read, reg);
        r.deregister().await.unwrap();
        assert!(!path.exists());
        r.deregister().await.unwrap();
    }

    /// A sidecar reads files with fields missing or added (another version).
    #[test]
    fn the_reader_is_lenient() {
        let read: ShimRegistration =
            serde_json::from_str(r#"{"capabilities":["a"],"new":1}"#).unwrap();
        assert_eq!(read.capabilities, ["a"]);
        assert_eq!(read.mode, "");
    }
}
