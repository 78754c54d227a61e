//! The HTTP pieces every crank-control handler shares: JSON answers, the
//! request body reader, instance and long-poll query parsing, and the one
//! place a [`Refusal`] becomes a response. Every refusal is the mesh's one
//! error body (`crank_plumbing::Refusal`: `{"error": code, "message": ...}`
//! with `x-crank-error: code`), counted in
//! `crank_ca_requests_refused_total{reason}` and logged.
//!
//! The handlers live by concern: [`super::workload`] (the workload API over
//! TLS), [`super::ca_admin`] (the admin API), [`super::mesh`] and
//! [`super::traffic`]; the accept loops are [`super::listeners`].

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;

use super::state::Refusal;
use super::Control;

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

pub(super) fn refusal(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
    }
}

impl Control {
    /// The answer to every refused request: counted, logged, and written in
    /// the mesh's one error body.
    pub(super) fn refused(&self, r: Refusal, what: &str) -> Resp {
        self.metrics.refused.with_label_values(&[r.code]).inc();
        tracing::warn!(request = what, reason = r.code, message = %r.message, "refused");
        refusal_response(r)
    }
}

/// A refusal in the mesh's one error body: `{"error", "message"}` on one
/// line, `content-type: application/json`, `x-crank-error: <code>`.
fn refusal_response(r: Refusal) -> Resp {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    crank_plumbing::Refusal::new(status, r.code, r.message).response()
}

pub(super) async fn body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, Refusal> {
    json_body(req, MAX_BODY, "body").await
}

/// Reads a JSON body of at most `limit` bytes into `T`; `what` names it in
/// the refusal (`the report is not …`).
pub(super) async fn json_body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
    what: &str,
) -> Result<T, Refusal> {
    let bytes = Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|e| {
            refusal(
                400,
                "bad-request",
                format!(
                    "cannot read the {what} ({e}); it must be JSON under {} KiB",
                    limit / 1024
                ),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        refusal(
            400,
            "bad-request",
            format!("the {what} is not the expected JSON: {e}"),
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

/// The query of a long poll: the caller's instance, the versions it has,
/// and how long to wait (seconds, at most 60). Read in place from the
/// request's query (a watch asks on every call; nothing is copied but
/// the instance).
pub(super) struct PollQuery<'a> {
    pub instance: String,
    query: &'a str,
}

impl<'a> PollQuery<'a> {
    pub(super) fn parse<B>(req: &'a Request<B>) -> Result<PollQuery<'a>, Refusal> {
        let query = req.uri().query().unwrap_or("");
        let instance = value(query, "instance").unwrap_or("");
        check_instance(instance)?;
        Ok(PollQuery {
            instance: instance.to_string(),
            query,
        })
    }

    /// A number from the query; 0 when absent or not a number.
    pub(super) fn num(&self, key: &str) -> u64 {
        self.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    /// A key's value as sent (the last one when repeated).
    pub(super) fn get(&self, key: &str) -> Option<&'a str> {
        value(self.query, key)
    }

    pub(super) fn wait(&self) -> Duration {
        Duration::from_secs(self.num("wait").min(60))
    }
}

/// `key`'s value in a query string `a=1&b=2` (the last one when repeated).
fn value<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query
        .rsplit('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refusal_is_the_one_error_body_with_its_reason_header() {
        let resp = refusal_response(refusal(
            403,
            "token-reused",
            "this join token was already used; make a new one with `crankctl token create`",
        ));
        assert_eq!(resp.status(), 403);
        assert_eq!(resp.headers()["x-crank-error"], "token-reused");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = std::str::from_utf8(&body).unwrap();
        assert!(text.ends_with("}\n") && text.lines().count() == 1, "{text}");
        let e: crank_api::identity::ApiError = serde_json::from_str(text).unwrap();
        assert_eq!(e.error, "token-reused");
        assert!(e.message.contains("crankctl token create"));
        // A code outside HTTP's range cannot happen, but would not panic.
        assert_eq!(refusal_response(refusal(1000, "x", "y")).status(), 500);
    }

    #[test]
    fn a_poll_query_reads_instance_versions_and_wait() {
        let req = |q: &str| {
            Request::get(format!("/v1/mesh/watch?{q}"))
                .body(())
                .unwrap()
        };
        let r = req("instance=w1&seq=7&registry=x&wait=300&seq=8");
        let q = PollQuery::parse(&r).unwrap();
        assert_eq!(q.instance, "w1");
        assert_eq!(q.num("seq"), 8, "the last of a repeated key");
        assert_eq!(q.num("registry"), 0, "not a number");
        assert_eq!(q.num("bundle"), 0, "absent");
        assert_eq!(q.wait(), Duration::from_secs(60), "at most 60 s");
        assert_eq!(q.get("registry"), Some("x"));
        for bad in ["seq=1", "instance=&seq=1", "instance=a%20b", "instance"] {
            let e = PollQuery::parse(&req(bad)).err().expect(bad);
            assert_eq!((e.status, e.code), (400, "bad-request"), "{bad}");
        }
    }

    #[test]
    fn crankctl_reads_the_shims_old_detail_as_message() {
        let e: crank_api::identity::ApiError =
            serde_json::from_str(r#"{"error":"queue-full","detail":"busy"}"#).unwrap();
        assert_eq!(e.message, "busy");
    }
}
