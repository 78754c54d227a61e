//! What the mesh part keeps on disk: the last applied update
//! (`state_dir/mesh.json`) and the pushed policy files (`policy_dir`).
//! Every file is written whole to a temporary file and renamed into place,
//! so a reader (a restart, the policy watcher) never sees half of one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crank_api::mesh::MeshUpdate;

/// The last good update's file name in `state_dir`.
pub const STATE_FILE: &str = "mesh.json";

pub fn state_file(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// Writes `contents` to `dir/name` atomically (temporary file, fsync, rename).
pub fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
}

/// Saves the applied update as the last good one.
pub fn save(dir: &Path, u: &MeshUpdate) -> std::io::Result<()> {
    let body = serde_json::to_vec_pretty(u).map_err(std::io::Error::other)?;
    write_atomic(dir, STATE_FILE, &body)
}

/// The last good update; `Ok(None)` when there is none yet.
pub fn load(dir: &Path) -> Result<Option<MeshUpdate>, String> {
    let path = state_file(dir);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| format!("{} does not parse: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes the pushed policy files into `dir` (only those whose contents
/// changed) and removes the ones the previous update had and this one has
/// not. Files this proxy did not write are left alone.
pub fn write_policies(
    dir: &Path,
    files: &BTreeMap<String, String>,
    previous: &[&String],
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, contents) in files {
        let path = dir.join(name);
        if std::fs::read(&path).is_ok_and(|old| old == contents.as_bytes()) {
            continue;
        }
        write_atomic(dir, name, contents.as_bytes())?;
    }
    for name in previous {
        if !files.contains_key(*name) {
            match std::fs::remove_file(dir.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crank_api::mesh::ConfigVersion;

    fn update() -> MeshUpdate {
        let c = crate::config::parse(
            "p.yaml",
            "identity: {cert: a, key: b, trust_bundle: c}\nadmin: {listen: 127.0.0.1:1}\nroutes: [{name: backend, hosts: [b], endpoints: [{address: 10.0.0.7:4143, identity: backend.demo.crank.local}], timeout: 2s, retry: {attempts: 2}}]\nquotas: {limits: [{tenant: a, capability: c, rate: 5/s, burst: 9}]}\n",
        )
        .unwrap();
        MeshUpdate {
            version: ConfigVersion {
                seq: 4,
                hash: "f0".repeat(32),
            },
            registry: 12,
            routes: c.routes,
            quotas: c.quotas.limits,
            policies: [("authz.rego".to_string(), "package x\n".to_string())].into(),
            egress: Default::default(),
            tenants: None,
        }
    }

    #[test]
    fn mesh_json_round_trips() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load(d.path()).unwrap(), None);
        let u = update();
        save(d.path(), &u).unwrap();
        assert_eq!(load(d.path()).unwrap(), Some(u.clone()));
        // saved again over the old one, no temporary file left behind
        let mut u2 = u;
        u2.version.seq = 5;
        save(d.path(), &u2).unwrap();
        assert_eq!(load(d.path()).unwrap().unwrap().version.seq, 5);
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["mesh.json".to_string()]);
    }

    #[test]
    fn a_broken_mesh_json_is_an_error_not_a_panic() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(state_file(d.path()), "{\"version\":").unwrap();
        let e = load(d.path()).unwrap_err();
        assert!(e.contains("mesh.json does not parse"), "{e}");
    }

    #[test]
    fn policies_are_written_and_stale_ones_removed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("local.rego"), "mine").unwrap();
        let first: BTreeMap<String, String> = [
            ("a.rego".to_string(), "A".to_string()),
            ("b.rego".into(), "B".into()),
        ]
        .into();
        write_policies(d.path(), &first, &[]).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join("a.rego")).unwrap(),
            "A"
        );
        let second: BTreeMap<String, String> = [("a.rego".to_string(), "A2".to_string())].into();
        let before: Vec<&String> = first.keys().collect();
        write_policies(d.path(), &second, &before).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join("a.rego")).unwrap(),
            "A2"
        );
        assert!(!d.path().join("b.rego").exists());
        assert_eq!(
            std::fs::read_to_string(d.path().join("local.rego")).unwrap(),
            "mine"
        );
    }
}
