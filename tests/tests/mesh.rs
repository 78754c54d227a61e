//! Config distribution end to end: a real `crank-control` with a config
//! directory and the registry, enrolled sidecars that watch it and register
//! their workloads. Edit → propagation, invalid edits refused with the last
//! version kept, lease expiry, weighted splits, and static stability.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crank_tests::app::EchoApp;
use crank_tests::control::{ControlOptions, ControlPlane};
use crank_tests::load::Load;
use crank_tests::proxy::{free_addr, Proxy};
use crank_tests::{curl, wait_until};

const CAPS: &str = "capabilities:\n  - name: hello:v1\n";

fn route(backends: &str) -> String {
    format!(
        "routes:\n  - name: backend\n    match: {{hosts: [backend]}}\n    backends:\n{backends}"
    )
}

fn write(cp: &ControlPlane, rel: &str, text: &str) {
    cp.write_mesh_file(rel, text);
}

fn control(lease: &str) -> ControlPlane {
    let cp = ControlPlane::start(ControlOptions {
        extra: format!("config_dir: mesh\nregistry: {{lease: {lease}}}\n"),
        ..Default::default()
    });
    write(&cp, "capabilities.yaml", CAPS);
    write(
        &cp,
        "routes/backend.yaml",
        &route("      - {capability: hello:v1}\n"),
    );
    cp
}

/// A server sidecar in front of `app` that registers `hello:v1` with `labels`.
fn server(cp: &ControlPlane, dir: &Path, name: &str, app: SocketAddr, labels: &str) -> Proxy {
    let (inbound, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "{}inbound: {{listen: {inbound}, app: {app}}}\nmesh:\n  watch_wait: 2s\n  register:\n    capabilities: [hello:v1]\n    labels: {labels}\n    lease: 2s\nadmin: {{listen: {admin}}}\nthreads: 1\n",
        cp.enroll_yaml(dir, name, "backend", "demo", "2s"),
    );
    Proxy::start(dir, name, &yaml, admin)
}

/// A client sidecar whose port is bound to route `backend`. Its file's own
/// route points nowhere: only the pushed config makes requests work.
fn client(cp: &ControlPlane, dir: &Path, name: &str) -> (Proxy, SocketAddr) {
    let (port, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "{}outbound:\n  ports: [{{listen: {port}, route: backend}}]\nroutes:\n  - name: backend\n    endpoints: [{{address: 127.0.0.1:1, identity: backend.demo.crank.local}}]\nmesh:\n  watch_wait: 2s\nadmin: {{listen: {admin}}}\nthreads: 1\n",
        cp.enroll_yaml(dir, name, "frontend", "demo", "2s"),
    );
    (Proxy::start(dir, name, &yaml, admin), port)
}

fn seq_of(p: &Proxy) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&p.admin_get("/config_dump").1).unwrap_or_default();
    v["mesh"]["seq"].as_u64().unwrap_or(0)
}

fn get(port: SocketAddr) -> u16 {
    curl(&[&format!("http://{port}/hello")]).0
}

fn status(cp: &ControlPlane) -> serde_json::Value {
    serde_json::from_str(&cp.ctl_ok(&["status", "--output", "json"])).unwrap()
}

