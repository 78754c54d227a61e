//! Config distribution and the registry in crank-control: the config
//! directory is watched (a saved edit is checked at once, see
//! [`super::ticker`]) and checked every half second; a valid change is published
//! as a new version (sequence number + content hash, kept in `mesh.json`
//! so a restart serves the last good one even if the directory is broken);
//! proxies long-poll `/v1/mesh/watch` and get only their routes, resolved
//! against the live endpoints of the registry; workloads register with a
//! lease that heartbeats renew.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crank_api::mesh::{ConfigVersion, MeshRoute, MeshUpdate};
use crank_api::proxy::{EndpointConfig, RouteConfig};
use serde::{Deserialize, Serialize};

use crate::configdir::{MeshSnapshot, Problem};
use crate::registry::Entry;

/// A published version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Published {
    pub seq: u64,
    pub published_at: i64,
    pub snapshot: MeshSnapshot,
}

/// What one proxy last reported on its watch.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyReport {
    pub identity: String,
    pub instance: String,
    pub seq: u64,
    pub endpoints_version: u64,
    pub last_seen: i64,
    /// The long-poll wait it asked for (seconds): it calls again at least
    /// this often while it runs.
    pub wait: u64,
}

/// The publisher's state.
#[derive(Default)]
pub struct MeshState {
    pub current: Option<Arc<Published>>,
    /// When the directory last failed validation, and why.
    pub last_error: Option<(i64, Vec<Problem>)>,
    /// Hash of the files last looked at (valid or not).
    seen: Option<String>,
    pub proxies: HashMap<String, ProxyReport>,
    /// seq -> (hash, policy revision) of the versions published since the
    /// start (and the one loaded from `mesh.json`), the last
    /// [`HISTORY_LEN`]: what a proxy reporting an older seq runs.
    pub history: std::collections::BTreeMap<u64, (String, String)>,
}

/// How many published versions [`MeshState::history`] remembers.
pub const HISTORY_LEN: usize = 32;

/// The revision of a version's policy files: SHA-256 over each name and
/// contents, first 12 hex digits (what `crankctl check` compares).
pub fn policy_revision(policies: &std::collections::BTreeMap<String, String>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (name, text) in policies {
        for part in [name.as_bytes(), &[0], text.as_bytes(), &[0]] {
            ctx.update(part);
        }
    }
    ctx.finish().as_ref()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl MeshState {
    pub(super) fn remember(&mut self, p: &Published) {
        self.history.insert(
            p.seq,
            (
                p.snapshot.hash.clone(),
                policy_revision(&p.snapshot.policies),
            ),
        );
        while self.history.len() > HISTORY_LEN {
            self.history.pop_first();
        }
    }
}

impl MeshState {
    /// Loads the last published version from `mesh.json`, if any.
    pub fn open(state_dir: &std::path::Path) -> MeshState {
        let path = state_dir.join("mesh.json");
        let current = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Published>(&b).ok())
            .map(Arc::new);
        if let Some(p) = &current {
            tracing::info!(seq = p.seq, hash = %p.snapshot.hash, "loaded the last published mesh config");
        }
        let mut state = MeshState::default();
        if let Some(p) = &current {
            state.remember(p);
        }
        state.current = current;
        state
    }

    /// Checks `dir` again; returns the new version when one was published.
    pub fn refresh(
        &mut self,
        dir: &std::path::Path,
        state_dir: &std::path::Path,
        now: i64,
    ) -> Option<u64> {
        let files = match crate::configdir::files(dir) {
            Ok(f) => f,
            Err(e) => {
                if self.seen.as_deref() != Some("unreadable") {
                    tracing::error!(dir = %dir.display(), error = %e, "cannot read the config directory; the last published version keeps serving");
                    self.seen = Some("unreadable".into());
                }
                return None;
            }
        };
        let hash = crate::configdir::hash(&files);
        if self.seen.as_deref() == Some(hash.as_str()) {
            return None;
        }
        self.seen = Some(hash.clone());
        match crate::configdir::load(dir) {
            Err(problems) => {
                for p in &problems {
                    tracing::error!(problem = %p, "config change rejected; the last published version keeps serving");
                }
                self.last_error = Some((now, problems));
                None
            }
            Ok(snapshot) => {
                self.last_error = None;
                if self
                    .current
                    .as_ref()
                    .is_some_and(|c| c.snapshot.hash == snapshot.hash)
                {
                    return None;
                }
                let seq = self.current.as_ref().map_or(1, |c| c.seq + 1);
                let published = Published {
                    seq,
                    published_at: now,
                    snapshot,
                };
                if let Err(e) = super::write_atomic(
                    &state_dir.join("mesh.json"),
                    &serde_json::to_vec(&published).unwrap_or_default(),
                    false,
                ) {
                    tracing::error!(error = %format!("{e:#}"), "cannot save mesh.json; the new version serves from memory");
                }
                tracing::info!(seq, hash = %published.snapshot.hash, routes = published.snapshot.routes.len(), "published mesh config");
                self.remember(&published);
                self.current = Some(Arc::new(published));
                Some(seq)
            }
        }
    }
}

