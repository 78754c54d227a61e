//! Logs: JSON lines on stderr through a non-blocking writer, so a slow
//! terminal or pipe never slows requests (under extreme pressure lines are
//! dropped rather than requests delayed). `CRANK_LOG` sets the filter
//! (default `info`); Pingora's own `log` records are bridged in.
//!
//! The access log (one line per request) does not go through
//! tracing-subscriber's JSON formatter: [`JsonLine`] writes the same bytes
//! (`timestamp`, `level`, `fields` in the order given, `target`; serde_json's
//! escaping and number formatting) into a reused per-thread buffer, which
//! saves the formatter's field visitor and its timestamp `String` on every
//! request, and queues it for its own writer thread (`crank-access-log`),
//! which writes the lines to stderr in batches, at most 50 times a second
//! ([`crate::batch`]): a channel woke its writer once per request.

use std::cell::RefCell;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use serde::Serializer as _;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::EnvFilter;

use crate::batch::LineBatch;

static GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// The access log's queue (written directly, batched: [`crate::batch`]).
static ACCESS: OnceLock<Arc<LineBatch>> = OnceLock::new();

/// Bytes of access log lines queued before new ones are dropped: about
/// 8,000 lines, four seconds at 2,000 requests a second.
const ACCESS_QUEUE_BYTES: usize = 4 << 20;

/// What [`flush`] also runs before exit (the decision log's writer).
static FLUSHERS: Mutex<Vec<Box<dyn Fn() + Send>>> = Mutex::new(Vec::new());

/// Lines the writer may fall behind by before new ones are dropped.
/// tracing-appender's default, 128,000, reserves one 32-byte slot per line
/// up front: 4 MiB per process, more than the rest of an idle sidecar's
/// heap (issue #19). 8,192 lines are four seconds of access log at 2,000
/// requests per second.
const QUEUE_LINES: usize = 8192;

/// Installs the subscriber (which also bridges `log` records). Safe to call
/// twice: the second call changes nothing.
pub fn init() {
    let filter = EnvFilter::try_from_env("CRANK_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,pingora_core=warn,pingora_proxy=warn"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUE_LINES)
        .finish(std::io::stderr());
    let installed = tracing_subscriber::fmt()
        .json()
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(writer)
        .try_init()
        .is_ok();
    if installed {
        *GUARD.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
        let access = LineBatch::new(ACCESS_QUEUE_BYTES);
        let writer = access.clone();
        let spawned = std::thread::Builder::new()
            .name("crank-access-log".into())
            .spawn(move || writer.run(write_stderr));
        // Without its thread the access log goes through tracing's writer.
        if spawned.is_ok() {
            let _ = ACCESS.set(access);
        }
    }
}

/// A batch of whole lines to stderr, under its lock: the subscriber's own
/// writes cannot fall inside it.
fn write_stderr(lines: &[u8]) {
    let _ = std::io::stderr().lock().write_all(lines);
}

/// Runs `f` when [`flush`] is called (before exit).
pub fn on_flush(f: impl Fn() + Send + 'static) {
    FLUSHERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Box::new(f));
}

/// Writes out buffered log lines; call before `std::process::exit`.
pub fn flush() {
    if let Some(access) = ACCESS.get() {
        access.flush(write_stderr);
    }
    for f in FLUSHERS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        f();
    }
    drop(GUARD.lock().unwrap_or_else(|e| e.into_inner()).take());
}

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

/// One INFO line in the subscriber's JSON format, built in this thread's
/// buffer; fields that are `None` are left out, as tracing leaves them out.
pub struct JsonLine<'a> {
    buf: &'a mut Vec<u8>,
    first: bool,
}

