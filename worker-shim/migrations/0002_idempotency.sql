-- Version 2: one job per idempotency key and capability, and the index of
-- each tenant's next job. A job template's
-- schedule fires on every shim at the same tick; the key
-- `cron:<template>:<tick>` keeps only the first of those jobs.

ALTER TABLE crank_jobs ADD COLUMN idempotency_key text;

CREATE UNIQUE INDEX crank_jobs_idempotency ON crank_jobs (capability, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Each tenant's next job, for the claim's per-tenant probe.
CREATE INDEX crank_jobs_tenant_head ON crank_jobs (capability, tenant, priority, seq)
    WHERE state = 'queued';