/// The routes `client` (a service name) receives.
pub fn routes_for<'a>(snap: &'a MeshSnapshot, client: &str) -> impl Iterator<Item = &'a MeshRoute> {
    let client = client.to_string();
    snap.routes
        .iter()
        .filter(move |r| r.clients.is_empty() || r.clients.contains(&client))
}

/// A mesh route in the proxy's own form, with its live endpoints.
pub fn to_proxy_route(route: &MeshRoute, entries: &[Entry]) -> RouteConfig {
    let mut resolved = crate::registry::resolve(route, entries);
    let egress = route.backends.iter().find_map(|b| b.egress.clone());
    if egress.is_some() {
        // Outside the mesh: registered endpoints of the capability do not serve it.
        resolved.endpoints.clear();
    }
    RouteConfig {
        name: route.name.clone(),
        hosts: route.matches.hosts.clone(),
        path_prefix: route.matches.path_prefix.clone(),
        endpoints: resolved
            .endpoints
            .iter()
            .map(|e| EndpointConfig {
                address: e.address,
                identity: e.identity.clone(),
                weight: e.weight,
                labels: e.labels.clone(),
                backend: e.backend as u32,
            })
            .collect(),
        capability: route.backends.first().map(|b| b.capability.clone()),
        timeout: route.timeout,
        idempotent: false,
        retry: route.retry.clone(),
        circuit: route.circuit.clone(),
        concurrency: None,
        fault: None,
        egress,
        server_speaks_first: route.server_speaks_first,
    }
}

/// The update one proxy gets, and its endpoints fingerprint.
pub fn update_for(p: &Published, client: &Identity, entries: &[Entry]) -> MeshUpdate {
    let mine: Vec<&MeshRoute> = routes_for(&p.snapshot, &client.service).collect();
    let routes: Vec<RouteConfig> = mine.iter().map(|r| to_proxy_route(r, entries)).collect();
    let quotas = quotas_for(&p.snapshot, &mine, client, entries);
    let fingerprint = fingerprint(&routes, &quotas);
    MeshUpdate {
        version: ConfigVersion {
            seq: p.seq,
            hash: p.snapshot.hash.clone(),
        },
        registry: fingerprint,
        routes,
        quotas,
        policies: p.snapshot.policies.clone(),
        egress: p.snapshot.egress.clone(),
        tenants: p.snapshot.tenants.clone(),
    }
}

