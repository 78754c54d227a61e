//! Downstream connections, before and around Pingora's HTTP handling.
//!
//! [`Listener`] wraps each listener's app. Pingora hands it every accepted
//! connection (`ServerApp::process_new`); it
//!
//! * caps the listener's open connections (`limits.*_max_connections`):
//!   one past the cap is closed at once and counted in
//!   `crank_connections_refused_total{direction, reason="limit"}`;
//! * counts open connections for `crank_open_connections`, one guard over
//!   the connection's whole life (Pingora runs the HTTP/1 keep-alive loop
//!   inside the app's `process_new`); an inbound connection counts from the
//!   end of its TLS handshake;
//! * wraps the stream in a [`Guarded`] (every HTTP/1 connection, plaintext
//!   or TLS), which
//!   - gives each request head a deadline (`limits.request_head_timeout`):
//!     the first from the moment the connection opened, later ones from
//!     their first byte. Pingora's own read timeout restarts at every read,
//!     so a client trickling a header line every 20 s would hold the
//!     connection (and its buffers) for ever. The deadline stops counting
//!     once the proxy has the head ([`head_received`], first thing in
//!     `request_filter`) and starts over when the request is done
//!     ([`request_done`], in `logging`). A timeout closes the connection and
//!     counts `crank_request_head_timeouts_total{direction}`;
//!   - sniffs the h2c preface without waiting for 24 bytes: Pingora's sniff
//!     reads exactly 24 bytes, so `GET / HTTP/1.0\r\n\r\n` (18 bytes) never
//!     got an answer. [`Guarded`]'s `try_peek` stops at the first byte that
//!     cannot be the preface, and keeps what it read for the parser;
//!   - puts `x-crank-error` on the 400 (or 405 for CONNECT) that Pingora
//!     writes by itself for a request head it cannot parse, before any
//!     proxy phase runs: the one response the proxy makes without going
//!     through `request/respond`. It is recognised by being written while a
//!     head is still awaited, which only Pingora's parser does.
//!
//!   - closes a kept-alive HTTP/1 connection idle for `limits.idle_timeout`
//!     between requests (Pingora keeps HTTP/1.1 connections open for ever).
//!
//! * with a [`Divert`] (the inbound listener when `inbound.tcp` is set),
//!   reads the first bytes of each HTTP/1 connection and hands an opaque
//!   TCP tunnel (first byte NUL, [`crate::tunnel`]) over before Pingora
//!   sees it. A tunnel counts as an open connection of the listener.
//!
//! HTTP/2 connections (ALPN `h2`, or the h2c preface) are guarded only
//! until the preface and the first SETTINGS frame header are in (the head
//! deadline); after that `h2_idle_timeout` (`limits.idle_timeout`) closes a
//! connection without streams. Their streams never reach [`head_received`].
//!
//! [`spawn_trimmer`] returns freed heap to the kernel after many
//! connections closed: glibc keeps freed memory in its arenas, so RSS stayed
//! at its peak after a burst of slow connections.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use pingora_core::apps::ServerApp;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora_core::server::ShutdownWatch;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The header of the SETTINGS frame that must follow it.
const H2_FRAME_HEADER: usize = 9;

/// What a listener enforces on its connections.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// `inbound` or `outbound`: metrics label and `x-crank-error-origin`.
    pub direction: &'static str,
    pub max_connections: usize,
    pub head_timeout: Duration,
    /// How long a kept-alive HTTP/1 connection may sit idle between
    /// requests (`limits.idle_timeout`).
    pub idle_timeout: Duration,
    /// `crank_connections_refused_total{direction, reason="limit"}`.
    pub refused: IntCounter,
    /// `crank_request_head_timeouts_total{direction}`.
    pub head_timeouts: IntCounter,
    /// `crank_open_connections{direction}`.
    pub open_gauge: IntGauge,
    /// Open connections of every listener, for [`spawn_trimmer`].
    pub all_open: Arc<AtomicUsize>,
    /// This sidecar's SPIFFE identity, for `x-crank-error-sidecar`.
    pub identity: Arc<str>,
}

