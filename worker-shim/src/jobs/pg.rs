//! The cluster job queue's PostgreSQL side (`exec.queue.postgres`): the
//! pool, the schema migrations shipped in `worker-shim/migrations/`, and
//! one function per statement the shims run: submit (with the tenant's
//! queued quota), claim (`FOR UPDATE SKIP LOCKED`, by priority, tenant fair
//! share, submission), lease renewal, the reaper of expired leases, the
//! fenced end of a run, and the caller's reads, cancel and delete. A job
//! that ends without success fails its queued dependants (`after`) in the
//! same transaction.
//!
//! Every write of a running job is fenced by `(id, claims, lease_owner)`:
//! a shim presumed dead that comes back writes nothing over a newer claim.

use std::time::Duration;

use crank_plumbing::Refusal;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Transaction};
use http::StatusCode;
use tokio_postgres::NoTls;

use super::tenants_reload::LiveTenants;
use crate::job::{now_ms, Failure, FailureClass, JobRecord, JobState};

/// Schema versions, in order: (version, name, SQL).
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "jobs", include_str!("../../migrations/0001_jobs.sql")),
    (
        2,
        "idempotency",
        include_str!("../../migrations/0002_idempotency.sql"),
    ),
];

/// Any advisory lock key the shims agree on: migrations run one at a time.
const MIGRATION_LOCK: i64 = 0x6372_616e_6b31;

/// A failure talking to the database.
#[derive(Debug, thiserror::Error)]
#[error("job queue (postgres): {0}")]
pub struct QueueError(pub String);

impl From<tokio_postgres::Error> for QueueError {
    fn from(e: tokio_postgres::Error) -> Self {
        QueueError(match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => e.to_string(),
        })
    }
}

impl From<deadpool_postgres::PoolError> for QueueError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        QueueError(format!("no connection: {e}"))
    }
}

/// The database is down or refused: the caller may retry shortly.
impl From<QueueError> for Refusal {
    fn from(e: QueueError) -> Refusal {
        Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue-unavailable",
            format!("{e}; the job was not accepted, retry shortly"),
        )
        .retry_after(1)
    }
}

/// The queue of one capability in one database.
pub struct PgQueue {
    pool: Pool,
    pub capability: String,
    /// This shim, as attempts and leases name it.
    pub host: String,
    pub lease: Duration,
    /// Weights and quotas, re-read when tenants.yaml changes.
    pub tenants: std::sync::Arc<LiveTenants>,
}

/// A claimed job, before its start is written.
pub struct Claimed {
    pub rec: JobRecord,
    pub need: String,
}

/// What a lease renewal found for one running job.
#[derive(Debug, PartialEq)]
pub enum Renewal {
    Kept,
    /// A caller asked to cancel it through another shim.
    CancelRequested,
    /// The lease is no longer ours (expired and requeued, or deleted).
    Lost,
}

impl PgQueue {
    /// Connects (checking one connection) and applies the migrations.
    pub async fn connect(
        url: &str,
        max_connections: usize,
        capability: &str,
        host: &str,
        lease: Duration,
        tenants: std::sync::Arc<LiveTenants>,
    ) -> Result<PgQueue, QueueError> {
        let cfg: tokio_postgres::Config = url.parse().map_err(|e| {
            QueueError(format!(
                "exec.queue.postgres.url is not a PostgreSQL URL ({e}); use postgres://USER@HOST:PORT/DB"
            ))
        })?;
        let mgr = Manager::from_config(
            cfg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(max_connections.max(2))
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| QueueError(format!("building the pool: {e}")))?;
        let q = PgQueue {
            pool,
            capability: capability.to_string(),
            host: host.to_string(),
            lease,
            tenants,
        };
        q.migrate().await?;
        Ok(q)
    }

    /// Applies every migration the database lacks, one shim at a time.
    async fn migrate(&self) -> Result<(), QueueError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS crank_schema_migrations (
                version integer PRIMARY KEY, name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
        let have: Vec<i32> = tx
            .query("SELECT version FROM crank_schema_migrations", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        if let Some(newer) = have.iter().find(|v| **v > known) {
            return Err(QueueError(format!(
                "the database has schema version {newer}, newer than this crank-shim knows ({known}); upgrade crank-shim"
            )));
        }
        for (version, name, sql) in MIGRATIONS {
            if have.contains(version) {
                continue;
            }
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO crank_schema_migrations (version, name) VALUES ($1, $2)",
                &[version, name],
            )
            .await?;
            tracing::info!(version, name, "job queue schema migrated");
        }
        tx.commit().await?;
        Ok(())
    }

