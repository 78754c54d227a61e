//! crank-shim's job features beside the queue (issue #18), end to end with
//! real shims and real tools: job templates (submit by name, cron firing
//! every second), dependencies (`after`: a chain, a failing parent),
//! per-job memory limits (rlimit and, where this host allows it, cgroup
//! v2), object storage on a real S3 server (moto), and usage totals per
//! tenant through the API and `crankctl jobs usage`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crank_tests::proxy::free_addr;
use crank_tests::{curl, wait_until, Shim};
use serde_json::Value;

/// The tool: `tool.sh MODE OUTPUT MIB LABEL`.
const TOOL: &str = r#"#!/bin/sh
case "$1" in
  ok) echo "ok $4" > "$2" ;;
  fail) echo "boom: the parent fails" >&2; exit 3 ;;
  slowfail) sleep 1; echo "boom: the parent fails late" >&2; exit 3 ;;
  slow) sleep 1; echo slow > "$2" ;;
  alloc) exec /usr/bin/python3 -c "import sys; b = bytearray($3 * 1024 * 1024); open(sys.argv[1], 'w').write('x')" "$2" ;;
  burn) i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; echo burnt > "$2" ;;
esac
"#;

struct Worker {
    shim: Shim,
    /// Holds the shim's files until the test ends (after the shim stops).
    _dir: tempfile::TempDir,
}

/// A shim running `tool.sh` with `extra` YAML appended to its `exec:`
/// section (indented 2).
fn worker(extra: &str) -> Worker {
    let dir = tempfile::tempdir().unwrap();
    let tool = dir.path().join("tool.sh");
    std::fs::write(&tool, TOOL).unwrap();
    let exec = format!(
        "  command: [sh, {tool}, \"{{mode}}\", \"{{output}}\", \"{{mib}}\", \"{{label}}\"]\n  params:\n    mode: {{type: enum, values: [ok, fail, slowfail, slow, alloc, burn], default: ok}}\n    mib: {{type: integer, min: 1, max: 4096, default: 1}}\n    label: {{type: string, pattern: \"[a-z0-9]+\", default: none}}\n  retries: {{max_attempts: 1}}\n  devices: {{cpu_slots: 4}}\n{extra}",
        tool = tool.display()
    );
    let shim = start(dir.path(), "shim", &exec);
    Worker { shim, _dir: dir }
}

fn start(dir: &Path, name: &str, exec: &str) -> Shim {
    let (listen, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "mode: exec\nlisten: {listen}\nadmin_listen: {admin}\ncapability: transcode:h264\nhost: {{powercap_root: {d}/no-powercap}}\nexec:\n  work_dir: {d}/{name}-work\n{exec}",
        d = dir.display()
    );
    Shim::start(dir, name, &yaml, listen, admin)
}

fn body(curl_out: &str) -> Value {
    let b = curl_out.rsplit_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(b).unwrap_or_else(|e| panic!("JSON body: {e}: {curl_out}"))
}

fn submit(s: &Shim, json: &str, tenant: &str) -> (u16, Value) {
    let (status, out) = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-H",
        &format!("x-crank-client-id: {tenant}"),
        "--data-binary",
        json,
        &s.url("/v1/jobs"),
    ]);
    (status, body(&out))
}

fn submit_ok(s: &Shim, json: &str) -> String {
    let (status, v) = submit(s, json, "acme");
    assert_eq!(status, 201, "{v}");
    v["id"].as_str().unwrap().to_string()
}

fn get(s: &Shim, path: &str) -> Value {
    let (status, out) = curl(&[&s.url(path)]);
    assert_eq!(status, 200, "{out}");
    body(&out)
}

/// Waits for a terminal state and returns the record.
fn finished(s: &Shim, id: &str) -> Value {
    let mut rec = Value::Null;
    wait_until(
        &format!("job {id} to finish"),
        Duration::from_secs(30),
        || {
            rec = get(s, &format!("/v1/jobs/{id}"));
            !matches!(rec["state"].as_str(), Some("queued" | "running"))
        },
    );
    rec
}

