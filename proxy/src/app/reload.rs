//! Watching the config file. A change is checked whole, as at start; an
//! invalid file is refused and the running config keeps serving. A valid
//! change applies without a restart when it touches only the live fields:
//!
//! - `tracing.sampling` (the root sampling ratio),
//! - `routes` (endpoints, hosts, capabilities, timeouts, retries, circuit
//!   breaking, concurrency limits and faults),
//! - `quotas`,
//! - `timeouts`.
//!
//! Anything else (listeners, identity files, policy directories, the
//! tracing exporter, threads) is refused with the list of fields that need
//! a restart, so the running proxy never half-applies a config.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crank_api::proxy::ProxyConfig;

use crate::mesh::{ConfigWriter, Mesh};
use crate::resilience::quota::QuotaSet;
use crate::routing::RouteTable;
use crate::runtime::Runtime;

/// The one writer of the runtime's live fields. The config file watch and
/// the mesh watch both apply through it, one at a time, so neither applies
/// a config made from a running one the other just replaced.
pub struct Reloader {
    rt: Arc<Runtime>,
    /// Where pushed routes and quotas come from (they win over the file's).
    mesh: Option<Arc<Mesh>>,
    apply_lock: Mutex<()>,
    /// The last refused change, for `/config_dump`.
    last_rejected: Mutex<Option<String>>,
}

impl Reloader {
    pub fn new(rt: Arc<Runtime>, mesh: Option<Arc<Mesh>>) -> Self {
        Reloader {
            rt,
            mesh,
            apply_lock: Mutex::new(()),
            last_rejected: Mutex::new(None),
        }
    }

    /// The last refused change, for `/config_dump`.
    pub fn last_rejected(&self) -> Option<String> {
        self.last_rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forgets the last refused change once the file is good again;
    /// returns it so the caller can log that it cleared.
    fn clear_rejected(&self) -> Option<String> {
        self.last_rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn set_rejected(&self, msg: String) {
        *self.last_rejected.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
    }
}

impl ConfigWriter for Reloader {
    fn running(&self) -> Arc<ProxyConfig> {
        self.rt.config.load_full()
    }

    fn change(
        &self,
        change: &mut dyn FnMut(&ProxyConfig) -> Result<ProxyConfig, String>,
    ) -> Result<(), String> {
        let _one_at_a_time = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let running = self.rt.config.load();
        let new = change(&running)?;
        if new != **running {
            apply(&self.rt, new);
        }
        Ok(())
    }
}

/// The top-level fields of `new` that differ from `old` and cannot change
/// while running.
pub fn restart_fields(old: &ProxyConfig, new: &ProxyConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |name: &'static str, same: bool| {
        if !same {
            out.push(name);
        }
    };
    check("identity", old.identity == new.identity);
    check("inbound", old.inbound == new.inbound);
    check("outbound", old.outbound == new.outbound);
    check("admin", old.admin == new.admin);
    check("threads", old.threads == new.threads);
    check("drain", old.drain == new.drain);
    check("access_log", old.access_log == new.access_log);
    check("policy", old.policy == new.policy);
    check("mesh", old.mesh == new.mesh);
    check("capture", old.capture == new.capture);
    // The listeners take their caps and head deadline, and the h2 server
    // its header list size, when they start.
    check("limits", old.limits == new.limits);
    let tracing_same = match (&old.tracing, &new.tracing) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            let mut b = b.clone();
            b.sampling = a.sampling;
            *a == b
        }
        _ => false,
    };
    check("tracing (all but tracing.sampling)", tracing_same);
    out
}

/// Applies a validated config whose restart fields equal the running one's.
fn apply(rt: &Runtime, new: ProxyConfig) {
    if let (Some(tracer), Some(t)) = (&rt.tracer, &new.tracing) {
        tracer.set_ratio(t.sampling);
        rt.metrics.sampling_ratio.set(t.sampling);
    }
    let prev = rt.routes.load();
    let routes = RouteTable::reloaded(&new, Some(&prev));
    crate::routing::init_circuit_gauges(&routes, Some(&prev), &rt.metrics);
    rt.routes.store(Arc::new(routes));
    if new.quotas != rt.config.load().quotas {
        rt.quotas
            .store(Arc::new(QuotaSet::from_config(&new.quotas)));
    }
    rt.config.store(Arc::new(new));
}