#[test]
fn an_edit_reaches_every_proxy_and_a_broken_edit_changes_nothing() {
    let (app_a, app_b) = (EchoApp::start(), EchoApp::start());
    let cp = control("10s");
    let dir = tempfile::tempdir().unwrap();
    let _a = server(&cp, dir.path(), "srv-a", app_a.addr, "{pool: a}");
    let _b = server(&cp, dir.path(), "srv-b", app_b.addr, "{pool: b}");
    let (c1, port1) = client(&cp, dir.path(), "client-1");
    let (c2, port2) = client(&cp, dir.path(), "client-2");
    wait_until("both endpoints registered", Duration::from_secs(10), || {
        cp.ctl_ok(&["endpoints", "--output", "json"])
            .matches("hello:v1")
            .count()
            == 2
    });
    wait_until("version 1 everywhere", Duration::from_secs(10), || {
        seq_of(&c1) == 1 && seq_of(&c2) == 1
    });
    assert_eq!(get(port1), 200);

    // Send everything to pool b: every proxy applies version 2 within a second or so.
    let saved = Instant::now();
    write(
        &cp,
        "routes/backend.yaml",
        &route("      - {capability: hello:v1, selector: {pool: b}}\n"),
    );
    wait_until("version 2 everywhere", Duration::from_secs(5), || {
        seq_of(&c1) == 2 && seq_of(&c2) == 2
    });
    let took = saved.elapsed();
    let before = app_b.count();
    for _ in 0..20 {
        assert_eq!(get(port1), 200);
        assert_eq!(get(port2), 200);
    }
    assert_eq!(app_b.count() - before, 40, "every request went to pool b");
    let s = status(&cp);
    assert_eq!(s["version"]["seq"], 2, "{s}");
    let proxies = s["proxies"].as_array().unwrap();
    assert!(
        proxies.len() >= 4 && proxies.iter().all(|p| p["seq"] == 2 && p["stale"] == false),
        "{s}"
    );
    eprintln!("file save to both proxies applied: {took:?}");

    // A broken edit (unknown field) is refused whole, with file and field.
    write(
        &cp,
        "routes/backend.yaml",
        &route("      - {capability: hello:v1, selectr: {pool: a}}\n"),
    );
    wait_until("the refusal is reported", Duration::from_secs(5), || {
        !status(&cp)["last_error"].is_null()
    });
    let text = cp.ctl_ok(&["status"]);
    assert!(
        text.contains("REJECTED")
            && text.contains("routes/backend.yaml")
            && text.contains("selectr"),
        "{text}"
    );
    let offline = cp.ctl(&[
        "config",
        "validate",
        cp.path().join("mesh").to_str().unwrap(),
    ]);
    assert!(
        !offline.ok
            && offline.stderr.contains("routes/backend.yaml:5")
            && offline.stderr.contains("unknown field `selectr`"),
        "{}",
        offline.stderr
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        (seq_of(&c1), seq_of(&c2)),
        (2, 2),
        "the last good version keeps serving"
    );
    let before = app_b.count();
    assert_eq!(get(port1), 200);
    assert_eq!(app_b.count() - before, 1);

    // A route pointing at an undeclared capability is refused too.
    write(
        &cp,
        "routes/backend.yaml",
        &route("      - {capability: nope:v9}\n"),
    );
    wait_until(
        "the second refusal is reported",
        Duration::from_secs(5),
        || cp.ctl_ok(&["status"]).contains("nope:v9"),
    );
    assert_eq!(status(&cp)["version"]["seq"], 2);

    // A valid directory that a proxy cannot run (its port's route is gone):
    // the proxy refuses version 3 whole, keeps serving version 2, and
    // `crankctl status` flags it as stale while the others move on.
    write(
        &cp,
        "routes/backend.yaml",
        "routes:\n  - name: renamed\n    backends: [{capability: hello:v1}]\n",
    );
    wait_until("version 3 published", Duration::from_secs(5), || {
        status(&cp)["version"]["seq"] == 3
    });
    wait_until(
        "the clients are flagged stale",
        Duration::from_secs(10),
        || {
            let s = status(&cp);
            let rows = s["proxies"].as_array().cloned().unwrap_or_default();
            let stale: Vec<_> = rows.iter().filter(|p| p["stale"] == true).collect();
            stale.len() == 2
                && stale
                    .iter()
                    .all(|p| p["identity"] == "frontend.demo.crank.local" && p["seq"] == 2)
        },
    );
    assert!(cp.ctl_ok(&["status"]).contains("STALE"));
    assert_eq!((seq_of(&c1), seq_of(&c2)), (2, 2));
    let before = app_b.count();
    assert_eq!(get(port1), 200, "the refused version changed nothing");
    assert_eq!(app_b.count() - before, 1);
    let v: serde_json::Value = serde_json::from_str(&c1.admin_get("/config_dump").1).unwrap();
    assert!(
        v["mesh"]["last_rejected"].to_string().contains("backend"),
        "{}",
        v["mesh"]
    );

    // Reverted: version 4 applies everywhere and the refusal is gone from
    // /config_dump (crank-control cleared its own already), with a log line.
    write(
        &cp,
        "routes/backend.yaml",
        &route("      - {capability: hello:v1, selector: {pool: b}}\n"),
    );
    // (A proxy that refused a version asks again with a backoff, up to 30 s.)
    wait_until("version 4 everywhere", Duration::from_secs(35), || {
        seq_of(&c1) == 4 && seq_of(&c2) == 4
    });
    assert!(status(&cp)["last_error"].is_null());
    for c in [&c1, &c2] {
        let v: serde_json::Value = serde_json::from_str(&c.admin_get("/config_dump").1).unwrap();
        assert!(v["mesh"]["last_rejected"].is_null(), "{}", v["mesh"]);
        // The log writer is asynchronous (batched): wait for the line.
        wait_until(
            "the cleared refusal's log line",
            Duration::from_secs(5),
            || {
                c.log_text()
                    .contains("a good mesh config applied; the earlier refusal is cleared")
            },
        );
    }
    assert_eq!(get(port1), 200);
}