impl JsonLine<'_> {
    /// Builds a line with `fill` and writes it out for `target` (a static
    /// ASCII name), when the `CRANK_LOG` filter lets INFO lines of the
    /// target through. Without [`init`] (a library user with its own
    /// subscriber) the line goes to tracing as one `line` field.
    pub fn emit(target: &'static str, enabled: bool, fill: impl FnOnce(&mut JsonLine<'_>)) {
        if !enabled {
            return;
        }
        Self::build(target, fill, |line| match ACCESS.get() {
            Some(access) => {
                // A full queue drops the line: the request never waits.
                access.push(line);
            }
            None => {
                let text = String::from_utf8_lossy(line.strip_suffix(b"\n").unwrap_or(line));
                tracing::info!(target: "crank::access", line = %text);
            }
        });
    }

    /// Builds the line (with its newline) in this thread's buffer and
    /// gives it to `out`.
    fn build(target: &str, fill: impl FnOnce(&mut JsonLine<'_>), out: impl FnOnce(&[u8])) {
        LINE.with(|cell| {
            let Ok(mut buf) = cell.try_borrow_mut() else {
                return;
            };
            buf.clear();
            let mut line = JsonLine {
                buf: &mut buf,
                first: true,
            };
            line.open();
            fill(&mut line);
            line.close(target);
            out(&buf);
        });
    }

    fn open(&mut self) {
        self.buf.extend_from_slice(b"{\"timestamp\":\"");
        let mut adapter = Utf8Sink(self.buf);
        let _ = timestamp(SystemTime::now(), &mut adapter);
        self.buf
            .extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{");
    }

    fn close(&mut self, target: &str) {
        self.buf.extend_from_slice(b"},\"target\":");
        self.string(target);
        self.buf.extend_from_slice(b"}\n");
    }

    fn key(&mut self, name: &str) {
        if !self.first {
            self.buf.push(b',');
        }
        self.first = false;
        self.buf.push(b'"');
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(b"\":");
    }

    fn string(&mut self, s: &str) {
        let _ = serde_json::Serializer::new(&mut *self.buf).serialize_str(s);
    }

    /// A string field (`name` is a static ASCII identifier).
    pub fn str(&mut self, name: &str, v: Option<&str>) {
        if let Some(v) = v {
            self.key(name);
            self.string(v);
        }
    }

    /// A field written with `Display` (tracing's `%` and `?` fields), as a
    /// JSON string.
    pub fn display(&mut self, name: &str, v: Option<&dyn std::fmt::Display>) {
        if let Some(v) = v {
            self.key(name);
            let _ = serde_json::Serializer::new(&mut *self.buf).collect_str(v);
        }
    }

    /// An unsigned number field.
    pub fn u64(&mut self, name: &str, v: u64) {
        self.key(name);
        let _ = serde_json::Serializer::new(&mut *self.buf).serialize_u64(v);
    }

    /// A floating-point field (serde_json's shortest round-trip form).
    pub fn f64(&mut self, name: &str, v: f64) {
        self.key(name);
        let _ = serde_json::Serializer::new(&mut *self.buf).serialize_f64(v);
    }
}

/// `t` as tracing-subscriber's `SystemTime` timer writes it
/// (`2026-12-07T06:37:49.123456Z`): through humantime, whose digits are
/// written without the formatter, for 1970 up to 9999; through the
/// subscriber's own timer (which reads the clock itself) otherwise.
fn timestamp(t: SystemTime, out: &mut impl std::fmt::Write) -> std::fmt::Result {
    const YEAR_10000: u64 = 253_402_300_800;
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) if d.as_secs() < YEAR_10000 => {
            write!(out, "{}", humantime::format_rfc3339_micros(t))
        }
        _ => tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut tracing_subscriber::fmt::format::Writer::new(out)),
    }
}

/// A socket address as its `Display` writes it; IPv4 without the
/// formatter's per-octet machinery (about a tenth of the instructions).
pub struct AddrText<'a>(pub &'a SocketAddr);

impl std::fmt::Display for AddrText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let SocketAddr::V4(a) = self.0 else {
            return std::fmt::Display::fmt(self.0, f);
        };
        // "255.255.255.255:65535"
        let mut buf = [0u8; 21];
        let mut n = 0;
        for (i, octet) in a.ip().octets().into_iter().enumerate() {
            if i > 0 {
                buf[n] = b'.';
                n += 1;
            }
            n += decimal(u32::from(octet), &mut buf[n..]);
        }
        buf[n] = b':';
        n += 1;
        n += decimal(u32::from(a.port()), &mut buf[n..]);
        f.write_str(std::str::from_utf8(&buf[..n]).unwrap_or_default())
    }
}

/// Writes `v` (at most 5 digits) in decimal at the start of `out`;
/// returns the digits written.
fn decimal(v: u32, out: &mut [u8]) -> usize {
    let mut digits = [0u8; 5];
    let mut len = 0;
    let mut rest = v;
    loop {
        digits[len] = b'0' + (rest % 10) as u8;
        len += 1;
        rest /= 10;
        if rest == 0 || len == digits.len() {
            break;
        }
    }
    for (slot, d) in out.iter_mut().zip(digits[..len].iter().rev()) {
        *slot = *d;
    }
    len
}