/// The limits a proxy enforces: outbound ones for the capabilities its
/// routes reach, inbound ones for the capabilities its workload registered,
/// and every `*` limit.
pub fn quotas_for(
    snap: &MeshSnapshot,
    routes: &[&MeshRoute],
    client: &Identity,
    entries: &[Entry],
) -> Vec<crank_api::resilience::QuotaLimit> {
    use crank_api::resilience::QuotaDirection as D;
    let me = client.dns_name();
    let outbound: Vec<&str> = routes
        .iter()
        .flat_map(|r| r.backends.iter().map(|b| b.capability.as_str()))
        .collect();
    let inbound: Vec<&str> = entries
        .iter()
        .filter(|e| e.registration.identity == me)
        .flat_map(|e| e.registration.capabilities.iter().map(String::as_str))
        .collect();
    snap.quotas
        .limits
        .iter()
        .filter(|l| {
            let c = l.capability.as_str();
            c == "*"
                || (matches!(l.direction, D::Inbound | D::Both) && inbound.contains(&c))
                || (matches!(l.direction, D::Outbound | D::Both) && outbound.contains(&c))
        })
        .cloned()
        .collect()
}

/// A stable number for a proxy's resolved endpoints: the watch answers
/// when it changes, so registry changes that do not touch a proxy's routes
/// do not wake it.
fn fingerprint(routes: &[RouteConfig], quotas: &[crank_api::resilience::QuotaLimit]) -> u64 {
    let bytes = serde_json::to_vec(&(routes, quotas)).unwrap_or_default();
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(b) >> 1 // fits JSON numbers exactly
}

/// Updates already computed for the current (config seq, registry version).
#[derive(Default)]
pub struct UpdateCache {
    key: (u64, u64),
    by_identity: HashMap<String, Arc<CachedUpdate>>,
}

/// One identity's serialized [`MeshUpdate`].
pub struct CachedUpdate {
    seq: u64,
    fingerprint: u64,
    body: bytes::Bytes,
}

/// Time as the registry sees it (monotonic).
pub fn instant() -> Instant {
    Instant::now()
}

/// Default lease when a registration names none.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// What `crankctl status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeshStatus {
    pub config_dir: Option<String>,
    pub version: Option<ConfigVersion>,
    pub published_at: Option<i64>,
    pub last_error: Option<(i64, Vec<Problem>)>,
    /// The published version's [`policy_revision`].
    #[serde(default)]
    pub policy_revision: Option<String>,
    pub proxies: Vec<ProxyRow>,
    pub now: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyRow {
    pub identity: String,
    pub instance: String,
    pub seq: u64,
    pub last_seen: i64,
    /// Behind the published version, or silent.
    pub stale: bool,
    /// Not seen for 3 of its watch periods (90 s when it named none).
    #[serde(default)]
    pub silent: bool,
    /// Hash and policy revision of the version it runs, while crank-control
    /// remembers that version.
    #[serde(default)]
    pub hash: Option<String>,
    #[serde(default)]
    pub policy_revision: Option<String>,
}

/// A proxy is silent when not seen for 3 of its watch periods (it calls
/// again as each long-poll ends), at least 5 s; 90 s if it named no wait.
pub fn is_silent(last_seen: i64, wait: u64, now: i64) -> bool {
    let limit = if wait == 0 { 90 } else { (3 * wait).max(5) };
    now - last_seen > limit as i64
}

/// `crankctl routes`: each route with its resolved endpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteRow {
    pub route: MeshRoute,
    pub endpoints: Vec<EndpointConfig>,
    /// Indexes of backends without any live endpoint.
    pub empty_backends: Vec<usize>,
}

pub fn route_rows(p: &Published, entries: &[Entry]) -> Vec<RouteRow> {
    p.snapshot
        .routes
        .iter()
        .map(|r| {
            let res = crate::registry::resolve(r, entries);
            RouteRow {
                route: r.clone(),
                endpoints: to_proxy_route(r, entries).endpoints,
                empty_backends: res.empty_backends,
            }
        })
        .collect()
}

// ---- handlers (workload API and admin API) ----

use super::http::{json, Resp};
use super::state::Refusal;
use super::{now, Control};
use crank_api::mesh::{LeaseRequest, RegisterRequest, RegisterResponse};
use crank_certs::Identity;
use hyper::body::Incoming;
use hyper::Request;

fn refusal(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
    }
}