#[test]
fn a_reverted_config_file_clears_the_refusal() {
    let app = EchoApp::start();
    let cp = control("10s");
    let dir = tempfile::tempdir().unwrap();
    let _s = server(&cp, dir.path(), "srv", app.addr, "{pool: a}");
    let (c, port) = client(&cp, dir.path(), "client");
    wait_until("served", Duration::from_secs(10), || get(port) == 200);
    let rejected = |p: &Proxy| {
        let v: serde_json::Value =
            serde_json::from_str(&p.admin_get("/config_dump").1).unwrap_or_default();
        v["last_rejected_config_change"].clone()
    };
    assert!(rejected(&c).is_null());

    // A change that needs a restart is refused and shown ...
    let good = std::fs::read_to_string(&c.config).unwrap();
    std::fs::write(&c.config, good.replace("threads: 1", "threads: 2")).unwrap();
    wait_until("the refusal is shown", Duration::from_secs(10), || {
        rejected(&c).to_string().contains("threads")
    });
    // ... until the file is put back: the running config fits it again.
    std::fs::write(&c.config, &good).unwrap();
    wait_until("the refusal is cleared", Duration::from_secs(10), || {
        rejected(&c).is_null()
    });
    wait_until(
        "the cleared refusal's log line",
        Duration::from_secs(5),
        || {
            c.log_text().contains(
                "config file is back to the running config; the earlier refusal is cleared",
            )
        },
    );
    assert_eq!(get(port), 200);
}

#[test]
fn an_endpoint_leaves_every_route_when_its_lease_expires_or_it_deregisters() {
    let app = EchoApp::start();
    let cp = control("2s");
    let dir = tempfile::tempdir().unwrap();
    let mut a = server(&cp, dir.path(), "srv-a", app.addr, "{pool: a}");
    let (c, port) = client(&cp, dir.path(), "client");
    wait_until("served", Duration::from_secs(10), || get(port) == 200);

    // Killed without a word: its lease (2 s) runs out and it leaves the route.
    a.signal(libc::SIGKILL);
    let _ = a.wait_exit(Duration::from_secs(5));
    let gone = Instant::now();
    wait_until("the registry forgets it", Duration::from_secs(6), || {
        cp.ctl_ok(&["endpoints", "--output", "json"])
            .matches("hello:v1")
            .count()
            == 0
    });
    let after = gone.elapsed();
    assert!(
        after >= Duration::from_millis(500),
        "a lease of 2 s does not expire at once ({after:?})"
    );
    wait_until(
        "the client has no endpoint for the route",
        Duration::from_secs(5),
        || {
            let v: serde_json::Value =
                serde_json::from_str(&c.admin_get("/config_dump").1).unwrap_or_default();
            v["config"]["routes"][0]["endpoints"]
                .as_array()
                .is_some_and(|e| e.is_empty())
        },
    );
    let routes = cp.ctl_ok(&["routes"]);
    assert!(routes.contains("no live endpoint"), "{routes}");

    // A graceful stop deregisters at once, before the lease would run out.
    let b = server(&cp, dir.path(), "srv-b", app.addr, "{pool: b}");
    wait_until("b registered", Duration::from_secs(10), || get(port) == 200);
    b.signal(libc::SIGTERM);
    let asked = Instant::now();
    wait_until("b deregistered", Duration::from_secs(5), || {
        cp.ctl_ok(&["endpoints", "--output", "json"])
            .matches("hello:v1")
            .count()
            == 0
    });
    assert!(
        asked.elapsed() < Duration::from_millis(1900),
        "deregistered on shutdown, not by lease expiry: {:?}",
        asked.elapsed()
    );
}

