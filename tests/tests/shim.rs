//! crank-shim end to end: real shim processes, real tools (ffmpeg, sh,
//! sleep), real sidecars, real clients (curl, ffprobe).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crank_tests::proxy::free_addr;
use crank_tests::{curl, header, metric, wait_until, Mesh, MeshOptions, Shim};
use serde_json::Value;

/// A shim in exec mode on free ports, with its work dir in a temp dir.
struct ExecShim {
    dir: tempfile::TempDir,
    shim: Shim,
}

/// The job API helpers, on any shim.
struct ExecShimRef<'a>(&'a Shim);

impl ExecShimRef<'_> {
    fn job(&self, id: &str) -> Value {
        get_json(&self.0.url(&format!("/v1/jobs/{id}")))
    }

    fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        let mut last = Value::Null;
        wait_until(&format!("job {id} {state}"), timeout, || {
            last = self.job(id);
            last["state"] == state
        });
        last
    }

    fn submit_json(&self, body: &str) -> (u16, String) {
        curl(&[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
            &self.0.url("/v1/jobs"),
        ])
    }

    fn submit_ok(&self, body: &str) -> String {
        let (status, out) = self.submit_json(body);
        assert_eq!(status, 201, "{out}");
        json_body(&out)["id"].as_str().unwrap().to_string()
    }
}

impl ExecShim {
    /// `exec` is the YAML body of the `exec:` section (indented 2), without
    /// `work_dir`; `top` is extra top-level YAML.
    fn start(top: &str, exec: &str) -> ExecShim {
        let dir = tempfile::tempdir().unwrap();
        let shim = start_shim(dir.path(), top, exec);
        ExecShim { dir, shim }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn restart(&mut self) {
        let (listen, admin) = (self.shim.listen, self.shim.admin);
        let config = self.shim.config.clone();
        self.shim = Shim::start_existing(&config, "shim", listen, admin);
    }

    fn job(&self, id: &str) -> Value {
        ExecShimRef(&self.shim).job(id)
    }

    fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        ExecShimRef(&self.shim).wait_state(id, state, timeout)
    }

    fn submit_json(&self, body: &str) -> (u16, String) {
        ExecShimRef(&self.shim).submit_json(body)
    }

    fn submit_ok(&self, body: &str) -> String {
        ExecShimRef(&self.shim).submit_ok(body)
    }
}

fn start_shim(dir: &Path, top: &str, exec: &str) -> Shim {
    let (listen, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "mode: exec\nlisten: {listen}\nadmin_listen: {admin}\ncapability: transcode:h264\n\
         registration_file: {reg}\nhost: {{powercap_root: {dir}/no-powercap}}\n{top}\n\
         exec:\n  work_dir: {dir}/work\n{exec}",
        reg = dir.join("registration.json").display(),
        dir = dir.display(),
    );
    Shim::start(dir, "shim", &yaml, listen, admin)
}

fn json_body(curl_out: &str) -> Value {
    let body = curl_out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // curl -i may show an interim response first; take the last head's body.
    let body =
        body.rsplit_once("\r\n\r\n").map_or(
            body,
            |(h, b)| {
                if h.starts_with("HTTP/") {
                    b
                } else {
                    body
                }
            },
        );
    serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON body: {e}: {curl_out}"))
}

fn get_json(url: &str) -> Value {
    let (status, out) = curl(&[url]);
    assert_eq!(status, 200, "{out}");
    json_body(&out)
}

/// The processes whose process group is `pgid` (from /proc).
fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, r)| r)
            .split_whitespace()
            .collect();
        // state ppid pgrp; zombies are already dead.
        if fields.first() != Some(&"Z") && fields.get(2) == Some(&pgid.to_string().as_str()) {
            out.push(pid);
        }
    }
    out
}

/// `sh -c SCRIPT sh ARGS…`: parameters reach the script as positional
/// arguments, never spliced into its text.
const SLEEP_TOOL: &str = r#"  command: [sh, -c, 'sleep "$1" && echo done > "$2"', sh, "{secs}", "{output}"]
  params:
    secs: {type: number, min: 0, max: 30, default: 0.1}
"#;

