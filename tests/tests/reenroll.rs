//! Enrolling again, end to end, against a real `crank-control`: after a
//! root rotation a sidecar configured with only the original bootstrap
//! bundle still enrolls (it trusts the roots it followed into
//! `state_dir/bundle.pem`), and a revoked or expired sidecar enrolls again
//! by itself, without a restart or deleting files, once a new join token
//! is written to its `token_file`.

use std::path::Path;
use std::time::Duration;

use crank_tests::app::EchoApp;
use crank_tests::control::{serial_of, ControlOptions, ControlPlane, EnrolledMesh};
use crank_tests::proxy::{free_addr, Proxy};
use crank_tests::{curl, wait_until};

fn get_via(port: std::net::SocketAddr) -> (u16, String) {
    curl(&[&format!("http://{port}/hello")])
}

/// Writes a new one-time token for `service.demo` to `dir/<name>.token`.
fn new_token(cp: &ControlPlane, dir: &Path, name: &str, service: &str) {
    let token = cp.token(service, "demo");
    std::fs::write(dir.join(format!("{name}.token")), format!("{token}\n")).unwrap();
}

/// `/config_dump`'s `enrollment` object.
fn enrollment(p: &Proxy) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&p.admin_get("/config_dump").1).unwrap();
    v["identity"]["enrollment"].clone()
}

/// Rotates to a new root (`ca/root2`) and waits until the old one is gone.
fn rotate_root(cp: &ControlPlane) {
    cp.ctl_ok(&["ca", "init", "--dir", "ca/root2"]);
    cp.ctl_ok(&["ca", "rotate", "root", "--new-root", "ca/root2"]);
    cp.wait_idle(Duration::from_secs(60));
    let s = cp.status();
    let roots = s["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 1, "only the new root is trusted: {s}");
    let old = std::fs::read_to_string(cp.bootstrap_bundle()).unwrap();
    let new = std::fs::read_to_string(cp.path().join("ca/root2/bundle.pem")).unwrap();
    assert_ne!(old, new);
}

#[test]
fn after_a_root_rotation_sidecars_enroll_again_with_only_the_original_bootstrap_bundle() {
    let app = EchoApp::start();
    let cp = ControlPlane::start(ControlOptions::default());
    let mut mesh = EnrolledMesh::start(&cp, app.addr, "");
    assert_eq!(get_via(mesh.port).0, 200);
    rotate_root(&cp);
    assert_eq!(
        get_via(mesh.port).0,
        200,
        "both sidecars followed the rotation"
    );
    let dir = mesh.dir.path().to_path_buf();

    // At start: the client lost its certificate and starts again with a new
    // token. Its config still names the old root only, but state_dir has
    // the new one.
    let before = serial_of(&mesh.client);
    let (yaml, admin) = (
        std::fs::read_to_string(&mesh.client.config).unwrap(),
        mesh.client.admin,
    );
    assert!(yaml.contains(&cp.bootstrap_bundle().display().to_string()));
    mesh.client.signal(libc::SIGKILL);
    mesh.client.wait_exit(Duration::from_secs(5));
    std::fs::remove_file(dir.join("client-state/cert.pem")).unwrap();
    new_token(&cp, &dir, "client", "frontend");
    mesh.client = Proxy::start(&dir, "client", &yaml, admin);
    let after = serial_of(&mesh.client);
    assert_ne!(after, before);
    assert_eq!(enrollment(&mesh.client)["source"], "enrolled");
    assert_eq!(get_via(mesh.port).0, 200);

    // While running: the server is revoked and gets a new token; it
    // enrolls again by itself, trusting crank-control by its current root.
    let before = serial_of(&mesh.server);
    cp.ctl_ok(&["cert", "revoke", &before]);
    wait_until(
        "the revoked server sidecar is not ready",
        Duration::from_secs(15),
        || mesh.server.admin_get("/ready").1.contains("cert-revoked"),
    );
    new_token(&cp, &dir, "server", "backend");
    wait_until(
        "the server sidecar enrolled again",
        Duration::from_secs(20),
        || mesh.server.admin_get("/ready").0 == 200,
    );
    assert_ne!(serial_of(&mesh.server), before);
    assert_eq!(enrollment(&mesh.server)["source"], "re-enrolled");
    wait_until(
        "requests reach the re-enrolled server",
        Duration::from_secs(10),
        || get_via(mesh.port).0 == 200,
    );
    let log = mesh.server.log_text();
    assert!(!log.contains("BadSignature"), "{log}");
}

#[test]
fn a_new_sidecar_with_only_the_retired_root_is_told_which_bundle_to_use() {
    let cp = ControlPlane::start(ControlOptions::default());
    rotate_root(&cp);
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = cp.enroll_yaml(dir.path(), "p", "web", "demo", "2s");
    yaml.push_str(&format!("admin: {{listen: {}}}\n", free_addr()));
    let err = Proxy::try_start(dir.path(), "p", &yaml, free_addr())
        .err()
        .expect("crank-control's new root is not in the retired root's bundle");
    // Every root has its own name now: the old root is not mistaken for
    // the new one's issuer (that failed as BadSignature).
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(!err.contains("BadSignature"), "{err}");

    // With the new root's bundle it enrolls.
    let new_root = cp.path().join("ca/root2/bundle.pem");
    let yaml = cp
        .enroll_yaml(dir.path(), "q", "web", "demo", "2s")
        .replace(
            &cp.bootstrap_bundle().display().to_string(),
            &new_root.display().to_string(),
        );
    let admin = free_addr();
    let p = Proxy::start(
        dir.path(),
        "q",
        &format!("{yaml}admin: {{listen: {admin}}}\n"),
        admin,
    );
    assert_eq!(enrollment(&p)["source"], "enrolled");
}

#[test]
fn a_revoked_sidecar_enrolls_again_by_itself_once_a_new_token_is_in_token_file() {
    let app = EchoApp::start();
    let cp = ControlPlane::start(ControlOptions::default());
    let mut mesh = EnrolledMesh::start(&cp, app.addr, "");
    assert_eq!(get_via(mesh.port).0, 200);
    let first = serial_of(&mesh.client);
    let dir = mesh.dir.path().to_path_buf();

    cp.ctl_ok(&["cert", "revoke", "frontend.demo.crank.local"]);
    wait_until(
        "the revoked sidecar says cert-revoked",
        Duration::from_secs(15),
        || mesh.client.admin_get("/ready").1.contains("cert-revoked"),
    );
    let (status, body) = mesh.client.admin_get("/ready");
    assert_eq!(status, 503);
    let token_file = dir.join("client.token").display().to_string();
    assert!(
        body.contains(&token_file) && body.contains("enrolls again by itself"),
        "/ready says where the new token goes: {body}"
    );
    assert_ne!(get_via(mesh.port).0, 200);

    // The token it enrolled with is not sent again.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(serial_of(&mesh.client), first);
    assert_eq!(mesh.client.admin_get("/ready").0, 503);
    assert!(
        !mesh.client.log_text().contains("enrolling again"),
        "{}",
        mesh.client.log_text()
    );

    // A new token: it enrolls again by itself and serves.
    new_token(&cp, &dir, "client", "frontend");
    wait_until(
        "the sidecar is ready again",
        Duration::from_secs(20),
        || mesh.client.admin_get("/ready").0 == 200,
    );
    let second = serial_of(&mesh.client);
    assert_ne!(second, first);
    assert_eq!(enrollment(&mesh.client)["source"], "re-enrolled");
    wait_until(
        "requests flow again with the new certificate",
        Duration::from_secs(10),
        || get_via(mesh.port).0 == 200,
    );
    wait_until(
        "the log says it enrolled again",
        Duration::from_secs(5),
        || {
            mesh.client
                .log_text()
                .contains("enrolled again with a new join token")
        },
    );
    let list = cp.ctl_ok(&["cert", "list", "--output", "json"]);
    let rows: serde_json::Value = serde_json::from_str(&list).unwrap();
    let status_of = |serial: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["serial"] == serial)
            .map(|r| r["status"].as_str().unwrap().to_string())
    };
    assert_eq!(status_of(&first).as_deref(), Some("revoked"), "{list}");
    assert_eq!(status_of(&second).as_deref(), Some("valid"), "{list}");

    // What it enrolled with is saved: a restart loads it, no token needed.
    let (yaml, admin) = (
        std::fs::read_to_string(&mesh.client.config).unwrap(),
        mesh.client.admin,
    );
    mesh.client.signal(libc::SIGKILL);
    mesh.client.wait_exit(Duration::from_secs(5));
    mesh.client = Proxy::start(&dir, "client", &yaml, admin);
    assert_eq!(serial_of(&mesh.client), second);
    assert_eq!(enrollment(&mesh.client)["source"], "loaded");
    assert_eq!(get_via(mesh.port).0, 200);
}

