//! The workload API over TLS: which handler a call goes to
//! ([`route_workload`], by [`super::routes::workload_route`]), the caller's
//! verified certificate ([`peer`]), and the identity calls: enroll (a join
//! token and a CSR), renew (the current certificate and a CSR) and the
//! identity watch (a long poll for bundle, revocations and renew hints).
//! The mesh and registry calls are in [`super::mesh`] and [`super::traffic`].

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use crank_api::identity::{
    canonical_serial, EnrollRequest, IssueResponse, RenewRequest, WatchResponse,
};
use crank_certs::{CsrError, Identity, SignCsrError, SignedLeaf};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use rustls::pki_types::CertificateDer;

use super::http::{body, check_instance, json, refusal, PollQuery, Resp};
use super::routes::{workload_route, WorkloadRoute, OPENAPI};
use super::state::{CaState, Issued, Refusal, Report};
use super::{now, Control};

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

/// The client certificates of one TLS connection, and what they say:
/// parsed once per connection (a watching proxy asks many times on one
/// connection), checked against the deny list on every request.
pub(super) struct PeerCerts {
    certs: Option<Vec<CertificateDer<'static>>>,
    verified: OnceLock<Result<Verified, Refusal>>,
}

/// The identity and serial of a connection's client certificate.
pub(super) struct Verified {
    pub id: Identity,
    /// `id.dns_name()`, made once.
    pub dns_name: String,
    pub serial: String,
}

impl PeerCerts {
    pub(super) fn new(certs: Option<Vec<CertificateDer<'static>>>) -> PeerCerts {
        PeerCerts {
            certs,
            verified: OnceLock::new(),
        }
    }

    fn verified(&self) -> &Result<Verified, Refusal> {
        self.verified.get_or_init(|| verify(self.certs.as_deref()))
    }
}

/// The identity and serial of the client certificate (the leaf).
fn verify(certs: Option<&[CertificateDer<'static>]>) -> Result<Verified, Refusal> {
    let leaf = certs.and_then(|c| c.first()).ok_or_else(|| {
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
    Ok(Verified {
        dns_name: id.dns_name(),
        id,
        serial: canonical_serial(&summary.serial),
    })
}

/// The caller's verified, unrevoked certificate.
fn peer_ref<'a>(control: &Control, peer: &'a PeerCerts) -> Result<&'a Verified, Refusal> {
    let v = peer.verified().as_ref().map_err(Clone::clone)?;
    if control.state().is_revoked_canonical(&v.serial) {
        return Err(revoked(&v.id, &v.serial));
    }
    Ok(v)
}

/// The verified client certificate's identity and serial, for renew and watch.
fn peer(control: &Control, peer: &PeerCerts) -> Result<(Identity, String), Refusal> {
    peer_ref(control, peer).map(|v| (v.id.clone(), v.serial.clone()))
}

fn revoked(id: &Identity, serial: &str) -> Refusal {
    refusal(403, "cert-revoked", format!("certificate {serial} of {id} is revoked; enroll again with a new join token (`crankctl token create`) once the cause is fixed"))
}

/// One call of the workload API: its handler's answer, or the refusal.
pub(super) async fn route_workload(
    control: Arc<Control>,
    peer_certs: Arc<PeerCerts>,
    req: Request<Incoming>,
) -> Resp {
    // A clone of the URI shares its bytes: no copy per request.
    let uri = req.uri().clone();
    let path = uri.path();
    let r = match workload_route(req.method().as_str(), path) {
        Some(route) => dispatch(&control, &peer_certs, route, req).await,
        None => Err(not_found(path)),
    };
    r.unwrap_or_else(|e| control.refused(e, path))
}

async fn dispatch(
    control: &Control,
    peer_certs: &PeerCerts,
    route: WorkloadRoute,
    req: Request<Incoming>,
) -> Result<Resp, Refusal> {
    // The mesh and registry calls need the caller's verified identity.
    let who = || peer(control, peer_certs).map(|(id, _)| id);
    match route {
        WorkloadRoute::Enroll => control.enroll(req).await,
        WorkloadRoute::Renew => control.renew(req, peer_certs).await,
        WorkloadRoute::IdentityWatch => control.watch(req, peer_certs).await,
        WorkloadRoute::Bundle => Ok(json(200, &control.state().bundle())),
        WorkloadRoute::OpenApi => Ok(Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(OPENAPI.as_bytes())))
            .expect("a valid response")),
        WorkloadRoute::MeshWatch => {
            control
                .mesh_watch(req, peer_ref(control, peer_certs)?)
                .await
        }
        WorkloadRoute::Register => control.register(req, who()?).await,
        WorkloadRoute::Heartbeat => {
            who()?;
            control.heartbeat(req).await
        }
        WorkloadRoute::Deregister => {
            who()?;
            control.deregister(req).await
        }
        WorkloadRoute::MeshReport => {
            let (id, serial) = peer(control, peer_certs)?;
            control.mesh_report(req, id, &serial).await
        }
    }
}

