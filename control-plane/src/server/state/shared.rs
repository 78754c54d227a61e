//! The CA state as the store keeps it (`store: {etcd: ...}`): pure
//! conversions, no I/O. The core document `ca/state` holds everything but
//! the inventory, with each intermediate's private key sealed under the KEK
//! (the generation, `<trust domain>/<serial>`, is the associated data); each
//! issued leaf is its own key `ca/inventory/<serial>`, so renewals write one
//! small key and never contend on the core document. Tokens, the deny list
//! and its version stay in the core document: using a token and revoking are
//! one compare-and-swap each, so a token enrolls once across replicas and a
//! deny-list version always comes with its serials.
//!
//! Every document here (and `mesh/version`) is stored authenticated:
//! HMAC-SHA256 under a KEK-derived key over the key name and the JSON
//! ([`Kek::authenticate`]), so an etcd writer without the KEK can neither
//! add a root, a token hash or a leaf, nor empty the deny list, nor publish
//! a config version. A document that fails the check is refused.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{CaState, Issued, Report};
use crate::server::mesh::Published;
use crate::store::seal::{Kek, SealError};

pub const CORE_KEY: &str = "ca/state";
pub const INVENTORY_PREFIX: &str = "ca/inventory/";
pub const REPORTS_PREFIX: &str = "ca/reports/";
pub const CA_PREFIX: &str = "ca/";
pub const MESH_KEY: &str = "mesh/version";

/// The document at [`CORE_KEY`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredCa {
    /// Without the inventory and without private keys.
    state: CaState,
    /// Intermediate serial -> its key, sealed for that generation.
    sealed_keys: BTreeMap<String, String>,
}

/// The associated data that binds a sealed key to its generation.
pub fn generation(trust_domain: &str, serial: &str) -> String {
    format!("{trust_domain}/{serial}")
}

/// Everything but the inventory (what [`CORE_KEY`] holds, keys in clear).
pub fn core_of(st: &CaState) -> CaState {
    CaState {
        trust_domain: st.trust_domain.clone(),
        roots: st.roots.clone(),
        intermediates: st.intermediates.clone(),
        bundle_version: st.bundle_version,
        tokens: st.tokens.clone(),
        inventory: Vec::new(),
        revoked: st.revoked.clone(),
        revocations_version: st.revocations_version,
        rotation: st.rotation.clone(),
    }
}

/// True when the two states differ outside the inventory.
pub fn core_differs(a: &CaState, b: &CaState) -> bool {
    a.trust_domain != b.trust_domain
        || a.roots != b.roots
        || a.intermediates != b.intermediates
        || a.bundle_version != b.bundle_version
        || a.tokens != b.tokens
        || a.revoked != b.revoked
        || a.revocations_version != b.revocations_version
        || a.rotation != b.rotation
}

/// The core document's bytes: keys sealed, inventory left out.
pub fn seal_core(st: &CaState, kek: &Kek) -> Result<Vec<u8>, SealError> {
    let mut state = core_of(st);
    let mut sealed_keys = BTreeMap::new();
    for i in &mut state.intermediates {
        if let Some(key) = i.key_pem.take() {
            let g = generation(&state.trust_domain, &i.serial);
            sealed_keys.insert(i.serial.clone(), kek.seal(key.as_bytes(), &g)?);
        }
    }
    let doc = StoredCa { state, sealed_keys };
    let json = serde_json::to_vec(&doc).map_err(|e| SealError::Seal(e.to_string()))?;
    kek.authenticate(CORE_KEY, &json)
}

/// Why the core document could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Seal(#[from] SealError),
    #[error("the store's ca/state is not a crank-control CA document ({0}); restore it from an etcd snapshot")]
    Format(String),
}

/// The core state from its bytes, keys opened with `kek`.
pub fn open_core(bytes: &[u8], kek: &Kek) -> Result<CaState, OpenError> {
    let json = kek.verify(CORE_KEY, bytes)?;
    let doc: StoredCa =
        serde_json::from_slice(&json).map_err(|e| OpenError::Format(e.to_string()))?;
    let mut state = doc.state;
    for i in &mut state.intermediates {
        if let Some(sealed) = doc.sealed_keys.get(&i.serial) {
            let g = generation(&state.trust_domain, &i.serial);
            let key = kek.open(sealed, &g)?;
            i.key_pem = Some(String::from_utf8(key).map_err(|e| OpenError::Format(e.to_string()))?);
        }
    }
    Ok(state)
}

/// True when `new` would take the CA backwards from `cur` (an older
/// authentic document written again: fewer revocations or an older
/// bundle); such a document is refused.
pub fn goes_backwards(cur: &CaState, new: &CaState) -> bool {
    new.revocations_version < cur.revocations_version || new.bundle_version < cur.bundle_version
}

