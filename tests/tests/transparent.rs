//! Transparent adoption across hosts: crank-proxy's capture listeners in
//! front of unmodified apps. Three network-namespace hosts: A runs a client
//! app (curl and raw sockets, as root) behind a sidecar with outbound
//! capture; B runs the server apps behind a sidecar with inbound capture of
//! port 8080; C runs a plain client with no sidecar. Both sidecars run as
//! `nobody` (the capture rules leave that uid alone) and their rules are
//! written by `crank-proxy capture install --config FILE`. B's inbound
//! policy and A's outbound policy decide on captured connections too.
//!
//! Needs root, iproute2, nftables (or iptables), curl and setpriv; without
//! root the test prints why and returns.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crank_tests::netns::{Host, HostProcess, Hosts};
use crank_tests::{bin, output_text, plain_get, wait_until, Pki};

const NOBODY: u32 = 65534;
const ADMIN: &str = "127.0.0.1:9901";
/// The client sidecar's detection deadline: far above what a banner on a
/// server-speaks-first port may take.
const DETECT: Duration = Duration::from_secs(3);

/// A sidecar running as `nobody` inside a host, with its log.
struct HostProxy {
    _process: HostProcess,
    log: PathBuf,
    config: PathBuf,
}

impl HostProxy {
    fn start(host: &Host, dir: &Path, name: &str, yaml: &str) -> HostProxy {
        let config = dir.join(format!("{name}.yaml"));
        let log = dir.join(format!("{name}.log"));
        std::fs::write(&config, yaml).unwrap();
        chown(dir);
        // The capture rules this sidecar expects, from its own config.
        let out = host
            .command(bin("crank-proxy"))
            .args(["capture", "install", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "capture install: {}",
            output_text(&out)
        );
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = host.command("setpriv");
        cmd.arg(format!("--reuid={NOBODY}"))
            .arg(format!("--regid={NOBODY}"))
            .arg("--clear-groups")
            .arg(bin("crank-proxy"))
            .arg("--config")
            .arg(&config)
            .env("CRANK_LOG", "info")
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
        let p = HostProxy {
            _process: host.spawn(cmd),
            log,
            config,
        };
        let ready = || host.enter(|| plain_get(ADMIN.parse().unwrap(), "/ready")).0 == 200;
        let started = Instant::now();
        while !ready() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{name} not ready:\n{}",
                p.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        p
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn chown(dir: &Path) {
    let out = std::process::Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "chown: {}", output_text(&out));
}

/// The sum of the samples of `name` whose labels include every one of
/// `labels` (`direction="outbound"`), on `host`'s sidecar.
fn count(host: &Host, name: &str, labels: &[&str]) -> f64 {
    let text = host
        .enter(|| plain_get(ADMIN.parse().unwrap(), "/metrics"))
        .1;
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs `serve` for each connection accepted on `bind` inside `host`, on
/// a thread that lives as long as the test.
fn serve(host: &Host, bind: &str, serve: fn(TcpStream)) {
    let bind: SocketAddr = bind.parse().unwrap();
    let listener = host.enter(|| TcpListener::bind(bind)).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || serve(s));
        }
    });
}

