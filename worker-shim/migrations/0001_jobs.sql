-- crank-shim's cluster job queue (exec.queue.postgres), version 1.
-- Applied once by the first shim that starts on the database; the
-- version is recorded in crank_schema_migrations.

CREATE SEQUENCE crank_jobs_seq;

CREATE TABLE crank_jobs (
    id               text PRIMARY KEY,
    -- Submission order across the cluster: FIFO within a priority.
    seq              bigint NOT NULL,
    capability       text NOT NULL,
    tenant           text NOT NULL,
    -- 0 live, 1 high, 2 medium, 3 low, 4 batch.
    priority         smallint NOT NULL,
    -- What the job may run on: any, gpu or cpu.
    need             text NOT NULL,
    state            text NOT NULL,
    -- The fencing token: raised by every claim. A shim writes a job only
    -- while it holds the lease of the claim it made.
    claims           bigint NOT NULL DEFAULT 0,
    lease_owner      text,
    lease_expires    timestamptz,
    -- A retried job waits for its backoff.
    run_after        timestamptz NOT NULL DEFAULT now(),
    cancel_requested boolean NOT NULL DEFAULT false,
    -- The job record as GET /v1/jobs/{id} shows it.
    record           jsonb NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX crank_jobs_queued ON crank_jobs (capability, priority, seq)
    WHERE state = 'queued';
CREATE INDEX crank_jobs_running ON crank_jobs (capability, tenant)
    WHERE state = 'running';
CREATE INDEX crank_jobs_leases ON crank_jobs (lease_expires)
    WHERE state = 'running';
CREATE INDEX crank_jobs_tenant_queued ON crank_jobs (capability, tenant)
    WHERE state = 'queued';

-- Inputs travel with the job so any shim can run it.
CREATE TABLE crank_job_inputs (
    id   text PRIMARY KEY REFERENCES crank_jobs (id) ON DELETE CASCADE,
    data bytea NOT NULL
);
