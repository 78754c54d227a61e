//! The remote admin API end to end: a real crank-control with
//! `admin_listen` and `roles.yaml` in its mesh config directory, and real
//! `crankctl --server` runs with client certificates from the mesh CA
//! (issued from its intermediate, as a workload's are). A viewer reads but
//! is refused a revocation with 403 naming the role needed and its
//! identity; an admin revokes; certificates from another CA, and no
//! certificate, do not get in; the audit log holds each attempt.

use std::process::Command;
use std::time::{Duration, Instant};

use crank_tests::control::{ControlOptions, ControlPlane, CtlOutput};
use crank_tests::proxy::free_addr;

struct Remote {
    cp: ControlPlane,
    url: String,
}

impl Remote {
    /// crankctl with `--server` and the client certificate of `who`
    /// (`clients/<who>.ops.crt`), trusting the mesh root.
    fn ctl_as(&self, who: &str, args: &[&str]) -> CtlOutput {
        let dir = self.cp.path().join("clients");
        let out = Command::new(crank_tests::bin("crankctl"))
            .args(args)
            .current_dir(self.cp.path())
            .env_remove("CRANK_CONTROL")
            .env("CRANK_SERVER", &self.url)
            .env("CRANK_CERT", dir.join(format!("{who}.ops.crt")))
            .env("CRANK_KEY", dir.join(format!("{who}.ops.key")))
            .env("CRANK_CA", self.cp.bootstrap_bundle())
            .output()
            .expect("run crankctl");
        CtlOutput {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn ok_as(&self, who: &str, args: &[&str]) -> String {
        let o = self.ctl_as(who, args);
        assert!(
            o.ok,
            "crankctl {args:?} as {who}:\n{}\n{}",
            o.stdout, o.stderr
        );
        o.stdout
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        let text = self.ok_as("alice", &["audit", "-o", "json"]);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("audit -o json: {e}: {text}"))
    }
}

/// Enrolls `service.ops` through the workload API (a join token, a CSR, the
/// chain back), as a workload does; writes `clients/<service>.ops.{crt,key}`.
fn enroll(cp: &ControlPlane, service: &str) -> String {
    let id = crank_certs::Identity::new(service, "ops", "crank.local").unwrap();
    let (key, csr) = crank_certs::new_key_and_csr(&id).unwrap();
    let token = cp.token(service, "ops");
    let body = cp.path().join("enroll.json");
    let req = serde_json::json!({"token": token, "csr": csr, "instance": service});
    std::fs::write(&body, req.to_string()).unwrap();
    let port = cp.listen.port();
    let (status, out) = crank_tests::curl(&[
        "--cacert",
        cp.bootstrap_bundle().to_str().unwrap(),
        "--resolve",
        &format!("control.crank-system.crank.local:{port}:127.0.0.1"),
        "-H",
        "content-type: application/json",
        "--data-binary",
        &format!("@{}", body.display()),
        &format!("https://control.crank-system.crank.local:{port}/v1/identity/enroll"),
    ]);
    assert_eq!(status, 200, "enroll {service}: {out}");
    let v: serde_json::Value = serde_json::from_str(out.split_once("\r\n\r\n").unwrap().1).unwrap();
    let dir = cp.path().join("clients");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{service}.ops.crt")),
        v["chain"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join(format!("{service}.ops.key")), key).unwrap();
    v["serial"].as_str().unwrap().to_string()
}

/// crank-control on `admin_listen`, roles.yaml binding alice (admin) and
/// bob (viewer); enrolled alice, bob, carol (no role) and victim; mallory
/// with a certificate from another CA.
fn remote() -> (Remote, String) {
    let admin = free_addr();
    let cp = ControlPlane::start(ControlOptions {
        extra: format!("config_dir: mesh\nadmin_listen: {admin}\n"),
        ..Default::default()
    });
    cp.write_mesh_file("capabilities.yaml", "capabilities:\n  - name: hello:v1\n");
    cp.write_mesh_file(
        "roles.yaml",
        "roles:\n  admin: [spiffe://crank.local/tenant/ops/svc/alice]\n  viewer: [bob.ops.crank.local]\n",
    );
    for who in ["alice", "bob", "carol"] {
        enroll(&cp, who);
    }
    let victim = enroll(&cp, "victim");
    cp.ctl_ok(&["ca", "init", "--dir", "other/root"]);
    cp.ctl_ok(&[
        "cert",
        "issue",
        "--service",
        "mallory",
        "--tenant",
        "ops",
        "--ca-dir",
        "other/root",
        "--out",
        "clients",
    ]);
    let r = Remote {
        cp,
        url: format!("https://{admin}"),
    };
    // The roles arrive with the first published config version.
    let start = Instant::now();
    while !r.ctl_as("bob", &["ca", "status"]).ok {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "bob never got in: {}\n{}",
            r.ctl_as("bob", &["ca", "status"]).stderr,
            r.cp.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (r, victim)
}

#[test]
fn a_viewer_reads_an_admin_revokes_and_the_audit_log_holds_both() {
    let (r, serial) = remote();
    let token = r.ok_as(
        "alice",
        &["token", "create", "--service", "api", "--tenant", "demo"],
    );
    assert!(!token.trim().is_empty());
    assert!(r.ok_as("bob", &["ca", "status"]).contains("crank.local"));
    r.ok_as("bob", &["cert", "list"]);
    r.ok_as("bob", &["routes"]);
    r.ok_as("bob", &["audit"]);

    let refused = r.ctl_as("bob", &["cert", "revoke", "victim.ops.crank.local"]);
    assert!(!refused.ok, "a viewer must not revoke: {}", refused.stdout);
    let msg = &refused.stderr;
    assert!(msg.contains("403 role-required"), "{msg}");
    assert!(
        msg.contains("needs role operator") && msg.contains("operator or admin"),
        "{msg}"
    );
    assert!(
        msg.contains("bob.ops.crank.local, which has role viewer"),
        "{msg}"
    );
    assert!(msg.contains("roles.yaml"), "{msg}");
    let carol = r.ctl_as(
        "carol",
        &["token", "create", "--service", "x", "--tenant", "demo"],
    );
    assert!(
        carol
            .stderr
            .contains("carol.ops.crank.local, which has no role"),
        "{}",
        carol.stderr
    );

    r.ok_as("alice", &["cert", "revoke", &serial]);
    let list = r.ok_as("bob", &["cert", "list"]);
    assert!(
        list.lines()
            .any(|l| l.contains("victim.ops") && l.contains("revoked")),
        "{list}"
    );

    let log = r.audit();
    let find = |identity: &str, action: &str, result: &str| {
        log.iter()
            .find(|e| e["identity"] == identity && e["action"] == action && e["result"] == result)
            .unwrap_or_else(|| panic!("no {action} {result} by {identity} in {log:#?}"))
    };
    let bob = find("bob.ops.crank.local", "cert.revoke", "refused");
    assert_eq!(bob["role"], "viewer");
    assert_eq!(bob["target"], "victim.ops.crank.local");
    assert!(bob["reason"].as_str().unwrap().contains("role-required"));
    assert_eq!(bob["request_id"].as_str().unwrap().len(), 16);
    let ok = log
        .iter()
        .find(|e| {
            e["action"] == "cert.revoke" && e["result"] == "ok" && e["target"] == serial.as_str()
        })
        .unwrap_or_else(|| panic!("no ok revocation of {serial}: {log:#?}"));
    assert_eq!(ok["identity"], "alice.ops.crank.local");
    assert_eq!(ok["role"], "admin");
    let token_entry = find("alice.ops.crank.local", "token.create", "ok");
    assert_eq!(token_entry["target"], "api.demo");
    assert!(
        !serde_json::to_string(&log).unwrap().contains(token.trim()),
        "no token values in the audit log"
    );
    find("config-dir", "config.publish", "ok");
    // The socket is root on the host, recorded with its uid.
    r.cp.ctl_ok(&["token", "create", "--service", "y", "--tenant", "demo"]);
    let log = r.audit();
    assert!(
        log.iter().any(
            |e| e["identity"].as_str().unwrap().starts_with("unix-socket") && e["role"] == "root"
        ),
        "{log:#?}"
    );
    let filtered: Vec<serde_json::Value> = serde_json::from_str(&r.ok_as(
        "bob",
        &[
            "audit",
            "--since",
            "1h",
            "--action",
            "cert.revoke",
            "-o",
            "json",
        ],
    ))
    .unwrap();
    assert!(!filtered.is_empty() && filtered.iter().all(|e| e["action"] == "cert.revoke"));
    eprintln!("{}", r.ok_as("bob", &["audit"]));

    // A revoked client certificate loses its role at once.
    r.ok_as("alice", &["cert", "revoke", "bob.ops.crank.local"]);
    let gone = r.ctl_as("bob", &["ca", "status"]);
    assert!(
        !gone.ok,
        "a revoked certificate still reads: {}",
        gone.stdout
    );
}

#[test]
fn another_ca_or_no_certificate_cannot_connect() {
    let (r, _) = remote();
    let other = r.ctl_as("mallory", &["ca", "status"]);
    assert!(
        !other.ok,
        "a certificate from another CA got in: {}",
        other.stdout
    );
    assert!(other.stderr.contains("mesh CA"), "{}", other.stderr);
    // Plain TLS without a client certificate: the handshake is refused.
    let addr = r.url.trim_start_matches("https://");
    let (status, out) = crank_tests::curl(&["-k", &format!("https://{addr}/v1/admin/status")]);
    assert_ne!(status, 200, "no certificate must not get in: {out}");
    assert!(!out.contains("trust_domain"), "{out}");
}
