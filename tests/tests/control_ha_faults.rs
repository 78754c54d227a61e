//! The HA control plane under faults (issue #15), real processes: three etcd
//! members, three crank-control replicas (`store: etcd`), a client sidecar
//! and two backend sidecars that list every replica, under constant load.
//!
//! - In one sequence: SIGKILL of the leading replica; an intermediate
//!   rotation started on the leader, which is killed mid-rotation and the
//!   next leader finishes; SIGKILL of the etcd leader member; the replica
//!   the client watches cut off from etcd (every replica's etcd traffic goes
//!   through forwarders in this test; cutting them drops every byte, as a
//!   partition does): it refuses watches with 503 `store-unreachable` and
//!   the client moves on. After each fault a config edit reaches every
//!   proxy (the time is printed), and at the end not one request of the
//!   load has failed. Then a backend sidecar is killed: its endpoint leaves
//!   the registry of every replica still on etcd after its lease.
//! - Roles across replicas: a viewer is refused a revocation on a follower's
//!   remote admin port, an admin is allowed, and the other replica's
//!   `crankctl audit` shows both attempts (the audit log is in etcd).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crank_tests::app::EchoApp;
use crank_tests::control_ha::{HaControl, HaOptions, Replica, Workload};
use crank_tests::load::Load;
use crank_tests::proxy::{free_addr, Proxy};
use crank_tests::wait_until;

fn route(weight: u32) -> String {
    format!("routes:\n  - name: backend\n    match: {{hosts: [backend]}}\n    backends:\n      - {{capability: hello:v1, weight: {weight}}}\n")
}

/// A TCP forwarder to `upstream` that can be cut: from then on it drops
/// every byte both ways and holds new connections without answering.
struct Link {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
}

impl Link {
    fn start(upstream: SocketAddr) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let link = Link {
            addr: listener.local_addr().unwrap(),
            cut: Arc::default(),
        };
        let cut = link.cut.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for down in listener.incoming().flatten() {
                // Cut: hold the connection unanswered. Upstream down (a
                // killed member): close it at once, as a refused connect.
                if cut.load(Ordering::Relaxed) {
                    held.push(down);
                    continue;
                }
                let Ok(up) = TcpStream::connect(upstream) else {
                    continue;
                };
                for (from, to) in [(&down, &up), (&up, &down)] {
                    let (from, to, cut) = (
                        from.try_clone().unwrap(),
                        to.try_clone().unwrap(),
                        cut.clone(),
                    );
                    std::thread::spawn(move || pump(from, to, &cut));
                }
            }
        });
        link
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, cut: &AtomicBool) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) if !cut.load(Ordering::Relaxed) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Ok(_) => {}
        }
    }
}

/// The enroll block of a sidecar that lists the replicas in `order`.
fn enroll_yaml(ha: &HaControl, order: &[usize], dir: &Path, name: &str, service: &str) -> String {
    let token = dir.join(format!("{name}.token"));
    std::fs::write(&token, ha.replicas[order[0]].token(service, "demo")).unwrap();
    let list: Vec<String> = order
        .iter()
        .map(|i| format!("\"{}\"", ha.replicas[*i].listen))
        .collect();
    format!(
        "identity:\n  trust_bundle: {}\n  enroll:\n    control_plane: [{}]\n    service: {service}\n    tenant: demo\n    token_file: {}\n    state_dir: {}\n    watch_wait: 2s\n",
        ha.path().join("ca/root/bundle.pem").display(),
        list.join(", "),
        token.display(),
        dir.join(format!("{name}-state")).display(),
    )
}

fn backend(
    ha: &HaControl,
    order: &[usize],
    dir: &Path,
    name: &str,
    app: SocketAddr,
) -> (Proxy, SocketAddr) {
    let (inbound, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "{}inbound: {{listen: {inbound}, app: {app}}}\nmesh:\n  watch_wait: 2s\n  register:\n    capabilities: [hello:v1]\n    lease: 8s\nadmin: {{listen: {admin}}}\nthreads: 1\n",
        enroll_yaml(ha, order, dir, name, "backend"),
    );
    (Proxy::start(dir, name, &yaml, admin), inbound)
}

