//! The shim's cluster job queue on a real PostgreSQL (Debian's postgresql
//! package, started here in a private data directory): three `crank-shim`
//! processes of one capability share the database. Jobs spread over them;
//! a shim killed with SIGKILL mid-job loses its lease and the job finishes
//! on another, with both attempts recorded; tenant quotas answer 429; two
//! tenants share the workers by weight; a `live` job preempts `batch` work;
//! PostgreSQL restarted under load loses no job; `after` chains run in
//! order across shims and fail fast, usage through one shim sums every
//! shim's jobs, and a changed tenants.yaml applies without a restart.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crank_tests::postgres::Postgres;
use crank_tests::proxy::free_addr;
use crank_tests::{curl, header, wait_until, Shim};
use serde_json::Value;

/// A "transcode" that sleeps `secs`, then writes its output.
const TOOL: &str = r#"  command: [sh, -c, 'sleep "$1" && echo done > "$2"', sh, "{secs}", "{output}"]
  params:
    secs: {type: number, min: 0, max: 30, default: 0.1}
"#;

fn identity(tenant: &str) -> String {
    format!("x-crank-client-id: spiffe://crank.local/tenant/{tenant}/svc/api")
}

/// Shims named `shim-a`, `shim-b`, … on one database.
struct Pool {
    shims: BTreeMap<String, Shim>,
    _dir: tempfile::TempDir,
}

impl Pool {
    /// `queue` is the body of `exec.queue.postgres` after the URL and host
    /// (leases and timings); `tenants` the tenants.yaml text.
    fn start(pg: &Postgres, n: usize, slots: usize, queue: &str, tenants: &str) -> Pool {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tenants.yaml"), tenants).unwrap();
        let mut shims = BTreeMap::new();
        for i in 0..n {
            let name = format!("shim-{}", (b'a' + i as u8) as char);
            let exec = format!(
                "{TOOL}  devices: {{cpu_slots: {slots}}}\n  queue:\n    postgres: {{url: \"{}\", host: {name}, {queue}}}\n    tenants: {}/tenants.yaml\n",
                pg.url(),
                dir.path().display()
            );
            shims.insert(name.clone(), start_shim(dir.path(), &name, &exec));
        }
        Pool { shims, _dir: dir }
    }

    fn any(&self) -> &Shim {
        self.shims.values().next().unwrap()
    }

    fn alive(&self) -> impl Iterator<Item = &Shim> {
        self.shims.values()
    }
}

fn start_shim(dir: &Path, name: &str, exec: &str) -> Shim {
    let (listen, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "mode: exec\nlisten: {listen}\nadmin_listen: {admin}\ncapability: transcode:h264\n\
         registration_file: {reg}\nhost: {{powercap_root: {dir}/no-powercap}}\n\
         exec:\n  work_dir: {dir}/{name}-work\n{exec}",
        reg = dir.join(format!("{name}-registration.json")).display(),
        dir = dir.display(),
    );
    Shim::start(dir, name, &yaml, listen, admin)
}

fn body_json(out: &str) -> Value {
    let body = out.rsplit_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON body: {e}: {out}"))
}

fn submit(shim: &Shim, tenant: &str, body: &str) -> (u16, String) {
    curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-H",
        &identity(tenant),
        "--data-binary",
        body,
        &shim.url("/v1/jobs"),
    ])
}

fn submit_ok(shim: &Shim, tenant: &str, body: &str) -> String {
    let (status, out) = submit(shim, tenant, body);
    assert_eq!(status, 201, "{out}");
    body_json(&out)["id"].as_str().unwrap().to_string()
}

fn job(shim: &Shim, id: &str) -> Value {
    let (status, out) = curl(&[&shim.url(&format!("/v1/jobs/{id}"))]);
    assert_eq!(status, 200, "{out}");
    body_json(&out)
}

