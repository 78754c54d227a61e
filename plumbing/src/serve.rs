//! The one accept loop of the mesh's own servers (admin sockets, metrics,
//! the dashboard, the workload API, the shim's front).
//!
//! [`serve`] accepts until `shutdown` resolves and hands each connection to
//! `handler` on its own task. An accept error (out of file descriptors,
//! say) is logged and the loop waits — 10 ms, doubling to 1 s, reset by the
//! next success ([`Backoff::ACCEPT`]) — instead of spinning on the error.
//! Connections already accepted keep running after the stop; wait for them
//! with a [`crate::signal::Drain`] if needed.

use std::future::Future;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::backoff::Backoff;

/// Something that accepts connections: Tokio's TCP and Unix listeners, or a
/// fake in tests.
pub trait Listener: Send + 'static {
    type Conn: Send + 'static;
    type Addr: Send + 'static;
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Conn, Self::Addr)>> + Send;
}

impl Listener for TcpListener {
    type Conn = TcpStream;
    type Addr = std::net::SocketAddr;
    fn accept(&self) -> impl Future<Output = std::io::Result<(TcpStream, Self::Addr)>> + Send {
        TcpListener::accept(self)
    }
}

impl Listener for UnixListener {
    type Conn = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;
    fn accept(&self) -> impl Future<Output = std::io::Result<(UnixStream, Self::Addr)>> + Send {
        UnixListener::accept(self)
    }
}

/// How a [`serve_with`] loop behaves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Names the listener in the accept-error log line (`admin`, `metrics`).
    pub name: &'static str,
    /// At most this many connections at once; the loop stops accepting
    /// (the kernel queues) until one ends. `None`: no limit.
    pub max_connections: Option<usize>,
    /// The wait after an accept error.
    pub backoff: Backoff,
}

impl ServeOptions {
    pub fn new(name: &'static str) -> Self {
        ServeOptions {
            name,
            max_connections: None,
            backoff: Backoff::ACCEPT,
        }
    }

    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = Some(n);
        self
    }
}

/// Accepts on `listener` until `shutdown` resolves; each connection runs
/// `handler` on its own task. See the module doc.
pub async fn serve<L, S, F, Fut>(listener: L, shutdown: S, handler: F)
where
    L: Listener,
    S: Future<Output = ()>,
    F: FnMut(L::Conn, L::Addr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_with(ServeOptions::new("listener"), listener, shutdown, handler).await
}

/// [`serve`] with a name for the logs, a connection limit or another backoff.
pub async fn serve_with<L, S, F, Fut>(opts: ServeOptions, listener: L, shutdown: S, mut handler: F)
where
    L: Listener,
    S: Future<Output = ()>,
    F: FnMut(L::Conn, L::Addr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = opts.max_connections.map(|n| Arc::new(Semaphore::new(n)));
    let mut errors = opts.backoff.attempts();
    tokio::pin!(shutdown);
    loop {
        let slot = match &slots {
            Some(s) => tokio::select! {
                _ = &mut shutdown => return,
                p = s.clone().acquire_owned() => p.ok(),
            },
            None => None,
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((conn, addr)) => {
                errors.reset();
                let work = handler(conn, addr);
                tokio::spawn(async move {
                    work.await;
                    drop(slot);
                });
            }
            Err(e) => {
                let wait = errors.next_delay();
                tracing::warn!(listener = opts.name, error = %e, retry_in = ?wait, "accept failed");
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;

    use super::*;

    /// Hands out the scripted results, recording when each accept was
    /// called; then waits forever.
    struct Script {
        results: Mutex<VecDeque<std::io::Result<u32>>>,
        calls: Arc<Mutex<Vec<Duration>>>,
        t0: Instant,
    }

    impl Listener for Script {
        type Conn = u32;
        type Addr = ();
        async fn accept(&self) -> std::io::Result<(u32, ())> {
            self.calls.lock().unwrap().push(self.t0.elapsed());
            let next = self.results.lock().unwrap().pop_front();
            match next {
                Some(r) => r.map(|c| (c, ())),
                None => std::future::pending().await,
            }
        }
    }

    fn emfile() -> std::io::Result<u32> {
        Err(std::io::Error::from_raw_os_error(24))
    }

    #[tokio::test(start_paused = true)]
    async fn accept_errors_back_off_and_a_success_resets() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let script = Script {
            results: Mutex::new([emfile(), emfile(), emfile(), Ok(7), emfile(), Ok(8)].into()),
            calls: calls.clone(),
            t0: Instant::now(),
        };
        let served = Arc::new(Mutex::new(Vec::new()));
        let s = served.clone();
        let stop = tokio::time::sleep(Duration::from_secs(10));
        serve(script, stop, move |c, ()| {
            s.lock().unwrap().push(c);
            async {}
        })
        .await;
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        // Errors at 0, 10, 30 ms wait 10, 20, 40; success at 70 resets,
        // so the next error waits 10 again.
        assert_eq!(*calls.lock().unwrap(), ms(&[0, 10, 30, 70, 70, 80, 80]));
        assert_eq!(*served.lock().unwrap(), [7, 8]);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_a_loop_that_is_backing_off() {
        let script = Script {
            results: Mutex::new(std::iter::repeat_with(emfile).take(100).collect()),
            calls: Arc::new(Mutex::new(Vec::new())),
            t0: Instant::now(),
        };
        let t0 = Instant::now();
        serve(
            script,
            tokio::time::sleep(Duration::from_millis(500)),
            |_, ()| async {},
        )
        .await;
        assert_eq!(t0.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test]
    async fn tcp_connections_are_served_until_shutdown() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_with(
            ServeOptions::new("test").max_connections(1),
            l,
            async move {
                let _ = stop_rx.await;
            },
            |mut c: TcpStream, _| async move {
                let _ = c.write_all(b"hi").await;
            },
        ));
        for _ in 0..3 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let mut got = String::new();
            c.read_to_string(&mut got).await.unwrap();
            assert_eq!(got, "hi");
        }
        stop_tx.send(()).unwrap();
        server.await.unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }

    #[tokio::test]
    async fn the_limit_holds_connections_back() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (l2, p2) = (live.clone(), peak.clone());
        tokio::spawn(serve_with(
            ServeOptions::new("test").max_connections(2),
            l,
            std::future::pending(),
            move |mut c: TcpStream, _| {
                let (live, peak) = (l2.clone(), p2.clone());
                async move {
                    let n = live.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    let mut buf = [0u8; 1];
                    let _ = c.read(&mut buf).await; // until the client closes
                    live.fetch_sub(1, Ordering::SeqCst);
                    let _ = c.write_all(b"x").await;
                }
            },
        ));
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        for mut c in clients {
            c.write_all(b".").await.unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await.unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
    }
}