#[test]
fn templates_submit_by_name_and_fire_on_their_schedule() {
    let tdir = tempfile::tempdir().unwrap();
    std::fs::write(
        tdir.path().join("quick.yaml"),
        "capability: transcode:h264\nparams: {mode: ok}\noverridable: [label]\npriority: high\n",
    )
    .unwrap();
    std::fs::write(
        tdir.path().join("tick.yaml"),
        "capability: transcode:h264\nparams: {mode: ok, label: tick}\nschedule: \"* * * * * *\"\n",
    )
    .unwrap();
    std::fs::write(
        tdir.path().join("elsewhere.yaml"),
        "capability: summarize:v1\n",
    )
    .unwrap();
    let w = worker(&format!("  templates_dir: {}\n", tdir.path().display()));
    let s = &w.shim;

    let id = submit_ok(s, r#"{"template": "quick", "params": {"label": "abc"}}"#);
    let rec = finished(s, &id);
    assert_eq!(rec["state"], "succeeded", "{rec}");
    assert_eq!(rec["template"], "quick");
    assert_eq!(rec["priority"], "high", "the template's priority");
    assert_eq!(rec["params"]["label"], "abc", "the allowed override");
    let (status, v) = submit(
        s,
        r#"{"template": "quick", "params": {"mode": "fail"}}"#,
        "acme",
    );
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("param-not-overridable")),
        "{v}"
    );
    assert!(
        v["message"].as_str().unwrap().contains("allows: label"),
        "{v}"
    );
    let (status, v) = submit(s, r#"{"template": "elsewhere"}"#, "acme");
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("template-not-found")),
        "{v}"
    );
    assert!(
        v["message"].as_str().unwrap().contains("quick, tick"),
        "{v}"
    );

    // Every second: at least two ticks fire, each its own job, and run.
    let mut ticks = Vec::new();
    wait_until(
        "two scheduled jobs to succeed",
        Duration::from_secs(15),
        || {
            let jobs = get(s, "/v1/jobs?state=succeeded")["jobs"]
                .as_array()
                .unwrap()
                .clone();
            ticks = jobs
                .iter()
                .filter(|j| j["template"] == "tick")
                .map(|j| j["scheduled_ms"].as_u64().unwrap())
                .collect();
            ticks.len() >= 2
        },
    );
    ticks.sort();
    ticks.dedup();
    assert!(ticks.len() >= 2 && ticks[1] - ticks[0] >= 1000, "{ticks:?}");
}

