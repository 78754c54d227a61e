//! Opaque TCP through the mesh, across hosts (network namespaces with their
//! own addresses): client sidecars tunnel local TCP ports (`outbound.tcp`)
//! over mTLS to the server host's sidecar, which reaches its local servers
//! (`inbound.tcp`) after checking the caller's identity and the
//! connection-level policy (`input.connection`).
//!
//! What users rely on: a real PostgreSQL server answers `psql` through the
//! pair, with crank-control on a third host handing out the identities and
//! the route to the registered database sidecar, and the tunnel metrics
//! count the connection and its bytes; a server-speaks-first banner arrives
//! at once; a binary echo comes back byte for byte; half-close works (the
//! client shuts down its write half and still reads the reply); a caller the
//! policy denies is refused, and the server sidecar logs why; an idle tunnel
//! is closed; a tunnel past `tunnel.max_connections` is refused; HTTP/1.1
//! and h2 still work on the inbound port that takes tunnels.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crank_tests::hosts_mesh::{HostControl, HostSidecar, ADMIN_PORT};
use crank_tests::netns::{Host, HostProcess, Hosts};
use crank_tests::pki::{Leaf, Pki};
use crank_tests::postgres::Postgres;
use crank_tests::{bin, metric, plain_get, wait_until};

const POLICY: &str = r#"
package crank.authz

default allow := false
allow if count(deny) == 0

deny contains sprintf("service %q may not open tunnels to port %d", [input.source.service, input.connection.destination.port]) if {
    input.connection.protocol == "tcp"
    input.source.service == "intruder"
}
"#;

/// A sidecar running inside a host, with its admin port on the host's
/// loopback.
struct Sidecar<'h> {
    host: &'h Host,
    _proc: HostProcess,
    admin: SocketAddr,
    log: PathBuf,
}

impl<'h> Sidecar<'h> {
    fn start(
        host: &'h Host,
        dir: &Path,
        name: &str,
        leaf: &Leaf,
        bundle: &Path,
        admin_port: u16,
        body: &str,
    ) -> Self {
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
        let yaml = format!(
            "identity: {{cert: {}, key: {}, trust_bundle: {}}}\nadmin: {{listen: {admin}}}\n{body}",
            leaf.cert.display(),
            leaf.key.display(),
            bundle.display()
        );
        let config = dir.join(format!("{name}.yaml"));
        let log = dir.join(format!("{name}.log"));
        std::fs::write(&config, yaml).unwrap();
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = host.command(bin("crank-proxy"));
        cmd.arg("--config").arg(&config).env("CRANK_LOG", "info");
        cmd.stdout(logf.try_clone().unwrap()).stderr(logf);
        let s = Sidecar {
            host,
            _proc: host.spawn(cmd),
            admin,
            log,
        };
        wait_until(&format!("{name} ready"), Duration::from_secs(20), || {
            s.host.enter(|| plain_get(admin, "/ready").0) == 200
        });
        s
    }

    fn metrics(&self) -> String {
        self.host.enter(|| plain_get(self.admin, "/metrics").1)
    }

    fn value(&self, series: &str) -> f64 {
        metric(&self.metrics(), series).unwrap_or(0.0)
    }

