//! A real `prometheus` server (Debian's package) for end-to-end tests: its
//! own data directory, a loopback port, the config the test wrote to
//! `prometheus.yml` in that directory; killed on drop. Queries go through
//! curl (Prometheus answers large bodies chunked).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::proxy::free_addr;
use crate::{plain_get, wait_until};

pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts on `dir/prometheus.yml` and waits until it is ready.
    pub fn start(dir: tempfile::TempDir) -> Prometheus {
        let addr = free_addr();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("prometheus cannot run ({e}): Debian's prometheus package has it; run `bash tests/run.sh`")
            });
        let mut p = Prometheus { child, addr, dir };
        wait_until("prometheus /-/ready", Duration::from_secs(15), || {
            if let Some(st) = p.child.try_wait().unwrap() {
                panic!("prometheus exited with {st}:\n{}", p.log());
            }
            plain_get(p.addr, "/-/ready").0 == 200
        });
        p
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The JSON answer of an API GET (`Null` when there is none).
    fn api(&self, path: &str, query: Option<&str>) -> Value {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "--max-time", "5", "-G"]);
        if let Some(q) = query {
            cmd.arg("--data-urlencode").arg(format!("query={q}"));
        }
        let out = cmd
            .arg(format!("{}{path}", self.url()))
            .output()
            .expect("curl is installed (tests/run.sh installs it)");
        let body: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert_ne!(body["status"], "error", "{path} {query:?}: {body}");
        body
    }

    /// The `data.result` of an instant query.
    pub fn query(&self, q: &str) -> Vec<Value> {
        self.api("/api/v1/query", Some(q))["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The active alerts (pending and firing), from `/api/v1/alerts`.
    pub fn alerts(&self) -> Vec<Value> {
        self.api("/api/v1/alerts", None)["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
