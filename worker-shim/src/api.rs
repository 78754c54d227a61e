//! The shim's HTTP surfaces.
//!
//! - The job API (`exec` mode) on `listen`, reached through the sidecar:
//!   `POST /v1/jobs`, `GET /v1/jobs`, `GET /v1/jobs/{id}`,
//!   `GET /v1/jobs/{id}/output`, `POST /v1/jobs/{id}/cancel`,
//!   `DELETE /v1/jobs/{id}`, `GET /v1/schema`, `GET /v1/host`,
//!   `GET /v1/openapi.json` (the table [`JOB_ROUTES`]; the document is
//!   `worker-shim/openapi.json`).
//! - The admin listener: `/live`, `/ready`, `/metrics`, `/v1/host`,
//!   `/v1/registration`.
//!
//! Every error is JSON `{"error": REASON, "detail": "…"}` with the same
//! reason in `x-crank-error`, as the sidecar does.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::host::{HostInfo, HostProbe};
use crate::job::{JobState, Priority};
use crate::jobs::manager::{Manager, NewJob, Refusal};
use crate::metrics::GpuMetrics;
use crate::registration::ShimRegistration;

pub type Body = BoxBody<Bytes, std::io::Error>;
type BoxFut = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// Largest JSON submission body.
const MAX_JSON: usize = 64 * 1024;

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

pub fn refusal(r: &Refusal) -> Response<Body> {
    let mut v = serde_json::json!({"error": r.reason, "detail": r.detail});
    if !r.problems.is_empty() {
        v["problems"] = serde_json::json!(r.problems);
    }
    let mut resp = json(
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &v,
    );
    resp.headers_mut()
        .insert("x-crank-error", HeaderValue::from_static(r.reason));
    if let Some(s) = r.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    resp
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
                404,
                "not-found",
                "admin paths: /live /ready /metrics /v1/host /v1/registration",
            )),
        }
    })
}

/// The job API's OpenAPI 3.1 document, served verbatim at
/// `GET /v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

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
            return refusal(&Refusal::new(404, "not-found", "no job API in serve mode"));
        };
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let res = match job_route(method.as_str(), &path) {
            Some((JobRoute::Submit, _)) => submit(&m, req).await,
            Some((JobRoute::List, _)) => list(&m, &req),
            Some((JobRoute::Get, id)) => m
                .get(id)
                .map(|r| json(StatusCode::OK, &r))
                .ok_or_else(|| not_found(id)),
            Some((JobRoute::Output, id)) => output(&m, id, &shared.output_content_type).await,
            Some((JobRoute::Cancel, id)) => {
                let by = client_id(&req);
                m.cancel(id, by.as_deref()).map(|r| {
                    let status = if r.state == JobState::Running {
                        StatusCode::ACCEPTED
                    } else {
                        StatusCode::OK
                    };
                    json(status, &r)
                })
            }
            Some((JobRoute::Delete, id)) => m
                .delete(id)
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
            None => Err(Refusal::new(
                404,
                "not-found",
                format!(
                    "no route for {method} {path}; the job API is under /v1/jobs (see docs/reference/shim-api.md)"
                ),
            )),
        };
        res.unwrap_or_else(|r| refusal(&r))
    })
}

fn not_found(id: &str) -> Refusal {
    Refusal::new(404, "job-not-found", format!("no job {id}"))
}

