//! Where an opaque captured connection's bytes go: to a mesh destination
//! through the opaque TCP tunnel (mTLS to the destination's sidecar), or
//! straight to the address the app asked for (this host's own addresses,
//! undeclared destinations with `capture.undeclared: passthrough`, and
//! plaintext callers of the app's captured ports inbound). The proxy's own
//! connects are never captured (its uid is excluded), so a direct connect
//! reaches the destination.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use tokio::io::AsyncWriteExt;

use crate::routing::Route;
use crate::runtime::Runtime;

/// An opaque connection to a mesh destination: through the opaque TCP
/// tunnel to the sidecar of `route`'s endpoint on that host, carrying the
/// original destination and the route's capability (its name when it has
/// none, as the tunnel itself names it).
pub async fn to_mesh(
    rt: &Arc<Runtime>,
    client: Box<L4Stream>,
    prefix: Bytes,
    dst: SocketAddr,
    route: Arc<Route>,
) {
    let target = crate::tunnel::TunnelTarget {
        destination: Some(dst),
        capability: route
            .capability
            .clone()
            .or_else(|| Some(route.name.clone())),
    };
    let ended = crate::tunnel::outbound(rt.clone(), client, prefix, target).await;
    tracing::debug!(%dst, route = %route.name, outcome = ended.outcome, "captured connection tunnelled");
}

/// Connects to `dst` as the proxy (not captured again), sends `prefix`
/// (the bytes detection read), and splices both ways until both sides
/// have closed.
pub async fn direct(
    rt: &Arc<Runtime>,
    mut client: Box<L4Stream>,
    prefix: &[u8],
    dst: SocketAddr,
    kind: &'static str,
) {
    let connect = rt.config.load().timeouts.connect;
    let upstream = tokio::time::timeout(connect, tokio::net::TcpStream::connect(dst)).await;
    let mut upstream = match upstream {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(%dst, kind, error = %e, "captured connection: the destination refused or is unreachable");
            return;
        }
        Err(_) => {
            tracing::info!(%dst, kind, timeout = ?connect, "captured connection: connect to the destination timed out (timeouts.connect)");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if !prefix.is_empty() && upstream.write_all(prefix).await.is_err() {
        return;
    }
    let started = std::time::Instant::now();
    let res = tokio::io::copy_bidirectional(&mut *client, &mut upstream).await;
    let (up, down) = res.as_ref().map_or((0, 0), |(a, b)| (*a, *b));
    tracing::debug!(%dst, kind, bytes_up = up + prefix.len() as u64, bytes_down = down, duration = ?started.elapsed(), error = ?res.err(), "captured connection closed");
}