/// An HTTP app: answers with the request head it received.
fn echo_head(mut s: TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let body = String::from_utf8_lossy(&head).to_lowercase();
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A server that speaks first (an SMTP-style banner), then echoes.
fn banner(mut s: TcpStream) {
    let _ = s.write_all(b"220 b ready\r\n");
    echo(s);
}

/// An echo server (client speaks first).
fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// `curl -sS ARGS` inside `host` as root: its stdout, which must succeed.
fn curl(host: &Host, args: &[&str]) -> String {
    let out = host
        .command("curl")
        .args(["-sS", "--noproxy", "*", "--max-time", "10"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {args:?} in {}: {}",
        host.name(),
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn connect(host: &Host, to: SocketAddr) -> TcpStream {
    let s = host.enter(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)));
    let s = s.unwrap_or_else(|e| panic!("connect to {to} from {}: {e}", host.name()));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn read_some(s: &mut TcpStream) -> String {
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// B's inbound policy: callers without a sidecar may not reach port 8081.
const INBOUND_POLICY: &str = r#"
package crank.authz

default allow := false
allow if count(deny) == 0

deny contains sprintf("callers without a sidecar may not reach port %d", [input.connection.destination.port]) if {
    input.connection.source == null
    input.connection.destination.port == 8081
}
"#;

/// A's outbound policy: nothing outside the mesh on port 7200, no tunnel
/// to port 7001.
const OUTBOUND_POLICY: &str = r#"
package crank.authz

default allow := false
allow if count(deny) == 0

deny contains sprintf("%v:%d is outside the mesh and off limits", [input.destination.host, input.destination.port]) if {
    input.destination.egress
    input.destination.port == 7200
}

deny contains "port 7001 in the mesh is off limits" if {
    not input.destination.egress
    input.connection.destination.port == 7001
}
"#;

/// A policy directory `dir/name` holding `rego`.
fn policy_dir(dir: &Path, name: &str, rego: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("p.rego"), rego).unwrap();
    d
}

fn sidecar_yaml(pki: &Pki, name: &str, rest: &str) -> String {
    let leaf = pki.leaf(name, "acme");
    format!(
        "identity: {{cert: {}, key: {}, trust_bundle: {}}}\nadmin: {{listen: {ADMIN}}}\naccess_log: false\n{rest}",
        leaf.cert.display(),
        leaf.key.display(),
        pki.bundle().display()
    )
}

/// The three hosts and the sidecars of A (outbound capture, routes to
/// B's sidecar, an outbound policy) and B (two TCP services and an HTTP
/// app behind inbound capture, an inbound policy).
struct World<'h> {
    a: &'h Host,
    b: &'h Host,
    c: &'h Host,
    a_proxy: HostProxy,
    b_proxy: HostProxy,
}

fn start_world<'h>(hosts: &'h Hosts, pki: &Pki) -> World<'h> {
    let (a, b, c) = (&hosts[0], &hosts[1], &hosts[2]);
    let (b_ip, b6) = (b.addr(), b.addr6());
    serve(b, "0.0.0.0:8080", echo_head);
    serve(b, "0.0.0.0:8081", echo_head);
    serve(b, "0.0.0.0:2525", banner);
    serve(b, "0.0.0.0:7000", echo);
    serve(c, "0.0.0.0:7100", echo);
    serve(c, "0.0.0.0:7200", echo);
    let b_policy = policy_dir(pki.path(), "b-policy", INBOUND_POLICY);
    let a_policy = policy_dir(pki.path(), "a-policy", OUTBOUND_POLICY);
    // Two TCP services behind B's sidecar, each with its capability.
    let b_yaml = sidecar_yaml(
        pki,
        "server",
        &format!(
            "inbound:\n  listen: '{b_ip}:4143'\n  app: '127.0.0.1:8080'\n  tcp: [{{app: '127.0.0.1:2525', capability: 'mail:smtp'}}, {{app: '127.0.0.1:7000', capability: echo}}]\n\
             capture: {{proxy_uid: {NOBODY}, inbound_ports: [8080, 8081]}}\npolicy: {{inbound: {{dir: '{}'}}}}\n",
            b_policy.display()
        ),
    );
    // Every route has B's sidecar; the first in table order (smtp) is not
    // the one a call to B:7000 wants. smtp's server talks first (declared
    // on the route, not in capture.server_speaks_first). `wrong` claims
    // echo at the SMTP server's port (over IPv6, B's other address).
    let ep = format!("endpoints: [{{address: '{b_ip}:4143', identity: server.acme.crank.local}}]");
    let a_yaml = sidecar_yaml(
        pki,
        "client",
        &format!(
            "routes:\n\
             - {{name: smtp, capability: 'mail:smtp', hosts: ['{b_ip}:2525'], server_speaks_first: true, {ep}}}\n\
             - {{name: server, hosts: ['{b_ip}:8080'], {ep}}}\n\
             - {{name: echo, capability: echo, {ep}}}\n\
             - {{name: wrong, capability: echo, hosts: ['[{b6}]:2525'], {ep}}}\n\
             capture: {{proxy_uid: {NOBODY}, ipv6: true, detect_timeout: {}s}}\npolicy: {{outbound: {{dir: '{}'}}}}\n",
            DETECT.as_secs(),
            a_policy.display()
        ),
    );

    let b_proxy = HostProxy::start(b, pki.path(), "b", &b_yaml);
    let a_proxy = HostProxy::start(a, pki.path(), "a", &a_yaml);
    World {
        a,
        b,
        c,
        a_proxy,
        b_proxy,
    }
}

#[test]
fn an_unmodified_app_is_meshed_across_hosts() {
    let Some(hosts) = Hosts::new(3) else { return };
    let pki = Pki::new();
    let w = start_world(&hosts, &pki);
    http_is_meshed(&w);
    tcp_services_behind_one_sidecar(&w);
    outside_the_mesh(&w);
    plaintext_callers(&w);
    remove_undoes_capture(&w);
}

