//! Proxies follow crank-control's replicas (issue #15).
//!
//! - A sidecar whose `identity.enroll.control_plane` lists a dead address
//!   before the live replica enrolls, registers, watches and applies config
//!   edits through the live one; with every replica down it keeps serving
//!   its last config, and it picks up again when a replica returns.
//! - Two replicas on one etcd: a workload registered through replica A is
//!   routed by a client watching replica B; SIGKILL of B moves the client's
//!   watch and renewals to A, where a config edit still arrives; with both
//!   replicas down the sidecars keep serving.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crank_tests::app::EchoApp;
use crank_tests::control::{serial_of, ControlOptions, ControlPlane};
use crank_tests::control_ha::{HaControl, HaOptions, Replica};
use crank_tests::proxy::{free_addr, Proxy};
use crank_tests::{curl, wait_until};

fn route(weight: u32) -> String {
    format!("routes:\n  - name: backend\n    match: {{hosts: [backend]}}\n    backends:\n      - {{capability: hello:v1, weight: {weight}}}\n")
}

fn control() -> ControlPlane {
    let cp = ControlPlane::start(ControlOptions {
        extra: "config_dir: mesh\nregistry: {lease: 3s}\n".into(),
        ..Default::default()
    });
    cp.write_mesh_file("capabilities.yaml", "capabilities:\n  - name: hello:v1\n");
    cp.write_mesh_file("routes/backend.yaml", &route(100));
    cp
}

/// The enroll block with `control_plane: [dead, live]`.
fn enroll(cp: &ControlPlane, dead: SocketAddr, dir: &Path, name: &str, service: &str) -> String {
    let yaml = cp.enroll_yaml(dir, name, service, "demo", "2s");
    let single = format!("control_plane: {}\n", cp.listen);
    assert!(yaml.contains(&single), "{yaml}");
    yaml.replace(
        &single,
        &format!("control_plane: [\"{dead}\", \"{}\"]\n", cp.listen),
    )
}

fn seq_of(p: &Proxy) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&p.admin_get("/config_dump").1).unwrap_or_default();
    v["mesh"]["seq"].as_u64().unwrap_or(0)
}

fn get(port: SocketAddr) -> u16 {
    curl(&[&format!("http://{port}/hello")]).0
}

#[test]
fn a_sidecar_moves_past_a_dead_replica_and_serves_with_every_replica_down() {
    let app = EchoApp::start();
    let mut cp = control();
    let dead = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let (inbound, sadmin) = (free_addr(), free_addr());
    let server_yaml = format!(
        "{}inbound: {{listen: {inbound}, app: {}}}\nmesh:\n  watch_wait: 2s\n  register:\n    capabilities: [hello:v1]\n    lease: 3s\nadmin: {{listen: {sadmin}}}\nthreads: 1\n",
        enroll(&cp, dead, dir.path(), "server", "backend"),
        app.addr,
    );
    let _server = Proxy::start(dir.path(), "server", &server_yaml, sadmin);
    let (port, cadmin) = (free_addr(), free_addr());
    let client_yaml = format!(
        "{}outbound:\n  ports: [{{listen: {port}, route: backend}}]\nroutes:\n  - name: backend\n    endpoints: [{{address: 127.0.0.1:1, identity: backend.demo.crank.local}}]\nmesh:\n  watch_wait: 2s\nadmin: {{listen: {cadmin}}}\nthreads: 1\n",
        enroll(&cp, dead, dir.path(), "client", "frontend"),
    );
    let client = Proxy::start(dir.path(), "client", &client_yaml, cadmin);

    // Enrolled, registered and routed through the live replica.
    wait_until(
        "served through the pushed route",
        Duration::from_secs(15),
        || get(port) == 200,
    );
    let metrics = client.metrics();
    let live = format!(
        "crank_control_plane_connected{{address=\"{}\"}} 1",
        cp.listen
    );
    assert!(metrics.contains(&live), "{metrics}");
    let dead_line = format!("crank_control_plane_connected{{address=\"{dead}\"}} 0");
    assert!(metrics.contains(&dead_line), "{metrics}");
    assert!(
        !metrics.contains("crank_control_plane_failovers_total 0"),
        "moving past the dead address counts: {metrics}"
    );
    let v: serde_json::Value = serde_json::from_str(&client.admin_get("/config_dump").1).unwrap();
    assert_eq!(
        v["mesh"]["control_plane"],
        format!("{dead}, {}", cp.listen),
        "every replica, in order: {}",
        v["mesh"]
    );

    // An edit arrives.
    let before = seq_of(&client);
    cp.write_mesh_file("routes/backend.yaml", &route(50));
    wait_until("the edit applied", Duration::from_secs(10), || {
        seq_of(&client) > before
    });

    // Every replica down: the last config keeps serving.
    cp.kill();
    for _ in 0..20 {
        assert_eq!(get(port), 200, "served while every replica is down");
    }

    // A replica returns: the watch picks up with the version it had.
    cp.spawn();
    let seq = seq_of(&client);
    cp.write_mesh_file("routes/backend.yaml", &route(60));
    wait_until("an edit after the return", Duration::from_secs(20), || {
        seq_of(&client) > seq
    });
    assert_eq!(get(port), 200);
}

