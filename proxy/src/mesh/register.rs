//! This workload's endpoint in crank-control's registry (`mesh.register`):
//! register once the inbound listener is up, heartbeat every lease/3,
//! register again when the lease was lost (404: it expired while this
//! proxy was cut off), follow crank-shim's registration file, and
//! deregister before a drain.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use crank_api::mesh::{EndpointRegistration, LeaseRequest, RegisterRequest, RegisterResponse};
use crank_api::proxy::{MeshRegisterConfig, ProxyConfig};
use pingora_core::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::Handles;
use super::{credentials, Mesh};
use crate::enroll::client::CallError;
use crank_plumbing::backoff::Attempts;

/// Deadline of one registry call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often `from_file` is read again.
const FILE_CHECK: Duration = Duration::from_secs(1);

/// crank-shim's `registration_file`, as crank-api defines it for both sides.
/// Only its capabilities and labels are used here (its `address` is where
/// the sidecar reaches the shim, not where peers reach the sidecar).
pub use crank_api::registration::ShimRegistration as ShimFile;

/// Parses crank-shim's registration file.
pub fn parse_shim_file(bytes: &[u8]) -> Result<ShimFile, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// The address peers use: `mesh.register.address`, else `inbound.listen`.
pub fn address(cfg: &ProxyConfig, r: &MeshRegisterConfig) -> Option<SocketAddr> {
    r.address.or(cfg.inbound.as_ref().map(|i| i.listen))
}

/// The registration wanted now: the config's capabilities and labels, plus
/// the shim file's when `from_file` is set. `Ok(None)`: the file is absent
/// (the shim stopped or drains), so the workload is not registered.
pub fn desired(
    r: &MeshRegisterConfig,
    address: SocketAddr,
    identity: &str,
    base: &Path,
) -> Result<Option<EndpointRegistration>, String> {
    let mut capabilities = r.capabilities.clone();
    let mut labels = r.labels.clone();
    if let Some(f) = &r.from_file {
        let path = crate::config::resolve(base, f);
        let shim = match std::fs::read(&path) {
            Ok(b) => parse_shim_file(&b).map_err(|e| format!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        for c in shim.capabilities {
            if !capabilities.contains(&c) {
                capabilities.push(c);
            }
        }
        labels.extend(shim.labels);
    }
    Ok(Some(EndpointRegistration {
        address,
        identity: identity.to_string(),
        capabilities,
        labels,
    }))
}

/// Heartbeats go every third of the lease crank-control granted.
pub fn heartbeat_interval(lease_seconds: u64) -> Duration {
    (Duration::from_secs(lease_seconds.max(1)) / 3).max(Duration::from_millis(100))
}

/// The registration's state in the loop.
struct Lease {
    id: String,
    endpoint: EndpointRegistration,
    interval: Duration,
}

struct Registrar<'a> {
    mesh: &'a Mesh,
    handles: &'a Handles,
    lease_seconds: u64,
    lease: Option<Lease>,
    next: Instant,
    backoff: Attempts,
}

impl Registrar<'_> {
    async fn post(&self, path: &str, body: Vec<u8>) -> Result<bytes::Bytes, CallError> {
        let (cert, roots) = credentials(&self.handles.tls).map_err(CallError::BadAnswer)?;
        self.mesh
            .client
            .call(
                &roots,
                Some(&cert),
                http::Method::POST,
                path,
                Some(body),
                CALL_TIMEOUT,
            )
            .await
    }

    fn set_registered(&self, lease: Option<&Lease>) {
        self.mesh.metrics.registered.set(lease.is_some() as i64);
        self.mesh.update_status(|s| {
            s.lease = lease.map(|l| l.id.clone());
            s.registration = lease.map(|l| l.endpoint.clone());
        });
    }

    fn failed(&mut self, what: &str, e: String, cap: Duration) {
        let retry_in = self.backoff.next_delay().min(cap);
        tracing::warn!(error = %e, retry_in = ?retry_in, "mesh registration: {what} failed; retrying");
        self.mesh
            .update_status(|s| s.last_registration_error = Some(format!("{what}: {e}")));
        self.next = Instant::now() + retry_in;
    }

    /// Moves toward `want`: deregister a stale registration, register, or heartbeat.
    async fn step(&mut self, want: Option<EndpointRegistration>) {
        if self.lease.as_ref().map(|l| &l.endpoint) != want.as_ref() && self.lease.is_some() {
            let why = if want.is_some() {
                "registration changed"
            } else {
                "registration file removed"
            };
            self.deregister(why).await;
            self.next = Instant::now();
        }
        let Some(want) = want else { return };
        if Instant::now() < self.next {
            return;
        }
        match &self.lease {
            None => self.register(want).await,
            Some(l) => {
                let (id, interval) = (l.id.clone(), l.interval);
                self.heartbeat(id, interval).await
            }
        }
    }

    async fn register(&mut self, endpoint: EndpointRegistration) {
        let req = RegisterRequest {
            endpoint: endpoint.clone(),
            lease_seconds: Some(self.lease_seconds),
        };
        let body = serde_json::to_vec(&req).unwrap_or_default();
        let resp = self
            .post("/v1/registry/register", body)
            .await
            .and_then(|b| {
                serde_json::from_slice::<RegisterResponse>(&b)
                    .map_err(|e| CallError::BadAnswer(e.to_string()))
            });
        match resp {
            Ok(r) => {
                let interval = heartbeat_interval(r.lease_seconds);
                tracing::info!(lease = %r.lease, lease_seconds = r.lease_seconds, address = %endpoint.address, capabilities = ?endpoint.capabilities, "registered in crank-control's registry");
                let lease = Lease {
                    id: r.lease,
                    endpoint,
                    interval,
                };
                self.set_registered(Some(&lease));
                self.mesh
                    .update_status(|s| s.last_registration_error = None);
                self.lease = Some(lease);
                self.backoff.reset();
                self.next = Instant::now() + interval;
            }
            Err(e) => self.failed("register", e.to_string(), Duration::from_secs(30)),
        }
    }

    async fn heartbeat(&mut self, id: String, interval: Duration) {
        let body = serde_json::to_vec(&LeaseRequest { lease: id.clone() }).unwrap_or_default();
        match self.post("/v1/registry/heartbeat", body).await {
            Ok(_) => {
                self.backoff.reset();
                self.mesh
                    .update_status(|s| s.last_registration_error = None);
                self.next = Instant::now() + interval;
            }
            Err(CallError::Refused { status: 404, .. }) => {
                tracing::warn!(lease = %id, "crank-control no longer knows this lease (it expired while unreachable); registering again");
                self.lease = None;
                self.set_registered(None);
                self.next = Instant::now();
            }
            Err(e) => self.failed("heartbeat", e.to_string(), interval),
        }
    }

    /// Best effort: a lease not removed expires by itself.
    async fn deregister(&mut self, why: &str) {
        let Some(l) = self.lease.take() else { return };
        self.set_registered(None);
        let body = serde_json::to_vec(&LeaseRequest {
            lease: l.id.clone(),
        })
        .unwrap_or_default();
        match self.post("/v1/registry/deregister", body).await {
            Ok(_) | Err(CallError::Refused { status: 404, .. }) => {
                tracing::info!(lease = %l.id, reason = why, "deregistered from crank-control's registry")
            }
            Err(e) => {
                tracing::warn!(lease = %l.id, reason = why, error = %e, "deregistration failed; the lease expires by itself")
            }
        }
    }
}