fn not_found(path: &str) -> Refusal {
    refusal(
        404,
        "not-found",
        format!("no such API: {path}; see docs/reference/control-api.md"),
    )
}

/// Who asked for a certificate, and how.
struct IssueFor<'a> {
    id: &'a Identity,
    instance: &'a str,
    requester: String,
    renewing: bool,
}

impl<'a> IssueFor<'a> {
    /// An enrollment by `requester`; set `renewing` for a renewal.
    fn new(id: &'a Identity, instance: &'a str, requester: String) -> Self {
        IssueFor {
            id,
            instance,
            requester,
            renewing: false,
        }
    }
}

impl Control {
    /// Signs a CSR for `who.id` and records it in the inventory and the
    /// workload reports.
    fn issue(
        &self,
        st: &mut CaState,
        csr: &str,
        who: IssueFor<'_>,
    ) -> Result<IssueResponse, Refusal> {
        let signer = st
            .signer()
            .map_err(|e| refusal(503, "ca-unavailable", e.to_string()))?;
        let t = now();
        let inter_end = super::state::summary_of(signer.cert_pem())
            .map(|s| s.not_after)
            .unwrap_or(t);
        // Never past the intermediate's own end.
        let ttl = self
            .cfg
            .certs
            .leaf_ttl
            .min(Duration::from_secs((inter_end - t).max(60) as u64));
        let signed = signer
            .sign_csr(csr, who.id, ttl)
            .map_err(|e| csr_refusal(e, who.renewing))?;
        record_issue(st, &signed, &who, t);
        let bundle = st.bundle();
        self.note_issued(&signed, &who, bundle.version, t);
        Ok(IssueResponse {
            chain: signed.chain_pem,
            serial: signed.serial,
            not_before: signed.not_before,
            not_after: signed.not_after,
            bundle,
        })
    }

    /// The workload's report after a new certificate: a renewal does not
    /// apply the bundle by itself; an enrollment does.
    fn note_issued(&self, signed: &SignedLeaf, who: &IssueFor<'_>, bundle_version: u64, t: i64) {
        let mut reports = self.reports();
        let prev_bundle = reports
            .get(who.instance)
            .map(|r| r.bundle_version)
            .unwrap_or(0);
        let report = Report {
            identity: who.id.clone(),
            instance: who.instance.to_string(),
            serial: signed.serial.clone(),
            bundle_version: if who.renewing {
                prev_bundle
            } else {
                bundle_version
            },
            last_seen: t,
            told_renew: None,
        };
        self.share_report(&report);
        reports.insert(who.instance.to_string(), report);
    }

    async fn enroll(&self, req: Request<Incoming>) -> Result<Resp, Refusal> {
        let r: EnrollRequest = body(req).await?;
        check_instance(&r.instance)?;
        // One compare-and-swap with the token's use: a token enrolls once,
        // also across replicas.
        let (id, resp) = self
            .change(|st| {
                let (idx, id) = st.check_token(&r.token, now())?;
                let token_ref = super::state::sha256_hex(r.token.trim())[..8].to_string();
                let who = IssueFor::new(&id, &r.instance, format!("enroll (token {token_ref})"));
                let resp = self.issue(st, &r.csr, who)?;
                st.use_token(idx, now());
                Ok((id, resp))
            })
            .await?;
        tracing::info!(identity = %id, instance = %r.instance, serial = %resp.serial, "enrolled");
        self.metrics.issued.with_label_values(&["enroll"]).inc();
        Ok(json(200, &resp))
    }