    /// Queues a new job, refusing it with 429 when its tenant already has
    /// `max_queued` jobs waiting. Sets `rec.seq` to the cluster's order.
    pub async fn submit(
        &self,
        rec: &mut JobRecord,
        need: &str,
        input: Option<Vec<u8>>,
    ) -> Result<(), Refusal> {
        let tenant = rec.tenant.clone().unwrap_or_default();
        let mut client = self.pool.get().await.map_err(QueueError::from)?;
        let tx = client.transaction().await.map_err(QueueError::from)?;
        self.queued_quota(&tx, &tenant).await?;
        self.check_after(&tx, &rec.extras.after).await?;
        let seq: i64 = tx
            .query_one("SELECT nextval('crank_jobs_seq')", &[])
            .await
            .map_err(QueueError::from)?
            .get(0);
        rec.seq = seq as u64;
        let record = to_json(rec)?;
        let key = idempotency_key(&record);
        let inserted = tx
            .execute(
                "INSERT INTO crank_jobs (id, seq, capability, tenant, priority, need, state, record, idempotency_key)
                 VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8)
                 ON CONFLICT (capability, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
                &[
                    &rec.id,
                    &seq,
                    &self.capability,
                    &tenant,
                    &(rec.priority.rank() as i16),
                    &need,
                    &record,
                    &key,
                ],
            )
            .await
            .map_err(QueueError::from)?;
        if inserted == 0 {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                "already-queued",
                format!(
                    "a job with key {} is already in the queue (a template's tick fires once, whichever shim fires it first)",
                    key.unwrap_or_default()
                ),
            ));
        }
        if let Some(data) = input {
            tx.execute(
                "INSERT INTO crank_job_inputs (id, data) VALUES ($1, $2)",
                &[&rec.id, &data],
            )
            .await
            .map_err(QueueError::from)?;
        }
        tx.commit().await.map_err(QueueError::from)?;
        Ok(())
    }

    /// 429 `tenant-queue-quota` when the tenant has `max_queued` waiting.
    /// Holds the tenant's advisory lock to the end of the transaction, so
    /// two shims cannot both take the last place.
    async fn queued_quota(&self, tx: &Transaction<'_>, tenant: &str) -> Result<(), Refusal> {
        let tenants = self.tenants.snapshot();
        let spec = tenants.get(tenant);
        let Some(max) = spec.max_queued else {
            return Ok(());
        };
        let key = format!("{}/{tenant}", self.capability);
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&key])
            .await
            .map_err(QueueError::from)?;
        let queued: i64 = tx
            .query_one(
                "SELECT count(*) FROM crank_jobs WHERE capability = $1 AND tenant = $2 AND state = 'queued'",
                &[&self.capability, &tenant],
            )
            .await
            .map_err(QueueError::from)?
            .get(0);
        if queued < i64::from(max) {
            return Ok(());
        }
        let slots = spec.max_running.unwrap_or(1).max(1) as u64;
        Err(Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "tenant-queue-quota",
            format!(
                "tenant {tenant} already has {queued} jobs queued for {}, its max_queued in tenants.yaml; retry once some have started",
                self.capability
            ),
        )
        .retry_after((queued as u64 / slots).clamp(1, 60)))
    }

    /// Refuses `after` naming a job of this capability the queue does not
    /// hold (400 `dependency-not-found`) or one already ended without
    /// success (409 `dependency-failed`). Holds the dependencies' rows
    /// (`FOR SHARE`) to the end of the transaction, so a dependency that
    /// fails meanwhile sees this job when it fails its dependants.
    async fn check_after(&self, tx: &Transaction<'_>, after: &[String]) -> Result<(), Refusal> {
        if after.is_empty() {
            return Ok(());
        }
        let rows = tx
            .query(
                "SELECT id, state FROM crank_jobs WHERE capability = $1 AND id = ANY($2) FOR SHARE",
                &[&self.capability, &after],
            )
            .await
            .map_err(QueueError::from)?;
        for dep in after {
            let state = rows
                .iter()
                .find(|r| r.get::<_, &str>(0) == dep)
                .map(|r| r.get::<_, String>(1));
            match state.as_deref() {
                None => {
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "dependency-not-found",
                        format!("after: no job {dep} in the queue of {}; name jobs of this capability that exist", self.capability),
                    ))
                }
                Some(s @ ("failed" | "canceled" | "timed_out")) => {
                    return Err(Refusal::new(
                        StatusCode::CONFLICT,
                        "dependency-failed",
                        format!("after: job {dep} is already {s}, so this job could never run"),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Fails the queued jobs that run after `parent` (and theirs, in turn)
    /// with `dependency_failed`, in the caller's transaction: `parent`
    /// ended `state`, without success. Returns their ids.
    pub async fn fail_dependants(
        &self,
        tx: &Transaction<'_>,
        parent: &str,
        state: JobState,
    ) -> Result<Vec<String>, QueueError> {
        let mut pending = vec![(parent.to_string(), state.to_string())];
        let mut failed = Vec::new();
        while let Some((parent, parent_state)) = pending.pop() {
            let rows = tx
                .query(
                    "SELECT record FROM crank_jobs
                     WHERE capability = $1 AND state = 'queued'
                       AND coalesce(record->'after', '[]'::jsonb) ? $2
                     FOR UPDATE",
                    &[&self.capability, &parent],
                )
                .await?;
            for row in rows {
                let mut rec = from_json(row.get(0))?;
                if !super::finish::dependency_failed(&mut rec, &parent, &parent_state, now_ms()) {
                    continue;
                }
                tx.execute(
                    "UPDATE crank_jobs SET state = 'failed', record = $2, updated_at = now() WHERE id = $1",
                    &[&rec.id, &to_json(&rec)?],
                )
                .await?;
                pending.push((rec.id.clone(), "failed".to_string()));
                failed.push(rec.id);
            }
        }
        if !failed.is_empty() {
            tracing::info!(parent, jobs = ?failed, "dependency_failed: dependants of a job that did not succeed failed");
        }
        Ok(failed)
    }

    /// A usage source over every shim's records in this database.
    pub fn usage_source(&self) -> std::sync::Arc<dyn crate::usage::UsageSource> {
        std::sync::Arc::new(super::pg_usage::PgUsage(self.pool.clone()))
    }

    /// Opens a transaction on a pooled connection.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, QueueError> {
        Ok(self.pool.get().await?)
    }

    /// Locks the next job this shim may run: of a need in `needs`, of rank
    /// at most `max_rank`, whose tenant is under `max_running` and whose
    /// dependencies (`after`) all succeeded; ordered by priority, then the
    /// tenant's running jobs over its weight, then submission.
    pub async fn next(
        &self,
        tx: &Transaction<'_>,
        needs: &[&str],
        max_rank: i16,
    ) -> Result<Option<Claimed>, QueueError> {
        let tenants = self.tenants.snapshot();
        let (names, weights, max_running) = tenants.arrays();
        let d = tenants.default_spec();
        let default_max = d.max_running.map_or(-1, i64::from);
        let needs: Vec<String> = needs.iter().map(|s| s.to_string()).collect();
        let mut skipped: Vec<String> = Vec::new();
        for _ in 0..4 {
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
                &self.capability,
                &needs,
                &max_rank,
                &names,
                &weights,
                &max_running,
                &d.weight,
                &default_max,
                &skipped,
            ];
            let Some(row) = tx.query_opt(CLAIM_SQL, &params).await? else {
                return Ok(None);
            };
            let id: String = row.get(0);
            if let Some(row) = tx.query_opt(LOCK_SQL, &[&id]).await? {
                return Ok(Some(Claimed {
                    rec: from_json(row.get(1))?,
                    need: row.get(2),
                }));
            }
            skipped.push(id);
        }
        Ok(None)
    }

    /// Marks a locked job running under this shim's lease; returns the
    /// claim's fencing token.
    pub async fn mark_running(
        &self,
        tx: &Transaction<'_>,
        rec: &JobRecord,
    ) -> Result<i64, QueueError> {
        let row = tx
            .query_one(
                "UPDATE crank_jobs SET state = 'running', claims = claims + 1, lease_owner = $2,
                   lease_expires = now() + make_interval(secs => $3), record = $4,
                   cancel_requested = false, updated_at = now()
                 WHERE id = $1 RETURNING claims",
                &[
                    &rec.id,
                    &self.host,
                    &self.lease.as_secs_f64(),
                    &to_json(rec)?,
                ],
            )
            .await?;
        Ok(row.get(0))
    }

    /// The job's input, when it was submitted with one.
    pub async fn input(&self, id: &str) -> Result<Option<Vec<u8>>, QueueError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt("SELECT data FROM crank_job_inputs WHERE id = $1", &[&id])
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Renews the leases of the jobs this shim runs, `(id, token)`.
    pub async fn renew(
        &self,
        running: &[(String, i64)],
    ) -> Result<Vec<(String, Renewal)>, QueueError> {
        if running.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = running.iter().map(|r| r.0.clone()).collect();
        let tokens: Vec<i64> = running.iter().map(|r| r.1).collect();
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "UPDATE crank_jobs j SET lease_expires = now() + make_interval(secs => $2)
                 FROM unnest($3::text[], $4::int8[]) AS mine(id, claims)
                 WHERE j.id = mine.id AND j.claims = mine.claims AND j.lease_owner = $1
                   AND j.state = 'running'
                 RETURNING j.id, j.cancel_requested",
                &[&self.host, &self.lease.as_secs_f64(), &ids, &tokens],
            )
            .await?;
        Ok(ids
            .into_iter()
            .map(|id| {
                let found = rows.iter().find(|r| r.get::<_, &str>(0) == id);
                let r = match found {
                    None => Renewal::Lost,
                    Some(r) if r.get::<_, bool>(1) => Renewal::CancelRequested,
                    Some(_) => Renewal::Kept,
                };
                (id, r)
            })
            .collect())
    }

    /// Requeues the jobs whose lease expired (their host is lost): the
    /// attempt ends `host-lost`; a job with no attempts left fails.
    pub async fn reap(&self) -> Result<Vec<String>, QueueError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "SELECT id, record, lease_owner FROM crank_jobs
                 WHERE capability = $1 AND state = 'running' AND lease_expires < now()
                 LIMIT 100 FOR UPDATE SKIP LOCKED",
                &[&self.capability],
            )
            .await?;
        let mut out = Vec::new();
        for row in rows {
            let mut rec = from_json(row.get(1))?;
            let owner: Option<String> = row.get(2);
            host_lost(&mut rec, owner.as_deref().unwrap_or("?"), now_ms());
            tx.execute(
                "UPDATE crank_jobs SET state = $2, record = $3, lease_owner = NULL,
                   lease_expires = NULL, run_after = now(), updated_at = now()
                 WHERE id = $1",
                &[&rec.id, &rec.state.as_str(), &to_json(&rec)?],
            )
            .await?;
            if rec.state == JobState::Failed {
                self.fail_dependants(&tx, &rec.id, rec.state).await?;
            }
            out.push(rec.id);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Writes the end of a run, fenced by the claim's token; false when the
    /// lease is no longer this shim's (nothing written). A retried job
    /// waits `retry_in` before it can be claimed again.
    pub async fn finish(
        &self,
        rec: &JobRecord,
        token: i64,
        retry_in: Option<Duration>,
    ) -> Result<bool, QueueError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let wait = retry_in.unwrap_or_default().as_secs_f64();
        let n = tx
            .execute(
                "UPDATE crank_jobs SET state = $4, record = $5, lease_owner = NULL,
                   lease_expires = NULL, run_after = now() + make_interval(secs => $6),
                   cancel_requested = false, updated_at = now()
                 WHERE id = $1 AND claims = $2 AND lease_owner = $3 AND state = 'running'",
                &[
                    &rec.id,
                    &token,
                    &self.host,
                    &rec.state.as_str(),
                    &to_json(rec)?,
                    &wait,
                ],
            )
            .await?;
        if n == 1 && rec.state.is_terminal() && rec.state != JobState::Succeeded {
            self.fail_dependants(&tx, &rec.id, rec.state).await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    pub async fn get(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt("SELECT record FROM crank_jobs WHERE id = $1", &[&id])
            .await?;
        row.map(|r| from_json(r.get(0))).transpose()
    }

    /// Jobs of this capability, newest first, optionally of one state.
    pub async fn list(
        &self,
        state: Option<JobState>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, QueueError> {
        let client = self.pool.get().await?;
        let state = state.map(|s| s.as_str().to_string());
        let rows = client
            .query(
                "SELECT record FROM crank_jobs WHERE capability = $1 AND ($2::text IS NULL OR state = $2)
                 ORDER BY seq DESC LIMIT $3",
                &[&self.capability, &state, &(limit as i64)],
            )
            .await?;
        rows.iter().map(|r| from_json(r.get(0))).collect()
    }

    /// Cancels a queued job at once; a running one is flagged, and its
    /// shim stops it at its next heartbeat. Returns the record.
    pub async fn cancel(&self, id: &str, by: Option<&str>) -> Result<JobRecord, Refusal> {
        let mut client = self.pool.get().await.map_err(QueueError::from)?;
        let tx = client.transaction().await.map_err(QueueError::from)?;
        let row = tx
            .query_opt(
                "SELECT record FROM crank_jobs WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(QueueError::from)?;
        let Some(row) = row else {
            return Err(super::manager::job_not_found(id));
        };
        let mut rec = from_json(row.get(0))?;
        match rec.state {
            JobState::Queued => {
                let now = now_ms();
                let note = format!(
                    "canceled while queued{}",
                    by.map(|b| format!(" by {b}")).unwrap_or_default()
                );
                let _ = rec.transition(JobState::Canceled, now, Some(note));
                rec.finished_ms = Some(now);
                tx.execute(
                    "UPDATE crank_jobs SET state = 'canceled', record = $2, updated_at = now() WHERE id = $1",
                    &[&id, &to_json(&rec)?],
                )
                .await
                .map_err(QueueError::from)?;
                self.fail_dependants(&tx, id, JobState::Canceled).await?;
            }
            JobState::Running => {
                tx.execute(
                    "UPDATE crank_jobs SET cancel_requested = true WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(QueueError::from)?;
            }
            s => {
                return Err(Refusal::new(
                    StatusCode::CONFLICT,
                    "job-finished",
                    format!("job {id} is already {s}; nothing to cancel"),
                ))
            }
        }
        tx.commit().await.map_err(QueueError::from)?;
        Ok(rec)
    }

    /// Deletes a finished job's shared record; returns it.
    pub async fn delete(&self, id: &str) -> Result<JobRecord, Refusal> {
        let client = self.pool.get().await.map_err(QueueError::from)?;
        let row = client
            .query_opt(
                "DELETE FROM crank_jobs WHERE id = $1 AND state NOT IN ('queued', 'running') RETURNING record",
                &[&id],
            )
            .await
            .map_err(QueueError::from)?;
        if let Some(row) = row {
            return Ok(from_json(row.get(0))?);
        }
        match self.get(id).await? {
            None => Err(super::manager::job_not_found(id)),
            Some(rec) => Err(Refusal::new(
                StatusCode::CONFLICT,
                "job-active",
                format!(
                    "job {id} is {}; cancel it first (POST /v1/jobs/{id}/cancel)",
                    rec.state
                ),
            )),
        }
    }

    /// Whether a `live` job of one of `needs` is waiting (preemption).
    pub async fn live_waiting(&self, needs: &[&str]) -> Result<bool, QueueError> {
        let client = self.pool.get().await?;
        let needs: Vec<String> = needs.iter().map(|s| s.to_string()).collect();
        let row = client
            .query_opt(
                "SELECT 1 FROM crank_jobs WHERE capability = $1 AND state = 'queued' AND priority = 0
                   AND need = ANY($2) AND run_after <= now() LIMIT 1",
                &[&self.capability, &needs],
            )
            .await?;
        Ok(row.is_some())
    }
}

/// The claim's choice: of each tenant's oldest fitting job of its most
/// urgent class (one index probe per tenant with queued jobs, found by a
/// loose index scan), the first by priority, then fair share (the tenant's
/// running jobs over its weight), then submission. Not locked here: the
/// caller locks it with [`LOCK_SQL`] and tries again without it when
/// another shim was faster.
pub const CLAIM_SQL: &str = "
WITH RECURSIVE queued_tenants AS (
    (SELECT tenant FROM crank_jobs
     WHERE capability = $1 AND state = 'queued' ORDER BY tenant LIMIT 1)
    UNION ALL
    SELECT (SELECT j.tenant FROM crank_jobs j
            WHERE j.capability = $1 AND j.state = 'queued' AND j.tenant > q.tenant
            ORDER BY j.tenant LIMIT 1)
    FROM queued_tenants q WHERE q.tenant IS NOT NULL
), running AS (
    SELECT tenant, count(*)::float8 AS n FROM crank_jobs
    WHERE capability = $1 AND state = 'running' GROUP BY tenant
), conf AS (
    SELECT * FROM unnest($4::text[], $5::float8[], $6::int8[]) AS t(tenant, weight, max_running)
)
SELECT h.id FROM queued_tenants q
LEFT JOIN running r ON r.tenant = q.tenant
LEFT JOIN conf c ON c.tenant = q.tenant
CROSS JOIN LATERAL (
    SELECT j.id, j.priority, j.seq FROM crank_jobs j
    WHERE j.capability = $1 AND j.tenant = q.tenant AND j.state = 'queued'
      AND j.run_after <= now() AND j.need = ANY($2) AND j.priority <= $3
      AND j.id <> ALL($9)
      AND NOT EXISTS (
          SELECT 1 FROM jsonb_array_elements_text(coalesce(j.record->'after', '[]'::jsonb)) AS d(id)
          LEFT JOIN crank_jobs p ON p.id = d.id
          WHERE p.state IS DISTINCT FROM 'succeeded')
    ORDER BY j.priority, j.seq LIMIT 1
) h
WHERE q.tenant IS NOT NULL
  AND (coalesce(c.max_running, $8) < 0 OR coalesce(r.n, 0) < coalesce(c.max_running, $8))
ORDER BY h.priority, coalesce(r.n, 0) / coalesce(c.weight, $7), h.seq
LIMIT 1";

/// Locks the candidate [`CLAIM_SQL`] chose; nothing when another shim
/// holds it (or took it meanwhile).
pub const LOCK_SQL: &str = "
SELECT id, record, need FROM crank_jobs
WHERE id = $1 AND state = 'queued'
FOR UPDATE SKIP LOCKED";

/// The lease of `owner` expired: the attempt ends `host-lost` and the job
/// goes back to the queue (or fails with no attempts left).
pub fn host_lost(rec: &mut JobRecord, owner: &str, now: u64) {
    rec.end_attempt(now, "host-lost");
    rec.pid = None;
    rec.failure = Some(Failure {
        class: FailureClass::Interrupted,
        message: format!("host-lost: {owner} stopped renewing its lease"),
        exit_code: None,
        signal: None,
    });
    let (to, note) = if rec.attempts < rec.max_attempts {
        (
            JobState::Queued,
            format!("host-lost: {owner} stopped renewing its lease; re-queued"),
        )
    } else {
        (
            JobState::Failed,
            format!("host-lost: {owner} stopped renewing its lease; no attempts left"),
        )
    };
    let _ = rec.transition(to, now, Some(note));
    if to == JobState::Failed {
        rec.finished_ms = Some(now);
    }
}

/// The key that keeps one job per (template, tick) of a schedule:
/// `cron:<template>:<scheduled_ms>`, read from the record's JSON.
pub fn idempotency_key(record: &serde_json::Value) -> Option<String> {
    let template = record.get("template")?.as_str()?;
    let tick = record.get("scheduled_ms")?.as_u64()?;
    Some(format!("cron:{template}:{tick}"))
}

fn to_json(rec: &JobRecord) -> Result<serde_json::Value, QueueError> {
    serde_json::to_value(rec).map_err(|e| QueueError(format!("encoding job {}: {e}", rec.id)))
}

fn from_json(v: serde_json::Value) -> Result<JobRecord, QueueError> {
    serde_json::from_value(v)
        .map_err(|e| QueueError(format!("a job record this crank-shim cannot read: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scheduled_job_has_one_key_per_template_and_tick() {
        let fired = serde_json::json!({"id": "j-1", "template": "nightly", "scheduled_ms": 1700000000000u64});
        assert_eq!(
            idempotency_key(&fired).as_deref(),
            Some("cron:nightly:1700000000000")
        );
        let by_hand = serde_json::json!({"id": "j-2", "template": "nightly"});
        assert_eq!(idempotency_key(&by_hand), None);
        assert_eq!(idempotency_key(&serde_json::json!({"id": "j-3"})), None);
    }

    #[test]
    fn migrations_are_numbered_in_order_from_one() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.0).collect();
        assert_eq!(versions, (1..=MIGRATIONS.len() as i32).collect::<Vec<_>>());
    }
}
