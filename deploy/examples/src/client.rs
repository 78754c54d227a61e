//! A one-request HTTP/1.1 `GET` client that goes through `HTTP_PROXY` when set.
//!
//! Through a proxy the client connects to the proxy and sends the request in
//! absolute-form (`GET http://backend/hello HTTP/1.1`, `Host: backend`), as
//! RFC 9112 §3.2.2 asks; directly it connects to the URL's host and sends
//! origin-form (`GET /hello`). [`plan`] makes that choice as a pure function.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy_env::HttpProxy;

/// The whole exchange (connect, request, body) must finish within this.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Response bodies larger than this are refused: the demo shows JSON.
pub const MAX_BODY: usize = 1 << 20;

/// Why a call failed, worded for the person reading the frontend's 502.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{url:?} is not a URL this demo can call: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("could not connect to the proxy {addr} (from HTTP_PROXY): {source}; is the sidecar running and listening there?")]
    ProxyConnect {
        addr: String,
        source: std::io::Error,
    },
    #[error("could not connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("the HTTP/1.1 exchange with {addr} failed: {source}")]
    Http { addr: String, source: hyper::Error },
    #[error("reading the response body from {addr} failed: {reason}")]
    Body { addr: String, reason: String },
    #[error("no complete response from {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
}

/// How to carry out one request: where to connect and what to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub connect_host: String,
    pub connect_port: u16,
    /// The request target: absolute-form through a proxy, origin-form otherwise.
    pub target: Uri,
    /// The `Host` header: the URL's authority.
    pub host_header: String,
    pub via_proxy: bool,
}

impl Plan {
    fn addr(&self) -> String {
        if self.connect_host.contains(':') {
            format!("[{}]:{}", self.connect_host, self.connect_port)
        } else {
            format!("{}:{}", self.connect_host, self.connect_port)
        }
    }
}

/// A response with its body read.
#[derive(Debug)]
pub struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Checks `url` is `http://HOST[:PORT][/PATH]` and returns its host (as the
/// caller would look it up in `NO_PROXY`).
pub fn url_host(url: &Uri) -> Result<&str, CallError> {
    let fail = |reason| CallError::BadUrl {
        url: url.to_string(),
        reason,
    };
    if url.scheme_str() != Some("http") {
        return Err(fail(
            "only http:// URLs are supported (the sidecar adds TLS)",
        ));
    }
    let authority = url.authority().ok_or_else(|| fail("it has no host"))?;
    if authority.as_str().contains('@') {
        return Err(fail("credentials in the URL are not supported"));
    }
    Ok(authority.host())
}

/// Decides where to connect and what request line and `Host` to send.
pub fn plan(url: &Uri, proxy: Option<&HttpProxy>) -> Result<Plan, CallError> {
    let host = url_host(url)?;
    let authority = url.authority().expect("url_host checked it");
    let origin_form = url.path_and_query().map_or("/", |pq| pq.as_str());
    let plan = match proxy {
        Some(p) => Plan {
            connect_host: p.host.clone(),
            connect_port: p.port,
            target: url.clone(),
            host_header: authority.to_string(),
            via_proxy: true,
        },
        None => Plan {
            connect_host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            connect_port: authority.port_u16().unwrap_or(80),
            target: origin_form
                .parse()
                .expect("a URL's path and query is a valid origin-form"),
            host_header: authority.to_string(),
            via_proxy: false,
        },
    };
    Ok(plan)
}

/// Sends `GET url` (through `proxy` when given) and reads the response.
pub async fn get(url: &Uri, proxy: Option<&HttpProxy>) -> Result<Fetched, CallError> {
    let plan = plan(url, proxy)?;
    let addr = plan.addr();
    tokio::time::timeout(CALL_TIMEOUT, exchange(&plan))
        .await
        .unwrap_or(Err(CallError::Timeout {
            addr,
            timeout: CALL_TIMEOUT,
        }))
}

async fn exchange(plan: &Plan) -> Result<Fetched, CallError> {
    let addr = plan.addr();
    let stream = TcpStream::connect((plan.connect_host.as_str(), plan.connect_port))
        .await
        .map_err(|source| match plan.via_proxy {
            true => CallError::ProxyConnect {
                addr: addr.clone(),
                source,
            },
            false => CallError::Connect {
                addr: addr.clone(),
                source,
            },
        })?;
    let http_err = |source| CallError::Http {
        addr: addr.clone(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    tokio::spawn(conn);
    let request = Request::get(plan.target.clone())
        .header(header::HOST, &plan.host_header)
        .header(header::USER_AGENT, "crank-demo-frontend")
        .body(Empty::<Bytes>::new())
        .expect("the target and Host come from a parsed URL");
    let response = sender.send_request(request).await.map_err(http_err)?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| CallError::Body {
            addr: addr.clone(),
            reason: e.to_string(),
        })?
        .to_bytes();
    Ok(Fetched {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy() -> HttpProxy {
        HttpProxy {
            url: "http://127.0.0.1:4140".into(),
            host: "127.0.0.1".into(),
            port: 4140,
        }
    }

    #[test]
    fn plans() {
        // (url, through the proxy?, connect to, request target, Host)
        let cases = [
            (
                "http://backend/hello",
                false,
                "backend:80",
                "/hello",
                "backend",
            ),
            ("http://backend", false, "backend:80", "/", "backend"),
            (
                "http://backend:8080/a?b=c",
                false,
                "backend:8080",
                "/a?b=c",
                "backend:8080",
            ),
            ("http://[::1]:8080/", false, "[::1]:8080", "/", "[::1]:8080"),
            (
                "http://backend/hello",
                true,
                "127.0.0.1:4140",
                "http://backend/hello",
                "backend",
            ),
            (
                "http://backend:8080/a?b=c",
                true,
                "127.0.0.1:4140",
                "http://backend:8080/a?b=c",
                "backend:8080",
            ),
        ];
        for (url, via, connect, target, host) in cases {
            let url: Uri = url.parse().unwrap();
            let p = proxy();
            let plan = plan(&url, via.then_some(&p)).unwrap();
            assert_eq!(plan.addr(), connect, "{url}");
            assert_eq!(plan.target.to_string(), target, "{url}");
            assert_eq!(plan.host_header, host, "{url}");
            assert_eq!(plan.via_proxy, via, "{url}");
        }
    }

    #[test]
    fn urls_the_demo_cannot_call() {
        for url in [
            "https://backend/",
            "/hello",
            "backend:80",
            "http://u:p@backend/",
        ] {
            let url: Uri = url.parse().unwrap();
            let err = plan(&url, None).unwrap_err();
            assert!(matches!(err, CallError::BadUrl { .. }), "{url}: {err}");
        }
    }
}
