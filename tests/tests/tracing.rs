//! Distributed tracing as an SRE relies on it, through real sidecars and a
//! real OTLP/HTTP receiver that decodes the protobuf with the official
//! definitions: one trace across two sidecars with the right parent/child
//! links and attributes, `traceparent` on the wire at each hop, sampling
//! decisions followed (and the root ratio changed live), invalid contexts
//! replaced, proxy-made errors carrying the trace id, and a collector that
//! is down or slow costing no request.

use std::time::Duration;

use crank_tests::{curl, header, metric, wait_until, EchoApp, Mesh, MeshOptions, OtlpReceiver};

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn tracing_yaml(endpoint: &str, sampling: f64) -> String {
    format!(
        "tracing:\n  sampling: {sampling}\n  scheduled_delay: 100ms\n  otlp: {{endpoint: \"{endpoint}\"}}\n"
    )
}

fn traced_mesh(app: &EchoApp, rx: &OtlpReceiver, client_ratio: f64) -> Mesh {
    Mesh::start(
        app.addr,
        MeshOptions {
            client_extra: tracing_yaml(&rx.endpoint(), client_ratio),
            server_extra: tracing_yaml(&rx.endpoint(), 1.0),
            ..MeshOptions::default()
        },
    )
}

/// (version, trace id, parent id, flags) of a `traceparent` value.
fn fields(tp: &str) -> (String, String, String, String) {
    let p: Vec<&str> = tp.split('-').collect();
    assert_eq!(p.len(), 4, "{tp}");
    (p[0].into(), p[1].into(), p[2].into(), p[3].into())
}