    async fn renew(&self, req: Request<Incoming>, peer_certs: &PeerCerts) -> Result<Resp, Refusal> {
        let (id, serial) = peer(self, peer_certs)?;
        let r: RenewRequest = body(req).await?;
        check_instance(&r.instance)?;
        // The deny list is checked again inside the change: the leaf is
        // recorded only while the store's ca/state is still the one
        // consulted here, so a stale replica cannot renew a revoked leaf.
        let resp = self
            .change(|st| {
                if st.is_revoked(&serial) {
                    return Err(revoked(&id, &serial));
                }
                let who = IssueFor {
                    renewing: true,
                    ..IssueFor::new(&id, &r.instance, format!("renew (serial {serial})"))
                };
                self.issue(st, &r.csr, who)
            })
            .await?;
        tracing::info!(identity = %id, instance = %r.instance, old = %serial, serial = %resp.serial, "renewed");
        self.metrics.issued.with_label_values(&["renew"]).inc();
        self.advance().await;
        Ok(json(200, &resp))
    }

    /// The identity watch: answers at once when the caller is behind (a
    /// newer bundle or revocation list, or a renew hint not yet given),
    /// otherwise when that changes or the wait ends.
    async fn watch(&self, req: Request<Incoming>, peer_certs: &PeerCerts) -> Result<Resp, Refusal> {
        let (id, peer_serial) = peer(self, peer_certs)?;
        let q = PollQuery::parse(&req)?;
        let instance = q.instance.clone();
        let (have_bundle, have_revs) = (q.num("bundle"), q.num("revocations"));
        let serial = {
            let st = self.state();
            match q.get("serial").map(canonical_serial) {
                Some(s) if st.issued(&s).is_some_and(|i| i.identity == id) => s,
                _ => peer_serial,
            }
        };
        let mut rx = self.changed.subscribe();
        let told = self.note_watcher(id, &instance, &serial, have_bundle);
        self.advance().await;
        let deadline = tokio::time::Instant::now() + q.wait();
        loop {
            // A replica cut off from etcd may hold a stale bundle and deny
            // list: send the sidecar to a replica that can read the store.
            self.check_store_reachable()?;
            let resp = self.watch_answer(&serial);
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

    /// Refuses (503 `store-unreachable`) while this replica cannot read its
    /// store: its state may be stale, so watchers must move to another
    /// replica. Always fine with the file store.
    pub(super) fn check_store_reachable(&self) -> Result<(), Refusal> {
        match &self.shared {
            Some(shared) if !shared.store_reachable.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(refusal(503, "store-unreachable", "this crank-control replica cannot reach its store (etcd), so its state may be stale; ask another replica (list every replica in identity.enroll.control_plane)"))
            }
            _ => Ok(()),
        }
    }

    /// Records a watcher's report; whether it was already told to renew
    /// this certificate.
    fn note_watcher(&self, id: Identity, instance: &str, serial: &str, have_bundle: u64) -> bool {
        let mut reports = self.reports();
        let told = reports
            .get(instance)
            .and_then(|r| r.told_renew.clone())
            .filter(|s| s == serial);
        let report = Report {
            identity: id,
            instance: instance.to_string(),
            serial: serial.to_string(),
            bundle_version: have_bundle,
            last_seen: now(),
            told_renew: told.clone(),
        };
        self.share_report(&report);
        reports.insert(instance.to_string(), report);
        told.is_some()
    }

    fn watch_answer(&self, serial: &str) -> WatchResponse {
        let st = self.state();
        WatchResponse {
            bundle: st.bundle(),
            revocations: st.revocations(),
            renew: st.should_renew(serial),
        }
    }
}

/// The inventory entry of a new certificate.
fn record_issue(st: &mut CaState, signed: &SignedLeaf, who: &IssueFor<'_>, t: i64) {
    let issuer = st.signer_subject().unwrap_or_default().to_string();
    let issuer_serial = st
        .signer_entry()
        .map(|e| e.serial.clone())
        .unwrap_or_default();
    st.record_issue(Issued {
        serial: signed.serial.clone(),
        identity: who.id.clone(),
        instance: who.instance.to_string(),
        not_before: signed.not_before,
        not_after: signed.not_after,
        requester: who.requester.clone(),
        issuer,
        issuer_serial,
        issued_at: t,
    });
}
