//! The CA's state and every decision about it, as plain data and pure
//! functions of `now`: join tokens, the inventory of issued leaves, the deny
//! list, the root/intermediate generations with the rotation state machine,
//! and what each workload last reported. [`CaState`] is saved whole to
//! `state.json` (mode 0600: it holds intermediate keys and token hashes)
//! after every change; workload reports live in memory only and come back
//! within one watch period after a restart.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crank_api::identity::{canonical_serial, Bundle, Revocations};
use crank_certs::{Ca, CertSummary, Identity};
use serde::{Deserialize, Serialize};

/// One root in the bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RootEntry {
    pub cert_pem: String,
    pub subject: String,
    pub serial: String,
    pub not_after: i64,
    pub added_at: i64,
}

/// One intermediate generation. Only the signing one keeps its key once a
/// rotation ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntermediateEntry {
    pub cert_pem: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_pem: Option<String>,
    pub subject: String,
    pub serial: String,
    pub not_after: i64,
    pub state: IntermediateState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IntermediateState {
    /// Signs every new leaf.
    Signing,
    /// Leaves it signed are being replaced (rotation in progress).
    Retiring,
    /// No longer used; key deleted.
    Retired,
    /// Root rotation: waits, with its key, until every workload trusts its root.
    Staged,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Token {
    /// SHA-256 of the token, hex. The token itself is never stored.
    pub hash: String,
    pub identity: Identity,
    pub created_at: i64,
    pub expires_at: i64,
    #[serde(default)]
    pub used_at: Option<i64>,
}

/// One issued leaf, as `crankctl cert list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Issued {
    pub serial: String,
    pub identity: Identity,
    pub instance: String,
    pub not_before: i64,
    pub not_after: i64,
    /// `enroll (token <first 8 hex of its hash>)` or `renew (serial <s>)`.
    pub requester: String,
    /// Subject of the intermediate that signed it.
    pub issuer: String,
    /// Serial of that intermediate.
    #[serde(default)]
    pub issuer_serial: String,
    pub issued_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RotationKind {
    Root,
    Intermediate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Idle,
    /// Root rotation: the new root is in the bundle; waiting for every
    /// active workload to report that bundle.
    AddingRoot,
    /// The new intermediate signs; waiting for every active workload to
    /// serve a leaf from it.
    Reissuing,
    /// Root rotation: the old root left the bundle; waiting for every
    /// active workload to report that bundle.
    RemovingRoot,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::AddingRoot => "adding-root",
            Phase::Reissuing => "reissuing",
            Phase::RemovingRoot => "removing-root",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rotation {
    pub kind: RotationKind,
    pub phase: Phase,
    pub started_at: i64,
    pub phase_since: i64,
    /// The bundle version every workload must report to leave the phase.
    pub target_bundle: u64,
    /// The root being retired (root rotation).
    #[serde(default)]
    pub old_root_serial: Option<String>,
    /// Past rotations' outcomes, newest last, for `ca status`.
    #[serde(default)]
    pub history: Vec<String>,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            kind: RotationKind::Intermediate,
            phase: Phase::Idle,
            started_at: 0,
            phase_since: 0,
            target_bundle: 0,
            old_root_serial: None,
            history: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevokedEntry {
    pub not_after: i64,
    pub revoked_at: i64,
    pub identity: Option<Identity>,
}

/// Everything `state.json` keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaState {
    pub trust_domain: String,
    pub roots: Vec<RootEntry>,
    pub intermediates: Vec<IntermediateEntry>,
    pub bundle_version: u64,
    #[serde(default)]
    pub tokens: Vec<Token>,
    #[serde(default)]
    pub inventory: Vec<Issued>,
    #[serde(default)]
    pub revoked: BTreeMap<String, RevokedEntry>,
    #[serde(default)]
    pub revocations_version: u64,
    #[serde(default)]
    pub rotation: Rotation,
}

/// What a workload last told the CA (watch query, or its last issue).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub identity: Identity,
    pub instance: String,
    pub serial: String,
    pub bundle_version: u64,
    pub last_seen: i64,
    /// The serial this workload was last told to replace (so a watch does
    /// not answer "renew" again at once while the renewal is under way).
    #[serde(skip, default)]
    pub told_renew: Option<String>,
}

/// A refusal of a workload request: a stable code and a message with the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

fn refuse(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
    }
}

