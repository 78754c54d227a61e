//! `tenants.yaml` applied without a restart: the shim re-reads
//! `exec.queue.tenants` every [`RELOAD_INTERVAL`] and, when the text
//! changed, checks it whole. A good file replaces the weights and quotas
//! from the next submission and claim on; a bad one (unreadable, not YAML,
//! an entry that fails its checks) is refused whole and logged, and the
//! last good one stays in force.
//!
//! The file reaches every host the way the rest of the mesh config
//! directory does (the checkout the control plane loads, synced to each
//! host); see `docs/reference/job-queue.md#tenants`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::tenants::Tenants;

/// How often the file is re-read (a small file: reading it is cheaper and
/// surer than watching it, and sees a symlink swapped under it too).
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// What one look at the file found.
#[derive(Debug, PartialEq)]
pub enum Reload {
    Unchanged,
    Applied,
    /// Refused whole; the last good file stays. The message names the file
    /// and the problem.
    Rejected(String),
}

/// The tenants in force and where they come from.
pub struct LiveTenants {
    path: Option<PathBuf>,
    current: RwLock<Arc<Tenants>>,
    /// The text last looked at (good or bad), so a bad file is logged once.
    seen: Mutex<Option<String>>,
}

impl LiveTenants {
    /// Loads the file (a bad one is refused: the shim does not start on
    /// it); without a path, every tenant gets the defaults.
    pub fn load(path: Option<&Path>) -> Result<LiveTenants, String> {
        let (tenants, text) = match path {
            Some(p) => {
                let text = read(p)?;
                (parse(p, &text)?, Some(text))
            }
            None => (Tenants::default(), None),
        };
        Ok(LiveTenants {
            path: path.map(Path::to_path_buf),
            current: RwLock::new(Arc::new(tenants)),
            seen: Mutex::new(text),
        })
    }

    /// The tenants in force now.
    pub fn snapshot(&self) -> Arc<Tenants> {
        self.current.read().unwrap().clone()
    }

    /// Re-reads the file and applies it when it changed and is good.
    pub fn reload(&self) -> Reload {
        let Some(path) = &self.path else {
            return Reload::Unchanged;
        };
        let text = read(path);
        let mut seen = self.seen.lock().unwrap();
        let key = text
            .as_ref()
            .map_or_else(|e| format!("\0{e}"), Clone::clone);
        if seen.as_deref() == Some(key.as_str()) {
            return Reload::Unchanged;
        }
        *seen = Some(key);
        match text.and_then(|t| parse(path, &t)) {
            Ok(t) => {
                *self.current.write().unwrap() = Arc::new(t);
                Reload::Applied
            }
            Err(e) => Reload::Rejected(e),
        }
    }

    /// Reloads every [`RELOAD_INTERVAL`] while the shim runs, logging what
    /// changed.
    pub fn spawn_reloader(self: &Arc<Self>) {
        if self.path.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(live) = weak.upgrade() else { return };
                match live.reload() {
                    Reload::Unchanged => {}
                    Reload::Applied => {
                        tracing::info!(path = ?live.path, "tenants.yaml changed: new weights and quotas applied")
                    }
                    Reload::Rejected(e) => tracing::error!(
                        error = %e,
                        "tenants.yaml refused whole; the last good file stays in force; fix it (crankctl check) and it applies on the next read"
                    ),
                }
            }
        });
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read it: {e}", path.display()))
}

fn parse(path: &Path, text: &str) -> Result<Tenants, String> {
    let file = serde_yaml::from_str(text).map_err(|e| format!("{}: {e}", path.display()))?;
    Tenants::new(file).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_change_applies_and_a_bad_one_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.yaml");
        std::fs::write(&path, "tenants:\n  - {name: acme, max_queued: 2}\n").unwrap();
        let live = LiveTenants::load(Some(&path)).unwrap();
        assert_eq!(live.reload(), Reload::Unchanged);
        std::fs::write(&path, "tenants:\n  - {name: acme, max_queued: 5}\n").unwrap();
        assert_eq!(live.reload(), Reload::Applied);
        assert_eq!(live.snapshot().get("acme").max_queued, Some(5));
        // One good entry and one bad: nothing of it applies.
        std::fs::write(
            &path,
            "tenants:\n  - {name: acme, max_queued: 9}\n  - {name: x, weight: 0}\n",
        )
        .unwrap();
        let Reload::Rejected(e) = live.reload() else {
            panic!("a bad file applied")
        };
        assert!(e.contains("tenants.yaml") && e.contains("weight"), "{e}");
        assert_eq!(live.snapshot().get("acme").max_queued, Some(5));
        assert_eq!(
            live.reload(),
            Reload::Unchanged,
            "a bad file is reported once"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(live.reload(), Reload::Rejected(_)));
        assert_eq!(live.snapshot().get("acme").max_queued, Some(5));
        std::fs::write(&path, "tenants: []\n").unwrap();
        assert_eq!(live.reload(), Reload::Applied);
        assert_eq!(live.snapshot().get("acme").max_queued, None);
    }

    #[test]
    fn a_bad_file_at_start_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.yaml");
        std::fs::write(&path, "tenants: [{name: a, wieght: 2}]\n").unwrap();
        assert!(LiveTenants::load(Some(&path)).is_err());
        assert!(LiveTenants::load(None)
            .unwrap()
            .snapshot()
            .arrays()
            .0
            .is_empty());
    }
}