    /// Waits until `series` reads `want`; fails with the tunnel metrics
    /// and the log.
    fn wait_for(&self, series: &str, want: f64) {
        let start = std::time::Instant::now();
        while self.value(series) != want {
            if start.elapsed() > Duration::from_secs(10) {
                let m = self.metrics();
                let tcp: Vec<&str> = m.lines().filter(|l| l.starts_with("crank_tcp")).collect();
                panic!(
                    "{series} is not {want}:\n{}\n{}",
                    tcp.join("\n"),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits for a log line that `f` accepts (the log writer is
    /// asynchronous); fails with the log.
    fn wait_log_line(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let start = std::time::Instant::now();
        loop {
            let log = self.log_text();
            if let Some(l) = log.lines().find(|l| f(l)) {
                return l.to_string();
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no {what} logged:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Serves `f` on each connection to `127.0.0.1:port` inside `host`.
fn serve(host: &Host, port: u16, f: fn(TcpStream)) {
    let l = host.enter(|| TcpListener::bind(("127.0.0.1", port)).unwrap());
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || f(s));
        }
    });
}

/// Speaks first: a banner, then `221` to `QUIT`.
fn banner(mut s: TcpStream) {
    let _ = s.write_all(b"220 crank-test ESMTP ready\r\n");
    let mut line = [0u8; 64];
    if matches!(s.read(&mut line), Ok(n) if n > 0) {
        let _ = s.write_all(b"221 bye\r\n");
    }
}

/// A one-line HTTP/1.1 app: `ok` to any request, then close.
fn http_ok(mut s: TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
}

/// Echoes every byte; at the client's EOF writes `bye <count>` and closes.
fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        total += n;
        if s.write_all(&buf[..n]).is_err() {
            return;
        }
    }
    let _ = s.write_all(format!("bye {total}").as_bytes());
}

/// Two hosts: the server host (its sidecar in front of a banner server,
/// an echo server and, when started, PostgreSQL) and the client host.
struct World {
    pki: Pki,
    hosts: Hosts,
}

impl World {
    fn new() -> Option<World> {
        let hosts = Hosts::new(2)?;
        let pki = Pki::new();
        Some(World { pki, hosts })
    }

    fn client(&self) -> &Host {
        self.hosts.host(0)
    }

    fn server(&self) -> &Host {
        self.hosts.host(1)
    }

    fn server_sidecar(&self) -> Sidecar<'_> {
        let policy = self.pki.path().join("policy");
        std::fs::create_dir_all(&policy).unwrap();
        std::fs::write(policy.join("tcp.rego"), POLICY).unwrap();
        let leaf = self.pki.leaf("db", "acme");
        let body = format!(
            "inbound:\n  listen: {}:4143\n  app: 127.0.0.1:8080\n  tcp:\n    - {{app: 127.0.0.1:5432, capability: 'db:postgres'}}\n    - {{app: 127.0.0.1:2525, capability: 'mail:smtp'}}\n    - {{app: 127.0.0.1:7000, capability: echo}}\npolicy: {{inbound: {{dir: {}}}}}\n",
            self.server().addr(),
            policy.display()
        );
        Sidecar::start(
            self.server(),
            self.pki.path(),
            "server",
            &leaf,
            &self.pki.bundle(),
            9901,
            &body,
        )
    }

    /// A client sidecar as `service`, with `ports` (`(port, capability)`).
    fn client_sidecar(
        &self,
        service: &str,
        admin: u16,
        ports: &[(u16, &str)],
        extra: &str,
    ) -> Sidecar<'_> {
        let leaf = self.pki.leaf(service, "acme");
        let server = self.server().addr();
        let mut body = String::from("outbound:\n  tcp:\n");
        for (port, cap) in ports {
            body += &format!("    - {{listen: 127.0.0.1:{port}, capability: '{cap}'}}\n");
        }
        body += "routes:\n";
        for cap in ["db:postgres", "mail:smtp", "echo"] {
            let name = cap.replace(':', "-");
            body += &format!("  - {{name: {name}, capability: '{cap}', endpoints: [{{address: '{server}:4143', identity: db.acme.crank.local}}]}}\n");
        }
        body += extra;
        let name = format!("client-{service}-{admin}");
        Sidecar::start(
            self.client(),
            self.pki.path(),
            &name,
            &leaf,
            &self.pki.bundle(),
            admin,
            &body,
        )
    }

    /// Connects to `127.0.0.1:port` on the client host.
    fn connect(&self, port: u16) -> TcpStream {
        let s = self
            .client()
            .enter(|| TcpStream::connect(("127.0.0.1", port)).unwrap());
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

/// The mesh of the PostgreSQL story, on three hosts: crank-control (host
/// 0, with route `pg` to capability `db:postgres`), the database host (1:
/// PostgreSQL on its loopback, a sidecar that enrolls over the network and
/// registers `db:postgres` at its own address) and the client host (2: a
/// sidecar that enrolls, gets route `pg` from crank-control and tunnels its
/// `outbound.tcp` port 15432 to it).
#[test]
fn psql_queries_postgres_through_a_sidecar_pair_across_hosts() {
    let Some(hosts) = Hosts::new(3) else { return };
    let (cp_host, db_host, client_host) = (hosts.host(0), hosts.host(1), hosts.host(2));
    let cp = HostControl::start(cp_host, "1h", "config_dir: mesh\n");
    cp.write_mesh_file(
        "capabilities.yaml",
        "capabilities:\n  - name: db:postgres\n",
    );
    cp.write_mesh_file(
        "routes/pg.yaml",
        "routes:\n  - name: pg\n    match: {hosts: [pg]}\n    backends: [{capability: 'db:postgres'}]\n",
    );
    let pg = db_host.enter(Postgres::start);
    let dir = tempfile::tempdir().unwrap();
    let registered = SocketAddr::from((db_host.addr(), 4143));
    let server_yaml = format!(
        "{}inbound:\n  listen: {registered}\n  app: 127.0.0.1:8080\n  tcp: [{{app: '127.0.0.1:{}', capability: 'db:postgres'}}]\nmesh:\n  watch_wait: 2s\n  register: {{capabilities: ['db:postgres'], lease: 5s}}\nadmin: {{listen: 127.0.0.1:{ADMIN_PORT}}}\nthreads: 1\n",
        cp.enroll_yaml(dir.path(), "db", "db"),
        pg.port,
    );
    let server = HostSidecar::start(db_host, dir.path(), "db", &server_yaml);
    let client_yaml = format!(
        "{}outbound:\n  tcp: [{{listen: 127.0.0.1:15432, capability: 'db:postgres'}}]\nmesh: {{watch_wait: 2s}}\nadmin: {{listen: 127.0.0.1:{ADMIN_PORT}}}\nthreads: 1\n",
        cp.enroll_yaml(dir.path(), "web", "web"),
    );
    let client = HostSidecar::start(client_host, dir.path(), "web", &client_yaml);
    wait_until(
        "the client's route pg to the registered address",
        Duration::from_secs(20),
        || {
            client
                .admin_get("/config_dump")
                .1
                .contains(&registered.to_string())
        },
    );

    let out = client_host.run(
        "psql",
        &[
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            "15432",
            "-U",
            "postgres",
            "-d",
            "crank",
            "-tA",
            "-c",
            "select 'meshed ' || (6 * 7)",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "psql failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    assert_eq!(text.trim(), "meshed 42");

    let closed = "crank_tcp_connections_total{capability=\"db:postgres\",direction=\"outbound\",outcome=\"closed\"}";
    wait_metric(&client, closed, 1.0);
    let inbound = "crank_tcp_connections_total{capability=\"db:postgres\",direction=\"inbound\",outcome=\"closed\"}";
    wait_metric(&server, inbound, 1.0);
    for (side, dir) in [(&client, "outbound"), (&server, "inbound")] {
        let m = side.metrics();
        for flow in ["sent", "received"] {
            let series = format!("crank_tcp_bytes_total{{direction=\"{dir}\",flow=\"{flow}\"}}");
            let bytes = metric(&m, &series).unwrap_or(0.0);
            assert!(bytes > 0.0, "{dir} {flow}: {bytes} bytes");
        }
        let open = format!("crank_tcp_open_connections{{direction=\"{dir}\"}}");
        assert_eq!(metric(&m, &open), Some(0.0));
    }
    let line = wait_log(&server, "tunnel access log line", |l| {
        l.contains("\"kind\":\"tcp\"") && l.contains("db:postgres")
    });
    assert!(
        line.contains("svc/web"),
        "the caller's verified identity: {line}"
    );
    assert!(line.contains("\"close_reason\":\"closed\""), "{line}");
    assert!(line.contains("\"bytes_sent\""), "{line}");
}

/// Waits until the sidecar's `series` reads `want`.
fn wait_metric(side: &HostSidecar, series: &str, want: f64) {
    let start = std::time::Instant::now();
    while metric(&side.metrics(), series) != Some(want) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{series} is not {want}:\n{}\n{}",
            side.metrics(),
            side.log_text()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Waits for a line of the sidecar's log that `f` accepts.
fn wait_log(side: &HostSidecar, what: &str, f: impl Fn(&str) -> bool) -> String {
    let start = std::time::Instant::now();
    loop {
        let log = side.log_text();
        if let Some(l) = log.lines().find(|l| f(l)) {
            return l.to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no {what} logged:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn banner_echo_half_close_policy_idle_limit_and_http_on_the_same_port_across_hosts() {
    let Some(w) = World::new() else { return };
    serve(w.server(), 2525, banner);
    serve(w.server(), 7000, echo);
    serve(w.server(), 8080, http_ok);
    let server = w.server_sidecar();
    let web = w.client_sidecar("web", 9901, &[(12525, "mail:smtp"), (17000, "echo")], "");
    let intruder = w.client_sidecar("intruder", 9902, &[(27000, "echo")], "");
    let idler = w.client_sidecar(
        "web",
        9903,
        &[(37000, "echo")],
        "tunnel: {idle_timeout: 1s}\n",
    );
    let capped = w.client_sidecar(
        "web",
        9904,
        &[(47000, "echo")],
        "tunnel: {max_connections: 1}\n",
    );

    banner_echo_and_half_close(&w, &web, &server);
    policy_denial(&w, &intruder, &server);
    idle_timeout_and_limit(&w, &idler, &capped);
    http_on_the_tunnel_port(&w);
}

/// A server-speaks-first banner, then a binary echo with half-close.
fn banner_echo_and_half_close(w: &World, web: &Sidecar, server: &Sidecar) {
    // Server speaks first: the banner comes without a byte from the client.
    let mut smtp = w.connect(12525);
    let mut line = [0u8; 64];
    let n = smtp.read(&mut line).unwrap_or_else(|e| {
        panic!(
            "no banner ({e}):\nclient:\n{}\nserver:\n{}",
            web.log_text(),
            server.log_text()
        )
    });
    assert_eq!(&line[..n], b"220 crank-test ESMTP ready\r\n");
    smtp.write_all(b"QUIT\r\n").unwrap();
    let n = smtp.read(&mut line).unwrap();
    assert_eq!(&line[..n], b"221 bye\r\n");

    // Client speaks first, binary, then half-close: the reply still comes.
    let mut e = w.connect(17000);
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 256) as u8).collect();
    e.write_all(&data).unwrap();
    let mut back = vec![0u8; data.len()];
    e.read_exact(&mut back).unwrap();
    assert_eq!(back, data, "every byte value comes back unchanged");
    e.shutdown(Shutdown::Write).unwrap();
    let mut rest = String::new();
    e.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "bye 4096", "the reply after the client's EOF");
    let echo_ok = "crank_tcp_connections_total{capability=\"echo\",direction=\"outbound\",outcome=\"closed\"}";
    web.wait_for(echo_ok, 1.0);
}

fn policy_denial(w: &World, intruder: &Sidecar, server: &Sidecar) {
    // A caller the policy denies: closed without a byte, and logged.
    let mut denied = w.connect(27000);
    let mut got = Vec::new();
    let _ = denied.read_to_end(&mut got);
    assert!(got.is_empty(), "{got:?}");
    let refused = "crank_tcp_connections_total{capability=\"echo\",direction=\"outbound\",outcome=\"policy-denied\"}";
    intruder.wait_for(refused, 1.0);
    let why = server.wait_log_line("tunnel refusal", |l| {
        l.contains("refused an opaque TCP tunnel")
    });
    assert!(
        why.contains("policy-denied") && why.contains("svc/intruder"),
        "{why}"
    );
    assert!(
        why.contains("may not open tunnels to port 7000"),
        "the policy's reason: {why}"
    );
}

fn idle_timeout_and_limit(w: &World, idler: &Sidecar, capped: &Sidecar) {
    // An idle tunnel is closed after tunnel.idle_timeout.
    let mut quiet = w.connect(37000);
    let mut none = Vec::new();
    let _ = quiet.read_to_end(&mut none);
    let idle = "crank_tcp_connections_total{capability=\"echo\",direction=\"outbound\",outcome=\"idle-timeout\"}";
    idler.wait_for(idle, 1.0);

    // One tunnel past tunnel.max_connections is closed at once; the open
    // one goes on.
    let mut first = w.connect(47000);
    first.write_all(b"one").unwrap();
    let mut three = [0u8; 3];
    first.read_exact(&mut three).unwrap();
    let mut second = w.connect(47000);
    let mut nothing = Vec::new();
    let _ = second.read_to_end(&mut nothing);
    assert!(nothing.is_empty(), "{nothing:?}");
    let limit =
        "crank_tcp_connections_total{capability=\"echo\",direction=\"outbound\",outcome=\"limit\"}";
    capped.wait_for(limit, 1.0);
    first.write_all(b"two").unwrap();
    first.read_exact(&mut three).unwrap();
    assert_eq!(&three, b"two", "the open tunnel still carries bytes");
}

fn http_on_the_tunnel_port(w: &World) {
    // HTTP still works on the inbound port that takes tunnels: HTTP/1.1
    // (whose first bytes the listener reads to tell) and h2.
    let leaf = w.pki.leaf("curl", "acme");
    let inbound = format!("db.acme.crank.local:4143:{}", w.server().addr());
    for version in ["--http1.1", "--http2"] {
        let out = w.client().run(
            "curl",
            &[
                "-sS",
                "--max-time",
                "10",
                version,
                "--cacert",
                w.pki.bundle().to_str().unwrap(),
                "--cert",
                leaf.cert.to_str().unwrap(),
                "--key",
                leaf.key.to_str().unwrap(),
                "--resolve",
                &inbound,
                "https://db.acme.crank.local:4143/",
            ],
        );
        let body = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            body,
            "ok",
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