/// The enroll block for a sidecar of `ha` that lists `order`'s replicas.
fn ha_enroll(
    ha: &HaControl,
    order: [&Replica; 2],
    dir: &Path,
    name: &str,
    service: &str,
) -> String {
    let token = dir.join(format!("{name}.token"));
    std::fs::write(&token, order[0].token(service, "demo")).unwrap();
    format!(
        "identity:\n  trust_bundle: {}\n  enroll:\n    control_plane: [\"{}\", \"{}\"]\n    service: {service}\n    tenant: demo\n    token_file: {}\n    state_dir: {}\n    watch_wait: 2s\n",
        ha.path().join("ca/root/bundle.pem").display(),
        order[0].listen,
        order[1].listen,
        token.display(),
        dir.join(format!("{name}-state")).display(),
    )
}

#[test]
fn sidecars_follow_the_replicas_on_etcd() {
    let mut ha = HaControl::start(HaOptions {
        extra: "registry: {lease: 3s}\ncerts: {leaf_ttl: 12s}\n".into(),
        ..Default::default()
    });
    ha.write_mesh_file("capabilities.yaml", "capabilities:\n  - name: hello:v1\n");
    ha.write_mesh_file("routes/backend.yaml", &route(100));
    ha.leader(Duration::from_secs(15));
    let app = EchoApp::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (&ha.replicas[0], &ha.replicas[1]);

    // The server registers through A; the client watches B.
    let (inbound, sadmin) = (free_addr(), free_addr());
    let server_yaml = format!(
        "{}inbound: {{listen: {inbound}, app: {}}}\nmesh:\n  watch_wait: 2s\n  register:\n    capabilities: [hello:v1]\n    lease: 3s\nadmin: {{listen: {sadmin}}}\nthreads: 1\n",
        ha_enroll(&ha, [a, b], dir.path(), "server", "backend"),
        app.addr,
    );
    let _server = Proxy::start(dir.path(), "server", &server_yaml, sadmin);
    let (port, cadmin) = (free_addr(), free_addr());
    let client_yaml = format!(
        "{}outbound:\n  ports: [{{listen: {port}, route: backend}}]\nroutes:\n  - name: backend\n    endpoints: [{{address: 127.0.0.1:1, identity: backend.demo.crank.local}}]\nmesh:\n  watch_wait: 2s\nadmin: {{listen: {cadmin}}}\nthreads: 1\n",
        ha_enroll(&ha, [b, a], dir.path(), "client", "frontend"),
    );
    let client = Proxy::start(dir.path(), "client", &client_yaml, cadmin);
    wait_until(
        "B routes to what registered through A",
        Duration::from_secs(15),
        || get(port) == 200,
    );
    let on_b = format!(
        "crank_control_plane_connected{{address=\"{}\"}} 1",
        b.listen
    );
    assert!(client.metrics().contains(&on_b), "{}", client.metrics());

    // SIGKILL of B: the client's watch and renewals move to A.
    let first_serial = serial_of(&client);
    let seq = seq_of(&client);
    ha.replicas[1].kill();
    ha.leader(Duration::from_secs(15));
    ha.write_mesh_file("routes/backend.yaml", &route(50));
    wait_until(
        "the edit arrives through A",
        Duration::from_secs(15),
        || seq_of(&client) > seq,
    );
    wait_until("renewed through A", Duration::from_secs(20), || {
        serial_of(&client) != first_serial
    });
    let on_a = format!(
        "crank_control_plane_connected{{address=\"{}\"}} 1",
        ha.replicas[0].listen
    );
    let metrics = client.metrics();
    assert!(metrics.contains(&on_a), "{metrics}");
    assert_eq!(get(port), 200);

    // Every replica down: both sidecars keep serving.
    ha.replicas[0].kill();
    for _ in 0..20 {
        assert_eq!(get(port), 200, "served while every replica is down");
    }
}
