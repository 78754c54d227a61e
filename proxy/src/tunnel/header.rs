//! The tunnel's two small frames (`docs/reference/opaque-tcp.md`): the
//! header the outbound sidecar writes first (where the connection was
//! going and for which capability), and the inbound sidecar's one reply
//! (open, or why not). Pure encoding and parsing, tested by table.
//!
//! On the wire, inside the mTLS connection:
//!
//! ```text
//! header: "\0crank-tunnel/1\n"  u16 length (big endian)  JSON {"destination", "capability"}
//! reply:                        u16 length (big endian)  JSON {"ok": true} | {"error", "detail"}
//! ```
//!
//! The leading NUL byte can start neither an HTTP/1 request line nor the
//! h2 preface, so the inbound listener tells a tunnel from HTTP by the
//! first byte (see [`crate::conn::Divert`]).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The first bytes of every tunnel: protocol name and version.
pub const MAGIC: &[u8] = b"\0crank-tunnel/1\n";
/// The largest header or reply body accepted.
pub const MAX_FRAME: usize = 4096;

/// Where a tunnelled connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// The address the app connected to (captured traffic); absent for an
    /// `outbound.tcp` port.
    #[serde(default)]
    pub destination: Option<SocketAddr>,
    /// The capability the caller's sidecar resolved.
    #[serde(default)]
    pub capability: Option<String>,
}

/// The inbound sidecar's answer, before any app byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    #[serde(default)]
    pub ok: bool,
    /// Why the tunnel was refused: a close reason (`policy-denied`,
    /// `no-local-upstream`, `app-unreachable`, `limit`, `peer-unverified`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Reply {
    pub fn open() -> Self {
        Reply {
            ok: true,
            error: None,
            detail: None,
        }
    }

    pub fn refused(error: &str, detail: impl Into<String>) -> Self {
        Reply {
            ok: false,
            error: Some(error.to_string()),
            detail: Some(detail.into()),
        }
    }
}

/// A frame that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not a crank tunnel (the first bytes are not \"\\0crank-tunnel/1\\n\"); only crank-proxy sidecars open tunnels")]
    NotATunnel,
    #[error("tunnel frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLong(usize),
    #[error("tunnel frame is not valid JSON of the expected shape: {0}")]
    Json(String),
}

/// The header's bytes: magic, length, JSON.
pub fn encode_header(h: &Header) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&frame(h));
    out
}

/// A reply's bytes: length, JSON.
pub fn encode_reply(r: &Reply) -> Vec<u8> {
    frame(r)
}

fn frame<T: Serialize>(v: &T) -> Vec<u8> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// How much of `buf` a complete frame (after any magic) takes: `Ok(None)`
/// when more bytes are needed.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    Ok((buf.len() >= 2 + len).then_some(2 + len))
}

/// Parses a header from the start of `buf`: the header and the bytes it
/// took, or `Ok(None)` when more are needed. Bytes after it belong to the
/// app's stream.
pub fn parse_header(buf: &[u8]) -> Result<Option<(Header, usize)>, FrameError> {
    let n = buf.len().min(MAGIC.len());
    if buf[..n] != MAGIC[..n] {
        return Err(FrameError::NotATunnel);
    }
    if n < MAGIC.len() {
        return Ok(None);
    }
    parse_frame(&buf[MAGIC.len()..]).map(|o| o.map(|(h, used)| (h, MAGIC.len() + used)))
}

/// Parses a reply from the start of `buf`, as [`parse_header`].
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, FrameError> {
    parse_frame(buf)
}

fn parse_frame<T: for<'de> Deserialize<'de>>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    let Some(used) = frame_len(buf)? else {
        return Ok(None);
    };
    let v = serde_json::from_slice(&buf[2..used]).map_err(|e| FrameError::Json(e.to_string()))?;
    Ok(Some((v, used)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            destination: Some("10.0.0.3:5432".parse().unwrap()),
            capability: Some("db:postgres".into()),
        }
    }

    #[test]
    fn a_header_round_trips_and_leaves_the_apps_bytes() {
        let mut wire = encode_header(&header());
        wire.extend_from_slice(b"SELECT 1");
        let (h, used) = parse_header(&wire).unwrap().unwrap();
        assert_eq!(h, header());
        assert_eq!(&wire[used..], b"SELECT 1");
    }

    #[test]
    fn every_prefix_of_a_header_asks_for_more() {
        let wire = encode_header(&header());
        for cut in 0..wire.len() {
            assert_eq!(parse_header(&wire[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn bad_headers_are_refused_with_the_cause() {
        let cases: &[(&[u8], FrameError)] = &[
            (b"GET / HTTP/1.1\r\n", FrameError::NotATunnel),
            (b"\0crank-tunnel/2\n\0\x02{}", FrameError::NotATunnel),
            (b"\0crank-tunnel/1\n\x10\x01", FrameError::TooLong(4097)),
        ];
        for (wire, want) in cases {
            assert_eq!(parse_header(wire).unwrap_err(), *want);
        }
        let junk = [MAGIC, b"\0\x03{x}"].concat();
        assert!(matches!(parse_header(&junk), Err(FrameError::Json(_))));
        let unknown = [MAGIC, b"\0\x07{\"a\":1}"].concat();
        assert!(matches!(parse_header(&unknown), Err(FrameError::Json(_))));
    }

    #[test]
    fn replies_round_trip() {
        for r in [Reply::open(), Reply::refused("policy-denied", "no rule")] {
            let wire = encode_reply(&r);
            assert_eq!(parse_reply(&wire).unwrap(), Some((r, wire.len())));
        }
        assert_eq!(parse_reply(b"\0"), Ok(None));
    }

    #[test]
    fn an_empty_header_means_neither_destination_nor_capability() {
        let wire = [MAGIC, b"\0\x02{}"].concat();
        let (h, _) = parse_header(&wire).unwrap().unwrap();
        assert_eq!(h, Header::default());
    }
}
