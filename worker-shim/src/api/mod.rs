//! The shim's HTTP surfaces.
//!
//! - The job API (`exec` mode) on `listen`, reached through the sidecar:
//!   `POST /v1/jobs`, `GET /v1/jobs`, `GET /v1/jobs/{id}`,
//!   `GET /v1/jobs/{id}/output`, `POST /v1/jobs/{id}/cancel`,
//!   `DELETE /v1/jobs/{id}`, `GET /v1/schema`, `GET /v1/host`,
//!   `GET /v1/openapi.json`, `GET /v1/usage` (the table [`JOB_ROUTES`]; the document is
//!   `worker-shim/openapi.json`).
//! - The admin listener: `/live`, `/ready`, `/metrics`, `/v1/host`,
//!   `/v1/registration`.
//!
//! Every error is the mesh's one error body, JSON
//! `{"error": REASON, "message": "…"}` (plus `problems` for `bad-params`),
//! with the same reason in `x-crank-error` (crank-plumbing's `Refusal`).
//! The submission itself is in `submit`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use crank_plumbing::Refusal;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::sync::watch;

mod stored;
mod submit;
mod usage;

pub(crate) use submit::submit_template;

use crate::host::{HostInfo, HostProbe};
use crate::job::{JobState, Priority};
use crate::jobs::Manager;
use crate::metrics::GpuMetrics;
use crate::registration::ShimRegistration;

pub type Body = BoxBody<Bytes, std::io::Error>;
type BoxFut = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

pub fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

pub fn json(status: StatusCode, v: &impl serde::Serialize) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    full(status, "application/json", body)
}

/// A refusal as the mesh's one error body (see the module docs).
pub fn refusal(r: &Refusal) -> Response<Body> {
    r.response::<Full<Bytes>>()
        .map(|body| body.map_err(|never: Infallible| match never {}).boxed())
}

/// What both listeners share.
pub struct Shared {
    pub host: HostInfo,
    pub probe: Arc<HostProbe>,
    pub registration: ShimRegistration,
    pub registry: prometheus::Registry,
    pub gpu_metrics: GpuMetrics,
    pub ready: watch::Receiver<bool>,
    pub manager: Option<Arc<Manager>>,
    pub output_content_type: String,
}

/// The admin listener's routes.
pub fn admin(shared: Arc<Shared>, req: Request<Incoming>) -> BoxFut {
    Box::pin(async move {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/live") => full(StatusCode::OK, "text/plain", "live\n"),
            (&Method::GET, "/ready") => {
                if *shared.ready.borrow() {
                    full(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    full(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
                }
            }
            (&Method::GET, "/metrics") => {
                shared.gpu_metrics.update(&shared.probe.gpu_stats());
                if let Some(m) = &shared.manager {
                    m.refresh_gauges();
                }
                let mut buf = String::new();
                let enc = prometheus::TextEncoder::new();
                if let Err(e) = enc.encode_utf8(&shared.registry.gather(), &mut buf) {
                    buf = format!("# encoding failed: {e}\n");
                }
                full(StatusCode::OK, "text/plain; version=0.0.4", buf)
            }
            (&Method::GET, "/v1/host") => json(StatusCode::OK, &shared.host),
            (&Method::GET, "/v1/registration") => json(StatusCode::OK, &shared.registration),
            _ => refusal(&Refusal::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "admin paths: /live /ready /metrics /v1/host /v1/registration",
            )),
        }
    })
}

/// The job API's OpenAPI 3.1 document, served verbatim at
/// `GET /v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// A route of the job API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobRoute {
    Submit,
    List,
    Get,
    Output,
    Cancel,
    Delete,
    Schema,
    Host,
    OpenApi,
    Usage,
}

