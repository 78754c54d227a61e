//! The identity agent's HTTP client for crank-control's workload API: one
//! fresh TCP + TLS 1.3 connection per call (so the client certificate
//! presented is always the current one), HTTP/1.1, JSON bodies.
//!
//! crank-control may run as several replicas (`identity.enroll.control_plane`
//! is a list, or a host with several addresses): a call goes to the
//! replica that answered last, and moves on to the next address when that
//! one cannot be reached or answers 5xx, in the same call. A POST (enroll
//! with a one-time token, renew, register) whose request was sent but got
//! no answer is not replayed on another replica: the first may have acted
//! on it, so the error goes back to the caller and its backoff. Callers keep
//! their backoff for when every replica fails, and resend the versions
//! they hold (watches), so a move to another replica is no resync. Metrics:
//! `crank_control_plane_connected{address}` and
//! `crank_control_plane_failovers_total` ([`register_metrics`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use crank_api::identity::ApiError;
use crank_api::proxy::ControlPlane;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use prometheus::{IntCounter, IntGaugeVec, Opts};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

/// Largest answer accepted from crank-control.
const MAX_BODY: usize = 1 << 20;

/// Why a call to crank-control failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// TCP connect failed or timed out: crank-control is away. Retried.
    #[error("cannot connect to crank-control at {addr}: {detail}")]
    Connect { addr: String, detail: String },
    /// The TLS handshake or the HTTP exchange failed. Retried.
    #[error("talking to crank-control at {addr} failed: {detail}")]
    Transport { addr: String, detail: String },
    /// crank-control answered with an error (`{error, message}`).
    #[error("crank-control refused ({status} {code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    /// The answer was not what the API promises.
    #[error("crank-control sent an answer this proxy cannot read: {0}")]
    BadAnswer(String),
}

impl CallError {
    /// A 4xx refusal: retrying the same request will not help.
    pub fn is_refusal(&self) -> bool {
        matches!(self, CallError::Refused { status, .. } if (400..500).contains(status))
    }
}

/// The client certificate to present (renew, watch).
pub struct ClientCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// What [`Client::new`] accepts as crank-control's addresses.
pub trait Addresses {
    fn to_addresses(&self) -> Vec<String>;
}

impl Addresses for str {
    fn to_addresses(&self) -> Vec<String> {
        vec![self.to_string()]
    }
}

impl Addresses for String {
    fn to_addresses(&self) -> Vec<String> {
        vec![self.clone()]
    }
}

impl Addresses for ControlPlane {
    fn to_addresses(&self) -> Vec<String> {
        self.addresses().to_vec()
    }
}

impl Addresses for [String] {
    fn to_addresses(&self) -> Vec<String> {
        self.to_vec()
    }
}

/// Where crank-control's replicas are and how long to wait for them.
/// Clones share the replica in use.
#[derive(Debug, Clone)]
pub struct Client {
    addrs: Arc<Vec<String>>,
    /// Index, in the resolved addresses, of the replica that answered last.
    current: Arc<AtomicUsize>,
    pub server_name: ServerName<'static>,
    pub connect_timeout: Duration,
}

/// The process's control-plane connection metrics (every client shares them).
struct ControlPlaneMetrics {
    connected: IntGaugeVec,
    failovers: IntCounter,
}

static METRICS: LazyLock<ControlPlaneMetrics> = LazyLock::new(|| ControlPlaneMetrics {
    connected: IntGaugeVec::new(
        Opts::new(
            "crank_control_plane_connected",
            "1 for the crank-control address the last call reached, 0 for one that failed",
        ),
        &["address"],
    )
    .expect("static metric"),
    failovers: IntCounter::new(
        "crank_control_plane_failovers_total",
        "Calls that moved to another crank-control replica because the one in use failed",
    )
    .expect("static metric"),
});

/// Exports the control-plane connection metrics in `registry` (again on
/// the same registry: ignored).
pub fn register_metrics(registry: &prometheus::Registry) {
    let _ = registry.register(Box::new(METRICS.connected.clone()));
    let _ = registry.register(Box::new(METRICS.failovers.clone()));
}

