//! Tracing: W3C trace context ([`context`]), the spans, and their export
//! over OTLP ([`export`]). The span of a request is built from its facts by
//! `request::span`.
//!
//! Spans: one per hop through the sidecar (a server span inbound, a client
//! span per upstream attempt outbound), with W3C trace context in and out.
//!
//! The proxy builds OpenTelemetry `SpanData` itself instead of going through
//! the SDK's tracer: the trace context comes from our own W3C parser
//! ([`context`]), a span is only materialised when it is sampled, and it
//! is handed to a bounded queue ([`export`]) that never
//! blocks a request. Sampling is parent-based with a trace-id ratio for new
//! traces, the same decision the SDK's `ParentBased(TraceIdRatioBased)`
//! makes; the ratio is an atomic, so a config reload changes it live.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use http::HeaderMap;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

pub mod context;
pub mod export;

use context::{FLAG_RANDOM, FLAG_SAMPLED};
use export::SpanSink;

/// Makes hops and finishes their spans. Present when the config has a
/// `tracing` section.
pub struct Tracer {
    /// The root sampling ratio as `f64` bits.
    ratio: AtomicU64,
    sink: SpanSink,
    scope: InstrumentationScope,
}

/// The trace context of one request's hop through this sidecar.
#[derive(Debug, Clone)]
pub struct Hop {
    pub trace_id: [u8; 16],
    /// The caller's span, when the request carried a valid `traceparent`.
    pub parent: Option<[u8; 8]>,
    /// This hop's (current attempt's) span.
    pub span_id: [u8; 8],
    /// `sampled` and `random`, as forwarded.
    pub flags: u8,
    /// The validated, combined `tracestate` to forward.
    pub tracestate: Option<String>,
    /// When the span started; read (and set) only for a sampled hop.
    pub start: SystemTime,
    /// Upstream attempts started so far (outbound retries make one client
    /// span each).
    pub attempts: u32,
}

impl Hop {
    pub fn sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }

    /// The `traceparent` for the next hop: this span is its parent.
    /// Formatted on the stack (every request with tracing on forwards one,
    /// sampled or not).
    pub fn traceparent(&self) -> Traceparent {
        let mut out = [b'-'; 55];
        out[..2].copy_from_slice(b"00");
        hex_into(&self.trace_id, &mut out[3..35]);
        hex_into(&self.span_id, &mut out[36..52]);
        hex_into(&[self.flags], &mut out[53..55]);
        Traceparent(out)
    }
}

/// A `traceparent` value (`00-<trace id>-<span id>-<flags>`), as text.
#[derive(Clone, Copy)]
pub struct Traceparent([u8; 55]);

impl std::ops::Deref for Traceparent {
    type Target = str;

    fn deref(&self) -> &str {
        // Only ASCII hex digits and dashes are written into it.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Lower-case hex of `bytes` into `out` (twice as long).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[(b >> 4) as usize];
        pair[1] = DIGITS[(b & 15) as usize];
    }
}

/// What a finished span says beyond its context.
pub struct SpanEnd {
    pub kind: SpanKind,
    pub name: Cow<'static, str>,
    pub attributes: Vec<KeyValue>,
    /// `Some(description)` marks the span as failed.
    pub error: Option<String>,
    pub end: SystemTime,
}

impl Tracer {
    pub fn new(ratio: f64, sink: SpanSink) -> Tracer {
        Tracer {
            ratio: AtomicU64::new(ratio.to_bits()),
            sink,
            scope: InstrumentationScope::builder("crank-proxy")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        }
    }

    pub fn ratio(&self) -> f64 {
        f64::from_bits(self.ratio.load(Ordering::Relaxed))
    }

