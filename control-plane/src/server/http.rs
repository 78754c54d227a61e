//! HTTP for crank-control: the workload identity API over TLS (enroll,
//! renew, watch; its routes are [`super::routes`]), the admin API over
//! the Unix socket, and `/metrics`. Each handler parses, calls
//! [`super::state::CaState`], commits, and answers JSON; every refusal is
//! `{"error": code, "message": ...}`, counted in
//! `crank_ca_requests_refused_total{reason}` and logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use crank_api::identity::{
    canonical_serial, ApiError, EnrollRequest, IssueResponse, RenewRequest, WatchResponse,
};
use crank_certs::{CsrError, Identity, SignCsrError};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use rustls::pki_types::CertificateDer;
use serde::Serialize;

use super::admin::{
    CaEntry, CaStatus, CertRow, RevokeRequest, RevokeResponse, RotateRequest, TokenRequest,
    TokenResponse, WorkloadRow,
};
use super::routes::{workload_route, WorkloadRoute, OPENAPI};
use super::state::{Issued, Refusal, Report, RotationKind};
use super::{now, Control};

pub(super) type Resp = Response<Full<Bytes>>;

const MAX_BODY: usize = 64 * 1024;

pub(super) fn json<T: Serialize>(status: u16, body: &T) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec_pretty(body).unwrap_or_default(),
        )))
        .expect("a valid response")
}

fn refusal(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
    }
}

impl Control {
    fn refused(&self, r: Refusal, what: &str) -> Resp {
        self.metrics.refused.with_label_values(&[r.code]).inc();
        tracing::warn!(request = what, reason = r.code, message = %r.message, "refused");
        json(
            r.status,
            &ApiError {
                error: r.code.into(),
                message: r.message,
            },
        )
    }
}

pub(super) async fn body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, Refusal> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            refusal(
                400,
                "bad-request",
                format!("cannot read the body ({e}); bodies are JSON under 64 KiB"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        refusal(
            400,
            "bad-request",
            format!("the body is not the expected JSON: {e}"),
        )
    })
}

pub(super) fn check_instance(instance: &str) -> Result<(), Refusal> {
    if instance.is_empty()
        || instance.len() > 64
        || !instance
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(refusal(
            400,
            "bad-request",
            "instance must be 1 to 64 characters of a-z, 0-9, '-', '_', '.'",
        ));
    }
    Ok(())
}

fn csr_refusal(e: SignCsrError, renewing: bool) -> Refusal {
    match e {
        SignCsrError::Csr(c @ CsrError::Malformed(_)) => {
            refusal(400, "csr-malformed", c.to_string())
        }
        SignCsrError::Csr(c @ CsrError::BadSignature) => {
            refusal(400, "csr-bad-signature", c.to_string())
        }
        SignCsrError::Csr(c @ CsrError::IdentityNotGranted { .. }) => refusal(
            403,
            if renewing {
                "identity-mismatch"
            } else {
                "identity-not-granted"
            },
            c.to_string(),
        ),
        SignCsrError::Ca(e) => refusal(503, "ca-unavailable", format!("the CA cannot sign: {e}")),
    }
}

/// The verified client certificate's identity and serial, for renew and watch.
fn peer(
    control: &Control,
    peer: &Option<Vec<CertificateDer<'static>>>,
) -> Result<(Identity, String), Refusal> {
    let leaf = peer.as_ref().and_then(|c| c.first()).ok_or_else(|| {
        refusal(401, "cert-required", "this call needs the workload's current certificate as a TLS client certificate; enroll first with a join token")
    })?;
    let summary = crank_certs::CertSummary::from_der(leaf)
        .map_err(|e| refusal(403, "no-identity", e.to_string()))?;
    let id = summary.identity.ok_or_else(|| {
        refusal(
            403,
            "no-identity",
            "the client certificate carries no Crank identity",
        )
    })?;
    let serial = canonical_serial(&summary.serial);
    if control.state().is_revoked(&serial) {
        return Err(refusal(403, "cert-revoked", format!("certificate {serial} of {id} is revoked; enroll again with a new join token (`crankctl token create`) once the cause is fixed")));
    }
    Ok((id, serial))
}

