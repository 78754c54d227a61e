//! Rego policy as a security team relies on it, through real sidecars: a
//! server sidecar with an inbound policy set, client sidecars with different
//! identities calling it over mTLS. Allow, deny (403 body and headers, the
//! decision log entry), audit mode then enforce, fail-closed on an evaluation
//! error, hot reload under load with zero failed requests, a rejected change
//! keeping the last good revision, egress policy, the OPA-Envoy input shape,
//! and `crankctl policy test` catching a broken policy.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crank_tests::pki::Leaf;
use crank_tests::proxy::free_addr;
use crank_tests::raw_http::RawConn;
use crank_tests::{curl, header, metric, wait_until, EchoApp, Pki, Proxy};

/// Tenants may call transcode:v1 only with role `media`; bodies over 1000
/// bytes are denied; `/boom` times out (an evaluation error).
const AUTHZ: &str = r#"
package crank.authz

default allow := false
allow if count(deny) == 0

deny contains sprintf("tenant %q may not call %s: it needs role \"media\"", [input.source.tenant, input.destination.capability]) if {
    input.destination.capability == "transcode:v1"
    not "media" in object.get(data.roles, input.source.tenant, [])
}

deny contains sprintf("body of %d bytes is over the limit of %d", [input.request.body_size, data.limits.max_body_bytes]) if {
    input.request.body_size > data.limits.max_body_bytes
}

# /boom runs past the evaluation time limit (policy.yaml timeout, 50 ms by
# default): an evaluation error.
deny contains "unreachable" if {
    input.request.path == "/boom"
    count([x | some x in numbers.range(1, 20000000); x % 7 == 0]) < 0
}
"#;

const DATA: &str = "roles: {acme: [media], evil: [viewer]}\nlimits: {max_body_bytes: 1000}\n";

/// Writes a file atomically (write + rename), as a deploy tool or git
/// checkout does, so the reloader never reads half a file.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct PolicyMesh {
    pki: Pki,
    app: EchoApp,
    server: Proxy,
    inbound: SocketAddr,
    policy_dir: PathBuf,
    decision_log: PathBuf,
}

impl PolicyMesh {
    /// A server sidecar `transcoder.media` whose inbound policy set is
    /// `files`, reloaded every 100 ms, logging decisions to a file.
    fn start(files: &[(&str, &str)]) -> PolicyMesh {
        let pki = Pki::new();
        let policy_dir = pki.path().join("policies");
        std::fs::create_dir(&policy_dir).unwrap();
        for (name, text) in files {
            std::fs::write(policy_dir.join(name), text).unwrap();
        }
        let decision_log = pki.path().join("decisions.log");
        let app = EchoApp::start();
        let leaf = pki.leaf("transcoder", "media");
        let (inbound, admin) = (free_addr(), free_addr());
        let yaml = format!(
            "identity: {{cert: {}, key: {}, trust_bundle: {}}}\n\
             inbound: {{listen: {inbound}, app: {}}}\n\
             admin: {{listen: {admin}}}\n\
             policy:\n  inbound: {{dir: {}}}\n  reload_interval: 100ms\n  \
             decision_log: {{path: {}}}\n",
            leaf.cert.display(),
            leaf.key.display(),
            pki.bundle().display(),
            app.addr,
            policy_dir.display(),
            decision_log.display(),
        );
        let server = Proxy::start(pki.path(), "server", &yaml, admin);
        PolicyMesh {
            pki,
            app,
            server,
            inbound,
            policy_dir,
            decision_log,
        }
    }

    /// A client sidecar for `service.tenant` whose local port reaches the
    /// server through route `transcode` (capability `transcode:v1`).
    fn client(&self, service: &str, tenant: &str, extra: &str) -> (Proxy, SocketAddr) {
        let leaf = self.pki.leaf(service, tenant);
        client_sidecar(
            &self.pki,
            &leaf,
            self.inbound,
            &format!("{service}-{tenant}"),
            extra,
        )
    }

    fn log_lines(&self) -> Vec<serde_json::Value> {
        // Only whole lines: the writer thread may be in the middle of one.
        let text = std::fs::read_to_string(&self.decision_log).unwrap_or_default();
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        whole
            .lines()
            .map(|l| serde_json::from_str(l).expect("decision log lines are JSON"))
            .collect()
    }