/// Runs until a stop request (SIGTERM), which deregisters and is answered.
pub async fn run(
    mesh: &Mesh,
    handles: &Handles,
    r: &MeshRegisterConfig,
    mut stop: mpsc::Receiver<oneshot::Sender<()>>,
) {
    // Register only once the listeners are up: peers are told to come here.
    while handles.health.not_ready_reason() == Some("starting") {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            Some(ack) = stop.recv() => { let _ = ack.send(()); return; }
        }
    }
    let Some(addr) = address(&handles.writer.running(), r) else {
        tracing::error!("mesh.register: no address (set mesh.register.address or inbound.listen); not registering");
        return;
    };
    let identity = handles.tls.identity.dns_name();
    let mut reg = Registrar {
        mesh,
        handles,
        lease_seconds: r.lease.as_secs().max(1),
        lease: None,
        next: Instant::now(),
        backoff: crate::enroll::schedule::backoff(Duration::from_secs(1), Duration::from_secs(30)),
    };
    let mut file_error: Option<String> = None;
    loop {
        let want = match desired(r, addr, &identity, &mesh.base) {
            Ok(w) => {
                file_error = None;
                w
            }
            Err(e) => {
                if file_error.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "mesh.register.from_file cannot be used; keeping the current registration");
                    file_error = Some(e);
                }
                reg.lease.as_ref().map(|l| l.endpoint.clone())
            }
        };
        reg.step(want).await;
        let wake = match r.from_file {
            Some(_) => reg.next.min(Instant::now() + FILE_CHECK),
            None => reg.next,
        };
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            Some(ack) = stop.recv() => {
                reg.deregister("draining").await;
                let _ = ack.send(());
                return;
            }
        }
    }
}

