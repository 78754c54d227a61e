//! Live traffic for `crankctl tap` and `crankctl top`: one event per
//! finished request, streamed as JSON lines from the admin port
//! (`GET /tap`).
//!
//! The request path pays one atomic load when nobody taps. With a tap
//! client, `logging` builds the event and hands it to a broadcast channel
//! that never blocks: a slow or stalled tap client falls behind, loses the
//! oldest events (counted in `crank_tap_events_dropped_total`) and never
//! slows a request. Each tap is rate-limited (`max_rps`, default 100, at
//! most 1000) and filtered on the admin thread, not on the request path.
//! Events carry no header values and no bodies: method, path (without the
//! query), status, latency, identities, route, capability, trace id and
//! `x-crank-error`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use serde::Serialize;
use tokio::sync::broadcast;

/// Events a tap may fall behind by before it loses the oldest.
const BACKLOG: usize = 1024;

/// One finished request.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TapEvent {
    /// Unix time in milliseconds when the request ended.
    pub ts_ms: u64,
    pub direction: &'static str,
    pub route: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    pub method: String,
    /// The path, without the query string (it may carry secrets).
    pub path: String,
    /// 0 when no response was sent.
    pub status: u16,
    pub latency_ms: f64,
    /// The caller's SPIFFE ID (inbound: the peer; outbound: this sidecar).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The callee's SPIFFE ID (inbound: this sidecar; outbound: the endpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The `x-crank-error` this sidecar or the peer's answered with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crank_error: Option<String>,
}

/// The tap hub of one sidecar.
pub struct Tap {
    taps: AtomicUsize,
    tx: broadcast::Sender<Arc<TapEvent>>,
    dropped: IntCounter,
}

impl Tap {
    pub fn new(dropped: IntCounter) -> Self {
        let (tx, _) = broadcast::channel(BACKLOG);
        Tap {
            taps: AtomicUsize::new(0),
            tx,
            dropped,
        }
    }

    /// Whether anybody taps: the request path builds no event otherwise.
    #[inline]
    pub fn active(&self) -> bool {
        self.taps.load(Ordering::Relaxed) > 0
    }

    /// Hands an event to every tap; never blocks.
    pub fn publish(&self, ev: TapEvent) {
        let _ = self.tx.send(Arc::new(ev));
    }

    /// A new tap; it counts as active until dropped.
    pub fn subscribe(self: &Arc<Self>, filter: TapFilter) -> Subscription {
        self.taps.fetch_add(1, Ordering::AcqRel);
        Subscription {
            rx: self.tx.subscribe(),
            tap: self.clone(),
            filter,
            window: Instant::now(),
            in_window: 0,
        }
    }
}

/// What a tap asks for (the query of `GET /tap`).
#[derive(Debug, Clone, PartialEq)]
pub struct TapFilter {
    pub direction: Option<String>,
    pub route: Option<String>,
    pub capability: Option<String>,
    pub method: Option<String>,
    pub path_prefix: Option<String>,
    /// `5xx`, `4xx`, `2xx`..., or one status such as `429`.
    pub status: Option<String>,
    pub max_rps: u32,
    /// Stop after this many events (0: no limit).
    pub limit: u64,
}

impl Default for TapFilter {
    fn default() -> Self {
        TapFilter {
            direction: None,
            route: None,
            capability: None,
            method: None,
            path_prefix: None,
            status: None,
            max_rps: 100,
            limit: 0,
        }
    }
}

impl TapFilter {
    /// Parses the query of `GET /tap`; an unknown key or a bad value is an
    /// error that names it.
    pub fn parse(query: &str) -> Result<TapFilter, String> {
        let mut f = TapFilter::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let v = v.into_owned();
            match k.as_ref() {
                "direction" if v == "inbound" || v == "outbound" => f.direction = Some(v),
                "direction" => return Err(format!("direction={v}: use inbound or outbound")),
                "route" => f.route = Some(v),
                "capability" => f.capability = Some(v),
                "method" => f.method = Some(v.to_ascii_uppercase()),
                "path" => f.path_prefix = Some(v),
                "status" if status_matcher(&v).is_some() => f.status = Some(v),
                "status" => {
                    return Err(format!(
                        "status={v}: use a class such as 5xx or a status such as 429"
                    ))
                }
                "max_rps" => match v.parse::<u32>() {
                    Ok(n) if (1..=1000).contains(&n) => f.max_rps = n,
                    _ => return Err(format!("max_rps={v}: use 1 to 1000")),
                },
                "limit" => {
                    f.limit = v
                        .parse()
                        .map_err(|_| format!("limit={v}: use a number of events"))?
                }
                other => {
                    return Err(format!(
                        "unknown tap parameter {other:?}; use direction, route, capability, method, path, status, max_rps or limit"
                    ))
                }
            }
        }
        Ok(f)
    }

    /// Whether `ev` is one this tap asked for.
    pub fn matches(&self, ev: &TapEvent) -> bool {
        let eq = |want: &Option<String>, got: &str| want.as_deref().is_none_or(|w| w == got);
        eq(&self.direction, ev.direction)
            && eq(&self.route, &ev.route)
            && self
                .capability
                .as_deref()
                .is_none_or(|c| ev.capability.as_deref() == Some(c))
            && eq(&self.method, &ev.method)
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| ev.path.starts_with(p))
            && self
                .status
                .as_deref()
                .and_then(status_matcher)
                .is_none_or(|(lo, hi)| (lo..=hi).contains(&ev.status))
    }
}