/// Checks the file every `interval` and applies or refuses a change.
pub fn spawn(path: PathBuf, reloader: Arc<Reloader>, interval: Duration) -> std::io::Result<()> {
    let mut last = std::fs::read(&path).unwrap_or_default();
    std::thread::Builder::new()
        .name("crank-config-watch".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            let Ok(now) = std::fs::read(&path) else {
                continue; // mid-rename, or removed: keep serving, check again
            };
            if now != last {
                last = now;
                reloader.file_changed(&path);
            }
        })?;
    Ok(())
}

impl Reloader {
    /// The config file changed: check it whole, then apply, or refuse and
    /// keep serving the running config.
    fn file_changed(&self, path: &Path) {
        let _one_at_a_time = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let reloads = &self.rt.metrics.config_reloads;
        match self.check_change(path) {
            Ok(new) if new == **self.rt.config.load() => {
                // A refused change reverted: the file is good again.
                if let Some(was) = self.clear_rejected() {
                    tracing::info!(file = %path.display(), refused_before = %was, "config file is back to the running config; the earlier refusal is cleared from /config_dump");
                } else {
                    tracing::debug!(file = %path.display(), "config file saved without a change");
                }
            }
            Ok(new) => {
                apply(&self.rt, new);
                reloads.with_label_values(&["applied"]).inc();
                if let Some(was) = self.clear_rejected() {
                    tracing::info!(file = %path.display(), refused_before = %was, "config change applied; the earlier refusal is cleared from /config_dump");
                } else {
                    tracing::info!(file = %path.display(), "config change applied");
                }
            }
            Err(msg) => {
                reloads.with_label_values(&["rejected"]).inc();
                tracing::error!(file = %path.display(), error = %msg, "config change refused; the running config keeps serving");
                self.set_rejected(msg);
            }
        }
    }

    fn check_change(&self, path: &Path) -> Result<ProxyConfig, String> {
        let new = crate::config::load(path).map_err(|e| e.to_string())?;
        let old = self.rt.config.load();
        let fields = restart_fields(&old, &new);
        if !fields.is_empty() {
            return Err(format!(
                "{}: changes {} which need a restart; restart the proxy to apply them (only tracing.sampling, routes, quotas and timeouts apply live)",
                path.display(),
                fields.join(", ")
            ));
        }
        // Routes and quota limits from crank-control stay: the file's are the
        // fallback for when nothing was ever received.
        match self.mesh.as_ref().and_then(|m| m.applied()) {
            Some(u) => {
                let new = crate::mesh::merge::overlay(new, Some(&u));
                let file = path.display().to_string();
                crate::config::validate_pushed(
                    &file,
                    &new,
                    path.parent().unwrap_or(Path::new(".")),
                )
                .map_err(|e| e.to_string())?;
                Ok(new)
            }
            None => Ok(new),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> ProxyConfig {
        let text = format!("identity: {{cert: a.crt, key: a.key, trust_bundle: b.pem}}\nadmin: {{listen: 127.0.0.1:9901}}\n{extra}");
        crate::config::parse("p.yaml", &text).unwrap()
    }

    #[test]
    fn live_fields_need_no_restart() {
        let old = cfg("tracing: {sampling: 1.0}\n");
        assert!(restart_fields(&old, &cfg("tracing: {sampling: 0.01}\n")).is_empty());
        assert!(restart_fields(
            &old,
            &cfg("tracing: {sampling: 1.0}\ntimeouts: {connect: 1s}\nroutes: [{name: b, endpoints: [{address: 127.0.0.1:1, identity: b.t.crank.local}]}]\n")
        )
        .is_empty());
    }

    #[test]
    fn other_fields_are_named() {
        let old = cfg("tracing: {sampling: 1.0}\n");
        assert_eq!(
            restart_fields(
                &old,
                &cfg("tracing: {sampling: 1.0, otlp: {endpoint: \"http://x:4318/v1/traces\"}}\n")
            ),
            vec!["tracing (all but tracing.sampling)"]
        );
        assert_eq!(
            restart_fields(&old, &cfg("threads: 2\n")),
            vec!["threads", "tracing (all but tracing.sampling)"]
        );
        let mut moved = old.clone();
        moved.admin.listen = "127.0.0.1:9902".parse().unwrap();
        assert_eq!(restart_fields(&old, &moved), vec!["admin"]);
        let mut limited = old.clone();
        limited.limits.request_head_timeout = std::time::Duration::from_secs(3);
        assert_eq!(restart_fields(&old, &limited), vec!["limits"]);
    }
}
