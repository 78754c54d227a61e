//! Resilience end to end, with real sidecars, real mTLS and real clients:
//! 429 quotas, 503 shedding, outlier ejection and recovery, retries to a
//! healthy endpoint, request timeouts, idempotent replay and fault
//! injection.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crank_tests::proxy::free_addr;
use crank_tests::{
    curl, header, metric, wait_until, EchoApp, FlakyApp, Mesh, MeshOptions, Pki, Proxy,
};

/// Several worker sidecars (identity `backend.demo`), each in front of its
/// own flaky app, and one client sidecar whose route `backend` lists them.
struct Pool {
    _pki: Pki,
    apps: Vec<FlakyApp>,
    _servers: Vec<Proxy>,
    inbounds: Vec<SocketAddr>,
    client: Proxy,
    port: SocketAddr,
}

impl Pool {
    fn start(n: usize, route_extra: &str) -> Pool {
        let pki = Pki::new();
        let bundle = pki.bundle();
        let leaf = pki.leaf("backend", "demo");
        let mut apps = Vec::new();
        let mut servers = Vec::new();
        let mut inbounds = Vec::new();
        for i in 0..n {
            let app = FlakyApp::start(&format!("w{i}"));
            let (inbound, admin) = (free_addr(), free_addr());
            let yaml = format!(
                "identity: {{cert: {}, key: {}, trust_bundle: {}}}\n\
                 inbound: {{listen: {inbound}, app: {}}}\nadmin: {{listen: {admin}}}\n",
                leaf.cert.display(),
                leaf.key.display(),
                bundle.display(),
                app.addr,
            );
            servers.push(Proxy::start(pki.path(), &format!("w{i}"), &yaml, admin));
            apps.push(app);
            inbounds.push(inbound);
        }
        let cleaf = pki.leaf("frontend", "demo");
        let (port, admin) = (free_addr(), free_addr());
        let endpoints: String = inbounds
            .iter()
            .map(|a| format!("      - {{address: {a}, identity: backend.demo.crank.local}}\n"))
            .collect();
        let yaml = format!(
            "identity: {{cert: {}, key: {}, trust_bundle: {}}}\n\
             outbound:\n  ports: [{{listen: {port}, route: backend}}]\n\
             routes:\n  - name: backend\n    endpoints:\n{endpoints}{route_extra}\
             admin: {{listen: {admin}}}\n",
            cleaf.cert.display(),
            cleaf.key.display(),
            bundle.display(),
        );
        let client = Proxy::start(pki.path(), "client", &yaml, admin);
        Pool {
            _pki: pki,
            apps,
            _servers: servers,
            inbounds,
            client,
            port,
        }
    }

    fn get(&self, path: &str) -> (u16, String) {
        curl(&[&format!("http://{}{path}", self.port)])
    }
}

