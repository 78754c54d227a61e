//! The identity agent (`identity.enroll`): gets this workload's certificate
//! from crank-control and keeps it fresh.
//!
//! - At start ([`bootstrap`], before Pingora is built): use the enrolled
//!   material in `state_dir` when it is valid for the configured identity;
//!   otherwise enroll with the join token (a new P-256 key and CSR made
//!   here, `POST /v1/identity/enroll`), verifying crank-control against the
//!   bootstrap bundle and the roots saved in `state_dir/bundle.pem`, and
//!   save the result.
//! - While running ([`spawn`], its own thread and runtime): renew at
//!   `renew_at` of the lifetime minus jitter (`POST /v1/identity/renew`,
//!   mTLS with the current certificate), and long-poll
//!   `GET /v1/identity/watch` for new trust bundles, the revocation deny
//!   list and reissue requests. Every change is swapped into
//!   [`crate::identity::WorkloadTls`] in place and saved. A revoked or
//!   expired certificate is replaced by enrolling again, by itself, once
//!   `token_file` holds a join token not used yet ([`recover`]).

pub mod client;
pub mod recover;
pub mod schedule;
pub mod state;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crank_api::identity::{canonical_serial, EnrollRequest, IssueResponse};
use crank_api::proxy::{EnrollConfig, IdentityConfig};
use crank_certs::Identity;
use rustls::pki_types::CertificateDer;

use crate::clock::unix_now;
use crate::health::Health;
use crate::identity::{check_chain, read_roots, Material, WorkloadTls};
use crate::metrics::Metrics;
use client::{CallError, Client, ClientCert};
use crank_certs::CertSummary;
use state::StateCheck;

/// How long enrollment at start keeps trying while crank-control is away.
const STARTUP_RETRY: Duration = Duration::from_secs(30);
/// Deadline of one enroll or renew call.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the enrolled identity could not be set up. Each says what to do.
#[derive(Debug, thiserror::Error)]
#[error("identity.enroll: {0}")]
pub struct EnrollError(pub String);

fn eerr(m: impl Into<String>) -> EnrollError {
    EnrollError(m.into())
}

/// What [`bootstrap`] hands over: the material to serve, and what the
/// agent thread needs.
pub struct Bootstrapped {
    pub material: Material,
    pub seed: AgentSeed,
}

/// The agent's settings and starting point.
pub struct AgentSeed {
    client: Client,
    identity: Identity,
    instance: String,
    state_dir: PathBuf,
    renew_at: f64,
    watch_wait: Duration,
    cert: ClientCert,
    roots: Vec<CertificateDer<'static>>,
    not_before: i64,
    not_after: i64,
    serial: String,
    bundle_version: u64,
    /// Where the token and the bootstrap bundle are, to enroll again.
    cfg: IdentityConfig,
    base: PathBuf,
    /// Shown in `/config_dump`.
    pub status: Arc<AgentStatus>,
}

