//! W3C Trace Context (Level 2: the random trace-id flag and the current
//! `tracestate` key grammar): parsing and validating `traceparent` and
//! `tracestate`, and the header values to forward. Pure functions over header
//! values, tested with one table per rule of the recommendation and one
//! mirroring the `tracestate` cases of the W3C test suite
//! (`w3c/trace-context`, `test/test.py`).
//!
//! The spans and their export (issue #7) build on this; today the proxy uses
//! it to link policy decisions to traces.

/// `trace-flags` bit: the caller sampled this trace.
pub const FLAG_SAMPLED: u8 = 0x01;
/// `trace-flags` bit (Level 2): the trace id's right 7 bytes are random.
pub const FLAG_RANDOM: u8 = 0x02;

/// A valid incoming `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The version the caller sent (we always forward version 00).
    pub version: u8,
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    pub fn sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }

    /// The trace id as 32 lower-case hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The header value for the next hop: version 00, the same trace id,
    /// `span_id` as the parent, and the flags this version defines (sampled,
    /// random); unknown flag bits are not propagated.
    pub fn child(&self, span_id: [u8; 8]) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&span_id),
            self.flags & (FLAG_SAMPLED | FLAG_RANDOM)
        )
    }
}

/// Why a `traceparent` is not used (the proxy then starts a new trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    Missing,
    /// More than one `traceparent` header.
    Duplicate,
    /// Wrong length or separators for its version.
    Format,
    /// A character that is not lower-case hex.
    NotLowerHex,
    /// Version `ff` is forbidden.
    Version,
    /// An all-zero trace id.
    ZeroTraceId,
    /// An all-zero parent id.
    ZeroParentId,
}

/// Parses the `traceparent` header values of one request (all of them: a
/// request with two is invalid).
pub fn parse_traceparent<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
) -> Result<TraceParent, Invalid> {
    let mut it = values.into_iter();
    let first = it.next().ok_or(Invalid::Missing)?;
    if it.next().is_some() {
        return Err(Invalid::Duplicate);
    }
    parse_one(first)
}

fn parse_one(v: &[u8]) -> Result<TraceParent, Invalid> {
    // Surrounding optional whitespace is not part of the field value.
    let v = trim_ows(v);
    if v.len() < 55 {
        return Err(Invalid::Format);
    }
    let version = hex_byte(&v[0..2])?;
    if version == 0xff {
        return Err(Invalid::Version);
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return Err(Invalid::Format);
    }
    // Version 00 is exactly 55 characters. A later version may append
    // fields after a dash; we read the version-00 part of it (§3.2.4).
    if (version == 0 && v.len() != 55) || (version > 0 && v.len() > 55 && v[55] != b'-') {
        return Err(Invalid::Format);
    }
    let mut trace_id = [0u8; 16];
    for (i, b) in trace_id.iter_mut().enumerate() {
        *b = hex_byte(&v[3 + 2 * i..5 + 2 * i])?;
    }
    let mut parent_id = [0u8; 8];
    for (i, b) in parent_id.iter_mut().enumerate() {
        *b = hex_byte(&v[36 + 2 * i..38 + 2 * i])?;
    }
    let flags = hex_byte(&v[53..55])?;
    if trace_id == [0; 16] {
        return Err(Invalid::ZeroTraceId);
    }
    if parent_id == [0; 8] {
        return Err(Invalid::ZeroParentId);
    }
    Ok(TraceParent {
        version,
        trace_id,
        parent_id,
        flags,
    })
}

/// Most list members a `tracestate` may carry (§3.3.1.1).
pub const MAX_MEMBERS: usize = 32;
/// At least this much `tracestate` must be propagated (§3.3.1.5).
pub const MIN_PROPAGATED_LEN: usize = 512;

/// Combines the `tracestate` header values of one request (several headers
/// are one comma-separated list, in order) and validates it. Returns the
/// value to forward, or `None` when it is empty or invalid: an invalid
/// `tracestate` is dropped whole and never affects `traceparent`.
///
/// A key that appears twice is kept as sent: only the sender must keep keys
/// unique (Level 2, §3.3.1.3), receivers MAY discard duplicates, and the
/// member is not ours to delete, so the proxy forwards both.
pub fn combine_tracestate<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Option<String> {
    let mut members: Vec<&str> = Vec::new();
    for v in values {
        let v = std::str::from_utf8(v).ok()?;
        for m in v.split(',') {
            let m = m.trim_matches([' ', '\t']);
            if m.is_empty() {
                continue; // empty members are allowed and dropped
            }
            let (key, value) = m.split_once('=')?;
            if !valid_key(key) || !valid_value(value) {
                return None;
            }
            members.push(m);
        }
    }
    if members.is_empty() || members.len() > MAX_MEMBERS {
        return None;
    }
    Some(members.join(","))
}

