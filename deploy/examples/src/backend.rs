//! The demo backend: every request gets back a JSON description of itself.
//!
//! `GET /healthz` answers `200 ok`. Any other request gets an [`Echo`]: the
//! method, the request target, the HTTP version and every header exactly as
//! they arrived, and the body size, counted frame by frame so a large upload is
//! never held in memory.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::server::{self, Body};

/// What the backend saw, as it answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Echo {
    /// The `--name` this backend was started with.
    pub service: String,
    pub method: String,
    /// The request target as received: origin-form (`/hello?x=1`) from a
    /// normal client, absolute-form (`http://backend/hello`) when a client
    /// talks to it as if it were a proxy, and the full URI over HTTP/2.
    pub uri: String,
    /// The path alone, without the query.
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2.0` (also `HTTP/1.0`).
    pub version: String,
    /// Header names (lowercase) to values; repeated headers are joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// The request body's size in bytes.
    pub body_bytes: u64,
}

/// Serves the backend on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    name: String,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let name: Arc<str> = name.into();
    let handler = move |req| handle(name.clone(), req);
    server::serve(listener, handler, shutdown).await
}

async fn handle(name: Arc<str>, req: Request<Incoming>) -> Response<Body> {
    if req.uri().path() == "/healthz" {
        return server::text(StatusCode::OK, "ok\n");
    }
    let (parts, body) = req.into_parts();
    let body_bytes = match count_body(body).await {
        Ok(n) => n,
        Err(e) => {
            let msg = format!("reading the request body failed: {e}");
            return server::json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "error": msg }),
            );
        }
    };
    let echo = Echo {
        service: name.to_string(),
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        path: parts.uri.path().to_string(),
        version: format!("{:?}", parts.version),
        headers: headers_to_map(&parts.headers),
        body_bytes,
    };
    server::json(StatusCode::OK, &echo)
}

/// Reads the body to its end, keeping only a running count of data bytes.
async fn count_body(mut body: Incoming) -> Result<u64, hyper::Error> {
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            total += data.len() as u64;
        }
    }
    Ok(total)
}

/// Header names to values; repeats are joined with `, ` and bytes that are not
/// UTF-8 are shown as U+FFFD.
pub fn headers_to_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut map = BTreeMap::<String, String>::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str().to_string())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_headers_are_joined_in_order() {
        let mut h = HeaderMap::new();
        h.append("x-a", "1".parse().unwrap());
        h.append("x-a", "2".parse().unwrap());
        h.append("host", "backend".parse().unwrap());
        let map = headers_to_map(&h);
        assert_eq!(map["x-a"], "1, 2");
        assert_eq!(map["host"], "backend");
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn non_utf8_header_bytes_are_replaced_not_dropped() {
        let mut h = HeaderMap::new();
        h.insert("x-bin", http::HeaderValue::from_bytes(b"a\xffb").unwrap());
        assert_eq!(headers_to_map(&h)["x-bin"], "a\u{fffd}b");
    }
}
