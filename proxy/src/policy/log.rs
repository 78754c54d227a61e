//! One decision-log line, serialised straight from the request facts and
//! the decision: no JSON document of the input is built and re-serialised.
//!
//! The fields (and their order: alphabetical, as the line always had) are
//! those of `docs/reference/policy.md`, "Decision log".

use std::net::SocketAddr;
use std::time::SystemTime;

use crank_policy::{Decision, InputShape, Manifest, RequestFacts};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

/// The line's fields.
#[derive(Serialize)]
pub struct Line<'a> {
    pub cached: bool,
    pub decision_id: &'a str,
    pub direction: &'a str,
    pub enforced: bool,
    pub error: Option<&'a str>,
    pub eval_us: f64,
    pub input: Summary<'a>,
    pub mode: &'a str,
    pub permitted: bool,
    pub reasons: &'a [String],
    pub result: &'a str,
    pub revision: &'a str,
    pub trace_id: Option<&'a str>,
    #[serde(serialize_with = "display")]
    pub ts: humantime::Rfc3339Timestamp,
}

/// Who, what and which headers (the configured ones redacted); never the
/// body.
#[derive(Serialize)]
pub struct Summary<'a> {
    body_size: Option<u64>,
    capability: Option<&'a str>,
    destination: &'a str,
    direction: &'a str,
    #[serde(serialize_with = "headers")]
    headers: (&'a RequestFacts, &'a Manifest),
    method: &'a str,
    path: &'a str,
    route: Option<&'a str>,
    source: Option<&'a str>,
    #[serde(serialize_with = "display_opt")]
    source_address: Option<SocketAddr>,
}

impl<'a> Line<'a> {
    /// The line for one decision.
    pub fn new(
        facts: &'a RequestFacts,
        manifest: &'a Manifest,
        revision: &'a str,
        direction: &'a str,
        decision: &'a Decision,
        trace_id: Option<&'a str>,
    ) -> Line<'a> {
        let path = facts
            .path_and_query
            .split_once('?')
            .map_or(facts.path_and_query.as_str(), |(p, _)| p);
        Line {
            cached: decision.cached,
            decision_id: &facts.id,
            direction,
            enforced: !decision.permitted,
            error: decision.error.as_deref(),
            eval_us: (decision.elapsed.as_secs_f64() * 1e6 * 10.0).round() / 10.0,
            input: Summary {
                body_size: facts.body_size,
                capability: facts.capability.as_deref(),
                destination: &facts.destination.spiffe_id,
                direction: facts.direction,
                headers: (facts, manifest),
                method: &facts.method,
                path,
                route: facts.route.as_deref(),
                source: facts.source.as_ref().map(|s| s.spiffe_id.as_str()),
                source_address: facts.source_address,
            },
            mode: manifest.mode.as_str(),
            permitted: decision.permitted,
            reasons: &decision.reasons,
            result: decision.outcome.as_str(),
            revision,
            trace_id,
            ts: humantime::format_rfc3339_millis(SystemTime::now()),
        }
    }

    /// The JSON line (no newline). Written into a buffer sized for a
    /// typical line (600–900 bytes), not grown from serde_json's 128.
    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(1024);
        if serde_json::to_writer(&mut out, self).is_err() {
            return String::new();
        }
        // serde_json writes UTF-8 only.
        String::from_utf8(out).unwrap_or_default()
    }
}

fn display<S: Serializer>(v: &impl std::fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn display_opt<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(a) => s.collect_str(&crate::logging::AddrText(a)),
        None => s.serialize_none(),
    }
}

/// The headers the input shows (all of them for the envoy shape), lower
/// case, repeats joined with ", ", the configured ones as "[redacted]".
fn headers<S: Serializer>(
    (facts, manifest): &(&RequestFacts, &Manifest),
    s: S,
) -> Result<S::Ok, S::Error> {
    let all = manifest.input == InputShape::Envoy || manifest.headers.iter().any(|h| h == "*");
    let redact = &manifest.decision_log.redact_headers;
    let is_shown = |k: &str| all || manifest.headers.iter().any(|w| w.eq_ignore_ascii_case(k));
    if let Some(sorted) = distinct_lower_case(&facts.headers, is_shown) {
        // The usual case (names as http keeps them, no repeats): written
        // borrowed, in order, with nothing joined or copied.
        let mut map = s.serialize_map(Some(sorted.len))?;
        for &i in sorted.as_slice() {
            let (k, v) = &facts.headers[i];
            map.serialize_entry(k, redacted(redact, k, v))?;
        }
        return map.end();
    }
    let mut shown: Vec<(String, String)> = Vec::new();
    for (k, v) in &facts.headers {
        if !(all || manifest.headers.iter().any(|w| w.eq_ignore_ascii_case(k))) {
            continue;
        }
        let v = redacted(redact, k, v);
        let k = k.to_ascii_lowercase();
        match shown.iter_mut().find(|(name, _)| *name == k) {
            Some((_, existing)) => {
                existing.push_str(", ");
                existing.push_str(v);
            }
            None => shown.push((k, v.to_string())),
        }
    }
    shown.sort_by(|a, b| a.0.cmp(&b.0));
    let mut map = s.serialize_map(Some(shown.len()))?;
    for (k, v) in &shown {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

/// `v`, or "[redacted]" for a header named in `redact`.
fn redacted<'v>(redact: &[String], k: &str, v: &'v str) -> &'v str {
    if redact.iter().any(|r| r.eq_ignore_ascii_case(k)) {
        "[redacted]"
    } else {
        v
    }
}

