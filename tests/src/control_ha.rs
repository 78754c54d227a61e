//! Several real `crank-control` replicas sharing one etcd (issue #15): one
//! CA (made by the real `crankctl`), one KEK, one mesh config directory,
//! each replica with its own state directory, admin socket, workload and
//! metrics ports. Kill any replica with SIGKILL and start it again. A
//! workload client (curl with a fresh key and CSR) talks to any replica.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::etcd::EtcdCluster;
use crate::proxy::free_addr;
use crate::{curl, plain_get, wait_until};

/// One crank-control replica.
pub struct Replica {
    pub index: usize,
    /// The cluster's directory (ca/, kek, mesh/): crankctl runs here.
    pub base: PathBuf,
    pub listen: SocketAddr,
    pub metrics: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

/// Replicas on one etcd, sharing `dir` (ca/root, ca/int1, kek, mesh/).
pub struct HaControl {
    pub replicas: Vec<Replica>,
    pub etcd: EtcdCluster,
    pub dir: tempfile::TempDir,
}

/// Knobs for [`HaControl::start`].
#[derive(Clone)]
pub struct HaOptions {
    pub replicas: usize,
    pub etcd_members: usize,
    pub leader_ttl: &'static str,
    /// YAML appended to every replica's config.
    pub extra: String,
}

impl Default for HaOptions {
    fn default() -> Self {
        HaOptions {
            replicas: 2,
            etcd_members: 1,
            leader_ttl: "2s",
            extra: String::new(),
        }
    }
}

impl HaControl {
    /// etcd, a root and intermediate, a KEK, then every replica (waiting
    /// until each answers `crankctl ca status`).
    pub fn start(opts: HaOptions) -> HaControl {
        let etcd = EtcdCluster::start(opts.etcd_members);
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_path_buf();
        crankctl(&base, None, &["ca", "init", "--dir", "ca/root"]);
        crankctl(
            &base,
            None,
            &[
                "ca",
                "intermediate",
                "--root",
                "ca/root",
                "--out",
                "ca/int1",
            ],
        );
        write_kek(&base.join("kek"));
        std::fs::create_dir_all(base.join("mesh")).unwrap();
        let endpoints = etcd.endpoints().join(", ");
        let mut replicas = Vec::new();
        for index in 0..opts.replicas {
            let (listen, metrics) = (free_addr(), free_addr());
            let config = base.join(format!("r{index}.yaml"));
            std::fs::write(
                &config,
                format!(
                    "listen: {listen}\nmetrics_listen: {metrics}\nstate_dir: r{index}\nadmin_socket: r{index}/admin.sock\n\
                     ca: {{intermediate: ca/int1}}\nkek_file: kek\nleader_ttl: {}\nconfig_dir: mesh\n\
                     store: {{etcd: {{endpoints: [{endpoints}], prefix: /crank}}}}\n{}",
                    opts.leader_ttl, opts.extra
                ),
            )
            .unwrap();
            replicas.push(Replica {
                index,
                base: base.clone(),
                listen,
                metrics,
                log: base.join(format!("r{index}.log")),
                config,
                child: None,
            });
        }
        for r in &mut replicas {
            r.spawn();
        }
        HaControl {
            replicas,
            etcd,
            dir,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `rel` in the shared config directory (`mesh/`) by a rename.
    pub fn write_mesh_file(&self, rel: &str, text: &str) {
        let p = self.path().join("mesh").join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let tmp = p.with_extension("tmp~");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }

    /// The index of the replica that leads, once every running replica
    /// agrees on one (waits up to `timeout`).
    pub fn leader(&self, timeout: Duration) -> usize {
        let mut found = None;
        wait_until("one leader every replica agrees on", timeout, || {
            let seen: Vec<(usize, String, String)> = self
                .replicas
                .iter()
                .filter(|r| r.is_running())
                .filter_map(|r| {
                    let s = r.try_status()?;
                    Some((
                        r.index,
                        s["replica"].as_str()?.to_string(),
                        s["leader"].as_str()?.to_string(),
                    ))
                })
                .collect();
            let running = self.replicas.iter().filter(|r| r.is_running()).count();
            let Some((_, _, leader)) = seen.first() else {
                return false;
            };
            found = seen
                .iter()
                .find(|(_, me, _)| me == leader)
                .map(|(i, _, _)| *i);
            seen.len() == running && seen.iter().all(|(_, _, l)| l == leader) && found.is_some()
        });
        found.unwrap()
    }

    /// Every replica's log, for a failure message.
    pub fn logs(&self) -> String {
        self.replicas
            .iter()
            .map(|r| format!("--- replica {} ---\n{}", r.index, r.log_text()))
            .collect()
    }
}

impl Replica {
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
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn crank-control");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "crank-control replica {} exited with {st}:\n{}",
                    self.index,
                    self.log_text()
                );
            }
            if self.try_status().is_some() && std::net::TcpStream::connect(self.listen).is_ok() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "replica {} not up after 20s:\n{}",
                self.index,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the machine is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `crankctl` against this replica's admin socket, in the cluster's directory.
    pub fn ctl(&self, args: &[&str]) -> (bool, String) {
        let socket = self.base.join(format!("r{}/admin.sock", self.index));
        crankctl_out(&self.base, Some(&socket), args)
    }

    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.ctl(args);
        assert!(ok, "crankctl {args:?} on replica {}: {out}", self.index);
        out
    }

    /// `crankctl ca status --output json`, if the replica answers.
    pub fn try_status(&self) -> Option<serde_json::Value> {
        let (ok, out) = self.ctl(&["ca", "status", "--output", "json"]);
        ok.then(|| serde_json::from_str(&out).ok()).flatten()
    }

