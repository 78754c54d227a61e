//! The outbound side of a tunnel: the app's connection → mTLS to the
//! sidecar serving the capability, header first, then the splice. Also
//! the `outbound.tcp` ports, whose connections all go to one capability.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::apps::ServerApp;
use pingora_core::connectors::TransportConnector;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use pingora_core::upstreams::peer::HttpPeer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::header::{self, Header};
use super::{Ended, Record, Slot};
use crate::routing::{Endpoint, Route, RouteTable};
use crate::runtime::Runtime;

/// Where a tunnelled connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TunnelTarget {
    /// The address the app connected to (captured traffic); `None` for an
    /// `outbound.tcp` port.
    pub destination: Option<SocketAddr>,
    /// The capability claimed to the peer (a route's `capability`, or its
    /// name). `None`: the route with an endpoint on the destination's host,
    /// and no claim: the peer serves the port that was dialled.
    pub capability: Option<String>,
}

/// A tunnel that did not open: its outcome label and why.
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

/// Carries `client` (whose first bytes, already read, are `prefix`) to
/// `target` over an opaque TCP tunnel, if the outbound policy (when one is
/// set) allows it, until both sides close, one fails,
/// or the tunnel is idle for `tunnel.idle_timeout`. Logs and counts it.
/// A tunnel that cannot open closes `client` (no byte is written to it).
pub async fn outbound<C>(
    rt: Arc<Runtime>,
    mut client: C,
    prefix: Bytes,
    target: TunnelTarget,
) -> Ended
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut rec = Record::new(&rt, "outbound");
    rec.source = Some(rt.me.spiffe_id.clone());
    rec.original_destination = target.destination;
    rec.capability = target.capability.clone();
    let Some(_slot) = Slot::take(&rt, "outbound") else {
        let _ = client.shutdown().await;
        return rec.finish("limit", 0, 0, "tunnel.max_connections tunnels are open");
    };
    // The outbound policy, when one is set, on the connection's facts.
    let claim = target.capability.clone();
    if let Err(d) = super::policy::outbound(&rt, target.destination, claim, None) {
        tracing::warn!(outcome = d.outcome, detail = %d.detail, destination = ?target.destination, capability = ?target.capability, "refused an opaque TCP connection: the outbound policy denies it");
        let _ = client.shutdown().await;
        return rec.finish(d.outcome, 0, 0, &d.detail);
    }
    let (server, early) = match open(&rt, &target, &prefix, &mut rec).await {
        Ok(s) => s,
        Err(r) => {
            let _ = client.shutdown().await;
            return rec.finish(r.outcome, 0, 0, &r.detail);
        }
    };
    // App bytes that came with the reply (a server-speaks-first banner).
    if deliver_early(&mut client, &early).await.is_err() {
        return rec.finish("client-error", prefix.len() as u64, 0, "");
    }
    let idle = rt.config.load().tunnel.idle_timeout;
    let s = super::splice::splice(client, server, idle).await;
    let sent = s.sent + prefix.len() as u64;
    let received = s.received + early.len() as u64;
    rec.finish(s.reason.as_str(), sent, received, "")
}

/// Writes the app bytes that came with the peer's reply (a
/// server-speaks-first banner) to the client, and flushes them. The client
/// stream may buffer writes (Pingora's L4 stream holds up to 1460 bytes
/// until a flush), and the splice that follows flushes only what it writes
/// itself: an unflushed banner waited for the server's next bytes, which a
/// server-speaks-first protocol sends only after the client answers it.
async fn deliver_early<C>(client: &mut C, early: &[u8]) -> std::io::Result<()>
where
    C: AsyncWrite + Unpin,
{
    if early.is_empty() {
        return Ok(());
    }
    client.write_all(early).await?;
    client.flush().await
}

/// Opens the tunnel: route, endpoint, mTLS, header, reply. Returns the
/// stream and any app bytes read past the reply.
async fn open(
    rt: &Runtime,
    target: &TunnelTarget,
    prefix: &[u8],
    rec: &mut Record<'_>,
) -> Result<(Stream, Bytes), Refused> {
    if let Err(r) = crate::identity::admit::own_cert(&rt.health, &rt.me.spiffe_id) {
        return Err(refused("own-cert-unusable", r.detail));
    }
    let route = find_route(&rt.routes.load(), target).ok_or_else(|| {
        refused(
            "no-route",
            format!(
                "no route serves capability {:?} or destination {:?}; add a route whose capability or name it is",
                target.capability, target.destination
            ),
        )
    })?;
    rec.capability = target
        .capability
        .clone()
        .or_else(|| route.capability.clone())
        .or_else(|| Some(route.name.clone()));
    let ep = endpoint(&route, target.destination).ok_or_else(|| {
        refused(
            "no-endpoint",
            format!("route {} has no endpoint", route.name),
        )
    })?;
    rec.upstream = Some(ep.address);
    rec.destination = Some(ep.identity.spiffe_id());
    let mut stream = connect(rt, ep).await?;
    // No claim (a captured call to a host several routes share): the peer
    // serves the dialled port; the route's capability only labels the log.
    let hdr = Header {
        destination: target.destination,
        capability: target.capability.clone(),
    };
    let mut first = header::encode_header(&hdr);
    first.extend_from_slice(prefix);
    stream
        .write_all(&first)
        .await
        .map_err(|e| refused("connect-failed", format!("writing the tunnel header: {e}")))?;
    stream
        .flush()
        .await
        .map_err(|e| refused("connect-failed", format!("writing the tunnel header: {e}")))?;
    let early = read_reply(rt, &mut stream).await?;
    Ok((stream, early))
}

