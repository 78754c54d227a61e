//! Real `crank-shim` processes: start with a config, wait for `/ready` on the
//! admin port, talk to the job API, signal, and kill on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct Shim {
    child: Option<Child>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
    pub config: PathBuf,
}

impl Shim {
    /// Writes `yaml` (which must use `listen` and `admin_listen` as given)
    /// to `dir/name.yaml`, starts the shim and waits for `/ready`.
    pub fn start(
        dir: &Path,
        name: &str,
        yaml: &str,
        listen: SocketAddr,
        admin: SocketAddr,
    ) -> Shim {
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(&config, yaml).unwrap();
        Shim::start_existing(&config, name, listen, admin)
    }

    /// Starts a shim on an existing config (a restart keeps the file).
    pub fn start_existing(
        config: &Path,
        name: &str,
        listen: SocketAddr,
        admin: SocketAddr,
    ) -> Shim {
        let dir = config.parent().unwrap();
        let log = dir.join(format!("{name}.log"));
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(crate::bin("crank-shim"))
            .arg("--config")
            .arg(config)
            .env("CRANK_LOG", "info")
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn crank-shim");
        let mut s = Shim {
            child: Some(child),
            listen,
            admin,
            log,
            config: config.to_path_buf(),
        };
        let start = Instant::now();
        loop {
            if let Some(status) = s.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "crank-shim {name} exited with {status} before ready:\n{}",
                    s.log_text()
                );
            }
            if s.admin_get("/ready").0 == 200 {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "crank-shim {name} not ready after 20s:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn admin_get(&self, path: &str) -> (u16, String) {
        crate::plain_get(self.admin, path)
    }

    pub fn metrics(&self) -> String {
        self.admin_get("/metrics").1
    }

    /// `http://LISTEN{path}`: the job API without a sidecar in between.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        crate::wait_child(self.child.as_mut()?, timeout)
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls a job with `fetch` (its JSON record) until it succeeds, and
/// returns the record; fails at once if it fails, times out or is
/// cancelled, and after 60 s.
pub fn wait_for_job_success(
    what: &str,
    mut fetch: impl FnMut() -> serde_json::Value,
) -> serde_json::Value {
    let mut done = serde_json::Value::Null;
    crate::wait_until(what, Duration::from_secs(60), || {
        done = fetch();
        assert!(
            !matches!(
                done["state"].as_str(),
                Some("failed" | "timed_out" | "canceled")
            ),
            "{done:#}"
        );
        done["state"] == "succeeded"
    });
    done
}