#[test]
fn weights_split_traffic_within_tolerance() {
    let (app_a, app_b) = (EchoApp::start(), EchoApp::start());
    let cp = control("10s");
    write(&cp, "routes/backend.yaml", &route("      - {capability: hello:v1, selector: {pool: a}, weight: 80}\n      - {capability: hello:v1, selector: {pool: b}, weight: 20}\n"));
    let dir = tempfile::tempdir().unwrap();
    let _a = server(&cp, dir.path(), "srv-a", app_a.addr, "{pool: a}");
    let _b = server(&cp, dir.path(), "srv-b", app_b.addr, "{pool: b}");
    let (c, port) = client(&cp, dir.path(), "client");
    wait_until(
        "both endpoints in the client's route",
        Duration::from_secs(10),
        || {
            let v: serde_json::Value =
                serde_json::from_str(&c.admin_get("/config_dump").1).unwrap_or_default();
            v["config"]["routes"][0]["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() == 2)
        },
    );
    let (a0, b0) = (app_a.count(), app_b.count());
    let load = Load::start(port, 4);
    load.wait_for(2000);
    let (ok, failed, failures) = load.stop();
    assert_eq!(failed, 0, "{failures:?}");
    let (a, b) = ((app_a.count() - a0) as f64, (app_b.count() - b0) as f64);
    let share = a / (a + b);
    assert!(
        (0.75..=0.85).contains(&share),
        "80/20 route split {a}/{b} ({share:.3}) of {ok}"
    );
}

#[test]
fn proxies_keep_serving_without_the_control_plane_and_resync_when_it_returns() {
    let app = EchoApp::start();
    let mut cp = control("10s");
    let dir = tempfile::tempdir().unwrap();
    let _a = server(&cp, dir.path(), "srv-a", app.addr, "{pool: a}");
    let (c, port) = client(&cp, dir.path(), "client");
    wait_until("served", Duration::from_secs(10), || get(port) == 200);
    let load = Load::start(port, 2);
    load.wait_for(500);

    // The control plane dies under load: not one request fails.
    cp.kill();
    load.wait_for(load.ok() + 2000);
    let (ok, failed, failures) = load.stop();
    assert_eq!(
        failed, 0,
        "failed requests while crank-control was down: {failures:?}"
    );
    assert!(ok >= 2500, "{ok}");

    // A proxy restarted while it is away serves from its last good config on disk.
    let config = c.config.clone();
    let admin = c.admin;
    drop(c);
    let yaml = std::fs::read_to_string(&config).unwrap();
    let c = Proxy::start(dir.path(), "client", &yaml, admin);
    for _ in 0..20 {
        assert_eq!(get(port), 200, "served from the last good config on disk");
    }
    let v: serde_json::Value = serde_json::from_str(&c.admin_get("/config_dump").1).unwrap();
    assert_eq!(v["mesh"]["source"], "disk", "{}", v["mesh"]);

    // It comes back: no manual step, and a route change applies.
    cp.spawn();
    write(
        &cp,
        "routes/backend.yaml",
        &route("      - {capability: hello:v1, selector: {pool: a}, weight: 50}\n"),
    );
    wait_until(
        "the change reaches the restarted client",
        Duration::from_secs(15),
        || seq_of(&c) == 2,
    );
    assert_eq!(get(port), 200);
}

#[test]
fn a_worker_shim_joins_through_its_sidecar_and_leaves_when_it_stops() {
    let cp = control("10s");
    write(
        &cp,
        "capabilities.yaml",
        "capabilities:\n  - name: hello:v1\n  - name: thumbnail:v1\n",
    );
    write(
        &cp,
        "routes/thumbs.yaml",
        "routes:\n  - name: thumbs\n    backends: [{capability: thumbnail:v1, selector: {gpu: none}}]\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin, upstream) = (free_addr(), free_addr(), free_addr());
    let reg = dir.path().join("registration.json");
    let shim_yaml = format!(
        "mode: serve\nlisten: {listen}\nadmin_listen: {admin}\ncapability: thumbnail:v1\nlabels: {{pool: thumbs}}\n\
         registration_file: {}\nserve:\n  command: [{}, --listen, '{upstream}', --name, thumbs]\n  upstream: {upstream}\n  health_interval: 100ms\n  drain_timeout: 5s\n",
        reg.display(),
        crank_tests::bin("crank-demo-backend").display(),
    );
    let mut shim = crank_tests::Shim::start(dir.path(), "shim", &shim_yaml, listen, admin);

    // The worker's sidecar registers what the shim detected and declared.
    let (inbound, sadmin) = (free_addr(), free_addr());
    let server_yaml = format!(
        "{}inbound: {{listen: {inbound}, app: {listen}}}\nmesh:\n  watch_wait: 2s\n  register:\n    from_file: {}\n    lease: 3s\nadmin: {{listen: {sadmin}}}\nthreads: 1\n",
        cp.enroll_yaml(dir.path(), "thumbs-sidecar", "thumbs", "media", "2s"),
        reg.display(),
    );
    let _server = Proxy::start(dir.path(), "thumbs-sidecar", &server_yaml, sadmin);
    let (port, cadmin) = (free_addr(), free_addr());
    let client_yaml = format!(
        "{}outbound:\n  ports: [{{listen: {port}, route: thumbs}}]\nroutes:\n  - name: thumbs\n    endpoints: [{{address: 127.0.0.1:1, identity: thumbs.media.crank.local}}]\nmesh:\n  watch_wait: 2s\nadmin: {{listen: {cadmin}}}\nthreads: 1\n",
        cp.enroll_yaml(dir.path(), "caller", "frontend", "demo", "2s"),
    );
    let _client = Proxy::start(dir.path(), "caller", &client_yaml, cadmin);

    wait_until(
        "the shim's capability is registered",
        Duration::from_secs(10),
        || cp.ctl_ok(&["endpoints"]).contains("thumbnail:v1"),
    );
    let endpoints = cp.ctl_ok(&["endpoints", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&endpoints).unwrap();
    let e = &v["entries"][0]["registration"];
    assert_eq!(e["identity"], "thumbs.media.crank.local", "{v}");
    assert_eq!(
        e["address"],
        inbound.to_string(),
        "peers reach the sidecar, not the shim"
    );
    assert_eq!(
        e["labels"]["gpu"], "none",
        "the shim's detected labels: {v}"
    );
    assert_eq!(
        e["labels"]["pool"], "thumbs",
        "and its configured ones: {v}"
    );
    wait_until(
        "the caller reaches the worker",
        Duration::from_secs(10),
        || get(port) == 200,
    );
    let (_, out) = curl(&["-d", "x", &format!("http://{port}/echo")]);
    assert!(out.contains("\"service\": \"thumbs\""), "{out}");

    // The shim stops: it deregisters first, its sidecar follows at once.
    shim.signal(libc::SIGTERM);
    let asked = Instant::now();
    wait_until("the endpoint leaves", Duration::from_secs(5), || {
        !cp.ctl_ok(&["endpoints"]).contains("thumbnail:v1")
    });
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "before the 3 s lease could expire: {:?}",
        asked.elapsed()
    );
    let _ = shim.wait_exit(Duration::from_secs(10));
    wait_until(
        "the caller is told there is no endpoint",
        Duration::from_secs(5),
        || {
            let (status, text) = curl(&[&format!("http://{port}/echo")]);
            status == 503 && crank_tests::header(&text, "x-crank-error") == Some("no-endpoints")
        },
    );
}

#[test]
fn pushed_quotas_and_policies_take_effect_on_the_proxies() {
    let app = EchoApp::start();
    let cp = control("10s");
    let dir = tempfile::tempdir().unwrap();
    // The worker's sidecar enforces the policy set in `policies`, which
    // crank-control keeps up to date (mesh.policy_dir). It starts with a
    // set that denies nothing.
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("policy.yaml"), "mode: enforce\n").unwrap();
    std::fs::write(
        policies.join("open.rego"),
        "package crank.authz\n\nallow := true\n\ndeny contains \"never\" if {\n\tfalse\n}\n",
    )
    .unwrap();
    let (inbound, sadmin) = (free_addr(), free_addr());
    let server_yaml = format!(
        "{}inbound: {{listen: {inbound}, app: {}}}\npolicy:\n  inbound: {{dir: {}}}\n  reload_interval: 100ms\nmesh:\n  watch_wait: 2s\n  policy_dir: {}\n  register:\n    capabilities: [hello:v1]\n    labels: {{pool: a}}\nadmin: {{listen: {sadmin}}}\nthreads: 1\n",
        cp.enroll_yaml(dir.path(), "srv", "backend", "demo", "2s"),
        app.addr,
        policies.display(),
        policies.display(),
    );
    let server = Proxy::start(dir.path(), "srv", &server_yaml, sadmin);
    let (_c, port) = client(&cp, dir.path(), "client");
    wait_until("served", Duration::from_secs(10), || get(port) == 200);
    assert_eq!(curl(&[&format!("http://{port}/forbidden")]).0, 200);

    // One edit: an outbound quota for the caller's tenant, and a policy
    // that closes /forbidden.
    // The burst leaves room for the requests below that reach the worker
    // before its sidecar has reloaded the policy (the caller's sidecar may
    // apply the quota first): with a burst of 3, a loaded machine used it up
    // on 200s and the wait saw only 429s.
    write(&cp, "quotas.yaml", "limits:\n  - {tenant: demo, capability: hello:v1, rate: 3/min, burst: 20, direction: outbound}\n");
    write(&cp, "policies/policy.yaml", "mode: enforce\n");
    // The pushed set replaces the local one file by file (same name).
    write(&cp, "policies/open.rego", "package crank.authz\n\nallow := true\n\ndeny contains \"the /forbidden path is closed\" if {\n\tinput.request.path == \"/forbidden\"\n}\n");
    write(&cp, "policies/closed_test.rego", "package crank.authz_test\n\nimport data.crank.authz\n\ntest_forbidden_is_denied if {\n\tcount(authz.deny) > 0 with input as {\"request\": {\"path\": \"/forbidden\"}}\n}\n");
    let arrived = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::read_to_string(policies.join("open.rego")).is_ok_and(|t| t.contains("/forbidden"))
    });
    assert!(
        arrived,
        "the policy did not reach the worker's sidecar:\n{}\n{}",
        cp.ctl_ok(&["status"]),
        server.log_text()
    );
    let mut last = String::new();
    wait_until(
        "the new policy denies /forbidden",
        Duration::from_secs(10),
        || {
            // Paced, so that the quota's burst outlasts the reload.
            std::thread::sleep(Duration::from_millis(200));
            let (status, text) = curl(&[&format!("http://{port}/forbidden")]);
            assert_ne!(
                status,
                429,
                "the quota's burst ran out before the worker's sidecar applied the policy:\n{text}\n{}",
                server.log_text()
            );
            last = text;
            status == 403
        },
    );
    assert!(last.contains("the /forbidden path is closed"), "{last}");
    assert!(
        !policies.join("open.rego").exists()
            || std::fs::read_to_string(policies.join("open.rego")).is_ok()
    );
    // The quota: 20 requests pass (some were used above), then 429.
    let mut statuses = Vec::new();
    for _ in 0..25 {
        statuses.push(get(port));
    }
    assert!(
        statuses.contains(&429),
        "the pushed quota limits the caller: {statuses:?}"
    );
}

