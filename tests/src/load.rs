//! A constant load for end-to-end tests: keep-alive HTTP/1.1 GETs from a
//! few threads through a sidecar, counting every success and failure.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::wait_until;

/// Keep-alive HTTP/1.1 GETs from `workers` threads until stopped, counting
/// 200s and everything else (with the first few failures kept).
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: std::net::SocketAddr, workers: usize) -> Load {
        let l = Load {
            stop: Arc::default(),
            ok: Arc::default(),
            failed: Arc::default(),
            failures: Arc::default(),
            threads: Vec::new(),
        };
        let threads = (0..workers)
            .map(|_| {
                let (stop, ok, failed, failures) = (
                    l.stop.clone(),
                    l.ok.clone(),
                    l.failed.clone(),
                    l.failures.clone(),
                );
                std::thread::spawn(move || {
                    let mut conn: Option<std::io::BufReader<std::net::TcpStream>> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let c = match conn.as_mut() {
                            Some(c) => c,
                            None => match std::net::TcpStream::connect(addr) {
                                Ok(s) => {
                                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                                    conn.insert(std::io::BufReader::new(s))
                                }
                                Err(e) => {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                    failures.lock().unwrap().push(format!("connect: {e}"));
                                    std::thread::sleep(Duration::from_millis(10));
                                    continue;
                                }
                            },
                        };
                        match one_request(c) {
                            Ok((200, _)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok((status, head)) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                failures.lock().unwrap().push(format!("{status}: {head}"));
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                failures.lock().unwrap().push(format!("io: {e}"));
                                conn = None;
                            }
                        }
                    }
                })
            })
            .collect();
        Load { threads, ..l }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn wait_for(&self, n: u64) {
        wait_until(
            &format!("{n} successful requests"),
            Duration::from_secs(180),
            || self.ok() >= n,
        );
    }

    /// Stops the workers: (ok, failed, first failures).
    pub fn stop(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let f = self.failures.lock().unwrap();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            f.iter().take(5).cloned().collect(),
        )
    }
}

/// One GET on a keep-alive connection: (status, response head).
fn one_request(c: &mut std::io::BufReader<std::net::TcpStream>) -> std::io::Result<(u16, String)> {
    use std::io::{BufRead, Read, Write};
    c.get_mut()
        .write_all(b"GET /load HTTP/1.1\r\nHost: backend\r\n\r\n")?;
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if c.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed mid-response",
            ));
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    c.read_exact(&mut body)?;
    Ok((status, head))
}