fn registry_refusal(e: crate::registry::RegistryError) -> Refusal {
    match e {
        crate::registry::RegistryError::UnknownLease(_) => {
            refusal(404, "unknown-lease", e.to_string())
        }
        crate::registry::RegistryError::Unavailable(_) => {
            refusal(503, "registry-unavailable", e.to_string())
        }
        other => refusal(400, "bad-registration", other.to_string()),
    }
}

impl Control {
    /// Checks the config directory and expires leases; wakes watchers on change.
    pub(super) fn tick_mesh(&self) {
        let mut changed = false;
        // With a shared store the leader publishes (state::replica).
        if let Some(dir) = self
            .cfg
            .config_dir
            .as_ref()
            .filter(|_| self.store.is_none())
        {
            let mut mesh = self.mesh();
            let seen = mesh.seen.clone();
            let published = mesh.refresh(dir, &self.cfg.state_dir, now());
            changed |= published.is_some();
            self.metrics.observe_mesh(&mesh);
            let hash = mesh.seen.clone().unwrap_or_default();
            let refused = mesh.last_error.as_ref().map(|(_, p)| {
                let all: Vec<String> = p.iter().map(|p| p.to_string()).collect();
                all.join("; ")
            });
            drop(mesh);
            if let Some(seq) = published {
                self.audit_config(&hash, format!("version {seq}"), None);
            } else if seen.as_deref() != Some(hash.as_str())
                && hash != "unreadable"
                && refused.is_some()
            {
                self.audit_config(&hash, "a new version".into(), refused);
            }
        }
        // Proxies gone for longer than workloads.stale_after leave `crankctl status`.
        let forget = now() - self.cfg.workloads.stale_after.as_secs() as i64;
        self.mesh().proxies.retain(|_, p| p.last_seen >= forget);
        let gone = self.registry.expire(instant());
        for e in &gone {
            tracing::warn!(address = %e.registration.address, identity = %e.registration.identity, "endpoint lease expired; it leaves every route");
        }
        changed |= !gone.is_empty();
        if changed {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    pub(super) fn mesh(&self) -> std::sync::MutexGuard<'_, MeshState> {
        self.mesh.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) async fn mesh_watch(
        &self,
        req: Request<Incoming>,
        caller: &super::workload::Verified,
    ) -> Result<Resp, Refusal> {
        let q = super::http::PollQuery::parse(&req)?;
        let (have_seq, have_eps) = (q.num("seq"), q.num("registry"));
        let wait = q.wait();
        self.note_proxy(q.instance, caller, have_seq, have_eps, wait);
        // After a restart the registry is empty until workloads register
        // again (their next heartbeat learns the lease is gone): answering
        // now would take every endpoint out of every route. Wait for them.
        if let Some(left) = self.registry_grace_left() {
            tokio::time::sleep(left).await;
        }
        let mut rx = self.changed.subscribe();
        // Registrations made on other replicas, and leases the store ended.
        let mut registry_rx = self.registry.changes();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(shared) = &self.shared {
                if !shared
                    .store_reachable
                    .load(std::sync::atomic::Ordering::Relaxed)
                {
                    return Err(refusal(503, "store-unreachable", "this crank-control replica cannot reach its store (etcd), so its config may be stale; ask another replica (list every replica in identity.enroll.control_plane)"));
                }
            }
            let current = self.mesh().current.clone();
            let Some(published) = current else {
                return Err(refusal(503, "no-config", "crank-control has not published a valid config yet; see `crankctl status` for the config directory's problems"));
            };
            let update = self.cached_update(&published, caller);
            if update.seq != have_seq
                || update.fingerprint != have_eps
                || tokio::time::Instant::now() >= deadline
            {
                let mut resp = hyper::Response::new(http_body_util::Full::new(update.body.clone()));
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                return Ok(resp);
            }
            let registry_changed = async {
                let alive = match registry_rx.as_mut() {
                    Some(r) => r.changed().await.is_ok(),
                    None => false,
                };
                if !alive {
                    std::future::pending::<()>().await;
                }
            };
            let woken = async {
                tokio::select! {
                    _ = rx.changed() => {},
                    () = registry_changed => {},
                }
            };
            let _ = tokio::time::timeout_at(deadline, woken).await;
        }
    }

