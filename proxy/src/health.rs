//! Readiness, draining and in-flight request accounting.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;

/// Process health as /live and /ready report it.
#[derive(Debug)]
pub struct Health {
    ready: AtomicBool,
    draining: AtomicBool,
    inflight: AtomicUsize,
    inflight_gauge: IntGauge,
    ready_gauge: IntGauge,
    /// The own certificate's expiry (Unix time): past it, not ready.
    cert_not_after: AtomicI64,
    /// crank-control refused the own certificate as revoked.
    cert_revoked: AtomicBool,
    /// How to recover from `cert-revoked` or `cert-expired`, shown by /ready.
    cert_hint: Mutex<Option<String>>,
}

impl Health {
    pub fn new(inflight_gauge: IntGauge, ready_gauge: IntGauge) -> Self {
        Health {
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            inflight_gauge,
            ready_gauge,
            cert_not_after: AtomicI64::new(i64::MAX),
            cert_revoked: AtomicBool::new(false),
            cert_hint: Mutex::new(None),
        }
    }

    /// Ready once certs are loaded and the config is applied, until
    /// draining, and while the own certificate (when tracked) is unexpired.
    pub fn is_ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    /// Why /ready answers 503: `draining`, `starting`, `cert-expired` or `cert-revoked`.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.is_draining() {
            Some("draining")
        } else if !self.ready.load(Ordering::Acquire) {
            Some("starting")
        } else if self.cert_expired(crate::clock::unix_now()) {
            Some("cert-expired")
        } else if self.cert_revoked.load(Ordering::Acquire) {
            Some("cert-revoked")
        } else {
            None
        }
    }

    /// Makes readiness depend on the own certificate's expiry (`Some`), or not.
    pub fn set_cert_expiry(&self, not_after: Option<i64>) {
        self.cert_not_after
            .store(not_after.unwrap_or(i64::MAX), Ordering::Release);
        self.refresh_gauge();
    }

    /// Marks the own certificate revoked (until the workload enrolls again);
    /// returns whether it already was.
    pub fn set_cert_revoked(&self) -> bool {
        let was = self.cert_revoked.swap(true, Ordering::AcqRel);
        self.refresh_gauge();
        was
    }

    /// The revoked certificate was replaced by a new enrollment.
    pub fn clear_cert_revoked(&self) {
        self.cert_revoked.store(false, Ordering::Release);
        self.refresh_gauge();
    }

    /// What /ready adds to `cert-revoked` and `cert-expired`: how to recover.
    pub fn set_cert_hint(&self, hint: Option<String>) {
        *self.cert_hint.lock().unwrap_or_else(|e| e.into_inner()) = hint;
    }

    /// The recovery hint for a not-ready `reason`, when there is one.
    pub fn hint_for(&self, reason: &str) -> Option<String> {
        match reason {
            "cert-revoked" | "cert-expired" => self
                .cert_hint
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            _ => None,
        }
    }

    /// Why this sidecar's own certificate cannot be used for outbound
    /// mTLS (`cert-revoked`, `cert-expired`), if it cannot: peers refuse
    /// it, so the local cause is the answer, not the peer.
    pub fn own_cert_problem(&self, now: i64) -> Option<&'static str> {
        if self.cert_revoked.load(Ordering::Acquire) {
            Some("cert-revoked")
        } else if self.cert_expired(now) {
            Some("cert-expired")
        } else {
            None
        }
    }

    /// True when the tracked certificate has expired at `now`.
    pub fn cert_expired(&self, now: i64) -> bool {
        now >= self.cert_not_after.load(Ordering::Acquire)
    }

    /// Brings `crank_ready` up to date (expiry is a matter of time).
    pub fn refresh_gauge(&self) {
        self.ready_gauge.set(self.is_ready() as i64);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        self.ready_gauge.set(self.is_ready() as i64);
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.ready_gauge.set(0);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Counts a request until the guard drops.
    pub fn track(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        self.inflight_gauge.inc();
        InflightGuard(self.clone())
    }
}

/// Held in each request's context; drop ends the request.
#[derive(Debug)]
pub struct InflightGuard(Arc<Health>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
        self.0.inflight_gauge.dec();
    }
}

