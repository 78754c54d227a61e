//! The shipped examples work together: the worker shim example
//! (`deploy/shim/transcode.yaml`) serves the capability that the shipped
//! mesh config (`deploy/mesh-config`: capabilities, route, quota, SLO) and
//! the shipped policies (`policies/`) name. Checked offline file by file,
//! then end to end: crank-control serving `deploy/mesh-config` as it is, the
//! shim running ffmpeg behind an enrolled sidecar that registers it, and one
//! transcode job submitted through a caller's sidecar.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crank_tests::control::{ControlOptions, ControlPlane};
use crank_tests::proxy::{free_addr, Proxy};
use crank_tests::{curl, header, wait_until, Shim};
use serde_json::Value;
use serde_yaml::Value as Yaml;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

fn yaml(rel: &str) -> Yaml {
    let text = std::fs::read_to_string(repo().join(rel)).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The YAML files of a subdirectory of `deploy/mesh-config`.
fn yamls(sub: &str) -> Vec<(String, Yaml)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(repo().join("deploy/mesh-config").join(sub)).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") {
            let rel = format!("deploy/mesh-config/{sub}/{name}");
            out.push((rel.clone(), yaml(&rel)));
        }
    }
    out
}

fn shim_capability() -> String {
    yaml("deploy/shim/transcode.yaml")["capability"]
        .as_str()
        .expect("deploy/shim/transcode.yaml has a capability")
        .to_string()
}