fn wait_state(shim: &Shim, id: &str, state: &str, timeout: Duration) -> Value {
    let mut last = Value::Null;
    wait_until(&format!("job {id} {state}"), timeout, || {
        last = job(shim, id);
        assert!(
            !(state == "succeeded"
                && matches!(
                    last["state"].as_str(),
                    Some("failed" | "canceled" | "timed_out")
                )),
            "{last:#}"
        );
        last["state"] == state
    });
    last
}

const FAST: &str = "lease: 2s, heartbeat: 500ms, poll_interval: 100ms";

#[test]
fn jobs_spread_over_the_shims_and_a_killed_host_s_job_finishes_on_another() {
    let pg = Postgres::start();
    let mut pool = Pool::start(&pg, 3, 1, FAST, "tenants: []\n");
    let ids: Vec<String> = (0..6)
        .map(|_| submit_ok(pool.any(), "acme", r#"{"params": {"secs": 0.5}}"#))
        .collect();
    let mut hosts = std::collections::BTreeSet::new();
    for id in &ids {
        let rec = wait_state(pool.any(), id, "succeeded", Duration::from_secs(30));
        assert_eq!(rec["tenant"], "acme", "{rec:#}");
        hosts.insert(rec["attempt_log"][0]["host"].as_str().unwrap().to_string());
    }
    assert_eq!(hosts.len(), 3, "every shim took work: {hosts:?}");

    // A long job; the shim that runs it dies hard.
    let id = submit_ok(pool.any(), "acme", r#"{"params": {"secs": 3}}"#);
    let running = wait_state(pool.any(), &id, "running", Duration::from_secs(10));
    let first = running["attempt_log"][0]["host"]
        .as_str()
        .unwrap()
        .to_string();
    let mut victim = pool.shims.remove(&first).unwrap();
    victim.signal(libc::SIGKILL);
    victim
        .wait_exit(Duration::from_secs(5))
        .expect("the shim died");

    let done = wait_state(pool.any(), &id, "succeeded", Duration::from_secs(20));
    let log = done["attempt_log"].as_array().unwrap();
    assert_eq!(log.len(), 2, "{done:#}");
    assert_eq!(log[0]["host"], first.as_str());
    assert_eq!(log[0]["outcome"], "host-lost", "{done:#}");
    assert_eq!(log[1]["outcome"], "succeeded");
    let second = log[1]["host"].as_str().unwrap();
    assert_ne!(second, first);
    assert!(
        log[1]["started_ms"].as_u64() >= log[0]["ended_ms"].as_u64(),
        "never two attempts at once: {done:#}"
    );
    for s in pool.alive() {
        assert_eq!(
            job(s, &id),
            job(pool.any(), &id),
            "every shim reads the shared record"
        );
    }

    // The output is on the host that ran it; another shim names it.
    let runner = &pool.shims[second];
    let (status, out) = curl(&[&runner.url(&format!("/v1/jobs/{id}/output"))]);
    assert_eq!(
        (status, out.trim_end().ends_with("done")),
        (200, true),
        "{out}"
    );
    let other = pool
        .shims
        .iter()
        .find(|(n, _)| n.as_str() != second)
        .unwrap()
        .1;
    let (status, out) = curl(&[&other.url(&format!("/v1/jobs/{id}/output"))]);
    assert_eq!(status, 409, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("output-elsewhere"));
    assert_eq!(body_json(&out)["host"], second, "{out}");
}

#[test]
fn tenant_quotas_refuse_with_429_and_the_tenant_comes_from_the_identity() {
    let pg = Postgres::start();
    let tenants = "tenants:\n  - {name: acme, max_running: 1, max_queued: 2}\n";
    let pool = Pool::start(&pg, 3, 1, FAST, tenants);
    let s = pool.any();
    let first = submit_ok(s, "acme", r#"{"params": {"secs": 3}}"#);
    wait_state(s, &first, "running", Duration::from_secs(10));
    let queued: Vec<String> = (0..2)
        .map(|_| submit_ok(s, "acme", r#"{"params": {"secs": 0.1}}"#))
        .collect();
    let (status, out) = submit(s, "acme", r#"{"params": {"secs": 0.1}}"#);
    assert_eq!(status, 429, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("tenant-queue-quota"));
    assert!(
        header(&out, "retry-after").is_some_and(|v| v.parse::<u64>().is_ok()),
        "{out}"
    );
    assert!(
        body_json(&out)["message"]
            .as_str()
            .unwrap()
            .contains("acme"),
        "{out}"
    );
    // max_running 1: two shims are idle, yet acme's next jobs wait.
    for id in &queued {
        assert_eq!(job(s, id)["state"], "queued");
    }
    // Other tenants are not limited by acme's quota.
    let other = submit_ok(s, "globex", r#"{"params": {"secs": 0.1}}"#);
    wait_state(s, &other, "succeeded", Duration::from_secs(10));
    // The tenant is never a body field.
    let (status, out) = submit(
        s,
        "acme",
        r#"{"params": {"secs": 0.1}, "tenant": "globex"}"#,
    );
    assert_eq!(status, 400, "{out}");
    for id in &queued {
        wait_state(s, id, "succeeded", Duration::from_secs(20));
    }
}

#[test]
fn two_tenants_share_the_workers_by_weight() {
    let pg = Postgres::start();
    let tenants = "tenants:\n  - {name: big, weight: 2}\n  - {name: small, weight: 1}\n";
    let pool = Pool::start(&pg, 3, 1, FAST, tenants);
    let s = pool.any();
    // A blocker per shim, so nothing starts until both tenants have queued.
    let blockers: Vec<String> = (0..3)
        .map(|_| submit_ok(s, "setup", r#"{"params": {"secs": 1}}"#))
        .collect();
    let mut ids = Vec::new();
    for tenant in ["big", "small"] {
        for _ in 0..12 {
            ids.push((tenant, submit_ok(s, tenant, r#"{"params": {"secs": 0.3}}"#)));
        }
    }
    let mut starts: Vec<(u64, &str)> = ids
        .iter()
        .map(|(t, id)| {
            let rec = wait_state(s, id, "succeeded", Duration::from_secs(40));
            (rec["started_ms"].as_u64().unwrap(), *t)
        })
        .collect();
    for b in &blockers {
        wait_state(s, b, "succeeded", Duration::from_secs(10));
    }
    starts.sort();
    let first: Vec<&str> = starts.iter().take(12).map(|(_, t)| *t).collect();
    let big = first.iter().filter(|t| **t == "big").count();
    // Weights 2:1 give 8 of the first 12 starts; FIFO would give 12.
    assert!(
        (6..=10).contains(&big),
        "big had {big} of the first 12 starts: {first:?}"
    );
}

#[test]
fn a_live_job_preempts_batch_work_which_is_requeued_not_failed() {
    let pg = Postgres::start();
    let pool = Pool::start(&pg, 2, 1, FAST, "tenants: []\n");
    let s = pool.any();
    let batch: Vec<String> = (0..2)
        .map(|_| submit_ok(s, "acme", r#"{"params": {"secs": 4}, "priority": "batch"}"#))
        .collect();
    for id in &batch {
        wait_state(s, id, "running", Duration::from_secs(10));
    }
    let live = submit_ok(
        s,
        "acme",
        r#"{"params": {"secs": 0.2}, "priority": "live"}"#,
    );
    let done = wait_state(s, &live, "succeeded", Duration::from_secs(3));
    let victims: Vec<Value> = batch
        .iter()
        .map(|id| wait_state(s, id, "succeeded", Duration::from_secs(20)))
        .filter(|r| r["attempt_log"][0]["outcome"] == "preempted")
        .collect();
    assert_eq!(
        victims.len(),
        1,
        "exactly one batch job preempted; live: {done:#}"
    );
    let v = &victims[0];
    assert!(
        v.get("failure").is_none(),
        "a preemption is no failure: {v:#}"
    );
    assert_eq!(v["attempts"], 2, "{v:#}");
    assert_eq!(
        v["max_attempts"], 4,
        "the retry budget is not charged: {v:#}"
    );
}

#[test]
fn an_embedded_shim_preempts_batch_work_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_shim(
        dir.path(),
        "solo",
        &format!("{TOOL}  devices: {{cpu_slots: 1}}\n  queue: {{preemption: true}}\n"),
    );
    let batch = submit_ok(
        &s,
        "acme",
        r#"{"params": {"secs": 4}, "priority": "batch"}"#,
    );
    wait_state(&s, &batch, "running", Duration::from_secs(10));
    let live = submit_ok(
        &s,
        "acme",
        r#"{"params": {"secs": 0.2}, "priority": "live"}"#,
    );
    wait_state(&s, &live, "succeeded", Duration::from_secs(3));
    let v = wait_state(&s, &batch, "succeeded", Duration::from_secs(20));
    assert_eq!(v["attempt_log"][0]["outcome"], "preempted", "{v:#}");
    assert!(v.get("failure").is_none(), "{v:#}");
}

#[test]
fn postgres_restarted_under_load_loses_no_accepted_job() {
    let mut pg = Postgres::start();
    let pool = Pool::start(
        &pg,
        3,
        2,
        "lease: 3s, heartbeat: 500ms, poll_interval: 100ms",
        "tenants: []\n",
    );
    let urls: Vec<String> = pool.alive().map(|s| s.url("/v1/jobs")).collect();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    let submitter = std::thread::spawn(move || {
        let mut accepted = Vec::new();
        let mut refused = 0;
        for i in 0..40 {
            let (status, out) = curl(&[
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "--data-binary",
                r#"{"params": {"secs": 0.1}}"#,
                &urls[i % urls.len()],
            ]);
            match status {
                201 => {
                    accepted.push(body_json(&out)["id"].as_str().unwrap().to_string());
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                503 => refused += 1,
                _ => panic!("unexpected answer: {out}"),
            }
            // Load at about 20 submissions a second.
            std::thread::sleep(Duration::from_millis(50));
        }
        (accepted, refused)
    });
    wait_until("submissions under way", Duration::from_secs(20), || {
        count.load(Ordering::SeqCst) >= 8
    });
    pg.restart();
    let (accepted, refused) = submitter.join().unwrap();
    eprintln!(
        "{} accepted, {refused} refused while the database was down",
        accepted.len()
    );
    assert!(accepted.len() >= 20, "{} accepted", accepted.len());
    for id in &accepted {
        wait_state(pool.any(), id, "succeeded", Duration::from_secs(30));
    }
}

fn after(secs: f64, parent: &str) -> String {
    format!(r#"{{"params": {{"secs": {secs}}}, "after": ["{parent}"]}}"#)
}

/// `after` on the shared queue: a chain submitted through different shims
/// runs in order, unknown and failed dependencies are refused, a parent
/// that ends without success fails its dependants at once, usage through
/// one shim sums every shim's jobs, and tenants.yaml reloads.
#[test]
fn after_usage_and_tenants_yaml_work_across_shims() {
    let pg = Postgres::start();
    let pool = Pool::start(&pg, 2, 1, FAST, "tenants: []\n");
    let shims: Vec<&Shim> = pool.alive().collect();
    let (a, b) = (shims[0], shims[1]);
    let mut ids: Vec<String> = (0..2)
        .map(|_| submit_ok(a, "acme", r#"{"params": {"secs": 1}}"#))
        .collect();
    let first = submit_ok(a, "acme", r#"{"params": {"secs": 0.5}}"#);
    let second = submit_ok(b, "acme", &after(0.2, &first));
    let third = submit_ok(a, "acme", &after(0.2, &second));
    let chain: Vec<Value> = [&first, &second, &third]
        .iter()
        .map(|id| wait_state(b, id, "succeeded", Duration::from_secs(30)))
        .collect();
    for w in chain.windows(2) {
        let (before, next) = (&w[0], &w[1]);
        assert!(
            next["started_ms"].as_u64() >= before["finished_ms"].as_u64(),
            "{next:#} started before {before:#} finished"
        );
    }
    ids.extend([first, second, third]);
    let mut hosts = std::collections::BTreeSet::new();
    for id in &ids {
        let rec = wait_state(a, id, "succeeded", Duration::from_secs(30));
        hosts.insert(rec["attempt_log"][0]["host"].as_str().unwrap().to_string());
    }
    assert_eq!(hosts.len(), 2, "both shims ran jobs: {hosts:?}");
    for shim in [a, b] {
        let (status, out) = curl(&[&shim.url("/v1/usage?tenant=acme&since=1h")]);
        assert_eq!(status, 200, "{out}");
        let u = body_json(&out);
        assert_eq!(u["source"], "queue", "{u:#}");
        assert_eq!(u["usage"][0]["tenant"], "acme", "{u:#}");
        assert_eq!(u["usage"][0]["jobs"], 5, "every shim's jobs: {u:#}");
        assert_eq!(u["usage"][0]["attempts"], 5, "{u:#}");
    }

    let (status, out) = submit(a, "acme", r#"{"after": ["j-0000000000000000"]}"#);
    assert_eq!(status, 400, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("dependency-not-found"));
    let parent = submit_ok(a, "acme", r#"{"params": {"secs": 20}}"#);
    wait_state(a, &parent, "running", Duration::from_secs(10));
    let child = submit_ok(b, "acme", &after(0.1, &parent));
    let grandchild = submit_ok(a, "acme", &after(0.1, &child));
    assert_eq!(job(b, &child)["state"], "queued", "waits for its parent");
    let (status, out) = curl(&["-X", "POST", &b.url(&format!("/v1/jobs/{parent}/cancel"))]);
    assert!(status == 200 || status == 202, "{out}");
    for id in [&child, &grandchild] {
        let rec = wait_state(b, id, "failed", Duration::from_secs(10));
        assert_eq!(rec["failure"]["class"], "dependency_failed", "{rec:#}");
        assert!(rec.get("attempt_log").is_none(), "never ran: {rec:#}");
    }
    assert_eq!(job(a, &parent)["state"], "canceled");
    let (status, out) = submit(b, "acme", &after(0.1, &parent));
    assert_eq!(status, 409, "{out}");
    assert_eq!(header(&out, "x-crank-error"), Some("dependency-failed"));
    tenants_yaml_applies_without_a_restart(&pool);
}

/// A changed tenants.yaml applies on every shim without a restart; a bad
/// one is refused whole and the last good one stays.
fn tenants_yaml_applies_without_a_restart(pool: &Pool) {
    let file = pool._dir.path().join("tenants.yaml");
    let logged = |what: &str| {
        wait_until(what, Duration::from_secs(15), || {
            pool.alive().all(|s| s.log_text().contains(what))
        })
    };
    std::fs::write(&file, "tenants:\n  - {name: acme, max_queued: 1}\n").unwrap();
    logged("new weights and quotas applied");
    let (a, b) = (pool.any(), pool.alive().last().unwrap());
    let parent = submit_ok(a, "acme", r#"{"params": {"secs": 20}}"#);
    wait_state(a, &parent, "running", Duration::from_secs(10));
    submit_ok(b, "acme", &after(0.1, &parent));
    let quota = |shim: &Shim| {
        let (status, out) = submit(shim, "acme", &after(0.1, &parent));
        assert_eq!(status, 429, "max_queued 1 applies: {out}");
        assert_eq!(header(&out, "x-crank-error"), Some("tenant-queue-quota"));
    };
    quota(a);
    let bad = "tenants:\n  - {name: acme, max_queued: 5}\n  - {name: x, weight: 0}\n";
    std::fs::write(&file, bad).unwrap();
    logged("tenants.yaml refused whole");
    quota(b);
}
