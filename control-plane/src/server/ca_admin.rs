//! The admin API's CA calls (over the admin Unix socket, for `crankctl`):
//! join tokens, the certificate inventory, revocation, CA rotation and the
//! CA status. [`Control::admin`] picks the handler; the mesh views
//! (`/v1/admin/mesh/*`) are in [`super::mesh`].

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use crank_certs::Identity;
use http::{Method, Request, Response};
use http_body_util::Full;

use super::admin::{
    CaEntry, CaStatus, CertRow, RevokeRequest, RevokeResponse, RotateRequest, TokenRequest,
    TokenResponse, WorkloadRow,
};
use super::audit::AuditQuery;
use super::http::{json, refusal, Resp};
use super::state::{CaState, Phase, Refusal, Report, RotationKind};
use super::{now, Control};

fn bad(e: impl Into<String>) -> Refusal {
    refusal(400, "bad-request", e)
}

fn body<T: serde::de::DeserializeOwned>(req: &Request<Bytes>) -> Result<T, Refusal> {
    serde_json::from_slice(req.body())
        .map_err(|e| bad(format!("the body is not the expected JSON: {e}")))
}

/// `?since=<unix seconds or a duration such as 24h>&action=<action>`.
pub(super) fn audit_query(query: &str, now: i64) -> Result<AuditQuery, Refusal> {
    let mut q = AuditQuery::default();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "since" => {
                let since = match v.parse::<i64>() {
                    Ok(t) => t,
                    Err(_) => humantime::parse_duration(&v)
                        .map(|d| now - d.as_secs() as i64)
                        .map_err(|_| {
                            bad(format!(
                                "since={v}: give Unix seconds or a duration such as 24h"
                            ))
                        })?,
                };
                q.since = Some(since);
            }
            "action" => q.action = Some(v.into_owned()),
            _ => {
                return Err(bad(format!(
                    "unknown query parameter {k}; the audit route takes since and action"
                )))
            }
        }
    }
    Ok(q)
}

impl Control {
    /// One admin call: its handler's answer, or the refusal.
    /// Who may call is checked before, in [`super::admin_access`].
    pub(super) async fn admin(&self, req: &Request<Bytes>) -> Result<Resp, Refusal> {
        let path = req.uri().path().to_string();
        match (req.method().clone(), path.as_str()) {
            (Method::POST, "/v1/admin/tokens") => self.create_token(body(req)?).await,
            (Method::GET, "/v1/admin/certs") => Ok(json(200, &self.cert_rows())),
            (Method::POST, "/v1/admin/revoke") => self.revoke(body(req)?).await,
            (Method::POST, "/v1/admin/rotate") => self.rotate(body(req)?).await,
            (Method::GET, "/v1/admin/audit") => {
                let q = audit_query(req.uri().query().unwrap_or_default(), now())?;
                Ok(json(200, &self.audit.query(&q)))
            }
            (Method::GET, "/v1/admin/status") => Ok(json(200, &self.status_with_leader().await)),
            (Method::GET, "/v1/admin/mesh/status") => Ok(json(200, &self.mesh_status())),
            (Method::GET, "/v1/admin/mesh/routes") => Ok(json(200, &self.mesh_routes())),
            (Method::GET, "/v1/admin/mesh/endpoints") => Ok(json(200, &self.mesh_endpoints())),
            (Method::GET, "/v1/admin/openapi.json") => Ok(super::routes::admin_openapi()),
            (Method::GET, "/metrics") => Ok(Response::builder()
                .header("content-type", "text/plain; version=0.0.4")
                .body(Full::new(Bytes::from(self.metrics.encode())))
                .expect("a valid response")),
            _ => Err(refusal(
                404,
                "not-found",
                format!("no such admin API: {path}"),
            )),
        }
    }

    async fn create_token(&self, r: TokenRequest) -> Result<Resp, Refusal> {
        let id = Identity::new(&r.service, &r.tenant, &self.cfg.trust_domain)
            .map_err(|e| bad(e.to_string()))?;
        let ttl = r
            .ttl_seconds
            .map(Duration::from_secs)
            .unwrap_or(self.cfg.tokens.default_ttl);
        if ttl.is_zero() || ttl > self.cfg.tokens.max_ttl {
            return Err(bad(format!(
                "--ttl must be above zero and at most tokens.max_ttl ({})",
                humantime::format_duration(self.cfg.tokens.max_ttl)
            )));
        }
        let (token, expires_at) = self
            .change(|st| Ok(st.create_token(id.clone(), ttl, now())))
            .await?;
        tracing::info!(identity = %id, expires_at, "join token created");
        Ok(json(
            200,
            &TokenResponse {
                token,
                identity: id.dns_name(),
                expires_at,
            },
        ))
    }

    fn cert_rows(&self) -> Vec<CertRow> {
        let st = self.state();
        let t = now();
        st.inventory
            .iter()
            .map(|i| CertRow {
                issued: i.clone(),
                status: if st.is_revoked(&i.serial) {
                    "revoked"
                } else if i.not_after <= t {
                    "expired"
                } else {
                    "valid"
                }
                .into(),
            })
            .collect()
    }

