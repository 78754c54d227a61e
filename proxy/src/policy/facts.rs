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
        host: request_authority(req).map(str::to_string),
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

/// What an opaque TCP tunnel's policy decides on: who calls (the verified
/// peer sidecar), where the connection was going and where it goes.
pub struct ConnectionFacts {
    pub source: Option<Workload>,
    pub source_address: Option<SocketAddr>,
    pub destination: Workload,
    pub capability: Option<String>,
    /// The address the calling app connected to (captured traffic).
    pub original_destination: Option<SocketAddr>,
    /// The local TCP server the tunnel would reach (`inbound.tcp[].app`).
    pub app: SocketAddr,
}

/// The request facts of a tunnel: method `CONNECT`, protocol and scheme
/// `tcp`, no path or headers. Rules written for HTTP see a request they
/// do not match; `input.connection` ([`connection_input`]) has the rest.
pub fn connection_request_facts(c: &ConnectionFacts) -> RequestFacts {
    RequestFacts {
        direction: Direction::Inbound.as_str(),
        source: c.source.clone(),
        source_address: c.source_address,
        destination: c.destination.clone(),
        capability: c.capability.clone(),
        route: None,
        method: "CONNECT".into(),
        path_and_query: String::new(),
        host: c.original_destination.map(|a| a.to_string()),
        scheme: "tcp".into(),
        protocol: "tcp".into(),
        headers: Vec::new(),
        body_size: None,
        time: std::time::SystemTime::now(),
        id: super::new_decision_id(),
    }
}

/// `input.connection` (`docs/reference/policy.md`): the tunnel's
/// connection-level facts.
pub fn connection_input(c: &ConnectionFacts) -> serde_json::Value {
    let port = c.original_destination.map_or(c.app.port(), |a| a.port());
    serde_json::json!({
        "protocol": "tcp",
        "source": c.source.as_ref().map(|s| s.spiffe_id.as_str()),
        "source_address": c.source_address.map(|a| a.to_string()),
        "destination": {
            "address": c.original_destination.map(|a| a.ip().to_string()),
            "port": port,
        },
        "capability": c.capability,
        "app": c.app.to_string(),
    })
}

/// Outbound, the crank input shape: `input.destination.egress` (whether
/// the route leaves the mesh) and, when it does, `host`, `port`,
/// `declared` and `name` (the declared destination; absent for an
/// undeclared one passed through). The envoy shape is left as it is.
pub fn egress_input(doc: &mut serde_json::Value, dest: Option<&crate::egress::Destination>) {
    let Some(d) = doc.get_mut("destination").and_then(|v| v.as_object_mut()) else {
        return;
    };
    d.insert("egress".into(), dest.is_some().into());
    if let Some(e) = dest {
        let declared = e.name != crate::egress::UNDECLARED_ROUTE;
        d.insert("host".into(), e.host_str().into());
        d.insert("port".into(), e.port.into());
        d.insert("declared".into(), declared.into());
        if declared {
            d.insert("name".into(), e.name.clone().into());
        }
    }
}

#[cfg(test)]
mod connection_tests {
    use super::*;

    fn facts(original: Option<&str>) -> ConnectionFacts {
        ConnectionFacts {
            source: Some(Workload {
                spiffe_id: "spiffe://crank.local/tenant/acme/svc/web".into(),
                service: "web".into(),
                tenant: "acme".into(),
                trust_domain: "crank.local".into(),
            }),
            source_address: Some("10.0.0.2:40000".parse().unwrap()),
            destination: Workload::default(),
            capability: Some("db:postgres".into()),
            original_destination: original.map(|a| a.parse().unwrap()),
            app: "127.0.0.1:5432".parse().unwrap(),
        }
    }

    #[test]
    fn the_connection_input_names_source_destination_port_and_capability() {
        let cases = [
            (Some("10.0.0.3:6543"), serde_json::json!("10.0.0.3"), 6543),
            (None, serde_json::Value::Null, 5432),
        ];
        for (original, address, port) in cases {
            let v = connection_input(&facts(original));
            assert_eq!(v["source"], "spiffe://crank.local/tenant/acme/svc/web");
            assert_eq!(v["destination"]["address"], address);
            assert_eq!(v["destination"]["port"], port);
            assert_eq!(v["capability"], "db:postgres");
            assert_eq!(v["app"], "127.0.0.1:5432");
        }
        let r = connection_request_facts(&facts(None));
        assert_eq!((r.method.as_str(), r.protocol.as_str()), ("CONNECT", "tcp"));
    }
}

#[cfg(test)]
mod egress_tests {
    use super::*;
    use crate::egress::{Destination, EgressTable};

    const DECLARED: &str =
        "mode: deny\ndestinations:\n  - {name: ray, address: 'Ray-Head.internal:8000'}\n";

    #[test]
    fn the_policy_input_says_whether_and_where_a_request_leaves_the_mesh() {
        let cfg: crank_api::proxy::EgressConfig = serde_yaml::from_str(DECLARED).unwrap();
        let t = EgressTable::from_config(&cfg);
        let doc = |dest: Option<&Destination>| {
            let mut d = serde_json::json!({"destination": {"route": "r"}, "request": {}});
            egress_input(&mut d, dest);
            d["destination"].clone()
        };
        assert_eq!(
            doc(None),
            serde_json::json!({"route": "r", "egress": false})
        );
        assert_eq!(
            doc(t.by_name("ray").map(|d| d.as_ref())),
            serde_json::json!({"route": "r", "egress": true, "host": "ray-head.internal", "port": 8000, "declared": true, "name": "ray"})
        );
        let undeclared = Destination::undeclared("10.1.2.3", 80).unwrap();
        assert_eq!(
            doc(Some(&undeclared)),
            serde_json::json!({"route": "r", "egress": true, "host": "10.1.2.3", "port": 80, "declared": false})
        );
        let mut envoy = serde_json::json!({"attributes": {}});
        egress_input(&mut envoy, None);
        assert_eq!(
            envoy,
            serde_json::json!({"attributes": {}}),
            "the envoy shape is left as it is"
        );
    }
}
