//! The identity agent's HTTP client for crank-control's workload API: one
//! fresh TCP + TLS 1.3 connection per call (so the client certificate
//! presented is always the current one), HTTP/1.1, JSON bodies.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crank_api::identity::ApiError;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
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

/// Where crank-control is and how long to wait for it.
#[derive(Debug, Clone)]
pub struct Client {
    pub addr: String,
    pub server_name: ServerName<'static>,
    pub connect_timeout: Duration,
}

impl Client {
    pub fn new(addr: &str, server_name: &str) -> Result<Client, String> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("server name {server_name:?}: {e}"))?;
        Ok(Client {
            addr: addr.to_string(),
            server_name,
            connect_timeout: Duration::from_secs(5),
        })
    }

    /// One call: `method path` with an optional JSON body, the server
    /// verified against `roots`. Returns the 2xx body; an error answer
    /// becomes [`CallError::Refused`] with crank-control's code and message.
    pub async fn call(
        &self,
        roots: &[CertificateDer<'static>],
        cert: Option<&ClientCert>,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        let transport = |detail: String| CallError::Transport {
            addr: self.addr.clone(),
            detail,
        };
        let config = tls_config(roots, cert).map_err(transport)?;
        let exchange = async {
            let tcp = tokio::time::timeout(
                self.connect_timeout,
                tokio::net::TcpStream::connect(&self.addr),
            )
            .await
            .map_err(|_| CallError::Connect {
                addr: self.addr.clone(),
                detail: format!("no connection within {:?}", self.connect_timeout),
            })?
            .map_err(|e| CallError::Connect {
                addr: self.addr.clone(),
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
                .uri(path)
                .header(http::header::HOST, self.server_name.to_str().as_ref());
            if body.is_some() {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
            }
            let req = req
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| transport(e.to_string()))?;
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
        let (status, bytes) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| transport(format!("no answer within {timeout:?}")))??;
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
