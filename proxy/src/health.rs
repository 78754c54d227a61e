//! Readiness, draining and in-flight request accounting.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::IntGauge;

/// Process health as /live and /ready report it.
#[derive(Debug)]
pub struct Health {
    ready: AtomicBool,
    draining: AtomicBool,
    inflight: AtomicUsize,
    inflight_gauge: IntGauge,
    ready_gauge: IntGauge,
}

impl Health {
    pub fn new(inflight_gauge: IntGauge, ready_gauge: IntGauge) -> Self {
        Health {
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            inflight_gauge,
            ready_gauge,
        }
    }

    /// Ready once certs are loaded and the config is applied, until draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.is_draining()
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