#[test]
fn an_expired_sidecar_enrolls_again_by_itself_once_a_new_token_is_in_token_file() {
    let app = EchoApp::start();
    let mut cp = ControlPlane::start(ControlOptions {
        leaf_ttl: "12s",
        ..Default::default()
    });
    let mesh = EnrolledMesh::start(&cp, app.addr, "");
    let first = (serial_of(&mesh.client), serial_of(&mesh.server));

    // crank-control is away until both certificates have expired.
    cp.kill();
    for p in [&mesh.client, &mesh.server] {
        wait_until("the certificate expired", Duration::from_secs(20), || {
            p.admin_get("/ready").1.contains("cert-expired")
        });
        // Its last renewal before the expiry failed too; the next is a
        // minute away.
        wait_until(
            "a renewal failed after expiry",
            Duration::from_secs(10),
            || p.log_text().contains("certificate has expired"),
        );
    }
    let (_, body) = mesh.client.admin_get("/ready");
    assert!(body.contains("client.token"), "{body}");
    cp.spawn();
    let dir = mesh.dir.path();
    new_token(&cp, dir, "client", "frontend");
    new_token(&cp, dir, "server", "backend");
    for p in [&mesh.client, &mesh.server] {
        wait_until("ready again", Duration::from_secs(20), || {
            p.admin_get("/ready").0 == 200
        });
        wait_until(
            "the log says it enrolled again",
            Duration::from_secs(5),
            || {
                p.log_text()
                    .contains("enrolled again with a new join token")
            },
        );
        let log = p.log_text();
        assert!(!log.contains("renewed certificate"), "{log}");
    }
    assert_ne!(serial_of(&mesh.client), first.0);
    assert_ne!(serial_of(&mesh.server), first.1);
    wait_until("requests flow again", Duration::from_secs(10), || {
        get_via(mesh.port).0 == 200
    });
}