/// Why an admin request was refused (shown by crankctl as is).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AdminError(pub String);

pub fn summary_of(pem: &str) -> Result<CertSummary, String> {
    let der = crank_certs::pem::certs_from_pem(pem.as_bytes())?;
    CertSummary::from_der(&der[0]).map_err(|e| e.to_string())
}

pub fn sha256_hex(s: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl CaState {
    /// A fresh state from an intermediate and its root (`crankctl ca intermediate`).
    pub fn seed(inter: &Ca, root_pem: &str, now: i64) -> Result<CaState, AdminError> {
        if !inter.is_intermediate() {
            return Err(AdminError("ca.intermediate must be a directory written by `crankctl ca intermediate` (the root signs offline; crank-control signs with an intermediate)".into()));
        }
        let root = root_entry(root_pem, now)?;
        check_chains(inter, root_pem)?;
        Ok(CaState {
            trust_domain: inter.trust_domain().to_string(),
            roots: vec![root],
            intermediates: vec![intermediate_entry(inter, IntermediateState::Signing)?],
            bundle_version: 1,
            tokens: Vec::new(),
            inventory: Vec::new(),
            revoked: BTreeMap::new(),
            revocations_version: 1,
            rotation: Rotation::default(),
        })
    }

    pub fn bundle(&self) -> Bundle {
        Bundle {
            version: self.bundle_version,
            pem: self.roots.iter().map(|r| r.cert_pem.as_str()).collect(),
        }
    }

    pub fn revocations(&self) -> Revocations {
        Revocations {
            version: self.revocations_version,
            serials: self.revoked.keys().cloned().collect(),
        }
    }

    /// The intermediate that signs now.
    pub fn signer(&self) -> Result<Ca, AdminError> {
        let e = self
            .intermediates
            .iter()
            .find(|i| i.state == IntermediateState::Signing)
            .ok_or_else(|| AdminError("state.json has no signing intermediate".into()))?;
        let key = e
            .key_pem
            .as_deref()
            .ok_or_else(|| AdminError("the signing intermediate has no key".into()))?;
        Ca::from_pem(&e.cert_pem, key, &self.trust_domain).map_err(|e| AdminError(e.to_string()))
    }

    pub fn signer_subject(&self) -> Option<&str> {
        self.signer_entry().map(|i| i.subject.as_str())
    }

    pub fn signer_entry(&self) -> Option<&IntermediateEntry> {
        self.intermediates
            .iter()
            .find(|i| i.state == IntermediateState::Signing)
    }

    // ---- tokens ----

    /// Makes a token for `id`, valid `ttl`. Returns the token (shown once).
    pub fn create_token(&mut self, id: Identity, ttl: Duration, now: i64) -> (String, i64) {
        let token = format!("crank-jt-{}", crank_certs::random_hex(24));
        let expires_at = now + ttl.as_secs() as i64;
        self.tokens.push(Token {
            hash: sha256_hex(&token),
            identity: id,
            created_at: now,
            expires_at,
            used_at: None,
        });
        (token, expires_at)
    }

    /// Checks a token without using it up: the identity it grants.
    pub fn check_token(&self, token: &str, now: i64) -> Result<(usize, Identity), Refusal> {
        let hash = sha256_hex(token.trim());
        let (i, t) = self
            .tokens
            .iter()
            .enumerate()
            .find(|(_, t)| t.hash == hash)
            .ok_or_else(|| {
                refuse(
                    403,
                    "token-unknown",
                    "this join token was not made by this control plane; make one with `crankctl token create --service S --tenant T`",
                )
            })?;
        if let Some(at) = t.used_at {
            return Err(refuse(403, "token-reused", format!("this join token was already used (at {}); tokens are one-time: make a new one with `crankctl token create`", rfc3339(at))));
        }
        if t.expires_at <= now {
            return Err(refuse(403, "token-expired", format!("this join token expired at {}; make a new one with `crankctl token create` (and --ttl if enrollment takes longer)", rfc3339(t.expires_at))));
        }
        Ok((i, t.identity.clone()))
    }

    pub fn use_token(&mut self, index: usize, now: i64) {
        self.tokens[index].used_at = Some(now);
    }

    // ---- inventory and revocation ----

    pub fn record_issue(&mut self, issued: Issued) {
        self.inventory.push(issued);
    }

    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.contains_key(&canonical_serial(serial))
    }

    /// [`CaState::is_revoked`] for a serial already in canonical form
    /// (no copy; a watch checks on every request).
    pub fn is_revoked_canonical(&self, serial: &str) -> bool {
        self.revoked.contains_key(serial)
    }

    /// Revokes a serial, or every unexpired leaf of an identity. Returns the
    /// serials newly denied.
    pub fn revoke(&mut self, target: &str, now: i64) -> Result<Vec<String>, AdminError> {
        let picked: Vec<&Issued> = if let Ok(id) = target.parse::<Identity>() {
            self.inventory
                .iter()
                .filter(|i| i.identity == id && i.not_after > now)
                .collect()
        } else {
            let s = canonical_serial(target);
            if !s.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(AdminError(format!("{target:?} is neither a serial (hex, as `crankctl cert list` shows) nor an identity (<service>.<tenant>.<trust-domain>)")));
            }
            self.inventory.iter().filter(|i| i.serial == s).collect()
        };
        if picked.is_empty() {
            return Err(AdminError(format!(
                "no unexpired certificate matches {target:?}; see `crankctl cert list`"
            )));
        }
        let mut added = Vec::new();
        let entries: Vec<(String, RevokedEntry)> = picked
            .iter()
            .map(|i| {
                (
                    i.serial.clone(),
                    RevokedEntry {
                        not_after: i.not_after,
                        revoked_at: now,
                        identity: Some(i.identity.clone()),
                    },
                )
            })
            .collect();
        for (s, e) in entries {
            if let std::collections::btree_map::Entry::Vacant(v) = self.revoked.entry(s.clone()) {
                added.push(s);
                v.insert(e);
            }
        }
        if !added.is_empty() {
            self.revocations_version += 1;
        }
        Ok(added)
    }

    /// Drops what has expired: deny-list entries of expired leaves, used or
    /// expired tokens after a day, inventory entries a week past expiry.
    /// Returns true when something changed.
    pub fn prune(&mut self, now: i64) -> bool {
        let before = (self.revoked.len(), self.tokens.len(), self.inventory.len());
        self.revoked.retain(|_, e| e.not_after > now);
        if self.revoked.len() != before.0 {
            self.revocations_version += 1;
        }
        self.tokens
            .retain(|t| t.used_at.unwrap_or(t.expires_at).max(t.expires_at) + 86_400 > now);
        self.inventory.retain(|i| i.not_after + 7 * 86_400 > now);
        before != (self.revoked.len(), self.tokens.len(), self.inventory.len())
    }

    /// True when [`CaState::prune`] would drop something (a cheap check).
    pub fn needs_prune(&self, now: i64) -> bool {
        self.revoked.values().any(|e| e.not_after <= now)
            || self
                .tokens
                .iter()
                .any(|t| t.used_at.unwrap_or(t.expires_at).max(t.expires_at) + 86_400 <= now)
            || self
                .inventory
                .iter()
                .any(|i| i.not_after + 7 * 86_400 <= now)
    }

    pub fn issued(&self, serial: &str) -> Option<&Issued> {
        let s = canonical_serial(serial);
        self.inventory.iter().rev().find(|i| i.serial == s)
    }

    // ---- rotation ----

    /// Starts an intermediate rotation: `new` (signed by a current root)
    /// signs from now on; every workload is asked to renew.
    pub fn rotate_intermediate(&mut self, new: &Ca, now: i64) -> Result<(), AdminError> {
        self.require_idle()?;
        let roots: String = self.roots.iter().map(|r| r.cert_pem.as_str()).collect();
        check_chains(new, &roots)?;
        self.start_reissuing(new, now)?;
        self.rotation.kind = RotationKind::Intermediate;
        self.rotation.started_at = now;
        self.rotation.old_root_serial = None;
        Ok(())
    }

    /// Starts a root rotation: `root_pem` joins the bundle now; `new` (signed
    /// by it) starts signing once every workload trusts it.
    pub fn rotate_root(&mut self, root_pem: &str, new: &Ca, now: i64) -> Result<(), AdminError> {
        self.require_idle()?;
        let root = root_entry(root_pem, now)?;
        if self.roots.iter().any(|r| r.serial == root.serial) {
            return Err(AdminError("this root is already in the bundle; make a new one with `crankctl ca init --dir DIR`".into()));
        }
        check_chains(new, root_pem)?;
        if new.trust_domain() != self.trust_domain {
            return Err(AdminError(
                "the new root is for another trust domain".into(),
            ));
        }
        let old = self.roots.last().map(|r| r.serial.clone());
        self.intermediates
            .push(intermediate_entry(new, IntermediateState::Staged)?);
        self.roots.push(root);
        self.bundle_version += 1;
        self.rotation.kind = RotationKind::Root;
        self.rotation.phase = Phase::AddingRoot;
        self.rotation.started_at = now;
        self.rotation.phase_since = now;
        self.rotation.target_bundle = self.bundle_version;
        self.rotation.old_root_serial = old;
        Ok(())
    }

    fn require_idle(&self) -> Result<(), AdminError> {
        if self.rotation.phase != Phase::Idle {
            return Err(AdminError(format!(
                "{} rotation is in phase {}; wait for it to finish (`crankctl ca status`)",
                match self.rotation.kind {
                    RotationKind::Root => "a root",
                    RotationKind::Intermediate => "an intermediate",
                },
                self.rotation.phase.as_str()
            )));
        }
        Ok(())
    }

    fn start_reissuing(&mut self, new: &Ca, now: i64) -> Result<(), AdminError> {
        let new_entry = intermediate_entry(new, IntermediateState::Signing)?;
        self.intermediates.retain(|i| i.serial != new_entry.serial);
        for i in &mut self.intermediates {
            if i.state == IntermediateState::Signing {
                i.state = IntermediateState::Retiring;
            }
        }
        self.intermediates.push(new_entry);
        self.rotation.phase = Phase::Reissuing;
        self.rotation.phase_since = now;
        Ok(())
    }

    /// True when a workload serving `serial` should renew now.
    pub fn should_renew(&self, serial: &str) -> bool {
        self.rotation.phase == Phase::Reissuing
            && self
                .issued(serial)
                .is_some_and(|i| Some(&i.issuer_serial) != self.signer_entry().map(|s| &s.serial))
    }

    /// Moves the rotation on when every active workload has caught up.
    /// Returns a line for the log when the phase changed.
    pub fn advance(
        &mut self,
        reports: &HashMap<String, Report>,
        stale_after: Duration,
        now: i64,
    ) -> Option<String> {
        let lagging = self.lagging(reports, stale_after, now);
        if self.rotation.phase == Phase::Idle || !lagging.is_empty() {
            return None;
        }
        let from = self.rotation.phase;
        match from {
            Phase::Idle => return None,
            Phase::AddingRoot => {
                let staged = self
                    .intermediates
                    .iter()
                    .rposition(|i| i.state == IntermediateState::Staged)?;
                let e = self.intermediates[staged].clone();
                let ca =
                    Ca::from_pem(&e.cert_pem, e.key_pem.as_deref()?, &self.trust_domain).ok()?;
                self.start_reissuing(&ca, now).ok()?;
            }
            Phase::Reissuing => {
                for i in &mut self.intermediates {
                    if i.state == IntermediateState::Retiring {
                        i.state = IntermediateState::Retired;
                        i.key_pem = None;
                    }
                }
                if self.rotation.kind == RotationKind::Root {
                    let old = self.rotation.old_root_serial.clone();
                    self.roots.retain(|r| Some(&r.serial) != old.as_ref());
                    self.bundle_version += 1;
                    self.rotation.target_bundle = self.bundle_version;
                    self.rotation.phase = Phase::RemovingRoot;
                } else {
                    self.finish(now);
                }
            }
            Phase::RemovingRoot => self.finish(now),
        }
        self.rotation.phase_since = now;
        Some(format!(
            "rotation phase {} -> {}",
            from.as_str(),
            self.rotation.phase.as_str()
        ))
    }

    fn finish(&mut self, now: i64) {
        let kind = match self.rotation.kind {
            RotationKind::Root => "root",
            RotationKind::Intermediate => "intermediate",
        };
        self.rotation.history.push(format!(
            "{kind} rotation started {} finished {}",
            rfc3339(self.rotation.started_at),
            rfc3339(now)
        ));
        if self.rotation.history.len() > 10 {
            self.rotation.history.remove(0);
        }
        self.rotation.phase = Phase::Idle;
        self.rotation.old_root_serial = None;
    }

    /// Is this report from a workload that counts (holds back a rotation)?
    pub fn is_active(&self, r: &Report, stale_after: Duration, now: i64) -> bool {
        now - r.last_seen <= stale_after.as_secs() as i64
            && !self.is_revoked(&r.serial)
            && self.issued(&r.serial).is_some_and(|i| i.not_after > now)
    }

    /// Active workloads that hold back the current phase, each with why.
    pub fn lagging(
        &self,
        reports: &HashMap<String, Report>,
        stale_after: Duration,
        now: i64,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for r in reports.values() {
            if !self.is_active(r, stale_after, now) {
                continue;
            }
            let why = match self.rotation.phase {
                Phase::Idle => None,
                Phase::AddingRoot | Phase::RemovingRoot => {
                    (r.bundle_version < self.rotation.target_bundle).then(|| {
                        format!(
                            "has trust bundle v{}, needs v{}",
                            r.bundle_version, self.rotation.target_bundle
                        )
                    })
                }
                Phase::Reissuing => self
                    .should_renew(&r.serial)
                    .then(|| format!("serves serial {} from the retiring intermediate", r.serial)),
            };
            if let Some(why) = why {
                out.push((r.instance.clone(), why));
            }
        }
        out.sort();
        out
    }
}