    pub(super) async fn register(
        &self,
        req: Request<Incoming>,
        id: Identity,
    ) -> Result<Resp, Refusal> {
        let r: RegisterRequest = super::http::body(req).await?;
        if r.endpoint.identity.parse::<Identity>().ok().as_ref() != Some(&id) {
            return Err(refusal(403, "identity-mismatch", format!("a workload may register only its own identity; this client certificate is {}, the registration says {}", id.dns_name(), r.endpoint.identity)));
        }
        let lease = r
            .lease_seconds
            .map(Duration::from_secs)
            .unwrap_or(self.cfg.registry.lease);
        let address = r.endpoint.address;
        let caps = r.endpoint.capabilities.clone();
        let id_lease = self
            .registry
            .register(r.endpoint, lease, instant())
            .await
            .map_err(registry_refusal)?;
        tracing::info!(%address, identity = %id.dns_name(), capabilities = ?caps, lease = ?lease, "endpoint registered");
        self.changed.send_modify(|v| *v += 1);
        Ok(json(
            200,
            &RegisterResponse {
                lease: id_lease.as_str().to_string(),
                lease_seconds: lease.as_secs(),
            },
        ))
    }

    pub(super) async fn heartbeat(&self, req: Request<Incoming>) -> Result<Resp, Refusal> {
        let r: LeaseRequest = super::http::body(req).await?;
        self.registry
            .heartbeat(&crate::registry::LeaseId::new(r.lease), instant())
            .await
            .map_err(registry_refusal)?;
        Ok(json(200, &serde_json::json!({"ok": true})))
    }

    pub(super) async fn deregister(&self, req: Request<Incoming>) -> Result<Resp, Refusal> {
        let r: LeaseRequest = super::http::body(req).await?;
        self.registry
            .deregister(&crate::registry::LeaseId::new(r.lease.clone()))
            .await
            .map_err(registry_refusal)?;
        tracing::info!(lease = %r.lease, "endpoint deregistered");
        self.changed.send_modify(|v| *v += 1);
        Ok(json(200, &serde_json::json!({"ok": true})))
    }

    /// This identity's update for the published version and the registry
    /// as it is now, computed once and shared by every watcher with that
    /// identity (replicas of a service) until either changes.
    fn cached_update(
        &self,
        published: &Published,
        caller: &super::workload::Verified,
    ) -> Arc<CachedUpdate> {
        let now = instant();
        let key = (published.seq, self.registry.version(now));
        {
            let mut cache = self.update_cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.key != key {
                cache.key = key;
                cache.by_identity.clear();
            }
            if let Some(u) = cache.by_identity.get(&caller.dns_name) {
                return u.clone();
            }
        }
        // A miss: resolve outside the lock, against a snapshot of the
        // registry (its version may have moved on since `key`).
        let snap = self.registry.snapshot(now);
        let u = update_for(published, &caller.id, &snap.entries);
        let update = Arc::new(CachedUpdate {
            seq: u.version.seq,
            fingerprint: u.registry,
            body: bytes::Bytes::from(serde_json::to_vec(&u).unwrap_or_default()),
        });
        let mut cache = self.update_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.key == (published.seq, snap.version) {
            cache
                .by_identity
                .insert(caller.dns_name.clone(), update.clone());
        }
        update
    }

    /// Records what a watching proxy has (for `crankctl status`), in place
    /// when it watched before.
    fn note_proxy(
        &self,
        instance: String,
        caller: &super::workload::Verified,
        seq: u64,
        endpoints_version: u64,
        wait: Duration,
    ) {
        let (last_seen, wait) = (now(), wait.as_secs());
        let mut mesh = self.mesh();
        match mesh.proxies.get_mut(&instance) {
            Some(p) => {
                if p.identity != caller.dns_name {
                    p.identity.clone_from(&caller.dns_name);
                }
                p.seq = seq;
                p.endpoints_version = endpoints_version;
                p.last_seen = last_seen;
                p.wait = wait;
            }
            None => {
                let report = ProxyReport {
                    identity: caller.dns_name.clone(),
                    instance: instance.clone(),
                    seq,
                    endpoints_version,
                    last_seen,
                    wait,
                };
                mesh.proxies.insert(instance, report);
            }
        }
    }

