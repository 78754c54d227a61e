//! crank-control replicas on one etcd (issue #15), real processes: one
//! etcd member and two replicas on loopback ports. A workload enrolls on
//! one replica and renews on the other, a token enrolls once across both, a
//! revocation made on one is enforced by the other, a config edit is served
//! with the same version by both; the leader is killed with SIGKILL and the
//! other takes over within the lease, finishes the rotation the first one
//! started and publishes the next edit as exactly the next version.

use std::time::{Duration, Instant};

use crank_tests::control_ha::{HaControl, HaOptions, Workload};
use crank_tests::wait_until;

const CAPS: &str = "capabilities:\n  - name: hello:v1\n";

fn route(prefix: &str) -> String {
    format!(
        "routes:\n  - name: backend\n    match: {{hosts: [backend], path_prefix: {prefix}}}\n    backends:\n      - {{capability: hello:v1}}\n"
    )
}

/// Waits until every running replica serves `w` version `seq` with the
/// route's path prefix `prefix`.
fn wait_seq(ha: &HaControl, w: &Workload, seq: u64, prefix: &str) {
    for r in ha.replicas.iter().filter(|r| r.is_running()) {
        wait_until(
            &format!("replica {} serving mesh version {seq} ({prefix})", r.index),
            Duration::from_secs(15),
            || w.mesh_version(r) == Some((seq, prefix.to_string())),
        );
    }
}