/// `5xx` -> 500..=599, `429` -> 429..=429.
fn status_matcher(s: &str) -> Option<(u16, u16)> {
    let b = s.as_bytes();
    if b.len() == 3 && b[0].is_ascii_digit() && b[1..].eq_ignore_ascii_case(b"xx") {
        let c = u16::from(b[0] - b'0');
        return (1..=5).contains(&c).then_some((c * 100, c * 100 + 99));
    }
    s.parse::<u16>()
        .ok()
        .filter(|n| (100..=599).contains(n))
        .map(|n| (n, n))
}

/// One tap: the events it asked for, at most `max_rps` a second.
pub struct Subscription {
    rx: broadcast::Receiver<Arc<TapEvent>>,
    tap: Arc<Tap>,
    filter: TapFilter,
    window: Instant,
    in_window: u32,
}

impl Subscription {
    /// The next matching event within the rate; `None` when the hub is gone.
    pub async fn next(&mut self) -> Option<Arc<TapEvent>> {
        loop {
            match self.rx.recv().await {
                Ok(ev) => {
                    if !self.filter.matches(&ev) {
                        continue;
                    }
                    let now = Instant::now();
                    if now.duration_since(self.window) >= Duration::from_secs(1) {
                        self.window = now;
                        self.in_window = 0;
                    }
                    if self.in_window >= self.filter.max_rps {
                        self.tap.dropped.inc();
                        continue;
                    }
                    self.in_window += 1;
                    return Some(ev);
                }
                Err(broadcast::error::RecvError::Lagged(n)) => self.tap.dropped.inc_by(n),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    pub fn limit(&self) -> u64 {
        self.filter.limit
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.tap.taps.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(status: u16, route: &str) -> TapEvent {
        TapEvent {
            ts_ms: 1,
            direction: "outbound",
            route: route.into(),
            capability: Some("transcode:v1".into()),
            method: "GET".into(),
            path: "/jobs/1".into(),
            status,
            latency_ms: 1.5,
            source: None,
            destination: None,
            trace_id: None,
            crank_error: None,
        }
    }

    #[test]
    fn filters() {
        let f = TapFilter::parse("status=5xx&capability=transcode:v1&path=/jobs").unwrap();
        assert!(f.matches(&ev(503, "r")));
        assert!(!f.matches(&ev(200, "r")));
        let f = TapFilter::parse("status=429&route=a&direction=outbound&method=get").unwrap();
        assert!(f.matches(&ev(429, "a")));
        assert!(!f.matches(&ev(429, "b")));
        assert!(!f.matches(&ev(430, "a")));
        assert!(TapFilter::parse("").unwrap().matches(&ev(0, "x")));
        for (bad, says) in [
            ("status=9xx", "status=9xx"),
            ("max_rps=0", "1 to 1000"),
            ("direction=up", "inbound or outbound"),
            ("colour=red", "unknown tap parameter"),
        ] {
            let e = TapFilter::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn a_stalled_tap_loses_events_and_never_blocks() {
        let dropped = IntCounter::new("d", "d").unwrap();
        let tap = Arc::new(Tap::new(dropped.clone()));
        assert!(!tap.active());
        let mut sub = tap.subscribe(TapFilter {
            max_rps: 1000,
            ..Default::default()
        });
        assert!(tap.active());
        // Far more events than the backlog, nobody reading: publish returns at once.
        for i in 0..(BACKLOG as u16 * 3) {
            tap.publish(ev(200 + i % 2, "r"));
        }
        let first = sub.next().await.unwrap();
        assert_eq!(first.route, "r");
        assert!(dropped.get() >= 2 * BACKLOG as u64, "{}", dropped.get());
        drop(sub);
        assert!(!tap.active());
    }

    #[tokio::test]
    async fn a_tap_gets_at_most_max_rps_events_a_second() {
        let dropped = IntCounter::new("d", "d").unwrap();
        let tap = Arc::new(Tap::new(dropped.clone()));
        let mut sub = tap.subscribe(TapFilter {
            max_rps: 5,
            ..Default::default()
        });
        for _ in 0..20 {
            tap.publish(ev(200, "r"));
        }
        let mut got = 0;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(50), sub.next()).await {
            got += 1;
        }
        assert_eq!(got, 5);
        assert_eq!(dropped.get(), 15);
    }
}
