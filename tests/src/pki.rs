//! A throw-away PKI for one test: a root CA and leaves made on demand.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crank_certs::{Ca, Identity, LeafRequest};

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

/// Paths of an issued leaf.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::generate("crank.local", Duration::from_secs(86400)).expect("CA");
        ca.save(dir.path()).expect("save CA");
        Pki { dir, ca }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn bundle(&self) -> PathBuf {
        self.dir.path().join("bundle.pem")
    }

    /// A valid 1-hour leaf for `service.tenant.crank.local`.
    pub fn leaf(&self, service: &str, tenant: &str) -> Leaf {
        let id = Identity::new(service, tenant, "crank.local").expect("identity");
        self.leaf_with(
            &LeafRequest::new(id, Duration::from_secs(3600)),
            &format!("{service}.{tenant}"),
        )
    }

    /// A leaf from an explicit request (expired, not yet valid, ...), saved as `name`.
    pub fn leaf_with(&self, req: &LeafRequest, name: &str) -> Leaf {
        let issued = self.ca.issue(req).expect("issue leaf");
        let (cert, key) = issued.save(self.dir.path(), name).expect("save leaf");
        Leaf {
            cert: cert.into(),
            key: key.into(),
        }
    }

    /// A leaf for `service.tenant` signed by a different, untrusted CA.
    pub fn foreign_leaf(&self, service: &str, tenant: &str) -> Leaf {
        let other = Ca::generate("crank.local", Duration::from_secs(86400)).expect("CA");
        let id = Identity::new(service, tenant, "crank.local").expect("identity");
        let issued = other
            .issue(&LeafRequest::new(id, Duration::from_secs(3600)))
            .expect("issue");
        let (cert, key) = issued
            .save(self.dir.path(), &format!("foreign-{service}.{tenant}"))
            .expect("save");
        Leaf {
            cert: cert.into(),
            key: key.into(),
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}
