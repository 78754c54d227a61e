//! Usage accounting for cost allocation: what each finished attempt used
//! (CPU-seconds, GPU-seconds, energy), summed per tenant and capability
//! for `GET /v1/usage?tenant=&since=` and `crankctl jobs usage`.
//!
//! The embedded default sums this shim's own job records
//! ([`LocalUsage`]); on the shared queue `ExecSettings::usage_source` is
//! the [`UsageSource`] that sums every shim's with one SQL query
//! (`jobs/pg_usage.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::job::JobRecord;

/// Which usage to sum.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageQuery {
    /// One tenant, or all.
    pub tenant: Option<String>,
    /// Attempts that ended at or after this (Unix ms).
    pub since_ms: u64,
}

/// The sums for one tenant and capability.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    pub tenant: String,
    pub capability: String,
    /// Jobs with at least one attempt in the window.
    pub jobs: u64,
    pub attempts: u64,
    pub cpu_seconds: f64,
    pub gpu_seconds: f64,
    /// Summed over the attempts whose energy was measured.
    pub energy_joules: f64,
    /// Attempts whose energy this host could not measure (not in
    /// `energy_joules`).
    pub energy_unmeasured_attempts: u64,
}

/// The answer of `GET /v1/usage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageReport {
    pub since_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tenant: Option<String>,
    /// `local` (this shim's records) or `queue` (every shim's).
    pub source: String,
    pub usage: Vec<UsageRow>,
}

/// Sums usage across shims (a shared queue's database).
#[async_trait::async_trait]
pub trait UsageSource: Send + Sync {
    async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, String>;
}

/// The tenant a job's usage is charged to: its tenant, from the caller's
/// mesh identity (the sidecar's `x-crank-client-id`), `anonymous` without.
pub fn tenant_of(rec: &JobRecord) -> String {
    rec.tenant
        .clone()
        .unwrap_or_else(|| crate::jobs::tenants::tenant_of(rec.requester.as_deref()))
}

/// Sums the attempts of `records` that match `q`, per tenant and
/// capability, sorted by both.
pub fn sum<'a>(records: impl IntoIterator<Item = &'a JobRecord>, q: &UsageQuery) -> Vec<UsageRow> {
    let mut rows: BTreeMap<(String, String), UsageRow> = BTreeMap::new();
    for rec in records {
        let tenant = tenant_of(rec);
        if q.tenant.as_ref().is_some_and(|t| *t != tenant) {
            continue;
        }
        let attempts: Vec<_> = rec
            .usage
            .iter()
            .filter(|u| u.finished_ms >= q.since_ms)
            .collect();
        if attempts.is_empty() {
            continue;
        }
        let row = rows
            .entry((tenant.clone(), rec.capability.clone()))
            .or_insert_with(|| UsageRow {
                tenant,
                capability: rec.capability.clone(),
                ..UsageRow::default()
            });
        row.jobs += 1;
        for u in attempts {
            row.attempts += 1;
            row.cpu_seconds += u.cpu_seconds;
            row.gpu_seconds += u.gpu_seconds;
            match u.energy_joules {
                Some(j) => row.energy_joules += j,
                None => row.energy_unmeasured_attempts += 1,
            }
        }
    }
    rows.into_values().collect()
}

/// This shim's records.
pub struct LocalUsage(pub Arc<crate::jobs::Manager>);

#[async_trait::async_trait]
impl UsageSource for LocalUsage {
    async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, String> {
        Ok(sum(&self.0.list(None, usize::MAX), q))
    }
}

/// `since` as the API takes it: a duration ago (`30d`, `12h`) or Unix
/// seconds.
pub fn parse_since(s: &str, now_ms: u64) -> Result<u64, String> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(secs.saturating_mul(1000));
    }
    humantime::parse_duration(s)
        .map(|d| now_ms.saturating_sub(d.as_millis() as u64))
        .map_err(|e| {
            format!("since {s:?} is not a duration like 30d or 12h, nor Unix seconds: {e}")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::AttemptUsage;

    fn rec(tenant: &str, cap: &str, usage: Vec<AttemptUsage>) -> JobRecord {
        let mut r: JobRecord = serde_json::from_value(serde_json::json!({
            "id": "j", "seq": 1, "capability": cap, "priority": "medium",
            "state": "succeeded", "params": {}, "attempts": 1, "max_attempts": 3,
            "progress": {}, "energy": {"gpu": "unmeasured", "cpu_package": "unmeasured"},
            "submitted_ms": 0, "run_seconds": 0.0, "history": []
        }))
        .unwrap();
        r.tenant = Some(tenant.into());
        r.usage = usage;
        r
    }

    fn attempt(finished_ms: u64, cpu: f64, gpu: f64, joules: Option<f64>) -> AttemptUsage {
        AttemptUsage {
            attempt: 1,
            finished_ms,
            cpu_seconds: cpu,
            gpu_seconds: gpu,
            energy_joules: joules,
        }
    }

    #[test]
    fn usage_sums_per_tenant_and_capability_within_the_window() {
        let records = [
            rec(
                "acme",
                "transcode:h264",
                vec![
                    attempt(100, 1.0, 2.0, Some(5.0)),
                    attempt(200, 0.5, 0.0, None),
                ],
            ),
            rec(
                "acme",
                "transcode:h264",
                vec![attempt(50, 9.0, 9.0, Some(9.0))],
            ),
            rec(
                "globex",
                "transcode:h264",
                vec![attempt(300, 4.0, 0.0, Some(1.0))],
            ),
        ];
        let all = sum(
            &records,
            &UsageQuery {
                tenant: None,
                since_ms: 100,
            },
        );
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].tenant, "acme");
        assert_eq!(
            (all[0].jobs, all[0].attempts),
            (1, 2),
            "the old job is outside the window"
        );
        assert_eq!(all[0].cpu_seconds, 1.5);
        assert_eq!(all[0].gpu_seconds, 2.0);
        assert_eq!(all[0].energy_joules, 5.0);
        assert_eq!(all[0].energy_unmeasured_attempts, 1);
        let one = sum(
            &records,
            &UsageQuery {
                tenant: Some("globex".into()),
                since_ms: 0,
            },
        );
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].cpu_seconds, 4.0);
    }

    #[test]
    fn since_is_a_duration_ago_or_unix_seconds() {
        let now = 40 * 86_400_000;
        assert_eq!(parse_since("30d", now), Ok(10 * 86_400_000));
        assert_eq!(parse_since("1700000000", now), Ok(1_700_000_000_000));
        assert!(parse_since("last week", now).is_err());
    }
}
