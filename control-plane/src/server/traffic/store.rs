//! The proxies' traffic reports, in memory: the last two of each
//! (identity, instance) with the times they arrived, and the newest
//! refusals of all of them. Instances silent for [`FORGET_AFTER_MS`] are
//! forgotten; at most [`MAX_INSTANCES`] are kept, at most
//! [`MAX_INSTANCES_PER_IDENTITY`] of one identity, and about
//! [`MAX_STORED_BYTES`] in all. A refusal's time is the proxy's clock, so it
//! is never taken as later than the report's arrival, and refusals older
//! than [`REFUSAL_TTL_MS`] are dropped.

use std::collections::HashMap;

use crank_api::report::TrafficReport;

use super::{RefusalInfo, MAX_REFUSALS};

/// An instance not heard from for this long is forgotten (5 minutes).
pub const FORGET_AFTER_MS: i64 = 5 * 60 * 1000;
/// The most proxy instances kept; a new one past it is refused.
pub const MAX_INSTANCES: usize = 1024;
/// The most instances one identity (client certificate) may report as.
pub const MAX_INSTANCES_PER_IDENTITY: usize = 16;
/// The most report bytes kept in all (estimated in memory, 64 MiB).
pub const MAX_STORED_BYTES: usize = 64 * 1024 * 1024;
/// A refusal older than this is dropped (15 minutes).
pub const REFUSAL_TTL_MS: i64 = 15 * 60 * 1000;

/// A report and when it arrived (Unix milliseconds).
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub at_ms: i64,
    pub report: TrafficReport,
}

/// One proxy instance's last two reports (refusals taken out).
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceReports {
    /// The reporting identity (DNS form), from its client certificate.
    pub identity: String,
    pub instance: String,
    pub last: Received,
    pub prev: Option<Received>,
}

impl InstanceReports {
    /// Its report period: the one it reported, else the time between its
    /// last two reports, else 10 s (the default).
    pub fn period_ms(&self) -> i64 {
        match (self.last.report.interval_ms, &self.prev) {
            (0, Some(p)) => (self.last.at_ms - p.at_ms).max(1),
            (0, None) => 10_000,
            (ms, _) => ms.min(i64::MAX as u64) as i64,
        }
    }

    /// Reported within its last 3 periods.
    pub fn is_live(&self, now_ms: i64) -> bool {
        now_ms.saturating_sub(self.last.at_ms) <= self.period_ms().saturating_mul(3)
    }
}

/// Why a report was not kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreFull {
    #[error("crank-control keeps the reports of at most {MAX_INSTANCES} proxy instances and has no room for another; it frees one when an instance has been silent for 5 minutes")]
    Instances,
    #[error("{identity} already reports as {MAX_INSTANCES_PER_IDENTITY} instances, the most one identity may; an instance is forgotten 5 minutes after its last report")]
    PerIdentity { identity: String },
    #[error("crank-control keeps at most {} MiB of traffic reports and has no room for this one; it frees room when an instance has been silent for 5 minutes", MAX_STORED_BYTES / (1024 * 1024))]
    Bytes,
}

/// Every instance's reports (with their estimated size) and the newest
/// refusals.
#[derive(Debug, Default)]
pub struct TrafficStore {
    instances: HashMap<(String, String), (InstanceReports, usize)>,
    /// The estimated bytes of every report kept.
    bytes: usize,
    /// Newest first, at most [`MAX_REFUSALS`].
    refusals: Vec<RefusalInfo>,
}

/// About how many bytes `r` takes in memory.
fn approx_bytes(r: &TrafficReport) -> usize {
    use crank_api::report::{LatencyHistogram, RequestCount};
    use std::mem::size_of;
    let requests: usize = r
        .requests
        .iter()
        .map(|c| {
            size_of::<RequestCount>() + c.direction.len() + c.route.len() + c.status_class.len()
        })
        .sum();
    let latency: usize = r
        .latency
        .iter()
        .map(|h| {
            size_of::<LatencyHistogram>() + h.direction.len() + h.route.len() + 16 * h.bounds.len()
        })
        .sum();
    size_of::<Received>() + r.instance.len() + requests + latency
}

