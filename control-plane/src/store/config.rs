//! The `store:` section of control.yaml.

use std::path::PathBuf;
use std::time::Duration;

use crank_plumbing::config::Problems;
use serde::{Deserialize, Serialize};

/// `store: {file: {}}` (the default: `state_dir`, one process) or
/// `store: {etcd: {...}}` (replicas sharing an etcd cluster).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawStore", into = "RawStore")]
pub enum StoreSettings {
    File {},
    Etcd(EtcdSettings),
}

/// The YAML shape: a map with exactly one of `file` or `etcd`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<FileSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etcd: Option<EtcdSettings>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {}

impl TryFrom<RawStore> for StoreSettings {
    type Error = &'static str;
    fn try_from(raw: RawStore) -> Result<Self, Self::Error> {
        match raw {
            RawStore {
                file: Some(_),
                etcd: None,
            } => Ok(StoreSettings::File {}),
            RawStore {
                file: None,
                etcd: Some(e),
            } => Ok(StoreSettings::Etcd(e)),
            _ => Err("give exactly one of `file: {}` or `etcd: {...}`"),
        }
    }
}

impl From<StoreSettings> for RawStore {
    fn from(s: StoreSettings) -> Self {
        match s {
            StoreSettings::File {} => RawStore {
                file: Some(FileSettings {}),
                etcd: None,
            },
            StoreSettings::Etcd(e) => RawStore {
                file: None,
                etcd: Some(e),
            },
        }
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings::File {}
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSettings {
    /// `http://host:2379` or `https://host:2379`, one per member.
    pub endpoints: Vec<String>,
    /// Every key lives under this prefix, so several meshes can share a cluster.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    #[serde(default)]
    pub tls: Option<EtcdTls>,
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub dial_timeout: Duration,
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub request_timeout: Duration,
}

/// TLS to etcd: the CA that signed the members' certificates, and an
/// optional client certificate and key (etcd's `--client-cert-auth`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    pub ca: PathBuf,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn default_prefix() -> String {
    "/crank".into()
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

impl StoreSettings {
    /// Adds every problem to `p`, under `store.…` field names.
    pub fn check(&self, p: &mut Problems) {
        let StoreSettings::Etcd(e) = self else { return };
        if e.endpoints.is_empty() {
            p.push(
                "store.etcd.endpoints",
                "is empty; list at least one etcd member, e.g. http://127.0.0.1:2379",
            );
        }
        for ep in &e.endpoints {
            let scheme_ok = ep.starts_with("http://") || ep.starts_with("https://");
            if !scheme_ok {
                p.push(
                    "store.etcd.endpoints",
                    format!("{ep:?} needs http:// or https://"),
                );
            } else if ep.starts_with("https://") && e.tls.is_none() {
                p.push(
                    "store.etcd.tls",
                    format!("{ep} is https; set store.etcd.tls.ca"),
                );
            }
        }
        if !e.prefix.starts_with('/') || e.prefix.ends_with('/') && e.prefix.len() > 1 {
            p.push(
                "store.etcd.prefix",
                format!(
                    "{:?} must start with / and not end with / (e.g. /crank)",
                    e.prefix
                ),
            );
        }
        for (field, t) in [
            ("store.etcd.dial_timeout", e.dial_timeout),
            ("store.etcd.request_timeout", e.request_timeout),
        ] {
            if t < Duration::from_millis(100) || t > Duration::from_secs(60) {
                p.push(field, "must be 100ms to 60s (5s is the default)");
            }
        }
        if e.tls
            .as_ref()
            .is_some_and(|t| t.cert.is_some() != t.key.is_some())
        {
            p.push(
                "store.etcd.tls",
                "cert and key go together; set both or neither",
            );
        }
    }

    /// The file paths in the section, for resolving against the config's directory.
    pub fn paths_mut(&mut self) -> Vec<&mut PathBuf> {
        match self {
            StoreSettings::Etcd(EtcdSettings { tls: Some(t), .. }) => {
                let mut v = vec![&mut t.ca];
                v.extend(t.cert.as_mut());
                v.extend(t.key.as_mut());
                v
            }
            _ => Vec::new(),
        }
    }
}