/// Worth trying another replica: it could not be reached, or failed
/// itself. A request that was sent without an answer is retried elsewhere
/// only when `method` is idempotent.
fn replica_failed(e: &CallError, sent: bool, method: &http::Method) -> bool {
    match e {
        CallError::Connect { .. } => true,
        CallError::Transport { .. } => !sent || method.is_idempotent(),
        CallError::Refused { status, .. } => *status >= 500,
        CallError::BadAnswer(_) => false,
    }
}

impl Client {
    pub fn new<A: Addresses + ?Sized>(addrs: &A, server_name: &str) -> Result<Client, String> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("server name {server_name:?}: {e}"))?;
        let addrs = addrs.to_addresses();
        if addrs.is_empty() {
            return Err("no crank-control address: give identity.enroll.control_plane".into());
        }
        Ok(Client {
            addrs: Arc::new(addrs),
            current: Arc::new(AtomicUsize::new(0)),
            server_name,
            connect_timeout: Duration::from_secs(5),
        })
    }

    /// The configured addresses, each host resolved to all its addresses
    /// (in the resolver's order); an address that does not resolve stays
    /// as written, so that the call fails naming it.
    async fn resolved(&self) -> Vec<String> {
        let mut out = Vec::new();
        for a in self.addrs.iter() {
            if a.parse::<std::net::SocketAddr>().is_ok() {
                out.push(a.clone());
                continue;
            }
            match tokio::net::lookup_host(a.as_str()).await {
                Ok(found) => {
                    let before = out.len();
                    out.extend(found.map(|s| s.to_string()));
                    if out.len() == before {
                        out.push(a.clone());
                    }
                }
                Err(_) => out.push(a.clone()),
            }
        }
        out
    }

    /// One call: `method path` with an optional JSON body, the server
    /// verified against `roots`. Returns the 2xx body; an error answer
    /// becomes [`CallError::Refused`] with crank-control's code and message.
    /// Starts at the replica that answered last and moves on while one
    /// cannot be reached or answers 5xx; the last failure when none answers.
    pub async fn call(
        &self,
        roots: &[CertificateDer<'static>],
        cert: Option<&ClientCert>,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        let targets = self.resolved().await;
        let n = targets.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for i in 0..n {
            let at = (start + i) % n;
            let addr = &targets[at];
            let attempt = Attempt {
                addr,
                roots,
                cert,
                path,
                timeout,
            };
            let sent = std::cell::Cell::new(false);
            match self
                .call_one(attempt, method.clone(), body.clone(), &sent)
                .await
            {
                Err(e) if replica_failed(&e, sent.get(), &method) => {
                    METRICS.connected.with_label_values(&[addr]).set(0);
                    if n > 1 {
                        tracing::warn!(address = %addr, error = %e, "crank-control replica failed; trying the next one");
                    }
                    last = Some(e);
                }
                answered => {
                    if i > 0 {
                        METRICS.failovers.inc();
                        tracing::info!(address = %addr, "now talking to this crank-control replica");
                    }
                    METRICS.connected.with_label_values(&[addr]).set(1);
                    self.current.store(at, Ordering::Relaxed);
                    return answered;
                }
            }
        }
        // The next call (after the caller's backoff) starts one further on.
        self.current.store((start + 1) % n, Ordering::Relaxed);
        Err(last.unwrap_or_else(|| CallError::BadAnswer("no crank-control address".into())))
    }

    /// The call to one replica; `sent` turns true once the request may
    /// have reached it.
    async fn call_one(
        &self,
        a: Attempt<'_>,
        method: http::Method,
        body: Option<Vec<u8>>,
        sent: &std::cell::Cell<bool>,
    ) -> Result<Bytes, CallError> {
        let transport = |detail: String| CallError::Transport {
            addr: a.addr.to_string(),
            detail,
        };
        let config = tls_config(a.roots, a.cert).map_err(transport)?;
        let exchange = async {
            let tcp =
                tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(a.addr))
                    .await
                    .map_err(|_| CallError::Connect {
                        addr: a.addr.to_string(),
                        detail: format!("no connection within {:?}", self.connect_timeout),
                    })?
                    .map_err(|e| CallError::Connect {
                        addr: a.addr.to_string(),
                        detail: e.to_string(),
                    })?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| transport(format!("TLS: {e}")))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| transport(e.to_string()))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut req = http::Request::builder()
                .method(method)
                .uri(a.path)
                .header(http::header::HOST, self.server_name.to_str().as_ref());
            if body.is_some() {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
            }
            let req = req
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| transport(e.to_string()))?;
            sent.set(true);
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| transport(e.to_string()))?;
            let status = resp.status().as_u16();
            let bytes = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| transport(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(a.timeout, exchange)
            .await
            .map_err(|_| transport(format!("no answer within {:?}", a.timeout)))??;
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        Err(refusal(status, &bytes))
    }

    /// `POST path` with a JSON body; the answer decoded as `T`.
    pub async fn post_json<Req: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        roots: &[CertificateDer<'static>],
        cert: Option<&ClientCert>,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<T, CallError> {
        let body = serde_json::to_vec(body).map_err(|e| CallError::BadAnswer(e.to_string()))?;
        let bytes = self
            .call(roots, cert, http::Method::POST, path, Some(body), timeout)
            .await?;
        decode(&bytes)
    }

    /// `GET path`; the answer decoded as `T`.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        roots: &[CertificateDer<'static>],
        cert: Option<&ClientCert>,
        path: &str,
        timeout: Duration,
    ) -> Result<T, CallError> {
        let bytes = self
            .call(roots, cert, http::Method::GET, path, None, timeout)
            .await?;
        decode(&bytes)
    }
}

