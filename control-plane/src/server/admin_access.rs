//! The door to the admin API: who calls (the Unix socket's peer, or a
//! client certificate on `admin_listen`), whether their role allows the
//! route, the request id (`x-request-id`), and the audit entry of every
//! mutation and every refusal. The handlers are in [`super::ca_admin`].

use bytes::Bytes;
use crank_certs::Identity;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::audit::{request_id, AuditEntry};
use super::http::{refusal, Resp};
use super::roles;
use super::state::Refusal;
use super::{now, Control};

const MAX_BODY: usize = 64 * 1024;

/// Who calls the admin API.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The Unix socket: full access (root, or the socket's owner, on the host).
    Socket { uid: Option<u32> },
    /// A verified client certificate on `admin_listen`; `None` when it
    /// carries no Crank identity.
    Cert(Option<Identity>),
}

impl Caller {
    fn name(&self) -> String {
        match self {
            Caller::Socket { uid: Some(u) } => format!("unix-socket:uid {u}"),
            Caller::Socket { uid: None } => "unix-socket".into(),
            Caller::Cert(Some(id)) => id.dns_name(),
            Caller::Cert(None) => "a certificate without a Crank identity".into(),
        }
    }
}

/// What an admin call did, for the audit log.
struct Outcome {
    role: Option<String>,
    result: Result<(), String>,
}

impl Control {
    /// One admin call from `caller`: role check, handler, audit, request id.
    pub(super) async fn admin_call(&self, caller: Caller, req: Request<Incoming>) -> Resp {
        let id = request_id();
        let (parts, body) = req.into_parts();
        let what = format!("{} {}", parts.method, parts.uri.path());
        let bytes = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                let r = refusal(
                    400,
                    "bad-request",
                    format!("cannot read the body ({e}); it must be JSON under 64 KiB"),
                );
                return with_id(self.refused(r, &what), &id);
            }
        };
        let req = Request::from_parts(parts, bytes);
        let (role, allowed) = self.authorize(&caller, &req);
        let answer = match allowed {
            Err(r) => Err(r),
            Ok(()) => self.admin(&req).await,
        };
        let mutation = req.method() != http::Method::GET;
        if mutation || answer.as_ref().is_err_and(|r| r.code == "role-required") {
            let result = answer
                .as_ref()
                .map(|_| ())
                .map_err(|r| format!("{}: {}", r.code, r.message));
            self.audit_call(&id, &caller, &req, Outcome { role, result });
        }
        let resp = answer.unwrap_or_else(|e| self.refused(e, &what));
        with_id(resp, &id)
    }

    /// The caller's role, and whether it may call this route.
    fn authorize(
        &self,
        caller: &Caller,
        req: &Request<Bytes>,
    ) -> (Option<String>, Result<(), Refusal>) {
        let Caller::Cert(id) = caller else {
            return (Some("root".into()), Ok(()));
        };
        let has = id.as_ref().and_then(|id| self.roles().role_of(id));
        let need = roles::required(req.method().as_str(), req.uri().path());
        let role = has.map(|r| r.as_str().to_string());
        if has.is_some_and(|h| h >= need) {
            return (role, Ok(()));
        }
        let msg = roles::refusal_message(need, &caller.name(), has);
        (role, Err(refusal(403, "role-required", msg)))
    }

    /// The role bindings of the published config version (none without one).
    fn roles(&self) -> roles::RolesFile {
        self.mesh()
            .current
            .as_ref()
            .map(|c| c.snapshot.roles.clone())
            .unwrap_or_default()
    }

    fn audit_call(&self, id: &str, caller: &Caller, req: &Request<Bytes>, o: Outcome) {
        let (action, target) = describe(req);
        let (result, reason) = match o.result {
            Ok(()) => ("ok", None),
            Err(r) => ("refused", Some(r)),
        };
        self.audit.append(AuditEntry {
            time: now(),
            request_id: id.to_string(),
            identity: caller.name(),
            role: o.role,
            action,
            target,
            result: result.into(),
            reason,
        });
    }

    /// Records a published (or refused) config version.
    pub(super) fn audit_config(&self, hash: &str, target: String, refused: Option<String>) {
        self.audit.append(AuditEntry {
            time: now(),
            request_id: format!("config-{}", hash.get(..12).unwrap_or(hash)),
            identity: "config-dir".into(),
            role: None,
            action: "config.publish".into(),
            target,
            result: if refused.is_some() { "refused" } else { "ok" }.into(),
            reason: refused,
        });
    }
}

/// The audit action and target of a call, read from its body; never a
/// secret (no token values, no keys).
fn describe(req: &Request<Bytes>) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(req.body()).unwrap_or_default();
    let s = |k: &str| v[k].as_str().unwrap_or("?").to_string();
    match (req.method().as_str(), req.uri().path()) {
        ("POST", "/v1/admin/tokens") => (
            "token.create".into(),
            format!("{}.{}", s("service"), s("tenant")),
        ),
        ("POST", "/v1/admin/revoke") => ("cert.revoke".into(), s("target")),
        ("POST", "/v1/admin/rotate") => ("ca.rotate".into(), s("kind")),
        (m, p) => (format!("{m} {p}"), String::new()),
    }
}

fn with_id(mut resp: Resp, id: &str) -> Resp {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}