#[test]
fn bad_templates_stop_the_shim_naming_the_file() {
    let tdir = tempfile::tempdir().unwrap();
    std::fs::write(
        tdir.path().join("broken.yaml"),
        "capability: transcode:h264\nparams: {mode: dance}\nschedule: \"61 * * * *\"\n",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("shim.yaml");
    std::fs::write(
        &cfg,
        format!(
            "mode: exec\nlisten: {}\ncapability: transcode:h264\nexec:\n  work_dir: {d}/work\n  command: [sh, -c, 'echo > \"$0\"', \"{{output}}\", \"{{mode}}\"]\n  params:\n    mode: {{type: enum, values: [ok], default: ok}}\n  templates_dir: {t}\n",
            free_addr(),
            d = dir.path().display(),
            t = tdir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(crank_tests::bin("crank-shim"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    for want in [
        "broken.yaml",
        "params: parameter `mode`",
        "schedule:",
        "minute field",
    ] {
        assert!(text.contains(want), "{want:?} in {text}");
    }
}

#[test]
fn a_job_runs_after_its_dependencies_and_fails_fast_when_one_fails() {
    let w = worker("");
    let s = &w.shim;
    let parent = submit_ok(s, r#"{"params": {"mode": "slow"}}"#);
    let child = submit_ok(
        s,
        &format!(r#"{{"params": {{"mode": "ok"}}, "after": ["{parent}"]}}"#),
    );
    assert_eq!(
        get(s, &format!("/v1/jobs/{child}"))["state"],
        "queued",
        "waits for its parent"
    );
    let p = finished(s, &parent);
    let c = finished(s, &child);
    assert_eq!(
        (p["state"].as_str(), c["state"].as_str()),
        (Some("succeeded"), Some("succeeded")),
        "{c}"
    );
    assert!(
        c["started_ms"].as_u64() >= p["finished_ms"].as_u64(),
        "{p}\n{c}"
    );

    let bad = submit_ok(s, r#"{"params": {"mode": "slowfail"}}"#);
    let child = submit_ok(s, &format!(r#"{{"after": ["{bad}"]}}"#));
    let grandchild = submit_ok(s, &format!(r#"{{"after": ["{child}"]}}"#));
    assert_eq!(finished(s, &bad)["state"], "failed");
    for id in [&child, &grandchild] {
        let r = finished(s, id);
        assert_eq!(r["state"], "failed", "{r}");
        assert_eq!(r["failure"]["class"], "dependency_failed", "{r}");
        assert_eq!(r["attempts"], 0, "never ran: {r}");
    }
    let (status, v) = submit(s, &format!(r#"{{"after": ["{bad}"]}}"#), "acme");
    assert_eq!(
        (status, v["error"].as_str()),
        (409, Some("dependency-failed")),
        "{v}"
    );
    let (status, v) = submit(s, r#"{"after": ["j-0000000000000000"]}"#, "acme");
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("dependency-not-found")),
        "{v}"
    );
}

/// Over the memory limit fails with `resource_limit`; under it succeeds;
/// a request over the maximum is refused naming it.
fn memory_limit_is_enforced(how: &str) {
    let w = worker(&format!(
        "  limits: {{memory: 128MiB, max_memory: 256MiB, cpu: \"1\", enforce: {how}}}\n"
    ));
    let s = &w.shim;
    assert!(
        s.log_text().contains(&format!("enforcement=\"{how}\""))
            || s.log_text().contains(&format!("enforcement={how}")),
        "limits by {how}: {}",
        s.log_text()
    );
    let over = submit_ok(s, r#"{"params": {"mode": "alloc", "mib": 400}}"#);
    let under = submit_ok(s, r#"{"params": {"mode": "alloc", "mib": 16}}"#);
    let rec = finished(s, &over);
    assert_eq!(rec["state"], "failed", "{rec}");
    assert_eq!(rec["failure"]["class"], "resource_limit", "{rec}");
    let msg = rec["failure"]["message"].as_str().unwrap();
    assert!(
        msg.contains("resource-limit") && msg.contains("128 MiB"),
        "{msg}"
    );
    assert_eq!(rec["limits"]["memory_bytes"], 128 << 20);
    assert_eq!(finished(s, &under)["state"], "succeeded");
    let (status, v) = submit(
        s,
        r#"{"params": {"mode": "ok"}, "limits": {"memory": "1GiB"}}"#,
        "acme",
    );
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("limit-too-high")),
        "{v}"
    );
    assert!(v["message"].as_str().unwrap().contains("max_memory"), "{v}");
    let bigger = submit_ok(
        s,
        r#"{"params": {"mode": "alloc", "mib": 200}, "limits": {"memory": "256MiB"}}"#,
    );
    assert_eq!(
        finished(s, &bigger)["state"],
        "succeeded",
        "a job may ask for up to the maximum"
    );
}

#[test]
fn memory_limits_by_rlimit() {
    println!("limits path: rlimit (forced by exec.limits.enforce)");
    memory_limit_is_enforced("rlimit");
}

/// Whether this host lets the shim make cgroup v2 children with the
/// memory and cpu controllers (as crank-shim checks it).
fn cgroup_v2_usable() -> Result<(), String> {
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup v2 membership")?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(|e| e.to_string())?;
    let mount = mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .ok_or("no cgroup2 mount")?;
    let dir = mount.join(rel.trim_start_matches('/'));
    let ctl = std::fs::read_to_string(dir.join("cgroup.controllers")).map_err(|e| e.to_string())?;
    if !(ctl.contains("memory") && ctl.contains("cpu")) {
        return Err(format!(
            "{}: controllers {:?} lack memory and cpu",
            dir.display(),
            ctl.trim()
        ));
    }
    Ok(())
}

#[test]
fn memory_limits_by_cgroup_v2_where_the_host_allows() {
    match cgroup_v2_usable() {
        Ok(()) => {
            println!("limits path: cgroup v2");
            memory_limit_is_enforced("cgroup");
        }
        Err(why) => println!(
            "limits path: cgroup v2 not usable on this host ({why}); only the rlimit path ran"
        ),
    }
}

#[test]
fn usage_is_summed_per_tenant_through_the_api_and_crankctl() {
    let w = worker("");
    let s = &w.shim;
    let mut ids = Vec::new();
    for tenant in [
        "encoder.acme.crank.local",
        "encoder.acme.crank.local",
        "web.globex.crank.local",
    ] {
        let (status, v) = submit(s, r#"{"params": {"mode": "burn"}}"#, tenant);
        assert_eq!(status, 201, "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let r = finished(s, id);
        assert_eq!(r["state"], "succeeded", "{r}");
        assert!(
            r["usage"][0]["cpu_seconds"].as_f64().unwrap() > 0.0,
            "CPU time recorded: {r}"
        );
    }
    let u = get(s, "/v1/usage?tenant=acme&since=1h");
    assert_eq!(u["source"], "local");
    let rows = u["usage"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{u}");
    assert_eq!(
        (rows[0]["tenant"].as_str(), rows[0]["jobs"].as_u64()),
        (Some("acme"), Some(2)),
        "{u}"
    );
    assert!(rows[0]["cpu_seconds"].as_f64().unwrap() > 0.0, "{u}");
    assert_eq!(rows[0]["gpu_seconds"], 0.0, "no GPU here");
    let all = get(s, "/v1/usage");
    assert_eq!(
        all["usage"].as_array().unwrap().len(),
        2,
        "acme and globex: {all}"
    );

    let out = Command::new(crank_tests::bin("crankctl"))
        .args([
            "jobs",
            "usage",
            "--shim",
            &s.listen.to_string(),
            "--tenant",
            "acme",
            "--since",
            "30d",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["usage"][0]["jobs"], 2, "{v}");
    assert_eq!(v["usage"][0]["capability"], "transcode:h264");
    let table = Command::new(crank_tests::bin("crankctl"))
        .args(["jobs", "usage", "--shim", &s.listen.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("TENANT") && text.contains("globex"), "{text}");
}

/// moto's S3 server on a free loopback port, killed on drop.
struct Moto {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto() -> Option<Moto> {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/py/bin/moto_server");
    if !bin.exists() {
        assert!(
            std::env::var_os("CRANK_NETNS_REQUIRED").is_none(),
            "{} is missing: tests/run.sh installs moto[server] into target/py",
            bin.display()
        );
        println!(
            "skipping: {} is missing (tests/run.sh installs it)",
            bin.display()
        );
        return None;
    }
    let addr = free_addr();
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &addr.port().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let m = Moto { child, addr };
    wait_until("moto_server to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(addr).is_ok()
    });
    Some(m)
}

#[test]
fn outputs_live_in_object_storage_and_any_shim_serves_them() {
    let Some(m) = moto() else { return };
    let (status, out) = curl(&["-X", "PUT", &format!("http://{}/jobs-bucket", m.addr)]);
    assert_eq!(status, 200, "creating the bucket: {out}");
    std::env::set_var("CRANK_TEST_S3_KEY", "testing");
    let storage = format!(
        "  storage:\n    s3: {{bucket: jobs-bucket, endpoint: \"http://{}\", region: us-east-1, access_key_env: CRANK_TEST_S3_KEY, secret_key_env: CRANK_TEST_S3_KEY, prefix: crank/jobs}}\n",
        m.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let exec = format!("  command: [cp, \"{{input}}\", \"{{output}}\"]\n{storage}");
    let a = start(dir.path(), "a", &exec);
    let b = start(dir.path(), "b", &exec);
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "frames of a film\n").unwrap();
    let (status, out) = curl(&[
        "-X",
        "POST",
        "--data-binary",
        &format!("@{}", input.display()),
        &a.url("/v1/jobs"),
    ]);
    assert_eq!(status, 201, "{out}");
    let id = body(&out)["id"].as_str().unwrap().to_string();
    assert_eq!(finished(&a, &id)["state"], "succeeded");
    assert!(
        !dir.path().join(format!("a-work/{id}/output.out")).exists(),
        "the output left the local disk"
    );
    for (who, s) in [
        ("the shim that ran it", &a),
        ("a shim that never saw it", &b),
    ] {
        let (status, out) = curl(&[&s.url(&format!("/v1/jobs/{id}/output"))]);
        assert_eq!(status, 200, "{who}: {out}");
        assert!(out.ends_with("\r\n\r\nframes of a film\n"), "{who}: {out}");
    }
    assert!(
        !dir.path().join(format!("b-work/{id}")).exists(),
        "shim b served it from the bucket, not from a disk of its own"
    );
    let (status, out) = curl(&[&b.url("/v1/jobs/j-00000000000000ff/output")]);
    assert_eq!(status, 404, "{out}");
    // Deleting the job removes its objects too.
    let (status, out) = curl(&["-X", "DELETE", &a.url(&format!("/v1/jobs/{id}"))]);
    assert_eq!(status, 204, "{out}");
    wait_until(
        "the output to leave the bucket",
        Duration::from_secs(10),
        || curl(&[&b.url(&format!("/v1/jobs/{id}/output"))]).0 == 404,
    );
}

#[test]
fn crankctl_checks_job_templates_with_the_mesh_config() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let validate = |dir: &Path| {
        Command::new(crank_tests::bin("crankctl"))
            .args(["config", "validate"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let shipped = validate(&repo.join("deploy/mesh-config"));
    assert!(
        shipped.status.success(),
        "the shipped templates validate: {}",
        String::from_utf8_lossy(&shipped.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("capabilities.yaml"),
        "capabilities:\n  - name: transcode:v1\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("job_templates")).unwrap();
    std::fs::write(
        dir.path().join("job_templates/nightly.yaml"),
        "capability: transcode:v1\npriority: urgent\nschedule: \"0 25 * * *\"\n",
    )
    .unwrap();
    let out = validate(dir.path());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    for want in [
        "job_templates/nightly.yaml",
        "priority: unknown priority \"urgent\"",
        "schedule:",
        "hour field",
    ] {
        assert!(text.contains(want), "{want:?} in {text}");
    }
}
