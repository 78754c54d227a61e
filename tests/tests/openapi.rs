//! The OpenAPI 3.1 documents of the shim's job API and of crank-control's
//! workload API against the running servers: each serves its document
//! verbatim at `/v1/openapi.json`, and schemathesis (from PyPI, installed
//! into `target/py` by `tests/run.sh`) fuzzes every operation and fails on
//! a 5xx, an undocumented status code, content type or header, or a body
//! that does not match the documented schema. That the documents list
//! exactly the routes the routers handle is checked by the unit tests next
//! to the routers (`worker-shim/src/api.rs`, `control-plane/src/server/routes.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crank_tests::control::{ControlOptions, ControlPlane};
use crank_tests::proxy::free_addr;
use crank_tests::{curl, wait_child, wait_until, Shim};

const SHIM_DOC: &str = include_str!("../../worker-shim/openapi.json");
const CONTROL_DOC: &str = include_str!("../../control-plane/openapi.json");

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
fn body(curl_out: &str) -> &str {
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
        body(&out),
        SHIM_DOC,
        "GET /v1/openapi.json is worker-shim/openapi.json"
    );

    run_schemathesis(d, "", &[&shim.url("/v1/openapi.json")]);
    assert!(!shim.log_text().contains("panicked"), "{}", shim.log_text());
}

#[test]
fn the_control_workload_api_serves_its_openapi_document_and_conforms_to_it() {
    let cp = ControlPlane::start(ControlOptions {
        extra: "config_dir: mesh\n".into(),
        ..Default::default()
    });
    let mesh = cp.path().join("mesh");
    std::fs::create_dir_all(mesh.join("routes")).unwrap();
    std::fs::write(
        mesh.join("capabilities.yaml"),
        "capabilities:\n  - name: hello:v1\n",
    )
    .unwrap();
    std::fs::write(
        mesh.join("routes/backend.yaml"),
        "routes:\n  - name: backend\n    backends:\n      - {capability: hello:v1}\n",
    )
    .unwrap();
    wait_until(
        "the mesh config is published",
        Duration::from_secs(10),
        || {
            let s: serde_json::Value =
                serde_json::from_str(&cp.ctl_ok(&["status", "--output", "json"])).unwrap();
            !s["version"].is_null()
        },
    );

    // A workload certificate, so the mTLS operations are tested past the
    // certificate check.
    let id = crank_certs::Identity::new("web", "demo", "crank.local").unwrap();
    let (key, csr) = crank_certs::new_key_and_csr(&id).unwrap();
    let token = cp.token("web", "demo");
    let req = cp.path().join("enroll.json");
    std::fs::write(
        &req,
        serde_json::json!({"token": token, "csr": csr, "instance": "openapi-1"}).to_string(),
    )
    .unwrap();
    let host = "control.crank-system.crank.local";
    let port = cp.listen.port();
    let resolve = format!("{host}:{port}:127.0.0.1");
    let bundle = cp.bootstrap_bundle();
    let https = |path: &str, extra: &[&str]| {
        let url = format!("https://{host}:{port}{path}");
        let mut args = vec!["--cacert", bundle.to_str().unwrap(), "--resolve", &resolve];
        args.extend(extra);
        args.push(&url);
        curl(&args)
    };
    let data = format!("@{}", req.display());
    let (status, out) = https(
        "/v1/identity/enroll",
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &data,
        ],
    );
    assert_eq!(status, 200, "{out}");
    let issued: serde_json::Value = serde_json::from_str(body(&out)).unwrap();
    let (cert_file, key_file) = (cp.path().join("web.crt"), cp.path().join("web.key"));
    std::fs::write(&cert_file, issued["chain"].as_str().unwrap()).unwrap();
    std::fs::write(&key_file, key).unwrap();

    let (status, out) = https("/v1/openapi.json", &[]);
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        body(&out),
        CONTROL_DOC,
        "GET /v1/openapi.json is control-plane/openapi.json"
    );

    // `wait=0`: the watches answer at once instead of holding the request
    // (a long poll is not a conformance question). The server certificate
    // is for control.crank-system.crank.local, which this host does not
    // resolve, so schemathesis connects to 127.0.0.1 without verifying it
    // (curl above did verify it).
    let url = format!("https://127.0.0.1:{port}/v1/openapi.json");
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
