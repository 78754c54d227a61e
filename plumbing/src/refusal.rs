//! The one error body of every response the mesh makes on its own (the
//! proxy's refusals, the control plane's API errors, the shim's answers):
//!
//! ```text
//! HTTP/1.1 503 Service Unavailable
//! content-type: application/json
//! x-crank-error: queue-full
//! retry-after: 1
//!
//! {"error":"queue-full","message":"what happened and what to do", ...extra}
//! ```
//!
//! `error` is a stable reason (the same as the `x-crank-error` header);
//! `message` is for people. `extra` carries fields a refusal adds next to
//! them (the policy 403's `decision_id`, `trace_id`, …). The body is one
//! line of JSON ending in a newline; `error` and `message` come first.

use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use serde_json::{Map, Value};

use crate::headers::X_CRANK_ERROR;

/// A response the mesh makes on its own instead of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: StatusCode,
    /// Stable, kebab-case: `no-route`, `token-reused`, `queue-full`.
    pub reason: &'static str,
    /// What happened and what to do.
    pub message: String,
    /// Seconds, sent as `retry-after`.
    pub retry_after: Option<u64>,
    /// More fields of the body, after `error` and `message`.
    pub extra: Map<String, Value>,
}

impl Refusal {
    pub fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            reason,
            message: message.into(),
            retry_after: None,
            extra: Map::new(),
        }
    }

    /// Sends `retry-after: secs`.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// Adds a field to the body (`error` and `message` cannot be replaced).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }

    /// `{"error":…,"message":…,…extra}` and a newline.
    pub fn body(&self) -> Vec<u8> {
        let mut out = Map::new();
        out.insert("error".into(), Value::from(self.reason));
        out.insert("message".into(), Value::from(self.message.as_str()));
        let mut body = Value::Object(out).to_string();
        body.pop(); // the closing brace; the extras follow in the map's order
        for (k, v) in self.extra.iter().filter(|(k, _)| !is_core(k)) {
            body.push(',');
            body.push_str(&Value::from(k.as_str()).to_string());
            body.push(':');
            body.push_str(&v.to_string());
        }
        body.push_str("}\n");
        body.into_bytes()
    }

    /// `content-type`, `x-crank-error` and, when set, `retry-after`.
    pub fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        let mut h = vec![
            (CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (
                HeaderName::from_static(X_CRANK_ERROR),
                HeaderValue::from_static(self.reason),
            ),
        ];
        if let Some(secs) = self.retry_after {
            h.push((RETRY_AFTER, HeaderValue::from(secs)));
        }
        h
    }

    /// The whole response, for servers built on `http` types.
    pub fn response<B: From<Vec<u8>>>(&self) -> Response<B> {
        let mut resp = Response::new(B::from(self.body()));
        *resp.status_mut() = self.status;
        resp.headers_mut().extend(self.headers());
        resp
    }
}

fn is_core(key: &str) -> bool {
    key == "error" || key == "message"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_error_message_then_extras_on_one_line() {
        let cases = [
            (
                Refusal::new(StatusCode::NOT_FOUND, "not-found", "no such API: /x"),
                "{\"error\":\"not-found\",\"message\":\"no such API: /x\"}\n",
            ),
            (
                Refusal::new(StatusCode::FORBIDDEN, "policy-denied", "say \"why\"")
                    .with("decision_id", "d1")
                    .with("trace_id", "t1")
                    .with("error", "ignored"),
                "{\"error\":\"policy-denied\",\"message\":\"say \\\"why\\\"\",\"decision_id\":\"d1\",\"trace_id\":\"t1\"}\n",
            ),
        ];
        for (r, want) in cases {
            let body = r.body();
            assert_eq!(String::from_utf8(body.clone()).unwrap(), want);
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"], r.reason);
            assert_eq!(v["message"], r.message.as_str());
        }
    }

    #[test]
    fn response_carries_status_type_reason_and_retry_after() {
        let r = Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "queue-full", "busy; retry")
            .retry_after(1);
        let resp: Response<Vec<u8>> = r.response();
        assert_eq!(resp.status(), 503);
        let h = resp.headers();
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["x-crank-error"], "queue-full");
        assert_eq!(h["retry-after"], "1");
        assert_eq!(resp.body(), &r.body());
        let plain = Refusal::new(StatusCode::BAD_REQUEST, "bad-request", "x");
        assert!(plain.headers().iter().all(|(k, _)| k != RETRY_AFTER));
    }
}
