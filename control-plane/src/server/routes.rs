//! The routes of the workload API, as one table that the router in
//! [`super::http`] dispatches on and that a test checks, both ways, against
//! the OpenAPI 3.1 document `control-plane/openapi.json` (served verbatim
//! at `GET /v1/openapi.json`).

/// The workload API's OpenAPI document.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// A route of the workload API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadRoute {
    Enroll,
    Renew,
    IdentityWatch,
    Bundle,
    MeshWatch,
    Register,
    Heartbeat,
    Deregister,
    MeshReport,
    OpenApi,
}

/// Every route: method, path, route, and whether it needs the workload's
/// certificate as a TLS client certificate (mTLS).
pub const WORKLOAD_ROUTES: &[(&str, &str, WorkloadRoute, bool)] = &[
    ("POST", "/v1/identity/enroll", WorkloadRoute::Enroll, false),
    ("POST", "/v1/identity/renew", WorkloadRoute::Renew, true),
    (
        "GET",
        "/v1/identity/watch",
        WorkloadRoute::IdentityWatch,
        true,
    ),
    ("GET", "/v1/identity/bundle", WorkloadRoute::Bundle, false),
    ("GET", "/v1/mesh/watch", WorkloadRoute::MeshWatch, true),
    (
        "POST",
        "/v1/registry/register",
        WorkloadRoute::Register,
        true,
    ),
    (
        "POST",
        "/v1/registry/heartbeat",
        WorkloadRoute::Heartbeat,
        true,
    ),
    (
        "POST",
        "/v1/registry/deregister",
        WorkloadRoute::Deregister,
        true,
    ),
    ("POST", "/v1/mesh/report", WorkloadRoute::MeshReport, true),
    ("GET", "/v1/openapi.json", WorkloadRoute::OpenApi, false),
];

/// The route for `method` and `path`, if any.
pub fn workload_route(method: &str, path: &str) -> Option<WorkloadRoute> {
    WORKLOAD_ROUTES
        .iter()
        .find(|(m, p, _, _)| *m == method && *p == path)
        .map(|(_, _, r, _)| *r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn doc() -> serde_json::Value {
        serde_json::from_str(OPENAPI).expect("control-plane/openapi.json is JSON")
    }

    #[test]
    fn routes_match_method_and_exact_path() {
        let cases = [
            ("POST", "/v1/identity/enroll", Some(WorkloadRoute::Enroll)),
            ("GET", "/v1/identity/enroll", None),
            ("GET", "/v1/mesh/watch", Some(WorkloadRoute::MeshWatch)),
            ("GET", "/v1/mesh/watch/", None),
            ("POST", "/v1/mesh/report", Some(WorkloadRoute::MeshReport)),
            ("GET", "/v1/mesh/report", None),
            ("POST", "/v1/registry/nope", None),
            ("GET", "/v1/openapi.json", Some(WorkloadRoute::OpenApi)),
        ];
        for (method, path, want) in cases {
            assert_eq!(workload_route(method, path), want, "{method} {path}");
        }
    }

    /// The document lists exactly the routes the router handles.
    #[test]
    fn openapi_document_lists_exactly_the_routes() {
        let doc = doc();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().unwrap().keys() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
        let routed: BTreeSet<(String, String)> = WORKLOAD_ROUTES
            .iter()
            .map(|(m, p, _, _)| (m.to_string(), p.to_string()))
            .collect();
        let missing: Vec<_> = routed.difference(&documented).collect();
        assert!(
            missing.is_empty(),
            "routes missing from control-plane/openapi.json: {missing:?}"
        );
        let extra: Vec<_> = documented.difference(&routed).collect();
        assert!(
            extra.is_empty(),
            "control-plane/openapi.json documents routes the router does not handle: {extra:?}"
        );
    }

    /// mTLS in the document matches the table: an operation without its own
    /// `security` inherits the top-level `mutualTLS`; `[]` means none. An
    /// mTLS operation documents 401 `cert-required`.
    #[test]
    fn openapi_mtls_matches_the_routes() {
        let doc = doc();
        assert_eq!(doc["security"], serde_json::json!([{"mutualTLS": []}]));
        for (method, path, _, mtls) in WORKLOAD_ROUTES {
            let op = &doc["paths"][path][method.to_lowercase()];
            let documented = op.get("security") != Some(&serde_json::json!([]));
            assert_eq!(documented, *mtls, "{method} {path}: mTLS");
            assert_eq!(
                op["responses"].get("401").is_some(),
                *mtls,
                "{method} {path}: 401"
            );
        }
    }

    /// Every error answer documented has the `{error, message}` body.
    #[test]
    fn openapi_error_answers_have_the_error_shape() {
        let doc = doc();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for (status, r) in op["responses"].as_object().unwrap() {
                    if !status.starts_with('2') {
                        assert_eq!(
                            r["content"]["application/json"]["schema"]["$ref"],
                            "#/components/schemas/Error",
                            "{method} {path} {status}"
                        );
                    }
                }
            }
        }
        let error = &doc["components"]["schemas"]["Error"];
        assert_eq!(error["required"], serde_json::json!(["error", "message"]));
    }
}
