//! The admin listener: `/live`, `/ready`, `/metrics`, `/config_dump`.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;

use crate::state::Shared;

pub struct Admin {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let s = &self.shared;
        let (status, ctype, body): (u16, &str, Vec<u8>) = match path.as_str() {
            "/live" => (200, "text/plain", b"live\n".to_vec()),
            "/ready" => {
                if s.health.is_ready() {
                    (200, "text/plain", b"ready\n".to_vec())
                } else if s.health.is_draining() {
                    (503, "text/plain", b"not ready: draining\n".to_vec())
                } else {
                    (503, "text/plain", b"not ready: starting\n".to_vec())
                }
            }
            "/metrics" => (200, "text/plain; version=0.0.4", s.metrics.render()),
            "/config_dump" => (200, "application/json", s.config_dump()),
            _ => (
                404,
                "text/plain",
                b"unknown admin path; try /live, /ready, /metrics or /config_dump\n".to_vec(),
            ),
        };
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .header("content-length", body.len())
            .body(body)
            .expect("static response parts")
    }
}
