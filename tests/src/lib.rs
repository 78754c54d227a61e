//! Test harness for end-to-end tests: makes a fresh PKI with `crank-certs`,
//! writes proxy configs, and starts real `crank-proxy` processes on
//! ephemeral ports. Build the binaries first (`cargo build --bins`); the
//! README's test command does.

pub mod app;
pub mod control;
pub mod control_ha;
pub mod etcd;
pub mod flaky;
pub mod hosts_mesh;
pub mod load;
pub mod netns;
pub mod otlp;
pub mod pki;
pub mod postgres;
pub mod prometheus;
pub mod proxy;
pub mod raw_http;
pub mod reporting;
pub mod shim;
pub mod sidecar;

pub use app::{EchoApp, EchoSeen};
pub use flaky::FlakyApp;
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use pki::Pki;
pub use proxy::{free_port, Mesh, MeshOptions, Proxy};
pub use shim::Shim;

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Path of a workspace binary (target/debug by default, or `CRANK_BIN_DIR`).
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("CRANK_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
            target.join("debug")
        });
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (the README's test command does)",
        p.display()
    );
    p
}

/// Polls `f` until it returns true, or panics after `timeout` with `what`.
/// A plain HTTP/1.1 GET (`Connection: close`): (status, body); (0, "") when
/// nothing answers.
pub fn plain_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    if s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .is_err()
    {
        return (0, String::new());
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Waits up to `timeout` for a child process to exit.
pub fn wait_child(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Runs curl with `args`; returns (status code, headers+body as text).
/// `-s -i` is added; the status is parsed from the last status line.
pub fn curl(args: &[&str]) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "-i", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl is installed (tests/run.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    (status_of(&text), text)
}

/// The status code of the last status line in curl `-i` output (0 if none).
pub fn status_of(curl_output: &str) -> u16 {
    curl_output
        .lines()
        .rfind(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The value of a response header in curl `-i` output (case-insensitive).
pub fn header<'a>(curl_output: &'a str, name: &str) -> Option<&'a str> {
    curl_output.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Scrapes one sample's value from Prometheus text, by exact series text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

/// Runs `serve` on its own thread and current-thread runtime with a
/// listener on an ephemeral loopback port, until the returned sender is
/// dropped. The in-test servers (the echo app, the OTLP receivers) use it.
pub fn serve_on_thread<F, Fut>(serve: F) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>)
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            tokio::select! {
                _ = serve(listener) => {}
                _ = rx => {}
            }
        });
    });
    (addr_rx.recv().unwrap(), tx)
}

/// Runs Debian's `promtool` (from the prometheus package that tests/run.sh
/// installs) in `dir`; panics with how to install it when it cannot run.
pub fn promtool(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    match std::process::Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!(
            "promtool cannot run ({e}): it comes with Debian's prometheus package, which tests/run.sh installs; run `bash tests/run.sh` (or `apt-get install prometheus`)"
        ),
    }
}

/// A finished command's status, stdout and stderr, for assertion messages.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
