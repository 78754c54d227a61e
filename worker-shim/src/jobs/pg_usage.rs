//! Usage across shims on the shared queue (`exec.queue.postgres`): the
//! [`UsageSource`] that sums every shim's finished attempts from the shared
//! job records in one SQL query, so `GET /v1/usage` (and
//! `crankctl jobs usage`) through any shim shows the whole cluster's jobs.

use deadpool_postgres::Pool;

use crate::usage::{UsageQuery, UsageRow, UsageSource};

/// CPU-seconds, GPU-seconds, energy and counts per tenant and capability
/// over the attempts that ended at or after `$1`, of one tenant (`$2`) or
/// all. A tenant left empty is charged to `anonymous`, as on the embedded
/// queue.
pub const USAGE_SQL: &str = "
SELECT coalesce(nullif(j.tenant, ''), 'anonymous') AS tenant, j.capability,
       count(DISTINCT j.id)::int8 AS jobs,
       count(*)::int8 AS attempts,
       coalesce(sum((u->>'cpu_seconds')::float8), 0)::float8 AS cpu,
       coalesce(sum((u->>'gpu_seconds')::float8), 0)::float8 AS gpu,
       coalesce(sum((u->>'energy_joules')::float8), 0)::float8 AS joules,
       (count(*) FILTER (WHERE u->>'energy_joules' IS NULL))::int8 AS unmeasured
FROM crank_jobs j
CROSS JOIN LATERAL jsonb_array_elements(coalesce(j.record->'usage', '[]'::jsonb)) AS u
WHERE (u->>'finished_ms')::int8 >= $1
  AND ($2::text IS NULL OR coalesce(nullif(j.tenant, ''), 'anonymous') = $2)
GROUP BY 1, 2
ORDER BY 1, 2";

/// Every shim's usage, from the shared database.
pub struct PgUsage(pub Pool);

#[async_trait::async_trait]
impl UsageSource for PgUsage {
    async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, String> {
        let client = self
            .0
            .get()
            .await
            .map_err(|e| format!("job queue (postgres): no connection: {e}"))?;
        let since = i64::try_from(q.since_ms).unwrap_or(i64::MAX);
        let rows = client
            .query(USAGE_SQL, &[&since, &q.tenant])
            .await
            .map_err(|e| super::pg::QueueError::from(e).to_string())?;
        Ok(rows
            .iter()
            .map(|r| UsageRow {
                tenant: r.get(0),
                capability: r.get(1),
                jobs: r.get::<_, i64>(2) as u64,
                attempts: r.get::<_, i64>(3) as u64,
                cpu_seconds: r.get(4),
                gpu_seconds: r.get(5),
                energy_joules: r.get(6),
                energy_unmeasured_attempts: r.get::<_, i64>(7) as u64,
            })
            .collect())
    }
}