/// The store key of a leaf.
pub fn inventory_key(serial: &str) -> String {
    format!("{INVENTORY_PREFIX}{serial}")
}

/// What `ca/inventory/<serial>` holds: the leaf, authenticated for that key.
pub fn seal_issued(i: &Issued, kek: &Kek) -> Result<Vec<u8>, SealError> {
    let json = serde_json::to_vec(i).map_err(|e| SealError::Seal(e.to_string()))?;
    kek.authenticate(&inventory_key(&i.serial), &json)
}

/// The leaf stored at `key`, once its tag checks and its serial is the key's.
pub fn open_issued(key: &str, bytes: &[u8], kek: &Kek) -> Result<Issued, OpenError> {
    let json = kek.verify(key, bytes)?;
    let i: Issued = serde_json::from_slice(&json).map_err(|e| OpenError::Format(e.to_string()))?;
    if inventory_key(&i.serial) != key {
        return Err(OpenError::Format(format!(
            "{key} holds serial {}",
            i.serial
        )));
    }
    Ok(i)
}

/// What `mesh/version` holds: the published version, authenticated.
pub fn seal_mesh(p: &Published, kek: &Kek) -> Result<Vec<u8>, SealError> {
    let json = serde_json::to_vec(p).map_err(|e| SealError::Seal(e.to_string()))?;
    kek.authenticate(MESH_KEY, &json)
}

/// The published version in `mesh/version`, once its tag checks.
pub fn open_mesh(bytes: &[u8], kek: &Kek) -> Result<Published, OpenError> {
    let json = kek.verify(MESH_KEY, bytes)?;
    serde_json::from_slice(&json).map_err(|e| OpenError::Format(e.to_string()))
}

/// Replaces everything but the inventory of `st` with `core`.
pub fn set_core(st: &mut CaState, core: CaState) {
    let inventory = std::mem::take(&mut st.inventory);
    *st = core;
    st.inventory = inventory;
}

/// Leaves in `after` that `before` lacks, and serials `before` had that `after` dropped.
pub fn inventory_diff<'a>(before: &CaState, after: &'a CaState) -> (Vec<&'a Issued>, Vec<String>) {
    let had: HashSet<&str> = before.inventory.iter().map(|i| i.serial.as_str()).collect();
    let has: HashSet<&str> = after.inventory.iter().map(|i| i.serial.as_str()).collect();
    let added = after
        .inventory
        .iter()
        .filter(|i| !had.contains(i.serial.as_str()))
        .collect();
    let removed = before
        .inventory
        .iter()
        .filter(|i| !has.contains(i.serial.as_str()))
        .map(|i| i.serial.clone())
        .collect();
    (added, removed)
}

/// Adds a leaf seen in the store, once.
pub fn add_issued(st: &mut CaState, issued: Issued) {
    if !st.inventory.iter().any(|i| i.serial == issued.serial) {
        st.inventory.push(issued);
    }
}

