//! `POST /v1/jobs`: the submission, checked before any input byte is read,
//! then admitted, then its input streamed to the job's directory (and to
//! object storage when configured). A submission may name a job template
//! (`template`), jobs to run after (`after`) and its `limits`.

use std::collections::BTreeMap;
use std::sync::Arc;

use crank_plumbing::Refusal;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::{client_id, json, Body};
use crate::job::{JobExtras, Priority};
use crate::jobs::{Manager, NewJob};
use crate::limits::LimitsRequest;
use crate::templates::Asked;

/// Largest JSON submission body.
const MAX_JSON: usize = 64 * 1024;

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
    /// A job template's name (`job_templates/<name>.yaml`).
    #[serde(default)]
    template: Option<String>,
    /// Jobs that must succeed before this one starts.
    #[serde(default)]
    after: Vec<String>,
    /// `{cpu: "0.5", memory: 256MiB}`, within `exec.limits`' maximum.
    #[serde(default)]
    limits: Option<LimitsRequest>,
}

fn parse_timeout(
    t: Option<&str>,
    max: std::time::Duration,
) -> Result<Option<std::time::Duration>, Refusal> {
    let Some(t) = t else { return Ok(None) };
    let d = humantime::parse_duration(t).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad-timeout",
            format!("timeout {t:?} is not a duration like `90s` or `10m`: {e}"),
        )
    })?;
    if d.is_zero() || d > max {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
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
                StatusCode::BAD_REQUEST,
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
pub(super) async fn submit(
    m: &Arc<Manager>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Refusal> {
    let refused = |r: Refusal| {
        m.metrics_refused(r.reason);
        r
    };
    let sub = Submission::read(req).await.map_err(refused)?;
    let job = new_job(m, &sub).map_err(refused)?;
    m.device_check(&job.params).map_err(refused)?;
    m.admit_check().map_err(refused)?;
    check_input(m, &sub).map_err(refused)?;
    let (id, dir) = m.prepare()?;
    if let Err(r) = receive_input(m, sub.body, &dir, &id).await {
        m.discard(&dir);
        return Err(refused(r));
    }
    let rec = m
        .submit_job(id, job)
        .await
        .inspect_err(|_| m.discard(&dir))?;
    let mut resp = json(StatusCode::CREATED, &rec);
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{}", rec.id)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// The job a submission asks for: its template applied, its parameters,
/// priority, timeout, limits and dependencies checked.
pub(crate) fn new_job(m: &Manager, sub: &Submission) -> Result<NewJob, Refusal> {
    let asked = match &sub.template {
        None => sub.asked.clone(),
        Some(name) => template(m, name)?
            .resolve(sub.asked.clone())
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, "param-not-overridable", e))?,
    };
    let limits = m
        .settings
        .limits
        .resolve(asked.limits.as_ref())
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, "limit-too-high", e))?;
    m.check_after(&sub.after)?;
    Ok(NewJob {
        params: check_params(m, &asked.params)?,
        priority: parse_priority(asked.priority.as_deref())?,
        requester: sub.requester.clone(),
        timeout: parse_timeout(asked.timeout.as_deref(), m.settings.timeout)?,
        extras: JobExtras {
            limits: (limits != Default::default()).then_some(limits),
            template: sub.template.clone(),
            scheduled_ms: None,
            after: sub.after.clone(),
        },
    })
}

/// A job by template name alone, as a template's `schedule` fires it at
/// `tick_ms`; its directory is removed again when it is refused.
pub(crate) async fn submit_template(
    m: &Manager,
    name: &str,
    tick_ms: u64,
) -> Result<crate::job::JobRecord, Refusal> {
    let mut job = new_job(m, &Submission::of_template(name))?;
    job.extras.scheduled_ms = Some(tick_ms);
    m.device_check(&job.params)?;
    m.admit_check()?;
    let (id, dir) = m.prepare()?;
    m.submit_job(id, job).await.inspect_err(|_| m.discard(&dir))
}

fn template<'m>(m: &'m Manager, name: &str) -> Result<&'m crate::templates::Template, Refusal> {
    let templates = &m.settings.templates;
    templates.get(name).ok_or_else(|| {
        let known: Vec<&str> = templates.by_name.keys().map(String::as_str).collect();
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "template-not-found",
            format!(
                "no job template {name:?} for {}; templates here: {}",
                m.settings.capability,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
        )
    })
}

/// A submission as sent, before its parameters are checked.
pub(crate) struct Submission {
    pub(crate) asked: Asked,
    pub(crate) template: Option<String>,
    pub(crate) after: Vec<String>,
    /// The input, unread (the query-string form only).
    body: Option<Incoming>,
    pub(crate) requester: Option<String>,
    declared_len: Option<u64>,
}

impl Submission {
    /// A submission by template name with nothing else (a cron tick).
    pub(crate) fn of_template(name: &str) -> Submission {
        Submission {
            asked: Asked::default(),
            template: Some(name.to_string()),
            after: Vec::new(),
            body: None,
            requester: None,
            declared_len: None,
        }
    }
}