impl Control {
    /// Signs a CSR for `id` and records it; `requester` says how it was asked.
    fn issue(
        &self,
        st: &mut super::state::CaState,
        csr: &str,
        id: &Identity,
        instance: &str,
        requester: String,
        renewing: bool,
    ) -> Result<IssueResponse, Refusal> {
        let signer = st
            .signer()
            .map_err(|e| refusal(503, "ca-unavailable", e.to_string()))?;
        let t = now();
        let inter_end = super::state::summary_of(signer.cert_pem())
            .map(|s| s.not_after)
            .unwrap_or(t);
        let ttl = self
            .cfg
            .certs
            .leaf_ttl
            .min(Duration::from_secs((inter_end - t).max(60) as u64));
        let signed = signer
            .sign_csr(csr, id, ttl)
            .map_err(|e| csr_refusal(e, renewing))?;
        st.record_issue(Issued {
            serial: signed.serial.clone(),
            identity: id.clone(),
            instance: instance.to_string(),
            not_before: signed.not_before,
            not_after: signed.not_after,
            requester,
            issuer: st.signer_subject().unwrap_or_default().to_string(),
            issuer_serial: st
                .signer_entry()
                .map(|e| e.serial.clone())
                .unwrap_or_default(),
            issued_at: t,
        });
        let bundle = st.bundle();
        let mut reports = self.reports();
        let prev_bundle = reports.get(instance).map(|r| r.bundle_version).unwrap_or(0);
        reports.insert(
            instance.to_string(),
            Report {
                identity: id.clone(),
                instance: instance.to_string(),
                serial: signed.serial.clone(),
                // A renewal does not apply the bundle by itself; an enrollment does.
                bundle_version: if renewing {
                    prev_bundle
                } else {
                    bundle.version
                },
                last_seen: t,
                told_renew: None,
            },
        );
        Ok(IssueResponse {
            chain: signed.chain_pem,
            serial: signed.serial,
            not_before: signed.not_before,
            not_after: signed.not_after,
            bundle,
        })
    }

    async fn enroll(&self, req: Request<Incoming>) -> Result<Resp, Refusal> {
        let r: EnrollRequest = body(req).await?;
        check_instance(&r.instance)?;
        let resp = {
            let mut st = self.state();
            let (idx, id) = st.check_token(&r.token, now())?;
            let token_ref = super::state::sha256_hex(r.token.trim())[..8].to_string();
            let resp = self.issue(
                &mut st,
                &r.csr,
                &id,
                &r.instance,
                format!("enroll (token {token_ref})"),
                false,
            )?;
            st.use_token(idx, now());
            self.commit(&st);
            tracing::info!(identity = %id, instance = %r.instance, serial = %resp.serial, "enrolled");
            resp
        };
        self.metrics.issued.with_label_values(&["enroll"]).inc();
        Ok(json(200, &resp))
    }

    async fn renew(
        &self,
        req: Request<Incoming>,
        peer_certs: &Option<Vec<CertificateDer<'static>>>,
    ) -> Result<Resp, Refusal> {
        let (id, serial) = peer(self, peer_certs)?;
        let r: RenewRequest = body(req).await?;
        check_instance(&r.instance)?;
        let resp = {
            let mut st = self.state();
            let resp = self.issue(
                &mut st,
                &r.csr,
                &id,
                &r.instance,
                format!("renew (serial {serial})"),
                true,
            )?;
            self.commit(&st);
            tracing::info!(identity = %id, instance = %r.instance, old = %serial, serial = %resp.serial, "renewed");
            resp
        };
        self.metrics.issued.with_label_values(&["renew"]).inc();
        self.advance();
        Ok(json(200, &resp))
    }

    async fn watch(
        &self,
        req: Request<Incoming>,
        peer_certs: &Option<Vec<CertificateDer<'static>>>,
    ) -> Result<Resp, Refusal> {
        let (id, peer_serial) = peer(self, peer_certs)?;
        let q = PollQuery::parse(&req)?;
        let instance = q.instance.clone();
        let (have_bundle, have_revs) = (q.num("bundle"), q.num("revocations"));
        let wait = q.wait();
        let serial = {
            let st = self.state();
            match q.get("serial").map(|s| canonical_serial(s)) {
                Some(s) if st.issued(&s).is_some_and(|i| i.identity == id) => s,
                _ => peer_serial,
            }
        };
        let mut rx = self.changed.subscribe();
        let told = {
            let mut reports = self.reports();
            let told = reports
                .get(&instance)
                .and_then(|r| r.told_renew.clone())
                .filter(|s| *s == serial);
            reports.insert(
                instance.clone(),
                Report {
                    identity: id,
                    instance: instance.clone(),
                    serial: serial.clone(),
                    bundle_version: have_bundle,
                    last_seen: now(),
                    told_renew: told.clone(),
                },
            );
            told.is_some()
        };
        self.advance();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let resp = {
                let st = self.state();
                WatchResponse {
                    bundle: st.bundle(),
                    revocations: st.revocations(),
                    renew: st.should_renew(&serial),
                }
            };
            let news = resp.bundle.version != have_bundle
                || resp.revocations.version != have_revs
                || (resp.renew && !told);
            if news || tokio::time::Instant::now() >= deadline {
                if resp.renew {
                    if let Some(r) = self.reports().get_mut(&instance) {
                        r.told_renew = Some(serial.clone());
                    }
                }
                return Ok(json(200, &resp));
            }
            let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
        }
    }
}