/// mTLS to the peer sidecar: our client certificate, the bundle as CA, the
/// endpoint's identity as SNI (as the HTTP path), a revoked peer refused.
async fn connect(rt: &Runtime, ep: &Endpoint) -> Result<Stream, Refused> {
    static CONNECTOR: OnceLock<TransportConnector> = OnceLock::new();
    let connector = CONNECTOR.get_or_init(|| TransportConnector::new(None));
    let tls = &rt.tls;
    let mut peer = HttpPeer::new(ep.address, true, ep.server_name.clone());
    peer.client_cert_key = Some(tls.client_cert());
    peer.options.ca = Some(tls.bundle());
    peer.options.set_http_version(1, 1);
    let timeout = rt.config.load().timeouts.connect;
    peer.options.connection_timeout = Some(timeout);
    peer.options.total_connection_timeout = Some(timeout);
    let stream = connector.new_stream(&peer).await.map_err(|e| {
        refused(
            "connect-failed",
            format!("mTLS to {} ({}): {e}", ep.address, ep.server_name),
        )
    })?;
    let serial = stream
        .get_ssl_digest()
        .and_then(|d| d.serial_number.clone())
        .unwrap_or_default();
    if !serial.is_empty() && tls.is_revoked(&serial) {
        return Err(refused(
            "peer-revoked",
            format!("the peer's certificate (serial {serial}) is revoked"),
        ));
    }
    Ok(stream)
}

/// Reads the peer sidecar's reply; a refusal becomes the outcome.
async fn read_reply(rt: &Runtime, stream: &mut Stream) -> Result<Bytes, Refused> {
    let wait = rt.config.load().timeouts.upstream_read;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 2048];
    let parsed = loop {
        match header::parse_reply(&buf) {
            Ok(Some(p)) => break p,
            Ok(None) => {}
            Err(e) => return Err(refused("protocol-error", e.to_string())),
        }
        let n = match tokio::time::timeout(wait, stream.read(&mut chunk)).await {
            Ok(Ok(0)) => {
                return Err(refused(
                    "protocol-error",
                    "the peer sidecar closed before its reply",
                ))
            }
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(refused("connect-failed", format!("reading the reply: {e}"))),
            Err(_) => {
                return Err(refused(
                    "timeout",
                    format!(
                        "no reply from the peer sidecar within {wait:?} (timeouts.upstream_read)"
                    ),
                ))
            }
        };
        buf.extend_from_slice(&chunk[..n]);
    };
    let (reply, used) = parsed;
    if !reply.ok {
        let outcome = peer_outcome(reply.error.as_deref());
        return Err(refused(outcome, reply.detail.unwrap_or_default()));
    }
    Ok(Bytes::copy_from_slice(&buf[used..]))
}

/// The outcome label for a peer's refusal (a fixed set, for the metric).
fn peer_outcome(error: Option<&str>) -> &'static str {
    match error {
        Some("policy-denied") => "policy-denied",
        Some("no-local-upstream") => "no-local-upstream",
        Some("capability-mismatch") => "capability-mismatch",
        Some("app-unreachable") => "app-unreachable",
        Some("limit") => "peer-limit",
        Some("peer-unverified") => "peer-unverified",
        _ => "peer-refused",
    }
}

/// The route a tunnel takes: by capability (then by name), or the route
/// with an endpoint on the destination's host.
pub fn find_route(table: &RouteTable, target: &TunnelTarget) -> Option<Arc<Route>> {
    let routes = table.routes();
    if let Some(cap) = &target.capability {
        let by_cap = routes.iter().find(|r| r.capability.as_deref() == Some(cap));
        return by_cap
            .or_else(|| routes.iter().find(|r| r.name == *cap))
            .cloned();
    }
    let ip = target.destination?.ip();
    routes
        .iter()
        .find(|r| r.endpoints.iter().any(|e| e.address.ip() == ip))
        .cloned()
}