/// One replica's call: where, with what trust, which path, how long.
struct Attempt<'a> {
    addr: &'a str,
    roots: &'a [CertificateDer<'static>],
    cert: Option<&'a ClientCert>,
    path: &'a str,
    timeout: Duration,
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, CallError> {
    serde_json::from_slice(bytes).map_err(|e| CallError::BadAnswer(e.to_string()))
}

/// An error answer: crank-control's `{error, message}`, or the raw text.
pub fn refusal(status: u16, body: &[u8]) -> CallError {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(e) => CallError::Refused {
            status,
            code: e.error,
            message: e.message,
        },
        Err(_) => CallError::Refused {
            status,
            code: "unknown".into(),
            message: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
        },
    }
}

/// TLS 1.3 only, ring, the given roots, ALPN http/1.1.
fn tls_config(
    roots: &[CertificateDer<'static>],
    cert: Option<&ClientCert>,
) -> Result<ClientConfig, String> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store
            .add(r.clone())
            .map_err(|e| format!("a root of the trust bundle is unusable: {e}"))?;
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(store);
    let mut config = match cert {
        Some(c) => builder
            .with_client_auth_cert(c.chain.clone(), c.key.clone_key())
            .map_err(|e| format!("our client certificate is unusable: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    use crank_certs::Ca;

    use super::*;

    /// A crank-control replica that answers every request with `status`
    /// and counts them.
    struct Replica {
        addr: SocketAddr,
        calls: Arc<AtomicUsize>,
        _rt: tokio::runtime::Runtime,
    }

    fn replica(root: &Ca, status: u16) -> Replica {
        let acceptor = crate::enroll::tests::control_acceptor(root);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        rt.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, counted) = (acceptor.clone(), counted.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |_req| {
                        counted.fetch_add(1, Ordering::SeqCst);
                        let body = format!(r#"{{"error":"e{status}","message":"m"}}"#);
                        async move {
                            if status == 0 {
                                // Takes the request and never answers.
                                std::future::pending::<()>().await;
                            }
                            http::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(body)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Replica {
            addr,
            calls,
            _rt: rt,
        }
    }

    /// An address nothing listens on.
    fn dead() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    fn get(client: &Client, root: &Ca) -> Result<Bytes, CallError> {
        let roots = crank_certs::pem::certs_from_pem(root.cert_pem().as_bytes()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(client.call(
            &roots,
            None,
            http::Method::GET,
            "/v1/mesh/watch?seq=3",
            None,
            Duration::from_secs(5),
        ))
    }

    #[test]
    fn a_call_moves_past_dead_and_failing_replicas_and_stays_on_the_one_that_answers() {
        let root = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
        let failing = replica(&root, 503);
        let live = replica(&root, 200);
        let addrs = vec![dead(), failing.addr.to_string(), live.addr.to_string()];
        let client = Client::new(addrs.as_slice(), "control.crank-system.crank.local").unwrap();
        let failovers = METRICS.failovers.get();
        get(&client, &root).unwrap();
        assert_eq!(failing.calls.load(Ordering::SeqCst), 1);
        assert_eq!(live.calls.load(Ordering::SeqCst), 1);
        assert!(METRICS.failovers.get() > failovers);
        let connected =
            |a: &SocketAddr| METRICS.connected.with_label_values(&[&a.to_string()]).get();
        assert_eq!((connected(&failing.addr), connected(&live.addr)), (0, 1));
        // The next call goes straight to the replica that answered.
        get(&client.clone(), &root).unwrap();
        assert_eq!(failing.calls.load(Ordering::SeqCst), 1);
        assert_eq!(live.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_dns_name_is_resolved_and_its_addresses_are_tried_in_turn() {
        let root = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
        let live = replica(&root, 200);
        let name = format!("localhost:{}", live.addr.port());
        let client = Client::new(
            &[dead(), name].to_vec()[..],
            "control.crank-system.crank.local",
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let resolved = rt.block_on(client.resolved());
        assert!(
            resolved.contains(&live.addr.to_string()),
            "the name becomes its addresses: {resolved:?}"
        );
        get(&client, &root).unwrap();
        assert_eq!(live.calls.load(Ordering::SeqCst), 1);
        let connected = METRICS
            .connected
            .with_label_values(&[&live.addr.to_string()])
            .get();
        assert_eq!(connected, 1, "the replica is known by its address");
    }

    #[test]
    fn a_post_sent_without_an_answer_is_not_replayed_on_another_replica() {
        let root = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
        let silent = replica(&root, 0);
        let live = replica(&root, 200);
        let addrs = vec![silent.addr.to_string(), live.addr.to_string()];
        let client = Client::new(addrs.as_slice(), "control.crank-system.crank.local").unwrap();
        let roots = crank_certs::pem::certs_from_pem(root.cert_pem().as_bytes()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let call = |method: http::Method| {
            rt.block_on(client.call(
                &roots,
                None,
                method,
                "/v1/identity/enroll",
                Some(b"{}".to_vec()),
                Duration::from_millis(300),
            ))
        };
        let e = call(http::Method::POST).unwrap_err();
        assert!(matches!(e, CallError::Transport { .. }), "{e}");
        assert_eq!(silent.calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            live.calls.load(Ordering::SeqCst),
            0,
            "a one-time token must not be sent twice"
        );
        // An idempotent call still moves on.
        call(http::Method::GET).unwrap();
        assert_eq!(live.calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_refusal_is_an_answer_and_no_replica_left_is_the_last_failure() {
        let root = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
        let refusing = replica(&root, 403);
        let live = replica(&root, 200);
        let addrs = vec![refusing.addr.to_string(), live.addr.to_string()];
        let client = Client::new(addrs.as_slice(), "control.crank-system.crank.local").unwrap();
        let e = get(&client, &root).unwrap_err();
        assert!(e.is_refusal(), "{e}");
        assert_eq!(live.calls.load(Ordering::SeqCst), 0, "a 4xx is not retried");

        let (one, two) = (dead(), dead());
        let client = Client::new(
            [one, two.clone()].as_slice(),
            "control.crank-system.crank.local",
        )
        .unwrap();
        match get(&client, &root).unwrap_err() {
            CallError::Connect { addr, .. } => assert_eq!(addr, two),
            other => panic!("expected Connect, got {other}"),
        }
    }

    #[test]
    fn one_address_or_a_list_parses_and_shows_as_written() {
        let one: ControlPlane = serde_yaml::from_str("\"10.0.0.1:8443\"").unwrap();
        assert_eq!(one.addresses(), ["10.0.0.1:8443"]);
        assert_eq!(serde_json::to_string(&one).unwrap(), "\"10.0.0.1:8443\"");
        let two: ControlPlane = serde_yaml::from_str("[\"a:1\", \"b:2\"]").unwrap();
        assert_eq!(two.to_string(), "a:1, b:2");
        assert_eq!(serde_json::to_string(&two).unwrap(), "[\"a:1\",\"b:2\"]");
        let e = serde_yaml::from_str::<ControlPlane>("{a: 1}").unwrap_err();
        assert!(e.to_string().contains("host:port"), "{e}");
        assert!(Client::new([].as_slice() as &[String], "x.example").is_err());
    }
}