#[test]
fn two_replicas_share_the_ca_and_the_config_and_fail_over() {
    let mut ha = HaControl::start(HaOptions::default());
    ha.write_mesh_file("capabilities.yaml", CAPS);
    ha.write_mesh_file("routes/backend.yaml", &route("/v1"));
    let lead = ha.leader(Duration::from_secs(15));
    let follow = 1 - lead;
    assert_eq!(ha.replicas[lead].leader_gauge(), Some(1.0));
    assert_eq!(ha.replicas[follow].leader_gauge(), Some(0.0));

    // Enroll on one replica; the token is used up on the other too.
    let dir = ha.path().to_path_buf();
    let (a, b) = (&ha.replicas[0], &ha.replicas[1]);
    let token = a.token("web", "demo");
    let (status, body, mut web) = Workload::enroll(&dir, a, "web", "web-1", &token);
    assert_eq!(status, 200, "{body}\n{}", ha.logs());
    let (status, again, _) = Workload::enroll(&dir, b, "web", "web-2", &token);
    assert_eq!(
        (status, again["error"].as_str()),
        (403, Some("token-reused")),
        "{again}"
    );

    // Renew on the other replica: it knows the leaf and signs with the same CA.
    let first = web.serial.clone();
    let (status, renewed) = web.renew(b);
    assert_eq!(status, 200, "{renewed}\n{}", ha.logs());
    assert_ne!(web.serial, first);

    // Both replicas serve the same published version; an edit reaches both.
    let mut seq = 0;
    wait_until(
        "the first routes published",
        Duration::from_secs(15),
        || match web.mesh_version(a) {
            Some((s, prefix)) if prefix == "/v1" => {
                seq = s;
                true
            }
            _ => false,
        },
    );
    wait_seq(&ha, &web, seq, "/v1");
    ha.write_mesh_file("routes/backend.yaml", &route("/v2"));
    wait_seq(&ha, &web, seq + 1, "/v2");

    // A revocation made on one replica is enforced by the other.
    b.ctl_ok(&["cert", "revoke", "web.demo.crank.local"]);
    let watch = "/v1/mesh/watch?instance=web-1&seq=0&registry=0&wait=0";
    wait_until(
        "replica 0 refusing the revoked leaf",
        Duration::from_secs(10),
        || {
            let (status, body) = a.call(watch, None, Some(&web));
            status == 403 && body["error"] == "cert-revoked"
        },
    );
    let (status, body) = web.renew(a);
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("cert-revoked")),
        "{body}"
    );

    // A workload that holds a rotation back, enrolled on the follower.
    let token = ha.replicas[follow].token("api", "demo");
    let (status, body, mut api) =
        Workload::enroll(&dir, &ha.replicas[follow], "api", "api-1", &token);
    assert_eq!(status, 200, "{body}");
    wait_until(
        "the leader knowing api-1's report",
        Duration::from_secs(10),
        || {
            let s = ha.replicas[lead].status();
            s["workloads"]
                .as_array()
                .is_some_and(|w| w.iter().any(|w| w["instance"] == "api-1"))
        },
    );
    let out = ha.replicas[lead].ctl_ok(&["ca", "rotate", "intermediate", "--root", "ca/root"]);
    assert!(out.contains("phase reissuing"), "{out}");

    // SIGKILL the leader: the follower leads within the lease.
    ha.replicas[lead].kill();
    let killed = Instant::now();
    assert_eq!(ha.leader(Duration::from_secs(10)), follow);
    assert!(
        killed.elapsed() < Duration::from_secs(6),
        "took over after {:?}",
        killed.elapsed()
    );
    let survivor = &ha.replicas[follow];
    assert_eq!(survivor.leader_gauge(), Some(1.0));
    assert_eq!(
        survivor.status()["phase"],
        "reissuing",
        "api has not renewed yet"
    );

    // The new leader finishes the rotation once the workload renews.
    let (status, body) = api.renew(survivor);
    assert_eq!(status, 200, "{body}");
    wait_until(
        "the rotation finished by the new leader",
        Duration::from_secs(15),
        || survivor.status()["phase"] == "idle",
    );
    let s = survivor.status();
    let states: Vec<&str> = s["intermediates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["retired", "signing"], "{s}");

    // The next edit is the next version, published once.
    ha.write_mesh_file("routes/backend.yaml", &route("/v3"));
    wait_seq(&ha, &api, seq + 2, "/v3");

    // Every replica's audit records, on the survivor: both tokens, and each
    // version published exactly once (by whichever replica led).
    let audit = |action: &str| -> Vec<serde_json::Value> {
        let out = survivor.ctl_ok(&["audit", "--action", action, "-o", "json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    wait_until(
        "both token records on the survivor",
        Duration::from_secs(10),
        || audit("token.create").len() == 2,
    );
    let versions: Vec<String> = audit("config.publish")
        .iter()
        .filter(|e| e["result"] == "ok")
        .map(|e| e["target"].as_str().unwrap_or_default().to_string())
        .collect();
    for n in [seq, seq + 1, seq + 2] {
        let once = versions
            .iter()
            .filter(|v| **v == format!("version {n}"))
            .count();
        assert_eq!(once, 1, "version {n} published once: {versions:?}");
    }

    // The killed replica comes back as a follower with the same CA and version.
    ha.replicas[lead].spawn();
    wait_seq(&ha, &api, seq + 2, "/v3");
    assert_eq!(ha.leader(Duration::from_secs(10)), follow);
    let back = ha.replicas[lead].status();
    assert_eq!(back["phase"], "idle");
    assert_eq!(back["intermediates"], s["intermediates"]);
}

#[test]
fn a_replica_refuses_to_start_without_a_private_kek() {
    use std::os::unix::fs::PermissionsExt;
    let mut ha = HaControl::start(HaOptions {
        replicas: 1,
        ..Default::default()
    });
    ha.replicas[0].kill();
    let kek = ha.path().join("kek");
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(crank_tests::bin("crank-control"))
        .arg("--config")
        .arg(&ha.replicas[0].config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("kek_file") && err.contains("chmod 600"),
        "{err}"
    );

    // The right mode but another key: the sealed intermediate does not open.
    std::fs::write(&kek, [9u8; 32]).unwrap();
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = std::process::Command::new(crank_tests::bin("crank-control"))
        .arg("--config")
        .arg(&ha.replicas[0].config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("same kek_file"), "{err}");
}
