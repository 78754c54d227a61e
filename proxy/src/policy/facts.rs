//! The facts the policy input is built from: who calls whom for which
//! capability, and what the request head says (only the headers the input
//! or the decision log can show are copied).

use std::net::SocketAddr;

use crank_policy::{InputShape, Manifest, RequestFacts, Workload};
use pingora_http::RequestHeader;

use crate::direction::Direction;
use crate::routing::authority::{request_authority, split_absolute};

/// Who a request is between, as the earlier stages established it.
pub struct Parties {
    pub source: Option<Workload>,
    pub destination: Workload,
    pub capability: Option<String>,
    pub route: Option<String>,
}

/// The facts for one request under `manifest`.
pub fn request_facts(
    direction: Direction,
    req: &RequestHeader,
    client: Option<SocketAddr>,
    parties: Parties,
    manifest: &Manifest,
) -> RequestFacts {
    let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
    RequestFacts {
        direction: direction.as_str(),
        source: parties.source,
        source_address: client,
        destination: parties.destination,
        capability: parties.capability,
        route: parties.route,
        method: req.method.as_str().to_string(),
        path_and_query: path_and_query(req),
        host: request_authority(req),
        scheme: match direction {
            Direction::Inbound => "https".into(),
            Direction::Outbound => "http".into(),
        },
        protocol: match req.version {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        }
        .into(),
        headers: shown_headers(req, manifest),
        body_size: header("content-length").and_then(|v| v.trim().parse().ok()),
        time: std::time::SystemTime::now(),
        id: super::new_decision_id(),
    }
}

/// The target as origin-form path and query.
fn path_and_query(req: &RequestHeader) -> String {
    match split_absolute(req.raw_path()) {
        Some((_, _, pq)) if pq.starts_with('/') => pq.to_string(),
        Some((_, _, pq)) => format!("/{pq}"),
        None => String::from_utf8_lossy(req.raw_path()).into_owned(),
    }
}

/// Copies only the headers the input or the decision log can show.
fn shown_headers(req: &RequestHeader, manifest: &Manifest) -> Vec<(String, String)> {
    let all = manifest.input == InputShape::Envoy || manifest.headers.iter().any(|h| h == "*");
    req.headers
        .iter()
        .filter(|(k, _)| {
            all || manifest
                .headers
                .iter()
                .any(|w| w.eq_ignore_ascii_case(k.as_str()))
        })
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}