/// HTTP/1 and h2 from the app, no proxy setting: meshed over mTLS.
fn http_is_meshed(w: &World) {
    let (a, a_proxy, b_ip) = (w.a, &w.a_proxy, w.b.addr());
    // Plain HTTP from the app, no proxy setting: meshed over mTLS, so the
    // server app sees the caller's verified identity.
    let body = curl(a, &[&format!("http://{b_ip}:8080/hello")]);
    assert!(
        body.contains("x-crank-client-id: spiffe://crank.local/tenant/acme/svc/client"),
        "the server app must see the caller's identity: {body}\n{}",
        a_proxy.log_text()
    );
    let http1 = [
        "direction=\"outbound\"",
        "protocol=\"http1\"",
        "outcome=\"detected\"",
    ];
    assert_eq!(count(a, "crank_capture_connections_total", &http1), 1.0);
    assert!(count(a, "crank_requests_total", &["route=\"server\""]) >= 1.0);
    // h2 with prior knowledge (gRPC-style clients): detected by its preface.
    let body = curl(
        a,
        &["--http2-prior-knowledge", &format!("http://{b_ip}:8080/h2")],
    );
    assert!(
        body.contains("x-crank-client-id: spiffe://crank.local/tenant/acme/svc/client"),
        "{body}"
    );
    let h2 = [
        "direction=\"outbound\"",
        "protocol=\"h2\"",
        "outcome=\"detected\"",
    ];
    assert_eq!(count(a, "crank_capture_connections_total", &h2), 1.0);
}

/// Opaque TCP to two services behind B's sidecar: each reached on the
/// port dialled, a mismatched claim refused, the outbound policy asked.
fn tcp_services_behind_one_sidecar(w: &World) {
    let (a, b, b_ip, b6) = (w.a, w.b, w.b.addr(), w.b.addr6());
    let (a_proxy, b_proxy) = (&w.a_proxy, &w.b_proxy);
    // A server-speaks-first port (the route says so): the banner comes at
    // once, far below the detection deadline.
    let started = Instant::now();
    let mut smtp = connect(a, SocketAddr::new(b_ip.into(), 2525));
    let greeting = read_some(&mut smtp);
    let took = started.elapsed();
    assert_eq!(
        greeting,
        "220 b ready\r\n",
        "after {took:?}\nA:\n{}\nB:\n{}",
        a_proxy.log_text(),
        b_proxy.log_text()
    );
    assert!(
        took < Duration::from_secs(1),
        "banner after {took:?} (deadline {DETECT:?})"
    );
    smtp.write_all(b"EHLO a\r\n").unwrap();
    assert_eq!(read_some(&mut smtp), "EHLO a\r\n");
    let skipped = [
        "direction=\"outbound\"",
        "protocol=\"opaque\"",
        "outcome=\"skipped\"",
    ];
    assert_eq!(count(a, "crank_capture_connections_total", &skipped), 1.0);

    // A client that says nothing on another port: opaque once the
    // deadline passes, and its bytes still flow, to the echo server on the
    // port it dialled (not to the first route's SMTP server).
    let started = Instant::now();
    let mut quiet = connect(a, SocketAddr::new(b_ip.into(), 7000));
    let timeout = [
        "direction=\"outbound\"",
        "protocol=\"opaque\"",
        "outcome=\"timeout\"",
    ];
    wait_until("detection to time out", DETECT * 3, || {
        count(a, "crank_capture_connections_total", &timeout) == 1.0
    });
    assert!(started.elapsed() >= DETECT - Duration::from_millis(100));
    quiet.write_all(b"late\n").unwrap();
    assert_eq!(
        read_some(&mut quiet),
        "late\n",
        "A:\n{}\nB:\n{}",
        a_proxy.log_text(),
        b_proxy.log_text()
    );
    // Both opaque connections are tunnels over mTLS, open at B's sidecar.
    let tunnels = ["direction=\"inbound\""];
    wait_until("B to hold both tunnels", Duration::from_secs(5), || {
        count(b, "crank_tcp_open_connections", &tunnels) == 2.0
    });
    drop((smtp, quiet));

    // A claim of one capability at another server's port: B refuses it.
    let mut wrong = connect(a, SocketAddr::new(b6.into(), 2525));
    wrong.write_all(b"x").unwrap();
    assert_eq!(read_some(&mut wrong), "", "refused, not the echo server");
    let mismatch = [
        "direction=\"outbound\"",
        "capability=\"echo\"",
        "outcome=\"capability-mismatch\"",
    ];
    wait_until("the mismatch to be counted", Duration::from_secs(5), || {
        count(a, "crank_tcp_connections_total", &mismatch) == 1.0
    });
    // A's outbound policy decides before a tunnel opens.
    let mut off_limits = connect(a, SocketAddr::new(b_ip.into(), 7001));
    off_limits.write_all(b"x").unwrap();
    assert_eq!(read_some(&mut off_limits), "");
    let denied = ["direction=\"outbound\"", "outcome=\"policy-denied\""];
    wait_until(
        "the tunnel's denial to be counted",
        Duration::from_secs(5),
        || count(a, "crank_tcp_connections_total", &denied) == 1.0,
    );
}

