//! The mesh across hosts: `crank-control`, sidecars and apps each inside a
//! host of the network-namespace fixture ([`crate::netns`]), talking over
//! the hosts' own `10.77.k.x` addresses, never over a shared loopback.
//!
//! Host 0 runs crank-control (its workload API on `10.77.k.1:4140`); hosts
//! 1..=n are backends, each an [`EchoApp`] on its own loopback with a
//! sidecar that enrolls over the network with a join token and registers
//! `hello:v1` at its routable address (a 5 s lease); the last host is the
//! client, whose sidecar gets route `backend` from crank-control. Each host is a private
//! network namespace, so the well-known ports below never collide with
//! another test; they are the ports a real host would use. `crankctl`
//! reaches crank-control over its admin socket, a file, from the test's
//! own namespace.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::control::CtlOutput;
use crate::netns::{Host, HostProcess, Hosts};
use crate::{plain_get, EchoApp};

/// crank-control's workload API port on host 0.
pub const CONTROL_PORT: u16 = 4140;
/// Each backend sidecar's inbound mTLS port.
pub const INBOUND_PORT: u16 = 4143;
/// The client sidecar's local port bound to route `backend`.
pub const OUTBOUND_PORT: u16 = 5001;
/// Every sidecar's admin port, on its host's loopback.
pub const ADMIN_PORT: u16 = 9901;

/// crank-control running inside one host.
pub struct HostControl<'h> {
    pub host: &'h Host,
    proc: Option<HostProcess>,
    pub dir: tempfile::TempDir,
    /// The workload API, on the host's own address.
    pub listen: SocketAddr,
    pub log: PathBuf,
}