/// The agent's progress, for `/config_dump`.
#[derive(Debug, Default)]
pub struct AgentStatus {
    inner: Mutex<StatusInner>,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct StatusInner {
    instance: String,
    /// `loaded` (from state_dir), `enrolled` (at this start) or
    /// `re-enrolled` (with a new token, after a revocation or expiry).
    source: String,
    last_renewal_result: Option<&'static str>,
    last_renewal_time: Option<i64>,
    last_renewal_error: Option<String>,
    next_renewal_time: Option<i64>,
    bundle_version: u64,
    revocations_version: Option<u64>,
    last_watch_error: Option<String>,
    last_enrollment_time: Option<i64>,
    last_enrollment_error: Option<String>,
}

impl AgentStatus {
    fn update(&self, f: impl FnOnce(&mut StatusInner)) {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The `enrollment` object of `/config_dump`.
    pub fn to_json(&self) -> serde_json::Value {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut v = serde_json::to_value(s).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("mode".into(), "enrolled".into());
        }
        v
    }
}

/// The join token: `token_file`, else `CRANK_JOIN_TOKEN`. `Ok(None)` when neither is set.
fn read_token(e: &EnrollConfig, base: &Path) -> Result<Option<String>, EnrollError> {
    if let Some(f) = &e.token_file {
        let p = crate::config::resolve(base, f);
        return match std::fs::read_to_string(&p) {
            Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
            Ok(_) => Err(eerr(format!("token_file {} is empty; put the token from `crankctl token create --service {} --tenant {}` in it", p.display(), e.service, e.tenant))),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(eerr(format!("cannot read token_file {}: {err}", p.display()))),
        };
    }
    Ok(std::env::var("CRANK_JOIN_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

fn no_token(e: &EnrollConfig, base: &Path, why: &str) -> EnrollError {
    let place = match &e.token_file {
        Some(f) => format!("put it in {}", crate::config::resolve(base, f).display()),
        None => {
            "put it in a file named by identity.enroll.token_file, or in CRANK_JOIN_TOKEN".into()
        }
    };
    eerr(format!(
        "no usable certificate in {} ({why}) and no unused join token to enroll with; create one with `crankctl token create --service {} --tenant {}` and {place}",
        crate::config::resolve(base, &e.state_dir).display(),
        e.service,
        e.tenant
    ))
}

/// How a revoked or expired sidecar gets a certificate again (for /ready and the logs).
pub fn recovery_hint(e: &EnrollConfig, base: &Path) -> String {
    let make = format!(
        "make a new join token with `crankctl token create --service {} --tenant {}`",
        e.service, e.tenant
    );
    match &e.token_file {
        Some(f) => format!(
            "{make} and write it to {}: the sidecar enrolls again by itself",
            crate::config::resolve(base, f).display()
        ),
        None => format!(
            "{make}, set CRANK_JOIN_TOKEN to it and restart the sidecar (with identity.enroll.token_file it would enroll again without a restart)"
        ),
    }
}

/// The roots that verify crank-control when enrolling: the bootstrap
/// `trust_bundle` and the current roots saved in `state_dir/bundle.pem`
/// (after a root rotation the bootstrap root may be gone).
fn control_roots(
    cfg: &IdentityConfig,
    base: &Path,
    dir: &Path,
) -> Result<Vec<CertificateDer<'static>>, EnrollError> {
    let bootstrap = read_roots(cfg, base).map_err(|err| eerr(err.to_string()))?;
    Ok(recover::union_roots(bootstrap, state::saved_roots(dir)))
}

/// A new key (PEM, kept here) and the enroll request carrying its CSR.
fn enroll_request(
    identity: &Identity,
    token: String,
    instance: &str,
) -> Result<(String, EnrollRequest), EnrollError> {
    let (key_pem, csr) = crank_certs::new_key_and_csr(identity)
        .map_err(|err| eerr(format!("cannot make a key and CSR: {err}")))?;
    let req = EnrollRequest {
        token,
        csr,
        instance: instance.to_string(),
    };
    Ok((key_pem, req))
}

/// Checks crank-control's answer to an enrollment: usable with `key_pem`,
/// for `identity`.
fn check_answer(
    resp: &IssueResponse,
    key_pem: &str,
    identity: &Identity,
) -> Result<CertSummary, EnrollError> {
    let m = Material::from_pem(
        resp.chain.as_bytes(),
        key_pem.as_bytes(),
        resp.bundle.pem.as_bytes(),
        "crank-control's answer",
    )
    .map_err(|err| eerr(err.to_string()))?;
    let (summary, got) = check_chain(&m.chain).map_err(|err| eerr(err.to_string()))?;
    if got != *identity {
        return Err(eerr(format!("crank-control issued a certificate for {got}, not {identity}; check the token's service and tenant")));
    }
    Ok(summary)
}

fn enroll_cfg(cfg: &IdentityConfig) -> Result<&EnrollConfig, EnrollError> {
    cfg.enroll
        .as_ref()
        .ok_or_else(|| eerr("is not set (static identity)"))
}

fn identity_of(e: &EnrollConfig) -> Result<Identity, EnrollError> {
    Identity::new(&e.service, &e.tenant, &e.trust_domain).map_err(|err| eerr(err.to_string()))
}

impl AgentSeed {
    /// The bundle version known at start (0 when loaded from `state_dir`:
    /// the first watch brings the current one).
    pub fn bundle_version(&self) -> u64 {
        self.bundle_version
    }
}

/// `crank-proxy --check` for enroll mode, without contacting crank-control:
/// either the state directory holds a valid certificate, or the bootstrap
/// bundle is usable and a join token is at hand.
pub fn check(cfg: &IdentityConfig, base: &Path) -> Result<(), EnrollError> {
    let e = enroll_cfg(cfg)?;
    let dir = crate::config::resolve(base, &e.state_dir);
    match state::check_state(&dir, &identity_of(e)?, unix_now()) {
        StateCheck::Valid(_) => Ok(()),
        other => {
            read_roots(cfg, base).map_err(|err| eerr(err.to_string()))?;
            match read_token(e, base)? {
                Some(_) => Ok(()),
                None => Err(no_token(e, base, &other.why())),
            }
        }
    }
}

/// The PEM material a start serves, and where it came from.
struct Pems {
    chain: String,
    key: String,
    bundle: String,
    bundle_version: u64,
    /// `loaded` from `state_dir`, or `enrolled` just now.
    source: &'static str,
}

/// What an enrollment at start needs.
struct Enrolling<'a> {
    cfg: &'a IdentityConfig,
    base: &'a Path,
    dir: &'a Path,
    identity: &'a Identity,
    instance: &'a str,
    client: &'a Client,
}

impl Enrolling<'_> {
    /// Enrolls with the join token (once per token), saving what
    /// crank-control issued to `state_dir`. `why` says why the state
    /// directory could not be used.
    fn enroll(&self, why: &str) -> Result<Pems, EnrollError> {
        let (e, base, dir, identity) = (enroll_cfg(self.cfg)?, self.base, self.dir, self.identity);
        let token = read_token(e, base)?.ok_or_else(|| no_token(e, base, why))?;
        let digest = recover::token_digest(&token);
        if state::token_used(dir).as_deref() == Some(digest.as_str()) {
            let why = format!("{why}; the token at hand was used by its last enrollment");
            return Err(no_token(e, base, &why));
        }
        tracing::info!(identity = %identity, reason = %why, control_plane = %e.control_plane, "enrolling with crank-control");
        let roots = control_roots(self.cfg, base, dir)?;
        let (key_pem, req) = enroll_request(identity, token, self.instance)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| eerr(format!("cannot start a runtime: {err}")))?;
        let resp = rt.block_on(enroll_with_retry(self.client, &roots, &req, STARTUP_RETRY))?;
        let summary = check_answer(&resp, &key_pem, identity)?;
        state::save_cert(dir, &key_pem, &resp.chain)
            .and_then(|_| state::save_bundle(dir, &resp.bundle.pem))
            .and_then(|_| state::save_token_used(dir, &digest))
            .map_err(|err| eerr(format!("cannot save to {}: {err}", dir.display())))?;
        tracing::info!(identity = %identity, serial = %canonical_serial(&summary.serial), not_after = summary.not_after, bundle_version = resp.bundle.version, state_dir = %dir.display(), "enrolled");
        Ok(Pems {
            chain: resp.chain,
            key: key_pem,
            bundle: resp.bundle.pem,
            bundle_version: resp.bundle.version,
            source: "enrolled",
        })
    }
}