    async fn revoke(&self, r: RevokeRequest) -> Result<Resp, Refusal> {
        // Leaves issued on other replicas too (a no-op without a store).
        self.sync_inventory().await?;
        let (revoked, version) = self
            .change(|st| {
                let revoked = st.revoke(&r.target, now()).map_err(|e| bad(e.0))?;
                Ok((revoked, st.revocations_version))
            })
            .await?;
        tracing::warn!(target = %r.target, serials = ?revoked, version, "revoked");
        Ok(json(
            200,
            &RevokeResponse {
                revoked,
                revocations_version: version,
            },
        ))
    }

    async fn rotate(&self, r: RotateRequest) -> Result<Resp, Refusal> {
        let td = self.cfg.trust_domain.clone();
        let inter = crank_certs::Ca::from_pem(&r.intermediate_pem, &r.intermediate_key_pem, &td)
            .map_err(|e| bad(format!("the new intermediate: {e}")))?;
        let (phase, bundle_version) = self
            .change(|st| {
                match r.kind {
                    RotationKind::Intermediate => st.rotate_intermediate(&inter, now()),
                    RotationKind::Root => {
                        let root = r
                            .root_pem
                            .as_deref()
                            .ok_or_else(|| bad("a root rotation needs root_pem"))?;
                        st.rotate_root(root, &inter, now())
                    }
                }
                .map_err(|e| refusal(409, "rotation-refused", e.0))?;
                Ok((st.rotation.phase, st.bundle_version))
            })
            .await?;
        tracing::warn!(kind = ?r.kind, phase = phase.as_str(), bundle_version, "CA rotation started");
        Ok(json(200, &self.status_with_leader().await))
    }

    /// [`Control::status`] with which replica leads (a shared store only).
    pub(super) async fn status_with_leader(&self) -> CaStatus {
        let (replica, leader) = self.leader_names().await;
        CaStatus {
            replica,
            leader,
            ..self.status()
        }
    }

    /// `crankctl ca status`: the rotation, the CAs and every workload.
    pub(super) fn status(&self) -> CaStatus {
        let st = self.state();
        let reports = self.reports().clone();
        let t = now();
        let stale = self.cfg.workloads.stale_after;
        let idle = st.rotation.phase == Phase::Idle;
        CaStatus {
            trust_domain: st.trust_domain.clone(),
            phase: st.rotation.phase,
            rotation_kind: (!idle).then_some(st.rotation.kind),
            rotation_started_at: (!idle).then_some(st.rotation.started_at),
            phase_since: (!idle).then_some(st.rotation.phase_since),
            target_bundle: matches!(st.rotation.phase, Phase::AddingRoot | Phase::RemovingRoot)
                .then_some(st.rotation.target_bundle),
            bundle_version: st.bundle_version,
            revocations_version: st.revocations_version,
            revoked_serials: st.revoked.len(),
            roots: root_entries(&st),
            intermediates: intermediate_entries(&st),
            workloads: workload_rows(&st, &reports, stale, t),
            history: st.rotation.history.clone(),
            now: t,
            resync_wait_seconds: (!idle && self.restarted)
                .then(|| {
                    super::RESYNC_GRACE
                        .saturating_sub(self.started.elapsed())
                        .as_secs()
                })
                .filter(|s| *s > 0),
            stale_after_seconds: Some(stale.as_secs()),
            replica: None,
            leader: None,
        }
    }
}

fn root_entries(st: &CaState) -> Vec<CaEntry> {
    let retiring = st.rotation.old_root_serial.as_ref();
    st.roots
        .iter()
        .map(|r| {
            let state = if retiring == Some(&r.serial) {
                "retiring"
            } else {
                "trusted"
            };
            ca_entry(&r.subject, &r.serial, r.not_after, state.into())
        })
        .collect()
}

fn intermediate_entries(st: &CaState) -> Vec<CaEntry> {
    st.intermediates
        .iter()
        .map(|i| {
            let state = serde_json::to_value(i.state)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            ca_entry(&i.subject, &i.serial, i.not_after, state)
        })
        .collect()
}

fn ca_entry(subject: &str, serial: &str, not_after: i64, state: String) -> CaEntry {
    CaEntry {
        subject: subject.to_string(),
        serial: serial.to_string(),
        not_after,
        state,
    }
}

/// Every reporting workload, sorted by identity and instance.
fn workload_rows(
    st: &CaState,
    reports: &HashMap<String, Report>,
    stale: Duration,
    t: i64,
) -> Vec<WorkloadRow> {
    let lag: HashMap<String, String> = st.lagging(reports, stale, t).into_iter().collect();
    let mut rows: Vec<WorkloadRow> = reports
        .values()
        .map(|r| {
            let issued = st.issued(&r.serial);
            let state = if st.is_revoked(&r.serial) {
                "revoked"
            } else if issued.is_some_and(|i| i.not_after <= t) {
                "expired"
            } else if st.is_active(r, stale, t) {
                "active"
            } else {
                "stale"
            };
            WorkloadRow {
                identity: r.identity.dns_name(),
                instance: r.instance.clone(),
                serial: r.serial.clone(),
                issuer: issued.map(|i| i.issuer.clone()),
                not_before: issued.map(|i| i.not_before),
                not_after: issued.map(|i| i.not_after),
                bundle_version: r.bundle_version,
                last_seen: r.last_seen,
                state: state.into(),
                lagging: lag.get(&r.instance).cloned(),
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.identity, &a.instance).cmp(&(&b.identity, &b.instance)));
    rows
}