/// Up to [`FAST_HEADERS`] indices, on the stack.
struct Indices {
    held: [usize; FAST_HEADERS],
    len: usize,
}

const FAST_HEADERS: usize = 16;

impl Indices {
    fn as_slice(&self) -> &[usize] {
        &self.held[..self.len]
    }
}

/// The indices of the shown headers sorted by name, when every shown name
/// is lower case and none repeats (and there are at most
/// [`FAST_HEADERS`]); `None` otherwise (the caller lower-cases and joins).
fn distinct_lower_case(
    headers: &[(String, String)],
    shown: impl Fn(&str) -> bool,
) -> Option<Indices> {
    let mut out = Indices {
        held: [0; FAST_HEADERS],
        len: 0,
    };
    for (i, (k, _)) in headers.iter().enumerate() {
        if !shown(k) {
            continue;
        }
        if out.len == FAST_HEADERS || k.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        out.held[out.len] = i;
        out.len += 1;
    }
    let sorted = &mut out.held[..out.len];
    sorted.sort_unstable_by(|a, b| headers[*a].0.cmp(&headers[*b].0));
    if sorted
        .windows(2)
        .any(|w| headers[w[0]].0 == headers[w[1]].0)
    {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crank_policy::{Outcome, Workload};
    use std::time::Duration;

    fn facts() -> RequestFacts {
        RequestFacts {
            direction: "inbound",
            source: Some(Workload {
                spiffe_id: "spiffe://crank.local/tenant/acme/svc/web".into(),
                ..Workload::default()
            }),
            source_address: Some("10.0.0.7:41000".parse().unwrap()),
            destination: Workload {
                spiffe_id: "spiffe://crank.local/tenant/media/svc/transcoder".into(),
                ..Workload::default()
            },
            capability: Some("transcode:v1".into()),
            route: None,
            method: "POST".into(),
            path_and_query: "/v1/jobs?x=1".into(),
            host: None,
            scheme: "https".into(),
            protocol: "HTTP/2".into(),
            headers: vec![
                ("content-type".into(), "video/mp4".into()),
                ("authorization".into(), "Bearer secret".into()),
                ("x-tag".into(), "a".into()),
                ("x-tag".into(), "b".into()),
            ],
            body_size: Some(12),
            time: SystemTime::now(),
            id: "d1".into(),
        }
    }

    /// The line says what the JSON-document version said, field by field.
    #[test]
    fn the_line_matches_the_input_summary() {
        let decision = Decision {
            outcome: Outcome::Deny,
            reasons: vec!["no".into()],
            error: None,
            elapsed: Duration::from_nanos(12_345),
            permitted: false,
            cached: true,
        };
        // "*": a repeated name (joined); the others: distinct names,
        // written borrowed, the configured one redacted.
        let lists = [
            vec!["*".to_string()],
            vec!["content-type".to_string()],
            vec!["authorization".to_string(), "content-type".to_string()],
        ];
        for headers in lists {
            let m = Manifest {
                headers,
                ..Manifest::default()
            };
            let f = facts();
            let line = Line::new(&f, &m, "r1", "inbound", &decision, Some("t1")).to_json();
            let got: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(got["input"], crank_policy::input::summary(&f, &m), "{line}");
            assert_eq!(got["eval_us"], 12.3);
            assert_eq!(
                (&got["result"], &got["enforced"], &got["cached"]),
                (&"deny".into(), &true.into(), &true.into())
            );
            assert_eq!(got["reasons"], serde_json::json!(["no"]));
            assert_eq!(
                (&got["decision_id"], &got["trace_id"]),
                (&"d1".into(), &"t1".into())
            );
            assert!(!line.contains("secret"), "{line}");
        }
    }
}