/// Loads the enrolled identity from `state_dir`, or enrolls (blocking, with
/// retries for up to 30 s while crank-control cannot be reached).
pub fn bootstrap(cfg: &IdentityConfig, base: &Path) -> Result<Bootstrapped, EnrollError> {
    let e = enroll_cfg(cfg)?;
    let identity = identity_of(e)?;
    let dir = crate::config::resolve(base, &e.state_dir);
    state::ensure_dir(&dir)
        .map_err(|err| eerr(format!("cannot create state_dir {}: {err}", dir.display())))?;
    let instance = state::instance_id(&dir)
        .map_err(|err| eerr(format!("cannot write {}/instance: {err}", dir.display())))?;
    let client = Client::new(&e.control_plane, &e.server_name()).map_err(eerr)?;
    let status = Arc::new(AgentStatus::default());
    let pems = match state::check_state(&dir, &identity, unix_now()) {
        StateCheck::Valid(s) => {
            tracing::info!(identity = %identity, serial = %canonical_serial(&s.summary.serial), not_after = s.summary.not_after, state_dir = %dir.display(), "loaded enrolled identity");
            Pems {
                chain: s.chain_pem,
                key: s.key_pem,
                bundle: s.bundle_pem,
                bundle_version: 0,
                source: "loaded",
            }
        }
        other => {
            let at = Enrolling {
                cfg,
                base,
                dir: &dir,
                identity: &identity,
                instance: &instance,
                client: &client,
            };
            at.enroll(&other.why())?
        }
    };
    let (chain_pem, key_pem, bundle_pem, bundle_version, source) = (
        pems.chain,
        pems.key,
        pems.bundle,
        pems.bundle_version,
        pems.source,
    );
    let material = Material::from_pem(
        chain_pem.as_bytes(),
        key_pem.as_bytes(),
        bundle_pem.as_bytes(),
        &dir.display().to_string(),
    )
    .map_err(|err| eerr(err.to_string()))?;
    let (summary, _) = check_chain(&material.chain).map_err(|err| eerr(err.to_string()))?;
    status.update(|s| {
        s.instance = instance.clone();
        s.source = source.into();
        s.bundle_version = bundle_version;
    });
    let seed = AgentSeed {
        client,
        identity,
        instance,
        state_dir: dir,
        renew_at: e.renew_at,
        watch_wait: e.watch_wait,
        cert: ClientCert {
            chain: material.chain.clone(),
            key: material.key.clone_key(),
        },
        roots: material.roots.clone(),
        not_before: summary.not_before,
        not_after: summary.not_after,
        serial: canonical_serial(&summary.serial),
        bundle_version,
        cfg: cfg.clone(),
        base: base.to_path_buf(),
        status,
    };
    Ok(Bootstrapped { material, seed })
}