fn root_entry(pem: &str, now: i64) -> Result<RootEntry, AdminError> {
    let s = summary_of(pem).map_err(|e| AdminError(format!("the root: {e}")))?;
    if !s.is_ca || s.subject != s.issuer {
        return Err(AdminError(
            "the root is not a self-signed CA certificate; use ca.crt from `crankctl ca init`"
                .into(),
        ));
    }
    Ok(RootEntry {
        cert_pem: pem.to_string(),
        subject: s.subject,
        serial: canonical_serial(&s.serial),
        not_after: s.not_after,
        added_at: now,
    })
}

fn intermediate_entry(ca: &Ca, state: IntermediateState) -> Result<IntermediateEntry, AdminError> {
    let s = summary_of(ca.cert_pem()).map_err(AdminError)?;
    Ok(IntermediateEntry {
        cert_pem: ca.cert_pem().to_string(),
        key_pem: Some(ca.key_pem()),
        subject: s.subject,
        serial: canonical_serial(&s.serial),
        not_after: s.not_after,
        state,
    })
}

/// Checks that a leaf signed by `inter` verifies against `roots_pem`, the
/// way every workload will check it.
fn check_chains(inter: &Ca, roots_pem: &str) -> Result<(), AdminError> {
    use rustls::server::WebPkiClientVerifier;
    let id = Identity::new("probe", "crank-system", inter.trust_domain())
        .map_err(|e| AdminError(e.to_string()))?;
    let leaf = inter
        .issue(&crank_certs::LeafRequest::new(id, Duration::from_secs(60)))
        .map_err(|e| AdminError(e.to_string()))?;
    let chain = crank_certs::pem::certs_from_pem(leaf.cert_pem.as_bytes()).map_err(AdminError)?;
    let mut store = rustls::RootCertStore::empty();
    for r in crank_certs::pem::certs_from_pem(roots_pem.as_bytes()).map_err(AdminError)? {
        store
            .add(r)
            .map_err(|e| AdminError(format!("a root is not usable: {e}")))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let v = WebPkiClientVerifier::builder_with_provider(store.into(), provider)
        .build()
        .map_err(|e| AdminError(e.to_string()))?;
    v.verify_client_cert(&chain[0], &chain[1..], rustls::pki_types::UnixTime::now())
        .map_err(|e| {
            AdminError(format!(
                "the intermediate does not chain to the root ({e}); sign it with that root (`crankctl ca intermediate --root DIR`)"
            ))
        })?;
    Ok(())
}

pub fn rfc3339(ts: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub mod replica;
pub mod shared;

#[cfg(test)]
mod tests;
