//! The OpenAPI 3.1 documents of the shim's job API and of crank-control's
//! workload and admin APIs against the running servers: each serves its
//! document verbatim (`/v1/openapi.json`; the admin API, on its Unix socket,
//! `/v1/admin/openapi.json`), and schemathesis (from PyPI, installed into
//! `target/py` by `tests/run.sh`) fuzzes every operation and fails on a
//! 5xx, an undocumented status code, content type or header, or a body
//! that does not match the documented schema. schemathesis speaks only TCP,
//! so the admin socket is reached through a loopback bridge in this file.
//! That the documents list exactly the routes the routers handle is checked
//! by the unit tests next to the routers (`worker-shim/src/api.rs`,
//! `control-plane/src/server/routes.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crank_tests::control::{ControlOptions, ControlPlane};
use crank_tests::proxy::free_addr;
use crank_tests::{curl, wait_child, wait_until, Shim};

const SHIM_DOC: &str = include_str!("../../worker-shim/openapi.json");
const CONTROL_DOC: &str = include_str!("../../control-plane/openapi.json");
const ADMIN_DOC: &str = include_str!("../../control-plane/openapi-admin.json");

/// The checks every run makes (`schemathesis run --help` lists them).
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance";

/// `target/py/bin/schemathesis`, which `tests/run.sh` installs.
fn schemathesis() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/py/bin/schemathesis");
    assert!(
        p.exists(),
        "{} is missing: run tests/run.sh once (it installs schemathesis from PyPI into target/py)",
        p.display()
    );
    p
}

/// Runs `schemathesis run` with `args` in `dir`, bounded in examples and
/// time (killed after 50 s), and panics with its report unless it exits 0.
fn run_schemathesis(dir: &Path, config: &str, args: &[&str]) {
    let cfg = dir.join("schemathesis.toml");
    std::fs::write(&cfg, config).unwrap();
    let log = dir.join("schemathesis.log");
    let logf = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(schemathesis())
        .arg("--config-file")
        .arg(&cfg)
        .arg("run")
        .args(["--checks", CHECKS])
        .args(["--max-examples", "20", "--max-time", "20"])
        .args(["--request-timeout", "5", "--workers", "1"])
        .args(["--generation-database", "none", "--no-color"])
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .expect("start schemathesis");
    let status = wait_child(&mut child, Duration::from_secs(50));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let report = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.success()),
        "schemathesis found the server out of line with its OpenAPI document ({status:?}):\n{report}"
    );
    // It really ran: every operation was tested.
    assert!(report.contains("Test cases:"), "{report}");
}

/// The body of a curl `-i` answer.
fn body_of(curl_out: &str) -> &str {
    curl_out.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

#[test]
fn the_shim_job_api_serves_its_openapi_document_and_conforms_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (listen, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "mode: exec\nlisten: {listen}\nadmin_listen: {admin}\ncapability: test:v1\n\
         host: {{powercap_root: {d}/no-powercap}}\n\
         exec:\n  work_dir: {d}/work\n  max_queue: 10000\n\
         \x20 command: [sh, -c, 'echo done > \"$1\"', sh, \"{{output}}\"]\n\
         \x20 params:\n    secs: {{type: number, min: 0, max: 30, default: 0.1}}\n",
        d = d.display(),
    );
    let shim = Shim::start(d, "shim", &yaml, listen, admin);

    let (status, out) = curl(&[&shim.url("/v1/openapi.json")]);
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        body_of(&out),
        SHIM_DOC,
        "GET /v1/openapi.json is worker-shim/openapi.json"
    );

    run_schemathesis(d, "", &[&shim.url("/v1/openapi.json")]);
    assert!(!shim.log_text().contains("panicked"), "{}", shim.log_text());
}

/// A control plane with one published route (`backend` to `hello:v1`).
fn control_with_a_route() -> ControlPlane {
    let cp = ControlPlane::start(ControlOptions {
        extra: "config_dir: mesh\n".into(),
        ..Default::default()
    });
    cp.write_mesh_file("capabilities.yaml", "capabilities:\n  - name: hello:v1\n");
    cp.write_mesh_file(
        "routes/backend.yaml",
        "routes:\n  - name: backend\n    backends:\n      - {capability: hello:v1}\n",
    );
    wait_until(
        "the mesh config is published",
        Duration::from_secs(10),
        || {
            let s: serde_json::Value =
                serde_json::from_str(&cp.ctl_ok(&["status", "--output", "json"])).unwrap();
            !s["version"].is_null()
        },
    );
    cp
}

/// curl to the workload API at `path`, verifying the server certificate.
fn https(cp: &ControlPlane, path: &str, extra: &[&str]) -> (u16, String) {
    let host = "control.crank-system.crank.local";
    let port = cp.listen.port();
    let resolve = format!("{host}:{port}:127.0.0.1");
    let url = format!("https://{host}:{port}{path}");
    let bundle = cp.bootstrap_bundle();
    let mut args = vec!["--cacert", bundle.to_str().unwrap(), "--resolve", &resolve];
    args.extend(extra);
    args.push(&url);
    curl(&args)
}