    /// The decision log entry with this id (waits for the writer thread).
    fn decision(&self, id: &str) -> serde_json::Value {
        let mut found = None;
        wait_until(
            "the decision in the decision log",
            Duration::from_secs(5),
            || {
                found = self
                    .log_lines()
                    .into_iter()
                    .find(|l| l["decision_id"] == id);
                found.is_some()
            },
        );
        found.unwrap()
    }

    fn revision(&self) -> String {
        let dump: serde_json::Value =
            serde_json::from_str(&self.server.admin_get("/config_dump").1).unwrap();
        dump["policy"]["inbound"]["revision"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn decisions(&self, result: &str, mode: &str) -> f64 {
        let series = format!(
            "crank_policy_decisions_total{{direction=\"inbound\",mode=\"{mode}\",result=\"{result}\"}}"
        );
        metric(&self.server.metrics(), &series).unwrap_or(0.0)
    }
}

fn client_sidecar(
    pki: &Pki,
    leaf: &Leaf,
    inbound: SocketAddr,
    name: &str,
    extra: &str,
) -> (Proxy, SocketAddr) {
    let (port, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "identity: {{cert: {}, key: {}, trust_bundle: {}}}\n\
         outbound:\n  ports: [{{listen: {port}, route: transcode}}]\n\
         routes:\n  - name: transcode\n    capability: transcode:v1\n    \
         endpoints: [{{address: {inbound}, identity: transcoder.media.crank.local}}]\n\
         admin: {{listen: {admin}}}\n{extra}",
        leaf.cert.display(),
        leaf.key.display(),
        pki.bundle().display(),
    );
    (Proxy::start(pki.path(), name, &yaml, admin), port)
}

fn json_body(curl_out: &str) -> serde_json::Value {
    let body = curl_out.split("\r\n\r\n").last().unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {curl_out}"))
}

#[test]
fn allowed_and_denied_requests_with_reasons_decision_ids_and_log() {
    let mesh = PolicyMesh::start(&[("authz.rego", AUTHZ), ("data.yaml", DATA)]);
    let (_acme, acme) = mesh.client("web", "acme", "");
    let (_evil, evil) = mesh.client("web", "evil", "");

    // Allowed: the app sees the request, with the capability header the
    // caller's sidecar set from its route.
    let url = format!("http://{acme}/v1/jobs?preset=fast");
    let (status, out) = curl(&["-H", "Authorization: Bearer s3cret", &url]);
    assert_eq!(status, 200, "{out}");
    let seen = mesh.app.last().unwrap();
    assert_eq!(seen.header("x-crank-capability"), Some("transcode:v1"));

    // Denied by role: 403, reasons in a JSON body, the decision id in a
    // header and in the body; the app never sees it.
    let before = mesh.app.count();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, out) = curl(&[
        "-H",
        &format!("traceparent: {traceparent}"),
        "-H",
        "Authorization: Bearer t0ps3cret",
        &format!("http://{evil}/v1/jobs"),
    ]);
    assert_eq!(status, 403, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("policy-denied"));
    assert!(header(&out, "content-type")
        .unwrap()
        .starts_with("application/json"));
    let id = header(&out, "x-crank-decision-id")
        .expect("decision id header")
        .to_string();
    let body = json_body(&out);
    assert_eq!(body["decision_id"], id.as_str());
    assert_eq!(body["error"], "policy-denied");
    assert_eq!(
        body["reasons"],
        serde_json::json!(["tenant \"evil\" may not call transcode:v1: it needs role \"media\""])
    );
    assert_eq!(body["revision"], mesh.revision().as_str());
    assert_eq!(
        mesh.app.count(),
        before,
        "a denied request must not reach the app"
    );

    // The security team finds the decision by its id.
    let entry = mesh.decision(&id);
    assert_eq!(entry["result"], "deny");
    assert_eq!(entry["mode"], "enforce");
    assert_eq!(entry["enforced"], true);
    assert_eq!(entry["revision"], mesh.revision().as_str());
    assert_eq!(entry["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        entry["input"]["source"],
        "spiffe://crank.local/tenant/evil/svc/web"
    );
    assert_eq!(entry["input"]["capability"], "transcode:v1");
    assert_eq!(entry["input"]["path"], "/v1/jobs");
    assert!(entry["eval_us"].as_f64().unwrap() > 0.0);
    let log = std::fs::read_to_string(&mesh.decision_log).unwrap();
    assert!(
        !log.contains("s3cret") && !log.contains("t0ps3cret"),
        "credentials must never reach the decision log: {log}"
    );

    // Denied by body size, for a tenant the role rule allows.
    let big = "x".repeat(2000);
    let (status, out) = curl(&["--data-binary", &big, &format!("http://{acme}/v1/jobs")]);
    assert_eq!(status, 403, "{out}");
    assert_eq!(
        json_body(&out)["reasons"],
        serde_json::json!(["body of 2000 bytes is over the limit of 1000"])
    );

    // The access log names the decision too.
    wait_until(
        "access log line with the decision id",
        Duration::from_secs(5),
        || mesh.server.log_text().contains(&id),
    );

    // Counted, with the evaluation time.
    assert!(mesh.decisions("allow", "enforce") >= 1.0);
    assert!(mesh.decisions("deny", "enforce") >= 2.0);
    let m = mesh.server.metrics();
    assert!(
        metric(&m, "crank_policy_eval_seconds_count{direction=\"inbound\"}").unwrap() >= 3.0,
        "{m}"
    );
}

#[test]
fn audit_mode_lets_denials_through_and_then_enforce_blocks_them() {
    let mesh = PolicyMesh::start(&[
        ("authz.rego", AUTHZ),
        ("data.yaml", DATA),
        ("policy.yaml", "mode: audit\n"),
    ]);
    let (_evil, evil) = mesh.client("web", "evil", "");
    let url = format!("http://{evil}/v1/jobs");

    let (status, out) = curl(&[&url]);
    assert_eq!(status, 200, "audit mode must not enforce: {out}");
    assert_eq!(mesh.decisions("deny", "audit"), 1.0);
    assert_eq!(mesh.decisions("deny", "enforce"), 0.0);
    // The decision log is written by its own thread, after the response.
    let mut lines = Vec::new();
    wait_until("a decision log line", Duration::from_secs(5), || {
        lines = mesh.log_lines();
        !lines.is_empty()
    });
    let entry = lines.last().unwrap();
    assert_eq!(entry["result"], "deny");
    assert_eq!(entry["mode"], "audit");
    assert_eq!(entry["enforced"], false);
    assert!(entry["reasons"][0].as_str().unwrap().contains("needs role"));

    // The security team switches to enforce in git; no restart.
    let old = mesh.revision();
    write_atomic(&mesh.policy_dir.join("policy.yaml"), "mode: enforce\n");
    wait_until("the enforce revision", Duration::from_secs(5), || {
        mesh.revision() != old
    });
    let (status, out) = curl(&[&url]);
    assert_eq!(status, 403, "{out}");
    assert_eq!(mesh.decisions("deny", "enforce"), 1.0);
}

#[test]
fn an_evaluation_error_fails_closed_unless_the_set_fails_open() {
    let mesh = PolicyMesh::start(&[("authz.rego", AUTHZ), ("data.yaml", DATA)]);
    let (_acme, acme) = mesh.client("web", "acme", "");

    let (status, out) = curl(&[&format!("http://{acme}/boom")]);
    assert_eq!(status, 403, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("policy-error"));
    let id = header(&out, "x-crank-decision-id").unwrap().to_string();
    let body = json_body(&out);
    assert_eq!(
        body["reasons"],
        serde_json::json!(["policy evaluation failed"])
    );
    let entry = mesh.decision(&id);
    assert_eq!(entry["result"], "error");
    assert!(
        !entry["error"].as_str().unwrap_or("").is_empty(),
        "the log keeps the evaluation error: {entry}"
    );
    assert_eq!(mesh.decisions("error", "enforce"), 1.0);
    // Other requests are unaffected.
    assert_eq!(curl(&[&format!("http://{acme}/ok")]).0, 200);

    let old = mesh.revision();
    write_atomic(&mesh.policy_dir.join("policy.yaml"), "failure_mode: open\n");
    wait_until("the fail-open revision", Duration::from_secs(5), || {
        mesh.revision() != old
    });
    let (status, out) = curl(&[&format!("http://{acme}/boom")]);
    assert_eq!(status, 200, "fail-open lets it through: {out}");
    assert_eq!(
        mesh.decisions("error", "enforce"),
        2.0,
        "counted either way"
    );
}

#[test]
fn hot_reload_under_load_fails_no_request_and_a_broken_change_keeps_the_last_good() {
    let mesh = PolicyMesh::start(&[("authz.rego", AUTHZ), ("data.yaml", DATA)]);
    let (_acme, acme) = mesh.client("web", "acme", "");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut conn = RawConn::connect(acme);
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    conn.send(b"GET /v1/jobs HTTP/1.1\r\nHost: transcode\r\n\r\n");
                    match conn.read_response(Duration::from_secs(5)) {
                        Some(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            failures.push(format!("{other:?}"));
                            conn = RawConn::connect(acme);
                        }
                    }
                }
                failures
            })
        })
        .collect();

    // Five new revisions, each different data the allow path does not
    // depend on, and one broken revision in the middle.
    let reloads_ok = |m: &PolicyMesh| {
        metric(
            &m.server.metrics(),
            "crank_policy_reloads_total{direction=\"inbound\",result=\"ok\"}",
        )
        .unwrap_or(0.0)
    };
    for i in 0..5 {
        let before = reloads_ok(&mesh);
        write_atomic(
            &mesh.policy_dir.join("data.yaml"),
            &format!("{DATA}generation: {i}\n"),
        );
        wait_until("a reload", Duration::from_secs(5), || {
            reloads_ok(&mesh) > before
        });
        if i == 2 {
            let good = mesh.revision();
            write_atomic(
                &mesh.policy_dir.join("broken.rego"),
                "package crank.authz\ndeny contains \"x\" if {\n  input.request.method ==\n}\n",
            );
            wait_until(
                "the broken change to be rejected",
                Duration::from_secs(5),
                || {
                    metric(
                        &mesh.server.metrics(),
                        "crank_policy_reloads_total{direction=\"inbound\",result=\"error\"}",
                    )
                    .unwrap_or(0.0)
                        >= 1.0
                },
            );
            assert_eq!(
                mesh.revision(),
                good,
                "the last good revision keeps serving"
            );
            let dump = mesh.server.admin_get("/config_dump").1;
            assert!(dump.contains("broken.rego"), "{dump}");
            std::fs::remove_file(mesh.policy_dir.join("broken.rego")).unwrap();
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let ok = ok.load(Ordering::Relaxed);
    assert!(ok > 100, "only {ok} requests went through");
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    wait_until("the rejection in the log", Duration::from_secs(5), || {
        mesh.server.log_text().contains("policy change rejected")
    });
}

#[test]
fn egress_policy_on_the_outbound_side() {
    let mesh = PolicyMesh::start(&[("authz.rego", AUTHZ), ("data.yaml", DATA)]);
    let egress = mesh.pki.path().join("egress");
    std::fs::create_dir(&egress).unwrap();
    std::fs::write(
        egress.join("egress.rego"),
        r#"package crank.authz
default allow := true
deny contains sprintf("%s may not %s %s.%s via %s", [input.source.service, input.request.method, input.destination.service, input.destination.tenant, input.destination.route]) if {
    input.destination.route == "transcode"
    input.request.method == "DELETE"
}
"#,
    )
    .unwrap();
    let extra = format!("policy:\n  outbound: {{dir: {}}}\n", egress.display());
    let (client, acme) = mesh.client("web", "acme", &extra);
    assert_eq!(curl(&[&format!("http://{acme}/v1/jobs/1")]).0, 200);
    let before = mesh.app.count();
    let (status, out) = curl(&["-X", "DELETE", &format!("http://{acme}/v1/jobs/1")]);
    assert_eq!(status, 403, "{out}");
    assert_eq!(
        json_body(&out)["reasons"],
        serde_json::json!(["web may not DELETE transcoder.media via transcode"])
    );
    assert_eq!(mesh.app.count(), before);
    let m = client.metrics();
    assert_eq!(
        metric(
            &m,
            "crank_policy_decisions_total{direction=\"outbound\",mode=\"enforce\",result=\"deny\"}"
        ),
        Some(1.0),
        "{m}"
    );
    // No decision_log.path here: decisions go to stdout as JSON lines.
    let id = header(&out, "x-crank-decision-id").unwrap().to_string();
    wait_until(
        "the decision on the client's stdout",
        Duration::from_secs(5),
        || {
            client.log_text().lines().any(|l| {
                serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                    v["decision_id"] == id.as_str()
                        && v["direction"] == "outbound"
                        && v["result"] == "deny"
                })
            })
        },
    );
}

