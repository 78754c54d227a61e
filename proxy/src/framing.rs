//! Request-smuggling defences for HTTP/1 requests from any client.
//!
//! Pingora already rejects invalid `Content-Length` values, HTTP/1.0 with
//! `Transfer-Encoding`, and non-chunked final codings, and its chunked body
//! reader rejects bad chunk sizes. When a request carries both
//! `Content-Length` and `Transfer-Encoding`, Pingora drops the length and
//! goes on (which RFC 9112 allows); a mesh between services should not guess,
//! so [`check_raw_header`] looks at the raw header block and rejects such a
//! request, repeated conflicting lengths, and obs-fold continuation lines.

use crate::errors::{Reason, Refusal};

/// What is wrong with a request's framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramingError {
    ContentLengthWithTransferEncoding,
    ConflictingContentLength,
    /// `Content-Length: 5, 5`: RFC 9110 lets a recipient collapse a list of
    /// equal values, but HTTP/2 forbids it, so the peer sidecar would reset
    /// the request: refused here, at the edge.
    ContentLengthList,
    ObsFold,
}

impl FramingError {
    pub fn detail(&self) -> &'static str {
        match self {
            FramingError::ContentLengthWithTransferEncoding => {
                "both Content-Length and Transfer-Encoding are present"
            }
            FramingError::ConflictingContentLength => {
                "Content-Length is repeated with different values"
            }
            FramingError::ContentLengthList => {
                "Content-Length is a comma-separated list; send it once with a single value"
            }
            FramingError::ObsFold => {
                "a header line is folded (obs-fold), which RFC 9112 forbids in requests"
            }
        }
    }
}