/// Takes over the connections of a listener that are not HTTP: the
/// inbound listener hands opaque TCP tunnels ([`crate::tunnel`]) over by
/// their first byte, before Pingora's HTTP handling.
#[async_trait]
pub trait Divert: Send + Sync {
    /// Whether a connection whose first bytes are `first` is this
    /// protocol's (never true for HTTP/1 or the h2 preface).
    fn claims(&self, first: &[u8]) -> bool;
    /// Serves the connection to its end; `read_ahead` are its first bytes.
    async fn serve(&self, stream: Stream, read_ahead: bytes::Bytes);
}

/// A listener's app behind the connection cap and the head deadline.
pub struct Listener<A> {
    inner: Arc<A>,
    limits: ListenerLimits,
    /// Connections that are not HTTP go here (see [`Divert`]).
    divert: Option<Arc<dyn Divert>>,
    open: AtomicUsize,
    /// When a refusal was last logged (rate limit: one line a second).
    last_refusal_log: std::sync::Mutex<Option<std::time::Instant>>,
}

impl<A> Listener<A> {
    pub fn new(inner: A, limits: ListenerLimits) -> Self {
        Listener {
            inner: Arc::new(inner),
            limits,
            divert: None,
            open: AtomicUsize::new(0),
            last_refusal_log: std::sync::Mutex::new(None),
        }
    }

    /// Reads the first bytes of each HTTP/1 connection (within the head
    /// deadline) and hands those `divert` claims to it.
    pub fn with_divert(mut self, divert: Arc<dyn Divert>) -> Self {
        self.divert = Some(divert);
        self
    }

    /// Takes a connection slot, or says the listener is full.
    fn admit(&self) -> Option<Open<'_, A>> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.limits.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.limits.refused.inc();
            self.log_refusal();
            return None;
        }
        self.limits.open_gauge.inc();
        self.limits.all_open.fetch_add(1, Ordering::AcqRel);
        Some(Open(self))
    }

    fn log_refusal(&self) {
        let mut last = self
            .last_refusal_log
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            *last = Some(now);
            tracing::warn!(
                direction = self.limits.direction,
                max_connections = self.limits.max_connections,
                "closed a new connection: the listener holds its maximum of open connections (limits.{}_max_connections); crank_connections_refused_total counts them",
                self.limits.direction
            );
        }
    }
}

/// One admitted connection; dropping it frees the slot.
struct Open<'a, A>(&'a Listener<A>);