fn form_pairs(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn route_workload(
    control: Arc<Control>,
    peer_certs: Arc<Option<Vec<CertificateDer<'static>>>>,
    req: Request<Incoming>,
) -> Result<Resp, std::convert::Infallible> {
    let path = req.uri().path().to_string();
    let who = || peer(&control, &peer_certs).map(|(id, _)| id);
    let r = match workload_route(req.method().as_str(), &path) {
        Some(WorkloadRoute::Enroll) => control.enroll(req).await,
        Some(WorkloadRoute::Renew) => control.renew(req, &peer_certs).await,
        Some(WorkloadRoute::IdentityWatch) => control.watch(req, &peer_certs).await,
        Some(WorkloadRoute::Bundle) => Ok(json(200, &control.state().bundle())),
        Some(WorkloadRoute::OpenApi) => Ok(Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(OPENAPI.as_bytes())))
            .expect("a valid response")),
        // The mesh and registry calls need the caller's verified identity.
        Some(WorkloadRoute::MeshWatch) => match who() {
            Ok(id) => control.mesh_watch(req, id).await,
            Err(e) => Err(e),
        },
        Some(WorkloadRoute::Register) => match who() {
            Ok(id) => control.register(req, id).await,
            Err(e) => Err(e),
        },
        Some(WorkloadRoute::Heartbeat) => match who() {
            Ok(_) => control.heartbeat(req).await,
            Err(e) => Err(e),
        },
        Some(WorkloadRoute::Deregister) => match who() {
            Ok(_) => control.deregister(req).await,
            Err(e) => Err(e),
        },
        Some(WorkloadRoute::MeshReport) => match peer(&control, &peer_certs) {
            Ok((id, serial)) => control.mesh_report(req, id, &serial).await,
            Err(e) => Err(e),
        },
        None => Err(not_found(&path)),
    };
    Ok(r.unwrap_or_else(|e| control.refused(e, &path)))
}

fn not_found(path: &str) -> Refusal {
    refusal(
        404,
        "not-found",
        format!("no such API: {path}; see docs/reference/control-api.md"),
    )
}

/// The query of a long poll: the caller's instance, the versions it has,
/// and how long to wait (seconds, at most 60).
pub(super) struct PollQuery {
    pub instance: String,
    q: HashMap<String, String>,
}

impl PollQuery {
    pub(super) fn parse(req: &Request<Incoming>) -> Result<PollQuery, Refusal> {
        let q: HashMap<String, String> = req.uri().query().map(form_pairs).unwrap_or_default();
        let instance = q.get("instance").cloned().unwrap_or_default();
        check_instance(&instance)?;
        Ok(PollQuery { instance, q })
    }

    /// A number from the query; 0 when absent or not a number.
    pub(super) fn num(&self, key: &str) -> u64 {
        self.q.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    pub(super) fn get(&self, key: &str) -> Option<&String> {
        self.q.get(key)
    }

    pub(super) fn wait(&self) -> Duration {
        Duration::from_secs(self.num("wait").min(60))
    }
}

/// Accepts TLS connections for the workload API.
pub async fn serve_workloads(
    control: Arc<Control>,
    listener: tokio::net::TcpListener,
) -> Result<()> {
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let control = control.clone();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(control.tls.current());
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let peer_certs = Arc::new(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect::<Vec<_>>()),
            );
            let svc = hyper::service::service_fn(move |req| {
                route_workload(control.clone(), peer_certs.clone(), req)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
        });
    }
}

