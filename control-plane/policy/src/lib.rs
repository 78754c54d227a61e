//! Crank Mesh policy sets.
//!
//! A policy set is a directory: `.rego` modules, `*_test.rego` tests,
//! `data.json` / `data.yaml` documents and an optional `policy.yaml`
//! manifest (mode, failure mode, input shape, entry points). The proxy
//! compiles one per revision and evaluates it on every request; `crankctl
//! policy test|eval` and the control plane's validation use the same code.

pub mod bundle;
pub mod cache;
pub mod diagnostics;
pub mod input;
pub mod manifest;
pub mod set;
pub mod testing;
pub mod value;

use std::path::PathBuf;

pub use bundle::Bundle;
pub use input::{RequestFacts, Workload};
pub use manifest::{FailureMode, InputShape, Manifest, Mode};
/// The evaluator's value type, for callers that build input with it.
pub use regorus::Value as RegoValue;
pub use set::{Decision, Outcome, PolicySet};
pub use value::{build_value, build_value_for};

/// Why a policy directory cannot be used. Each names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error(
        "{0}: not a directory; policy dirs hold .rego files (and optional data.yaml, policy.yaml)"
    )]
    NotADirectory(PathBuf),
    #[error("{0}: no .rego policy files (besides tests); add one, or remove the policy setting")]
    NoPolicies(PathBuf),
    #[error("{path}: {field}{sep}{message}", sep = if field.is_empty() { "" } else { ": " })]
    Manifest {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: invalid data document: {message}")]
    Data { path: PathBuf, message: String },
    /// regorus's message already carries `file:line:col` and a caret.
    #[error("{file}: policy does not compile:\n{message}")]
    Compile { file: String, message: String },
    #[error(
        "entry point {rule} cannot be evaluated: {message}; define it in a policy, \
         or set entrypoints in policy.yaml"
    )]
    Entrypoint { rule: String, message: String },
}