/// The endpoint on the destination's host, else one at random.
pub fn endpoint(route: &Route, destination: Option<SocketAddr>) -> Option<&Endpoint> {
    let same_host =
        destination.and_then(|d| route.endpoints.iter().find(|e| e.address.ip() == d.ip()));
    same_host.or_else(|| {
        let n = route.endpoints.len();
        (n > 0).then(|| &route.endpoints[(rand::random::<u32>() as usize) % n])
    })
}

/// The `outbound.tcp` listeners: each connection is tunnelled to its
/// port's capability.
pub struct OutboundPorts {
    pub rt: Arc<Runtime>,
}

impl OutboundPorts {
    /// The capability of the port a connection came in on.
    fn capability(&self, local: Option<SocketAddr>) -> Option<String> {
        let local = local?;
        let cfg = self.rt.config.load();
        let ports = &cfg.outbound.tcp;
        let exact = ports.iter().find(|p| p.listen == local);
        exact
            .or_else(|| ports.iter().find(|p| p.listen.port() == local.port()))
            .map(|p| p.capability.clone())
    }
}

#[async_trait]
impl ServerApp for OutboundPorts {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let local = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
        let target = TunnelTarget {
            destination: None,
            capability: self.capability(local),
        };
        outbound(self.rt.clone(), stream, Bytes::new(), target).await;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let cfg = crate::config::parse(
            "p.yaml",
            "identity: {cert: a, key: b, trust_bundle: c}\nadmin: {listen: 127.0.0.1:1}\nroutes:\n- {name: pg, capability: 'db:postgres', endpoints: [{address: '10.0.0.3:4143', identity: db.acme.crank.local}, {address: '10.0.0.4:4143', identity: db.acme.crank.local}]}\n- {name: smtp, endpoints: [{address: '10.0.0.5:4143', identity: mail.acme.crank.local}]}\n",
        )
        .unwrap();
        RouteTable::from_config(&cfg)
    }

    #[test]
    fn a_tunnel_finds_its_route_by_capability_name_or_destination_host() {
        let t = table();
        let cases: &[(Option<&str>, Option<&str>, Option<&str>)] = &[
            (Some("db:postgres"), None, Some("pg")),
            (Some("smtp"), None, Some("smtp")),
            (Some("db:mysql"), None, None),
            (None, Some("10.0.0.5:25"), Some("smtp")),
            (None, Some("10.0.0.4:5432"), Some("pg")),
            (None, Some("10.9.9.9:5432"), None),
            (None, None, None),
        ];
        for (cap, dest, want) in cases {
            let target = TunnelTarget {
                capability: cap.map(String::from),
                destination: dest.map(|d| d.parse().unwrap()),
            };
            let got = find_route(&t, &target).map(|r| r.name.clone());
            assert_eq!(got.as_deref(), *want, "{target:?}");
        }
    }

    #[test]
    fn the_endpoint_on_the_destination_host_is_preferred() {
        let t = table();
        let pg = find_route(
            &t,
            &TunnelTarget {
                capability: Some("pg".into()),
                destination: None,
            },
        )
        .unwrap();
        let ep = endpoint(&pg, Some("10.0.0.4:5432".parse().unwrap())).unwrap();
        assert_eq!(ep.address, "10.0.0.4:4143".parse().unwrap());
        assert!(endpoint(&pg, None).is_some());
    }

    /// The banner that came with the reply reaches a client whose stream
    /// buffers writes at once, not at the server's next bytes. The streams
    /// Pingora's listeners accept (the capture listener's, `outbound.tcp`'s)
    /// write through a 1460-byte `BufWriter`, as here.
    #[tokio::test]
    async fn early_bytes_reach_a_write_buffering_client_at_once() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut app = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        let mut client = tokio::io::BufWriter::with_capacity(1460, accepted);
        deliver_early(&mut client, b"220 b ready\r\n")
            .await
            .unwrap();
        let mut got = [0u8; 13];
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(5), app.read_exact(&mut got));
        read.await
            .expect("the banner must not wait in the client's write buffer")
            .unwrap();
        assert_eq!(&got, b"220 b ready\r\n");
        // Nothing to deliver: nothing written.
        deliver_early(&mut client, b"").await.unwrap();
    }

    #[test]
    fn peer_refusals_map_to_a_fixed_set_of_outcomes() {
        assert_eq!(peer_outcome(Some("policy-denied")), "policy-denied");
        assert_eq!(peer_outcome(Some("limit")), "peer-limit");
        assert_eq!(peer_outcome(Some("anything else")), "peer-refused");
        assert_eq!(peer_outcome(None), "peer-refused");
    }
}