/// Shortens a combined `tracestate` to at most `limit` bytes (never below
/// [`MIN_PROPAGATED_LEN`]) the way §3.3.1.5 says: first drop members longer
/// than 128 characters, then drop members from the end.
pub fn truncate_tracestate(value: &str, limit: usize) -> String {
    let limit = limit.max(MIN_PROPAGATED_LEN);
    if value.len() <= limit {
        return value.to_string();
    }
    let mut members: Vec<&str> = value.split(',').collect();
    let joined_len =
        |m: &[&str]| m.iter().map(|s| s.len()).sum::<usize>() + m.len().saturating_sub(1);
    while joined_len(&members) > limit {
        match members.iter().rposition(|m| m.len() > 128) {
            Some(i) => {
                members.remove(i);
            }
            None => break,
        }
    }
    while joined_len(&members) > limit {
        members.pop();
    }
    members.join(",")
}

/// `key = ( lcalpha / DIGIT ) 0*255( keychar )` with `keychar = lcalpha /
/// DIGIT / "_" / "-" / "*" / "/" / "@"` (Level 2, §3.3.1.3.1): up to 256
/// characters, `@` anywhere but first. Level 1's `tenant@system` split with
/// its 241/14 limits is gone.
fn valid_key(key: &str) -> bool {
    let b = key.as_bytes();
    !b.is_empty()
        && b.len() <= 256
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b[1..].iter().all(|&c| {
            c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || matches!(c, b'_' | b'-' | b'*' | b'/' | b'@')
        })
}