    pub fn status(&self) -> serde_json::Value {
        self.try_status().unwrap_or_else(|| {
            panic!(
                "replica {} does not answer:\n{}",
                self.index,
                self.log_text()
            )
        })
    }

    /// A one-time join token for `service.tenant`.
    pub fn token(&self, service: &str, tenant: &str) -> String {
        self.ctl_ok(&["token", "create", "--service", service, "--tenant", tenant])
            .trim()
            .to_string()
    }

    /// `crank_control_leader` on `metrics_listen`.
    pub fn leader_gauge(&self) -> Option<f64> {
        let (_, body) = plain_get(self.metrics, "/metrics");
        crate::metric(&body, "crank_control_leader")
    }

    /// A workload API call: POST `body` (or GET when `None`) to `path`,
    /// with an optional client certificate; (status, JSON body).
    pub fn call(
        &self,
        path: &str,
        body: Option<&serde_json::Value>,
        client: Option<&Workload>,
    ) -> (u16, serde_json::Value) {
        let port = self.listen.port();
        let url = format!("https://control.crank-system.crank.local:{port}{path}");
        let resolve = format!("control.crank-system.crank.local:{port}:127.0.0.1");
        let bundle = self.base.join("ca/root/bundle.pem");
        let mut args: Vec<String> = vec![
            "--cacert".into(),
            bundle.display().to_string(),
            "--resolve".into(),
            resolve,
        ];
        if let Some(b) = body {
            let file = self.base.join(format!(
                "req-{}-{}.json",
                self.index,
                crate::proxy::free_addr().port()
            ));
            std::fs::write(&file, b.to_string()).unwrap();
            args.extend([
                "-H".into(),
                "content-type: application/json".into(),
                "--data-binary".into(),
                format!("@{}", file.display()),
            ]);
        }
        if let Some(w) = client {
            args.extend([
                "--cert".into(),
                w.cert.display().to_string(),
                "--key".into(),
                w.key.display().to_string(),
            ]);
        }
        args.push(url);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, text) = curl(&refs);
        let json = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (status, serde_json::from_str(json).unwrap_or_default())
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A workload identity held in files: its key, and its certificate chain
/// once enrolled.
pub struct Workload {
    pub service: String,
    pub instance: String,
    pub key: PathBuf,
    pub cert: PathBuf,
    pub serial: String,
}

impl Workload {
    /// Enrolls `service.demo` as `instance` on `via` with `token`: (status, body).
    pub fn enroll(
        dir: &Path,
        via: &Replica,
        service: &str,
        instance: &str,
        token: &str,
    ) -> (u16, serde_json::Value, Workload) {
        let mut w = Workload {
            service: service.into(),
            instance: instance.into(),
            key: dir.join(format!("{instance}.key")),
            cert: dir.join(format!("{instance}.crt")),
            serial: String::new(),
        };
        let csr = w.new_csr();
        let body = serde_json::json!({"token": token, "csr": csr, "instance": instance});
        let (status, resp) = via.call("/v1/identity/enroll", Some(&body), None);
        if status == 200 {
            w.store(&resp);
        }
        (status, resp, w)
    }

    fn new_csr(&self) -> String {
        let id = crank_certs::Identity::new(&self.service, "demo", "crank.local").unwrap();
        let (key, csr) = crank_certs::new_key_and_csr(&id).unwrap();
        std::fs::write(self.key.with_extension("next"), key).unwrap();
        csr
    }

    fn store(&mut self, resp: &serde_json::Value) {
        std::fs::rename(self.key.with_extension("next"), &self.key).unwrap();
        std::fs::write(&self.cert, resp["chain"].as_str().unwrap_or_default()).unwrap();
        self.serial = resp["serial"].as_str().unwrap_or_default().to_string();
    }

    /// Renews on `via` with a fresh key: (status, body); the files follow on success.
    pub fn renew(&mut self, via: &Replica) -> (u16, serde_json::Value) {
        let csr = self.new_csr();
        let body = serde_json::json!({"csr": csr, "instance": self.instance});
        let (status, resp) = via.call("/v1/identity/renew", Some(&body), Some(self));
        if status == 200 {
            self.store(&resp);
        }
        (status, resp)
    }

    /// The mesh config version `via` serves this workload now (no wait):
    /// its `seq` and the first route's `path_prefix`.
    pub fn mesh_version(&self, via: &Replica) -> Option<(u64, String)> {
        let path = format!(
            "/v1/mesh/watch?instance={}&seq=0&registry=0&wait=0",
            self.instance
        );
        let (status, v) = via.call(&path, None, Some(self));
        let prefix = v["routes"][0]["path_prefix"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        (status == 200)
            .then(|| v["version"]["seq"].as_u64().map(|s| (s, prefix)))
            .flatten()
    }
}

/// 32 random bytes, mode 0600: the KEK every replica shares.
fn write_kek(path: &Path) {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let mut kek = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut kek)
        .unwrap();
    std::fs::write(path, kek).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn crankctl(dir: &Path, socket: Option<&Path>, args: &[&str]) -> String {
    let (ok, out) = crankctl_out(dir, socket, args);
    assert!(ok, "crankctl {args:?}: {out}");
    out
}

fn crankctl_out(dir: &Path, socket: Option<&Path>, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(crate::bin("crankctl"));
    cmd.args(args).current_dir(dir);
    if let Some(s) = socket {
        cmd.env("CRANK_CONTROL", s);
    }
    let out = cmd.output().expect("run crankctl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        (true, text)
    } else {
        (
            false,
            format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
        )
    }
}