fn client(ha: &HaControl, order: &[usize], dir: &Path) -> (Proxy, SocketAddr) {
    let (port, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "{}outbound:\n  ports: [{{listen: {port}, route: backend}}]\nroutes:\n  - name: backend\n    endpoints: [{{address: 127.0.0.1:1, identity: backend.demo.crank.local}}]\nmesh:\n  watch_wait: 2s\nadmin: {{listen: {admin}}}\nthreads: 1\n",
        enroll_yaml(ha, order, dir, "client", "frontend"),
    );
    (Proxy::start(dir, "client", &yaml, admin), port)
}

fn seq_of(p: &Proxy) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&p.admin_get("/config_dump").1).unwrap_or_default();
    v["mesh"]["seq"].as_u64().unwrap_or(0)
}

/// Edits the route and waits until every proxy holds a newer version;
/// prints and returns how long that took.
fn edit_reaches_every_proxy(
    ha: &HaControl,
    proxies: &[&Proxy],
    weight: u32,
    after: &str,
) -> Duration {
    let before = proxies.iter().map(|p| seq_of(p)).max().unwrap_or(0);
    ha.write_mesh_file("routes/backend.yaml", &route(weight));
    let saved = Instant::now();
    wait_until(
        &format!("the edit after {after} on every proxy"),
        Duration::from_secs(30),
        || proxies.iter().all(|p| seq_of(p) > before),
    );
    let took = saved.elapsed();
    println!(
        "after {after}: the edit reached every proxy in {} ms",
        took.as_millis()
    );
    took
}

/// The index of the member etcd reports as its leader.
fn etcd_leader(ha: &HaControl) -> usize {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", ha.etcd.endpoints().join(",")))
        .args(["endpoint", "status", "-w", "json"])
        .output()
        .expect("etcdctl (Debian's etcd-client package)");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "etcdctl endpoint status: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let rows = v.as_array().expect("one row per member");
    let at = rows
        .iter()
        .position(|r| r["Status"]["header"]["member_id"] == r["Status"]["leader"])
        .expect("a member that leads");
    let url = rows[at]["Endpoint"].as_str().unwrap_or_default();
    ha.etcd.endpoints().iter().position(|e| e == url).unwrap()
}

/// `crank_control_plane_connected` of `p` for replica `r`.
fn connected(p: &Proxy, r: &Replica) -> Option<f64> {
    let series = format!("crank_control_plane_connected{{address=\"{}\"}}", r.listen);
    crank_tests::metric(&p.metrics(), &series)
}

/// Points `r`'s etcd traffic through `links` (restarting it).
fn through_links(r: &mut Replica, links: &[Link]) {
    r.kill();
    let text = std::fs::read_to_string(&r.config).unwrap();
    let list: Vec<String> = links.iter().map(|l| format!("http://{}", l.addr)).collect();
    let (head, tail) = text.split_once("store:").unwrap();
    let tail = tail.split_once('\n').map(|(_, t)| t).unwrap_or("");
    let store = format!(
        "store: {{etcd: {{endpoints: [{}], prefix: /crank, request_timeout: 2s, dial_timeout: 2s}}}}\n",
        list.join(", ")
    );
    std::fs::write(&r.config, format!("{head}{store}{tail}")).unwrap();
    r.spawn();
}

/// Three etcd members and three replicas, each replica reaching etcd
/// through its own links (so that any one can be cut off).
fn start_ha() -> (HaControl, Vec<Vec<Link>>) {
    let mut ha = HaControl::start(HaOptions {
        replicas: 3,
        etcd_members: 3,
        extra: "registry: {lease: 8s}\n".into(),
        ..Default::default()
    });
    let links: Vec<Vec<Link>> = (0..3)
        .map(|_| {
            ha.etcd
                .members
                .iter()
                .map(|m| Link::start(m.client))
                .collect()
        })
        .collect();
    for (r, l) in ha.replicas.iter_mut().zip(&links) {
        through_links(r, l);
    }
    (ha, links)
}

