//! The web dashboard on `dashboard_listen`: plain HTTP/1, read-only. It
//! serves the page (`index.html`, `app.js`, `style.css`, `favicon.svg`, embedded in the
//! binary from `control-plane/dashboard/`, so nothing is read at runtime and
//! nothing is fetched from the internet) and `GET /api/state`, the JSON of
//! [`super::Control::dashboard_state`], which the page polls every 2 s.
//!
//! Every answer carries a Content-Security-Policy that allows only this
//! origin (no inline script, no external anything) and `nosniff`; the state
//! is `no-store`. It has no authentication: bind it to loopback or a network
//! you trust (docs/reference/control-config.md). On a connection to a
//! loopback address (a loopback listener, or `0.0.0.0` reached through
//! loopback) it answers only requests whose `Host` is loopback too, so that
//! a web page elsewhere cannot read it through DNS rebinding.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;

use super::http::Resp;

const INDEX_HTML: &str = include_str!("../../dashboard/index.html");
const APP_JS: &str = include_str!("../../dashboard/app.js");
const STYLE_CSS: &str = include_str!("../../dashboard/style.css");
const FAVICON_SVG: &str = include_str!("../../dashboard/favicon.svg");

/// Only this origin, for everything; no plugins, no framing, no forms.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// At most this many connections at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 64;

/// What the dashboard serves at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asset {
    Page,
    Script,
    Style,
    Icon,
    State,
}

/// The asset at `path`, if any.
pub fn asset(path: &str) -> Option<Asset> {
    match path {
        "/" | "/index.html" => Some(Asset::Page),
        "/app.js" => Some(Asset::Script),
        "/style.css" => Some(Asset::Style),
        "/favicon.svg" => Some(Asset::Icon),
        "/api/state" => Some(Asset::State),
        _ => None,
    }
}

fn base(status: StatusCode) -> http::response::Builder {
    Response::builder()
        .status(status)
        .header("content-security-policy", CSP)
        .header("x-content-type-options", "nosniff")
        .header("x-frame-options", "DENY")
        .header("referrer-policy", "no-referrer")
}

fn text(status: StatusCode, body: &'static str) -> Resp {
    base(status)
        .header("content-type", "text/plain; charset=utf-8")
        .header("cache-control", "no-store")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("a valid response")
}

fn file(content_type: &str, body: &'static str) -> Resp {
    base(StatusCode::OK)
        .header("content-type", content_type)
        // Embedded in the binary: revalidate, so an upgrade shows at once.
        .header("cache-control", "no-cache")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("a valid response")
}

/// The answer to `method path`; `state` makes the JSON of the dashboard
/// state and is called only for `/api/state`.
pub fn respond(
    method: &Method,
    path: &str,
    state: impl FnOnce() -> serde_json::Result<Vec<u8>>,
) -> Resp {
    let Some(asset) = asset(path) else {
        return text(
            StatusCode::NOT_FOUND,
            "not found: the dashboard serves /, /app.js, /style.css, /favicon.svg and /api/state\n",
        );
    };
    if method != Method::GET && method != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "the dashboard is read-only: use GET\n",
        );
        r.headers_mut()
            .insert("allow", http::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match asset {
        Asset::Page => file("text/html; charset=utf-8", INDEX_HTML),
        Asset::Script => file("text/javascript; charset=utf-8", APP_JS),
        Asset::Style => file("text/css; charset=utf-8", STYLE_CSS),
        Asset::Icon => file("image/svg+xml", FAVICON_SVG),
        Asset::State => match state() {
            Ok(body) => base(StatusCode::OK)
                .header("content-type", "application/json")
                .header("cache-control", "no-store")
                .body(Full::new(Bytes::from(body)))
                .expect("a valid response"),
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize the dashboard state");
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot serialize the dashboard state; see crank-control's log\n",
                )
            }
        },
    }
}

