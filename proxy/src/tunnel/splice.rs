//! Copies bytes both ways between two connections until both sides are
//! done, with half-close (one side's EOF shuts down the other side's write
//! half, and the other direction goes on), an idle timeout over both
//! directions, and a close reason for the log and the metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides closed their write half (normal end).
    Closed,
    /// No byte either way for `tunnel.idle_timeout`.
    IdleTimeout,
    /// Reading from or writing to the app's side failed (reset).
    ClientError,
    /// Reading from or writing to the far side failed (reset).
    ServerError,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Closed => "closed",
            CloseReason::IdleTimeout => "idle-timeout",
            CloseReason::ClientError => "client-error",
            CloseReason::ServerError => "server-error",
        }
    }
}

/// What a splice moved and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spliced {
    /// Client → server bytes.
    pub sent: u64,
    /// Server → client bytes.
    pub received: u64,
    pub reason: CloseReason,
}

const BUF: usize = 16 * 1024;

/// Splices `client` and `server` until both directions end, one fails, or
/// neither moves a byte for `idle`. Both are shut down on return.
pub async fn splice<C, S>(client: C, server: S, idle: Duration) -> Spliced
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = tokio::io::split(server);
    let progress = Progress { start, last: &last };
    let up = copy(&mut cr, &mut sw, &sent, progress, Side::Client);
    let down = copy(&mut sr, &mut cw, &received, progress, Side::Server);
    let reason = tokio::select! {
        r = async { tokio::try_join!(up, down) } => match r {
            Ok(_) => CloseReason::Closed,
            Err(Side::Client) => CloseReason::ClientError,
            Err(Side::Server) => CloseReason::ServerError,
        },
        () = watchdog(progress, idle) => CloseReason::IdleTimeout,
    };
    let mut client = cr.unsplit(cw);
    let mut server = sr.unsplit(sw);
    let _ = tokio::join!(client.shutdown(), server.shutdown());
    Spliced {
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
        reason,
    }
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Server,
}

/// When a byte last moved, in milliseconds since `start`.
#[derive(Clone, Copy)]
struct Progress<'a> {
    start: Instant,
    last: &'a AtomicU64,
}

impl Progress<'_> {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

/// One direction: `from`'s EOF shuts down `to`'s write half. An error is
/// blamed on the side it happened on.
async fn copy<R, W>(
    from: &mut R,
    to: &mut W,
    count: &AtomicU64,
    progress: Progress<'_>,
    from_side: Side,
) -> Result<(), Side>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let to_side = match from_side {
        Side::Client => Side::Server,
        Side::Server => Side::Client,
    };
    let mut buf = vec![0u8; BUF];
    loop {
        let n = from.read(&mut buf).await.map_err(|_| from_side)?;
        if n == 0 {
            // Half-close: the other direction goes on.
            to.shutdown().await.map_err(|_| to_side)?;
            return Ok(());
        }
        progress.touch();
        to.write_all(&buf[..n]).await.map_err(|_| to_side)?;
        to.flush().await.map_err(|_| to_side)?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        progress.touch();
    }
}

/// Resolves once no byte has moved for `idle`.
async fn watchdog(progress: Progress<'_>, idle: Duration) {
    loop {
        let due = progress.last() + idle;
        tokio::time::sleep_until(due).await;
        if progress.last() + idle <= Instant::now() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_keeps_the_other_direction() {
        let (client, mut app) = duplex(1024);
        let (server, mut backend) = duplex(1024);
        let run = tokio::spawn(splice(client, server, Duration::from_secs(60)));
        app.write_all(b"ping").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping", "the server sees the client's EOF");
        backend.write_all(b"pong, after your EOF").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut reply = Vec::new();
        app.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"pong, after your EOF");
        let s = run.await.unwrap();
        assert_eq!((s.sent, s.received, s.reason), (4, 20, CloseReason::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_tunnel_closes_at_the_idle_timeout_and_traffic_defers_it() {
        let (client, mut app) = duplex(1024);
        let (server, mut backend) = duplex(1024);
        let run = tokio::spawn(splice(client, server, Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_secs(8)).await;
        app.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        backend.read_exact(&mut one).await.unwrap();
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert!(!run.is_finished(), "traffic 8s ago: still open");
        let s = run.await.unwrap();
        assert_eq!(s.reason, CloseReason::IdleTimeout);
        assert_eq!(s.sent, 1);
        let mut rest = Vec::new();
        assert_eq!(app.read_to_end(&mut rest).await.unwrap(), 0, "closed");
    }

    #[tokio::test]
    async fn a_large_echo_does_not_deadlock() {
        let (client, mut app) = duplex(4096);
        let (server, backend) = duplex(4096);
        let run = tokio::spawn(splice(client, server, Duration::from_secs(60)));
        let echo = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(backend);
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let data = vec![7u8; 1 << 20];
        let (mut ar, mut aw) = tokio::io::split(&mut app);
        let send = async {
            aw.write_all(&data).await.unwrap();
            aw.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let recv = ar.read_to_end(&mut back);
        let (_, n) = tokio::join!(send, recv);
        assert_eq!(n.unwrap(), data.len());
        echo.await.unwrap();
        let s = run.await.unwrap();
        assert_eq!((s.sent, s.received), (1 << 20, 1 << 20));
    }
}
