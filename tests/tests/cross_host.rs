//! The core stories across real hosts (network namespaces with their own
//! addresses, tests/src/netns.rs), not loopback: sidecars enroll with
//! crank-control over the network and register routable addresses; a client
//! host routes by capability to two backend hosts over mTLS, and the
//! backends see who called; certificates renew over the network; and under
//! steady load a backend host's sidecar killed with SIGKILL, or its cable
//! cut, costs no failed request (retries, ejection) and traffic comes back
//! when it does.

use std::net::SocketAddr;
use std::time::Duration;

use crank_tests::hosts_mesh::{curl_in, CrossHostMesh, HostSidecar};
use crank_tests::load::Load;
use crank_tests::netns::Hosts;
use crank_tests::{header, metric, wait_until};

const FRONTEND: &str = "spiffe://crank.local/tenant/demo/svc/frontend";

fn serial(s: &HostSidecar) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&s.admin_get("/config_dump").1).unwrap_or_default();
    v["identity"]["serial"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Every registered address is a host's own, never loopback.
fn assert_routable(mesh: &CrossHostMesh, want: &[SocketAddr]) {
    let human = mesh.cp.ctl_ok(&["endpoints"]);
    for a in want {
        assert!(human.contains(&a.to_string()), "{human}");
    }
    assert!(
        !human.contains("127.0.0.1") && !human.contains("0.0.0.0"),
        "{human}"
    );
    let addrs = mesh.cp.registered_addresses();
    assert!(
        addrs.len() == want.len() && addrs.iter().all(|a| a.starts_with("10.77.")),
        "{addrs:?}"
    );
    let routes = mesh.cp.ctl_ok(&["routes"]);
    assert!(!routes.contains("127.0.0.1"), "{routes}");
}

#[test]
fn a_client_host_routes_by_capability_to_two_backend_hosts_over_mtls() {
    let Some(hosts) = Hosts::new(4) else { return };
    let mesh = CrossHostMesh::start(&hosts, "12s", "", "");
    let (b1, b2) = (mesh.backend_addr(0), mesh.backend_addr(1));
    assert_eq!(
        mesh.cp.listen.ip(),
        hosts[0].addr(),
        "control listens on its host's address"
    );
    mesh.wait_routed_to(&[b1, b2], Duration::from_secs(15));
    assert_routable(&mesh, &[b1, b2]);

    // Requests from the client host reach both backend hosts, and each app
    // learns the verified caller from its own sidecar.
    for i in 0..30 {
        let (status, out) = mesh.get("/hello");
        assert_eq!(status, 200, "request {i}: {out}");
        assert!(
            out.contains(FRONTEND),
            "the app saw the caller's identity: {out}"
        );
    }
    for (i, app) in mesh.apps.iter().enumerate() {
        let seen = app
            .last()
            .unwrap_or_else(|| panic!("backend host {} got nothing", i + 1));
        assert_eq!(seen.header("x-crank-client-id"), Some(FRONTEND));
    }
    assert_eq!(mesh.apps.iter().map(|a| a.count()).sum::<usize>(), 30);

    // The hop between hosts is mTLS only: plain HTTP from the client host
    // is refused by the backend's sidecar, and TLS without a client
    // certificate gets no answer from the app either.
    let client_host = mesh.client.host;
    let (status, out) = curl_in(client_host, &[&format!("http://{b1}/hello")]);
    assert_eq!(status, 400, "plain HTTP to another host's sidecar: {out}");
    assert_eq!(
        header(&out, "x-crank-error"),
        Some("mtls-required"),
        "{out}"
    );
    let (status, out) = curl_in(client_host, &["-k", &format!("https://{b2}/hello")]);
    assert_ne!(status, 200, "TLS without a client certificate: {out}");
    let before: usize = mesh.apps.iter().map(|a| a.count()).sum();
    assert_eq!(before, 30, "neither reached an app");

    // Certificates renew over the network (12 s leaves, renewed at about
    // two thirds), and traffic keeps flowing on the new ones.
    let (first_b, first_c) = (serial(&mesh.backends[0]), serial(&mesh.client));
    wait_until("both sides renewed", Duration::from_secs(25), || {
        serial(&mesh.backends[0]) != first_b && serial(&mesh.client) != first_c
    });
    assert_eq!(mesh.get("/after-renewal").0, 200);
}

const RESILIENT_ROUTE: &str = "    retry: {attempts: 2}\n    circuit: {consecutive_failures: 3, base_ejection: 1s, max_ejection: 2s}\n";
const FAST_FAILING: &str = "timeouts: {connect: 500ms, upstream_read: 2s}\n";

fn ejections(mesh: &CrossHostMesh, ep: SocketAddr) -> f64 {
    let series = format!("crank_circuit_ejections_total{{endpoint=\"{ep}\",route=\"backend\"}}");
    metric(&mesh.client.metrics(), &series).unwrap_or(0.0)
}

/// Waits until backend `i`'s app serves again.
fn wait_serving(mesh: &CrossHostMesh, i: usize, what: &str) {
    let before = mesh.apps[i].count();
    wait_until(what, Duration::from_secs(20), || {
        mesh.apps[i].count() > before + 10
    });
}

#[test]
fn a_backend_host_killed_or_cut_off_under_load_fails_no_request_and_comes_back() {
    let Some(hosts) = Hosts::new(4) else { return };
    let mut mesh = CrossHostMesh::start(&hosts, "1h", RESILIENT_ROUTE, FAST_FAILING);
    let (b1, b2) = (mesh.backend_addr(0), mesh.backend_addr(1));
    mesh.wait_routed_to(&[b1, b2], Duration::from_secs(15));
    let port = mesh.port();
    let load = mesh.client.host.enter(|| Load::start(port, 4));
    load.wait_for(100);

    // Host 2's sidecar dies with SIGKILL: no goodbye to crank-control.
    mesh.backends[1].kill9();
    wait_until(
        "the killed endpoint is ejected",
        Duration::from_secs(10),
        || ejections(&mesh, b2) >= 1.0,
    );
    mesh.wait_routed_to(&[b1], Duration::from_secs(15));
    load.wait_for(load.ok() + 200);
    mesh.backends[1].spawn();
    mesh.wait_routed_to(&[b1, b2], Duration::from_secs(15));
    wait_serving(&mesh, 1, "traffic back on the restarted host");

    // Host 1's cable is cut: its connections go silent (no reset), so
    // requests time out on it, are retried on host 2, and it is ejected.
    hosts.set_link(1, false);
    wait_until(
        "the cut-off endpoint is ejected",
        Duration::from_secs(10),
        || ejections(&mesh, b1) >= 1.0,
    );
    load.wait_for(load.ok() + 200);
    hosts.set_link(1, true);
    wait_serving(&mesh, 0, "traffic back on the mended host");
    mesh.wait_routed_to(&[b1, b2], Duration::from_secs(15));

    let (ok, failed, first) = load.stop();
    eprintln!("under load across hosts: {ok} requests ok, {failed} failed");
    assert_eq!(
        failed, 0,
        "{ok} ok, {failed} failed, first failures: {first:?}"
    );
    let m = mesh.client.metrics();
    let retries: f64 = m
        .lines()
        .filter(|l| l.starts_with("crank_retries_total{") && l.contains("route=\"backend\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(retries >= 1.0, "failed attempts were retried: {m}");
    assert_routable(&mesh, &[b1, b2]);
}