    /// Applies a new root sampling ratio (from a config reload).
    pub fn set_ratio(&self, ratio: f64) {
        self.ratio
            .store(ratio.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    /// Starts this sidecar's hop for a request: continues a valid incoming
    /// trace context (keeping its sampling decision), or starts a new trace
    /// sampled at the configured ratio.
    pub fn begin(&self, headers: &HeaderMap) -> Hop {
        // The clock is read for sampled hops only (their span's start).
        let start = SystemTime::UNIX_EPOCH;
        let mut hop = match incoming(headers) {
            Some((tp, tracestate)) => Hop {
                trace_id: tp.trace_id,
                parent: Some(tp.parent_id),
                span_id: new_span_id(),
                flags: tp.flags & (FLAG_SAMPLED | FLAG_RANDOM),
                tracestate,
                start,
                attempts: 0,
            },
            None => {
                let trace_id = new_trace_id();
                let sampled = ratio_sampled(&trace_id, self.ratio());
                Hop {
                    trace_id,
                    parent: None,
                    span_id: new_span_id(),
                    flags: FLAG_RANDOM | if sampled { FLAG_SAMPLED } else { 0 },
                    tracestate: None,
                    start,
                    attempts: 0,
                }
            }
        };
        if hop.sampled() {
            hop.start = SystemTime::now();
        }
        hop
    }

    /// Whether finishing this hop would export anything (so the caller can
    /// skip building attributes).
    pub fn records(&self, hop: &Hop) -> bool {
        hop.sampled()
    }

    /// Ends the hop's current span and queues it for export (sampled spans
    /// only). Never blocks: a full queue drops the span and counts it.
    pub fn finish(&self, hop: &Hop, end: SpanEnd) {
        if !self.records(hop) {
            return;
        }
        let trace_state = hop
            .tracestate
            .as_deref()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let span = SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(hop.trace_id),
                SpanId::from_bytes(hop.span_id),
                TraceFlags::new(hop.flags),
                false,
                trace_state,
            ),
            parent_span_id: hop.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: hop.parent.is_some(),
            span_kind: end.kind,
            name: end.name,
            start_time: hop.start,
            end_time: end.end.max(hop.start),
            attributes: end.attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: match end.error {
                Some(d) => Status::error(d),
                None => Status::Unset,
            },
            instrumentation_scope: self.scope.clone(),
        };
        self.sink.offer(span);
    }

    /// Starts the next upstream attempt's span: the one before it ends with
    /// `retried` (built by the caller only when [`Tracer::records`] says it
    /// is kept). Returns false for the first attempt (its span is the hop's).
    pub fn next_attempt(&self, hop: &mut Hop, retried: Option<SpanEnd>) -> bool {
        hop.attempts += 1;
        if hop.attempts == 1 {
            return false;
        }
        if let Some(end) = retried {
            self.finish(hop, end);
        }
        hop.span_id = new_span_id();
        if hop.sampled() {
            hop.start = SystemTime::now();
        }
        true
    }
}

/// The longest `tracestate` forwarded. The recommendation asks for at
/// least 512 characters; longer lists are cut by its rules (§3.3.1.5: long
/// members first, then from the end).
pub const MAX_TRACESTATE: usize = 4096;

/// The valid incoming `traceparent` and its forwardable `tracestate`. A
/// `tracestate` without a valid `traceparent` is never used (§3.3).
pub fn incoming(headers: &HeaderMap) -> Option<(context::TraceParent, Option<String>)> {
    let tp =
        context::parse_traceparent(headers.get_all("traceparent").iter().map(|v| v.as_bytes()))
            .ok()?;
    let ts =
        context::combine_tracestate(headers.get_all("tracestate").iter().map(|v| v.as_bytes()))
            .map(|ts| context::truncate_tracestate(&ts, MAX_TRACESTATE));
    Some((tp, ts))
}

/// The trace id of a request's valid `traceparent`, for logs when tracing
/// is off.
pub fn incoming_trace_id(headers: &HeaderMap) -> Option<String> {
    context::parse_traceparent(headers.get_all("traceparent").iter().map(|v| v.as_bytes()))
        .ok()
        .map(|t| t.trace_id_hex())
}