    /// Time left before the registry is trusted again after a restart
    /// that found a published config: one heartbeat period (a third of the
    /// lease) plus 2 s.
    pub(super) fn registry_grace_left(&self) -> Option<Duration> {
        if !self.mesh_restarted || self.registry.survives_restart() {
            return None;
        }
        let grace = self.cfg.registry.lease / 3 + Duration::from_secs(2);
        grace
            .checked_sub(self.started.elapsed())
            .filter(|d| !d.is_zero())
    }

    pub(super) fn mesh_status(&self) -> MeshStatus {
        let mesh = self.mesh();
        let t = now();
        let seq = mesh.current.as_ref().map(|c| c.seq);
        let mut proxies: Vec<ProxyRow> = mesh
            .proxies
            .values()
            .map(|p| {
                let silent = is_silent(p.last_seen, p.wait, t);
                let known = mesh.history.get(&p.seq);
                ProxyRow {
                    identity: p.identity.clone(),
                    instance: p.instance.clone(),
                    seq: p.seq,
                    last_seen: p.last_seen,
                    stale: Some(p.seq) != seq || silent,
                    silent,
                    hash: known.map(|k| k.0.clone()),
                    policy_revision: known.map(|k| k.1.clone()),
                }
            })
            .collect();
        proxies.sort_by(|a, b| (&a.identity, &a.instance).cmp(&(&b.identity, &b.instance)));
        MeshStatus {
            config_dir: self
                .cfg
                .config_dir
                .as_ref()
                .map(|d| d.display().to_string()),
            version: mesh.current.as_ref().map(|c| ConfigVersion {
                seq: c.seq,
                hash: c.snapshot.hash.clone(),
            }),
            published_at: mesh.current.as_ref().map(|c| c.published_at),
            last_error: mesh.last_error.clone(),
            policy_revision: mesh
                .current
                .as_ref()
                .map(|c| policy_revision(&c.snapshot.policies)),
            proxies,
            now: t,
        }
    }

    pub(super) fn mesh_routes(&self) -> Vec<RouteRow> {
        let current = self.mesh().current.clone();
        let entries = self.registry.snapshot(instant()).entries;
        current
            .map(|p| route_rows(&p, &entries))
            .unwrap_or_default()
    }

    pub(super) fn mesh_endpoints(&self) -> crate::registry::Snapshot {
        self.registry.snapshot(instant())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn dir_with(route_yaml: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("routes")).unwrap();
        std::fs::write(
            d.path().join("capabilities.yaml"),
            "capabilities: [{name: hello:v1}, {name: other:v1}]\n",
        )
        .unwrap();
        std::fs::write(d.path().join("routes/r.yaml"), route_yaml).unwrap();
        std::fs::write(
            d.path().join("quotas.yaml"),
            "limits:\n  - {tenant: '*', capability: hello:v1, rate: 10/s, direction: outbound}\n  - {tenant: '*', capability: hello:v1, rate: 5/s}\n  - {tenant: '*', capability: other:v1, rate: 1/s}\n  - {tenant: acme, capability: '*', rate: 100/s}\n",
        )
        .unwrap();
        d
    }

    const ROUTES: &str = "routes:\n  - name: hello\n    backends:\n      - {capability: hello:v1, selector: {pool: a}, weight: 90}\n      - {capability: hello:v1, selector: {pool: b}, weight: 10}\n    clients: [frontend]\n  - name: other\n    backends: [{capability: other:v1}]\n";