/// The drain signal with deregistration first: on SIGTERM or SIGINT this
/// workload leaves the registry (at most 2 s), then the signal is handed
/// to [`crate::drain::DrainSignal`], which turns readiness off and drains.
pub struct DeregisterFirst {
    pub mesh: Arc<Mesh>,
    pub drain: crate::drain::DrainSignal,
}

#[async_trait]
impl ShutdownSignalWatch for DeregisterFirst {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
        let raised = tokio::select! {
            _ = term.recv() => libc::SIGTERM,
            _ = int.recv() => libc::SIGINT,
        };
        tracing::info!("shutdown signal: deregistering from crank-control before draining");
        self.mesh.deregister_now(Duration::from_secs(2)).await;
        // The drain installs its own handlers when first polled (`biased`
        // polls it first); the same signal is then raised again for it.
        let drain = self.drain.recv();
        tokio::pin!(drain);
        let again = async {
            // SAFETY: raise(3) only sends a signal to this process; the
            // handlers installed above (tokio's) are async-signal-safe.
            unsafe { libc::raise(raised) };
            std::future::pending::<()>().await
        };
        tokio::select! {
            biased;
            s = &mut drain => s,
            _ = again => unreachable!("pending forever"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(extra: &str) -> MeshRegisterConfig {
        serde_yaml::from_str(&format!(
            "{{capabilities: [hello:v1], labels: {{gpu: none, zone: a}}{extra}}}"
        ))
        .unwrap()
    }

    const ADDR: &str = "10.0.0.7:4143";

    #[test]
    fn static_registration() {
        let r = reg("");
        assert_eq!(r.lease, Duration::from_secs(10));
        let d = tempfile::tempdir().unwrap();
        let e = desired(&r, ADDR.parse().unwrap(), "web.acme.crank.local", d.path())
            .unwrap()
            .unwrap();
        assert_eq!(e.address.to_string(), ADDR);
        assert_eq!(e.identity, "web.acme.crank.local");
        assert_eq!(e.capabilities, vec!["hello:v1"]);
        assert_eq!(e.labels["gpu"], "none");
    }

    #[test]
    fn shim_file_adds_capabilities_and_its_labels_win() {
        let d = tempfile::tempdir().unwrap();
        let r = reg(", from_file: shim.json");
        let want = |d: &Path| desired(&r, ADDR.parse().unwrap(), "w.t.crank.local", d);
        // absent: not registered
        assert_eq!(want(d.path()).unwrap(), None);
        // what crank-shim's FileRegistrar writes
        std::fs::write(
            d.path().join("shim.json"),
            r#"{"mode": "serve", "address": "127.0.0.1:9000", "identity": "w.t", "capabilities": ["transcode:v1", "hello:v1"], "labels": {"gpu": "nvidia"}}"#,
        )
        .unwrap();
        let e = want(d.path()).unwrap().unwrap();
        assert_eq!(e.capabilities, vec!["hello:v1", "transcode:v1"]);
        assert_eq!(e.labels["gpu"], "nvidia");
        assert_eq!(e.labels["zone"], "a");
        assert_eq!(
            e.address.to_string(),
            ADDR,
            "the shim's own address is not the peers'"
        );
        // unreadable JSON is an error (the current registration is kept)
        std::fs::write(d.path().join("shim.json"), "{").unwrap();
        assert!(want(d.path()).unwrap_err().contains("shim.json"));
    }

    #[test]
    fn shim_file_fields_are_optional() {
        assert_eq!(parse_shim_file(b"{}").unwrap(), ShimFile::default());
    }

    #[test]
    fn heartbeats_every_third_of_the_lease() {
        assert_eq!(heartbeat_interval(9), Duration::from_secs(3));
        assert_eq!(heartbeat_interval(10).as_millis(), 3333);
        assert_eq!(heartbeat_interval(1).as_millis(), 333);
        assert_eq!(heartbeat_interval(0).as_millis(), 333);
    }

    #[test]
    fn address_defaults_to_inbound_listen() {
        let c = crate::config::parse("p.yaml", "identity: {cert: a, key: b, trust_bundle: c}\nadmin: {listen: 127.0.0.1:1}\ninbound: {listen: 127.0.0.1:4143, app: 127.0.0.1:8080}\n").unwrap();
        assert_eq!(address(&c, &reg("")).unwrap().to_string(), "127.0.0.1:4143");
        assert_eq!(
            address(&c, &reg(", address: \"10.0.0.7:4143\""))
                .unwrap()
                .to_string(),
            ADDR
        );
    }
}