impl<A> Drop for Open<'_, A> {
    fn drop(&mut self) {
        let l = &self.0.limits;
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        l.all_open.fetch_sub(1, Ordering::AcqRel);
        l.open_gauge.dec();
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Listener<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let _open = self.admit()?;
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        let mut guarded = Guarded::new(stream, &self.limits);
        if h2 {
            // The preface and the first SETTINGS frame header must arrive
            // within the head deadline: an h2 connection that goes quiet
            // before them would otherwise hold a slot for ever.
            guarded.expect_h2(H2_PREFACE.len() + H2_FRAME_HEADER);
        } else if let Some(divert) = &self.divert {
            // Nothing read, or the head deadline passed: closed.
            if guarded.read_ahead().await.ok()? == 0 {
                return None;
            }
            if divert.claims(&guarded.prefix) {
                let read_ahead = std::mem::take(&mut guarded.prefix).freeze();
                divert.serve(guarded.inner, read_ahead).await;
                return None;
            }
        }
        // Pingora runs the HTTP/1 keep-alive loop inside process_new and
        // hands nothing back; the slot is freed when it returns.
        self.inner.process_new(Box::new(guarded), shutdown).await;
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// The guard of the connection a request came on (HTTP/1 only).
fn guard_of(session: &pingora_proxy::Session) -> Option<&Guarded> {
    let stream = session.as_downstream().stream()?;
    (**stream).as_any().downcast_ref::<Guarded>()
}

/// The proxy has this request's head: its deadline no longer applies (the
/// body may take as long as the route allows).
pub fn head_received(session: &pingora_proxy::Session) {
    if let Some(g) = guard_of(session) {
        g.armed.store(false, Ordering::Release);
    }
}

/// The request is done: the next head on this connection gets a deadline
/// from its first byte.
pub fn request_done(session: &pingora_proxy::Session) {
    if let Some(g) = guard_of(session) {
        g.restart.store(true, Ordering::Release);
        g.armed.store(true, Ordering::Release);
    }
}

/// A downstream HTTP/1 stream with a request-head deadline, a sniff that
/// never waits for bytes that are not coming, and `x-crank-error` on
/// Pingora's own parse errors. See the module doc.
pub struct Guarded {
    inner: Stream,
    /// Bytes read ahead by the sniff, served before the stream's.
    prefix: BytesMut,
    /// A request head is awaited.
    armed: AtomicBool,
    /// Set by [`request_done`]: the next head's clock starts at its first byte.
    restart: AtomicBool,
    /// The head clock runs (set at accept, and at the first byte of a head).
    clock_running: bool,
    /// Between requests: the idle clock runs until the next head's first
    /// byte.
    idle: bool,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    idle_timeout: Duration,
    timeouts: IntCounter,
    direction: &'static str,
    identity: Arc<str>,
    /// The connection speaks h2 (ALPN, or the sniff saw the h2c preface).
    h2: bool,
    /// h2: bytes still to read before the handshake is in (the preface and
    /// the SETTINGS frame header); the deadline holds until then.
    h2_pending: usize,
    /// Pingora's parse-error response, replaced by ours while it is written.
    rewrite: Option<Rewrite>,
}

struct Rewrite {
    bytes: Vec<u8>,
    written: usize,
    /// Length of Pingora's write that this replaces: reported as written.
    replaces: usize,
}

impl fmt::Debug for Guarded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guarded")
            .field("inner", &self.inner)
            .field("armed", &self.armed.load(Ordering::Relaxed))
            .field("h2", &self.h2)
            .finish()
    }
}

impl Guarded {
    fn new(inner: Stream, limits: &ListenerLimits) -> Self {
        Guarded {
            inner,
            prefix: BytesMut::new(),
            armed: AtomicBool::new(true),
            restart: AtomicBool::new(false),
            clock_running: true,
            idle: false,
            deadline: Box::pin(tokio::time::sleep(limits.head_timeout)),
            timeout: limits.head_timeout,
            idle_timeout: limits.idle_timeout,
            timeouts: limits.head_timeouts.clone(),
            direction: limits.direction,
            identity: limits.identity.clone(),
            h2: false,
            h2_pending: 0,
            rewrite: None,
        }
    }

    /// Reads the connection's first bytes (kept for the parser) within the
    /// head deadline; 0 when the client closed.
    async fn read_ahead(&mut self) -> io::Result<usize> {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 2048];
        let read = self.inner.read(&mut chunk);
        let n = match tokio::time::timeout_at(self.deadline.deadline(), read).await {
            Ok(r) => r?,
            Err(_) => return Err(self.timed_out()),
        };
        self.prefix.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The connection speaks h2: the deadline holds until `bytes` more
    /// bytes (the rest of the handshake) have been read.
    fn expect_h2(&mut self, bytes: usize) {
        self.h2 = true;
        self.h2_pending = bytes;
        self.armed.store(bytes > 0, Ordering::Release);
    }

