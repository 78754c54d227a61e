//! The registration file: what crank-shim announces about its worker.
//!
//! crank-shim writes it to its `registration_file` (atomically, as pretty
//! JSON) once the worker can take work, and removes it when it drains; the
//! worker's sidecar reads it (`mesh.register.from_file`) and registers the
//! capabilities and labels in crank-control's registry under its own
//! identity and inbound address.
//!
//! One type for both sides, so the writer and the reader cannot drift. The
//! reader is lenient: every field has a default and unknown fields are
//! ignored, so a sidecar keeps reading the file of a newer shim.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The contents of crank-shim's registration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimRegistration {
    /// `serve` or `exec`.
    #[serde(default)]
    pub mode: String,
    /// Where the sidecar reaches the shim (its `listen`), not where peers
    /// reach the sidecar.
    #[serde(default)]
    pub address: String,
    /// The mesh identity, when configured (`spiffe://…` or `service.tenant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Labels from the shim's config plus the ones it detected on the host
    /// (`gpu=nvidia`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}
