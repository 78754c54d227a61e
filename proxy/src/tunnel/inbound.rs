//! The inbound side of a tunnel: the peer sidecar's verified identity,
//! the local server (`inbound.tcp`) and the connection-level policy
//! decide; then the tunnel is spliced to the local server.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use crank_api::proxy::InboundTcpConfig;
use pingora_core::protocols::{Digest, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::header::{self, Header, Reply};
use super::{Ended, Record, Slot};
use crate::direction::Direction;
use crate::policy::facts::ConnectionFacts;
use crate::runtime::Runtime;

/// The inbound listener's [`crate::conn::Divert`] for tunnels.
pub struct InboundTunnel {
    rt: Arc<Runtime>,
}

impl InboundTunnel {
    pub fn new(rt: Arc<Runtime>) -> Self {
        InboundTunnel { rt }
    }
}

#[async_trait]
impl crate::conn::Divert for InboundTunnel {
    fn claims(&self, first: &[u8]) -> bool {
        first.first() == Some(&header::MAGIC[0])
    }

    async fn serve(&self, stream: Stream, read_ahead: Bytes) {
        serve(&self.rt, stream, read_ahead).await;
    }
}

/// Why a tunnel was refused: the reply's error (and the outcome label).
struct Refused {
    outcome: &'static str,
    detail: String,
}

fn refused(outcome: &'static str, detail: impl Into<String>) -> Refused {
    Refused {
        outcome,
        detail: detail.into(),
    }
}

async fn serve(rt: &Runtime, mut stream: Stream, read_ahead: Bytes) -> Ended {
    let mut rec = Record::new(rt, "inbound");
    rec.destination = Some(rt.me.spiffe_id.clone());
    let (hdr, rest) = match read_header(rt, &mut stream, read_ahead).await {
        Ok(h) => h,
        Err(detail) => {
            tracing::info!(
                detail,
                "closed an inbound connection that is not a valid tunnel"
            );
            return rec.finish("protocol-error", 0, 0, &detail);
        }
    };
    rec.original_destination = hdr.destination;
    rec.capability = hdr.capability.clone();
    let slot = Slot::take(rt, "inbound");
    let admitted = match slot {
        None => Err(refused(
            "limit",
            "tunnel.max_connections tunnels are open on the peer",
        )),
        Some(_) => admit(rt, &stream, &hdr, &mut rec),
    };
    let app = match admitted {
        Ok(app) => connect_app(rt, app).await,
        Err(r) => Err(r),
    };
    let app = match app {
        Ok(a) => a,
        Err(r) => {
            tracing::warn!(outcome = r.outcome, detail = %r.detail, source = rec.source.as_deref(), "refused an opaque TCP tunnel");
            let _ = stream
                .write_all(&header::encode_reply(&Reply::refused(r.outcome, &r.detail)))
                .await;
            let _ = stream.shutdown().await;
            return rec.finish(r.outcome, 0, 0, &r.detail);
        }
    };
    let mut app = app;
    let opened = async {
        stream
            .write_all(&header::encode_reply(&Reply::open()))
            .await?;
        stream.flush().await?;
        app.write_all(&rest).await
    };
    if opened.await.is_err() {
        return rec.finish("client-error", 0, 0, "writing the reply or the first bytes");
    }
    let idle = rt.config.load().tunnel.idle_timeout;
    let s = super::splice::splice(stream, app, idle).await;
    drop(slot);
    rec.finish(
        s.reason.as_str(),
        s.sent + rest.len() as u64,
        s.received,
        "",
    )
}

/// Reads the tunnel header within `limits.request_head_timeout`; returns it
/// and the app bytes that followed it.
async fn read_header(
    rt: &Runtime,
    stream: &mut Stream,
    read_ahead: Bytes,
) -> Result<(Header, Bytes), String> {
    let wait = rt.config.load().limits.request_head_timeout;
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = read_ahead.to_vec();
    let mut chunk = [0u8; 2048];
    loop {
        if let Some((h, used)) = header::parse_header(&buf).map_err(|e| e.to_string())? {
            return Ok((h, Bytes::copy_from_slice(&buf[used..])));
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) => return Err("closed before the tunnel header was complete".into()),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(format!("reading the tunnel header: {e}")),
            Err(_) => {
                return Err(format!(
                    "tunnel header not complete within {wait:?} (limits.request_head_timeout)"
                ))
            }
        }
    }
}

/// The peer's identity, the local server and the policy: the server's
/// address, or why not.
fn admit(
    rt: &Runtime,
    stream: &Stream,
    hdr: &Header,
    rec: &mut Record<'_>,
) -> Result<SocketAddr, Refused> {
    let digest = Digest {
        ssl_digest: stream.get_ssl_digest(),
        ..Default::default()
    };
    let (peer, refusal) = crate::identity::admit::inbound_peer(Some(&digest), &rt.tls);
    rec.source = peer.as_ref().map(|p| p.spiffe_id.clone());
    if let Some(r) = refusal {
        return Err(refused(
            "peer-unverified",
            format!("{}: {}", r.reason.as_str(), r.detail),
        ));
    }
    let cfg = rt.config.load();
    let tcp = cfg.inbound.as_ref().map_or(&[][..], |i| &i.tcp[..]);
    let entry = local_upstream(tcp, hdr).map_err(|e| match e {
        Unserved::Nothing => refused(
            "no-local-upstream",
            format!(
                "no inbound.tcp entry serves capability {:?} or port {:?}; add one to the server's sidecar config",
                hdr.capability,
                hdr.destination.map(|d| d.port())
            ),
        ),
        Unserved::Mismatch { port, serves } => refused(
            "capability-mismatch",
            format!(
                "the caller claims capability {:?} but port {port} serves {serves:?}; the caller's route must name the capability of the server on that port",
                hdr.capability
            ),
        ),
    })?;
    let app = entry.app;
    // Policy decides on the capability this sidecar serves there, never
    // on the caller's claim alone.
    rec.capability = entry.capability.clone().or_else(|| hdr.capability.clone());
    let facts = ConnectionFacts {
        source: peer.map(|p| crank_policy::Workload {
            spiffe_id: p.spiffe_id.clone(),
            service: p.service.clone(),
            tenant: p.tenant.clone(),
            trust_domain: p.trust_domain.clone(),
        }),
        source_address: stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied()),
        destination: rt.me.clone(),
        capability: entry.capability.clone(),
        original_destination: hdr.destination,
        app,
    };
    policy(rt, &facts)?;
    Ok(app)
}