impl TrafficStore {
    /// Keeps `report` from `identity` as that instance's last one.
    pub fn record(
        &mut self,
        identity: &str,
        mut report: TrafficReport,
        now_ms: i64,
    ) -> Result<(), StoreFull> {
        self.prune(now_ms);
        let key = (identity.to_string(), report.instance.clone());
        let refusals = std::mem::take(&mut report.refusals);
        let size = approx_bytes(&report);
        // What replacing this instance's older report frees.
        let frees = match self.instances.get(&key) {
            Some((r, _)) => r.prev.as_ref().map_or(0, |p| approx_bytes(&p.report)),
            None => {
                self.room_for_new(identity)?;
                0
            }
        };
        if self.bytes - frees + size > MAX_STORED_BYTES {
            return Err(StoreFull::Bytes);
        }
        self.add_refusals(identity, &report.instance, refusals, now_ms);
        let received = Received {
            at_ms: now_ms,
            report,
        };
        self.bytes = self.bytes - frees + size;
        match self.instances.get_mut(&key) {
            Some((r, bytes)) => {
                *bytes = *bytes - frees + size;
                r.prev = Some(std::mem::replace(&mut r.last, received));
            }
            None => {
                let r = InstanceReports {
                    identity: key.0.clone(),
                    instance: key.1.clone(),
                    last: received,
                    prev: None,
                };
                self.instances.insert(key, (r, size));
            }
        }
        Ok(())
    }

    /// Whether a new instance of `identity` may be kept.
    fn room_for_new(&self, identity: &str) -> Result<(), StoreFull> {
        if self.instances.len() >= MAX_INSTANCES {
            return Err(StoreFull::Instances);
        }
        let own = self.instances.keys().filter(|(i, _)| i == identity).count();
        if own >= MAX_INSTANCES_PER_IDENTITY {
            return Err(StoreFull::PerIdentity {
                identity: identity.to_string(),
            });
        }
        Ok(())
    }

    fn add_refusals(
        &mut self,
        identity: &str,
        instance: &str,
        events: Vec<crank_api::report::RefusalEvent>,
        now_ms: i64,
    ) {
        if events.is_empty() {
            return;
        }
        // The proxy's clock may be ahead: never later than the arrival.
        let arrived = now_ms.max(0) as u64;
        self.refusals
            .extend(events.into_iter().map(|e| RefusalInfo {
                at_ms: e.at_ms.min(arrived),
                proxy: identity.to_string(),
                instance: instance.to_string(),
                status: e.status,
                reason: e.reason,
                route: e.route,
                method: e.method,
                path: e.path,
                source: e.source,
            }));
        // Stable: events of one report with the same time keep their order.
        self.refusals.sort_by_key(|r| std::cmp::Reverse(r.at_ms));
        self.refusals.truncate(MAX_REFUSALS);
        self.drop_old_refusals(now_ms);
    }

    fn drop_old_refusals(&mut self, now_ms: i64) {
        let oldest = now_ms.saturating_sub(REFUSAL_TTL_MS).max(0) as u64;
        self.refusals.retain(|r| r.at_ms >= oldest);
    }

    /// Forgets instances silent for [`FORGET_AFTER_MS`] and refusals older
    /// than [`REFUSAL_TTL_MS`].
    pub fn prune(&mut self, now_ms: i64) {
        let mut freed = 0;
        self.instances.retain(|_, (r, bytes)| {
            let keep = now_ms.saturating_sub(r.last.at_ms) <= FORGET_AFTER_MS;
            if !keep {
                freed += *bytes;
            }
            keep
        });
        self.bytes -= freed;
        self.drop_old_refusals(now_ms);
    }

