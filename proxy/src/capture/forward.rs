//! Where an opaque captured connection's bytes go: to a mesh destination
//! through the opaque TCP tunnel (mTLS to the destination's sidecar), or
//! straight to the address the app asked for (this host's own addresses,
//! undeclared destinations with `capture.undeclared: passthrough`, and
//! plaintext callers of the app's captured ports inbound). The proxy's own
//! connects are never captured (its uid is excluded, and the proxy refuses
//! to start under another uid), so a direct connect reaches the
//! destination. A direct forward has the tunnel's idle timeout, connection
//! limit, access log line and metrics.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::routing::Route;
use crate::runtime::Runtime;
use crate::tunnel::splice::splice;
use crate::tunnel::{Ended, Record, Slot};

/// An opaque connection to a mesh destination: through the opaque TCP
/// tunnel to the sidecar of `route`'s endpoint on that host, carrying the
/// original destination and `claim` (the capability [`super::route::claim`]
/// gives; `None` lets the peer serve the dialled port).
pub async fn to_mesh(
    rt: &Arc<Runtime>,
    client: Box<L4Stream>,
    prefix: Bytes,
    dst: SocketAddr,
    route: Arc<Route>,
    claim: Option<String>,
) {
    let target = crate::tunnel::TunnelTarget {
        destination: Some(dst),
        capability: claim,
    };
    let ended = crate::tunnel::outbound(rt.clone(), client, prefix, target).await;
    tracing::debug!(%dst, route = %route.name, outcome = ended.outcome, "captured connection tunnelled");
}

/// A direct forward's facts: why it goes straight on, and its label.
pub struct Direct {
    /// `egress`, `undeclared`, `local` or `inbound-plaintext`.
    pub kind: &'static str,
    /// The `capability` label and log field: the egress route's name, for
    /// example.
    pub label: Option<String>,
}

impl Direct {
    fn direction(&self) -> &'static str {
        if self.kind == "inbound-plaintext" {
            "inbound"
        } else {
            "outbound"
        }
    }
}

/// Connects to `dst` as the proxy (not captured again), sends `prefix`
/// (the bytes detection read), and splices both ways until both sides
/// have closed, one fails, or neither moves a byte for
/// `tunnel.idle_timeout`; under `tunnel.max_connections` (shared with the
/// tunnels). One access log line (`kind: tcp`, `forward: KIND`) and the
/// `crank_tcp_*` series count it.
pub async fn direct<C>(
    rt: &Arc<Runtime>,
    mut client: C,
    prefix: &[u8],
    dst: SocketAddr,
    how: Direct,
) -> Ended
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    let direction = how.direction();
    let mut rec = Record::new(rt, direction);
    rec.forward = Some(how.kind);
    rec.original_destination = Some(dst);
    rec.upstream = Some(dst);
    rec.capability = how.label;
    if direction == "outbound" {
        rec.source = Some(rt.me.spiffe_id.clone());
    } else {
        rec.destination = Some(rt.me.spiffe_id.clone());
    }
    let Some(slot) = Slot::take(rt, direction) else {
        let _ = client.shutdown().await;
        return rec.finish("limit", 0, 0, "tunnel.max_connections connections are open");
    };
    let cfg = rt.config.load();
    let (connect, idle) = (cfg.timeouts.connect, cfg.tunnel.idle_timeout);
    let upstream = tokio::time::timeout(connect, tokio::net::TcpStream::connect(dst)).await;
    let mut upstream = match upstream {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let _ = client.shutdown().await;
            let detail = format!("connecting to {dst}: {e}");
            return rec.finish("connect-failed", 0, 0, &detail);
        }
        Err(_) => {
            let _ = client.shutdown().await;
            let detail =
                format!("connecting to {dst}: no answer within {connect:?} (timeouts.connect)");
            return rec.finish("connect-failed", 0, 0, &detail);
        }
    };
    let _ = upstream.set_nodelay(true);
    if !prefix.is_empty() && upstream.write_all(prefix).await.is_err() {
        return rec.finish("server-error", 0, 0, "writing the first bytes");
    }
    let s = splice(client, upstream, idle).await;
    drop(slot);
    rec.finish(
        s.reason.as_str(),
        s.sent + prefix.len() as u64,
        s.received,
        "",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    fn runtime(idle: &str, max: usize) -> Arc<Runtime> {
        let cfg = crate::config::parse(
            "p.yaml",
            &format!("identity: {{cert: a, key: b, trust_bundle: c}}\nadmin: {{listen: 127.0.0.1:1}}\ntunnel: {{idle_timeout: {idle}}}\n"),
        )
        .unwrap();
        let rt = Runtime::for_tests(&cfg);
        let mut c = (*rt.config.load_full()).clone();
        c.tunnel.max_connections = max;
        rt.config.store(Arc::new(c));
        Arc::new(rt)
    }

    /// A server that echoes its first read and then stays open, silent.
    async fn quiet_echo() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let _ = s.write_all(&buf[..n]).await;
                    let _ = s.read(&mut buf).await;
                });
            }
        });
        addr
    }

    fn how() -> Direct {
        Direct {
            kind: "egress",
            label: Some("egress:cache".into()),
        }
    }

    #[tokio::test]
    async fn a_quiet_direct_forward_closes_at_the_idle_timeout() {
        let rt = runtime("300ms", 10);
        let dst = quiet_echo().await;
        let (client, mut app) = tokio::io::duplex(1024);
        let run = tokio::spawn({
            let rt = rt.clone();
            async move { direct(&rt, client, b"hi", dst, how()).await }
        });
        let mut two = [0u8; 2];
        app.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"hi", "the detected bytes go first");
        let ended = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("closed by tunnel.idle_timeout, not left open")
            .unwrap();
        assert_eq!(
            (ended.outcome, ended.sent, ended.received),
            ("idle-timeout", 2, 2)
        );
        let m = &rt.metrics.tunnel;
        let closed = m
            .connections
            .with_label_values(&["outbound", "egress:cache", "idle-timeout"]);
        assert_eq!(closed.get(), 1);
        assert_eq!(
            m.open.with_label_values(&["outbound"]).get(),
            0,
            "the slot is freed"
        );
    }

    #[tokio::test]
    async fn direct_forwards_take_a_slot_under_the_connection_limit() {
        let rt = runtime("30s", 0);
        let dst = quiet_echo().await;
        let (client, mut app) = tokio::io::duplex(1024);
        let ended = direct(&rt, client, b"", dst, how()).await;
        assert_eq!(ended.outcome, "limit");
        let mut rest = Vec::new();
        assert_eq!(app.read_to_end(&mut rest).await.unwrap(), 0, "closed");
    }
}