/// A host outside the mesh (C): passed through, counted, or refused by
/// A's outbound policy; the capture port itself is refused.
fn outside_the_mesh(w: &World) {
    let (a, c, a_proxy) = (w.a, w.c, &w.a_proxy);
    // A host outside the mesh: passed through as the app asked (no
    // egress.mode, capture.undeclared: passthrough).
    let mut outside = connect(a, SocketAddr::new(c.addr().into(), 7100));
    outside.write_all(b"x").unwrap();
    assert_eq!(read_some(&mut outside), "x");
    let opaque = [
        "direction=\"outbound\"",
        "protocol=\"opaque\"",
        "outcome=\"detected\"",
    ];
    assert_eq!(count(a, "crank_capture_connections_total", &opaque), 3.0);
    drop(outside);
    // Counted as a connection leaving the mesh, once it closes.
    let passed = [
        "direction=\"outbound\"",
        "capability=\"egress-undeclared\"",
        "outcome=\"closed\"",
    ];
    wait_until("the forward to be counted", Duration::from_secs(5), || {
        count(a, "crank_tcp_connections_total", &passed) == 1.0
    });
    let egress = ["destination=\"undeclared\"", "status_class=\"tcp\""];
    assert_eq!(count(a, "crank_egress_requests_total", &egress), 1.0);
    // A's outbound policy refuses port 7200 outside the mesh.
    let mut denied = connect(a, SocketAddr::new(c.addr().into(), 7200));
    denied.write_all(b"x").unwrap();
    assert_eq!(read_some(&mut denied), "", "refused by the outbound policy");
    let policy = ["direction=\"outbound\"", "reason=\"policy-denied\""];
    assert_eq!(count(a, "crank_capture_refused_total", &policy), 1.0);
    wait_until("the denial's log line", Duration::from_secs(5), || {
        a_proxy
            .log_text()
            .contains("outside the mesh and off limits")
    });

    // Straight to the capture port (loopback is never redirected): refused,
    // counted and logged, not proxied to itself.
    let mut direct = connect(a, "127.0.0.1:15001".parse().unwrap());
    assert_eq!(read_some(&mut direct), "");
    let refused = ["direction=\"outbound\"", "reason=\"not-redirected\""];
    wait_until("the refusal to be counted", Duration::from_secs(5), || {
        count(a, "crank_capture_refused_total", &refused) == 1.0
    });
    // The log writer is asynchronous: the line may land after the count.
    wait_until("the refusal's log line", Duration::from_secs(5), || {
        a_proxy.log_text().contains("did not redirect")
    });
}

/// Callers without a sidecar (C) on B's captured ports.
fn plaintext_callers(w: &World) {
    let (b, c, b_ip) = (w.b, w.c, w.b.addr());
    // Inbound capture: a caller without a sidecar reaches B's app through
    // B's inbound capture listener (plaintext allowed by default).
    let body = curl(c, &[&format!("http://{b_ip}:8080/plain")]);
    assert!(body.starts_with("get /plain http/1.1"), "{body}");
    assert!(!body.contains("x-crank-client-id"), "{body}");
    let inbound = [
        "direction=\"inbound\"",
        "protocol=\"http1\"",
        "outcome=\"detected\"",
    ];
    assert_eq!(count(b, "crank_capture_connections_total", &inbound), 1.0);
    // B's inbound policy applies to callers without a sidecar: port 8081
    // is closed to them.
    let out = c
        .command("curl")
        .args(["-sS", "--max-time", "10", &format!("http://{b_ip}:8081/")])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", output_text(&out));
    let policy = ["direction=\"inbound\"", "reason=\"policy-denied\""];
    assert_eq!(count(b, "crank_capture_refused_total", &policy), 1.0);
}