    /// Every instance kept, in no particular order.
    pub fn instances(&self) -> impl Iterator<Item = &InstanceReports> {
        self.instances.values().map(|(r, _)| r)
    }

    /// The newest refusals, newest first.
    pub fn refusals(&self) -> &[RefusalInfo] {
        &self.refusals
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crank_api::report::RefusalEvent;

    fn report(instance: &str, refusals: &[(u64, &str)]) -> TrafficReport {
        TrafficReport {
            instance: instance.into(),
            interval_ms: 1000,
            refusals: refusals
                .iter()
                .map(|(at, reason)| RefusalEvent {
                    at_ms: *at,
                    direction: "inbound".into(),
                    status: 403,
                    reason: reason.to_string(),
                    route: "app".into(),
                    method: "GET".into(),
                    path: "/".into(),
                    source: None,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn keeps_the_last_two_reports_and_forgets_silent_instances() {
        let mut s = TrafficStore::default();
        s.record("a.t.crank.local", report("i1", &[]), 1_000)
            .unwrap();
        s.record("a.t.crank.local", report("i1", &[]), 2_000)
            .unwrap();
        s.record("a.t.crank.local", report("i1", &[]), 3_000)
            .unwrap();
        s.record("b.t.crank.local", report("i1", &[]), 3_000)
            .unwrap();
        assert_eq!(s.instances().count(), 2, "keyed by identity and instance");
        let a = s
            .instances()
            .find(|r| r.identity == "a.t.crank.local")
            .unwrap();
        assert_eq!(
            (a.last.at_ms, a.prev.as_ref().unwrap().at_ms),
            (3_000, 2_000)
        );
        assert!(a.is_live(6_000) && !a.is_live(6_001), "3 periods of 1 s");
        s.prune(3_000 + FORGET_AFTER_MS);
        assert_eq!(s.instances().count(), 2);
        s.prune(3_001 + FORGET_AFTER_MS);
        assert_eq!(s.instances().count(), 0);
    }

    #[test]
    fn refusals_are_merged_newest_first_and_bounded() {
        let mut s = TrafficStore::default();
        s.record(
            "a.t.crank.local",
            report("i1", &[(10, "policy-denied"), (30, "rate-limited")]),
            1_000,
        )
        .unwrap();
        s.record(
            "b.t.crank.local",
            report("i2", &[(20, "overloaded")]),
            1_000,
        )
        .unwrap();
        let got: Vec<(u64, &str, &str)> = s
            .refusals()
            .iter()
            .map(|r| (r.at_ms, r.reason.as_str(), r.proxy.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (30, "rate-limited", "a.t.crank.local"),
                (20, "overloaded", "b.t.crank.local"),
                (10, "policy-denied", "a.t.crank.local")
            ]
        );
        let many: Vec<(u64, &str)> = (100..160).map(|t| (t, "rate-limited")).collect();
        s.record("a.t.crank.local", report("i1", &many), 2_000)
            .unwrap();
        assert_eq!(s.refusals().len(), MAX_REFUSALS);
        assert_eq!(s.refusals()[0].at_ms, 159);
        assert!(
            s.instances().all(|r| r.last.report.refusals.is_empty()),
            "refusals are not kept twice"
        );
    }

    #[test]
    fn refusal_times_from_the_future_are_clamped_and_old_ones_expire() {
        let mut s = TrafficStore::default();
        let now = 1_000_000_000;
        s.record(
            "a.t.crank.local",
            report(
                "i1",
                &[
                    (u64::MAX, "rate-limited"),
                    (now as u64 + 60_000, "overloaded"),
                ],
            ),
            now,
        )
        .unwrap();
        assert!(
            s.refusals().iter().all(|r| r.at_ms == now as u64),
            "never later than their arrival: {:?}",
            s.refusals()
        );
        // Newer refusals of another proxy come first, the clamped ones don't stick.
        s.record(
            "b.t.crank.local",
            report("i2", &[(now as u64 + 5, "policy-denied")]),
            now + 10,
        )
        .unwrap();
        assert_eq!(s.refusals()[0].reason, "policy-denied");
        s.prune(now + REFUSAL_TTL_MS);
        assert_eq!(s.refusals().len(), 3, "15 minutes are kept");
        s.prune(now + REFUSAL_TTL_MS + 1);
        assert_eq!(s.refusals().len(), 1, "older than 15 minutes are dropped");
        s.prune(now + REFUSAL_TTL_MS + 6);
        assert!(s.refusals().is_empty());
    }

    #[test]
    fn huge_intervals_do_not_overflow() {
        let mut s = TrafficStore::default();
        let mut r = report("i1", &[]);
        r.interval_ms = u64::MAX;
        s.record("a.t.crank.local", r, 1).unwrap();
        let a = s.instances().next().unwrap();
        assert!(a.is_live(i64::MAX) && a.is_live(i64::MIN));
    }

    #[test]
    fn a_full_store_refuses_new_instances_only() {
        let mut s = TrafficStore::default();
        let id = |i: usize| format!("w{i}.t.crank.local");
        for i in 0..MAX_INSTANCES {
            s.record(&id(i), report("i", &[]), 1).unwrap();
        }
        assert_eq!(
            s.record("new.t.crank.local", report("i", &[]), 2),
            Err(StoreFull::Instances)
        );
        s.record(&id(0), report("i", &[]), 2).unwrap();
        // Once the others fall silent there is room again.
        s.record(&id(1), report("i", &[]), 3 + FORGET_AFTER_MS)
            .unwrap();
        s.record("new.t.crank.local", report("i", &[]), 3 + FORGET_AFTER_MS)
            .unwrap();
    }

    #[test]
    fn one_identity_cannot_fill_the_store() {
        let mut s = TrafficStore::default();
        for i in 0..MAX_INSTANCES_PER_IDENTITY {
            s.record("a.t.crank.local", report(&format!("i{i}"), &[]), 1)
                .unwrap();
        }
        assert_eq!(
            s.record("a.t.crank.local", report("made-up", &[]), 2),
            Err(StoreFull::PerIdentity {
                identity: "a.t.crank.local".into()
            })
        );
        // Its known instances still report, and other identities still fit.
        s.record("a.t.crank.local", report("i0", &[]), 2).unwrap();
        s.record("b.t.crank.local", report("made-up", &[]), 2)
            .unwrap();
    }

    #[test]
    fn the_stored_bytes_are_bounded_and_freed() {
        use crank_api::report::RequestCount;
        let big = |instance: &str| TrafficReport {
            instance: instance.into(),
            requests: (0..512)
                .map(|i| RequestCount {
                    direction: "outbound".into(),
                    route: format!("{i:0>256}"),
                    status_class: "2xx".into(),
                    count: 1,
                })
                .collect(),
            ..Default::default()
        };
        let one = approx_bytes(&big("i"));
        let fit = MAX_STORED_BYTES / one;
        let mut s = TrafficStore::default();
        let mut stored = 0;
        for i in 0..fit + 1 {
            match s.record(&format!("w{i}.t.crank.local"), big("i"), 1) {
                Ok(()) => stored += 1,
                Err(e) => assert_eq!(e, StoreFull::Bytes),
            }
        }
        assert_eq!(stored, fit, "{one} bytes a report");
        assert!(s.bytes <= MAX_STORED_BYTES);
        // A second report of a kept instance replaces nothing yet (two are
        // kept) and so does not fit either; silence frees the room.
        assert_eq!(
            s.record("w0.t.crank.local", big("i"), 2),
            Err(StoreFull::Bytes)
        );
        s.prune(2 + FORGET_AFTER_MS);
        assert_eq!(s.bytes, 0);
        s.record("w0.t.crank.local", big("i"), 2 + FORGET_AFTER_MS)
            .unwrap();
    }
}