/// Every route of the job API: method, path (OpenAPI template) and route.
/// The router matches requests against this table, and a test checks it
/// against `worker-shim/openapi.json` both ways.
pub const JOB_ROUTES: &[(&str, &str, JobRoute)] = &[
    ("POST", "/v1/jobs", JobRoute::Submit),
    ("GET", "/v1/jobs", JobRoute::List),
    ("GET", "/v1/jobs/{id}", JobRoute::Get),
    ("GET", "/v1/jobs/{id}/output", JobRoute::Output),
    ("POST", "/v1/jobs/{id}/cancel", JobRoute::Cancel),
    ("DELETE", "/v1/jobs/{id}", JobRoute::Delete),
    ("GET", "/v1/schema", JobRoute::Schema),
    ("GET", "/v1/host", JobRoute::Host),
    ("GET", "/v1/openapi.json", JobRoute::OpenApi),
    ("GET", "/v1/usage", JobRoute::Usage),
];

/// The route for `method` and `path`, with the `{id}` segment (empty when
/// the route has none). Leading and trailing slashes are ignored.
pub fn job_route<'p>(method: &str, path: &'p str) -> Option<(JobRoute, &'p str)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    JOB_ROUTES.iter().find_map(|(m, template, route)| {
        let tsegs: Vec<&str> = template.trim_matches('/').split('/').collect();
        if *m != method || tsegs.len() != segs.len() {
            return None;
        }
        let mut id = "";
        for (t, s) in tsegs.iter().zip(&segs) {
            if *t == "{id}" {
                id = s;
            } else if t != s {
                return None;
            }
        }
        Some((*route, id))
    })
}

/// The job API's routes.
pub fn jobs(shared: Arc<Shared>, req: Request<Incoming>) -> BoxFut {
    Box::pin(async move {
        let Some(m) = shared.manager.clone() else {
            return refusal(&Refusal::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "no job API in serve mode",
            ));
        };
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let res = match job_route(method.as_str(), &path) {
            Some((JobRoute::Submit, _)) => submit::submit(&m, req).await,
            Some((JobRoute::List, _)) => list(&m, &req).await,
            Some((JobRoute::Get, id)) => m.lookup(id).await.map(|r| json(StatusCode::OK, &r)),
            Some((JobRoute::Output, id)) => output(&m, id, &shared.output_content_type).await,
            Some((JobRoute::Cancel, id)) => {
                let by = client_id(&req);
                m.cancel_job(id, by.as_deref()).await.map(|r| {
                    let status = if r.state == JobState::Running {
                        StatusCode::ACCEPTED
                    } else {
                        StatusCode::OK
                    };
                    json(status, &r)
                })
            }
            Some((JobRoute::Delete, id)) => m
                .delete_job(id)
                .await
                .map(|()| full(StatusCode::NO_CONTENT, "text/plain", "")),
            Some((JobRoute::Schema, _)) => Ok(json(
                StatusCode::OK,
                &serde_json::json!({
                    "capability": m.settings.capability,
                    "priorities": Priority::ALL.map(Priority::as_str),
                    "takes_input": m.settings.template.uses_input(),
                    "max_input_bytes": m.settings.max_input_bytes,
                    "params": m.settings.schema.describe(),
                }),
            )),
            Some((JobRoute::Host, _)) => Ok(json(StatusCode::OK, &shared.host)),
            Some((JobRoute::OpenApi, _)) => Ok(full(StatusCode::OK, "application/json", OPENAPI)),
            Some((JobRoute::Usage, _)) => usage::usage(&m, req.uri().query()).await,
            None => Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "not-found",
                format!(
                    "no route for {method} {path}; the job API is under /v1/jobs (see docs/reference/shim-api.md)"
                ),
            )),
        };
        res.unwrap_or_else(|r| refusal(&r))
    })
}

fn client_id(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get("x-crank-client-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn list(m: &Manager, req: &Request<Incoming>) -> Result<Response<Body>, Refusal> {
    let mut state = None;
    let mut limit = 100usize;
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match &*k {
            "state" => {
                state = Some(JobState::parse(&v).ok_or_else(|| {
                    Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "bad-query",
                        format!(
                            "unknown state {v:?}; use one of {}",
                            JobState::ALL.map(JobState::as_str).join(", ")
                        ),
                    )
                })?)
            }
            "limit" => {
                limit = v.parse().map_err(|_| {
                    Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "bad-query",
                        format!("limit {v:?} is not a number"),
                    )
                })?
            }
            _ => {}
        }
    }
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"jobs": m.list_jobs(state, limit.min(10_000)).await?}),
    ))
}