/// Runs `n` curl requests at once; returns (status, x-crank-error, output).
fn concurrently(n: usize, args: Vec<String>) -> Vec<(u16, Option<String>, String)> {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let args = args.clone();
            std::thread::spawn(move || {
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                let (status, out) = curl(&refs);
                let reason = header(&out, "x-crank-error").map(str::to_string);
                (status, reason, out)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn quota_answers_429_with_retry_after_and_ratelimit_headers_per_tenant() {
    let app = EchoApp::start();
    let mesh = Mesh::start(
        app.addr,
        MeshOptions {
            server_extra: "quotas:\n  response_headers: always\n  limits:\n    - {name: demo-any, tenant: demo, capability: \"*\", rate: 5/min}\n".into(),
            ..MeshOptions::default()
        },
    );
    for i in 0..5 {
        let (status, out) = curl(&[&mesh.port_url("/q")]);
        assert_eq!(status, 200, "request {i} is within the quota: {out}");
        assert_eq!(
            header(&out, "ratelimit-policy"),
            Some("\"demo-any\";q=5;w=60")
        );
        let want = format!("\"demo-any\";r={};", 4 - i);
        assert!(
            header(&out, "ratelimit").is_some_and(|v| v.starts_with(&want)),
            "{out}"
        );
    }
    let (status, out) = curl(&[&mesh.port_url("/q")]);
    assert_eq!(status, 429, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("rate-limited"));
    // 5 per minute: one token every 12 s.
    let retry_after: u64 = header(&out, "retry-after").unwrap().parse().unwrap();
    assert!((11..=12).contains(&retry_after), "{out}");
    assert!(header(&out, "ratelimit")
        .unwrap()
        .starts_with("\"demo-any\";r=0;t="));
    // The JSON body's message names the tenant (its quotes escaped).
    assert!(
        out.contains(r#"tenant \"demo\""#),
        "the body names the tenant: {out}"
    );
    assert_eq!(app.count(), 5, "the refused request never reached the app");
    let m = mesh.server.metrics();
    assert_eq!(
        metric(
            &m,
            "crank_ratelimited_total{capability=\"\",direction=\"inbound\",tenant=\"demo\"}"
        ),
        Some(1.0),
        "{m}"
    );

    // Another tenant's caller is not affected.
    let leaf = mesh.pki.leaf("frontend", "acme");
    let (port, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "identity: {{cert: {}, key: {}, trust_bundle: {}}}\n\
         outbound:\n  ports: [{{listen: {port}, route: backend}}]\n\
         routes:\n  - name: backend\n    endpoints: [{{address: {}, identity: backend.demo.crank.local}}]\n\
         admin: {{listen: {admin}}}\n",
        leaf.cert.display(),
        leaf.key.display(),
        mesh.pki.bundle().display(),
        mesh.inbound,
    );
    let _acme = Proxy::start(mesh.pki.path(), "acme", &yaml, admin);
    for _ in 0..6 {
        let (status, out) = curl(&[&format!("http://{port}/q")]);
        assert_eq!(status, 200, "tenant acme has no quota here: {out}");
        assert!(header(&out, "ratelimit").is_none());
    }
}

#[test]
fn a_full_app_sheds_503_at_once_without_touching_it() {
    let app = EchoApp::start();
    let mesh = Mesh::start(
        app.addr,
        MeshOptions {
            inbound_extra: "concurrency: {max_concurrent: 2, max_queue: 2, queue_timeout: 300ms, retry_after: 2s}".into(),
            route_extra: "    retry: {attempts: 0}\n".into(),
            ..MeshOptions::default()
        },
    );
    let started = Instant::now();
    let results = concurrently(12, vec![mesh.port_url("/slow")]);
    let count = |want: Option<&str>, status: u16| {
        results
            .iter()
            .filter(|(s, r, _)| *s == status && r.as_deref() == want)
            .count()
    };
    assert_eq!(count(None, 200), 2, "{results:#?}");
    assert_eq!(count(Some("queue-timeout"), 503), 2, "{results:#?}");
    assert_eq!(count(Some("overloaded"), 503), 8, "{results:#?}");
    for (s, _, out) in &results {
        if *s == 503 {
            assert_eq!(header(out, "retry-after"), Some("2"), "{out}");
        }
    }
    assert_eq!(app.count(), 2, "shed requests never reached the app");
    assert!(started.elapsed() < Duration::from_secs(10));
    let m = mesh.server.metrics();
    assert_eq!(
        metric(
            &m,
            "crank_shed_total{direction=\"inbound\",reason=\"queue-full\",route=\"app\"}"
        ),
        Some(8.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "crank_shed_total{direction=\"inbound\",reason=\"queue-timeout\",route=\"app\"}"
        ),
        Some(2.0)
    );
    // With the load gone, requests pass again.
    let (status, out) = curl(&[&mesh.port_url("/after")]);
    assert_eq!(status, 200, "{out}");
}

#[test]
fn a_failing_endpoint_is_ejected_retried_around_probed_and_recovered() {
    let pool = Pool::start(
        2,
        "    circuit: {consecutive_failures: 5, base_ejection: 1s, max_ejection: 10s}\n",
    );
    let (bad, good) = (&pool.apps[0], &pool.apps[1]);
    bad.fail_with(503);
    // The balancer sends the failing endpoint less and less (each failure
    // doubles its latency estimate), but it is still tried now and then
    // until 5 failures in a row eject it.
    let mut sent = 0;
    while bad.count() < 5 {
        assert!(
            sent < 5000,
            "the failing endpoint got {} requests",
            bad.count()
        );
        let (status, out) = pool.get(&format!("/work/{sent}"));
        sent += 1;
        assert_eq!(
            status, 200,
            "callers see retries succeed, not errors: {out}"
        );
        assert!(out.contains("w1 #"), "{out}");
    }
    assert_eq!(good.count(), sent);
    // Ejected: nothing more reaches it.
    for i in 0..10 {
        assert_eq!(pool.get(&format!("/ejected/{i}")).0, 200);
    }
    assert_eq!(bad.count(), 5, "ejected after 5 consecutive failures");
    let m = pool.client.metrics();
    let ep = pool.inbounds[0];
    assert_eq!(
        metric(
            &m,
            &format!("crank_circuit_state{{endpoint=\"{ep}\",route=\"backend\"}}")
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            &format!("crank_circuit_ejections_total{{endpoint=\"{ep}\",route=\"backend\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "crank_retries_total{reason=\"gateway-error\",route=\"backend\"}"
        ),
        Some(5.0),
        "{m}"
    );

    // Healthy again: after the ejection (1 s, up to 25% jitter) one probe
    // goes to it, succeeds, and it is back in rotation.
    bad.fail_with(0);
    wait_until(
        "a probe to the recovered endpoint",
        Duration::from_secs(10),
        || {
            let (status, out) = pool.get("/again");
            assert_eq!(status, 200, "{out}");
            bad.count() > 5
        },
    );
    // Back in rotation: its latency estimate started afresh with the probe.
    wait_until(
        "the recovered endpoint back in rotation",
        Duration::from_secs(5),
        || {
            assert_eq!(pool.get("/after").0, 200);
            bad.count() >= 7
        },
    );
    let m = pool.client.metrics();
    assert_eq!(
        metric(
            &m,
            &format!("crank_circuit_state{{endpoint=\"{ep}\",route=\"backend\"}}")
        ),
        Some(0.0),
        "{m}"
    );
}

#[test]
fn with_every_endpoint_ejected_the_circuit_is_open_and_fails_fast() {
    let pool = Pool::start(
        1,
        "    retry: {attempts: 0}\n    circuit: {consecutive_failures: 2, base_ejection: 30s}\n",
    );
    pool.apps[0].fail_with(502);
    assert_eq!(pool.get("/a").0, 502);
    assert_eq!(pool.get("/b").0, 502);
    let (status, out) = pool.get("/c");
    assert_eq!(status, 503, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("circuit-open"));
    assert_eq!(header(&out, "retry-after"), Some("30"));
    assert_eq!(
        pool.apps[0].count(),
        2,
        "the open circuit spares the endpoint"
    );
}

#[test]
fn a_post_is_not_retried_but_a_get_is_and_the_budget_caps_retries() {
    let pool = Pool::start(
        1,
        "    retry: {attempts: 2, budget_ratio: 0.0, budget_min_per_second: 1, budget_window: 1s}\n    circuit: {consecutive_failures: 0}\n",
    );
    pool.apps[0].fail_with(503);
    let (status, _) = curl(&["-X", "POST", "-d", "x", &format!("http://{}/p", pool.port)]);
    assert_eq!(status, 503);
    assert_eq!(pool.apps[0].count(), 1, "a POST is not sent twice");
    // A GET is retried, but the budget (1 retry per second, no ratio)
    // stops a retry storm: 10 failing GETs add at most a couple of retries.
    for _ in 0..10 {
        assert_eq!(pool.get("/g").0, 503);
    }
    let extra = pool.apps[0].count() - 11;
    assert!((1..=3).contains(&extra), "{extra} retries");
    let m = pool.client.metrics();
    assert!(
        metric(&m, "crank_retry_budget_exhausted_total{route=\"backend\"}").unwrap_or(0.0) >= 7.0,
        "{m}"
    );
}

#[test]
fn the_route_timeout_answers_504_with_its_reason() {
    let app = EchoApp::start();
    let mesh = Mesh::start(
        app.addr,
        MeshOptions {
            route_extra: "    timeout: 300ms\n".into(),
            ..MeshOptions::default()
        },
    );
    let (status, out) = curl(&[&mesh.port_url("/slow")]);
    assert_eq!(status, 504, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("request-timeout"));
    assert!(out.contains("route's request timeout"), "{out}");
    assert_eq!(curl(&[&mesh.port_url("/fast")]).0, 200);
    let m = mesh.client.metrics();
    assert_eq!(
        metric(&m, "crank_request_timeouts_total{route=\"backend\"}"),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn an_idempotency_key_replays_the_first_result_without_a_second_upstream_call() {
    let app = EchoApp::start();
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    let url = mesh.port_url("/transcode");
    let post = |key: &str, body: &str| {
        curl(&[
            "-X",
            "POST",
            "-H",
            &format!("Idempotency-Key: {key}"),
            "-d",
            body,
            &url,
        ])
    };
    let (s1, first) = post("job-1", "clip.mp4");
    assert_eq!(s1, 200, "{first}");
    assert_eq!(header(&first, "idempotent-replayed"), None);
    let (s2, second) = post("job-1", "clip.mp4");
    assert_eq!(s2, 200, "{second}");
    assert_eq!(header(&second, "idempotent-replayed"), Some("true"));
    let body = |t: &str| t.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    assert_eq!(
        body(&first),
        body(&second),
        "the first result, byte for byte"
    );
    assert_eq!(app.count(), 1, "the upstream ran once");

    let (s3, out) = post("job-1", "other.mp4");
    assert_eq!(s3, 422, "{out}");
    assert_eq!(
        header(&out, "x-crank-error"),
        Some("idempotency-key-mismatch")
    );
    assert_eq!(app.count(), 1);

    // A duplicate that arrives while the first runs waits for its result.
    let results = concurrently(
        2,
        [
            "-X",
            "POST",
            "-H",
            "Idempotency-Key: job-2",
            "-d",
            "slow",
            &mesh.port_url("/slow"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    );
    assert!(results.iter().all(|(s, _, _)| *s == 200), "{results:#?}");
    let replayed = results
        .iter()
        .filter(|(_, _, o)| header(o, "idempotent-replayed") == Some("true"))
        .count();
    assert_eq!(replayed, 1, "{results:#?}");
    assert_eq!(app.count(), 2, "the slow job ran once for both callers");

    // Without a key, or with an idempotent method, nothing is kept.
    assert_eq!(curl(&["-X", "POST", "-d", "x", &url]).0, 200);
    assert_eq!(curl(&["-X", "POST", "-d", "x", &url]).0, 200);
    assert_eq!(app.count(), 4);
    let m = mesh.server.metrics();
    assert_eq!(
        metric(&m, "crank_idempotent_replays_total{result=\"replayed\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "crank_idempotent_replays_total{result=\"mismatch\"}"),
        Some(1.0)
    );
}

#[test]
fn fault_injection_hits_the_configured_shares() {
    let app = EchoApp::start();
    let mesh = Mesh::start(
        app.addr,
        MeshOptions {
            route_extra: "    fault: {delay: {percent: 20, duration: 5ms}, abort: {percent: 30, status: 503}}\n".into(),
            ..MeshOptions::default()
        },
    );
    let n = 400;
    let mut aborted = 0;
    for i in 0..n {
        let (status, out) = curl(&[&mesh.port_url(&format!("/f{i}"))]);
        match status {
            200 => {}
            503 => {
                assert_eq!(
                    header(&out, "x-crank-error"),
                    Some("fault-injected"),
                    "{out}"
                );
                aborted += 1;
            }
            s => panic!("unexpected {s}: {out}"),
        }
    }
    // 30% of 400 = 120; binomial sd ~9, allow 4 sd.
    assert!((84..=156).contains(&aborted), "{aborted} aborted");
    assert_eq!(
        app.count(),
        n - aborted,
        "aborted requests never left the sidecar"
    );
    let m = mesh.client.metrics();
    let delayed = metric(
        &m,
        "crank_faults_injected_total{kind=\"delay\",route=\"backend\"}",
    )
    .unwrap();
    // 20% of 400 = 80; sd 8.
    assert!((48.0..=112.0).contains(&delayed), "{delayed} delayed");
    assert_eq!(
        metric(
            &m,
            "crank_faults_injected_total{kind=\"abort\",route=\"backend\"}"
        ),
        Some(aborted as f64)
    );
}

#[test]
fn a_duplicate_in_reject_mode_gets_409_and_the_log_says_who_answered() {
    let app = EchoApp::start();
    let mesh = Mesh::start(
        app.addr,
        MeshOptions {
            inbound_extra: "idempotency: {in_flight: reject}".into(),
            ..MeshOptions::default()
        },
    );
    let args: Vec<String> = [
        "-X",
        "POST",
        "-H",
        "Idempotency-Key: \"job-9\"",
        "-d",
        "slow",
        &mesh.port_url("/slow"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let first = {
        let args = args.clone();
        std::thread::spawn(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(&refs)
        })
    };
    // The first is running (the app sleeps 1.5 s on /slow).
    wait_until(
        "the first request is in flight",
        Duration::from_secs(5),
        || metric(&mesh.server.metrics(), "crank_inflight_requests") == Some(1.0),
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, out) = curl(&refs);
    assert_eq!(status, 409, "a duplicate during the first request: {out}");
    assert_eq!(
        header(&out, "x-crank-error"),
        Some("idempotency-key-in-use")
    );
    assert_eq!(header(&out, "retry-after"), Some("1"));
    assert_eq!(first.join().unwrap().0, 200);
    // Once the first is done, a duplicate gets its result.
    let (status, out) = curl(&refs);
    assert_eq!(status, 200, "{out}");
    assert_eq!(header(&out, "idempotent-replayed"), Some("true"));
    assert_eq!(app.count(), 1);
    wait_until(
        "the access log names the replay",
        Duration::from_secs(5),
        || {
            mesh.server
                .log_text()
                .contains("\"answered_by\":\"idempotency-replay\"")
        },
    );
    assert!(mesh
        .server
        .log_text()
        .contains("\"answered_by\":\"idempotency-key-in-use\""));
}

#[test]
fn a_chaos_drill_is_switched_on_and_off_by_editing_the_route() {
    let app = EchoApp::start();
    let mesh = Mesh::start(app.addr, MeshOptions::default());
    assert_eq!(curl(&[&mesh.port_url("/before")]).0, 200);
    let original = std::fs::read_to_string(&mesh.client.config).unwrap();
    let marker = "    endpoints: [";
    let with = |route_lines: &str| {
        let i = original.find(marker).expect("the route's endpoints line");
        let mut s = original.clone();
        s.insert_str(i, route_lines);
        s
    };
    // An invalid drill is refused whole; the running config keeps serving.
    std::fs::write(
        &mesh.client.config,
        with("    fault: {abort: {percent: 150, status: 503}}\n"),
    )
    .unwrap();
    wait_until(
        "the refused change is reported",
        Duration::from_secs(10),
        || {
            mesh.client
                .admin_get("/config_dump")
                .1
                .contains("fault.abort.percent")
        },
    );
    assert_eq!(curl(&[&mesh.port_url("/still")]).0, 200);
    // Every request aborted with 503 while the drill runs.
    std::fs::write(
        &mesh.client.config,
        with("    fault: {abort: {percent: 100, status: 503}}\n"),
    )
    .unwrap();
    wait_until("the drill applies", Duration::from_secs(10), || {
        let (status, out) = curl(&[&mesh.port_url("/drill")]);
        status == 503 && header(&out, "x-crank-error") == Some("fault-injected")
    });
    std::fs::write(&mesh.client.config, &original).unwrap();
    wait_until("the drill ends", Duration::from_secs(10), || {
        curl(&[&mesh.port_url("/after")]).0 == 200
    });
}

#[test]
fn a_resent_idempotent_request_reaches_the_replica_that_kept_the_result() {
    let pool = Pool::start(3, "");
    let url = format!("http://{}/transcode", pool.port);
    for key in ["job-a", "job-b", "job-c", "job-d"] {
        let before: usize = pool.apps.iter().map(FlakyApp::count).sum();
        let post = || {
            curl(&[
                "-X",
                "POST",
                "-H",
                &format!("Idempotency-Key: {key}"),
                "-d",
                "clip",
                &url,
            ])
        };
        let (s1, first) = post();
        let (s2, second) = post();
        assert_eq!((s1, s2), (200, 200), "{first}\n{second}");
        assert_eq!(
            header(&second, "idempotent-replayed"),
            Some("true"),
            "{second}"
        );
        assert_eq!(header(&first, "x-app"), header(&second, "x-app"));
        let after: usize = pool.apps.iter().map(FlakyApp::count).sum();
        assert_eq!(after - before, 1, "{key} ran once across the replicas");
    }
}

#[test]
fn by_default_ratelimit_headers_appear_only_near_the_limit() {
    let app = EchoApp::start();
    let mesh = Mesh::start(
        app.addr,
        MeshOptions {
            server_extra: "quotas:\n  limits:\n    - {name: q8, tenant: demo, capability: \"*\", rate: 8/min}\n".into(),
            ..MeshOptions::default()
        },
    );
    // Burst 8: after requests 1..5, 7..3 are left (more than a quarter):
    // no headers. From 2 left on, the caller sees the limit coming.
    for i in 1..=8 {
        let (status, out) = curl(&[&mesh.port_url("/n")]);
        assert_eq!(status, 200, "{out}");
        let left = 8 - i;
        let want = (left * 4 <= 8).then(|| format!("\"q8\";r={left};"));
        match want {
            None => assert_eq!(header(&out, "ratelimit"), None, "request {i}: {out}"),
            Some(w) => assert!(
                header(&out, "ratelimit").is_some_and(|v| v.starts_with(&w)),
                "request {i}: {out}"
            ),
        }
    }
    let (status, out) = curl(&[&mesh.port_url("/n")]);
    assert_eq!(status, 429);
    assert_eq!(header(&out, "ratelimit-policy"), Some("\"q8\";q=8;w=60"));
}