#[test]
fn opa_envoy_policies_run_unchanged() {
    // A policy written for OPA-Envoy's ext_authz input.
    let envoy = r#"package envoy.authz
import input.attributes.request.http as http_request

default allow := false
allow if {
    http_request.method == "GET"
    http_request.headers["x-user"] == "alice"
    input.parsed_path[0] == "v1"
}
"#;
    let mesh = PolicyMesh::start(&[("envoy.rego", envoy), ("policy.yaml", "input: envoy\n")]);
    let (_c, port) = mesh.client("web", "acme", "");
    let url = format!("http://{port}/v1/jobs");
    assert_eq!(curl(&["-H", "x-user: alice", &url]).0, 200);
    let (status, out) = curl(&["-H", "x-user: bob", &url]);
    assert_eq!(status, 403, "{out}");
    assert_eq!(
        json_body(&out)["reasons"],
        serde_json::json!(["not allowed: data.envoy.authz.allow is not true"])
    );
}

#[test]
fn a_policy_that_does_not_compile_stops_the_start_with_its_file_and_line() {
    let pki = Pki::new();
    let dir = pki.path().join("policies");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("authz.rego"),
        "package crank.authz\nallow if {\n  input.x ==\n}\n",
    )
    .unwrap();
    let leaf = pki.leaf("transcoder", "media");
    let admin = free_addr();
    let yaml = format!(
        "identity: {{cert: {}, key: {}, trust_bundle: {}}}\n\
         inbound: {{listen: {}, app: 127.0.0.1:1}}\nadmin: {{listen: {admin}}}\n\
         policy: {{inbound: {{dir: {}}}}}\n",
        leaf.cert.display(),
        leaf.key.display(),
        pki.bundle().display(),
        free_addr(),
        dir.display()
    );
    let err = Proxy::try_start(pki.path(), "broken", &yaml, admin)
        .err()
        .expect("the proxy must refuse a policy that does not compile");
    assert!(err.contains("policy.inbound.dir"), "{err}");
    assert!(
        err.contains("authz.rego:3") || err.contains("authz.rego:4"),
        "{err}"
    );
}