    fn entry(port: u16, identity: &str, cap: &str, pool: &str) -> Entry {
        let now = std::time::SystemTime::now();
        Entry {
            lease: crate::registry::LeaseId::new(format!("l{port}")),
            registration: crank_api::mesh::EndpointRegistration {
                address: format!("127.0.0.1:{port}").parse().unwrap(),
                identity: identity.into(),
                capabilities: vec![cap.into()],
                labels: BTreeMap::from([("pool".to_string(), pool.to_string())]),
            },
            registered_at: now,
            last_heartbeat: now,
            expires_in: Duration::from_secs(10),
        }
    }

    #[test]
    fn publishes_valid_versions_and_keeps_the_last_good_one() {
        let d = dir_with(ROUTES);
        let state = tempfile::tempdir().unwrap();
        let mut m = MeshState::open(state.path());
        assert_eq!(m.refresh(d.path(), state.path(), 1), Some(1));
        assert_eq!(
            m.refresh(d.path(), state.path(), 2),
            None,
            "nothing changed"
        );
        std::fs::write(
            d.path().join("routes/r.yaml"),
            "routes: [{name: x, backendz: []}]\n",
        )
        .unwrap();
        assert_eq!(m.refresh(d.path(), state.path(), 3), None);
        assert!(m.last_error.is_some());
        assert_eq!(
            m.current.as_ref().unwrap().seq,
            1,
            "the last good version stays"
        );
        std::fs::write(
            d.path().join("routes/r.yaml"),
            ROUTES.replace("weight: 10", "weight: 20"),
        )
        .unwrap();
        assert_eq!(m.refresh(d.path(), state.path(), 4), Some(2));
        assert!(m.last_error.is_none());
        // A restart serves mesh.json until the directory says otherwise.
        let again = MeshState::open(state.path());
        assert_eq!(again.current.as_ref().unwrap().seq, 2);
    }

    #[test]
    fn each_proxy_gets_its_routes_endpoints_and_quotas() {
        let d = dir_with(ROUTES);
        let snap = crate::configdir::load(d.path()).unwrap();
        let p = Published {
            seq: 7,
            published_at: 0,
            snapshot: snap,
        };
        let entries = vec![
            entry(1, "hello.demo.crank.local", "hello:v1", "a"),
            entry(2, "hello.demo.crank.local", "hello:v1", "b"),
            entry(3, "other.demo.crank.local", "other:v1", "a"),
        ];
        let frontend = Identity::new("frontend", "demo", "crank.local").unwrap();
        let u = update_for(&p, &frontend, &entries);
        let names: Vec<&str> = u.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["hello", "other"]);
        let hello = &u.routes[0];
        let w: Vec<(u16, u32, u32)> = hello
            .endpoints
            .iter()
            .map(|e| (e.address.port(), e.weight, e.backend))
            .collect();
        assert_eq!(w, [(1, 9, 0), (2, 1, 1)], "90/10 by backend");
        // Outbound limits for what it calls, `*` limits; not inbound ones.
        let caps: Vec<(&str, String)> = u
            .quotas
            .iter()
            .map(|l| (l.capability.as_str(), format!("{:?}", l.direction)))
            .collect();
        assert_eq!(
            caps,
            [("hello:v1", "Outbound".into()), ("*", "Inbound".into())]
        );
        // A proxy not among the route's clients does not get it; the
        // workload registered as hello gets hello's inbound limit.
        let hello_id = Identity::new("hello", "demo", "crank.local").unwrap();
        let u = update_for(&p, &hello_id, &entries);
        assert_eq!(
            u.routes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["other"]
        );
        assert!(u
            .quotas
            .iter()
            .any(|l| l.capability == "hello:v1" && l.rate == "5/s"));
        // The fingerprint follows the endpoints.
        let fewer = update_for(&p, &frontend, &entries[..1]);
        assert_ne!(fewer.registry, update_for(&p, &frontend, &entries).registry);
        assert_eq!(
            update_for(&p, &frontend, &entries).registry,
            update_for(&p, &frontend, &entries).registry
        );
    }
}
