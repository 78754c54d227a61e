//! A real `crank-control` process with a fresh root and intermediate (made
//! by the real `crankctl`), `crankctl` against its admin socket, and
//! sidecars that enroll with it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::proxy::{free_addr, Proxy};

pub struct ControlPlane {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub listen: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
    /// `dashboard_listen`, when [`ControlOptions::dashboard`] is set.
    pub dashboard: Option<SocketAddr>,
    /// Environment of the process ([`ControlOptions::env`]).
    env: Vec<(&'static str, String)>,
}

/// Knobs for the control plane's config.
#[derive(Clone)]
pub struct ControlOptions {
    pub leaf_ttl: &'static str,
    pub stale_after: &'static str,
    /// YAML appended to control.yaml (`config_dir: mesh`, `registry: {lease: 2s}`).
    pub extra: String,
    /// Serve the web dashboard on a free loopback port (`dashboard_listen`).
    pub dashboard: bool,
    /// Environment variables for crank-control (`CRANK_CONTROL_TICK`).
    pub env: Vec<(&'static str, String)>,
}

impl Default for ControlOptions {
    fn default() -> Self {
        ControlOptions {
            leaf_ttl: "1h",
            stale_after: "10m",
            extra: String::new(),
            dashboard: false,
            env: Vec::new(),
        }
    }
}

/// Output of one `crankctl` run.
pub struct CtlOutput {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl ControlPlane {
    /// `crankctl ca init` + `ca intermediate`, then starts crank-control.
    pub fn start(opts: ControlOptions) -> ControlPlane {
        let dir = tempfile::tempdir().unwrap();
        let listen = free_addr();
        let config = dir.path().join("control.yaml");
        let log = dir.path().join("control.log");
        let dashboard = opts.dashboard.then(free_addr);
        let dashboard_yaml = dashboard
            .map(|a| format!("dashboard_listen: {a}\n"))
            .unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "listen: {listen}\nstate_dir: state\nadmin_socket: state/admin.sock\nca: {{intermediate: ca/int1}}\n\
                 certs: {{leaf_ttl: {}}}\nworkloads: {{stale_after: {}}}\n{dashboard_yaml}{}",
                opts.leaf_ttl, opts.stale_after, opts.extra
            ),
        )
        .unwrap();
        let mut cp = ControlPlane {
            child: None,
            dir,
            listen,
            config,
            log,
            dashboard,
            env: opts.env,
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

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The dashboard's address; panics when it was not asked for.
    pub fn dashboard_addr(&self) -> SocketAddr {
        self.dashboard
            .expect("start the control plane with ControlOptions { dashboard: true, .. }")
    }

    /// `GET /api/state` on the dashboard, parsed.
    pub fn dashboard_state(&self) -> serde_json::Value {
        let (status, out) = crate::curl(&[&format!("http://{}/api/state", self.dashboard_addr())]);
        let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        assert_eq!(status, 200, "dashboard /api/state: {out}");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("/api/state: {e}: {out}"))
    }

    /// Writes `text` to `rel` in the mesh config directory (`mesh/`), then
    /// renames it into place, as editors and git do.
    pub fn write_mesh_file(&self, rel: &str, text: &str) {
        let p = self.path().join("mesh").join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let tmp = p.with_extension("tmp~");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }

    /// The root bundle a new workload starts from (`ca/root/bundle.pem`).
    pub fn bootstrap_bundle(&self) -> PathBuf {
        self.path().join("ca/root/bundle.pem")
    }

    /// Starts (or restarts) the process and waits until crankctl reaches it.
    pub fn spawn(&mut self) {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(crate::bin("crank-control"))
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn crank-control");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("crank-control exited with {st}:\n{}", self.log_text());
            }
            if self.ctl(&["ca", "status", "--output", "json"]).ok
                && std::net::TcpStream::connect(self.listen).is_ok()
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "crank-control not up after 20s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process (SIGKILL): the control plane is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs crankctl in the control plane's directory against its socket.
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        let out = Command::new(crate::bin("crankctl"))
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

    /// Runs crankctl and panics with its output when it fails.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(
            o.ok,
            "crankctl {args:?} failed:\n{}\n{}",
            o.stdout, o.stderr
        );
        o.stdout
    }

    /// A one-time join token for `service.tenant`.
    pub fn token(&self, service: &str, tenant: &str) -> String {
        self.ctl_ok(&["token", "create", "--service", service, "--tenant", tenant])
            .trim()
            .to_string()
    }

    /// `crankctl ca status --output json`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ctl_ok(&["ca", "status", "--output", "json"])).unwrap()
    }

    /// Waits until the rotation is back to idle.
    pub fn wait_idle(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let s = self.status();
            if s["phase"] == "idle" {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "rotation not finished after {timeout:?}: {}\n{}",
                serde_json::to_string_pretty(&s).unwrap(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `identity.enroll` block of a sidecar config for `service.tenant`;
    /// writes a fresh token to `dir/<name>.token`.
    pub fn enroll_yaml(
        &self,
        dir: &Path,
        name: &str,
        service: &str,
        tenant: &str,
        watch_wait: &str,
    ) -> String {
        let token = dir.join(format!("{name}.token"));
        std::fs::write(&token, self.token(service, tenant)).unwrap();
        format!(
            "identity:\n  trust_bundle: {}\n  enroll:\n    control_plane: {}\n    service: {service}\n    tenant: {tenant}\n    token_file: {}\n    state_dir: {}\n    watch_wait: {watch_wait}\n",
            self.bootstrap_bundle().display(),
            self.listen,
            token.display(),
            dir.join(format!("{name}-state")).display(),
        )
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Two enrolled sidecars: app → client (`frontend.demo`, outbound) → mTLS →
/// server (`backend.demo`, inbound) → `app`.
pub struct EnrolledMesh {
    pub client: Proxy,
    pub server: Proxy,
    /// Outbound local upstream port bound to route `backend`.
    pub port: SocketAddr,
    pub inbound: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl EnrolledMesh {
    pub fn start(cp: &ControlPlane, app: SocketAddr, extra: &str) -> EnrolledMesh {
        let dir = tempfile::tempdir().unwrap();
        let (port, inbound) = (free_addr(), free_addr());
        let (cadmin, sadmin) = (free_addr(), free_addr());
        let server_yaml = format!(
            "{}inbound: {{listen: {inbound}, app: {app}}}\nadmin: {{listen: {sadmin}}}\nthreads: 1\n{extra}",
            cp.enroll_yaml(dir.path(), "server", "backend", "demo", "2s"),
        );
        let client_yaml = format!(
            "{}outbound:\n  ports: [{{listen: {port}, route: backend}}]\n\
             routes:\n  - name: backend\n    endpoints: [{{address: {inbound}, identity: backend.demo.crank.local}}]\n\
             admin: {{listen: {cadmin}}}\nthreads: 1\n{extra}",
            cp.enroll_yaml(dir.path(), "client", "frontend", "demo", "2s"),
        );
        let server = Proxy::start(dir.path(), "server", &server_yaml, sadmin);
        let client = Proxy::start(dir.path(), "client", &client_yaml, cadmin);
        EnrolledMesh {
            client,
            server,
            port,
            inbound,
            dir,
        }
    }
}

/// The serial a sidecar serves now, from its `/config_dump`.
pub fn serial_of(p: &Proxy) -> String {
    let (_, body) = p.admin_get("/config_dump");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["identity"]["serial"]
        .as_str()
        .unwrap_or_default()
        .replace(':', "")
        .to_lowercase()
}
