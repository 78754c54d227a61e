//! Real etcd members (Debian's `etcd-server` package) for end-to-end tests:
//! one or three members on loopback ports, each with its own data directory
//! in a temporary directory; every member is killed on drop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::proxy::free_addr;
use crate::{plain_get, wait_until};

pub struct EtcdMember {
    pub name: String,
    pub client: SocketAddr,
    peer: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
}

pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members (1 or 3) and waits until each reports healthy.
    pub fn start(n: usize) -> EtcdCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut members: Vec<EtcdMember> = (0..n)
            .map(|i| EtcdMember {
                name: format!("m{i}"),
                client: free_addr(),
                peer: free_addr(),
                child: None,
                log: dir.path().join(format!("m{i}.log")),
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            let log = std::fs::File::create(&m.log).unwrap();
            let child = Command::new("etcd")
                .arg(format!("--name={}", m.name))
                .arg(format!("--data-dir={}", dir.path().join(&m.name).display()))
                .arg(format!("--listen-client-urls=http://{}", m.client))
                .arg(format!("--advertise-client-urls=http://{}", m.client))
                .arg(format!("--listen-peer-urls=http://{}", m.peer))
                .arg(format!("--initial-advertise-peer-urls=http://{}", m.peer))
                .arg(format!("--initial-cluster={initial}"))
                .arg("--initial-cluster-state=new")
                .arg("--initial-cluster-token=crank-test")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("etcd cannot run ({e}): Debian's etcd-server package has it; run `bash tests/run.sh`")
                });
            m.child = Some(child);
        }
        let mut cluster = EtcdCluster { members, _dir: dir };
        for i in 0..n {
            cluster.wait_healthy(i);
        }
        cluster
    }

    fn wait_healthy(&mut self, i: usize) {
        let m = &mut self.members[i];
        wait_until(
            &format!("etcd {} /health", m.name),
            Duration::from_secs(30),
            || {
                if let Some(st) = m.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                    panic!("etcd {} exited with {st}:\n{}", m.name, m.log());
                }
                let (status, body) = plain_get(m.client, "/health");
                status == 200 && body.contains("true")
            },
        );
    }

    /// `http://127.0.0.1:PORT` of every member, for `store.etcd.endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}", m.client))
            .collect()
    }
}

impl EtcdMember {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the member (SIGKILL), as a machine loss.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}