/// A rotation started on the leader, which dies mid-rotation: the next
/// leader finishes it (every sidecar renews from the new intermediate).
fn rotation_finished_by_the_next_leader(ha: &mut HaControl) {
    let lead = ha.leader(Duration::from_secs(15));
    let out = ha.replicas[lead].ctl_ok(&["ca", "rotate", "intermediate", "--root", "ca/root"]);
    assert!(out.contains("phase reissuing"), "{out}");
    ha.replicas[lead].kill();
    let next = ha.leader(Duration::from_secs(15));
    wait_until(
        "the next leader finishing the rotation",
        Duration::from_secs(40),
        || ha.replicas[next].status()["phase"] == "idle",
    );
    let s = ha.replicas[next].status();
    let states: Vec<&str> = s["intermediates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["state"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(states.last(), Some(&"signing"), "{s}");
    assert!(states.contains(&"retired"), "{s}");
    ha.replicas[lead].spawn();
}

#[test]
fn faults_under_load_lose_no_request_and_edits_reach_every_proxy() {
    let (mut ha, links) = start_ha();
    ha.write_mesh_file("capabilities.yaml", "capabilities:\n  - name: hello:v1\n");
    ha.write_mesh_file("routes/backend.yaml", &route(100));
    ha.leader(Duration::from_secs(20));

    let (app1, app2) = (EchoApp::start(), EchoApp::start());
    let dir = tempfile::tempdir().unwrap();
    let (b1, _) = backend(&ha, &[1, 2, 0], dir.path(), "b1", app1.addr);
    let (mut b2, b2_in) = backend(&ha, &[2, 0, 1], dir.path(), "b2", app2.addr);
    let (c, port) = client(&ha, &[2, 1, 0], dir.path());
    wait_until("both backends served", Duration::from_secs(20), || {
        crank_tests::curl(&[&format!("http://{port}/hello")]).0 == 200
            && app1.count() > 0
            && app2.count() > 0
    });
    let load = Load::start(port, 2);
    load.wait_for(50);
    let proxies = [&c, &b1, &b2];

    // (a) SIGKILL of the leading replica.
    let lead = ha.leader(Duration::from_secs(10));
    ha.replicas[lead].kill();
    ha.leader(Duration::from_secs(15));
    edit_reaches_every_proxy(&ha, &proxies, 90, "SIGKILL of the leading replica");
    ha.replicas[lead].spawn();
    rotation_finished_by_the_next_leader(&mut ha);

    // (b) SIGKILL of the etcd leader member.
    let member = etcd_leader(&ha);
    ha.etcd.members[member].kill();
    edit_reaches_every_proxy(&ha, &proxies, 80, "SIGKILL of the etcd leader");

    // (c) The replica the client watches cut off from etcd: it refuses
    // watches once it notices, and the client moves to another one.
    let cut = ha
        .replicas
        .iter()
        .position(|r| connected(&c, r) == Some(1.0))
        .expect("the client watches one replica");
    for l in &links[cut] {
        l.cut.store(true, Ordering::Relaxed);
    }
    let what = format!("replica {cut} (the client's) cut off from etcd");
    edit_reaches_every_proxy(&ha, &proxies, 70, &what);
    // (The cut replica cannot know the new version: the client moved.)
    wait_until(
        "the cut replica not leading",
        Duration::from_secs(15),
        || ha.replicas[cut].leader_gauge() != Some(1.0),
    );
    load.wait_for(load.ok() + 50);
    let (ok, failed, first) = load.stop();
    println!("load: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "failed requests: {first:?}\n{}", ha.logs());

    // A backend sidecar dies: its endpoint leaves every replica's registry.
    let on_etcd = || {
        ha.replicas
            .iter()
            .filter(|r| r.is_running() && r.index != cut)
    };
    let b2_at = b2_in.to_string();
    for r in on_etcd() {
        let listed = r.ctl_ok(&["endpoints", "-o", "json"]);
        assert!(listed.contains(&b2_at), "replica {}: {listed}", r.index);
    }
    b2.signal(libc::SIGKILL);
    b2.wait_exit(Duration::from_secs(5));
    for r in on_etcd() {
        wait_until(
            &format!("b2's endpoint gone from replica {}", r.index),
            Duration::from_secs(30),
            || {
                !r.ctl_ok(&["endpoints", "-o", "json"])
                    .contains(&b2_in.to_string())
            },
        );
    }
}

/// crankctl with `--server` (env) and `who`'s certificate.
fn ctl_as(r: &Replica, url: &str, who: &Workload, args: &[&str]) -> (bool, String) {
    let out = Command::new(crank_tests::bin("crankctl"))
        .args(args)
        .current_dir(&r.base)
        .env_remove("CRANK_CONTROL")
        .env("CRANK_SERVER", url)
        .env("CRANK_CERT", &who.cert)
        .env("CRANK_KEY", &who.key)
        .env("CRANK_CA", r.base.join("ca/root/bundle.pem"))
        .output()
        .expect("run crankctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn roles_hold_on_a_follower_and_every_replica_audits_the_attempts() {
    let mut ha = HaControl::start(HaOptions::default());
    ha.write_mesh_file("capabilities.yaml", "capabilities:\n  - name: hello:v1\n");
    ha.write_mesh_file(
        "roles.yaml",
        "roles:\n  admin: [alice.demo.crank.local]\n  viewer: [bob.demo.crank.local]\n",
    );
    let follow = 1 - ha.leader(Duration::from_secs(15));
    let admin = free_addr();
    let f = &mut ha.replicas[follow];
    f.kill();
    let mut text = std::fs::read_to_string(&f.config).unwrap();
    text.push_str(&format!("admin_listen: {admin}\n"));
    std::fs::write(&f.config, text).unwrap();
    f.spawn();
    let lead = ha.leader(Duration::from_secs(15));
    assert_ne!(lead, follow, "the restarted replica follows");

    let dir = ha.path().to_path_buf();
    let f = &ha.replicas[follow];
    let mut who = Vec::new();
    for name in ["alice", "bob", "victim"] {
        let token = f.token(name, "demo");
        let (status, body, w) = Workload::enroll(&dir, f, name, name, &token);
        assert_eq!(status, 200, "{body}");
        who.push(w);
    }
    let url = format!("https://{admin}");
    wait_until(
        "bob reading through the follower",
        Duration::from_secs(20),
        || ctl_as(f, &url, &who[1], &["ca", "status"]).0,
    );
    let (ok, msg) = ctl_as(
        f,
        &url,
        &who[1],
        &["cert", "revoke", "victim.demo.crank.local"],
    );
    assert!(!ok, "a viewer must not revoke: {msg}");
    assert!(
        msg.contains("403 role-required")
            && msg.contains("bob.demo.crank.local, which has role viewer"),
        "{msg}"
    );
    let (ok, msg) = ctl_as(
        f,
        &url,
        &who[0],
        &["cert", "revoke", "victim.demo.crank.local"],
    );
    assert!(ok, "an admin revokes: {msg}");

    let other = &ha.replicas[lead];
    wait_until(
        "both attempts in the leader's audit",
        Duration::from_secs(10),
        || {
            let out = other.ctl_ok(&["audit", "--action", "cert.revoke", "-o", "json"]);
            let log: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
            let by = |id: &str, role: &str, result: &str| {
                log.iter().any(|e| {
                    e["identity"] == id
                        && e["role"] == role
                        && e["result"] == result
                        && e["target"] == "victim.demo.crank.local"
                })
            };
            by("bob.demo.crank.local", "viewer", "refused")
                && by("alice.demo.crank.local", "admin", "ok")
        },
    );
    let list = other.ctl_ok(&["cert", "list"]);
    assert!(
        list.lines()
            .any(|l| l.contains("victim.demo") && l.contains("revoked")),
        "{list}"
    );
}
