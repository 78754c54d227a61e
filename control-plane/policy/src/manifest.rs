//! `policy.yaml`: the settings that travel with a policy set.
//!
//! They live beside the `.rego` files, not in the proxy's config, so that a
//! security team changes `audit` to `enforce` in the same git commit (and the
//! same hot reload) as the policy it is about.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The manifest file's name inside a policy directory.
pub const MANIFEST_FILE: &str = "policy.yaml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// `enforce` (default) denies; `audit` logs and counts would-be denials
    /// and lets the request through.
    #[serde(default)]
    pub mode: Mode,
    /// What an evaluation error or timeout does: `closed` (default) denies,
    /// `open` allows. Counted either way.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// The input document's shape: `crank` (default) or `envoy` (the
    /// OPA-Envoy `input.attributes.request.http` shape).
    #[serde(default)]
    pub input: InputShape,
    /// The rules to evaluate. Default for `crank`: `data.crank.authz.allow`
    /// and `data.crank.authz.deny`; for `envoy`: `data.envoy.authz.allow`.
    #[serde(default)]
    pub entrypoints: Option<Entrypoints>,
    /// Request headers copied into `input.request.headers` (crank shape),
    /// lower case. `"*"` copies all. The envoy shape always has all headers.
    #[serde(default = "default_headers")]
    pub headers: Vec<String>,
    /// Longest an evaluation may run before it counts as an error.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default)]
    pub decision_log: DecisionLogSettings,
    /// `interpreter` (default): regorus's tree-walking interpreter, OPA's
    /// semantics. `rvm`: regorus's compiled VM, several times faster, for
    /// sets proven to decide the same on both (see the policy reference);
    /// loading fails if the VM cannot compile the set. `auto`: the VM when
    /// it compiles the set, else the interpreter.
    #[serde(default)]
    pub engine: EngineChoice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    #[default]
    Interpreter,
    Rvm,
    Auto,
}

impl Default for Manifest {
    fn default() -> Self {
        Manifest {
            mode: Mode::default(),
            failure_mode: FailureMode::default(),
            input: InputShape::default(),
            entrypoints: None,
            headers: default_headers(),
            timeout: default_timeout(),
            decision_log: DecisionLogSettings::default(),
            engine: EngineChoice::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    #[default]
    Closed,
    Open,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputShape {
    #[default]
    Crank,
    Envoy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entrypoints {
    /// A rule that is `true` (or an object with `allowed: true`) to allow.
    pub allow: String,
    /// Optional: a set of reasons; any member denies.
    #[serde(default)]
    pub deny: Option<String>,
}

impl Entrypoints {
    pub fn default_for(shape: InputShape) -> Entrypoints {
        match shape {
            InputShape::Crank => Entrypoints {
                allow: "data.crank.authz.allow".into(),
                deny: Some("data.crank.authz.deny".into()),
            },
            InputShape::Envoy => Entrypoints {
                allow: "data.envoy.authz.allow".into(),
                deny: None,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionLogSettings {
    /// Header values replaced by `[redacted]` in the decision log.
    #[serde(default = "default_redact")]
    pub redact_headers: Vec<String>,
    /// Log allowed decisions too (default true). Denials, audit denials and
    /// errors are always logged.
    #[serde(default = "default_true")]
    pub log_allowed: bool,
}

impl Default for DecisionLogSettings {
    fn default() -> Self {
        DecisionLogSettings {
            redact_headers: default_redact(),
            log_allowed: true,
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_headers() -> Vec<String> {
    ["content-type", "user-agent", "x-request-id"]
        .into_iter()
        .map(String::from)
        .collect()
}

fn default_redact() -> Vec<String> {
    [
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

fn default_timeout() -> Duration {
    Duration::from_millis(50)
}