impl Submission {
    async fn read(req: Request<Incoming>) -> Result<Submission, Refusal> {
        let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        let is_json =
            header(header::CONTENT_TYPE).is_some_and(|v| v.starts_with("application/json"));
        let declared_len = header(header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
        let requester = client_id(&req);
        let mut sub = match is_json {
            true => Submission::json(req).await?,
            false => Submission::query(req)?,
        };
        sub.requester = requester;
        sub.declared_len = declared_len;
        Ok(sub)
    }

    /// `{"params": {…}, "priority": …, "timeout": …}`, no input.
    async fn json(req: Request<Incoming>) -> Result<Submission, Refusal> {
        let bytes = Limited::read(req.into_body(), MAX_JSON)
            .await
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, "bad-request", e))?;
        let js: JsonSubmit = serde_json::from_slice(&bytes).map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("the JSON body is not {{\"params\": {{…}}, \"priority\": …}}: {e}"),
            )
        })?;
        Ok(Submission {
            asked: Asked {
                params: js.params,
                priority: js.priority,
                timeout: js.timeout,
                limits: js.limits,
            },
            template: js.template,
            after: js.after,
            body: None,
            requester: None,
            declared_len: None,
        })
    }

    /// Parameters, `priority` and `timeout` in the query; the body is the
    /// input.
    fn query(req: Request<Incoming>) -> Result<Submission, Refusal> {
        let mut asked = Asked::default();
        let (mut template, mut after) = (None, Vec::new());
        for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
            match &*k {
                "priority" => asked.priority = Some(v.into_owned()),
                "timeout" => asked.timeout = Some(v.into_owned()),
                "template" => template = Some(v.into_owned()),
                "after" => after.extend(v.split(',').map(str::to_string)),
                _ => {
                    asked
                        .params
                        .insert(k.into_owned(), serde_json::Value::String(v.into_owned()));
                }
            }
        }
        Ok(Submission {
            asked,
            template,
            after,
            body: Some(req.into_body()),
            requester: None,
            declared_len: None,
        })
    }
}

/// The parameters against the tool's schema: every problem listed.
fn check_params(
    m: &Manager,
    given: &BTreeMap<String, serde_json::Value>,
) -> Result<BTreeMap<String, String>, Refusal> {
    m.settings.schema.validate(given).map_err(|errs| {
        let problems: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad-params",
            format!(
                "{} parameter problem(s); nothing was run. GET /v1/schema lists the parameters",
                errs.len()
            ),
        )
        .with("problems", problems)
    })
}

/// An input where the tool needs one, within the limit the caller declared.
fn check_input(m: &Manager, sub: &Submission) -> Result<(), Refusal> {
    let takes_input = m.settings.template.uses_input();
    if takes_input && sub.body.is_none() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "input-required",
            "this tool needs an input file: send it as the request body, with the parameters in the query string",
        ));
    }
    match sub.declared_len {
        Some(n) if takes_input && n > m.settings.max_input_bytes => Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "input-too-large",
            format!(
                "the input is {n} bytes, over exec.max_input_bytes ({})",
                m.settings.max_input_bytes
            ),
        )),
        _ => Ok(()),
    }
}

/// Streams the input into the job's directory; a tool without input must
/// get no body (it would be silently lost).
async fn receive_input(
    m: &Manager,
    body: Option<Incoming>,
    dir: &std::path::Path,
    id: &str,
) -> Result<(), Refusal> {
    match body {
        Some(body) if m.settings.template.uses_input() => {
            let input = dir.join("input");
            match write_input(m, body, &input).await? {
                0 => Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "input-required",
                    "the request body is empty; this tool needs an input file as the body",
                )),
                _ => store_input(m, id, &input).await,
            }
        }
        Some(mut body) => match body.frame().await {
            Some(Ok(f)) if f.data_ref().is_some_and(|d| !d.is_empty()) => Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "unexpected-input",
                "this tool takes no input file; send parameters only",
            )),
            _ => Ok(()),
        },
        None => Ok(()),
    }
}

/// With object storage, the input goes to the bucket too, so that any
/// shim can run the job.
async fn store_input(m: &Manager, id: &str, input: &std::path::Path) -> Result<(), Refusal> {
    let Some(storage) = &m.settings.storage else {
        return Ok(());
    };
    storage
        .upload(id, "input", input)
        .await
        .map(|_| ())
        .map_err(|e| {
            Refusal::new(
                StatusCode::BAD_GATEWAY,
                "storage-error",
                format!("{e}; retry later"),
            )
            .retry_after(5)
        })
}

/// Streams the body into `path`, refusing it past the input limit.
async fn write_input(
    m: &Manager,
    mut body: Incoming,
    path: &std::path::Path,
) -> Result<u64, Refusal> {
    let io = |e: std::io::Error| {
        Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "work-dir-error",
            format!("writing the input: {e}"),
        )
    };
    let mut f = tokio::fs::File::create(path).await.map_err(io)?;
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("reading the request body: {e}"),
            )
        })?;
        if let Some(d) = frame.data_ref() {
            n += d.len() as u64;
            if n > m.settings.max_input_bytes {
                return Err(Refusal::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
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
