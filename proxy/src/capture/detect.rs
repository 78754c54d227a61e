//! Protocol detection on a captured connection: the client's first bytes
//! say TLS (a ClientHello record), HTTP/1.x (a request line's method), h2
//! (the connection preface) or, otherwise, opaque TCP.
//!
//! [`detect`] is pure: it answers as soon as the bytes seen decide, and
//! asks for more only while they are still a prefix of something it
//! knows, so it never needs more than the 24 bytes of the h2 preface.
//! [`sniff`] reads those bytes with a deadline (`capture.detect_timeout`):
//! a client that sends nothing (a server-speaks-first protocol on a port
//! nobody declared) is opaque TCP once the deadline passes. Ports declared
//! server-speaks-first (`capture.server_speaks_first`) are not read at
//! all: the banner must not wait for a detection that cannot succeed
//! (linkerd2 #3166, #10745).

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The request methods (and the space after them) that make an HTTP/1.x
/// request line (RFC 9110 §9 and PATCH).
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// What a captured connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    H2,
    /// TLS from the app: opaque to the proxy (it cannot read inside).
    Tls,
    Opaque,
}

impl Protocol {
    /// The `protocol` label of `crank_capture_connections_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2 => "h2",
            Protocol::Tls => "tls",
            Protocol::Opaque => "opaque",
        }
    }

    /// HTTP the proxy routes request by request.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http1 | Protocol::H2)
    }
}

/// How detection ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The first bytes decided.
    Detected,
    /// No decision within `capture.detect_timeout`: opaque.
    Timeout,
    /// A server-speaks-first port: not read, opaque at once.
    Skipped,
    /// The client closed before its bytes decided: opaque.
    Closed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Detected => "detected",
            Outcome::Timeout => "timeout",
            Outcome::Skipped => "skipped",
            Outcome::Closed => "closed",
        }
    }
}

/// What the bytes seen so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Is(Protocol),
    /// Still a prefix of something known: read more.
    NeedMore,
}

/// The protocol `seen` (the connection's first bytes) starts, or
/// [`Verdict::NeedMore`].
pub fn detect(seen: &[u8]) -> Verdict {
    if seen.is_empty() {
        return Verdict::NeedMore;
    }
    let n = seen.len().min(H2_PREFACE.len());
    if seen[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Verdict::Is(Protocol::H2)
        } else {
            Verdict::NeedMore
        };
    }
    if let Some(v) = tls(seen) {
        return v;
    }
    let mut could_be_http = false;
    for m in METHODS {
        let n = seen.len().min(m.len());
        if seen[..n] == m[..n] {
            if n == m.len() {
                return Verdict::Is(Protocol::Http1);
            }
            could_be_http = true;
        }
    }
    if could_be_http {
        Verdict::NeedMore
    } else {
        Verdict::Is(Protocol::Opaque)
    }
}

/// A TLS handshake record holding a ClientHello: content type 22, version
/// 3.x (x ≤ 4), two length bytes, handshake type 1. `None` when the first
/// byte is not 22.
fn tls(seen: &[u8]) -> Option<Verdict> {
    if seen[0] != 0x16 {
        return None;
    }
    let opaque = Some(Verdict::Is(Protocol::Opaque));
    match seen.get(1) {
        Some(&v) if v != 0x03 => return opaque,
        _ => {}
    }
    match seen.get(2) {
        Some(&v) if v > 0x04 => return opaque,
        _ => {}
    }
    Some(match seen.get(5) {
        Some(0x01) => Verdict::Is(Protocol::Tls),
        Some(_) => Verdict::Is(Protocol::Opaque),
        None => Verdict::NeedMore,
    })
}

