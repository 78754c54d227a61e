//! The proxies' traffic reports, in memory: the last two of each
//! (identity, instance) with the times they arrived, and the newest
//! refusals of all of them. Instances silent for [`FORGET_AFTER_MS`] are
//! forgotten; at most [`MAX_INSTANCES`] are kept.

use std::collections::HashMap;

use crank_api::report::TrafficReport;

use super::{RefusalInfo, MAX_REFUSALS};

/// An instance not heard from for this long is forgotten (5 minutes).
pub const FORGET_AFTER_MS: i64 = 5 * 60 * 1000;
/// The most proxy instances kept; a new one past it is refused.
pub const MAX_INSTANCES: usize = 1024;

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
        now_ms - self.last.at_ms <= 3 * self.period_ms()
    }
}

/// Why a report was not kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("crank-control keeps the reports of at most {MAX_INSTANCES} proxy instances and has no room for another; it frees one when an instance has been silent for 5 minutes")]
pub struct StoreFull;

/// Every instance's reports and the newest refusals.
#[derive(Debug, Default)]
pub struct TrafficStore {
    instances: HashMap<(String, String), InstanceReports>,
    /// Newest first, at most [`MAX_REFUSALS`].
    refusals: Vec<RefusalInfo>,
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
        if !self.instances.contains_key(&key) && self.instances.len() >= MAX_INSTANCES {
            return Err(StoreFull);
        }
        let refusals = std::mem::take(&mut report.refusals);
        self.add_refusals(identity, &report.instance, refusals);
        let received = Received {
            at_ms: now_ms,
            report,
        };
        match self.instances.get_mut(&key) {
            Some(r) => r.prev = Some(std::mem::replace(&mut r.last, received)),
            None => {
                self.instances.insert(
                    key.clone(),
                    InstanceReports {
                        identity: key.0,
                        instance: key.1,
                        last: received,
                        prev: None,
                    },
                );
            }
        }
        Ok(())
    }

    fn add_refusals(
        &mut self,
        identity: &str,
        instance: &str,
        events: Vec<crank_api::report::RefusalEvent>,
    ) {
        if events.is_empty() {
            return;
        }
        self.refusals
            .extend(events.into_iter().map(|e| RefusalInfo {
                at_ms: e.at_ms,
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
    }

    /// Forgets instances silent for [`FORGET_AFTER_MS`].
    pub fn prune(&mut self, now_ms: i64) {
        self.instances
            .retain(|_, r| now_ms - r.last.at_ms <= FORGET_AFTER_MS);
    }

    /// Every instance kept, in no particular order.
    pub fn instances(&self) -> impl Iterator<Item = &InstanceReports> {
        self.instances.values()
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
            1,
        )
        .unwrap();
        s.record("b.t.crank.local", report("i2", &[(20, "overloaded")]), 1)
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
        s.record("a.t.crank.local", report("i1", &many), 2).unwrap();
        assert_eq!(s.refusals().len(), MAX_REFUSALS);
        assert_eq!(s.refusals()[0].at_ms, 159);
        assert!(
            s.instances().all(|r| r.last.report.refusals.is_empty()),
            "refusals are not kept twice"
        );
    }

    #[test]
    fn a_full_store_refuses_new_instances_only() {
        let mut s = TrafficStore::default();
        for i in 0..MAX_INSTANCES {
            s.record("a.t.crank.local", report(&format!("i{i}"), &[]), 1)
                .unwrap();
        }
        assert_eq!(
            s.record("a.t.crank.local", report("new", &[]), 2),
            Err(StoreFull)
        );
        s.record("a.t.crank.local", report("i0", &[]), 2).unwrap();
        // Once the others fall silent there is room again.
        s.record("a.t.crank.local", report("i1", &[]), 3 + FORGET_AFTER_MS)
            .unwrap();
        s.record("a.t.crank.local", report("new", &[]), 3 + FORGET_AFTER_MS)
            .unwrap();
    }
}