#[test]
fn one_trace_across_two_sidecars_with_links_and_attributes() {
    let app = EchoApp::start();
    let rx = OtlpReceiver::start();
    let mesh = traced_mesh(&app, &rx, 1.0);
    let (status, out) = curl(&[
        "-H",
        &format!("traceparent: {TP}"),
        "-H",
        "tracestate: vendor1=opaque1",
        "-H",
        "tracestate: rojo=00f067aa0ba902b7",
        "-H",
        "user-agent: trace-test/1",
        &mesh.port_url("/transcode/42?secret=x"),
    ]);
    assert_eq!(status, 200, "{out}");

    // On the wire to the app: same trace, a new parent (the server span),
    // the caller's flags, and the caller's tracestate combined in order.
    let seen = app.last().unwrap();
    let (v, trace, app_parent, flags) = fields(seen.header("traceparent").unwrap());
    assert_eq!(
        (v.as_str(), trace.as_str(), flags.as_str()),
        ("00", TRACE, "01")
    );
    assert_ne!(app_parent, "00f067aa0ba902b7");
    assert_eq!(
        seen.header("tracestate"),
        Some("vendor1=opaque1,rojo=00f067aa0ba902b7")
    );

    wait_until("two spans", Duration::from_secs(10), || {
        rx.trace(TRACE).len() >= 2
    });
    let spans = rx.trace(TRACE);
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let client = spans
        .iter()
        .find(|s| s.kind() == "client")
        .expect("client span");
    let server = spans
        .iter()
        .find(|s| s.kind() == "server")
        .expect("server span");

    // Parent/child: caller → client span → server span → app.
    assert_eq!(client.parent_id_hex(), "00f067aa0ba902b7");
    assert_eq!(server.parent_id_hex(), client.span_id_hex());
    assert_eq!(app_parent, server.span_id_hex());
    assert_eq!(
        server.span.trace_state,
        "vendor1=opaque1,rojo=00f067aa0ba902b7"
    );

    // Semantic conventions and crank attributes.
    for s in [client, server] {
        assert_eq!(s.span.name, "GET");
        assert_eq!(s.attr("http.request.method").as_deref(), Some("GET"));
        assert_eq!(s.attr("http.response.status_code").as_deref(), Some("200"));
        assert_eq!(s.attr("crank.answered_by").as_deref(), Some("upstream"));
        assert_eq!(s.attr("crank.tenant").as_deref(), Some("demo"));
        assert_eq!(s.status_code(), 0, "unset on success");
        assert!(s.span.end_time_unix_nano >= s.span.start_time_unix_nano);
    }
    assert_eq!(client.attr("crank.direction").as_deref(), Some("outbound"));
    assert_eq!(client.attr("crank.route").as_deref(), Some("backend"));
    assert_eq!(
        client.attr("crank.peer.identity").as_deref(),
        Some("spiffe://crank.local/tenant/demo/svc/backend")
    );
    assert_eq!(
        client.attr("network.peer.port").as_deref(),
        Some(mesh.inbound.port().to_string().as_str())
    );
    assert_eq!(client.attr("server.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(
        client.attr("server.port").as_deref(),
        Some(mesh.port.port().to_string().as_str()),
        "the address the app called"
    );
    let url = client.attr("url.full").unwrap();
    assert!(
        url.ends_with("/transcode/42"),
        "no query in url.full: {url}"
    );
    assert_eq!(server.attr("crank.direction").as_deref(), Some("inbound"));
    assert_eq!(
        server.attr("crank.peer.identity").as_deref(),
        Some("spiffe://crank.local/tenant/demo/svc/frontend")
    );
    assert_eq!(server.attr("url.path").as_deref(), Some("/transcode/42"));
    assert_eq!(server.attr("url.scheme").as_deref(), Some("https"));
    assert_eq!(
        server.attr("user_agent.original").as_deref(),
        Some("trace-test/1")
    );
    assert_eq!(
        server.attr("network.protocol.version").as_deref(),
        Some("2")
    );

    // Resources name each sidecar's workload.
    assert_eq!(
        client.resource_attr("service.name").as_deref(),
        Some("frontend")
    );
    assert_eq!(
        server.resource_attr("service.name").as_deref(),
        Some("backend")
    );
    assert_eq!(
        server.resource_attr("crank.identity").as_deref(),
        Some("spiffe://crank.local/tenant/demo/svc/backend")
    );

    // Access log lines carry the ids, so logs and traces link up.
    let log = mesh.server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("crank::access") && l.contains(TRACE))
        .unwrap_or_else(|| panic!("no access line with the trace id:\n{log}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["fields"]["trace_id"], TRACE);
    assert_eq!(
        v["fields"]["span_id"].as_str(),
        Some(server.span_id_hex().as_str())
    );
    // Counted when the collector's answer to the batch is back, which can
    // be a moment after the collector has the span.
    wait_until(
        "the client counts its exported span",
        Duration::from_secs(5),
        || metric(&mesh.client.metrics(), "crank_spans_exported_total") == Some(1.0),
    );
}

#[test]
fn a_request_without_traceparent_gets_a_trace_that_starts_at_its_sidecar() {
    let app = EchoApp::start();
    let rx = OtlpReceiver::start();
    let mesh = traced_mesh(&app, &rx, 1.0);
    let (status, out) = curl(&["-H", "tracestate: orphan=1", &mesh.port_url("/new")]);
    assert_eq!(status, 200, "{out}");
    let seen = app.last().unwrap();
    let (_, trace, parent, flags) = fields(seen.header("traceparent").unwrap());
    assert_eq!(flags, "03", "sampled, with a random trace id (Level 2)");
    assert_eq!(
        seen.header("tracestate"),
        None,
        "no tracestate without a traceparent"
    );
    wait_until("two spans", Duration::from_secs(10), || {
        rx.trace(&trace).len() >= 2
    });
    let spans = rx.trace(&trace);
    let client = spans.iter().find(|s| s.kind() == "client").unwrap();
    let server = spans.iter().find(|s| s.kind() == "server").unwrap();
    assert!(
        client.span.parent_span_id.is_empty(),
        "the client span is the root"
    );
    assert_eq!(server.parent_id_hex(), client.span_id_hex());
    assert_eq!(parent, server.span_id_hex());
}

/// The W3C suite's (test/test.py) Level 2 `tracestate` cases, through a
/// sidecar pair: (headers, what the app gets).
#[test]
fn tracestate_follows_the_current_w3c_suite_end_to_end() {
    let app = EchoApp::start();
    let rx = OtlpReceiver::start();
    let mesh = traced_mesh(&app, &rx, 1.0);
    let key256 = format!("{}=1", "z".repeat(256));
    let key257 = format!("{}=1", "z".repeat(257));
    let with_256 = format!("foo=1,{key256}");
    let cases: Vec<(Vec<&str>, Option<&str>)> = vec![
        // duplicated keys are kept as sent
        (vec!["foo=1,foo=2"], Some("foo=1,foo=2")),
        (vec!["foo=1", "foo=1"], Some("foo=1,foo=1")),
        // `@` anywhere but first
        (vec!["foo@=1,bar=2"], Some("foo@=1,bar=2")),
        (vec!["foo@bar@baz=1,bar=2"], Some("foo@bar@baz=1,bar=2")),
        (vec!["@foo=1,bar=2"], None),
        // a 256-character key is kept, a 257-character one drops the header
        (vec!["foo=1", &key256], Some(&with_256)),
        (vec!["foo=1", &key257], None),
        // an upper-case key is still invalid
        (vec!["foo=1,FOO=1"], None),
    ];
    for (headers, want) in cases {
        let url = mesh.port_url("/ts");
        let tp = format!("traceparent: {TP}");
        let values: Vec<String> = headers.iter().map(|h| format!("tracestate: {h}")).collect();
        let mut args: Vec<&str> = vec!["-H", &tp];
        for v in &values {
            args.extend(["-H", v.as_str()]);
        }
        args.push(&url);
        let (status, out) = curl(&args);
        assert_eq!(status, 200, "{headers:?}: {out}");
        let seen = app.last().unwrap();
        assert_eq!(seen.header("tracestate"), want, "{headers:?}");
        let (_, trace, _, _) = fields(seen.header("traceparent").unwrap());
        assert_eq!(trace, TRACE, "{headers:?}: traceparent still used");
    }
}

#[test]
fn invalid_trace_context_is_replaced_never_forwarded() {
    let app = EchoApp::start();
    let rx = OtlpReceiver::start();
    let mesh = traced_mesh(&app, &rx, 1.0);
    let cases: &[&[&str]] = &[
        &[
            "-H",
            "traceparent: 00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ],
        &[
            "-H",
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ],
        &[
            "-H",
            "traceparent: 00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        ],
        &[
            "-H",
            "traceparent: ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ],
        &[
            "-H",
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ],
        &[
            "-H",
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "-H",
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ],
    ];
    for args in cases {
        let mut a: Vec<&str> = args.to_vec();
        let url = mesh.port_url("/bad");
        a.extend(["-H", "tracestate: a=1", &url]);
        let (status, out) = curl(&a);
        assert_eq!(status, 200, "{args:?}: {out}");
        let seen = app.last().unwrap();
        let tps: Vec<_> = seen
            .headers
            .iter()
            .filter(|(k, _)| k == "traceparent")
            .collect();
        assert_eq!(tps.len(), 1, "{args:?}: exactly one traceparent forwarded");
        let (v, trace, _, flags) = fields(&tps[0].1);
        assert_eq!(v, "00");
        assert_ne!(trace, TRACE, "{args:?}: a new trace");
        assert_ne!(trace, "00000000000000000000000000000000");
        assert_eq!(flags, "03");
        assert_eq!(seen.header("tracestate"), None, "{args:?}");
    }
    // A future version is parsed as the spec says and continued as 00.
    let (status, _) = curl(&[
        "-H",
        "traceparent: cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",
        &mesh.port_url("/future"),
    ]);
    assert_eq!(status, 200);
    let (v, trace, _, _) = fields(app.last().unwrap().header("traceparent").unwrap());
    assert_eq!((v.as_str(), trace.as_str()), ("00", TRACE));
}

#[test]
fn sampling_follows_the_parent_and_the_root_ratio_changes_live() {
    let app = EchoApp::start();
    let rx = OtlpReceiver::start();
    let mesh = traced_mesh(&app, &rx, 0.0);

    // An unsampled parent is followed: no spans, but the context still
    // flows with this hop's span as the parent.
    let unsampled = TP.replace("-01", "-00");
    let (status, _) = curl(&[
        "-H",
        &format!("traceparent: {unsampled}"),
        &mesh.port_url("/u"),
    ]);
    assert_eq!(status, 200);
    let (_, trace, parent, flags) = fields(app.last().unwrap().header("traceparent").unwrap());
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE, "00"));
    assert_ne!(parent, "00f067aa0ba902b7");

    // A sampled parent is followed even at ratio 0.
    let (status, _) = curl(&["-H", &format!("traceparent: {TP}"), &mesh.port_url("/s")]);
    assert_eq!(status, 200);
    wait_until("the sampled trace", Duration::from_secs(10), || {
        rx.trace(TRACE).len() >= 2
    });

    // New traces at ratio 0: none sampled, and the server sidecar (ratio 1)
    // follows the client's "not sampled".
    for _ in 0..20 {
        let (status, _) = curl(&[&mesh.port_url("/root")]);
        assert_eq!(status, 200);
        let (_, _, _, flags) = fields(app.last().unwrap().header("traceparent").unwrap());
        assert_eq!(flags, "02");
    }
    std::thread::sleep(Duration::from_millis(400)); // > scheduled_delay: anything queued is sent
    assert_eq!(rx.spans().len(), 2, "only the sampled parent's two spans");

    // The ratio changes by editing the config, without a restart.
    let cfg = std::fs::read_to_string(&mesh.client.config).unwrap();
    std::fs::write(
        &mesh.client.config,
        cfg.replace("sampling: 0", "sampling: 1.0"),
    )
    .unwrap();
    wait_until("the new ratio", Duration::from_secs(10), || {
        metric(&mesh.client.metrics(), "crank_trace_sampling_ratio") == Some(1.0)
    });
    let pid = mesh.client.pid();
    let (status, _) = curl(&[&mesh.port_url("/after-reload")]);
    assert_eq!(status, 200);
    let (_, trace, _, flags) = fields(app.last().unwrap().header("traceparent").unwrap());
    assert_eq!(flags, "03");
    wait_until("spans of the new trace", Duration::from_secs(10), || {
        rx.trace(&trace).len() >= 2
    });
    assert_eq!(mesh.client.pid(), pid, "no restart");
    assert_eq!(
        metric(
            &mesh.client.metrics(),
            "crank_config_reloads_total{result=\"applied\"}"
        ),
        Some(1.0)
    );

    // A change that needs a restart is refused, and the ratio stays.
    let cfg = std::fs::read_to_string(&mesh.client.config).unwrap();
    std::fs::write(&mesh.client.config, cfg.replace("threads: 1", "threads: 2")).unwrap();
    wait_until("the refusal", Duration::from_secs(10), || {
        metric(
            &mesh.client.metrics(),
            "crank_config_reloads_total{result=\"rejected\"}",
        ) == Some(1.0)
    });
    let (_, dump) = mesh.client.admin_get("/config_dump");
    assert!(dump.contains("need a restart"), "{dump}");
    assert!(dump.contains("threads"), "{dump}");
    assert_eq!(
        metric(&mesh.client.metrics(), "crank_trace_sampling_ratio"),
        Some(1.0)
    );
}

#[test]
fn proxy_made_errors_carry_the_trace_id_and_a_failed_span() {
    let app = EchoApp::start();
    let rx = OtlpReceiver::start();
    let mesh = traced_mesh(&app, &rx, 1.0);
    let (status, out) = curl(&[
        "-x",
        &format!("http://{}", mesh.http_proxy),
        "-H",
        &format!("traceparent: {TP}"),
        "http://nowhere/x",
    ]);
    assert_eq!(status, 404, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("no-route"), "{out}");
    assert_eq!(header(&out, "x-crank-trace-id"), Some(TRACE), "{out}");
    assert!(out.contains(&format!("\"trace_id\":\"{TRACE}\"")), "{out}");

    wait_until("the client span", Duration::from_secs(10), || {
        !rx.trace(TRACE).is_empty()
    });
    let s = &rx.trace(TRACE)[0];
    assert_eq!(s.kind(), "client");
    assert_eq!(s.attr("crank.answered_by").as_deref(), Some("no-route"));
    assert_eq!(s.attr("error.type").as_deref(), Some("no-route"));
    assert_eq!(s.attr("http.response.status_code").as_deref(), Some("404"));
    assert_eq!(s.status_code(), 2, "error status");
}

#[test]
fn a_collector_that_is_down_or_slow_costs_no_request_and_drops_are_counted() {
    // Down: nothing listens on the endpoint.
    let app = EchoApp::start();
    let dead = format!("http://127.0.0.1:{}/v1/traces", crank_tests::free_port());
    let mesh = Mesh::start(
        app.addr,
        MeshOptions {
            client_extra: format!(
                "tracing:\n  scheduled_delay: 50ms\n  otlp: {{endpoint: \"{dead}\", timeout: 500ms, headers: {{x-api-key: s3cret}}}}\n"
            ),
            ..MeshOptions::default()
        },
    );
    for i in 0..50 {
        let (status, out) = curl(&[&mesh.port_url(&format!("/down/{i}"))]);
        assert_eq!(status, 200, "{out}");
    }
    wait_until("export failures counted", Duration::from_secs(15), || {
        metric(
            &mesh.client.metrics(),
            "crank_spans_dropped_total{reason=\"export_failed\"}",
        )
        .is_some_and(|n| n >= 1.0)
    });
    let (_, dump) = mesh.client.admin_get("/config_dump");
    assert!(
        dump.contains("x-api-key") && !dump.contains("s3cret"),
        "{dump}"
    );
    drop(mesh);

    // Slow: the collector holds each export for 5 s; a small queue fills
    // and new spans are dropped while every request still succeeds.
    let rx = OtlpReceiver::start();
    rx.set_delay(Duration::from_secs(5));
    let mesh = Mesh::start(
        app.addr,
        MeshOptions {
            client_extra: format!(
                "tracing:\n  max_queue_size: 8\n  max_export_batch_size: 4\n  scheduled_delay: 20ms\n  otlp: {{endpoint: \"{}\", timeout: 10s}}\n",
                rx.endpoint()
            ),
            ..MeshOptions::default()
        },
    );
    for i in 0..60 {
        let (status, out) = curl(&[&mesh.port_url(&format!("/stuck-collector/{i}"))]);
        assert_eq!(status, 200, "{out}");
    }
    let text = mesh.client.metrics();
    let dropped = metric(&text, "crank_spans_dropped_total{reason=\"queue_full\"}").unwrap_or(0.0);
    assert!(
        dropped >= 40.0,
        "60 spans into a queue of 8 behind a stuck export: {dropped} dropped\n{text}\n{}",
        mesh.client.log_text()
    );
    assert_eq!(app.count(), 110, "every request reached the app");
}

#[test]
fn spans_still_queued_are_sent_when_the_proxy_drains() {
    let app = EchoApp::start();
    let rx = OtlpReceiver::start();
    // A long batch delay: nothing goes out on the timer during the test.
    let mut mesh = Mesh::start(
        app.addr,
        MeshOptions {
            client_extra: format!(
                "tracing:\n  scheduled_delay: 60s\n  otlp: {{endpoint: \"{}\"}}\n",
                rx.endpoint()
            ),
            ..MeshOptions::default()
        },
    );
    for i in 0..3 {
        let (status, _) = curl(&[&mesh.port_url(&format!("/last/{i}"))]);
        assert_eq!(status, 200);
    }
    assert!(rx.spans().is_empty(), "still queued");
    mesh.client.signal(libc::SIGTERM);
    let exit = mesh.client.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    let spans = rx.spans();
    assert_eq!(spans.len(), 3, "{spans:#?}");
    assert!(spans.iter().all(|s| s.kind() == "client"));
}

#[test]
fn a_policy_denial_shows_on_both_spans() {
    let app = EchoApp::start();
    let rx = OtlpReceiver::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("authz.rego"),
        "package crank.authz\n\ndefault allow := false\ndeny contains \"tracing test: nobody may call\" if true\n",
    )
    .unwrap();
    let mesh = Mesh::start(
        app.addr,
        MeshOptions {
            client_extra: tracing_yaml(&rx.endpoint(), 1.0),
            server_extra: format!(
                "{}policy: {{inbound: {{dir: {}}}, decision_log: {{enabled: false}}}}\n",
                tracing_yaml(&rx.endpoint(), 1.0),
                dir.path().display()
            ),
            ..MeshOptions::default()
        },
    );
    let (status, out) = curl(&[
        "-H",
        &format!("traceparent: {TP}"),
        &mesh.port_url("/denied"),
    ]);
    assert_eq!(status, 403, "{out}");
    assert_eq!(header(&out, "x-crank-trace-id"), Some(TRACE), "{out}");
    assert_eq!(app.count(), 0);
    wait_until("two spans", Duration::from_secs(10), || {
        rx.trace(TRACE).len() >= 2
    });
    let spans = rx.trace(TRACE);
    let client = spans.iter().find(|s| s.kind() == "client").unwrap();
    let server = spans.iter().find(|s| s.kind() == "server").unwrap();
    assert_eq!(server.parent_id_hex(), client.span_id_hex());
    // The server span: the policy answered; a 4xx is not a server error.
    assert_eq!(server.attr("crank.decision").as_deref(), Some("deny"));
    assert!(server
        .attr("crank.decision_id")
        .is_some_and(|d| !d.is_empty()));
    assert_eq!(
        server.attr("crank.answered_by").as_deref(),
        Some("policy-denied")
    );
    assert_eq!(server.status_code(), 0);
    // The client span: the peer's sidecar answered; a 4xx fails a client span.
    assert_eq!(
        client.attr("crank.answered_by").as_deref(),
        Some("peer:policy-denied")
    );
    assert_eq!(
        client.attr("http.response.status_code").as_deref(),
        Some("403")
    );
    assert_eq!(client.status_code(), 2);
}

#[test]
fn spans_go_to_an_otlp_grpc_collector_too() {
    let app = EchoApp::start();
    let rx = OtlpReceiver::start_grpc();
    let yaml = format!(
        "tracing:\n  scheduled_delay: 100ms\n  otlp: {{endpoint: \"{}\", protocol: grpc}}\n",
        rx.endpoint()
    );
    let mesh = Mesh::start(
        app.addr,
        MeshOptions {
            client_extra: yaml.clone(),
            server_extra: yaml,
            ..MeshOptions::default()
        },
    );
    let (status, _) = curl(&["-H", &format!("traceparent: {TP}"), &mesh.port_url("/grpc")]);
    assert_eq!(status, 200);
    wait_until("two spans over gRPC", Duration::from_secs(10), || {
        rx.trace(TRACE).len() >= 2
    });
    let spans = rx.trace(TRACE);
    let client = spans.iter().find(|s| s.kind() == "client").unwrap();
    let server = spans.iter().find(|s| s.kind() == "server").unwrap();
    assert_eq!(server.parent_id_hex(), client.span_id_hex());
    assert!(rx.requests() >= 1);
}

#[test]
fn a_retry_to_the_next_endpoint_is_its_own_client_span() {
    let app = EchoApp::start();
    let rx = OtlpReceiver::start();
    let mesh = traced_mesh(&app, &rx, 1.0);
    // A second client sidecar whose route has a dead endpoint that the
    // balancer picks first (all but certainly: weight 1000000 against 1).
    let leaf = mesh.pki.leaf("frontend", "demo");
    let (port, admin) = (
        crank_tests::proxy::free_addr(),
        crank_tests::proxy::free_addr(),
    );
    let dead = crank_tests::proxy::free_addr();
    let yaml = format!(
        "identity: {{cert: {}, key: {}, trust_bundle: {}}}\n\
         outbound:\n  ports: [{{listen: {port}, route: backend}}]\n\
         routes:\n  - name: backend\n    endpoints:\n      - {{address: {dead}, identity: backend.demo.crank.local, weight: 1000000}}\n      - {{address: {}, identity: backend.demo.crank.local}}\n\
         admin: {{listen: {admin}}}\n{}",
        leaf.cert.display(),
        leaf.key.display(),
        mesh.pki.bundle().display(),
        mesh.inbound,
        tracing_yaml(&rx.endpoint(), 1.0),
    );
    let client = crank_tests::Proxy::start(mesh.pki.path(), "retrying", &yaml, admin);
    let (status, out) = curl(&[
        "-X",
        "POST",
        "-d",
        "once",
        "-H",
        &format!("traceparent: {TP}"),
        &format!("http://{port}/retry"),
    ]);
    assert_eq!(
        status, 200,
        "a failed connect is retried on the live endpoint: {out}"
    );
    assert_eq!(app.count(), 1, "the app saw the request once");
    wait_until("three spans", Duration::from_secs(10), || {
        rx.trace(TRACE).len() >= 3
    });
    let spans = rx.trace(TRACE);
    let mut clients: Vec<_> = spans.iter().filter(|s| s.kind() == "client").collect();
    clients.sort_by_key(|s| s.span.start_time_unix_nano);
    assert_eq!(clients.len(), 2, "{spans:#?}");
    let (first, second) = (clients[0], clients[1]);
    assert_eq!(first.parent_id_hex(), "00f067aa0ba902b7");
    assert_eq!(second.parent_id_hex(), "00f067aa0ba902b7");
    assert_ne!(first.span_id_hex(), second.span_id_hex());
    assert_eq!(first.status_code(), 2);
    assert_eq!(
        first.attr("error.type").as_deref(),
        Some("upstream-connect-failed")
    );
    assert_eq!(
        first.attr("network.peer.port").as_deref(),
        Some(dead.port().to_string().as_str())
    );
    assert_eq!(first.attr("http.request.resend_count"), None);
    assert_eq!(
        second.attr("http.request.resend_count").as_deref(),
        Some("1")
    );
    assert_eq!(
        second.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    let server = spans.iter().find(|s| s.kind() == "server").unwrap();
    assert_eq!(server.parent_id_hex(), second.span_id_hex());
    drop(client);
}