/// `fmt::Write` into the line's bytes.
struct Utf8Sink<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Utf8Sink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The line without its timestamp's value (the clock moves between
    /// the two lines).
    fn untimed(line: &str) -> (String, String) {
        let (head, rest) = line.split_once(",\"level\"").unwrap();
        let ts = head
            .trim_start_matches("{\"timestamp\":\"")
            .trim_end_matches('"');
        (ts.to_string(), rest.to_string())
    }

    /// The timestamp has the subscriber's timer's form, to the microsecond.
    #[test]
    fn timestamps_as_the_subscriber_writes_them() {
        use std::time::Duration;
        let at = |secs: u64, micros: u32| {
            let mut out = String::new();
            let t = SystemTime::UNIX_EPOCH + Duration::new(secs, micros * 1000);
            timestamp(t, &mut out).unwrap();
            out
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_796_635_069, 123_456), "2026-12-07T09:17:49.123456Z");
        assert_eq!(at(4_102_444_799, 999_999), "2099-12-31T23:59:59.999999Z");
        // The same clock as the subscriber's: to the minute as one of its
        // readings just before and after.
        let theirs = || {
            let mut s = String::new();
            tracing_subscriber::fmt::time::SystemTime
                .format_time(&mut tracing_subscriber::fmt::format::Writer::new(&mut s))
                .unwrap();
            s
        };
        let before = theirs();
        let mut ours = String::new();
        timestamp(SystemTime::now(), &mut ours).unwrap();
        let after = theirs();
        assert!(ours[..16] == before[..16] || ours[..16] == after[..16]);
        assert_eq!(ours.len(), before.len());
        // Out of humantime's range: the subscriber's own timer, no panic.
        let mut early = String::new();
        timestamp(SystemTime::UNIX_EPOCH - Duration::from_secs(1), &mut early).unwrap();
        assert!(early.ends_with('Z'));
    }

    /// IPv4 addresses are written as `Display` writes them.
    #[test]
    fn addresses_as_display_writes_them() {
        let addrs = [
            "0.0.0.0:0",
            "127.0.0.1:8080",
            "10.20.30.40:443",
            "255.255.255.255:65535",
            "1.2.3.4:9",
            "[::1]:80",
            "[fe80::1%2]:443",
        ];
        for a in addrs {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(AddrText(&addr).to_string(), addr.to_string());
        }
        for i in 0..5000u32 {
            let v = i.wrapping_mul(2_654_435_761);
            let addr = SocketAddr::from((v.to_be_bytes(), (v >> 7) as u16));
            assert_eq!(AddrText(&addr).to_string(), addr.to_string());
        }
    }

    /// The access log line is byte for byte what tracing-subscriber's JSON
    /// formatter writes for the same fields: escaping, floats, the `None`
    /// fields left out, the timestamp's form.
    #[test]
    fn same_bytes_as_the_subscriber() {
        let cap = Capture::default();
        let sink = cap.clone();
        let sub = tracing_subscriber::fmt()
            .json()
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(move || sink.clone())
            .finish();
        let addr: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let odd = "/a\"b\\c\n\u{1}\u{7f}é";
        tracing::subscriber::with_default(sub, || {
            tracing::info!(
                target: "crank::access",
                direction = "outbound",
                path = odd,
                status = 503u16,
                duration_ms = 0.000_123_4f64,
                protocol = ?http::Version::HTTP_2,
                upstream = Some(addr).as_ref().map(tracing::field::display),
                peer = None::<&str>,
                retries = 2u32,
                error = Some("boom \"x\"".to_string()),
            );
        });
        let mut ours = String::new();
        JsonLine::build(
            "crank::access",
            |l| {
                l.str("direction", Some("outbound"));
                l.str("path", Some(odd));
                l.u64("status", 503);
                l.f64("duration_ms", 0.000_123_4);
                l.display("protocol", Some(&"HTTP/2.0"));
                l.display("upstream", Some(&addr));
                l.str("peer", None);
                l.u64("retries", 2);
                l.display("error", Some(&"boom \"x\""));
            },
            |b| ours = String::from_utf8(b.to_vec()).unwrap(),
        );
        let theirs = String::from_utf8(cap.0.lock().unwrap().clone()).unwrap();
        let (ts_a, rest_a) = untimed(&theirs);
        let (ts_b, rest_b) = untimed(&ours);
        assert_eq!(rest_a, rest_b);
        assert_eq!(ts_a.len(), ts_b.len(), "{ts_a} / {ts_b}");
        assert!(ours.ends_with("\"target\":\"crank::access\"}\n"), "{ours}");
        let v: serde_json::Value = serde_json::from_str(&ours).unwrap();
        assert_eq!(v["fields"]["path"], odd);
    }
}