fn crankctl(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(crank_tests::bin("crankctl"))
        .args(args)
        .output()
        .expect("run crankctl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn shipped_policies() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

#[test]
fn crankctl_policy_test_passes_the_shipped_policies_and_catches_a_broken_one() {
    let shipped = shipped_policies();
    let (ok, out) = crankctl(&["policy", "test", "-v", shipped.to_str().unwrap()]);
    assert!(ok, "shipped policies must pass their tests:\n{out}");
    assert!(out.contains(": PASS") && !out.contains("FAIL"), "{out}");

    // Copy the set and break one rule: its tests must fail, non-zero exit.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&shipped, tmp.path());
    let rego = tmp.path().join("methods.rego");
    let text = std::fs::read_to_string(&rego).unwrap();
    let broken = text.replacen("not input.request.method in", "input.request.method in", 1);
    assert_ne!(text, broken, "methods.rego changed shape; update this test");
    std::fs::write(&rego, broken).unwrap();
    let (ok, out) = crankctl(&["policy", "test", tmp.path().to_str().unwrap()]);
    assert!(!ok, "a broken policy must fail its tests:\n{out}");
    assert!(out.contains(": FAIL"), "{out}");
    assert!(out.contains("FAIL: "), "{out}");

    // A syntax error fails with the file and line.
    std::fs::write(&rego, "package crank.authz\ndeny contains x if {\n").unwrap();
    let (ok, out) = crankctl(&["policy", "test", tmp.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("methods.rego:"), "{out}");
}

#[test]
fn crankctl_policy_eval_explains_one_decision() {
    let shipped = shipped_policies();
    let input = shipped.join("examples/transcode-denied.json");
    let (ok, out) = crankctl(&[
        "policy",
        "eval",
        shipped.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["result"], "deny", "{out}");
    assert_eq!(v["permitted"], false);
    assert!(!v["reasons"].as_array().unwrap().is_empty());
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}