impl Control {
    fn status(&self) -> CaStatus {
        let st = self.state();
        let reports = self.reports().clone();
        let t = now();
        let stale = self.cfg.workloads.stale_after;
        let lag: HashMap<String, String> = st.lagging(&reports, stale, t).into_iter().collect();
        let mut workloads: Vec<WorkloadRow> = reports
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
        workloads.sort_by(|a, b| (&a.identity, &a.instance).cmp(&(&b.identity, &b.instance)));
        let idle = st.rotation.phase == super::state::Phase::Idle;
        CaStatus {
            trust_domain: st.trust_domain.clone(),
            phase: st.rotation.phase,
            rotation_kind: (!idle).then_some(st.rotation.kind),
            rotation_started_at: (!idle).then_some(st.rotation.started_at),
            phase_since: (!idle).then_some(st.rotation.phase_since),
            target_bundle: matches!(
                st.rotation.phase,
                super::state::Phase::AddingRoot | super::state::Phase::RemovingRoot
            )
            .then_some(st.rotation.target_bundle),
            bundle_version: st.bundle_version,
            revocations_version: st.revocations_version,
            revoked_serials: st.revoked.len(),
            roots: st
                .roots
                .iter()
                .map(|r| CaEntry {
                    subject: r.subject.clone(),
                    serial: r.serial.clone(),
                    not_after: r.not_after,
                    state: if st.rotation.old_root_serial.as_ref() == Some(&r.serial) {
                        "retiring".into()
                    } else {
                        "trusted".into()
                    },
                })
                .collect(),
            intermediates: st
                .intermediates
                .iter()
                .map(|i| CaEntry {
                    subject: i.subject.clone(),
                    serial: i.serial.clone(),
                    not_after: i.not_after,
                    state: serde_json::to_value(i.state)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default(),
                })
                .collect(),
            workloads,
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
        }
    }

    async fn admin(&self, req: Request<Incoming>) -> Result<Resp, Refusal> {
        let path = req.uri().path().to_string();
        let bad = |e: String| refusal(400, "bad-request", e);
        match (req.method().clone(), path.as_str()) {
            (Method::POST, "/v1/admin/tokens") => {
                let r: TokenRequest = body(req).await?;
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
                let mut st = self.state();
                let (token, expires_at) = st.create_token(id.clone(), ttl, now());
                self.commit(&st);
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
            (Method::GET, "/v1/admin/certs") => {
                let st = self.state();
                let t = now();
                let rows: Vec<CertRow> = st
                    .inventory
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
                    .collect();
                Ok(json(200, &rows))
            }
            (Method::POST, "/v1/admin/revoke") => {
                let r: RevokeRequest = body(req).await?;
                let mut st = self.state();
                let revoked = st.revoke(&r.target, now()).map_err(|e| bad(e.0))?;
                self.commit(&st);
                tracing::warn!(target = %r.target, serials = ?revoked, version = st.revocations_version, "revoked");
                Ok(json(
                    200,
                    &RevokeResponse {
                        revoked,
                        revocations_version: st.revocations_version,
                    },
                ))
            }
            (Method::POST, "/v1/admin/rotate") => {
                let r: RotateRequest = body(req).await?;
                let td = self.cfg.trust_domain.clone();
                let inter =
                    crank_certs::Ca::from_pem(&r.intermediate_pem, &r.intermediate_key_pem, &td)
                        .map_err(|e| bad(format!("the new intermediate: {e}")))?;
                let mut st = self.state();
                match r.kind {
                    RotationKind::Intermediate => st.rotate_intermediate(&inter, now()),
                    RotationKind::Root => {
                        let root = r
                            .root_pem
                            .as_deref()
                            .ok_or_else(|| bad("a root rotation needs root_pem".into()))?;
                        st.rotate_root(root, &inter, now())
                    }
                }
                .map_err(|e| refusal(409, "rotation-refused", e.0))?;
                self.commit(&st);
                tracing::warn!(kind = ?r.kind, phase = st.rotation.phase.as_str(), bundle_version = st.bundle_version, "CA rotation started");
                drop(st);
                Ok(json(200, &self.status()))
            }
            (Method::GET, "/v1/admin/status") => Ok(json(200, &self.status())),
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
}

/// Serves the admin API on the Unix socket.
pub async fn serve_admin(control: Arc<Control>, listener: tokio::net::UnixListener) -> Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let control = control.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let control = control.clone();
                async move {
                    let path = req.uri().path().to_string();
                    Ok::<_, std::convert::Infallible>(
                        control
                            .admin(req)
                            .await
                            .unwrap_or_else(|e| control.refused(e, &path)),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Serves `/metrics` in plain HTTP on `metrics_listen`.
pub async fn serve_metrics(control: Arc<Control>, listener: tokio::net::TcpListener) -> Result<()> {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let control = control.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let control = control.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(control.metrics.encode())))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"only /metrics here\n")))
                    };
                    Ok::<_, std::convert::Infallible>(resp.expect("a valid response"))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}