/// Why no local server takes a tunnel.
#[derive(Debug, PartialEq, Eq)]
pub enum Unserved {
    /// No entry on the destination's port or with the claimed capability.
    Nothing,
    /// The entry on the destination's port serves another capability.
    Mismatch { port: u16, serves: String },
}

/// The local server a tunnel reaches. With a destination, the entry on
/// its exact port, which must serve the claimed capability (an entry with
/// none takes any claim, and policy then sees none); a different
/// capability there is refused, never passed on to another entry. With no
/// entry on that port (or no destination: an `outbound.tcp` port), the
/// entry with the claimed capability.
pub fn local_upstream<'a>(
    tcp: &'a [InboundTcpConfig],
    hdr: &Header,
) -> Result<&'a InboundTcpConfig, Unserved> {
    let by_port = hdr
        .destination
        .and_then(|d| tcp.iter().find(|t| t.app.port() == d.port()));
    if let Some(t) = by_port {
        return match (&t.capability, &hdr.capability) {
            (Some(serves), Some(claim)) if serves != claim => Err(Unserved::Mismatch {
                port: t.app.port(),
                serves: serves.clone(),
            }),
            _ => Ok(t),
        };
    }
    hdr.capability
        .as_ref()
        .and_then(|c| tcp.iter().find(|t| t.capability.as_ref() == Some(c)))
        .ok_or(Unserved::Nothing)
}

/// The inbound policy on the connection's facts (`input.connection`), as
/// for every connection-level decision ([`super::policy`]).
fn policy(rt: &Runtime, facts: &ConnectionFacts) -> Result<(), Refused> {
    let Some(handle) = rt.policies.for_direction(Direction::Inbound) else {
        return Ok(());
    };
    super::policy::decide(rt, handle, facts, Direction::Inbound, None)
        .map_err(|d| refused(d.outcome, d.detail))
}

/// Connects to the local server within `timeouts.connect`.
async fn connect_app(rt: &Runtime, app: SocketAddr) -> Result<TcpStream, Refused> {
    let wait = rt.config.load().timeouts.connect;
    match tokio::time::timeout(wait, TcpStream::connect(app)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(refused(
            "app-unreachable",
            format!("connecting to {app}: {e}"),
        )),
        Err(_) => Err(refused(
            "app-unreachable",
            format!("connecting to {app}: no answer within {wait:?} (timeouts.connect)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_server_is_the_one_on_the_port_and_must_serve_the_claim() {
        let entry = |app: &str, cap: Option<&str>| InboundTcpConfig {
            app: app.parse().unwrap(),
            capability: cap.map(String::from),
        };
        let tcp = vec![
            entry("127.0.0.1:5432", Some("db:postgres")),
            entry("127.0.0.1:2525", Some("mail:smtp")),
            entry("127.0.0.1:7000", None),
        ];
        let h = |cap: Option<&str>, dest: Option<&str>| Header {
            capability: cap.map(String::from),
            destination: dest.map(|d| d.parse().unwrap()),
        };
        let mismatch = |port, serves: &str| {
            Err(Unserved::Mismatch {
                port,
                serves: serves.into(),
            })
        };
        let cases: Vec<(Header, Result<&str, Unserved>)> = vec![
            // No destination (an outbound.tcp port): by capability.
            (h(Some("db:postgres"), None), Ok("127.0.0.1:5432")),
            (h(Some("mail:smtp"), None), Ok("127.0.0.1:2525")),
            // Each service on its own port behind one sidecar.
            (
                h(Some("db:postgres"), Some("10.0.0.3:5432")),
                Ok("127.0.0.1:5432"),
            ),
            (
                h(Some("mail:smtp"), Some("10.0.0.3:2525")),
                Ok("127.0.0.1:2525"),
            ),
            (h(None, Some("10.0.0.3:5432")), Ok("127.0.0.1:5432")),
            // A claim of one capability at another server's port: refused,
            // not sent to the claimed server nor to the port's.
            (
                h(Some("mail:smtp"), Some("10.0.0.3:5432")),
                mismatch(5432, "db:postgres"),
            ),
            (
                h(Some("db:postgres"), Some("10.0.0.3:2525")),
                mismatch(2525, "mail:smtp"),
            ),
            // An entry without a capability takes any claim on its port.
            (h(Some("echo"), Some("10.0.0.3:7000")), Ok("127.0.0.1:7000")),
            // No entry on the port: the claimed capability's entry.
            (
                h(Some("db:postgres"), Some("10.96.0.10:15432")),
                Ok("127.0.0.1:5432"),
            ),
            (h(Some("nope"), None), Err(Unserved::Nothing)),
            (h(None, Some("10.0.0.3:22")), Err(Unserved::Nothing)),
        ];
        for (hdr, want) in cases {
            let got = local_upstream(&tcp, &hdr).map(|t| t.app);
            assert_eq!(got, want.map(|w| w.parse().unwrap()), "{hdr:?}");
        }
    }
}