/// A workload report written by another replica: kept when it is newer
/// than ours (our own "told to renew" stays).
pub fn merge_report(reports: &mut std::collections::HashMap<String, Report>, theirs: Report) {
    match reports.get_mut(&theirs.instance) {
        Some(ours) if ours.last_seen > theirs.last_seen => {}
        Some(ours) => {
            let told = ours.told_renew.take();
            *ours = Report {
                told_renew: told,
                ..theirs
            };
        }
        None => {
            reports.insert(theirs.instance.clone(), theirs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn state_in_rotation() -> CaState {
        let day = Duration::from_secs(86400);
        let root = crank_certs::Ca::generate("crank.local", 10 * day).unwrap();
        let inter = root.generate_intermediate(5 * day).unwrap();
        let mut st = CaState::seed(&inter, root.cert_pem(), 100).unwrap();
        let next = root.generate_intermediate(5 * day).unwrap();
        st.rotate_intermediate(&next, 200).unwrap();
        st
    }

    #[test]
    fn the_core_document_holds_no_key_in_clear_and_opens_to_the_same_state() {
        let st = state_in_rotation();
        assert_eq!(st.intermediates.len(), 2);
        let kek = Kek::from_bytes(&[3; 32]).unwrap();
        let bytes = seal_core(&st, &kek).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("PRIVATE KEY"), "a key in clear: {text}");
        assert_eq!(open_core(&bytes, &kek).unwrap(), core_of(&st));
        let wrong = Kek::from_bytes(&[4; 32]).unwrap();
        let e = open_core(&bytes, &wrong).unwrap_err().to_string();
        assert!(e.contains("same kek_file"), "{e}");
    }

    /// The JSON inside an authenticated document, and the document again
    /// with `json` in it, re-tagged by `kek` (what a KEK holder can do).
    fn inner(bytes: &[u8], kek: &Kek) -> Vec<u8> {
        kek.verify(CORE_KEY, bytes).unwrap()
    }

    #[test]
    fn an_etcd_writer_without_the_kek_cannot_change_the_ca_a_leaf_or_the_mesh() {
        let mut st = state_in_rotation();
        st.revoked.insert(
            "ab".into(),
            super::super::RevokedEntry {
                not_after: 10,
                revoked_at: 1,
                identity: None,
            },
        );
        let kek = Kek::from_bytes(&[3; 32]).unwrap();
        let bytes = seal_core(&st, &kek).unwrap();
        // An empty deny list written as plain JSON, as the old format was.
        let mut plain: serde_json::Value = serde_json::from_slice(&inner(&bytes, &kek)).unwrap();
        plain["state"]["revoked"] = serde_json::json!({});
        let forged = serde_json::to_vec(&plain).unwrap();
        let e = open_core(&forged, &kek).unwrap_err().to_string();
        assert!(e.contains("integrity"), "{e}");
        // The same change inside the envelope, keeping the old tag.
        let mut env: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        env["doc"] = serde_json::Value::String(String::from_utf8(forged).unwrap());
        let e = open_core(&serde_json::to_vec(&env).unwrap(), &kek).unwrap_err();
        assert!(e.to_string().contains("integrity"), "{e}");
        assert_eq!(open_core(&bytes, &kek).unwrap(), core_of(&st));

        let leaf = test_leaf("cd");
        let sealed = seal_issued(&leaf, &kek).unwrap();
        assert_eq!(open_issued("ca/inventory/cd", &sealed, &kek).unwrap(), leaf);
        assert!(
            open_issued("ca/inventory/ef", &sealed, &kek).is_err(),
            "moved"
        );
        let plain_leaf = serde_json::to_vec(&leaf).unwrap();
        assert!(open_issued("ca/inventory/cd", &plain_leaf, &kek).is_err());

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("capabilities.yaml"),
            "capabilities: [{name: t:v1}]\n",
        )
        .unwrap();
        let p = Published {
            seq: 3,
            published_at: 0,
            snapshot: crate::configdir::load(dir.path()).unwrap(),
        };
        let sealed = seal_mesh(&p, &kek).unwrap();
        assert_eq!(open_mesh(&sealed, &kek).unwrap().seq, 3);
        let plain_mesh = serde_json::to_vec(&p).unwrap();
        assert!(open_mesh(&plain_mesh, &kek).is_err());
    }

    #[test]
    fn an_older_authentic_ca_state_is_refused_as_going_backwards() {
        let st = state_in_rotation();
        let mut newer = st.clone();
        newer.revocations_version += 1;
        assert!(goes_backwards(&newer, &st));
        assert!(!goes_backwards(&st, &newer));
        assert!(!goes_backwards(&st, &st));
    }

    fn test_leaf(serial: &str) -> Issued {
        Issued {
            serial: serial.into(),
            identity: crank_certs::Identity::new("web", "acme", "crank.local").unwrap(),
            instance: "web-1".into(),
            not_before: 0,
            not_after: 10,
            requester: "test".into(),
            issuer: String::new(),
            issuer_serial: String::new(),
            issued_at: 0,
        }
    }

    #[test]
    fn a_sealed_key_swapped_to_another_generation_is_refused() {
        let st = state_in_rotation();
        let kek = Kek::from_bytes(&[3; 32]).unwrap();
        let mut doc: StoredCa =
            serde_json::from_slice(&inner(&seal_core(&st, &kek).unwrap(), &kek)).unwrap();
        let serials: Vec<String> = doc.sealed_keys.keys().cloned().collect();
        let (a, b) = (serials[0].clone(), serials[1].clone());
        let ka = doc.sealed_keys[&a].clone();
        let kb = doc.sealed_keys[&b].clone();
        doc.sealed_keys.insert(a, kb);
        doc.sealed_keys.insert(b, ka);
        // Re-tagged with the KEK, so only the generation binding refuses it.
        let swapped = kek
            .authenticate(CORE_KEY, &serde_json::to_vec(&doc).unwrap())
            .unwrap();
        let e = open_core(&swapped, &kek).unwrap_err().to_string();
        assert!(e.contains("does not open"), "{e}");
    }

    #[test]
    fn the_inventory_diff_names_new_and_dropped_leaves() {
        let mut before = state_in_rotation();
        let leaf = test_leaf;
        before.inventory = vec![leaf("aa"), leaf("bb")];
        let mut after = before.clone();
        after.inventory.remove(0);
        after.inventory.push(leaf("cc"));
        let (added, removed) = inventory_diff(&before, &after);
        assert_eq!(
            added.iter().map(|i| i.serial.as_str()).collect::<Vec<_>>(),
            ["cc"]
        );
        assert_eq!(removed, ["aa"]);
        assert!(!core_differs(&before, &after));
        after.revocations_version += 1;
        assert!(core_differs(&before, &after));
    }
}
