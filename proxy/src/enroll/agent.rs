//! The running agent: the renewal task, the watch task and the recovery
//! task (enrolling again with a new token after a revocation or expiry),
//! sharing the current certificate, roots and versions.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crank_api::identity::{canonical_serial, IssueResponse, RenewRequest, WatchResponse};
use crank_api::proxy::IdentityConfig;
use crank_certs::Identity;
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, Notify};

use super::client::{CallError, Client, ClientCert};
use super::recover::{self, TokenVerdict};
use super::schedule;
use super::{state, AgentHandles, AgentSeed, AgentStatus, ISSUE_TIMEOUT};
use crate::clock::unix_now;
use crate::identity::{check_chain, Material};

/// What the agent presents and trusts now.
struct Current {
    cert: Arc<ClientCert>,
    roots: Arc<Vec<CertificateDer<'static>>>,
    not_before: i64,
    not_after: i64,
    serial: String,
    bundle_version: u64,
    revocations_version: Option<u64>,
    /// crank-control refused this certificate as revoked.
    revoked: bool,
}

/// How often a stuck (revoked or expired) agent looks for a new token.
const TOKEN_POLL: Duration = Duration::from_secs(2);

pub(super) struct Agent {
    handles: AgentHandles,
    client: Client,
    identity: Identity,
    instance: String,
    state_dir: PathBuf,
    renew_at: f64,
    watch_wait: Duration,
    current: Mutex<Current>,
    status: Arc<AgentStatus>,
    /// Where the token and the bootstrap bundle are.
    cfg: IdentityConfig,
    base: PathBuf,
    /// Woken when a new enrollment replaced the certificate, so that the
    /// renewal and watch retries use it at once.
    reenrolled: Notify,
}

impl Agent {
    pub(super) fn new(seed: AgentSeed, handles: AgentHandles) -> Agent {
        super::client::register_metrics(&handles.metrics.registry);
        Agent {
            handles,
            client: seed.client,
            identity: seed.identity,
            instance: seed.instance,
            state_dir: seed.state_dir,
            renew_at: seed.renew_at,
            watch_wait: seed.watch_wait,
            current: Mutex::new(Current {
                cert: Arc::new(seed.cert),
                roots: Arc::new(seed.roots),
                not_before: seed.not_before,
                not_after: seed.not_after,
                serial: seed.serial,
                bundle_version: seed.bundle_version,
                revocations_version: None,
                revoked: false,
            }),
            status: seed.status,
            cfg: seed.cfg,
            base: seed.base,
            reenrolled: Notify::new(),
        }
    }

    fn enroll_cfg(&self) -> &crank_api::proxy::EnrollConfig {
        self.cfg
            .enroll
            .as_ref()
            .expect("the agent runs in enroll mode only")
    }

