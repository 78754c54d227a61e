//! Real `crank-proxy` processes: start on ephemeral ports, wait for
//! `/ready`, read metrics, signal, and kill on drop.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::pki::{Leaf, Pki};

/// A free port on 127.0.0.1 for a proxy to bind later.
///
/// Ports come from 20000–31999, below Linux's ephemeral range (32768+):
/// a port the kernel picked for us could otherwise be handed to some
/// connection's source address between the pick and the proxy's bind. Each
/// test process starts at its own offset and never hands a port out twice.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20000;
    const SPAN: u32 = 12000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = (std::process::id().wrapping_mul(997)) % SPAN;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN)
}

/// A free `127.0.0.1:PORT` address.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

pub struct Proxy {
    child: Option<Child>,
    pub admin: SocketAddr,
    pub log: PathBuf,
    pub config: PathBuf,
}

impl Proxy {
    /// Writes `yaml` to `dir/name.yaml`, starts the proxy, waits for /ready.
    pub fn start(dir: &Path, name: &str, yaml: &str, admin: SocketAddr) -> Proxy {
        match Proxy::try_start(dir, name, yaml, admin) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`Proxy::start`], but returns the log when it does not get ready.
    pub fn try_start(
        dir: &Path,
        name: &str,
        yaml: &str,
        admin: SocketAddr,
    ) -> Result<Proxy, String> {
        Proxy::try_start_until(dir, name, yaml, admin, "/ready")
    }

    /// Starts the proxy and waits until `probe` (`/ready` or `/live`) answers 200.
    pub fn try_start_until(
        dir: &Path,
        name: &str,
        yaml: &str,
        admin: SocketAddr,
        probe: &str,
    ) -> Result<Proxy, String> {
        let config = dir.join(format!("{name}.yaml"));
        let log = dir.join(format!("{name}.log"));
        std::fs::write(&config, yaml).unwrap();
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new(crate::bin("crank-proxy"))
            .arg("--config")
            .arg(&config)
            .env("CRANK_LOG", "info")
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn crank-proxy");
        let mut p = Proxy {
            child: Some(child),
            admin,
            log,
            config,
        };
        let start = Instant::now();
        loop {
            if let Some(status) = p.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!(
                    "crank-proxy {name} exited with {status} before ready:\n{}",
                    p.log_text()
                ));
            }
            if p.admin_get(probe).0 == 200 {
                return Ok(p);
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err(format!(
                    "crank-proxy {name} not ready after 20s:\n{}",
                    p.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A plain HTTP/1.1 GET on the admin port: (status, body). (0, "") when down.
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        crate::plain_get(self.admin, path)
    }

    pub fn metrics(&self) -> String {
        self.admin_get("/metrics").1
    }

    /// Sends a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        crate::wait_child(self.child.as_mut()?, timeout)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Knobs for a two-sidecar mesh.
#[derive(Clone)]
pub struct MeshOptions {
    /// `auto`, `http1` or `h2c`.
    pub app_protocol: &'static str,
    pub drain: &'static str,
    /// The identity the client side expects from the server sidecar.
    pub expected_server_identity: String,
    /// Replace the client sidecar's certificate (expired, foreign CA, ...).
    pub client_leaf: Option<Leaf>,
    pub threads: usize,
    /// YAML appended to the client (outbound) sidecar's config.
    pub client_extra: String,
    /// YAML appended to the server (inbound) sidecar's config.
    pub server_extra: String,
    /// Fields added inside the server's `inbound: {...}` map
    /// (`concurrency: {max_concurrent: 2}`).
    pub inbound_extra: String,
    /// Lines added to the client's route `backend` (`    timeout: 1s\n`).
    pub route_extra: String,
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            app_protocol: "auto",
            drain: "5s",
            expected_server_identity: "backend.demo.crank.local".into(),
            client_leaf: None,
            threads: 1,
            client_extra: String::new(),
            server_extra: String::new(),
            inbound_extra: String::new(),
            route_extra: String::new(),
        }
    }
}

/// App → client sidecar (outbound) → mTLS → server sidecar (inbound) → app.
/// The route is `backend` (host `backend`), served by the server sidecar with
/// identity `backend.demo.crank.local`; the client is `frontend.demo`.
pub struct Mesh {
    pub pki: Pki,
    pub client: Proxy,
    pub server: Proxy,
    /// Outbound HTTP proxy listener (for `HTTP_PROXY` clients).
    pub http_proxy: SocketAddr,
    /// Outbound local upstream port bound to route `backend`.
    pub port: SocketAddr,
    /// The server sidecar's mTLS listener.
    pub inbound: SocketAddr,
}

impl Mesh {
    pub fn start(app: SocketAddr, opts: MeshOptions) -> Mesh {
        let pki = Pki::new();
        let server_leaf = pki.leaf("backend", "demo");
        let client_leaf = opts
            .client_leaf
            .clone()
            .unwrap_or_else(|| pki.leaf("frontend", "demo"));
        let (http_proxy, port, inbound) = (free_addr(), free_addr(), free_addr());
        let (cadmin, sadmin) = (free_addr(), free_addr());
        let bundle = pki.bundle();
        let server_yaml = format!(
            "identity: {{cert: {}, key: {}, trust_bundle: {}}}\n\
             inbound: {{listen: {inbound}, app: {app}, app_protocol: {}{}}}\n\
             admin: {{listen: {sadmin}}}\nthreads: {}\ndrain: {{deadline: {}}}\n{}",
            server_leaf.cert.display(),
            server_leaf.key.display(),
            bundle.display(),
            opts.app_protocol,
            if opts.inbound_extra.is_empty() {
                String::new()
            } else {
                format!(", {}", opts.inbound_extra)
            },
            opts.threads,
            opts.drain,
            opts.server_extra,
        );
        let client_yaml = format!(
            "identity: {{cert: {}, key: {}, trust_bundle: {}}}\n\
             outbound:\n  http_proxy: {http_proxy}\n  ports: [{{listen: {port}, route: backend}}]\n\
             routes:\n  - name: backend\n    hosts: [backend]\n    endpoints: [{{address: {inbound}, identity: {}}}]\n{}\
             admin: {{listen: {cadmin}}}\nthreads: {}\ndrain: {{deadline: {}}}\n{}",
            client_leaf.cert.display(),
            client_leaf.key.display(),
            bundle.display(),
            opts.expected_server_identity,
            opts.route_extra,
            opts.threads,
            opts.drain,
            opts.client_extra,
        );
        let server = Proxy::start(pki.path(), "server", &server_yaml, sadmin);
        let client = Proxy::start(pki.path(), "client", &client_yaml, cadmin);
        Mesh {
            pki,
            client,
            server,
            http_proxy,
            port,
            inbound,
        }
    }

    /// `http://127.0.0.1:PORT` of the local upstream port.
    pub fn port_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.port)
    }
}