/// `POST /v1/identity/enroll`, retried with backoff on connection and 5xx
/// errors for up to `budget`; a 4xx refusal fails at once with
/// crank-control's message.
pub async fn enroll_with_retry(
    client: &Client,
    roots: &[CertificateDer<'static>],
    req: &EnrollRequest,
    budget: Duration,
) -> Result<IssueResponse, EnrollError> {
    let start = tokio::time::Instant::now();
    let mut backoff =
        crate::enroll::schedule::backoff(Duration::from_secs(1), Duration::from_secs(8));
    loop {
        let err = match client
            .post_json::<_, IssueResponse>(roots, None, "/v1/identity/enroll", req, ISSUE_TIMEOUT)
            .await
        {
            Ok(r) => return Ok(r),
            Err(e) => e,
        };
        if err.is_refusal() {
            return Err(eerr(format!("{err}; {}", refusal_hint(&err))));
        }
        let delay = backoff.next_delay();
        if start.elapsed() + delay > budget {
            return Err(eerr(format!(
                "gave up after {:?}: {err}; check identity.enroll.control_plane and server_name, that crank-control runs, and that identity.trust_bundle (or state_dir/bundle.pem) holds its current root: after a root rotation, give new workloads the new root's bundle.pem",
                start.elapsed()
            )));
        }
        tracing::warn!(error = %err, retry_in = ?delay, "enrollment failed; retrying");
        tokio::time::sleep(delay).await;
    }
}

pub(crate) fn refusal_hint(e: &CallError) -> &'static str {
    match e {
        CallError::Refused { code, .. } => match code.as_str() {
            "token-unknown" | "token-reused" | "token-expired" => {
                "create a new token with `crankctl token create` and put it in identity.enroll.token_file"
            }
            "identity-not-granted" => {
                "the token grants another identity; check identity.enroll.service and tenant, or create a token for them"
            }
            _ => "see crank-control's log",
        },
        _ => "see crank-control's log",
    }
}

/// What the identity agent changes: the workload's TLS material,
/// readiness (expiry, revocation) and the identity metrics.
pub struct AgentHandles {
    pub tls: Arc<WorkloadTls>,
    pub health: Arc<Health>,
    pub metrics: Metrics,
}

/// Runs the agent (renewal and watch) on its own thread and runtime.
pub fn spawn(seed: AgentSeed, handles: AgentHandles) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("crank-identity".into())
        .spawn(move || {
            let agent = Agent::new(seed, handles);
            rt.block_on(agent.run());
        })?;
    Ok(())
}

mod agent;
use agent::Agent;

#[cfg(test)]
mod tests;