/// `value = 0*255(chr) nblk-chr`, printable ASCII without `,` and `=`, not
/// ending in a space (§3.3.1.3.2).
fn valid_value(value: &str) -> bool {
    let b = value.as_bytes();
    !b.is_empty()
        && b.len() <= 256
        && b.iter()
            .all(|&c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
        && b[b.len() - 1] != b' '
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &v[start..end]
}

fn hex_byte(two: &[u8]) -> Result<u8, Invalid> {
    let nib = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(Invalid::NotLowerHex),
    };
    Ok(nib(two[0])? << 4 | nib(two[1])?)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PID: &str = "00f067aa0ba902b7";

    fn tp(v: &str) -> Result<TraceParent, Invalid> {
        parse_traceparent([v.as_bytes()])
    }

    #[test]
    fn traceparent_rules() {
        let ok = format!("00-{TID}-{PID}-01");
        // (header value, Ok((version, flags)) or the reason it is invalid)
        type Want = Result<(u8, u8), Invalid>;
        let cases: Vec<(String, Want)> = vec![
            (ok.clone(), Ok((0, 0x01))),
            (format!("00-{TID}-{PID}-00"), Ok((0, 0x00))),
            (format!("00-{TID}-{PID}-03"), Ok((0, 0x03))),
            (format!("  00-{TID}-{PID}-01\t"), Ok((0, 0x01))),
            // a future version: parsed as 00, extra fields after a dash allowed
            (format!("01-{TID}-{PID}-01"), Ok((1, 0x01))),
            (
                format!("cc-{TID}-{PID}-01-what-the-future-will-be"),
                Ok((0xcc, 0x01)),
            ),
            (format!("cc-{TID}-{PID}-01x"), Err(Invalid::Format)),
            // version 00 must be exactly 55 characters
            (format!("00-{TID}-{PID}-01-extra"), Err(Invalid::Format)),
            (format!("ff-{TID}-{PID}-01"), Err(Invalid::Version)),
            (format!("0-{TID}-{PID}-01"), Err(Invalid::Format)),
            (format!("00-{}-{PID}-01", &TID[1..]), Err(Invalid::Format)),
            (format!("00-{TID}-{}-01", &PID[1..]), Err(Invalid::Format)),
            (format!("00-{TID}-{PID}-1"), Err(Invalid::Format)),
            (format!("00_{TID}_{PID}_01"), Err(Invalid::Format)),
            (
                format!("00-{}-{PID}-01", TID.to_uppercase()),
                Err(Invalid::NotLowerHex),
            ),
            (
                format!("00-{TID}-{}-01", PID.to_uppercase()),
                Err(Invalid::NotLowerHex),
            ),
            (format!("0A-{TID}-{PID}-01"), Err(Invalid::NotLowerHex)),
            (format!("00-{TID}-{PID}-0g"), Err(Invalid::NotLowerHex)),
            (
                format!("00-{}x-{PID}-01", &TID[1..]),
                Err(Invalid::NotLowerHex),
            ),
            (
                format!("00-{}-{PID}-01", "0".repeat(32)),
                Err(Invalid::ZeroTraceId),
            ),
            (
                format!("00-{TID}-{}-01", "0".repeat(16)),
                Err(Invalid::ZeroParentId),
            ),
            (String::new(), Err(Invalid::Format)),
        ];
        for (value, want) in cases {
            let got = tp(&value).map(|t| (t.version, t.flags));
            assert_eq!(got, want, "{value:?}");
        }
        let t = tp(&ok).unwrap();
        assert_eq!(t.trace_id_hex(), TID);
        assert!(t.sampled());
    }

    #[test]
    fn missing_and_duplicate_traceparent() {
        let ok = format!("00-{TID}-{PID}-01");
        assert_eq!(
            parse_traceparent(std::iter::empty::<&[u8]>()),
            Err(Invalid::Missing)
        );
        assert_eq!(
            parse_traceparent([ok.as_bytes(), ok.as_bytes()]),
            Err(Invalid::Duplicate)
        );
    }

    #[test]
    fn the_child_keeps_the_trace_and_the_known_flags() {
        let t = tp(&format!("cc-{TID}-{PID}-ff-future")).unwrap();
        let child = t.child([1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(child, format!("00-{TID}-0102030405060708-03"));
        let unsampled = tp(&format!("00-{TID}-{PID}-00")).unwrap();
        assert!(unsampled.child([9; 8]).ends_with("-00"));
    }

    #[test]
    fn tracestate_rules() {
        let cases: Vec<(Vec<&str>, Option<&str>)> = vec![
            (vec!["congo=t61rcWkgMzE"], Some("congo=t61rcWkgMzE")),
            // several headers form one list, in order; empty members dropped
            (
                vec!["rojo=00f067aa0ba902b7", "congo=t61rcWkgMzE"],
                Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
            ),
            (vec!["a=1 , ,\tb=2"], Some("a=1,b=2")),
            (
                vec!["tenant@system=v", "0t@s-2=x"],
                Some("tenant@system=v,0t@s-2=x"),
            ),
            (vec!["k/ey_*-1=va lue"], Some("k/ey_*-1=va lue")),
            (vec![""], None),
            (vec!["Upper=1"], None),
            (vec!["1abc=1"], Some("1abc=1")),
            // duplicated keys are forwarded as sent (Level 2)
            (vec!["a=1,a=2"], Some("a=1,a=2")),
            (vec!["a=1", "a=2"], Some("a=1,a=2")),
            (vec!["-a=1"], None),
            (vec!["a"], None),
            (vec!["a="], None),
            (vec!["a=b=c"], None),
            // whitespace around a member is OWS, not part of the value
            (vec!["a=trailing \t"], Some("a=trailing")),
            (vec!["a=\u{7f}"], None),
            // `@` may appear anywhere in a key but first (Level 2)
            (vec!["t@=1"], Some("t@=1")),
            (vec!["@s=1"], None),
            (vec!["t@systemtoolong12=1"], Some("t@systemtoolong12=1")),
            (vec!["t@s@u=1"], Some("t@s@u=1")),
        ];
        for (headers, want) in cases {
            let got = combine_tracestate(headers.iter().map(|h| h.as_bytes()));
            assert_eq!(got.as_deref(), want, "{headers:?}");
        }
    }

    /// The `tracestate` cases of the W3C suite (`w3c/trace-context`,
    /// `test/test.py`, STRICT_LEVEL 2), one row per request it sends:
    /// (headers, members that must be forwarded, or `None` for "discarded").
    #[test]
    fn tracestate_w3c_suite() {
        let key_without_vendor = "abcdefghijklmnopqrstuvwxyz0123456789_-*/";
        let key_with_vendor = format!("{key_without_vendor}@a-z0-9_-*/");
        let value: String = (0x20u8..=0x7e)
            .filter(|c| !matches!(c, b',' | b'='))
            .map(char::from)
            .collect();
        let all_chars = format!("{key_without_vendor}={value}");
        let all_chars_vendor = format!("{key_with_vendor}={value}");
        let key256 = format!("{}=1", "z".repeat(256));
        let key257 = format!("{}=1", "z".repeat(257));
        let tenant241 = format!("{}@{}=1", "t".repeat(241), "v".repeat(14));
        let tenant242 = format!("{}@v=1", "t".repeat(242));
        let system15 = format!("t@{}=1", "v".repeat(15));
        let bars = |n: usize| {
            (1..=n)
                .map(|i| format!("bar{i:02}={i:02}"))
                .collect::<Vec<_>>()
        };
        let (b32, b33) = (bars(32), bars(33));
        let cases: Vec<(Vec<&str>, Option<Vec<&str>>)> = vec![
            // test_tracestate_included_traceparent_included
            (vec!["foo=1,bar=2"], Some(vec!["foo=1", "bar=2"])),
            // test_tracestate_empty_header
            (vec![""], None),
            (vec!["foo=1", ""], Some(vec!["foo=1"])),
            (vec!["", "foo=1"], Some(vec!["foo=1"])),
            // test_tracestate_multiple_headers_different_keys
            (
                vec!["foo=1,bar=2", "rojo=1,congo=2", "baz=3"],
                Some(vec!["foo=1", "bar=2", "rojo=1", "congo=2", "baz=3"]),
            ),
            // test_tracestate_duplicated_keys: kept as-is or one dropped
            (vec!["foo=1,foo=1"], Some(vec!["foo=1", "foo=1"])),
            (vec!["foo=1,foo=2"], Some(vec!["foo=1", "foo=2"])),
            (vec!["foo=1", "foo=1"], Some(vec!["foo=1", "foo=1"])),
            (vec!["foo=1", "foo=2"], Some(vec!["foo=1", "foo=2"])),
            // test_tracestate_all_allowed_characters
            (vec![&all_chars], Some(vec![&all_chars])),
            (vec![&all_chars_vendor], Some(vec![&all_chars_vendor])),
            // test_tracestate_ows_handling
            (
                vec!["foo=1 \t , \t bar=2, \t baz=3"],
                Some(vec!["foo=1", "bar=2", "baz=3"]),
            ),
            (
                vec!["foo=1\t \t,\t \tbar=2,\t \tbaz=3"],
                Some(vec!["foo=1", "bar=2", "baz=3"]),
            ),
            (vec![" foo=1"], Some(vec!["foo=1"])),
            (vec!["\tfoo=1"], Some(vec!["foo=1"])),
            (vec!["foo=1 "], Some(vec!["foo=1"])),
            (vec!["foo=1\t"], Some(vec!["foo=1"])),
            (vec!["\t foo=1 \t"], Some(vec!["foo=1"])),
            // test_tracestate_key_illegal_characters
            (vec!["foo =1"], None),
            (vec!["FOO=1"], None),
            (vec!["foo.bar=1"], None),
            // test_tracestate_key_illegal_vendor_format
            (vec!["foo@=1,bar=2"], Some(vec!["foo@=1", "bar=2"])),
            (vec!["@foo=1,bar=2"], None),
            (vec!["foo@@bar=1,bar=2"], Some(vec!["foo@@bar=1", "bar=2"])),
            (
                vec!["foo@bar@baz=1,bar=2"],
                Some(vec!["foo@bar@baz=1", "bar=2"]),
            ),
            // test_tracestate_member_count_limit
            (
                b32.iter().map(String::as_str).collect(),
                Some(b32.iter().map(String::as_str).collect()),
            ),
            (b33.iter().map(String::as_str).collect(), None),
            // test_tracestate_key_length_limit
            (vec!["foo=1", &key256], Some(vec!["foo=1", &key256])),
            (vec!["foo=1", &key257], None),
            (vec!["foo=1", &tenant241], Some(vec!["foo=1", &tenant241])),
            (vec!["foo=1", &tenant242], Some(vec!["foo=1", &tenant242])),
            (vec!["foo=1", &system15], Some(vec!["foo=1", &system15])),
            // test_tracestate_value_illegal_characters
            (vec!["foo=bar=baz"], None),
            (vec!["foo=,bar=3"], None),
        ];
        for (headers, want) in cases {
            let got = combine_tracestate(headers.iter().map(|h| h.as_bytes()));
            assert_eq!(got, want.map(|m| m.join(",")), "{headers:?}");
        }
    }

    #[test]
    fn tracestate_member_and_size_limits() {
        let members: Vec<String> = (0..32).map(|i| format!("k{i}=v")).collect();
        let list = members.join(",");
        assert!(combine_tracestate([list.as_bytes()]).is_some());
        let too_many = format!("{list},k32=v");
        assert_eq!(combine_tracestate([too_many.as_bytes()]), None);
        let long_key = format!("{}=v", "a".repeat(257));
        assert_eq!(combine_tracestate([long_key.as_bytes()]), None);
        let long_value = format!("a={}", "v".repeat(257));
        assert_eq!(combine_tracestate([long_value.as_bytes()]), None);

        // Truncation drops members over 128 characters first, then from the end.
        let big = format!("big={}", "x".repeat(200));
        let small: Vec<String> = (0..30)
            .map(|i| format!("s{i:02}={}", "y".repeat(20)))
            .collect();
        let value = format!("{},{big}", small.join(","));
        let cut = truncate_tracestate(&value, 512);
        assert!(cut.len() <= 512, "{}", cut.len());
        assert!(!cut.contains("big="));
        assert!(cut.starts_with("s00="));
        assert_eq!(truncate_tracestate("a=1", 512), "a=1");
    }
}