/// Whether a request with `host` (the `Host` header's bytes) may be
/// answered on a connection to `local` (its local address). On loopback
/// only loopback names: `localhost`, `*.localhost`, `127.0.0.0/8`, `[::1]`
/// (a DNS-rebinding page has its own name there), and never a Host that
/// is not UTF-8. Elsewhere any: the operator chose who can reach it.
pub fn host_allowed(local: std::net::SocketAddr, host: Option<&[u8]>) -> bool {
    if !local.ip().to_canonical().is_loopback() {
        return true;
    }
    let Some(host) = host else {
        // Browsers always send Host; a client without one is no web page.
        return true;
    };
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((ip, _)) => ip,
            None => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    let name = name.to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn misdirected() -> Resp {
    text(
        StatusCode::MISDIRECTED_REQUEST,
        "this dashboard listens on loopback and answers only requests for a loopback name: \
         open it as http://127.0.0.1:PORT/ or http://localhost:PORT/\n",
    )
}

/// Serves the dashboard on `listener` until `stop` resolves, at most
/// [`MAX_CONNECTIONS`] at once. `state` makes the JSON of `/api/state`.
pub async fn serve_dashboard<F>(
    listener: tokio::net::TcpListener,
    state: F,
    stop: impl std::future::Future<Output = ()>,
) where
    F: Fn() -> serde_json::Result<Vec<u8>> + Send + Sync + 'static,
{
    let state = Arc::new(state);
    let opts = crank_plumbing::ServeOptions::new("dashboard").max_connections(MAX_CONNECTIONS);
    crank_plumbing::serve_with(opts, listener, stop, |tcp, _| {
        dashboard_conn(state.clone(), tcp)
    })
    .await
}

/// One dashboard connection, with the loopback Host rule of its local
/// address: a 0.0.0.0 listener reached through loopback is as open to DNS
/// rebinding as a loopback one.
async fn dashboard_conn<F>(state: Arc<F>, tcp: tokio::net::TcpStream)
where
    F: Fn() -> serde_json::Result<Vec<u8>> + Send + Sync + 'static,
{
    let Ok(local) = tcp.local_addr() else {
        return;
    };
    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let host = req.headers().get(http::header::HOST);
        let resp = if host_allowed(local, host.map(|h| h.as_bytes())) {
            respond(req.method(), req.uri().path(), || state())
        } else {
            misdirected()
        };
        async move { Ok::<_, std::convert::Infallible>(resp) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> serde_json::Result<Vec<u8>> {
        Ok(br#"{"workloads":[]}"#.to_vec())
    }

    #[test]
    fn answers_by_method_and_path() {
        const TEXT: &str = "text/plain; charset=utf-8";
        let cases = [
            (Method::GET, "/", 200, "text/html; charset=utf-8"),
            (Method::GET, "/index.html", 200, "text/html; charset=utf-8"),
            (
                Method::HEAD,
                "/app.js",
                200,
                "text/javascript; charset=utf-8",
            ),
            (Method::GET, "/style.css", 200, "text/css; charset=utf-8"),
            (Method::GET, "/favicon.svg", 200, "image/svg+xml"),
            (Method::GET, "/favicon.ico", 404, TEXT),
            (Method::GET, "/api/state", 200, "application/json"),
            (Method::POST, "/api/state", 405, TEXT),
            (Method::DELETE, "/", 405, TEXT),
            (Method::GET, "/api/other", 404, TEXT),
            (Method::GET, "/../Cargo.toml", 404, TEXT),
            (Method::POST, "/nope", 404, TEXT),
        ];
        for (method, path, status, ctype) in cases {
            let r = respond(&method, path, fixture);
            assert_eq!(r.status().as_u16(), status, "{method} {path}");
            assert_eq!(r.headers()["content-type"], ctype, "{method} {path}");
            assert_eq!(r.headers()["content-security-policy"], CSP);
            assert_eq!(r.headers()["x-content-type-options"], "nosniff");
            if status == 405 {
                assert_eq!(r.headers()["allow"], "GET, HEAD");
            }
        }
    }

    #[test]
    fn on_loopback_only_loopback_hosts_are_answered() {
        let lo: std::net::SocketAddr = "127.0.0.1:9480".parse().unwrap();
        let cases = [
            (Some("127.0.0.1:9480"), true),
            (Some("127.0.0.2"), true),
            (Some("localhost:9480"), true),
            (Some("LOCALHOST"), true),
            (Some("dash.localhost:9480"), true),
            (Some("[::1]:9480"), true),
            (None, true),
            (Some("attacker.example:9480"), false),
            (Some("127.0.0.1.attacker.example"), false),
            (Some("10.0.0.7:9480"), false),
            (Some("[::1"), false),
            (Some(""), false),
        ];
        // A connection to a 0.0.0.0 or [::] listener through loopback has a
        // loopback local address (IPv4-mapped on a dual-stack socket).
        let any_via_lo = [
            lo,
            "[::1]:9480".parse().unwrap(),
            "[::ffff:127.0.0.1]:9480".parse().unwrap(),
        ];
        for local in any_via_lo {
            for (host, ok) in cases {
                assert_eq!(
                    host_allowed(local, host.map(str::as_bytes)),
                    ok,
                    "{local} {host:?}"
                );
            }
            assert!(
                !host_allowed(local, Some(b"localhost\xff")),
                "a Host that is not UTF-8"
            );
        }
        let public: std::net::SocketAddr = "10.0.0.7:9480".parse().unwrap();
        assert!(host_allowed(public, Some(b"dashboard.example")));
        assert_eq!(misdirected().status(), StatusCode::MISDIRECTED_REQUEST);
    }

    #[test]
    fn the_state_is_never_cached_and_failures_are_500() {
        let r = respond(&Method::GET, "/api/state", fixture);
        assert_eq!(r.headers()["cache-control"], "no-store");
        let broken = || Err(serde_json::from_str::<u8>("x").unwrap_err());
        let r = respond(&Method::GET, "/api/state", broken);
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn the_page_loads_only_its_own_assets() {
        assert!(CSP.contains("script-src 'self'") && !CSP.contains("unsafe"));
        for tag in [
            "<script src=\"app.js\"",
            "href=\"style.css\"",
            "href=\"favicon.svg\"",
        ] {
            assert!(INDEX_HTML.contains(tag), "index.html lacks {tag}");
        }
        // Nothing from elsewhere: the only absolute URL is the SVG namespace.
        for page in [INDEX_HTML, STYLE_CSS] {
            assert!(!page.contains("//"), "an absolute URL in the page or CSS");
        }
        let js = APP_JS.replace("\"http://www.w3.org/2000/svg\"", "");
        assert!(!js.contains("http://") && !js.contains("https://"));
        assert!(!APP_JS.contains("innerHTML") && !APP_JS.contains("eval("));
        assert!(!INDEX_HTML.contains("<script>") && !INDEX_HTML.contains("style="));
    }
}