    fn timed_out(&self) -> io::Error {
        if self.idle {
            // An idle kept-alive connection: closed quietly, as Pingora's
            // own keep-alive timeout would.
            tracing::debug!(direction = self.direction, timeout = ?self.idle_timeout, "closed an idle kept-alive connection (limits.idle_timeout)");
            return io::Error::new(io::ErrorKind::TimedOut, "idle between requests");
        }
        self.timeouts.inc();
        tracing::info!(
            direction = self.direction,
            timeout = ?self.timeout,
            "closed a connection whose request head was not complete in time (limits.request_head_timeout)"
        );
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "request head not complete within {:?} (limits.request_head_timeout)",
                self.timeout
            ),
        )
    }

    /// Writes what is left of the replacement response.
    fn poll_rewrite(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(rw) = self.rewrite.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        while rw.written < rw.bytes.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &rw.bytes[rw.written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => rw.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let replaces = rw.replaces;
        self.rewrite = None;
        Poll::Ready(Ok(replaces))
    }

    /// Whether `buf` is Pingora's own error response to a head it could
    /// not take: written while a head is still awaited.
    fn is_parser_error(&self, buf: &[u8]) -> Option<u16> {
        if self.h2 || !self.armed.load(Ordering::Acquire) {
            return None;
        }
        parser_error_status(buf)
    }
}

/// The status of Pingora's canned parse-error response, when `buf` starts one.
pub fn parser_error_status(buf: &[u8]) -> Option<u16> {
    for (prefix, status) in [
        (&b"HTTP/1.1 400 "[..], 400),
        (b"HTTP/1.0 400 ", 400),
        (b"HTTP/1.1 405 ", 405),
        (b"HTTP/1.0 405 ", 405),
    ] {
        if buf.starts_with(prefix) {
            return Some(status);
        }
    }
    None
}