fn client_id(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get("x-crank-client-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn list(m: &Manager, req: &Request<Incoming>) -> Result<Response<Body>, Refusal> {
    let mut state = None;
    let mut limit = 100usize;
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match &*k {
            "state" => {
                state = Some(JobState::parse(&v).ok_or_else(|| {
                    Refusal::new(
                        400,
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
                    Refusal::new(400, "bad-query", format!("limit {v:?} is not a number"))
                })?
            }
            _ => {}
        }
    }
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"jobs": m.list(state, limit.min(10_000))}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSubmit {
    #[serde(default)]
    params: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    priority: Option<String>,
    /// A run timeout shorter than `exec.timeout`, like `90s`.
    #[serde(default)]
    timeout: Option<String>,
}

fn parse_timeout(
    t: Option<&str>,
    max: std::time::Duration,
) -> Result<Option<std::time::Duration>, Refusal> {
    let Some(t) = t else { return Ok(None) };
    let d = humantime::parse_duration(t).map_err(|e| {
        Refusal::new(
            400,
            "bad-timeout",
            format!("timeout {t:?} is not a duration like `90s` or `10m`: {e}"),
        )
    })?;
    if d.is_zero() || d > max {
        return Err(Refusal::new(
            400,
            "bad-timeout",
            format!(
                "timeout {t:?} must be more than 0 and at most exec.timeout ({})",
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(Some(d))
}

fn parse_priority(p: Option<&str>) -> Result<Priority, Refusal> {
    match p {
        None => Ok(Priority::default()),
        Some(s) => Priority::parse(s).ok_or_else(|| {
            Refusal::new(
                400,
                "bad-priority",
                format!(
                    "unknown priority {s:?}; use one of {}",
                    Priority::ALL.map(Priority::as_str).join(", ")
                ),
            )
        }),
    }
}

/// `POST /v1/jobs`. Two forms:
/// - the input file as the body (any content type but JSON), parameters and
///   `priority` in the query string;
/// - `Content-Type: application/json` with `{"params": {…}, "priority": …}`,
///   for tools that take no input file.
///
/// Parameters are checked before any byte of the body is read, and nothing
/// runs when they are wrong.
async fn submit(m: &Arc<Manager>, req: Request<Incoming>) -> Result<Response<Body>, Refusal> {
    let refused = |r: Refusal| {
        m.metrics_refused(r.reason);
        r
    };
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let requester = client_id(&req);
    let declared_len: Option<u64> = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let takes_input = m.settings.template.uses_input();
    let (given, priority, timeout, body) = if is_json {
        let bytes = Limited::read(req.into_body(), MAX_JSON)
            .await
            .map_err(|e| refused(Refusal::new(400, "bad-request", e)))?;
        let js: JsonSubmit = serde_json::from_slice(&bytes).map_err(|e| {
            refused(Refusal::new(
                400,
                "bad-request",
                format!("the JSON body is not {{\"params\": {{…}}, \"priority\": …}}: {e}"),
            ))
        })?;
        let priority = parse_priority(js.priority.as_deref()).map_err(refused)?;
        let timeout = parse_timeout(js.timeout.as_deref(), m.settings.timeout).map_err(refused)?;
        (js.params, priority, timeout, None)
    } else {
        let mut given = BTreeMap::new();
        let mut priority = None;
        let mut timeout = None;
        for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
            if k == "priority" {
                priority = Some(v.into_owned());
            } else if k == "timeout" {
                timeout = Some(v.into_owned());
            } else {
                given.insert(k.into_owned(), serde_json::Value::String(v.into_owned()));
            }
        }
        let priority = parse_priority(priority.as_deref()).map_err(refused)?;
        let timeout = parse_timeout(timeout.as_deref(), m.settings.timeout).map_err(refused)?;
        (given, priority, timeout, Some(req.into_body()))
    };
    let params = m.settings.schema.validate(&given).map_err(|errs| {
        refused(Refusal {
            problems: errs.iter().map(|e| e.to_string()).collect(),
            ..Refusal::new(
                400,
                "bad-params",
                format!(
                    "{} parameter problem(s); nothing was run. GET /v1/schema lists the parameters",
                    errs.len()
                ),
            )
        })
    })?;
    m.device_check(&params).map_err(refused)?;
    m.admit_check().map_err(refused)?;
    if takes_input && body.is_none() {
        return Err(refused(Refusal::new(
            400,
            "input-required",
            "this tool needs an input file: send it as the request body, with the parameters in the query string",
        )));
    }
    if let Some(n) = declared_len.filter(|n| takes_input && *n > m.settings.max_input_bytes) {
        return Err(refused(Refusal::new(
            413,
            "input-too-large",
            format!(
                "the input is {n} bytes, over exec.max_input_bytes ({})",
                m.settings.max_input_bytes
            ),
        )));
    }
    let (id, dir) = m.prepare()?;
    match body {
        Some(body) if takes_input => match write_input(m, body, &dir.join("input")).await {
            Ok(0) => {
                m.discard(&dir);
                return Err(refused(Refusal::new(
                    400,
                    "input-required",
                    "the request body is empty; this tool needs an input file as the body",
                )));
            }
            Ok(_) => {}
            Err(r) => {
                m.discard(&dir);
                return Err(refused(r));
            }
        },
        Some(mut body) => {
            // A tool without input: a body would be silently lost, so refuse it.
            if let Some(Ok(f)) = body.frame().await {
                if f.data_ref().is_some_and(|d| !d.is_empty()) {
                    m.discard(&dir);
                    return Err(refused(Refusal::new(
                        400,
                        "unexpected-input",
                        "this tool takes no input file; send parameters only",
                    )));
                }
            }
        }
        None => {}
    }
    let rec = m
        .enqueue(
            id,
            NewJob {
                params,
                priority,
                requester,
                timeout,
            },
        )
        .inspect_err(|_| m.discard(&dir))?;
    let mut resp = json(StatusCode::CREATED, &rec);
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{}", rec.id)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// Streams the body into `path`, refusing it past the input limit.
async fn write_input(
    m: &Manager,
    mut body: Incoming,
    path: &std::path::Path,
) -> Result<u64, Refusal> {
    let io =
        |e: std::io::Error| Refusal::new(500, "work-dir-error", format!("writing the input: {e}"));
    let mut f = tokio::fs::File::create(path).await.map_err(io)?;
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            Refusal::new(400, "bad-request", format!("reading the request body: {e}"))
        })?;
        if let Some(d) = frame.data_ref() {
            n += d.len() as u64;
            if n > m.settings.max_input_bytes {
                return Err(Refusal::new(
                    413,
                    "input-too-large",
                    format!(
                        "the input is over exec.max_input_bytes ({})",
                        m.settings.max_input_bytes
                    ),
                ));
            }
            f.write_all(d).await.map_err(io)?;
            m.add_work_bytes(d.len() as u64);
        }
    }
    f.flush().await.map_err(io)?;
    f.sync_all().await.map_err(io)?;
    Ok(n)
}

async fn output(m: &Manager, id: &str, content_type: &str) -> Result<Response<Body>, Refusal> {
    let rec = m.get(id).ok_or_else(|| not_found(id))?;
    if rec.state != JobState::Succeeded {
        return Err(Refusal::new(
            409,
            "job-not-finished",
            format!(
                "job {id} is {}; its output exists once it has succeeded",
                rec.state
            ),
        ));
    }
    let path = m.output_path(id);
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        Refusal::new(
            410,
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
    Ok(resp)
}

/// Reads a small body whole, refusing it past `max` bytes.
struct Limited;

impl Limited {
    async fn read(mut body: Incoming, max: usize) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("reading the request body: {e}"))?;
            if let Some(d) = frame.data_ref() {
                if out.len() + d.len() > max {
                    return Err(format!("the JSON body is over {max} bytes"));
                }
                out.extend_from_slice(d);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

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