/// `TraceIdRatioBased`: the decision is a function of the trace id alone, so
/// every sidecar with the same ratio agrees on a new trace. Uses the id's
/// right 8 bytes, which W3C Level 2 (`random` flag) makes random.
pub fn ratio_sampled(trace_id: &[u8; 16], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 || ratio.is_nan() {
        return false;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    let x = u64::from_be_bytes(low) >> 1;
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    x < bound
}

fn new_trace_id() -> [u8; 16] {
    loop {
        let id: [u8; 16] = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

fn new_span_id() -> [u8; 8] {
    loop {
        let id: [u8; 8] = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// The semantic-conventions method value: the known methods as they are,
/// anything else as `_OTHER` (with the original in
/// `http.request.method_original`).
pub fn method_attrs(method: &str, attrs: &mut Vec<KeyValue>) -> &'static str {
    const KNOWN: [&str; 9] = [
        "CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE",
    ];
    match KNOWN.iter().find(|m| **m == method) {
        Some(m) => {
            attrs.push(KeyValue::new("http.request.method", *m));
            m
        }
        None => {
            attrs.push(KeyValue::new("http.request.method", "_OTHER"));
            attrs.push(KeyValue::new(
                "http.request.method_original",
                method.to_string(),
            ));
            "HTTP"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracing::export::SpanSink;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_parent_is_continued_with_its_decision() {
        let (sink, _rx) = SpanSink::for_test(8);
        let t = Tracer::new(0.0, sink);
        let hop = t.begin(&headers(&[
            ("traceparent", TP),
            ("tracestate", "a=1"),
            ("tracestate", "b=2"),
        ]));
        assert_eq!(hop.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            hop.parent,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        assert!(
            hop.sampled(),
            "a sampled parent is followed even at ratio 0"
        );
        assert_ne!(hop.span_id, hop.parent.unwrap());
        assert_eq!(hop.tracestate.as_deref(), Some("a=1,b=2"));
        let out = hop.traceparent();
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(out.ends_with("-01"));
        assert_eq!(&out[36..52], hop.span_id_hex());
        let formatted = format!("00-{}-{}-01", hop.trace_id_hex(), hop.span_id_hex());
        assert_eq!(&*out, formatted);

        let t1 = Tracer::new(1.0, SpanSink::for_test(8).0);
        let unsampled = TP.replace("-01", "-00");
        let hop = t1.begin(&headers(&[("traceparent", &unsampled)]));
        assert!(
            !hop.sampled(),
            "an unsampled parent is followed even at ratio 1"
        );
        assert!(hop.traceparent().ends_with("-00"));
    }

    #[test]
    fn an_invalid_or_absent_parent_starts_a_new_trace_without_its_tracestate() {
        let t = Tracer::new(1.0, SpanSink::for_test(8).0);
        for h in [
            headers(&[]),
            headers(&[
                (
                    "traceparent",
                    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                ),
                ("tracestate", "a=1"),
            ]),
            headers(&[("traceparent", TP), ("traceparent", TP)]),
            headers(&[("traceparent", &TP.to_uppercase())]),
        ] {
            let hop = t.begin(&h);
            assert_eq!(hop.parent, None);
            assert_ne!(hop.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(hop.tracestate, None);
            assert_eq!(
                hop.flags,
                FLAG_SAMPLED | FLAG_RANDOM,
                "new ids are random (Level 2)"
            );
            assert!(hop.traceparent().ends_with("-03"));
        }
        t.set_ratio(0.0);
        let hop = t.begin(&headers(&[]));
        assert!(!hop.sampled());
        assert!(hop.traceparent().ends_with("-02"));
    }

    #[test]
    fn a_long_tracestate_is_cut_by_the_rules() {
        let t = Tracer::new(1.0, SpanSink::for_test(8).0);
        // 31 members of ~140 bytes (over 128: dropped first), then a short one.
        let long: Vec<String> = (0..31)
            .map(|i| format!("k{i}={}", "v".repeat(136)))
            .collect();
        let value = format!("{},short=1", long.join(","));
        assert!(value.len() > MAX_TRACESTATE);
        let hop = t.begin(&headers(&[("traceparent", TP), ("tracestate", &value)]));
        let ts = hop.tracestate.unwrap();
        assert!(ts.len() <= MAX_TRACESTATE, "{}", ts.len());
        assert!(ts.starts_with("k0="), "the first members are kept");
        assert!(ts.ends_with(",short=1"), "short members outlive long ones");
    }

    #[test]
    fn unknown_flags_are_not_forwarded() {
        let t = Tracer::new(1.0, SpanSink::for_test(8).0);
        let hop = t.begin(&headers(&[("traceparent", &TP.replace("-01", "-ff"))]));
        assert_eq!(hop.flags, FLAG_SAMPLED | FLAG_RANDOM);
        // A future version is read as version 00 and forwarded as 00.
        let v = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        let hop = t.begin(&headers(&[("traceparent", v)]));
        assert_eq!(
            hop.parent,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        assert!(hop
            .traceparent()
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    }

    #[test]
    fn ratio_sampling_follows_the_trace_id() {
        assert!(ratio_sampled(&[0xff; 16], 1.0));
        assert!(!ratio_sampled(&[0x00; 16], 0.0));
        let mut low = [0u8; 16];
        low[15] = 2; // x = 1: the smallest ids are sampled at any ratio > 0
        assert!(ratio_sampled(&low, 0.001));
        let high = [0xff; 16];
        assert!(!ratio_sampled(&high, 0.999));
        // Over many random ids the share is close to the ratio.
        let n = 20_000;
        let hits = (0..n)
            .filter(|_| ratio_sampled(&new_trace_id(), 0.25))
            .count();
        let share = hits as f64 / n as f64;
        assert!((0.23..0.27).contains(&share), "{share}");
    }

    #[test]
    fn only_sampled_spans_are_queued_and_retries_make_new_spans() {
        let (sink, rx) = SpanSink::for_test(8);
        let t = Tracer::new(1.0, sink);
        let mut hop = t.begin(&headers(&[("traceparent", TP)]));
        let first = hop.span_id;
        let end = |name: &'static str| SpanEnd {
            kind: SpanKind::Client,
            name: name.into(),
            attributes: vec![],
            error: None,
            end: SystemTime::now(),
        };
        assert!(!t.next_attempt(&mut hop, Some(end("never"))));
        assert!(t.next_attempt(
            &mut hop,
            Some(SpanEnd {
                error: Some("retried".into()),
                ..end("GET")
            })
        ));
        assert_ne!(hop.span_id, first);
        t.finish(&hop, end("GET"));
        let spans: Vec<SpanData> = rx.try_iter().collect();
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].span_context.span_id(), SpanId::from_bytes(first));
        assert!(matches!(spans[0].status, Status::Error { .. }));
        assert_eq!(
            spans[1].span_context.span_id(),
            SpanId::from_bytes(hop.span_id)
        );
        for s in &spans {
            assert_eq!(s.parent_span_id, SpanId::from_bytes(hop.parent.unwrap()));
            assert!(s.parent_span_is_remote);
        }

        let unsampled = t.begin(&headers(&[("traceparent", &TP.replace("-01", "-00"))]));
        t.finish(&unsampled, end("GET"));
        assert_eq!(rx.try_iter().count(), 0);
    }

    #[test]
    fn methods_follow_the_semantic_conventions() {
        let mut a = vec![];
        assert_eq!(method_attrs("GET", &mut a), "GET");
        assert_eq!(a, vec![KeyValue::new("http.request.method", "GET")]);
        let mut a = vec![];
        assert_eq!(method_attrs("PURGE", &mut a), "HTTP");
        assert_eq!(a[0], KeyValue::new("http.request.method", "_OTHER"));
        assert_eq!(a[1], KeyValue::new("http.request.method_original", "PURGE"));
    }
}
