//! A raw HTTP/1.1 client over `std::net::TcpStream`, for requests no real
//! client library would send (ambiguous framing, folded headers, bad
//! chunks): write exact bytes, read exact responses.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// One parsed response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// The status line and headers, as received.
    pub head: String,
    pub body: String,
}

impl RawResponse {
    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// A raw connection with everything received so far.
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
    closed: bool,
}

impl RawConn {
    pub fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        stream.set_nodelay(true).ok();
        RawConn {
            stream,
            buf: Vec::new(),
            closed: false,
        }
    }

    /// Writes `bytes`; a peer that already closed is not an error here
    /// (what it answered before closing is still read).
    pub fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
        let _ = self.stream.flush();
    }

    /// Reads until the peer closes or `timeout` passes; returns whether it closed.
    pub fn read_until_closed(&mut self, timeout: Duration) -> bool {
        // Whatever arrives meanwhile stays in the buffer for `read_response`.
        let deadline = Instant::now() + timeout;
        while !self.closed && Instant::now() < deadline {
            self.fill(deadline);
        }
        self.closed
    }

    /// Reads the next complete response (Content-Length, chunked, or
    /// close-delimited body); None when the peer closed without one or
    /// nothing came within `timeout`.
    pub fn read_response(&mut self, timeout: Duration) -> Option<RawResponse> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((resp, used)) = parse_response(&self.buf, self.closed) {
                self.buf.drain(..used);
                return Some(resp);
            }
            if self.closed || Instant::now() >= deadline {
                return None;
            }
            self.fill(deadline);
        }
    }

    /// Reads every response until the peer closes or `timeout` passes.
    pub fn read_all_responses(&mut self, timeout: Duration) -> Vec<RawResponse> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while let Some(r) = self.read_response(deadline.saturating_duration_since(Instant::now())) {
            out.push(r);
        }
        out
    }

    /// Everything received and not yet parsed, as text.
    pub fn unparsed(&self) -> String {
        String::from_utf8_lossy(&self.buf).to_string()
    }

    fn fill(&mut self, deadline: Instant) {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        self.stream.set_read_timeout(Some(left)).ok();
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk) {
            Ok(0) => self.closed = true,
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => self.closed = true,
        }
    }
}

/// Sends `bytes` on a fresh connection and returns every response the peer
/// sends before it closes (or `timeout` passes), and whether it closed.
pub fn exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> (Vec<RawResponse>, bool) {
    let mut c = RawConn::connect(addr);
    c.send(bytes);
    let responses = c.read_all_responses(timeout);
    (responses, c.closed)
}

fn parse_response(buf: &[u8], closed: bool) -> Option<(RawResponse, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end - 4]).to_string();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let resp = |body: &[u8]| RawResponse {
        status,
        head: head.clone(),
        body: String::from_utf8_lossy(body).to_string(),
    };
    let h = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let rest = &buf[end..];
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Some((resp(b""), end));
    }
    if let Some(len) = h("content-length").and_then(|v| v.parse::<usize>().ok()) {
        return (rest.len() >= len).then(|| (resp(&rest[..len]), end + len));
    }
    if h("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let (body, used) = dechunk(rest)?;
        return Some((resp(&body), end + used));
    }
    // Close-delimited.
    closed.then(|| (resp(rest), buf.len()))
}

fn dechunk(mut b: &[u8]) -> Option<(Vec<u8>, usize)> {
    let total = b.len();
    let mut body = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&b[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[line_end + 2..];
        if size == 0 {
            // Trailers, then the blank line.
            let t_end = b.windows(2).position(|w| w == b"\r\n")?;
            if t_end == 0 {
                return Some((body, total - b.len() + 2));
            }
            let blank = b.windows(4).position(|w| w == b"\r\n\r\n")?;
            return Some((body, total - b.len() + blank + 4));
        }
        if b.len() < size + 2 {
            return None;
        }
        body.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}