    fn with<T>(&self, f: impl FnOnce(&mut Current) -> T) -> T {
        f(&mut self.current.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(super) async fn run(self) {
        let hint = super::recovery_hint(self.enroll_cfg(), &self.base);
        self.handles.health.set_cert_hint(Some(hint));
        let (wake_tx, wake_rx) = mpsc::channel(1);
        tokio::join!(
            self.renew_loop(wake_rx),
            self.watch_loop(wake_tx),
            self.recover_loop()
        );
    }

    /// Sleeps until the renewal time (or a reissue request), then renews,
    /// retrying with backoff while crank-control is away.
    async fn renew_loop(&self, mut wake: mpsc::Receiver<()>) {
        loop {
            let (nb, na) = self.with(|c| (c.not_before, c.not_after));
            let at = schedule::renewal_at(nb, na, self.renew_at, rand::random::<f64>());
            self.status.update(|s| s.next_renewal_time = Some(at));
            tokio::select! {
                _ = tokio::time::sleep(schedule::until(at, unix_now())) => {}
                // A new enrollment: schedule from the new certificate.
                _ = self.reenrolled.notified() => continue,
                Some(()) = wake.recv() => {
                    let delay = Duration::from_millis(rand::random_range(0..2000));
                    tracing::info!(delay = ?delay, "crank-control asked for a renewal (CA rotation)");
                    tokio::time::sleep(delay).await;
                }
            }
            let mut backoff =
                crate::enroll::schedule::backoff(Duration::from_secs(1), Duration::from_secs(60));
            let mut expired_logged = false;
            let serial = self.with(|c| c.serial.clone());
            loop {
                if self.with(|c| c.serial != serial) {
                    break; // enrolled again meanwhile
                }
                match self.renew_once().await {
                    Ok(()) => break,
                    Err(e) => {
                        self.handles
                            .metrics
                            .identity
                            .renewals
                            .with_label_values(&["failure"])
                            .inc();
                        let now = unix_now();
                        let na = self.with(|c| c.not_after);
                        let retry_in = schedule::renew_retry_delay(backoff.next_delay(), now, na);
                        self.status.update(|s| {
                            s.last_renewal_result = Some("failure");
                            s.last_renewal_time = Some(now);
                            s.last_renewal_error = Some(e.clone());
                            s.next_renewal_time = Some(now + retry_in.as_secs() as i64);
                        });
                        tracing::warn!(error = %e, retry_in = ?retry_in, "renewal failed; serving with the current certificate");
                        if now >= na && !expired_logged {
                            expired_logged = true;
                            let hint = super::recovery_hint(self.enroll_cfg(), &self.base);
                            tracing::error!(identity = %self.identity, not_after = na, reason = "cert-expired", "this workload's certificate has expired; /ready answers 503 until a renewal succeeds. Check that crank-control is reachable and that this identity is not revoked (`crankctl cert list`); if it cannot renew, {hint}");
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(retry_in) => {}
                            _ = self.reenrolled.notified() => {}
                        }
                    }
                }
            }
            // A reissue request that came in while renewing is answered.
            while wake.try_recv().is_ok() {}
        }
    }

    /// One renewal: a new key and CSR, `POST /v1/identity/renew` with the
    /// current certificate, then swap and save.
    async fn renew_once(&self) -> Result<(), String> {
        let (key_pem, csr) =
            crank_certs::new_key_and_csr(&self.identity).map_err(|e| e.to_string())?;
        let (cert, roots, serial) =
            self.with(|c| (c.cert.clone(), c.roots.clone(), c.serial.clone()));
        let req = RenewRequest {
            csr,
            instance: self.instance.clone(),
        };
        let resp: IssueResponse = self
            .client
            .post_json(
                &roots,
                Some(&cert),
                "/v1/identity/renew",
                &req,
                ISSUE_TIMEOUT,
            )
            .await
            .map_err(|e| self.refused(e, &serial))?;
        self.install(resp, &key_pem)
    }

    /// Notes a revocation of `serial` (the certificate the call presented)
    /// in a refusal; the error as text.
    fn refused(&self, e: CallError, serial: &str) -> String {
        if matches!(&e, CallError::Refused { code, .. } if code == "cert-revoked") {
            self.revoked(serial);
        }
        e.to_string()
    }

    /// Swaps in a renewed certificate and counts the renewal.
    fn install(&self, resp: IssueResponse, key_pem: &str) -> Result<(), String> {
        let (serial, not_after) = self.swap_in(resp, key_pem)?;
        let now = unix_now();
        self.handles
            .metrics
            .identity
            .renewals
            .with_label_values(&["success"])
            .inc();
        self.status.update(|s| {
            s.last_renewal_result = Some("success");
            s.last_renewal_time = Some(now);
            s.last_renewal_error = None;
        });
        tracing::info!(identity = %self.identity, serial = %serial, not_after, "renewed certificate");
        Ok(())
    }

    /// Swaps in a newly issued certificate (and its bundle when newer) and
    /// saves it; returns its serial and expiry.
    fn swap_in(&self, resp: IssueResponse, key_pem: &str) -> Result<(String, i64), String> {
        let m = Material::from_pem(
            resp.chain.as_bytes(),
            key_pem.as_bytes(),
            resp.bundle.pem.as_bytes(),
            "crank-control's answer",
        )
        .map_err(|e| e.to_string())?;
        let (summary, _) = check_chain(&m.chain).map_err(|e| e.to_string())?;
        let Material { chain, key, roots } = m;
        self.handles
            .tls
            .swap_cert(chain.clone(), key.clone_key())
            .map_err(|e| e.to_string())?;
        let serial = canonical_serial(&summary.serial);
        self.with(|c| {
            c.cert = Arc::new(ClientCert { chain, key });
            c.not_before = summary.not_before;
            c.not_after = summary.not_after;
            c.serial = serial.clone();
        });
        self.handles.health.set_cert_expiry(Some(summary.not_after));
        if let Err(e) = state::save_cert(&self.state_dir, key_pem, &resp.chain) {
            tracing::error!(error = %e, state_dir = %self.state_dir.display(), "cannot save the renewed certificate; it serves until a restart");
        }
        if resp.bundle.version != self.with(|c| c.bundle_version) {
            self.apply_bundle(resp.bundle.version, &resp.bundle.pem, roots)?;
        }
        Ok((serial, summary.not_after))
    }

    /// Swaps in a new trust bundle (inbound verifier, outbound roots, the
    /// roots that verify crank-control) and saves it.
    fn apply_bundle(
        &self,
        version: u64,
        pem: &str,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<(), String> {
        self.handles
            .tls
            .swap_roots(&roots)
            .map_err(|e| format!("bundle version {version}: {e}"))?;
        let count = roots.len();
        self.with(|c| {
            c.roots = Arc::new(roots);
            c.bundle_version = version;
        });
        self.handles
            .metrics
            .identity
            .bundle_version
            .set(version as i64);
        self.status.update(|s| s.bundle_version = version);
        if let Err(e) = state::save_bundle(&self.state_dir, pem) {
            tracing::error!(error = %e, state_dir = %self.state_dir.display(), "cannot save the trust bundle");
        }
        tracing::info!(version, roots = count, "applied trust bundle");
        Ok(())
    }

    /// Long-polls crank-control for bundle, revocation and reissue changes.
    async fn watch_loop(&self, wake: mpsc::Sender<()>) {
        let mut backoff =
            crate::enroll::schedule::backoff(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            match self.watch_once().await {
                Ok(renew) => {
                    backoff.reset();
                    self.status.update(|s| s.last_watch_error = None);
                    if renew {
                        let _ = wake.try_send(());
                        // Let the renewal report its new serial before asking again.
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
                Err(e) => {
                    let retry_in = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?retry_in, "identity watch failed; retrying");
                    self.status.update(|s| s.last_watch_error = Some(e));
                    tokio::select! {
                        _ = tokio::time::sleep(retry_in) => {}
                        _ = self.reenrolled.notified() => backoff.reset(),
                    }
                }
            }
        }
    }

    /// crank-control says this workload's own certificate is revoked: not
    /// ready until it enrolls again (peers refuse it anyway); say how.
    fn revoked(&self, serial: &str) {
        // A call made with a certificate replaced since then says nothing
        // about the current one.
        let current = self.with(|c| {
            let current = c.serial == serial;
            c.revoked |= current;
            current
        });
        if current && !self.handles.health.set_cert_revoked() {
            let hint = super::recovery_hint(self.enroll_cfg(), &self.base);
            tracing::error!(identity = %self.identity, serial = %serial, reason = "cert-revoked", state_dir = %self.state_dir.display(), "this workload's certificate is revoked; /ready answers 503 and peers refuse it. To recover once the cause is fixed: {hint}");
        }
    }

    /// While the certificate is revoked or expired, looks for a join token
    /// not used yet and enrolls again with it.
    async fn recover_loop(&self) {
        let mut refused: Option<String> = None;
        let mut backoff =
            crate::enroll::schedule::backoff(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            tokio::time::sleep(TOKEN_POLL).await;
            let (revoked, not_after) = self.with(|c| (c.revoked, c.not_after));
            let Some(why) = recover::stuck_reason(revoked, not_after, unix_now()) else {
                continue;
            };
            // An unreadable or empty file is retried: it may be half written.
            let Ok(Some(token)) = super::read_token(self.enroll_cfg(), &self.base) else {
                continue;
            };
            let digest = recover::token_digest(&token);
            let used = state::token_used(&self.state_dir);
            if recover::judge_token(&digest, used.as_deref(), refused.as_deref())
                != TokenVerdict::Fresh
            {
                continue;
            }
            tracing::info!(identity = %self.identity, reason = why, "a new join token is at hand; enrolling again");
            match self.reenroll(token, &digest).await {
                Ok(()) => {
                    backoff.reset();
                    refused = None;
                }
                Err(e) => {
                    self.status
                        .update(|s| s.last_enrollment_error = Some(e.to_string()));
                    if e.is_refusal() {
                        tracing::error!(identity = %self.identity, error = %e, "enrolling again was refused; {}", super::refusal_hint(&e));
                        refused = Some(digest);
                    } else {
                        let retry_in = backoff.next_delay();
                        tracing::warn!(identity = %self.identity, error = %e, retry_in = ?retry_in, "enrolling again failed; retrying");
                        tokio::time::sleep(retry_in).await;
                    }
                }
            }
        }
    }

    /// One enrollment with `token` (crank-control verified against the
    /// bootstrap and the current roots); the result replaces the revoked or
    /// expired certificate in place, like a renewal.
    async fn reenroll(&self, token: String, digest: &str) -> Result<(), CallError> {
        let current = self.with(|c| c.roots.clone());
        let bootstrap = crate::identity::read_roots(&self.cfg, &self.base).unwrap_or_default();
        let roots = recover::union_roots(bootstrap, current.to_vec());
        let bad = |e: super::EnrollError| CallError::BadAnswer(e.0);
        let (key_pem, req) =
            super::enroll_request(&self.identity, token, &self.instance).map_err(bad)?;
        let resp: IssueResponse = self
            .client
            .post_json(&roots, None, "/v1/identity/enroll", &req, ISSUE_TIMEOUT)
            .await?;
        super::check_answer(&resp, &key_pem, &self.identity).map_err(bad)?;
        let (serial, not_after) = self.swap_in(resp, &key_pem).map_err(CallError::BadAnswer)?;
        if let Err(e) = state::save_token_used(&self.state_dir, digest) {
            tracing::error!(error = %e, state_dir = %self.state_dir.display(), "cannot record the join token as used");
        }
        self.with(|c| c.revoked = false);
        self.handles.health.clear_cert_revoked();
        let now = unix_now();
        self.status.update(|s| {
            s.source = "re-enrolled".into();
            s.last_enrollment_time = Some(now);
            s.last_enrollment_error = None;
        });
        self.reenrolled.notify_waiters();
        tracing::info!(identity = %self.identity, serial = %serial, not_after, "enrolled again with a new join token; the new certificate serves now");
        Ok(())
    }

    /// One watch call and what it changes; `Ok(true)` when a renewal is asked for.
    async fn watch_once(&self) -> Result<bool, String> {
        let (cert, roots, serial, bv, rv) = self.with(|c| {
            (
                c.cert.clone(),
                c.roots.clone(),
                c.serial.clone(),
                c.bundle_version,
                c.revocations_version.unwrap_or(0),
            )
        });
        let path = watch_path(&self.instance, &serial, bv, rv, self.watch_wait);
        let w: WatchResponse = self
            .client
            .get_json(
                &roots,
                Some(&cert),
                &path,
                self.watch_wait + Duration::from_secs(10),
            )
            .await
            .map_err(|e| self.refused(e, &serial))?;
        if w.bundle.version != bv {
            let roots = crank_certs::pem::certs_from_pem(w.bundle.pem.as_bytes())
                .map_err(|e| format!("bundle version {}: {e}", w.bundle.version))?;
            self.apply_bundle(w.bundle.version, &w.bundle.pem, roots)?;
        }
        if self.with(|c| c.revocations_version) != Some(w.revocations.version) {
            self.handles.tls.set_deny_list(&w.revocations.serials);
            let count = self.handles.tls.deny_list().len();
            self.with(|c| c.revocations_version = Some(w.revocations.version));
            self.status
                .update(|s| s.revocations_version = Some(w.revocations.version));
            tracing::info!(
                version = w.revocations.version,
                count,
                "revocations applied"
            );
        }
        Ok(w.renew)
    }
}

/// The watch request's path and query.
pub fn watch_path(
    instance: &str,
    serial: &str,
    bundle: u64,
    revocations: u64,
    wait: Duration,
) -> String {
    format!(
        "/v1/identity/watch?instance={instance}&serial={serial}&bundle={bundle}&revocations={revocations}&wait={}",
        wait.as_secs()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn watch_query_reports_what_we_have() {
        assert_eq!(
            super::watch_path("ab12", "1f00", 3, 7, std::time::Duration::from_secs(30)),
            "/v1/identity/watch?instance=ab12&serial=1f00&bundle=3&revocations=7&wait=30"
        );
    }
}