async fn output(m: &Manager, id: &str, content_type: &str) -> Result<Response<Body>, Refusal> {
    if m.settings.storage.is_some() {
        // Any shim on the bucket serves any job's output.
        return stored::output(m, id, content_type).await;
    }
    let rec = m.lookup(id).await?;
    if rec.state != JobState::Succeeded {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "job-not-finished",
            format!(
                "job {id} is {}; its output exists once it has succeeded",
                rec.state
            ),
        ));
    }
    m.output_here(&rec)?;
    let path = m.output_path(id);
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        Refusal::new(
            StatusCode::GONE,
            "output-gone",
            format!("the output of job {id} is no longer there: {e}"),
        )
    })?;
    let len = file.metadata().await.map(|md| md.len()).unwrap_or(0);
    let stream = futures::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Frame::data(Bytes::from(buf))), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    Ok(download(m, id, content_type, len, stream))
}

/// The output as a download: its type, length and file name.
fn download(
    m: &Manager,
    id: &str,
    content_type: &str,
    len: u64,
    stream: impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + Sync + 'static,
) -> Response<Body> {
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{id}.{}\"",
        m.settings.output_ext
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The mesh's one error body, with `problems` for `bad-params`.
    #[tokio::test]
    async fn refusals_are_the_mesh_error_body() {
        let r = Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "queue-full", "retry later")
            .with("problems", vec!["a", "b"])
            .retry_after(3);
        let resp = refusal(&r);
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()["x-crank-error"], "queue-full");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(resp.headers()[header::RETRY_AFTER], "3");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": "queue-full", "message": "retry later", "problems": ["a", "b"]})
        );
    }

    #[test]
    fn job_routes_match_paths_and_capture_the_id() {
        let cases = [
            ("POST", "/v1/jobs", Some((JobRoute::Submit, ""))),
            ("GET", "/v1/jobs/", Some((JobRoute::List, ""))),
            ("GET", "/v1/jobs/j-1", Some((JobRoute::Get, "j-1"))),
            ("DELETE", "/v1/jobs/j-1", Some((JobRoute::Delete, "j-1"))),
            (
                "GET",
                "/v1/jobs/j-1/output",
                Some((JobRoute::Output, "j-1")),
            ),
            (
                "POST",
                "/v1/jobs/j-1/cancel",
                Some((JobRoute::Cancel, "j-1")),
            ),
            ("GET", "/v1/openapi.json", Some((JobRoute::OpenApi, ""))),
            ("GET", "/v1/jobs/j-1/cancel", None),
            ("PUT", "/v1/jobs", None),
            ("GET", "/v1/jobs/j-1/output/x", None),
            ("GET", "/v2/schema", None),
        ];
        for (method, path, want) in cases {
            assert_eq!(job_route(method, path), want, "{method} {path}");
        }
    }

    /// The document lists exactly the routes the router handles.
    #[test]
    fn openapi_document_lists_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().unwrap().keys() {
                if method != "parameters" {
                    documented.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        let routed: BTreeSet<(String, String)> = JOB_ROUTES
            .iter()
            .map(|(m, p, _)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(
            routed.difference(&documented).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "routes missing from worker-shim/openapi.json"
        );
        assert_eq!(
            documented.difference(&routed).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "worker-shim/openapi.json documents routes the router does not handle"
        );
    }

    /// Every error answer documented has the error body and `x-crank-error`.
    #[test]
    fn openapi_error_answers_have_the_error_shape() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let Some(responses) = op["responses"].as_object() else {
                    continue;
                };
                for (status, r) in responses {
                    if status.starts_with('4') || status.starts_with('5') {
                        let schema = &r["content"]["application/json"]["schema"]["$ref"];
                        assert_eq!(
                            schema, "#/components/schemas/Error",
                            "{method} {path} {status}"
                        );
                        assert!(
                            r["headers"]["x-crank-error"].is_object(),
                            "{method} {path} {status}"
                        );
                    }
                }
            }
        }
    }
}
