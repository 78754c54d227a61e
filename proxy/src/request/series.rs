//! `crank_requests_total` and `crank_request_duration_seconds` for one
//! request, through the series this thread used recently: a repeat of a
//! (runtime, direction, route) reuses its handles instead of hashing the
//! label values and taking the vector's lock on every request.

use std::cell::RefCell;
use std::sync::{Arc, Weak};

use prometheus::{Histogram, IntCounter};

use crate::direction::Direction;
use crate::metrics::status_class;
use crate::runtime::Runtime;

/// Every value [`status_class`] returns.
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];
/// Series held per thread (routes × directions in use at once).
const HELD: usize = 16;

struct Series {
    /// Whose metrics: the `Weak` keeps the allocation, so its address is
    /// never another runtime's while this entry lives.
    rt: Weak<Runtime>,
    direction: Direction,
    route: Box<str>,
    requests: [Option<IntCounter>; CLASSES.len()],
    latency: Histogram,
}

thread_local! {
    static RECENT: RefCell<Vec<Series>> = const { RefCell::new(Vec::new()) };
}

/// Counts a finished request with `status` and its duration.
pub(crate) fn observe(rt: &Arc<Runtime>, dir: Direction, route: &str, status: u16, secs: f64) {
    let class = status_class(status);
    let idx = CLASSES.iter().position(|c| *c == class);
    let counted = RECENT
        .try_with(|recent| {
            let (Ok(mut recent), Some(idx)) = (recent.try_borrow_mut(), idx) else {
                return false;
            };
            let s = series(&mut recent, rt, dir, route);
            s.requests[idx]
                .get_or_insert_with(|| {
                    rt.metrics
                        .requests
                        .with_label_values(&[dir.as_str(), route, class])
                })
                .inc();
            s.latency.observe(secs);
            true
        })
        .unwrap_or(false);
    if !counted {
        let m = &rt.metrics;
        m.requests
            .with_label_values(&[dir.as_str(), route, class])
            .inc();
        m.latency
            .with_label_values(&[dir.as_str(), route])
            .observe(secs);
    }
}

/// The held series of (rt, dir, route), made (and the oldest dropped) when
/// missing.
fn series<'a>(
    recent: &'a mut Vec<Series>,
    rt: &Arc<Runtime>,
    dir: Direction,
    route: &str,
) -> &'a mut Series {
    let found = recent.iter().position(|s| {
        s.direction == dir && std::ptr::eq(s.rt.as_ptr(), Arc::as_ptr(rt)) && &*s.route == route
    });
    let i = match found {
        Some(i) => i,
        None => {
            if recent.len() >= HELD {
                recent.remove(0);
            }
            recent.push(Series {
                rt: Arc::downgrade(rt),
                direction: dir,
                route: route.into(),
                requests: Default::default(),
                latency: rt.metrics.latency.with_label_values(&[dir.as_str(), route]),
            });
            recent.len() - 1
        }
    };
    &mut recent[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_class_has_a_slot() {
        for code in [0u16, 100, 204, 302, 404, 503, 600, 999] {
            assert!(CLASSES.contains(&status_class(code)), "{code}");
        }
    }
}
