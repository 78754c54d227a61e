//! A small reporting mesh, shared by the dashboard's tests
//! (tests/tests/dashboard.rs, tests/tests/traffic_report.rs): crank-control
//! with `dashboard_listen` and a published config that routes `backend` to
//! `hello:v1` with an SLO and a policy that closes `/admin`, the sidecar of
//! backend.demo (serves `hello:v1`, enforces the pushed policy) and the
//! sidecar of frontend.demo (its port bound to route `backend`); both push
//! traffic reports every second.

use std::net::SocketAddr;
use std::path::Path;

use crate::control::{ControlOptions, ControlPlane};
use crate::proxy::{free_addr, Proxy};

pub const FRONTEND: &str = "frontend.demo.crank.local";
pub const BACKEND: &str = "backend.demo.crank.local";

const ROUTE: &str =
    "routes:\n  - name: backend\n    match: {hosts: [backend]}\n    backends: [{capability: hello:v1}]\n";
const OPEN: &str =
    "package crank.authz\n\nallow := true\n\ndeny contains \"never\" if {\n\tfalse\n}\n";
const CLOSED: &str = "package crank.authz\n\nallow := true\n\ndeny contains \"the /admin path is closed\" if {\n\tinput.request.path == \"/admin\"\n}\n";

/// crank-control with the dashboard, the route, the SLO (`availability`,
/// e.g. `99.9%`), the closed-/admin policy and any `extra` mesh files
/// (relative path, text).
pub fn control(availability: &str, extra: &[(&str, &str)]) -> ControlPlane {
    let cp = ControlPlane::start(ControlOptions {
        dashboard: true,
        extra: "config_dir: mesh\nregistry: {lease: 5s}\n".into(),
        ..Default::default()
    });
    cp.write_mesh_file("capabilities.yaml", "capabilities:\n  - name: hello:v1\n");
    cp.write_mesh_file("routes/backend.yaml", ROUTE);
    cp.write_mesh_file(
        "slo/hello.yaml",
        &format!("capability: hello:v1\nslo:\n  availability: {availability}\n"),
    );
    for (path, text) in extra {
        cp.write_mesh_file(path, text);
    }
    cp.write_mesh_file("policies/policy.yaml", "mode: enforce\n");
    cp.write_mesh_file("policies/open.rego", CLOSED);
    cp
}

/// backend.demo's sidecar in front of `app`: (the proxy, its inbound address).
pub fn server(cp: &ControlPlane, dir: &Path, app: SocketAddr) -> (Proxy, SocketAddr) {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("policy.yaml"), "mode: enforce\n").unwrap();
    std::fs::write(policies.join("open.rego"), OPEN).unwrap();
    let (inbound, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "{}inbound: {{listen: {inbound}, app: {app}}}\npolicy:\n  inbound: {{dir: {}}}\n  reload_interval: 100ms\n\
         mesh:\n  watch_wait: 2s\n  report_interval: 1s\n  policy_dir: {}\n  register:\n    capabilities: [hello:v1]\n    lease: 5s\n\
         admin: {{listen: {admin}}}\nthreads: 1\n",
        cp.enroll_yaml(dir, "srv", "backend", "demo", "2s"),
        policies.display(),
        policies.display(),
    );
    (Proxy::start(dir, "srv", &yaml, admin), inbound)
}

/// frontend.demo's sidecar: (the proxy, its outbound port for `backend`).
pub fn client(cp: &ControlPlane, dir: &Path) -> (Proxy, SocketAddr) {
    let (port, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "{}outbound:\n  ports: [{{listen: {port}, route: backend}}]\nroutes:\n  - name: backend\n    endpoints: [{{address: 127.0.0.1:1, identity: {BACKEND}}}]\n\
         mesh:\n  watch_wait: 2s\n  report_interval: 1s\nadmin: {{listen: {admin}}}\nthreads: 1\n",
        cp.enroll_yaml(dir, "cli", "frontend", "demo", "2s"),
    );
    (Proxy::start(dir, "cli", &yaml, admin), port)
}