/// Checks the raw header block of an HTTP/1 request (request line included).
pub fn check_raw_header(raw: &[u8]) -> Result<(), FramingError> {
    let mut content_length: Option<&[u8]> = None;
    let mut has_te = false;
    let mut has_cl = false;
    let mut lines = raw
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let _request_line = lines.next();
    for line in lines {
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(FramingError::ObsFold);
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = &line[..colon];
        let value = trim(&line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            has_cl = true;
            let is_list = value.contains(&b',');
            for part in value.split(|b| *b == b',').map(trim) {
                match content_length {
                    Some(prev) if prev != part => {
                        return Err(FramingError::ConflictingContentLength)
                    }
                    _ => content_length = Some(part),
                }
            }
            if is_list {
                return Err(FramingError::ContentLengthList);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            has_te = true;
        }
    }
    if has_cl && has_te {
        return Err(FramingError::ContentLengthWithTransferEncoding);
    }
    Ok(())
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// The size of a request's header list as HTTP/2 counts it (RFC 9113
/// §6.5.2): name + value + 32 bytes per field, the pseudo-headers
/// (`:method`, `:scheme`, `:authority`, `:path`) included. The edge limit
/// (`limits.max_request_header_bytes`) is checked with this count so that
/// what one sidecar accepts from an HTTP/1 or HTTP/2 client also fits the
/// next sidecar's HTTP/2 server.
pub fn header_list_size(req: &pingora_http::RequestHeader) -> usize {
    const FIELD: usize = 32;
    let pseudo = (":method".len() + req.method.as_str().len() + FIELD)
        + (":scheme".len() + "https".len() + FIELD)
        + (":path".len() + req.raw_path().len() + FIELD)
        + (":authority".len() + req.uri.authority().map_or(0, |a| a.as_str().len()) + FIELD);
    req.headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + FIELD)
        .sum::<usize>()
        + pseudo
}

/// The edge stage: ambiguous HTTP/1 framing in the raw head (`raw`, HTTP/1
/// only), a header list larger than the peer sidecar's HTTP/2 server takes
/// (431), or an HTTP/1.1 request without `Host` (400, RFC 9112 §3.2).
pub fn check_head(
    raw: Option<&[u8]>,
    req: &pingora_http::RequestHeader,
    max_header_bytes: usize,
) -> Result<(), Refusal> {
    if let Some(Err(fe)) = raw.map(check_raw_header) {
        return Err(Refusal::new(Reason::BadFraming, fe.detail()));
    }
    match edge_refusal(req, max_header_bytes) {
        Some((reason, detail)) => Err(Refusal::new(reason, detail)),
        None => Ok(()),
    }
}

/// A request refused at the edge, before routing: a header list larger
/// than the peer sidecar's HTTP/2 server takes (431), or an HTTP/1.1
/// request without `Host` (400, RFC 9112 §3.2).
pub fn edge_refusal(
    req: &pingora_http::RequestHeader,
    max_header_bytes: usize,
) -> Option<(Reason, String)> {
    let size = header_list_size(req);
    if size > max_header_bytes {
        return Some((
            Reason::RequestHeaderTooLarge,
            format!("{size} bytes of headers; the limit is {max_header_bytes}"),
        ));
    }
    if req.version == http::Version::HTTP_11
        && !req.headers.contains_key(http::header::HOST)
        && crate::routing::authority::split_absolute(req.raw_path()).is_none()
    {
        return Some((
            Reason::BadRequest,
            "an HTTP/1.1 request needs a Host header (RFC 9112 section 3.2)".to_string(),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use FramingError::*;

    #[test]
    fn framing_table() {
        let cases: &[(&str, Result<(), FramingError>)] = &[
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", Ok(())),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
                Ok(()),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                Ok(()),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                Ok(()),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(ContentLengthWithTransferEncoding),
            ),
            (
                "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 0\r\n\r\n",
                Err(ContentLengthWithTransferEncoding),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                Err(ConflictingContentLength),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
                Err(ConflictingContentLength),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
                Err(ContentLengthList),
            ),
            ("GET / HTTP/1.1\r\nX-A: b\r\n  folded\r\n\r\n", Err(ObsFold)),
            ("GET / HTTP/1.1\nHost: a\n\tfolded\n\n", Err(ObsFold)),
            // body bytes after the blank line are not headers
            (
                "POST / HTTP/1.1\r\nContent-Length: 20\r\n\r\nTransfer-Encoding: x",
                Ok(()),
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(check_raw_header(raw.as_bytes()), *want, "{raw:?}");
        }
    }

    #[test]
    fn header_list_size_counts_like_http2() {
        let mut r = pingora_http::RequestHeader::build("GET", b"/abc", None).unwrap();
        let base = header_list_size(&r);
        // :method GET, :scheme https, :path /abc, :authority (empty)
        assert_eq!(base, (7 + 3 + 32) + (7 + 5 + 32) + (5 + 4 + 32) + (10 + 32));
        r.append_header("x-a", "12345").unwrap();
        assert_eq!(header_list_size(&r), base + 3 + 5 + 32);
        r.append_header("x-a", "1").unwrap();
        assert_eq!(header_list_size(&r), base + 3 + 5 + 32 + 3 + 1 + 32);
    }

    fn req(uri: &str) -> pingora_http::RequestHeader {
        pingora_http::RequestHeader::build("GET", uri.as_bytes(), None).unwrap()
    }

    #[test]
    fn edge_refusals() {
        let mut ok = req("/x");
        ok.insert_header("host", "backend").unwrap();
        assert_eq!(edge_refusal(&ok, 60 * 1024), None);
        // HTTP/1.0 needs no Host; absolute form carries the authority.
        let mut old = req("/x");
        old.set_version(http::Version::HTTP_10);
        assert_eq!(edge_refusal(&old, 60 * 1024), None);
        assert_eq!(edge_refusal(&req("http://backend/x"), 60 * 1024), None);
        let (reason, detail) = edge_refusal(&req("/x"), 60 * 1024).unwrap();
        assert_eq!(reason, Reason::BadRequest);
        assert!(detail.contains("Host"), "{detail}");
        let mut big = ok.clone();
        big.insert_header("x-big", "a".repeat(70 * 1024)).unwrap();
        let (reason, detail) = edge_refusal(&big, 60 * 1024).unwrap();
        assert_eq!(reason, Reason::RequestHeaderTooLarge);
        assert_eq!(reason.status(), 431);
        assert!(detail.contains("61440"), "{detail}");
    }
}