impl<'h> HostControl<'h> {
    /// A fresh CA (`crankctl ca init`, `ca intermediate`), then crank-control
    /// in `host` with `extra` appended to control.yaml.
    pub fn start(host: &'h Host, leaf_ttl: &str, extra: &str) -> HostControl<'h> {
        let dir = tempfile::tempdir().unwrap();
        let listen = SocketAddr::from((host.addr(), CONTROL_PORT));
        let yaml = format!(
            "listen: {listen}\nstate_dir: state\nadmin_socket: state/admin.sock\n\
             ca: {{intermediate: ca/int1}}\ncerts: {{leaf_ttl: {leaf_ttl}}}\n{extra}"
        );
        std::fs::write(dir.path().join("control.yaml"), yaml).unwrap();
        let log = dir.path().join("control.log");
        let mut cp = HostControl {
            host,
            proc: None,
            dir,
            listen,
            log,
        };
        cp.ctl_ok(&["ca", "init", "--dir", "ca/root"]);
        cp.ctl_ok(&[
            "ca",
            "intermediate",
            "--root",
            "ca/root",
            "--out",
            "ca/int1",
        ]);
        cp.spawn();
        cp
    }

    fn spawn(&mut self) {
        let logf = std::fs::File::create(&self.log).unwrap();
        let mut cmd = self.host.command(crate::bin("crank-control"));
        cmd.arg("--config")
            .arg(self.path().join("control.yaml"))
            .current_dir(self.path())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
        self.proc = Some(self.host.spawn(cmd));
        let listen = self.listen;
        let start = Instant::now();
        while !(self.ctl(&["ca", "status"]).ok
            && self.host.enter(|| TcpStream::connect(listen)).is_ok())
        {
            let exited = self.proc.as_mut().unwrap().child().try_wait().unwrap();
            assert!(
                exited.is_none(),
                "crank-control exited:\n{}",
                self.log_text()
            );
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "crank-control not up on {listen} after 20s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// crankctl against the admin socket (a file: reachable from any namespace).
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        let out = std::process::Command::new(crate::bin("crankctl"))
            .args(args)
            .current_dir(self.path())
            .env("CRANK_CONTROL", self.path().join("state/admin.sock"))
            .output()
            .expect("run crankctl");
        CtlOutput {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(
            o.ok,
            "crankctl {args:?} failed:\n{}\n{}",
            o.stdout, o.stderr
        );
        o.stdout
    }

    /// `crankctl endpoints -o json`: the registry.
    pub fn endpoints(&self) -> serde_json::Value {
        serde_json::from_str(&self.ctl_ok(&["endpoints", "--output", "json"])).unwrap()
    }

    /// The registered addresses, as crankctl shows them.
    pub fn registered_addresses(&self) -> Vec<String> {
        let v = self.endpoints();
        let entries = v["entries"].as_array().cloned().unwrap_or_default();
        entries
            .iter()
            .filter_map(|e| e["registration"]["address"].as_str().map(str::to_string))
            .collect()
    }

    /// Writes `rel` in the mesh config directory, renamed into place.
    pub fn write_mesh_file(&self, rel: &str, text: &str) {
        let p = self.path().join("mesh").join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let tmp = p.with_extension("tmp~");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }

    /// The `identity` block of a sidecar enrolling over the network as
    /// `service.demo`; a fresh join token goes to `dir/<name>.token`.
    pub fn enroll_yaml(&self, dir: &Path, name: &str, service: &str) -> String {
        let token = dir.join(format!("{name}.token"));
        let t = self.ctl_ok(&["token", "create", "--service", service, "--tenant", "demo"]);
        std::fs::write(&token, t.trim()).unwrap();
        format!(
            "identity:\n  trust_bundle: {}\n  enroll:\n    control_plane: {}\n    service: {service}\n    tenant: demo\n    token_file: {}\n    state_dir: {}\n    watch_wait: 2s\n",
            self.path().join("ca/root/bundle.pem").display(),
            self.listen,
            token.display(),
            dir.join(format!("{name}-state")).display(),
        )
    }
}

/// A crank-proxy running inside one host; its admin port is on that host's
/// loopback, reached through [`Host::enter`].
pub struct HostSidecar<'h> {
    pub host: &'h Host,
    proc: Option<HostProcess>,
    pub name: String,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl<'h> HostSidecar<'h> {
    /// Writes `dir/<name>.yaml`, starts the proxy in `host`, waits for /ready.
    pub fn start(host: &'h Host, dir: &Path, name: &str, yaml: &str) -> HostSidecar<'h> {
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(&config, yaml).unwrap();
        let mut s = HostSidecar {
            host,
            proc: None,
            name: name.to_string(),
            log: dir.join(format!("{name}.log")),
            config,
        };
        s.spawn();
        s
    }

    /// Starts (or starts again) the process with the same config and state.
    pub fn spawn(&mut self) {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = self.host.command(crate::bin("crank-proxy"));
        cmd.arg("--config")
            .arg(&self.config)
            .env("CRANK_LOG", "info")
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
        self.proc = Some(self.host.spawn(cmd));
        let start = Instant::now();
        while self.admin_get("/ready").0 != 200 {
            let exited = self.proc.as_mut().unwrap().child().try_wait().unwrap();
            assert!(
                exited.is_none() && start.elapsed() < Duration::from_secs(20),
                "sidecar {} in {} not ready ({exited:?}):\n{}",
                self.name,
                self.host.name(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGKILL: the process is gone at once, with no deregistration.
    pub fn kill9(&mut self) {
        drop(self.proc.take());
    }

    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, ADMIN_PORT));
        self.host.enter(|| plain_get(admin, path))
    }

    pub fn metrics(&self) -> String {
        self.admin_get("/metrics").1
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Runs curl inside `host`: (status, headers and body). `-s -i` is added.
pub fn curl_in(host: &Host, args: &[&str]) -> (u16, String) {
    let out = host.run("curl", &[&["-s", "-i", "--max-time", "20"], args].concat());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (crate::status_of(&text), text)
}

/// `capabilities.yaml` and a route `backend` to `hello:v1`, with `route_extra`
/// (retry, circuit) under the route.
pub fn hello_mesh_files(cp: &HostControl, route_extra: &str) {
    cp.write_mesh_file("capabilities.yaml", "capabilities:\n  - name: hello:v1\n");
    cp.write_mesh_file(
        "routes/backend.yaml",
        &format!(
            "routes:\n  - name: backend\n    match: {{hosts: [backend]}}\n    backends:\n      - {{capability: hello:v1}}\n{route_extra}"
        ),
    );
}

/// Control on host 0, one backend per host 1..=n, the client on the last.
pub struct CrossHostMesh<'h> {
    pub client: HostSidecar<'h>,
    pub backends: Vec<HostSidecar<'h>>,
    /// One app per backend host, on that host's loopback.
    pub apps: Vec<EchoApp>,
    pub cp: HostControl<'h>,
    pub dir: tempfile::TempDir,
}

impl<'h> CrossHostMesh<'h> {
    /// Starts it all on `hosts` (at least 3); `route_extra` goes under the
    /// mesh route, `client_extra` into the client sidecar's config.
    pub fn start(
        hosts: &'h Hosts,
        leaf_ttl: &str,
        route_extra: &str,
        client_extra: &str,
    ) -> CrossHostMesh<'h> {
        let n = hosts.iter().count();
        assert!(
            n >= 3,
            "a cross-host mesh needs control, a backend and a client"
        );
        let cp = HostControl::start(&hosts[0], leaf_ttl, "config_dir: mesh\n");
        hello_mesh_files(&cp, route_extra);
        let dir = tempfile::tempdir().unwrap();
        let mut apps = Vec::new();
        let mut backends = Vec::new();
        for i in 1..n - 1 {
            let host = &hosts[i];
            let app = host.enter(EchoApp::start);
            let yaml = backend_yaml(&cp, dir.path(), i, host, app.addr);
            backends.push(HostSidecar::start(
                host,
                dir.path(),
                &format!("backend-{i}"),
                &yaml,
            ));
            apps.push(app);
        }
        let client_yaml = format!(
            "{}outbound:\n  ports: [{{listen: 127.0.0.1:{OUTBOUND_PORT}, route: backend}}]\n\
             routes:\n  - name: backend\n    endpoints: [{{address: 127.0.0.1:1, identity: backend.demo.crank.local}}]\n\
             mesh: {{watch_wait: 2s}}\nadmin: {{listen: 127.0.0.1:{ADMIN_PORT}}}\nthreads: 1\n{client_extra}",
            cp.enroll_yaml(dir.path(), "client", "frontend"),
        );
        let client = HostSidecar::start(&hosts[n - 1], dir.path(), "client", &client_yaml);
        CrossHostMesh {
            client,
            backends,
            apps,
            cp,
            dir,
        }
    }

    /// The client's local port for route `backend`, on the client host.
    pub fn port(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT))
    }

    /// `GET path` from the client host through its sidecar.
    pub fn get(&self, path: &str) -> (u16, String) {
        curl_in(
            self.client.host,
            &[&format!("http://{}{path}", self.port())],
        )
    }

    /// The address backend `i` (0-based) registers.
    pub fn backend_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.backends[i].host.addr(), INBOUND_PORT))
    }

