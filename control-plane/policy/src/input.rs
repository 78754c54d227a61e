//! The input document: plain request facts in, a JSON document out. Pure, so
//! every rule of the shape is tested with tables and no proxy.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value as Json};

use crate::manifest::{InputShape, Manifest};

/// A workload identity as the policy sees it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Workload {
    pub spiffe_id: String,
    pub service: String,
    pub tenant: String,
    pub trust_domain: String,
}

impl From<&crank_certs::Identity> for Workload {
    fn from(id: &crank_certs::Identity) -> Self {
        Workload {
            spiffe_id: id.spiffe_id(),
            service: id.service.clone(),
            tenant: id.tenant.clone(),
            trust_domain: id.trust_domain.clone(),
        }
    }
}

/// What the proxy knows about a request before its body arrives.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestFacts {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The verified peer (inbound) or this workload (outbound).
    pub source: Option<Workload>,
    pub source_address: Option<SocketAddr>,
    /// This workload (inbound) or the route's peer (outbound).
    pub destination: Workload,
    pub capability: Option<String>,
    pub route: Option<String>,
    pub method: String,
    /// Path and query as received.
    pub path_and_query: String,
    pub host: Option<String>,
    pub scheme: String,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: String,
    /// Lower-case names; repeated headers appear repeatedly.
    pub headers: Vec<(String, String)>,
    /// From `Content-Length`; `None` for a streamed body of unknown length.
    pub body_size: Option<u64>,
    pub time: SystemTime,
    /// The decision id, given to the envoy shape as the request id.
    pub id: String,
}

/// Builds the input document for a policy set's manifest.
pub fn build(facts: &RequestFacts, manifest: &Manifest) -> Json {
    match manifest.input {
        InputShape::Crank => crank(facts, &manifest.headers),
        InputShape::Envoy => envoy(facts),
    }
}

fn crank(f: &RequestFacts, wanted: &[String]) -> Json {
    let (path, query) = split_path(&f.path_and_query);
    let all = wanted.iter().any(|h| h == "*");
    let headers = header_map(
        f.headers
            .iter()
            .filter(|(k, _)| all || wanted.iter().any(|w| w.eq_ignore_ascii_case(k))),
    );
    let since = f.time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    json!({
        "source": f.source.as_ref().map(|s| workload(s, f.source_address)),
        "destination": {
            "spiffe_id": f.destination.spiffe_id,
            "service": f.destination.service,
            "tenant": f.destination.tenant,
            "trust_domain": f.destination.trust_domain,
            "capability": f.capability,
            "route": f.route,
            "direction": f.direction,
        },
        "request": {
            "method": f.method,
            "path": path,
            "raw_path": f.path_and_query,
            "parsed_path": parse_path(path),
            "query": parse_query(query),
            "host": f.host,
            "scheme": f.scheme,
            "protocol": f.protocol,
            "headers": headers,
            "body_size": f.body_size,
        },
        "time": {
            "unix_ns": since.as_nanos() as u64,
            "rfc3339": humantime::format_rfc3339_seconds(f.time).to_string(),
        },
    })
}

fn workload(w: &Workload, addr: Option<SocketAddr>) -> Json {
    json!({
        "spiffe_id": w.spiffe_id,
        "service": w.service,
        "tenant": w.tenant,
        "trust_domain": w.trust_domain,
        "address": addr.map(|a| a.to_string()),
    })
}

