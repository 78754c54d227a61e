//! Request-smuggling defences for HTTP/1 requests from any client.
//!
//! Pingora already rejects invalid `Content-Length` values, HTTP/1.0 with
//! `Transfer-Encoding`, and non-chunked final codings, and its chunked body
//! reader rejects bad chunk sizes. When a request carries both
//! `Content-Length` and `Transfer-Encoding`, Pingora drops the length and
//! goes on (which RFC 9112 allows); a mesh between services should not guess,
//! so [`check_raw_header`] looks at the raw header block and rejects such a
//! request, repeated conflicting lengths, and obs-fold continuation lines.

/// What is wrong with a request's framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramingError {
    ContentLengthWithTransferEncoding,
    ConflictingContentLength,
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
            for part in value.split(|b| *b == b',').map(trim) {
                match content_length {
                    Some(prev) if prev != part => {
                        return Err(FramingError::ConflictingContentLength)
                    }
                    _ => content_length = Some(part),
                }
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
}