/// POSTs the JSON `body` to the workload API at `path`.
fn https_post(cp: &ControlPlane, path: &str, body: &serde_json::Value, extra: &[&str]) -> String {
    let file = cp.path().join("request.json");
    std::fs::write(&file, body.to_string()).unwrap();
    let data = format!("@{}", file.display());
    let mut args = vec![
        "-H",
        "content-type: application/json",
        "--data-binary",
        &data,
    ];
    args.extend(extra);
    let (status, out) = https(cp, path, &args);
    assert_eq!(status, 200, "POST {path}: {out}");
    body_of(&out).to_string()
}

/// Enrolls `web.demo` (instance `openapi-1`) and returns its certificate
/// and key files, so the mTLS operations are tested past the certificate check.
fn enroll_web(cp: &ControlPlane) -> (PathBuf, PathBuf) {
    let id = crank_certs::Identity::new("web", "demo", "crank.local").unwrap();
    let (key, csr) = crank_certs::new_key_and_csr(&id).unwrap();
    let token = cp.token("web", "demo");
    let req = serde_json::json!({"token": token, "csr": csr, "instance": "openapi-1"});
    let issued: serde_json::Value =
        serde_json::from_str(&https_post(cp, "/v1/identity/enroll", &req, &[])).unwrap();
    let (cert_file, key_file) = (cp.path().join("web.crt"), cp.path().join("web.key"));
    std::fs::write(&cert_file, issued["chain"].as_str().unwrap()).unwrap();
    std::fs::write(&key_file, key).unwrap();
    (cert_file, key_file)
}

#[test]
fn the_control_workload_api_serves_its_openapi_document_and_conforms_to_it() {
    let cp = control_with_a_route();
    let (cert_file, key_file) = enroll_web(&cp);

    let (status, out) = https(&cp, "/v1/openapi.json", &[]);
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        body_of(&out),
        CONTROL_DOC,
        "GET /v1/openapi.json is control-plane/openapi.json"
    );

    // `wait=0`: the watches answer at once instead of holding the request
    // (a long poll is not a conformance question). The server certificate
    // is for control.crank-system.crank.local, which this host does not
    // resolve, so schemathesis connects to 127.0.0.1 without verifying it
    // (curl above did verify it).
    let url = format!("https://127.0.0.1:{}/v1/openapi.json", cp.listen.port());
    run_schemathesis(
        cp.path(),
        "[parameters]\n\"query.wait\" = 0\n",
        &[
            &url,
            "--tls-verify",
            "false",
            "--request-cert",
            cert_file.to_str().unwrap(),
            "--request-cert-key",
            key_file.to_str().unwrap(),
        ],
    );
}

/// A loopback TCP port that forwards each connection to a Unix socket, for
/// clients that speak only TCP (schemathesis). Stops when dropped.
struct UnixBridge {
    addr: std::net::SocketAddr,
    _rt: tokio::runtime::Runtime,
}

impl UnixBridge {
    fn start(socket: PathBuf) -> UnixBridge {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let socket = socket.clone();
                tokio::spawn(async move {
                    if let Ok(mut unix) = tokio::net::UnixStream::connect(&socket).await {
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                    }
                });
            }
        });
        UnixBridge { addr, _rt: rt }
    }
}

#[test]
fn the_control_admin_api_serves_its_openapi_document_and_conforms_to_it() {
    let cp = control_with_a_route();
    // A workload with a certificate and a registered endpoint, so the
    // status, inventory, routes and endpoints answers have rows to check.
    let (cert_file, key_file) = enroll_web(&cp);
    let (cert, key) = (cert_file.to_str().unwrap(), key_file.to_str().unwrap());
    let registration = serde_json::json!({"endpoint": {
        "address": "127.0.0.1:9", "identity": "web.demo.crank.local",
        "capabilities": ["hello:v1"], "labels": {"pool": "a"}}, "lease_seconds": 300});
    https_post(
        &cp,
        "/v1/registry/register",
        &registration,
        &["--cert", cert, "--key", key],
    );

    let socket = cp.path().join("state/admin.sock");
    let (status, out) = curl(&[
        "--unix-socket",
        socket.to_str().unwrap(),
        "http://crank-control/v1/admin/openapi.json",
    ]);
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        body_of(&out),
        ADMIN_DOC,
        "GET /v1/admin/openapi.json on the admin socket is control-plane/openapi-admin.json"
    );

    // Every operation, the state-changing ones included (this control
    // plane is thrown away): schemathesis invents tokens, revoke targets
    // and rotation bodies; only valid PEM would start a rotation.
    let bridge = UnixBridge::start(socket);
    let url = format!("http://{}/v1/admin/openapi.json", bridge.addr);
    run_schemathesis(cp.path(), "", &[&url]);
    assert!(!cp.log_text().contains("panicked"), "{}", cp.log_text());
    // The registered endpoint and the enrolled workload were there to check.
    let endpoints: serde_json::Value =
        serde_json::from_str(&cp.ctl_ok(&["endpoints", "-o", "json"])).unwrap();
    assert_eq!(
        endpoints["entries"].as_array().unwrap().len(),
        1,
        "{endpoints}"
    );
    // crankctl reads the same answers; `-o wide` shows the lease and times.
    let lease = endpoints["entries"][0]["lease"].as_str().unwrap();
    let wide = cp.ctl_ok(&["endpoints", "-o", "wide"]);
    assert!(
        wide.contains("LAST HEARTBEAT") && wide.contains(lease),
        "{wide}"
    );
}