#[test]
fn a_route_whose_clients_leave_this_service_out_says_so() {
    let app = EchoApp::start();
    let cp = control("10s");
    write(
        &cp,
        "routes/backend.yaml",
        "routes:\n  - name: backend\n    match: {hosts: [backend]}\n    clients: [billing]\n    backends:\n      - {capability: hello:v1}\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let _srv = server(&cp, dir.path(), "srv", app.addr, "{pool: a}");
    let (proxy, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "{}outbound: {{http_proxy: {proxy}}}\nmesh:\n  watch_wait: 2s\nadmin: {{listen: {admin}}}\nthreads: 1\n",
        cp.enroll_yaml(dir.path(), "caller", "frontend", "demo", "2s"),
    );
    let caller = Proxy::start(dir.path(), "caller", &yaml, admin);
    wait_until("version 1 applied", Duration::from_secs(10), || {
        seq_of(&caller) == 1
    });
    let (status, out) = curl(&["-x", &format!("http://{proxy}"), "http://backend/hello"]);
    assert_eq!(status, 404, "{out}");
    assert_eq!(crank_tests::header(&out, "x-crank-error"), Some("no-route"));
    assert!(
        // In the JSON body's message, with its quotes escaped.
        out.contains("clients") && out.contains(r#"\"frontend\""#),
        "the answer names the clients filter and this service: {out}"
    );
}

/// `tenants.yaml` reaches the worker shims through their sidecars: pushed
/// with the mesh update and served on the sidecar's admin listener
/// (`GET /mesh/tenants`, which `exec.queue.tenants_from` polls).
#[test]
fn pushed_tenants_are_served_by_the_sidecar_and_follow_edits() {
    let cp = control("10s");
    let dir = tempfile::tempdir().unwrap();
    let (sidecar, _port) = client(&cp, dir.path(), "client");
    let tenants = || sidecar.admin_get("/mesh/tenants");
    wait_until("a mesh update applied", Duration::from_secs(10), || {
        seq_of(&sidecar) > 0
    });
    let (code, body) = tenants();
    assert_eq!(code, 404, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        err["error"].as_str().unwrap().contains("tenants.yaml"),
        "{body}"
    );

    write(
        &cp,
        "tenants.yaml",
        "tenants:\n  - {name: acme, weight: 2, max_queued: 10}\n",
    );
    let max_queued = |want: u64| {
        let (code, body) = tenants();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        code == 200 && v["tenants"][0]["max_queued"] == want
    };
    wait_until(
        "the pushed tenants are served",
        Duration::from_secs(10),
        || max_queued(10),
    );
    let (_, body) = tenants();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["tenants"][0]["name"], "acme");
    assert_eq!(v["tenants"][0]["weight"], 2.0);

    write(
        &cp,
        "tenants.yaml",
        "tenants:\n  - {name: acme, weight: 2, max_queued: 20}\n",
    );
    wait_until("the edit is served", Duration::from_secs(10), || {
        max_queued(20)
    });
    // The sidecar serves an update's tenants a moment before its
    // config_dump reports the update's seq (it keeps the update on disk in
    // between): wait for the seq crank-control published.
    let published = status(&cp)["version"]["seq"].as_u64().unwrap();
    wait_until(
        "the edit's seq is reported",
        Duration::from_secs(10),
        || seq_of(&sidecar) == published,
    );
    // A bad edit is refused by crank-control: the sidecar keeps the last.
    let seq = seq_of(&sidecar);
    write(
        &cp,
        "tenants.yaml",
        "tenants:\n  - {name: acme, weight: 0}\n",
    );
    wait_until("the bad edit is refused", Duration::from_secs(10), || {
        status(&cp)["last_error"]
            .to_string()
            .contains("tenants.yaml")
    });
    assert_eq!(seq_of(&sidecar), seq);
    assert!(max_queued(20), "{:?}", tenants());
}
