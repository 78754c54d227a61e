//! The routes of the workload API, as one table that the router in
//! [`super::workload`] dispatches on and that a test checks, both ways, against
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
        assert_same_routes(
            &routed,
            &documented,
            "control-plane/openapi.json",
            "the router",
        );
    }

    /// Fails naming what the code routes and the document lacks, and what
    /// the document lists and the code does not route.
    pub(super) fn assert_same_routes(
        routed: &BTreeSet<(String, String)>,
        documented: &BTreeSet<(String, String)>,
        doc: &str,
        code: &str,
    ) {
        let missing: Vec<_> = routed.difference(documented).collect();
        assert!(
            missing.is_empty(),
            "routes missing from {doc} (add them there): {missing:?}"
        );
        let extra: Vec<_> = documented.difference(routed).collect();
        assert!(
            extra.is_empty(),
            "{doc} documents routes {code} does not handle: {extra:?}"
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

// ---- The admin API (on the Unix socket) ----
//
// `admin()` in [`super::ca_admin`] dispatches on `(Method::X, "/path")` match
// arms; the test below reads those arms from the source and checks them,
// both ways, against `control-plane/openapi-admin.json`.

/// The admin API's OpenAPI document.
pub const ADMIN_OPENAPI: &str = include_str!("../../openapi-admin.json");

/// `GET /v1/admin/openapi.json` on the admin socket: [`ADMIN_OPENAPI`], verbatim.
pub(super) fn admin_openapi() -> super::http::Resp {
    http::Response::builder()
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            ADMIN_OPENAPI.as_bytes(),
        )))
        .expect("a valid response")
}

#[cfg(test)]
mod admin_tests {
    use super::ADMIN_OPENAPI;
    use std::collections::BTreeSet;

    /// The `(METHOD, path)` arms of `admin()` in ca_admin.rs.
    fn admin_arms(src: &str) -> BTreeSet<(String, String)> {
        let start = src
            .find("async fn admin(")
            .expect("ca_admin.rs has `async fn admin(`");
        let end = src[start..]
            .find("\n    }\n}")
            .map_or(src.len(), |e| start + e);
        let mut arms = BTreeSet::new();
        for piece in src[start..end].split("(Method::").skip(1) {
            let Some((method, rest)) = piece.split_once(',') else {
                continue;
            };
            let Some(path) = rest.trim_start().strip_prefix('"') else {
                continue;
            };
            let path = path.split('"').next().unwrap_or_default();
            arms.insert((method.trim().to_string(), path.to_string()));
        }
        arms
    }

    fn documented() -> BTreeSet<(String, String)> {
        let doc: serde_json::Value =
            serde_json::from_str(ADMIN_OPENAPI).expect("control-plane/openapi-admin.json is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("a path item").keys() {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
        out
    }

    #[test]
    fn the_arm_reader_finds_method_and_path() {
        let src = "fn x() {}\n    async fn admin(&self) {\n        match (m, p) {\n            \
                   (Method::POST, \"/v1/admin/a\") => 1,\n            (Method::GET, \"/b\") => {\n            }\n    }\n}\n\
                   fn after() { (Method::PUT, \"/not-admin\") }";
        let want: BTreeSet<_> = [("GET", "/b"), ("POST", "/v1/admin/a")]
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(admin_arms(src), want);
    }

    /// The document lists exactly the routes `admin()` handles.
    #[test]
    fn admin_openapi_document_lists_exactly_the_admin_routes() {
        let routed = admin_arms(include_str!("ca_admin.rs"));
        assert!(
            routed.contains(&("GET".into(), "/v1/admin/openapi.json".into())),
            "admin() serves its document: {routed:?}"
        );
        super::tests::assert_same_routes(
            &routed,
            &documented(),
            "control-plane/openapi-admin.json",
            "admin() in ca_admin.rs",
        );
    }

    /// Every documented error answer has the `{error, message}` body, and
    /// the document says how the API is protected.
    #[test]
    fn admin_openapi_errors_and_access_are_documented() {
        let doc: serde_json::Value = serde_json::from_str(ADMIN_OPENAPI).unwrap();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                assert!(op["operationId"].is_string(), "{method} {path}");
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
        let about = doc["info"]["description"].as_str().unwrap();
        assert!(about.contains("Unix socket") && about.contains("file permissions"));
    }

    /// Each operation documents the role it needs on `admin_listen` (the
    /// one the code requires) and its 403 `role-required`.
    #[test]
    fn admin_openapi_roles_match_the_code() {
        let doc: serde_json::Value = serde_json::from_str(ADMIN_OPENAPI).unwrap();
        assert_eq!(
            doc["components"]["securitySchemes"]["mutualTLS"]["type"],
            "mutualTLS"
        );
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let need = super::super::roles::required(&method.to_uppercase(), path);
                assert_eq!(op["x-crank-role"], need.as_str(), "{method} {path}");
                let forbidden = op["responses"]["403"]["description"].as_str().unwrap_or("");
                assert!(forbidden.contains("role-required"), "{method} {path}: 403");
            }
        }
    }
}