/// Ports with a socket in LISTEN state, from `/proc/net/tcp` and `tcp6`.
pub fn listening_ports() -> std::collections::HashSet<u16> {
    let mut ports = std::collections::HashSet::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(file) {
            ports.extend(parse_listening(&text));
        }
    }
    ports
}

/// Parses `/proc/net/tcp`: `sl local_address rem_address st ...`, where the
/// local address is `HEXIP:HEXPORT` and state `0A` is LISTEN.
pub fn parse_listening(text: &str) -> impl Iterator<Item = u16> + '_ {
    text.lines().skip(1).filter_map(|line| {
        let mut cols = line.split_whitespace();
        let local = cols.nth(1)?;
        let state = cols.nth(1)?;
        if state != "0A" {
            return None;
        }
        u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
    })
}

/// Marks the proxy ready once every port in `ports` is listening (Pingora
/// binds its listeners on its own threads after start). Gives up after
/// `timeout`, staying not ready, with an error naming the missing ports.
pub fn ready_when_listening(health: Arc<Health>, ports: Vec<u16>, timeout: std::time::Duration) {
    std::thread::spawn(move || {
        let start = std::time::Instant::now();
        loop {
            let up = listening_ports();
            let missing: Vec<u16> = ports.iter().copied().filter(|p| !up.contains(p)).collect();
            if missing.is_empty() {
                health.set_ready(true);
                tracing::info!(elapsed = ?start.elapsed(), "ready: all listeners are up");
                return;
            }
            if start.elapsed() > timeout {
                tracing::error!(?missing, "listeners did not come up; staying not ready");
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_proc_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:4A38 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:4A38 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n";
        let ports: Vec<u16> = super::parse_listening(text).collect();
        assert_eq!(ports, vec![0x4A38]);
    }

    #[test]
    fn sees_a_real_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(super::listening_ports().contains(&port));
    }

    use super::*;
    use std::sync::Arc;

    #[test]
    fn readiness_and_inflight() {
        let m = crate::metrics::Metrics::new();
        let h = Arc::new(Health::new(m.inflight.clone(), m.ready.clone()));
        assert!(!h.is_ready());
        h.set_ready(true);
        assert!(h.is_ready());
        let g = h.track();
        assert_eq!(h.inflight(), 1);
        assert_eq!(m.inflight.get(), 1);
        h.start_draining();
        assert!(!h.is_ready());
        assert_eq!(m.ready.get(), 0);
        drop(g);
        assert_eq!(h.inflight(), 0);
    }

    #[test]
    fn an_expired_enrolled_cert_makes_it_not_ready() {
        let m = crate::metrics::Metrics::new();
        let h = Health::new(m.inflight.clone(), m.ready.clone());
        h.set_ready(true);
        let now = crate::clock::unix_now();
        h.set_cert_expiry(Some(now - 1));
        assert_eq!(h.not_ready_reason(), Some("cert-expired"));
        assert_eq!(m.ready.get(), 0);
        h.set_cert_expiry(Some(now + 3600));
        assert!(h.is_ready());
        assert_eq!(m.ready.get(), 1);
        h.set_cert_expiry(None);
        assert!(h.is_ready());
    }

    #[test]
    fn a_revoked_cert_is_not_ready_until_cleared_and_says_how_to_recover() {
        let m = crate::metrics::Metrics::new();
        let h = Health::new(m.inflight.clone(), m.ready.clone());
        h.set_ready(true);
        h.set_cert_hint(Some("put a new token in t".into()));
        assert_eq!(
            h.hint_for("cert-revoked").as_deref(),
            Some("put a new token in t")
        );
        assert_eq!(h.hint_for("draining"), None);
        assert!(!h.set_cert_revoked());
        assert!(h.set_cert_revoked(), "already revoked");
        assert_eq!(h.not_ready_reason(), Some("cert-revoked"));
        assert_eq!(m.ready.get(), 0);
        h.clear_cert_revoked();
        assert!(h.is_ready());
        assert_eq!(m.ready.get(), 1);
    }
}
