//! The demo frontend: `GET /` calls the backend and shows what came back.
//!
//! The call goes through `HTTP_PROXY` when it is set, exactly as an unmodified
//! app would use its sidecar. The answer is JSON: who called what, through
//! which proxy, the backend's status and the backend's own JSON. A failed call
//! is a 502 whose `error` says what went wrong.

use std::future::Future;
use std::sync::Arc;

use http::{Method, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::client::{self, CallError, Fetched};
use crate::proxy_env::ProxyEnv;
use crate::server::{self, Body};

/// A frontend's settings.
#[derive(Debug, Clone)]
pub struct Frontend {
    /// Shown as `service` in every answer.
    pub name: String,
    /// What `GET /` calls.
    pub backend_url: Uri,
    /// `HTTP_PROXY` / `NO_PROXY`, read once at start.
    pub proxy_env: ProxyEnv,
}

impl Frontend {
    /// Checks `backend_url` is an `http://` URL this frontend can call.
    pub fn new(name: String, backend_url: &str, proxy_env: ProxyEnv) -> Result<Self, CallError> {
        let bad = |reason| CallError::BadUrl {
            url: backend_url.to_string(),
            reason,
        };
        let backend_url: Uri = backend_url.parse().map_err(|_| bad("it does not parse"))?;
        client::url_host(&backend_url)?;
        Ok(Self {
            name,
            backend_url,
            proxy_env,
        })
    }

    /// The `HTTP_PROXY` value the backend call goes through, if any.
    pub fn via_proxy(&self) -> Option<&str> {
        let host = client::url_host(&self.backend_url).expect("checked in Frontend::new");
        self.proxy_env.proxy_for(host).map(|p| p.url.as_str())
    }
}

/// Serves the frontend on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    frontend: Frontend,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let frontend = Arc::new(frontend);
    let handler = move |req| handle(frontend.clone(), req);
    server::serve(listener, handler, shutdown).await
}

async fn handle(frontend: Arc<Frontend>, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (_, "/healthz") => server::text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/") => call_backend(&frontend).await,
        _ => server::json(
            StatusCode::NOT_FOUND,
            &json!({ "error": "this demo frontend answers GET / (which calls the backend) and GET /healthz" }),
        ),
    }
}

async fn call_backend(frontend: &Frontend) -> Response<Body> {
    let host = client::url_host(&frontend.backend_url).expect("checked in Frontend::new");
    let proxy = frontend.proxy_env.proxy_for(host);
    let result = client::get(&frontend.backend_url, proxy).await;
    let (status, answer) = answer(frontend, result);
    eprintln!(
        "GET / -> {} via {}: {}",
        answer.called,
        answer.via_proxy.as_deref().unwrap_or("direct"),
        answer.error.as_deref().unwrap_or("ok"),
    );
    server::json(status, &answer)
}

/// What `GET /` answers, in this field order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Answer {
    /// This frontend's `--name`.
    pub service: String,
    /// The `--backend-url` it called.
    pub called: String,
    /// The `HTTP_PROXY` the call went through; `null` when it went direct.
    pub via_proxy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_status: Option<u16>,
    /// The backend's JSON, or its body as a string when it is not JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_response: Option<Value>,
    /// The `x-crank-error` reason a sidecar gave, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_crank_error: Option<String>,
    /// What went wrong, when the frontend answers 502.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The frontend's status and answer for the outcome of a backend call: 200
/// when the backend answered 2xx, 502 with an `error` otherwise.
pub fn answer(frontend: &Frontend, result: Result<Fetched, CallError>) -> (StatusCode, Answer) {
    let mut answer = Answer {
        service: frontend.name.clone(),
        called: frontend.backend_url.to_string(),
        via_proxy: frontend.via_proxy().map(str::to_string),
        backend_status: None,
        backend_response: None,
        x_crank_error: None,
        error: None,
    };
    let fetched = match result {
        Ok(fetched) => fetched,
        Err(e) => {
            answer.error = Some(e.to_string());
            return (StatusCode::BAD_GATEWAY, answer);
        }
    };
    let lossy = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    answer.backend_status = Some(fetched.status.as_u16());
    answer.backend_response =
        Some(serde_json::from_slice(&fetched.body).unwrap_or_else(|_| lossy(&fetched.body).into()));
    // A sidecar that refuses a call says why in this header.
    answer.x_crank_error = fetched
        .headers
        .get("x-crank-error")
        .map(|v| lossy(v.as_bytes()));
    if fetched.status.is_success() {
        (StatusCode::OK, answer)
    } else {
        answer.error = Some(format!("the backend call answered {}", fetched.status));
        (StatusCode::BAD_GATEWAY, answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::HeaderMap;

    fn frontend() -> Frontend {
        Frontend::new(
            "frontend".into(),
            "http://backend/hello",
            ProxyEnv::default(),
        )
        .unwrap()
    }

    fn fetched(status: u16, body: &'static str, crank_error: Option<&'static str>) -> Fetched {
        let mut headers = HeaderMap::new();
        if let Some(e) = crank_error {
            headers.insert("x-crank-error", e.parse().unwrap());
        }
        Fetched {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[test]
    fn answers() {
        let f = frontend();
        let (status, a) = answer(&f, Ok(fetched(200, r#"{"service":"backend"}"#, None)));
        assert_eq!(status, StatusCode::OK);
        assert_eq!(a.backend_response.unwrap()["service"], "backend");
        assert_eq!(
            (a.backend_status, a.via_proxy, a.error),
            (Some(200), None, None)
        );

        let (status, a) = answer(
            &f,
            Ok(fetched(503, "no healthy endpoint", Some("no_endpoint"))),
        );
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(a.backend_response, Some("no healthy endpoint".into()));
        assert_eq!(a.x_crank_error.as_deref(), Some("no_endpoint"));
        assert!(a.error.unwrap().contains("503"));

        let refused = CallError::ProxyConnect {
            addr: "127.0.0.1:1".into(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        let (status, a) = answer(&f, Err(refused));
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(a.error.unwrap().contains("is the sidecar running"));
        assert_eq!(a.backend_status, None);
    }

    #[test]
    fn answer_fields_keep_their_order_and_null_via_proxy() {
        let (_, a) = answer(&frontend(), Ok(fetched(200, "{}", None)));
        let text = serde_json::to_string(&a).unwrap();
        assert!(text.starts_with(r#"{"service":"frontend","called":"http://backend/hello","via_proxy":null,"backend_status":200"#), "{text}");
    }

    #[test]
    fn bad_backend_urls_are_refused_at_start() {
        for url in ["https://backend/", "backend", "http://"] {
            assert!(
                Frontend::new("f".into(), url, ProxyEnv::default()).is_err(),
                "{url}"
            );
        }
    }
}