/// `capture remove` restores A exactly.
fn remove_undoes_capture(w: &World) {
    let (a, a_proxy, b_ip) = (w.a, &w.a_proxy, w.b.addr());
    // `capture remove` takes the rules away: A's curl goes straight out.
    let out = a
        .command(bin("crank-proxy"))
        .args(["capture", "remove", "--config"])
        .arg(&a_proxy.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "capture remove: {}",
        output_text(&out)
    );
    let nft = a.run("nft", &["list", "ruleset"]);
    assert!(
        !String::from_utf8_lossy(&nft.stdout).contains("crank"),
        "{}",
        output_text(&nft)
    );
    let ipt = a.run("iptables", &["-t", "nat", "-S"]);
    assert!(
        !String::from_utf8_lossy(&ipt.stdout).contains("CRANK"),
        "{}",
        output_text(&ipt)
    );
    let body = curl(a, &[&format!("http://{b_ip}:8080/after")]);
    assert!(!body.contains("x-crank-client-id"), "{body}");
    let http1 = [
        "direction=\"outbound\"",
        "protocol=\"http1\"",
        "outcome=\"detected\"",
    ];
    assert_eq!(count(a, "crank_capture_connections_total", &http1), 1.0);
}

#[test]
fn undeclared_destinations_and_plaintext_callers_can_be_refused() {
    let Some(hosts) = Hosts::new(2) else { return };
    let (a, b) = (&hosts[0], &hosts[1]);
    serve(b, "0.0.0.0:8080", echo_head);
    let pki = Pki::new();
    let a_yaml = sidecar_yaml(
        &pki,
        "client",
        &format!("capture: {{proxy_uid: {NOBODY}, undeclared: refuse, ipv6: true}}\n"),
    );
    let b_yaml = sidecar_yaml(
        &pki,
        "server",
        &format!(
            "capture: {{proxy_uid: {NOBODY}, inbound_ports: 8080, inbound_plaintext: deny}}\n"
        ),
    );
    refuses_to_start_as_another_uid(a, &pki, &a_yaml);
    let a_proxy = HostProxy::start(a, pki.path(), "a", &a_yaml);
    let b_proxy = HostProxy::start(b, pki.path(), "b", &b_yaml);
    let url = format!("http://{}:8080/", b.addr());

    // A's app calls an address nothing declares: A's sidecar closes it.
    let out = a
        .command("curl")
        .args(["-sS", "--max-time", "10", &url])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", output_text(&out));
    let undeclared = ["direction=\"outbound\"", "reason=\"undeclared\""];
    assert_eq!(count(a, "crank_capture_refused_total", &undeclared), 1.0);
    // The log writer is asynchronous (batched): the line may land after the count.
    wait_until("the refusal's log line", Duration::from_secs(5), || {
        a_proxy
            .log_text()
            .contains("no route or egress destination declares it")
    });
    // The same over IPv6 (`ipv6: true`): the [::1] capture listener and
    // IP6T_SO_ORIGINAL_DST.
    let url6 = format!("http://[{}]:8080/", b.addr6());
    let out = a
        .command("curl")
        .args(["-sS", "-g", "--max-time", "10", &url6])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", output_text(&out));
    assert_eq!(count(a, "crank_capture_refused_total", &undeclared), 2.0);
    let logged6 = format!("[{}]:8080", b.addr6());
    wait_until(
        "the IPv6 refusal's log line",
        Duration::from_secs(5),
        || a_proxy.log_text().contains(&logged6),
    );

    // A caller without a sidecar (curl as A's proxy uid, which A's rules
    // leave alone) reaches B's captured port: B's sidecar closes it.
    let out = a
        .command("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
        ])
        .args(["curl", "-sS", "--max-time", "10", &url])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", output_text(&out));
    // The sidecar closes first, then counts and logs: wait for both.
    let denied = ["direction=\"inbound\"", "reason=\"plaintext-denied\""];
    wait_until("the refusal to be counted", Duration::from_secs(5), || {
        count(b, "crank_capture_refused_total", &denied) == 1.0
    });
    wait_until("the refusal to be logged", Duration::from_secs(5), || {
        b_proxy
            .log_text()
            .contains("refused a caller without a sidecar")
    });
}

/// As root, not `capture.proxy_uid`, the sidecar of `yaml` would capture
/// its own connects: it refuses to start and says how to fix it.
fn refuses_to_start_as_another_uid(a: &Host, pki: &Pki, yaml: &str) {
    let config = pki.path().join("root.yaml");
    std::fs::write(&config, yaml).unwrap();
    let out = a
        .command(bin("crank-proxy"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", output_text(&out));
    let want = format!("capture.proxy_uid is {NOBODY} but crank-proxy runs as uid 0");
    assert!(output_text(&out).contains(&want), "{}", output_text(&out));
}