    /// Waits until crank-control lists exactly `addrs` and the client
    /// routes to them.
    pub fn wait_routed_to(&self, addrs: &[SocketAddr], timeout: Duration) {
        let mut want: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        want.sort();
        crate::wait_until(
            &format!("the registry and the client's route list {want:?}"),
            timeout,
            || {
                let mut got = self.cp.registered_addresses();
                got.sort();
                got == want && self.client_endpoints() == want
            },
        );
    }

    /// The endpoint addresses of route `backend` in the client's /config_dump.
    pub fn client_endpoints(&self) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.client.admin_get("/config_dump").1).unwrap_or_default();
        let routes = v["config"]["routes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut out: Vec<String> = routes
            .iter()
            .filter(|r| r["name"] == "backend")
            .flat_map(|r| r["endpoints"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e["address"].as_str().map(str::to_string))
            .collect();
        out.sort();
        out
    }
}

/// Backend `i`'s sidecar: odd hosts listen on their own address (which is
/// what they register), even hosts on `0.0.0.0` with `mesh.register.address`.
fn backend_yaml(cp: &HostControl, dir: &Path, i: usize, host: &Host, app: SocketAddr) -> String {
    let routable = SocketAddr::from((host.addr(), INBOUND_PORT));
    let (listen, address) = if i % 2 == 1 {
        (routable.to_string(), String::new())
    } else {
        (
            format!("0.0.0.0:{INBOUND_PORT}"),
            format!("    address: {routable}\n"),
        )
    };
    format!(
        "{}inbound: {{listen: {listen}, app: {app}}}\nmesh:\n  watch_wait: 2s\n  register:\n{address}    capabilities: [hello:v1]\n    labels: {{host: h{i}}}\n    lease: 5s\nadmin: {{listen: 127.0.0.1:{ADMIN_PORT}}}\nthreads: 1\n",
        cp.enroll_yaml(dir, &format!("backend-{i}"), "backend"),
    )
}