/// The OPA-Envoy (ext_authz v3) shape, so existing policies run unchanged.
fn envoy(f: &RequestFacts) -> Json {
    let (path, query) = split_path(&f.path_and_query);
    let mut http = Map::new();
    http.insert("id".into(), json!(f.id));
    http.insert("method".into(), json!(f.method));
    http.insert("headers".into(), header_map(f.headers.iter()));
    http.insert("path".into(), json!(f.path_and_query));
    http.insert("host".into(), json!(f.host.clone().unwrap_or_default()));
    http.insert("scheme".into(), json!(f.scheme));
    http.insert("protocol".into(), json!(f.protocol));
    if let Some(size) = f.body_size {
        http.insert("size".into(), json!(size));
    }
    let mut source = Map::new();
    if let Some(addr) = f.source_address {
        source.insert(
            "address".into(),
            json!({"socketAddress": {"address": addr.ip().to_string(), "portValue": addr.port()}}),
        );
    }
    if let Some(s) = &f.source {
        source.insert("principal".into(), json!(s.spiffe_id));
    }
    let mut context = Map::new();
    if let Some(c) = &f.capability {
        context.insert("capability".into(), json!(c));
    }
    if let Some(r) = &f.route {
        context.insert("route".into(), json!(r));
    }
    json!({
        "attributes": {
            "source": source,
            "destination": {"principal": f.destination.spiffe_id},
            "request": {
                "time": humantime::format_rfc3339_nanos(f.time).to_string(),
                "http": http,
            },
            "contextExtensions": context,
        },
        "parsed_path": parse_path(path),
        "parsed_query": parse_query(query),
        "parsed_body": null,
        "truncated_body": false,
        "version": {"encoding": "protojson", "ext_authz": "v3"},
    })
}

/// Headers as one object; repeated headers are joined with ", " (RFC 9110
/// §5.3), as Envoy does.
fn header_map<'a>(headers: impl Iterator<Item = &'a (String, String)>) -> Json {
    let mut map = Map::new();
    for (k, v) in headers {
        let k = k.to_ascii_lowercase();
        match map.get_mut(&k) {
            Some(Json::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(v);
            }
            _ => {
                map.insert(k, json!(v));
            }
        }
    }
    Json::Object(map)
}

pub(crate) fn split_path(raw: &str) -> (&str, &str) {
    match raw.split_once('?') {
        Some((p, q)) => (p, q),
        None => (raw, ""),
    }
}

/// `/v1/jobs/a%20b` → `["v1", "jobs", "a b"]`.
pub fn parse_path(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect()
}

/// `a=1&a=2&b` → `{"a": ["1", "2"], "b": [""]}`.
pub fn parse_query(query: &str) -> Json {
    let mut map: Map<String, Json> = Map::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match map
            .entry(k.into_owned())
            .or_insert_with(|| Json::Array(Vec::new()))
        {
            Json::Array(values) => values.push(json!(v)),
            _ => unreachable!("only arrays are inserted"),
        }
    }
    Json::Object(map)
}