#[test]
fn ffmpeg_transcode_through_a_sidecar_pair_with_progress_and_ffprobe_checked_output() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip.mkv");
    let st = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=duration=4:size=320x240:rate=25",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:duration=4",
            "-c:v",
            "mpeg4",
            "-c:a",
            "pcm_s16le",
            "-y",
        ])
        .arg(&clip)
        .status()
        .expect("ffmpeg is installed (tests/run.sh installs it)");
    assert!(st.success());

    let shim = start_shim(
        dir.path(),
        "",
        r#"  command: [ffmpeg, -hide_banner, -nostdin, -y, -i, "{input}", -vf, "scale=-2:{height}",
            -c:v, "{codec}", -preset, "{preset}", -c:a, aac, -progress, "pipe:1", -nostats,
            -f, mp4, "{output}"]
  params:
    height: {type: integer, min: 144, max: 2160, default: 720}
    codec: {type: enum, values: [libx264, h264_nvenc], default: libx264}
    preset: {type: enum, values: [ultrafast, veryfast, medium], default: medium}
  progress: ffmpeg
  output: {extension: mp4, content_type: video/mp4}
"#,
    );
    let mesh = Mesh::start(shim.listen, MeshOptions::default());

    let (status, out) = curl(&[
        "-X",
        "POST",
        "--data-binary",
        &format!("@{}", clip.display()),
        &mesh.port_url("/v1/jobs?height=144&preset=ultrafast&priority=live"),
    ]);
    assert_eq!(status, 201, "{out}");
    let job = json_body(&out);
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(
        header(&out, "location"),
        Some(format!("/v1/jobs/{id}").as_str())
    );
    assert_eq!(job["priority"], "live");
    assert_eq!(job["params"]["height"], "144");
    assert_eq!(job["params"]["codec"], "libx264", "defaults are filled in");
    assert_eq!(
        job["requester"], "spiffe://crank.local/tenant/demo/svc/frontend",
        "the caller is the verified peer identity from the sidecar"
    );

    // Follow it through the sidecar until it succeeds.
    let done = crank_tests::shim::wait_for_job_success("the transcode job to succeed", || {
        get_json(&mesh.port_url(&format!("/v1/jobs/{id}")))
    });
    assert_eq!(done["progress"]["percent"], 100.0, "{done:#}");
    let processed = done["progress"]["processed_seconds"].as_f64().unwrap();
    assert!(
        (3.5..=4.5).contains(&processed),
        "ffmpeg's own progress: {done:#}"
    );
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["device"], "cpu", "no GPU here: the CPU pool runs it");
    assert!(done["run_seconds"].as_f64().unwrap() > 0.0);
    assert!(done["queue_wait_seconds"].as_f64().is_some());
    assert_eq!(
        done["energy"]["gpu"], "unmeasured",
        "never 0 when unmeasured"
    );
    assert_eq!(done["energy"]["cpu_package"], "unmeasured");
    let states: Vec<&str> = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["queued", "running", "succeeded"]);

    // Download through the sidecar and check it with ffprobe.
    let output = dir.path().join("out.mp4");
    let dl = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "20",
            "-w",
            "%{http_code} %{content_type}",
            "-o",
        ])
        .arg(&output)
        .arg(mesh.port_url(&format!("/v1/jobs/{id}/output")))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&dl.stdout), "200 video/mp4");
    assert_eq!(
        std::fs::metadata(&output).unwrap().len(),
        done["output_bytes"].as_u64().unwrap()
    );
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=codec_name,height:format=duration",
            "-of",
            "json",
        ])
        .arg(&output)
        .output()
        .unwrap();
    assert!(probe.status.success());
    let p: Value = serde_json::from_slice(&probe.stdout).unwrap();
    assert_eq!(p["streams"][0]["codec_name"], "h264", "{p}");
    assert_eq!(p["streams"][0]["height"], 144, "{p}");
    let duration: f64 = p["format"]["duration"].as_str().unwrap().parse().unwrap();
    assert!((3.8..=4.3).contains(&duration), "{p}");

    // What the SRE sees.
    let m = shim.metrics();
    let finished = "crank_jobs_finished_total{capability=\"transcode:h264\",state=\"succeeded\"}";
    assert_eq!(metric(&m, finished), Some(1.0), "{m}");
    assert_eq!(
        metric(
            &m,
            "crank_job_run_seconds_count{capability=\"transcode:h264\",state=\"succeeded\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "crank_job_energy_unmeasured_total{capability=\"transcode:h264\",domain=\"gpu\"}"
        ),
        Some(1.0)
    );
    assert_eq!(metric(&m, "crank_gpus"), Some(0.0));
    // Jobs by state: the one job is succeeded, none queued or running.
    let by_state = |state: &str| {
        metric(
            &m,
            &format!("crank_jobs{{capability=\"transcode:h264\",state=\"{state}\"}}"),
        )
    };
    assert_eq!(by_state("succeeded"), Some(1.0), "{m}");
    assert_eq!(by_state("queued"), Some(0.0));
    assert_eq!(by_state("running"), Some(0.0));
    assert_eq!(
        metric(
            &m,
            "crank_jobs_submitted_total{capability=\"transcode:h264\",priority=\"live\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "crank_job_queue_wait_seconds_count{capability=\"transcode:h264\",priority=\"live\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn live_jobs_go_first_fifo_within_a_class_and_a_full_queue_is_refused() {
    let s = ExecShim::start(
        "",
        &format!("{SLEEP_TOOL}  devices: {{cpu_slots: 1}}\n  max_queue: 5\n"),
    );
    let blocker = s.submit_ok(r#"{"params": {"secs": 1.5}, "priority": "batch"}"#);
    s.wait_state(&blocker, "running", Duration::from_secs(10));
    let mut ids = Vec::new();
    for p in ["low", "batch", "live", "medium", "live"] {
        let body = format!(r#"{{"params": {{"secs": 0.05}}, "priority": "{p}"}}"#);
        ids.push((p, s.submit_ok(&body)));
    }
    let m = s.shim.metrics();
    assert_eq!(
        metric(&m, "crank_job_queue_depth{priority=\"live\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "crank_job_queue_depth{priority=\"batch\"}"),
        Some(1.0)
    );

    // Five queued = exec.max_queue: the next is refused fast, with a reason.
    let (status, out) = s.submit_json(r#"{"params": {"secs": 0.05}, "priority": "live"}"#);
    assert_eq!(status, 503, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("queue-full"));
    assert!(header(&out, "retry-after").is_some(), "{out}");

    let mut started = Vec::new();
    for (p, id) in &ids {
        let j = s.wait_state(id, "succeeded", Duration::from_secs(20));
        started.push((
            j["started_ms"].as_u64().unwrap(),
            j["seq"].as_u64().unwrap(),
            *p,
        ));
    }
    started.sort();
    let order: Vec<&str> = started.iter().map(|(_, _, p)| *p).collect();
    assert_eq!(order, ["live", "live", "medium", "low", "batch"]);
    // FIFO inside `live`: the earlier submission ran first.
    let lives: Vec<u64> = started
        .iter()
        .filter(|s| s.2 == "live")
        .map(|s| s.1)
        .collect();
    assert!(lives[0] < lives[1], "{started:?}");
}

#[test]
fn cancel_kills_the_whole_process_group_and_a_timeout_does_too() {
    let s = ExecShim::start(
        "",
        r#"  command: [sh, -c, 'sleep "$1" & sleep "$1" & wait', sh, "{secs}"]
  params:
    secs: {type: integer, min: 1, max: 600}
  timeout: 1500ms
"#,
    );
    let id = s.submit_ok(r#"{"params": {"secs": 300}}"#);
    let mut pid = 0;
    wait_until("the job's processes", Duration::from_secs(10), || {
        let j = s.job(&id);
        pid = j["pid"].as_u64().unwrap_or(0) as u32;
        pid > 0 && group_members(pid).len() >= 3
    });
    let (status, out) = curl(&["-X", "POST", &s.shim.url(&format!("/v1/jobs/{id}/cancel"))]);
    assert_eq!(status, 202, "{out}");
    let j = s.wait_state(&id, "canceled", Duration::from_secs(10));
    assert!(j["pid"].is_null());
    wait_until(
        "the process group to be gone",
        Duration::from_secs(5),
        || group_members(pid).is_empty(),
    );
    // Canceling again is refused with the reason.
    let (status, out) = curl(&["-X", "POST", &s.shim.url(&format!("/v1/jobs/{id}/cancel"))]);
    assert_eq!(status, 409, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("job-finished"));

    // A job may ask for a shorter timeout, never a longer one.
    let (status, out) = s.submit_json(r#"{"params": {"secs": 1}, "timeout": "1h"}"#);
    assert_eq!(status, 400, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("bad-timeout"));
    let short = s.submit_ok(r#"{"params": {"secs": 300}, "timeout": "300ms"}"#);
    let j = s.wait_state(&short, "timed_out", Duration::from_secs(10));
    assert!(
        j["failure"]["message"].as_str().unwrap().contains("300ms"),
        "{j:#}"
    );

    // Over exec.timeout: timed_out, classified, group gone, not retried.
    let id = s.submit_ok(r#"{"params": {"secs": 300}}"#);
    let mut pid = 0;
    wait_until(
        "the second job's processes",
        Duration::from_secs(10),
        || {
            pid = s.job(&id)["pid"].as_u64().unwrap_or(0) as u32;
            pid > 0 && group_members(pid).len() >= 3
        },
    );
    let j = s.wait_state(&id, "timed_out", Duration::from_secs(15));
    assert_eq!(j["failure"]["class"], "timeout", "{j:#}");
    assert_eq!(j["attempts"], 1, "a timeout is not retried");
    wait_until(
        "the timed-out group to be gone",
        Duration::from_secs(5),
        || group_members(pid).is_empty(),
    );
    let m = s.shim.metrics();
    assert_eq!(
        metric(
            &m,
            "crank_jobs_finished_total{capability=\"transcode:h264\",state=\"timed_out\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &m,
            "crank_jobs_finished_total{capability=\"transcode:h264\",state=\"canceled\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn a_retryable_failure_is_retried_with_backoff_and_bad_input_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("flaky.sh");
    std::fs::write(
        &script,
        r#"n=$(cat "$1/count" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$1/count"
if [ "$3" = bad ]; then echo "input: Invalid data found when processing input" >&2; exit 1; fi
if [ $n -lt 2 ]; then echo "Error while opening encoder: Cannot allocate memory" >&2; exit 1; fi
echo ok > "$2"
"#,
    )
    .unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let s = ExecShim::start(
        "",
        &format!(
            "  command: [sh, {}, {}, \"{{output}}\", \"{{fail}}\"]\n  params:\n    fail: {{type: enum, values: [once, bad], default: once}}\n  retries: {{max_attempts: 3, backoff_initial: 100ms, backoff_max: 200ms}}\n",
            script.display(),
            state.display()
        ),
    );
    let id = s.submit_ok(r#"{"params": {}}"#);
    let j = s.wait_state(&id, "succeeded", Duration::from_secs(15));
    assert_eq!(j["attempts"], 2, "{j:#}");
    let notes: Vec<&str> = j["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["note"].as_str())
        .collect();
    assert!(
        notes.iter().any(|n| n.starts_with("out_of_resources: ")
            && n.contains("Cannot allocate memory")
            && n.contains("retry 1 of 2")),
        "{notes:?}"
    );
    assert!(
        j["failure"].is_null(),
        "a success clears the failure: {j:#}"
    );

    std::fs::remove_file(state.join("count")).unwrap();
    let id = s.submit_ok(r#"{"params": {"fail": "bad"}}"#);
    let j = s.wait_state(&id, "failed", Duration::from_secs(15));
    assert_eq!(j["attempts"], 1, "bad input is not retried: {j:#}");
    assert_eq!(j["failure"]["class"], "bad_input");
    assert_eq!(j["failure"]["exit_code"], 1);
    assert!(
        j["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("Invalid data found"),
        "{j:#}"
    );
    assert!(j["stderr_tail"][0]
        .as_str()
        .unwrap()
        .contains("Invalid data"));

    let m = s.shim.metrics();
    assert_eq!(
        metric(
            &m,
            "crank_job_retries_total{capability=\"transcode:h264\",class=\"out_of_resources\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn a_restart_in_the_middle_of_the_queue_marks_the_interrupted_job_and_runs_the_rest() {
    let mut s = ExecShim::start("", &format!("{SLEEP_TOOL}  devices: {{cpu_slots: 1}}\n"));
    let ids: Vec<String> = (0..3)
        .map(|_| s.submit_ok(r#"{"params": {"secs": 2}}"#))
        .collect();
    let first = s.wait_state(&ids[0], "running", Duration::from_secs(10));
    let pid = first["pid"].as_u64().unwrap() as u32;
    assert_eq!(s.job(&ids[1])["state"], "queued");

    // The shim dies hard: no drain, no goodbye.
    s.shim.signal(libc::SIGKILL);
    s.shim
        .wait_exit(Duration::from_secs(5))
        .expect("the shim died");
    s.restart();
    // The old tool's process group did not outlive the restart.
    wait_until(
        "the old run's processes to be gone",
        Duration::from_secs(5),
        || group_members(pid).is_empty(),
    );

    let j = s.wait_state(&ids[0], "succeeded", Duration::from_secs(20));
    assert_eq!(j["attempts"], 2, "{j:#}");
    assert!(
        j["history"].as_array().unwrap().iter().any(|e| e["note"]
            .as_str()
            .is_some_and(|n| n.starts_with("interrupted"))),
        "the history says it was interrupted: {j:#}"
    );
    let mut last_start = j["history"].as_array().unwrap().last().unwrap()["at_ms"]
        .as_u64()
        .unwrap();
    for id in &ids[1..] {
        let j = s.wait_state(id, "succeeded", Duration::from_secs(20));
        assert_eq!(j["attempts"], 1, "{j:#}");
        let start = j["started_ms"].as_u64().unwrap();
        assert!(start >= last_start, "queue order kept across the restart");
        last_start = start;
    }
    // The restarted shim knows the whole history.
    let list = get_json(&s.shim.url("/v1/jobs?state=succeeded"));
    assert_eq!(list["jobs"].as_array().unwrap().len(), 3);
}

#[test]
fn bad_parameters_are_refused_with_every_problem_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let s = ExecShim::start(
        "",
        &format!(
            "  command: [sh, -c, 'touch \"$1\"; echo \"$3 $4\" > \"$2\"', sh, {}, \"{{output}}\", \"{{preset}}\", \"{{height}}\"]\n  params:\n    height: {{type: integer, min: 144, max: 2160, default: 720}}\n    preset: {{type: string, pattern: \"[a-z]+\", default: medium}}\n",
            marker.display()
        ),
    );
    let (status, out) =
        s.submit_json(r#"{"params": {"height": "abc", "colour": "red", "preset": "-y"}}"#);
    assert_eq!(status, 400, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("bad-params"));
    let body = json_body(&out);
    let problems: Vec<&str> = body["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(
        problems.iter().any(|p| p.contains("`height`")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("`colour`") && p.contains("height")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("`preset`")),
        "{problems:?}"
    );

    let (status, out) = s.submit_json(r#"{"params": {}, "priority": "urgent"}"#);
    assert_eq!(status, 400, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("bad-priority"));
    assert!(out.contains("live, high, medium, low, batch"), "{out}");

    // Query-string form, same checks.
    let (status, out) = curl(&[
        "-X",
        "POST",
        "--data-binary",
        "x",
        &s.shim.url("/v1/jobs?height=99999"),
    ]);
    assert_eq!(status, 400, "{out}");

    assert_eq!(
        get_json(&s.shim.url("/v1/jobs"))["jobs"],
        serde_json::json!([])
    );
    assert!(!marker.exists(), "the tool never ran");
    assert!(
        std::fs::read_dir(s.path().join("work"))
            .unwrap()
            .flatten()
            .all(|e| e.file_name() == "jobs.redb"),
        "no job directory was left behind"
    );
    let m = s.shim.metrics();
    assert_eq!(
        metric(&m, "crank_jobs_refused_total{reason=\"bad-params\"}"),
        Some(2.0),
        "{m}"
    );

    // A good one runs.
    let id = s.submit_ok(r#"{"params": {"height": 360}}"#);
    s.wait_state(&id, "succeeded", Duration::from_secs(10));
    assert!(marker.exists());
}

#[test]
fn without_a_gpu_the_shim_says_gpu_none_and_refuses_gpu_only_placement() {
    let s = ExecShim::start("labels: {pool: edge, gpu: nvidia}", SLEEP_TOOL);
    let host = get_json(&s.shim.url("/v1/host"));
    assert_eq!(host["gpu"]["state"], "none", "{host:#}");
    assert!(!host["gpu"]["reason"].as_str().unwrap().is_empty());
    assert!(host["cpu"]["cores"].as_u64().unwrap() >= 1);
    assert_eq!(host["rapl"]["state"], "unavailable");
    let (status, admin_host) = s.shim.admin_get("/v1/host");
    assert_eq!(status, 200);
    assert!(admin_host.contains("\"none\""));

    let reg: Value =
        serde_json::from_str(&std::fs::read_to_string(s.path().join("registration.json")).unwrap())
            .unwrap();
    assert_eq!(reg["capabilities"], serde_json::json!(["transcode:h264"]));
    assert_eq!(
        reg["labels"]["gpu"], "none",
        "a config label cannot claim a GPU: {reg:#}"
    );
    assert_eq!(reg["labels"]["pool"], "edge");
    assert_eq!(reg["labels"]["energy.gpu"], "unmeasured");
    assert_eq!(s.shim.admin_get("/v1/registration").0, 200);

    // GPU-aware placement: jobs whose parameters need a GPU are refused on
    // this host, everything else runs in the CPU pool.
    let split = ExecShim::start(
        "",
        r#"  command: [sh, -c, 'echo "$1" > "$2"', sh, "{codec}", "{output}"]
  params:
    codec: {type: enum, values: [libx264, h264_nvenc], default: libx264}
  devices: {gpu_when: {codec: [h264_nvenc]}}
"#,
    );
    let (status, out) = split.submit_json(r#"{"params": {"codec": "h264_nvenc"}}"#);
    assert_eq!(status, 422, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("no-matching-device"));
    assert!(
        out.contains("codec=h264_nvenc needs a GPU and this host has none"),
        "{out}"
    );
    let id = split.submit_ok(r#"{"params": {"codec": "libx264"}}"#);
    let j = split.wait_state(&id, "succeeded", Duration::from_secs(10));
    assert_eq!(j["device"], "cpu");

    // GPU-only placement on this host: refused at start, with the fix.
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_addr(), free_addr());
    let cfg = dir.path().join("gpu.yaml");
    std::fs::write(
        &cfg,
        format!(
            "mode: exec\nlisten: {listen}\nadmin_listen: {admin}\ncapability: transcode:h264\nexec:\n  work_dir: {}\n{SLEEP_TOOL}  devices: {{placement: gpu}}\n",
            dir.path().join("work").display()
        ),
    )
    .unwrap();
    let out = Command::new(crank_tests::bin("crank-shim"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no GPU") && err.contains("placement"), "{err}");

    // The host subcommand (the documented GPU check) works here too.
    let out = Command::new(crank_tests::bin("crank-shim"))
        .args(["host", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["gpu"]["state"], "none");
}

#[test]
fn serve_mode_fronts_a_real_worker_through_a_sidecar_and_stops_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin, upstream) = (free_addr(), free_addr(), free_addr());
    let reg = dir.path().join("registration.json");
    let yaml = format!(
        "mode: serve\nlisten: {listen}\nadmin_listen: {admin}\ncapability: thumbnail:v1\n\
         registration_file: {}\nserve:\n  command: [{}, --listen, '{upstream}', --name, thumbs]\n  upstream: {upstream}\n  health_interval: 100ms\n  drain_timeout: 5s\n",
        reg.display(),
        crank_tests::bin("crank-demo-backend").display(),
    );
    let mut shim = Shim::start(dir.path(), "serve", &yaml, listen, admin);
    let mesh = Mesh::start(listen, MeshOptions::default());
    let (status, out) = curl(&["-d", "hello", &mesh.port_url("/echo?x=1")]);
    assert_eq!(status, 200, "{out}");
    let echo = json_body(&out);
    assert_eq!(echo["service"], "thumbs");
    assert_eq!(echo["uri"], "/echo?x=1");
    assert_eq!(echo["method"], "POST");
    assert!(reg.exists(), "registered once the worker was healthy");

    let worker_pid = find_pid_listening(upstream).expect("the worker runs");
    shim.signal(libc::SIGTERM);
    let st = shim
        .wait_exit(Duration::from_secs(15))
        .expect("the shim stops");
    assert!(st.success(), "{}", shim.log_text());
    assert!(!reg.exists(), "deregistered on the way out");
    wait_until("the worker to be gone", Duration::from_secs(5), || {
        !Path::new(&format!("/proc/{worker_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{worker_pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
}

/// The pid of the process with a listening socket on `addr` (via /proc).
fn find_pid_listening(addr: SocketAddr) -> Option<u32> {
    let port = format!(":{:04X}", addr.port());
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = tcp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1)?.ends_with(&port) && f.get(3) == Some(&"0A")).then(|| f[9].to_string())
    })?;
    let target = format!("socket:[{inode}]");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()) {
                return Some(pid);
            }
        }
    }
    None
}

#[test]
fn config_check_names_the_field_and_the_shipped_example_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "mode: exec\nlisten: 127.0.0.1:1\ncapability: transcode:h264\nexec:\n  work_dir: /tmp/x\n  command: [ffmpeg, \"{hieght}\"]\n",
    )
    .unwrap();
    let out = Command::new(crank_tests::bin("crank-shim"))
        .arg("--config")
        .arg(&bad)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exec.command") && err.contains("hieght"),
        "{err}"
    );

    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/shim/transcode.yaml");
    let out = Command::new(crank_tests::bin("crank-shim"))
        .arg("--config")
        .arg(&shipped)
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_program_that_is_not_on_path_is_refused_by_check_and_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin, upstream) = (free_addr(), free_addr(), free_addr());
    let work = dir.path().join("work");
    let configs = [
        (
            "exec.command",
            format!(
                "mode: exec\nlisten: {listen}\nadmin_listen: {admin}\ncapability: transcode:h264\n\
                 exec:\n  work_dir: {}\n  command: [ffmpge, -i, \"{{input}}\", \"{{output}}\"]\n\
                 \x20 env: {{PATH: /usr/local/bin:/usr/bin:/bin}}\n",
                work.display()
            ),
            "\"/usr/local/bin:/usr/bin:/bin\"",
        ),
        (
            "serve.command",
            format!(
                "mode: serve\nlisten: {listen}\nadmin_listen: {admin}\ncapability: thumbnail:v1\n\
                 serve:\n  command: [ffmpge, --listen, '{upstream}']\n  upstream: {upstream}\n"
            ),
            "PATH",
        ),
    ];
    for (field, yaml, searched) in configs {
        let cfg = dir.path().join("missing.yaml");
        std::fs::write(&cfg, yaml).unwrap();
        for check in [true, false] {
            let mut cmd = Command::new(crank_tests::bin("crank-shim"));
            cmd.arg("--config").arg(&cfg);
            if check {
                cmd.arg("--check");
            }
            let out = cmd.output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "check={check}: {err}");
            for piece in [
                field,
                "\"ffmpge\"",
                "not found on the PATH",
                searched,
                "absolute path",
            ] {
                assert!(err.contains(piece), "check={check}, {piece}: {err}");
            }
            assert!(
                !String::from_utf8_lossy(&out.stdout).contains("valid"),
                "check={check}"
            );
        }
    }
    assert!(!work.exists(), "refused before anything was set up");

    // A relative program path is the config directory's, and must run.
    let tool = dir.path().join("tool.sh");
    std::fs::write(&tool, "#!/bin/sh\n").unwrap();
    let cfg = dir.path().join("relative.yaml");
    std::fs::write(
        &cfg,
        format!(
            "mode: exec\nlisten: {listen}\ncapability: transcode:h264\n\
             exec:\n  work_dir: {}\n  command: [./tool.sh, \"{{output}}\"]\n",
            work.display()
        ),
    )
    .unwrap();
    let check = || {
        Command::new(crank_tests::bin("crank-shim"))
            .arg("--config")
            .arg(&cfg)
            .arg("--check")
            .output()
            .unwrap()
    };
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("is not executable") && err.contains("chmod +x"),
        "{err}"
    );
    let mut perms = std::fs::metadata(&tool).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&tool, perms).unwrap();
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn energy_from_rapl_counters_is_attributed_to_the_job_that_ran() {
    // A powercap tree like the kernel's, whose counter the test advances
    // while the job runs: 5 J of CPU package energy during the job.
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("powercap/intel-rapl:0");
    std::fs::create_dir_all(&pkg).unwrap();
    std::fs::write(pkg.join("name"), "package-0\n").unwrap();
    std::fs::write(pkg.join("max_energy_range_uj"), "262143328850\n").unwrap();
    std::fs::write(pkg.join("energy_uj"), "1000000\n").unwrap();
    let (listen, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "mode: exec\nlisten: {listen}\nadmin_listen: {admin}\ncapability: transcode:h264\n\
         host: {{powercap_root: {}, energy_sample_interval: 50ms}}\nexec:\n  work_dir: {}\n{SLEEP_TOOL}",
        dir.path().join("powercap").display(),
        dir.path().join("work").display(),
    );
    let shim = Shim::start(dir.path(), "shim", &yaml, listen, admin);
    let host = get_json(&shim.url("/v1/host"));
    assert_eq!(host["rapl"]["state"], "available", "{host:#}");
    let s = ExecShimRef(&shim);
    let id = s.submit_ok(r#"{"params": {"secs": 1.5}}"#);
    s.wait_state(&id, "running", Duration::from_secs(10));
    std::fs::write(pkg.join("energy_uj"), "3000000\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    std::fs::write(pkg.join("energy_uj"), "6000000\n").unwrap();
    let j = s.wait_state(&id, "succeeded", Duration::from_secs(10));
    let joules = j["energy"]["cpu_package"]
        .as_f64()
        .unwrap_or_else(|| panic!("measured joules: {j:#}"));
    assert!((joules - 5.0).abs() < 1e-6, "{j:#}");
    assert_eq!(j["energy"]["gpu"], "unmeasured", "no GPU here");
    let m = shim.metrics();
    assert_eq!(
        metric(
            &m,
            "crank_job_energy_joules_sum{capability=\"transcode:h264\",domain=\"cpu_package\"}"
        ),
        Some(5.0),
        "{m}"
    );
}

#[test]
fn sigterm_deregisters_refuses_new_jobs_and_requeues_what_it_had_to_stop() {
    let mut s = ExecShim::start(
        "",
        &format!("{SLEEP_TOOL}  devices: {{cpu_slots: 1}}\n  drain_timeout: 1s\n"),
    );
    let reg = s.path().join("registration.json");
    wait_until("the registration", Duration::from_secs(5), || reg.exists());
    let long = s.submit_ok(r#"{"params": {"secs": 5}}"#);
    let queued = s.submit_ok(r#"{"params": {"secs": 0.1}}"#);
    s.wait_state(&long, "running", Duration::from_secs(10));

    s.shim.signal(libc::SIGTERM);
    // While it drains: deregistered, not ready, and new work is refused
    // with a reason the caller's sidecar treats as a load signal.
    wait_until("deregistration", Duration::from_secs(5), || !reg.exists());
    let (status, out) = s.submit_json(r#"{"params": {"secs": 0.1}}"#);
    assert_eq!(status, 503, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("draining"));
    assert_eq!(s.shim.admin_get("/ready").0, 503);
    let st = s
        .shim
        .wait_exit(Duration::from_secs(10))
        .expect("the shim stops after the drain");
    assert!(st.success(), "{}", s.shim.log_text());

    // The next start runs both: the stopped run is not charged an attempt.
    s.restart();
    let j = s.wait_state(&long, "succeeded", Duration::from_secs(20));
    assert_eq!(j["attempts"], 1, "{j:#}");
    assert!(
        j["history"].as_array().unwrap().iter().any(|e| e["note"]
            .as_str()
            .is_some_and(|n| n.starts_with("interrupted by shutdown"))),
        "{j:#}"
    );
    s.wait_state(&queued, "succeeded", Duration::from_secs(20));
    assert!(reg.exists(), "registered again");
}
