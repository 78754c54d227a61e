//! What a request names: its authority (absolute-form target, `:authority`
//! or `Host`), and the origin-form rewrite of an absolute-form target.
//! Pure functions over the request head.

use pingora_http::RequestHeader;

/// The authority a request names: an absolute-form target's authority
/// (RFC 9112 §3.2.2: it wins over `Host`), the h2 `:authority`, or `Host`.
/// Borrowed from the request head: route selection reads it on every request.
pub fn request_authority(req: &RequestHeader) -> Option<&str> {
    if let Some((_, authority, _)) = split_absolute(req.raw_path()) {
        return Some(authority);
    }
    req.uri.authority().map(|a| a.as_str()).or_else(|| {
        req.headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

/// The host part of an authority (`backend:8080` → `backend`, `[::1]:80` → `[::1]`).
pub fn host_only(authority: &str) -> &str {
    match authority.rfind(':') {
        Some(i) if !authority[i + 1..].contains(']') => &authority[..i],
        _ => authority,
    }
}

/// Splits `http://authority/path?q` into (scheme, authority, path-and-query).
pub fn split_absolute(target: &[u8]) -> Option<(&str, &str, &str)> {
    let t = std::str::from_utf8(target).ok()?;
    let (scheme, rest) = t.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, pq) = rest.split_at(split);
    Some((scheme, authority, pq))
}

/// An absolute-form target (`GET http://svc/path`, from an `HTTP_PROXY`
/// client) becomes origin-form with the authority in `Host`.
pub fn to_origin_form(req: &mut RequestHeader) -> pingora_error::Result<()> {
    let Some((_, authority, pq)) = split_absolute(req.raw_path()) else {
        return Ok(());
    };
    let (authority, pq) = (authority.to_string(), pq.to_string());
    let origin = if pq.starts_with('/') {
        pq
    } else {
        format!("/{pq}")
    };
    req.set_raw_path(origin.as_bytes())?;
    req.insert_header(http::header::HOST, authority)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str) -> RequestHeader {
        RequestHeader::build("GET", uri.as_bytes(), None).unwrap()
    }

    #[test]
    fn authority_precedence() {
        let mut abs = req("http://Backend:80/x");
        abs.insert_header("host", "other").unwrap();
        assert_eq!(request_authority(&abs), Some("Backend:80"));
        let mut origin = req("/x");
        origin.insert_header("host", "backend").unwrap();
        assert_eq!(request_authority(&origin), Some("backend"));
        assert_eq!(request_authority(&req("/x")), None);
        let q = req("http://svc?x=1");
        assert_eq!(split_absolute(q.raw_path()), Some(("http", "svc", "?x=1")));
    }

    #[test]
    fn absolute_form_becomes_origin_form() {
        let mut r = req("http://backend:8080/a/b?x=1");
        to_origin_form(&mut r).unwrap();
        assert_eq!(r.raw_path(), b"/a/b?x=1");
        assert_eq!(r.headers["host"], "backend:8080");
        let mut o = req("/keep?y");
        to_origin_form(&mut o).unwrap();
        assert_eq!(o.raw_path(), b"/keep?y");
        assert!(o.headers.get("host").is_none());
    }
}