/// The decision log's summary of a request: who, what, which headers (with
/// the configured ones redacted). Never the body.
pub fn summary(facts: &RequestFacts, manifest: &Manifest) -> Json {
    let (path, _) = split_path(&facts.path_and_query);
    let redact = &manifest.decision_log.redact_headers;
    let all = manifest.headers.iter().any(|h| h == "*");
    let shown: Vec<(String, String)> = facts
        .headers
        .iter()
        .filter(|(k, _)| {
            manifest.input == InputShape::Envoy
                || all
                || manifest.headers.iter().any(|w| w.eq_ignore_ascii_case(k))
        })
        .map(|(k, v)| {
            if redact.iter().any(|r| r.eq_ignore_ascii_case(k)) {
                (k.clone(), "[redacted]".to_string())
            } else {
                (k.clone(), v.clone())
            }
        })
        .collect();
    json!({
        "source": facts.source.as_ref().map(|s| s.spiffe_id.clone()),
        "source_address": facts.source_address.map(|a| a.to_string()),
        "destination": facts.destination.spiffe_id,
        "capability": facts.capability,
        "route": facts.route,
        "direction": facts.direction,
        "method": facts.method,
        "path": path,
        "headers": header_map(shown.iter()),
        "body_size": facts.body_size,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn facts() -> RequestFacts {
        RequestFacts {
            direction: "inbound",
            source: Some(Workload {
                spiffe_id: "spiffe://crank.local/tenant/acme/svc/web".into(),
                service: "web".into(),
                tenant: "acme".into(),
                trust_domain: "crank.local".into(),
            }),
            source_address: Some("10.0.0.7:41000".parse().unwrap()),
            destination: Workload {
                spiffe_id: "spiffe://crank.local/tenant/media/svc/transcoder".into(),
                service: "transcoder".into(),
                tenant: "media".into(),
                trust_domain: "crank.local".into(),
            },
            capability: Some("transcode:v1".into()),
            route: None,
            method: "POST".into(),
            path_and_query: "/v1/jobs/a%20b?preset=fast&tag=x&tag=y".into(),
            host: Some("transcoder".into()),
            scheme: "https".into(),
            protocol: "HTTP/2".into(),
            headers: vec![
                ("content-type".into(), "video/mp4".into()),
                ("authorization".into(), "Bearer secret".into()),
                ("x-tag".into(), "a".into()),
                ("x-tag".into(), "b".into()),
            ],
            body_size: Some(1234),
            time: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            id: "d1".into(),
        }
    }

    #[test]
    fn crank_shape() {
        let input = build(&facts(), &Manifest::default());
        assert_eq!(input["source"]["tenant"], "acme");
        assert_eq!(input["source"]["address"], "10.0.0.7:41000");
        assert_eq!(input["destination"]["capability"], "transcode:v1");
        assert_eq!(input["destination"]["service"], "transcoder");
        assert_eq!(input["request"]["path"], "/v1/jobs/a%20b");
        assert_eq!(
            input["request"]["parsed_path"],
            json!(["v1", "jobs", "a b"])
        );
        assert_eq!(
            input["request"]["query"],
            json!({"preset": ["fast"], "tag": ["x", "y"]})
        );
        assert_eq!(input["request"]["body_size"], 1234);
        assert_eq!(input["time"]["rfc3339"], "2023-11-14T22:13:20Z");
        // Only the selected headers: the default list has no authorization.
        assert_eq!(
            input["request"]["headers"],
            json!({"content-type": "video/mp4"})
        );
    }

    #[test]
    fn crank_shape_all_headers_joins_repeats() {
        let m = Manifest {
            headers: vec!["*".into()],
            ..Manifest::default()
        };
        let input = build(&facts(), &m);
        assert_eq!(input["request"]["headers"]["x-tag"], "a, b");
        assert_eq!(
            input["request"]["headers"]["authorization"],
            "Bearer secret"
        );
    }

    #[test]
    fn unauthenticated_source_is_null_and_unknown_size_is_null() {
        let mut f = facts();
        f.source = None;
        f.body_size = None;
        let input = build(&f, &Manifest::default());
        assert!(input["source"].is_null());
        assert!(input["request"]["body_size"].is_null());
    }

    #[test]
    fn envoy_shape_matches_opa_envoy() {
        let m = Manifest {
            input: InputShape::Envoy,
            ..Manifest::default()
        };
        let input = build(&facts(), &m);
        let http = &input["attributes"]["request"]["http"];
        assert_eq!(http["method"], "POST");
        assert_eq!(http["path"], "/v1/jobs/a%20b?preset=fast&tag=x&tag=y");
        assert_eq!(http["headers"]["authorization"], "Bearer secret");
        assert_eq!(http["size"], 1234);
        assert_eq!(
            input["attributes"]["source"]["principal"],
            "spiffe://crank.local/tenant/acme/svc/web"
        );
        assert_eq!(
            input["attributes"]["source"]["address"]["socketAddress"]["portValue"],
            41000
        );
        assert_eq!(input["parsed_path"], json!(["v1", "jobs", "a b"]));
        assert_eq!(input["parsed_query"]["tag"], json!(["x", "y"]));
        assert_eq!(input["version"]["ext_authz"], "v3");
    }

    #[test]
    fn summary_redacts_configured_headers() {
        let m = Manifest {
            headers: vec!["*".into()],
            ..Manifest::default()
        };
        let s = summary(&facts(), &m);
        assert_eq!(s["headers"]["authorization"], "[redacted]");
        assert_eq!(s["headers"]["content-type"], "video/mp4");
        assert_eq!(s["path"], "/v1/jobs/a%20b");
        assert_eq!(s["body_size"], 1234);
    }
}