/// The proxy's answer in place of Pingora's canned 400/405: the same status,
/// with `x-crank-error`, its origin and the one JSON error body.
pub fn parser_error_response(status: u16, direction: &str, identity: &str) -> Vec<u8> {
    let (line, reason, advice) = match status {
        405 => (
            "405 Method Not Allowed",
            "connect-not-supported",
            "this sidecar does not proxy CONNECT; send plain HTTP requests (an HTTP_PROXY client does)",
        ),
        _ => (
            "400 Bad Request",
            "bad-request",
            "the request head could not be parsed (malformed request line or header, or a head over 1 MiB); fix the client",
        ),
    };
    crate::errors::raw_refusal(line, reason, advice, direction, identity)
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        if !this.armed.load(Ordering::Acquire) {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if this.restart.swap(false, Ordering::AcqRel) {
            // Between requests: the idle clock runs until the next byte.
            this.clock_running = true;
            this.idle = true;
            let at = Instant::now() + this.idle_timeout;
            this.deadline.as_mut().reset(at);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 && this.idle {
                    // The next head's first byte: its own deadline starts.
                    this.idle = false;
                    let at = Instant::now() + this.timeout;
                    this.deadline.as_mut().reset(at);
                }
                if this.h2 && n > 0 {
                    this.h2_pending = this.h2_pending.saturating_sub(n);
                    if this.h2_pending == 0 {
                        this.armed.store(false, Ordering::Release);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.clock_running => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(this.timed_out())),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.rewrite.is_some() {
            return this.poll_rewrite(cx);
        }
        if let Some(status) = this.is_parser_error(buf) {
            this.armed.store(false, Ordering::Release);
            this.rewrite = Some(Rewrite {
                bytes: parser_error_response(status, this.direction, &this.identity),
                written: 0,
                replaces: buf.len(),
            });
            return this.poll_rewrite(cx);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(first) = bufs.iter().find(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        if this.rewrite.is_some() || this.is_parser_error(first).is_some() {
            return Pin::new(this).poll_write(cx, first);
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Peek for Guarded {
    /// Pingora's h2c sniff: fills `buf` with the first bytes of the
    /// connection, reading only until they can no longer be the h2 preface
    /// (or the client closed, or the head deadline passed). When fewer
    /// bytes than `buf` holds were read, the rest is zeroed, which never
    /// matches the preface. Every byte read is kept for the parser.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 64];
        while self.prefix.len() < buf.len() && could_be_preface(&self.prefix) {
            let read = self.inner.read(&mut chunk);
            let n = match tokio::time::timeout_at(self.deadline.deadline(), read).await {
                Ok(r) => r?,
                Err(_) => return Err(self.timed_out()),
            };
            if n == 0 {
                break;
            }
            self.prefix.extend_from_slice(&chunk[..n]);
        }
        let n = self.prefix.len().min(buf.len());
        buf[..n].copy_from_slice(&self.prefix[..n]);
        buf[n..].fill(0);
        if n == H2_PREFACE.len() && buf == H2_PREFACE {
            // The preface is in the buffer; the SETTINGS header must follow.
            self.expect_h2(H2_FRAME_HEADER);
        }
        Ok(true)
    }
}

/// Whether `seen` is a prefix of the h2 preface (so more bytes are needed
/// to tell).
pub fn could_be_preface(seen: &[u8]) -> bool {
    let n = seen.len().min(H2_PREFACE.len());
    seen[..n] == H2_PREFACE[..n]
}

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {
    fn get_ssl(&self) -> Option<&pingora_core::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora_core::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<pingora_core::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<pingora_core::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<pingora_core::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, socket_digest: pingora_core::protocols::SocketDigest) {
        self.inner.set_socket_digest(socket_digest)
    }
}

/// Returns freed heap to the kernel once many connections have closed: a
/// thread checks every 2 s and calls `malloc_trim` when the open
/// connections fell by 256 or more since their last high-water mark.
pub fn spawn_trimmer(all_open: Arc<AtomicUsize>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("crank-trim".into())
        .spawn(move || {
            let mut high = 0usize;
            loop {
                std::thread::sleep(Duration::from_secs(2));
                let now = all_open.load(Ordering::Acquire);
                high = high.max(now);
                if high - now >= 256 {
                    trim();
                    high = now;
                }
            }
        })
        .map(|_| ())
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas; it takes their
    // locks and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Raises the soft limit of open files to the hard limit: each connection
/// is a descriptor, and the default soft limit (often 1024) is far below
/// the listeners' connection caps.
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                tracing::warn!(soft = lim.rlim_cur, "could not raise the open-files limit");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preface_prefixes() {
        assert!(could_be_preface(b""));
        assert!(could_be_preface(b"PRI * HT"));
        assert!(could_be_preface(H2_PREFACE));
        assert!(!could_be_preface(b"G"));
        assert!(!could_be_preface(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(!could_be_preface(b"PRX"));
    }

    #[test]
    fn pingora_parse_errors_are_recognised_and_replaced() {
        assert_eq!(
            parser_error_status(b"HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            parser_error_status(b"HTTP/1.1 405 Method Not Allowed\r\n"),
            Some(405)
        );
        assert_eq!(parser_error_status(b"HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(parser_error_status(b"HTTP/1.1 4000"), None);
        let r = String::from_utf8(parser_error_response(
            400,
            "outbound",
            "spiffe://td/tenant/t/svc/s",
        ))
        .unwrap();
        assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{r}");
        assert!(r.contains("\r\nx-crank-error: bad-request\r\n"), "{r}");
        assert!(r.contains("\r\nx-crank-error-origin: outbound\r\n"), "{r}");
        assert!(
            r.contains("\r\nx-crank-error-sidecar: spiffe://td/tenant/t/svc/s\r\n"),
            "{r}"
        );
        assert!(r.contains("\r\nconnection: close\r\n"), "{r}");
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "bad-request");
    }

    fn limits(timeout: Duration) -> ListenerLimits {
        ListenerLimits {
            direction: "outbound",
            max_connections: 2,
            head_timeout: timeout,
            idle_timeout: Duration::from_secs(60),
            refused: IntCounter::new("r", "r").unwrap(),
            head_timeouts: IntCounter::new("t", "t").unwrap(),
            open_gauge: IntGauge::new("g", "g").unwrap(),
            all_open: Arc::new(AtomicUsize::new(0)),
            identity: Arc::from("spiffe://td/tenant/t/svc/s"),
        }
    }

    /// A guarded stream over one end of an in-memory pipe.
    async fn pair(timeout: Duration) -> (Guarded, tokio::net::TcpStream, ListenerLimits) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let server = pingora_core::protocols::l4::stream::Stream::from(server);
        let lim = limits(timeout);
        (Guarded::new(Box::new(server), &lim), client, lim)
    }

    #[tokio::test]
    async fn a_short_request_is_sniffed_as_http1_without_waiting() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut g, mut client, _) = pair(Duration::from_secs(30)).await;
        client.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 24];
        let sniff = tokio::time::timeout(Duration::from_secs(5), g.try_peek(&mut buf));
        assert!(sniff.await.expect("the sniff must not wait").unwrap());
        assert_ne!(&buf[..], H2_PREFACE);
        // Every byte is still there for the parser.
        let mut got = vec![0u8; 18];
        g.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.0\r\n\r\n");
    }

    #[tokio::test]
    async fn the_h2_preface_is_recognised_and_unguarded() {
        use tokio::io::AsyncWriteExt;
        let (mut g, mut client, _) = pair(Duration::from_secs(30)).await;
        client.write_all(H2_PREFACE).await.unwrap();
        let mut buf = [0u8; 24];
        assert!(g.try_peek(&mut buf).await.unwrap());
        assert_eq!(&buf[..], H2_PREFACE);
        assert!(g.h2);
        // Still guarded until the SETTINGS frame header is in.
        assert!(g.armed.load(Ordering::Acquire));
        client
            .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        let mut got = vec![0u8; 33];
        tokio::io::AsyncReadExt::read_exact(&mut g, &mut got)
            .await
            .unwrap();
        assert!(!g.armed.load(Ordering::Acquire));
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_h2_handshake_is_cut_at_the_deadline() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut g, mut client, _) = pair(Duration::from_secs(10)).await;
        g.expect_h2(33);
        client.write_all(&H2_PREFACE[..10]).await.unwrap();
        let mut buf = vec![0u8; 64];
        assert_eq!(g.read(&mut buf).await.unwrap(), 10);
        let cut = tokio::time::timeout(Duration::from_secs(30), g.read(&mut buf)).await;
        assert_eq!(cut.unwrap().unwrap_err().kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_head_is_cut_at_the_deadline() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut g, mut client, lim) = pair(Duration::from_secs(10)).await;
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            loop {
                match g.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => continue,
                    Err(e) => return Err(e.kind()),
                }
            }
        });
        for _ in 0..3 {
            client.write_all(b"X-Slow: 1\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        let res = reader.await.unwrap();
        assert_eq!(res, Err(io::ErrorKind::TimedOut));
        assert_eq!(lim.head_timeouts.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_received_head_stops_the_clock_and_done_restarts_it_at_the_next_byte() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut g, mut client, lim) = pair(Duration::from_secs(10)).await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 64];
        assert!(g.read(&mut buf).await.unwrap() > 0);
        // head_received: a slow body is not cut.
        g.armed.store(false, Ordering::Release);
        let slow = tokio::time::timeout(Duration::from_secs(30), g.read(&mut buf)).await;
        assert!(
            slow.is_err(),
            "the read waits for the body, past the head deadline"
        );
        // request_done: an idle kept-alive connection gets the idle
        // timeout (60s), not the head deadline (10s).
        g.restart.store(true, Ordering::Release);
        g.armed.store(true, Ordering::Release);
        let idle = tokio::time::timeout(Duration::from_secs(30), g.read(&mut buf)).await;
        assert!(idle.is_err(), "idle for 30s: still open");
        // Its first byte starts the head clock.
        client.write_all(b"G").await.unwrap();
        assert!(g.read(&mut buf).await.unwrap() > 0);
        let cut = tokio::time::timeout(Duration::from_secs(30), g.read(&mut buf)).await;
        assert_eq!(cut.unwrap().unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(lim.head_timeouts.get(), 1);
        // An idle connection is closed after the idle timeout, and not
        // counted as a slow head.
        g.restart.store(true, Ordering::Release);
        g.armed.store(true, Ordering::Release);
        let closed = tokio::time::timeout(Duration::from_secs(90), g.read(&mut buf)).await;
        assert_eq!(closed.unwrap().unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(lim.head_timeouts.get(), 1);
    }
}