fn crankctl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(crank_tests::bin("crankctl"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The shipped policy set's decision for `tenant`'s web service calling
/// the media tenant's transcoder under `capability`.
fn policy_permits(tenant: &str, capability: &str) -> bool {
    let input = serde_json::json!({
        "source": {"spiffe_id": format!("spiffe://crank.local/tenant/{tenant}/svc/web"), "service": "web", "tenant": tenant, "trust_domain": "crank.local", "address": "127.0.0.1:40000"},
        "destination": {"spiffe_id": "spiffe://crank.local/tenant/media/svc/transcoder", "service": "transcoder", "tenant": "media", "trust_domain": "crank.local", "capability": capability, "route": null, "direction": "inbound"},
        "request": {"method": "POST", "path": "/v1/jobs", "headers": {"content-type": "video/x-matroska"}, "body_size": 1_000_000},
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("input.json");
    std::fs::write(&file, input.to_string()).unwrap();
    let (ok, out, err) = crankctl(&[
        "policy",
        "eval",
        "policies",
        "--input",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["permitted"].as_bool().unwrap_or_else(|| panic!("{v}"))
}

#[test]
fn the_shim_example_serves_the_capability_the_mesh_config_and_policies_name() {
    let cap = shim_capability();
    let (ok, out, err) = crankctl(&[
        "config",
        "validate",
        "deploy/mesh-config",
        "--output",
        "json",
    ]);
    assert!(ok, "the shipped mesh config is valid: {out}{err}");

    let caps = yaml("deploy/mesh-config/capabilities.yaml");
    let declared: Vec<&str> = caps["capabilities"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(
        declared.contains(&cap.as_str()),
        "{cap} (deploy/shim/transcode.yaml) is not in capabilities.yaml: {declared:?}"
    );

    // A route sends it to the shim as it registers on a host without a
    // GPU: its configured labels plus the detected gpu=none.
    let shim = yaml("deploy/shim/transcode.yaml");
    let mut labels: Vec<(String, String)> = shim["labels"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_string(),
                        v.as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    labels.push(("gpu".into(), "none".into()));
    let routed = yamls("routes").iter().any(|(_, f)| {
        f["routes"].as_sequence().unwrap().iter().any(|r| {
            r["backends"].as_sequence().unwrap().iter().any(|b| {
                b["capability"].as_str() == Some(cap.as_str())
                    && b["selector"].as_mapping().is_none_or(|sel| {
                        sel.iter().all(|(k, v)| {
                            labels.iter().any(|(lk, lv)| {
                                Some(lk.as_str()) == k.as_str() && Some(lv.as_str()) == v.as_str()
                            })
                        })
                    })
            })
        })
    });
    assert!(
        routed,
        "no route in deploy/mesh-config/routes sends {cap} to a worker labelled {labels:?}"
    );

    let quotas = yaml("deploy/mesh-config/quotas.yaml");
    assert!(
        quotas["limits"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|l| l["capability"].as_str() == Some(cap.as_str())),
        "no quota for {cap} in quotas.yaml"
    );
    assert!(
        yamls("slo")
            .iter()
            .any(|(_, s)| s["capability"].as_str() == Some(cap.as_str())),
        "no SLO for {cap} in slo/"
    );

    // The shipped policies let a tenant with role media call it across
    // tenants, and keep the quickstart's tenant out.
    assert!(
        policy_permits("acme", &cap),
        "acme (role media) may call {cap}"
    );
    assert!(!policy_permits("demo", &cap), "demo has no role media");
    assert!(
        !policy_permits("acme", "transcode:h264"),
        "a name the policies do not know is not the one they allow"
    );
}

/// The shipped shim config with its ports and paths moved into `dir`;
/// everything else (capability, command, parameters, devices) as shipped.
fn shim_yaml(dir: &Path, listen: SocketAddr, admin: SocketAddr) -> String {
    let mut y = yaml("deploy/shim/transcode.yaml");
    let set = |y: &mut Yaml, key: &str, v: String| {
        y.as_mapping_mut()
            .unwrap()
            .insert(Yaml::from(key), Yaml::from(v));
    };
    set(&mut y, "listen", listen.to_string());
    set(&mut y, "admin_listen", admin.to_string());
    set(
        &mut y,
        "registration_file",
        dir.join("registration.json").display().to_string(),
    );
    set(
        &mut y["exec"],
        "work_dir",
        dir.join("work").display().to_string(),
    );
    serde_yaml::to_string(&y).unwrap()
}

/// A caller's sidecar with an HTTP proxy listener; returns (proxy, listener).
fn caller(cp: &ControlPlane, dir: &Path, service: &str, tenant: &str) -> (Proxy, SocketAddr) {
    let (http, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "{}outbound: {{http_proxy: {http}}}\nmesh: {{watch_wait: 2s}}\nadmin: {{listen: {admin}}}\nthreads: 1\n",
        cp.enroll_yaml(dir, service, service, tenant, "2s"),
    );
    (Proxy::start(dir, service, &yaml, admin), http)
}

fn json_body(curl_out: &str) -> Value {
    let body = curl_out.rsplit_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON body: {e}: {curl_out}"))
}

#[test]
fn a_transcode_job_runs_through_the_shipped_mesh_config_on_the_shipped_shim() {
    let cap = shim_capability();
    let cp = ControlPlane::start(ControlOptions {
        extra: format!(
            "config_dir: '{}'\n",
            repo().join("deploy/mesh-config").display()
        ),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip.mkv");
    let st = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i"])
        .arg("testsrc=duration=2:size=320x240:rate=25")
        .args(["-f", "lavfi", "-i", "sine=frequency=440:duration=2"])
        .args(["-c:v", "mpeg4", "-c:a", "pcm_s16le", "-y"])
        .arg(&clip)
        .status()
        .expect("ffmpeg is installed (tests/run.sh installs it)");
    assert!(st.success());

    // The shipped shim, and its sidecar: transcoder.media, enforcing the
    // shipped policies, registering what the shim writes.
    let (listen, admin) = (free_addr(), free_addr());
    let _shim = Shim::start(
        dir.path(),
        "shim",
        &shim_yaml(dir.path(), listen, admin),
        listen,
        admin,
    );
    let (inbound, sadmin) = (free_addr(), free_addr());
    let decisions = dir.path().join("decisions.log");
    let server_yaml = format!(
        "{}inbound: {{listen: {inbound}, app: {listen}}}\npolicy:\n  inbound: {{dir: '{}'}}\n  decision_log: {{path: '{}'}}\nmesh:\n  watch_wait: 2s\n  register:\n    from_file: '{}'\nadmin: {{listen: {sadmin}}}\nthreads: 1\n",
        cp.enroll_yaml(dir.path(), "transcoder", "transcoder", "media", "2s"),
        repo().join("policies").display(),
        decisions.display(),
        dir.path().join("registration.json").display(),
    );
    let server = Proxy::start(dir.path(), "transcoder", &server_yaml, sadmin);
    let (web, web_http) = caller(&cp, dir.path(), "web", "acme");
    let (_frontend, demo_http) = caller(&cp, dir.path(), "frontend", "demo");

    // crank-control routes the registered capability (routes/transcode.yaml).
    wait_until(
        "the shim's capability is registered",
        Duration::from_secs(10),
        || cp.ctl_ok(&["endpoints"]).contains(&cap),
    );
    let routes: Value = serde_json::from_str(&cp.ctl_ok(&["routes", "--output", "json"])).unwrap();
    let transcode = routes
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"]["name"] == "transcode")
        .unwrap_or_else(|| panic!("no transcode route: {routes:#}"));
    assert_eq!(
        transcode["endpoints"][0]["address"],
        inbound.to_string(),
        "{transcode:#}"
    );
    let via = |proxy: SocketAddr, args: &[&str]| {
        let p = format!("http://{proxy}");
        let mut all = vec!["-x", p.as_str()];
        all.extend_from_slice(args);
        curl(&all)
    };
    wait_until("web.acme reaches the shim", Duration::from_secs(10), || {
        via(web_http, &["http://transcode/v1/schema"]).0 == 200
    });
    let (_, schema) = via(web_http, &["http://transcode/v1/schema"]);
    assert_eq!(json_body(&schema)["capability"], cap.as_str(), "{schema}");

    // Its quota (quotas.yaml) reached the worker's sidecar.
    let dump: Value = serde_json::from_str(&server.admin_get("/config_dump").1).unwrap();
    assert!(
        dump["config"]["quotas"].to_string().contains(&cap),
        "{:#}",
        dump["config"]["quotas"]
    );

    // One job, end to end.
    let body = format!("@{}", clip.display());
    let (status, out) = via(
        web_http,
        &[
            "--data-binary",
            &body,
            "http://transcode/v1/jobs?height=144&preset=ultrafast",
        ],
    );
    assert_eq!(status, 201, "{out}\n{}", web.log_text());
    let job = json_body(&out);
    assert_eq!(job["capability"], cap.as_str());
    assert_eq!(job["requester"], "spiffe://crank.local/tenant/acme/svc/web");
    let id = job["id"].as_str().unwrap().to_string();
    crank_tests::shim::wait_for_job_success("the job to succeed", || {
        let (_, out) = via(web_http, &[&format!("http://transcode/v1/jobs/{id}")]);
        json_body(&out)
    });
    let output = dir.path().join("out.mp4");
    let got = Command::new("curl")
        .args([
            "-sS",
            "-f",
            "--max-time",
            "20",
            "-x",
            &format!("http://{web_http}"),
        ])
        .arg("-o")
        .arg(&output)
        .arg(format!("http://transcode/v1/jobs/{id}/output"))
        .status()
        .unwrap();
    assert!(got.success(), "the output downloads through the mesh");
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_entries"])
        .args(["stream=height", "-of", "csv=p=0"])
        .arg(&output)
        .output()
        .expect("ffprobe comes with ffmpeg");
    assert_eq!(
        String::from_utf8_lossy(&probe.stdout).trim(),
        "144",
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let log = std::fs::read_to_string(&decisions).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("\"result\":\"allow\"") && l.contains("tenant/acme/svc/web")),
        "{log}"
    );

    // The quickstart's tenant is refused by the shipped policy, with its reason.
    let (status, out) = via(demo_http, &["http://transcode/v1/schema"]);
    assert_eq!(status, 403, "{out}");
    assert_eq!(
        header(&out, "x-crank-error"),
        Some("policy-denied"),
        "{out}"
    );
    assert!(
        out.contains(&format!("may not call {cap}: it needs role")),
        "{out}"
    );
}