/// Reads the client's first bytes until they decide or `timeout` passes;
/// `skip` (a server-speaks-first port) reads nothing. Returns the protocol,
/// how detection ended and every byte read (to be sent on first).
pub async fn sniff<S: AsyncRead + Unpin>(
    stream: &mut S,
    skip: bool,
    timeout: Duration,
) -> io::Result<(Protocol, Outcome, Vec<u8>)> {
    if skip {
        return Ok((Protocol::Opaque, Outcome::Skipped, Vec::new()));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        if let Verdict::Is(p) = detect(&seen) {
            return Ok((p, Outcome::Detected, seen));
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Ok((Protocol::Opaque, Outcome::Timeout, seen)),
            Ok(Ok(0)) => return Ok((Protocol::Opaque, Outcome::Closed, seen)),
            Ok(Ok(n)) => seen.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Protocol::*;
    use Verdict::*;

    #[test]
    fn first_bytes_table() {
        let hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00];
        let cases: &[(&[u8], Verdict)] = &[
            (b"", NeedMore),
            (b"GET / HTTP/1.1\r\n", Is(Http1)),
            (b"GET ", Is(Http1)),
            (b"GE", NeedMore),
            (b"POST /x HTTP/1.0\r\n", Is(Http1)),
            (b"PUT", NeedMore),
            (b"PATCH /a HTTP/1.1", Is(Http1)),
            (b"OPTIONS * HTTP/1.1", Is(Http1)),
            (b"CONNECT a:443 HTTP/1.1", Is(Http1)),
            (b"get / HTTP/1.1", Is(Opaque)),
            (b"GETX", Is(Opaque)),
            (b"P", NeedMore),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Is(H2)),
            (b"PRI * HTTP/2.0\r\n", NeedMore),
            (b"PRI * HTTP/1.1\r\n", Is(Opaque)),
            (&hello, Is(Tls)),
            (&hello[..3], NeedMore),
            (&[0x16, 0x03, 0x03, 0x00, 0x10, 0x02], Is(Opaque)),
            (&[0x16, 0x02], Is(Opaque)),
            (&[0x16, 0x03, 0x09], Is(Opaque)),
            // PostgreSQL's SSLRequest and StartupMessage, Redis, binary.
            (&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f], Is(Opaque)),
            (b"*1\r\n$4\r\nPING\r\n", Is(Opaque)),
            (&[0xff, 0x00], Is(Opaque)),
        ];
        for (bytes, want) in cases {
            assert_eq!(detect(bytes), *want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn every_prefix_of_a_decided_input_asks_for_more_or_agrees() {
        for full in [&b"DELETE /x HTTP/1.1"[..], H2_PREFACE] {
            let want = detect(full);
            for n in 0..full.len() {
                let v = detect(&full[..n]);
                assert!(v == NeedMore || v == want, "{n}: {v:?}");
            }
        }
    }

    #[test]
    fn labels() {
        assert_eq!(Tls.as_str(), "tls");
        assert_eq!(Outcome::Skipped.as_str(), "skipped");
        assert!(H2.is_http() && !Tls.is_http());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_opaque_at_the_deadline() {
        let (_client, mut server) = tokio::io::duplex(64);
        let started = tokio::time::Instant::now();
        let got = sniff(&mut server, false, Duration::from_secs(1)).await;
        let (p, o, seen) = got.unwrap();
        assert_eq!((p, o), (Opaque, Outcome::Timeout));
        assert!(seen.is_empty());
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_speaks_first_port_is_not_read() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let started = tokio::time::Instant::now();
        let (p, o, seen) = sniff(&mut server, true, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!((p, o, seen.len()), (Opaque, Outcome::Skipped, 0));
        assert_eq!(started.elapsed(), Duration::ZERO);
        // The bytes are still in the stream for whoever reads next.
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET ");
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_in_pieces_are_kept_and_decide() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.write_all(b"\r\nSM\r\n\r\n").await.unwrap();
            client
        });
        let (p, o, seen) = sniff(&mut server, false, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!((p, o), (H2, Outcome::Detected));
        assert_eq!(seen, H2_PREFACE);
        drop(writer.await.unwrap());
        let (_, o, _) = sniff(&mut server, false, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(o, Outcome::Closed);
    }
}
