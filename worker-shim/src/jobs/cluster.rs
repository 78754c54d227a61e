//! The manager on the cluster queue (`exec.queue.postgres`): the dispatcher
//! claims work from the shared queue whenever a local slot is free (woken
//! by a local submission, a local run's end, or every `poll_interval`),
//! the heartbeat renews the leases of the local runs and requeues expired
//! ones, a run's end is written fenced by its claim, and a `live` job that
//! finds every fitting slot busy with `batch` work preempts one.
//!
//! The shared record is the source of truth: the local map holds a job
//! only while it runs here.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crank_plumbing::Refusal;
use http::StatusCode;

use super::admission::NewJob;
use super::manager::{job_not_found, start_on, Manager, Start};
use super::pg::{Claimed, PgQueue, QueueError, Renewal};
use super::queue::Need;
use crate::job::{now_ms, JobRecord, JobState};

/// Picks the busy device a preempting job of this need starts on (and
/// stops the batch job there).
type Pick<'a> = &'a (dyn Fn(Need) -> Option<usize> + Sync);

/// The shared queue and this shim's part in it.
pub struct Cluster {
    pub queue: PgQueue,
    pub heartbeat: Duration,
    pub poll: Duration,
    /// The fencing token of each job this shim runs.
    tokens: Mutex<HashMap<String, i64>>,
    /// Runs stopped because their lease was lost: requeued, not failed.
    lost: Mutex<HashSet<String>>,
}

impl Cluster {
    pub fn new(queue: PgQueue, heartbeat: Duration, poll: Duration) -> Cluster {
        Cluster {
            queue,
            heartbeat,
            poll,
            tokens: Mutex::new(HashMap::new()),
            lost: Mutex::new(HashSet::new()),
        }
    }
}

impl Manager {
    /// The dispatcher on the shared queue (see the module docs).
    pub(super) async fn run_cluster(self: Arc<Self>, c: Arc<Cluster>) {
        tokio::spawn(heartbeats(self.weak.clone(), c.clone()));
        loop {
            if !self.is_draining() {
                loop {
                    match self.claim_one(&c, None).await {
                        Ok(Some(start)) => self.launch(start),
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "claiming from the job queue failed; retrying");
                            break;
                        }
                    }
                }
                let preempted = match self.preemption() {
                    true => self.preempt_cluster(&c).await,
                    false => Ok(()),
                };
                if let Err(e) = preempted {
                    tracing::warn!(error = %e, "preemption check failed");
                }
            }
            self.refresh_gauges();
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(c.poll) => {}
            }
        }
    }

    /// Claims the next job that fits a free slot (or, with `victim`, a live
    /// job onto that busy device) and marks it running under this shim's
    /// lease, in one transaction.
    async fn claim_one(
        &self,
        c: &Cluster,
        victim: Option<(&[&str], Pick<'_>)>,
    ) -> Result<Option<Start>, QueueError> {
        let (needs, max_rank) = match victim {
            Some((needs, _)) => (needs.to_vec(), 0),
            None => (self.free_needs(), 4),
        };
        if needs.is_empty() {
            return Ok(None);
        }
        let mut client = c.queue.client().await?;
        let tx = client.transaction().await?;
        let Some(claimed) = c.queue.next(&tx, &needs, max_rank).await? else {
            return Ok(None);
        };
        let forced = match victim {
            Some((_, pick)) => match pick(Need::parse(&claimed.need)) {
                Some(d) => Some(d),
                None => return Ok(None),
            },
            None => None,
        };
        let Some(start) = self.start_claimed(claimed, forced, &c.queue.host) else {
            return Ok(None);
        };
        let token = match c.queue.mark_running(&tx, &start.rec).await {
            Ok(t) => t,
            Err(e) => {
                self.undo_start(&start);
                return Err(e);
            }
        };
        if let Err(e) = tx.commit().await {
            self.undo_start(&start);
            return Err(e.into());
        }
        c.tokens.lock().unwrap().insert(start.rec.id.clone(), token);
        self.fetch_input(c, &start.rec.id).await;
        tracing::info!(job = %start.rec.id, attempt = start.rec.attempts, host = %c.queue.host, "claimed from the job queue");
        Ok(Some(start))
    }

    /// The kinds of job a free local slot could take now.
    fn free_needs(&self) -> Vec<&'static str> {
        let inner = self.inner.lock().unwrap();
        [Need::Any, Need::Gpu, Need::Cpu]
            .into_iter()
            .filter(|n| inner.devices.has_free(*n))
            .map(Need::as_str)
            .collect()
    }

    /// Takes a slot (or the forced one) and marks the claimed job running
    /// in the local map.
    fn start_claimed(&self, claimed: Claimed, forced: Option<usize>, host: &str) -> Option<Start> {
        let mut inner = self.inner.lock().unwrap();
        let device = match forced {
            Some(d) => {
                inner.devices.acquire_at(d);
                d
            }
            None => inner.devices.acquire_for(Need::parse(&claimed.need))?,
        };
        let id = claimed.rec.id.clone();
        inner.records.insert(id.clone(), claimed.rec);
        let start = start_on(&mut inner, id.clone(), device, now_ms(), host);
        if start.is_none() {
            inner.records.remove(&id);
        }
        start
    }

    fn undo_start(&self, start: &Start) {
        let mut inner = self.inner.lock().unwrap();
        inner.running.remove(&start.rec.id);
        inner.records.remove(&start.rec.id);
        inner.devices.release(start.device);
    }

    /// Writes the job's input into its directory here, when it has one.
    async fn fetch_input(&self, c: &Cluster, id: &str) {
        let dir = self.job_dir(id);
        let path = dir.join("input");
        if !self.settings.template.uses_input() || path.exists() {
            let _ = std::fs::create_dir_all(&dir);
            return;
        }
        let res = match c.queue.input(id).await {
            Ok(Some(data)) => std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(&path, &data))
                .map_err(|e| e.to_string()),
            Ok(None) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = res {
            tracing::error!(job = %id, error = %e, "could not fetch the job's input");
        }
    }

    /// A `live` job waiting while every slot that could take it runs, one
    /// of them a `batch` job: claim the live job onto that device and stop
    /// the batch job, which goes back to the queue.
    async fn preempt_cluster(self: &Arc<Self>, c: &Cluster) -> Result<(), QueueError> {
        let needs: Vec<&'static str> = {
            let inner = self.inner.lock().unwrap();
            [Need::Any, Need::Gpu, Need::Cpu]
                .into_iter()
                .filter(|n| super::manager::victim(&inner, *n).is_some())
                .map(Need::as_str)
                .collect()
        };
        if needs.is_empty() || !c.queue.live_waiting(&needs).await? {
            return Ok(());
        }
        let pick = |need: Need| {
            let mut inner = self.inner.lock().unwrap();
            let (victim, device) = super::manager::victim(&inner, need)?;
            super::manager::preempt(&mut inner, &victim);
            Some(device)
        };
        if let Some(start) = self.claim_one(c, Some((&needs, &pick))).await? {
            tracing::info!(job = %start.rec.id, "live job preempted a batch job");
            self.launch(start);
        }
        Ok(())
    }

    /// The end of a run on the shared queue: the slot is freed and the
    /// local copy dropped now; the shared record is written, fenced by the
    /// claim, retried while the lease would still hold.
    pub(super) fn cluster_end(
        &self,
        c: Arc<Cluster>,
        mut rec: JobRecord,
        retry_in: Option<Duration>,
        device: usize,
    ) {
        let token = c.tokens.lock().unwrap().remove(&rec.id);
        if c.lost.lock().unwrap().remove(&rec.id) {
            lease_lost(&mut rec);
        }
        if rec.state.is_terminal() {
            self.count_finished(&rec);
            self.cleanup_input(&rec.id);
        }
        self.inner.lock().unwrap().records.remove(&rec.id);
        self.release(&rec.id, device);
        let Some(token) = token else { return };
        let me = self.weak.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + c.queue.lease;
            loop {
                match c.queue.finish(&rec, token, retry_in).await {
                    Ok(true) => break,
                    Ok(false) => {
                        tracing::warn!(job = %rec.id, "this shim's lease on the job was lost (the job was requeued); this run's end is discarded");
                        break;
                    }
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        tracing::warn!(job = %rec.id, error = %e, "writing the job's end failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => {
                        tracing::error!(job = %rec.id, error = %e, "could not write the job's end; its lease expires and it runs again");
                        break;
                    }
                }
            }
            if let Some(m) = me.upgrade() {
                m.wake.notify_one();
            }
        });
    }

    /// Queues a job: in the shared queue when there is one (the tenant's
    /// quota checked there), else locally.
    pub async fn submit_job(&self, id: String, job: NewJob) -> Result<JobRecord, Refusal> {
        let Some(c) = self.cluster() else {
            return self.enqueue(id, job);
        };
        let mut rec = self.new_record(id, job);
        let need = self.settings.need(&rec.params).as_str();
        let input = tokio::fs::read(self.job_dir(&rec.id).join("input"))
            .await
            .ok();
        c.queue.submit(&mut rec, need, input).await?;
        self.count_submitted(&rec);
        self.wake.notify_one();
        Ok(rec)
    }

    /// A job's record: the live one while it runs here (with progress),
    /// else the shared one.
    pub async fn lookup(&self, id: &str) -> Result<JobRecord, Refusal> {
        if let Some(rec) = self.get(id) {
            return Ok(rec);
        }
        match self.cluster() {
            Some(c) => c.queue.get(id).await?.ok_or_else(|| job_not_found(id)),
            None => Err(job_not_found(id)),
        }
    }

    pub async fn list_jobs(
        &self,
        state: Option<JobState>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, Refusal> {
        match self.cluster() {
            Some(c) => Ok(c.queue.list(state, limit).await?),
            None => Ok(self.list(state, limit)),
        }
    }

    /// Cancels a job wherever it is: here at once; on another shim at its
    /// next heartbeat.
    pub async fn cancel_job(&self, id: &str, by: Option<&str>) -> Result<JobRecord, Refusal> {
        match self.cluster() {
            Some(_) if self.get(id).is_some() => self.cancel(id, by),
            Some(c) => c.queue.cancel(id, by).await,
            None => self.cancel(id, by),
        }
    }

    pub async fn delete_job(&self, id: &str) -> Result<(), Refusal> {
        let Some(c) = self.cluster() else {
            return self.delete(id);
        };
        c.queue.delete(id).await?;
        self.discard(&self.job_dir(id));
        Ok(())
    }

    /// On the shared queue, a job's output stays on the shim that ran it:
    /// 409 `output-elsewhere` naming that host when it is not this one.
    pub fn output_here(&self, rec: &JobRecord) -> Result<(), Refusal> {
        let Some(c) = self.cluster() else {
            return Ok(());
        };
        let ran_on = rec.attempt_log.last().map(|a| a.host.as_str());
        match ran_on {
            Some(h) if h != c.queue.host => Err(Refusal::new(
                StatusCode::CONFLICT,
                "output-elsewhere",
                format!(
                    "the output of job {} is on host {h}, the shim that ran it (this is {}); fetch it through that shim, or configure shared output storage",
                    rec.id, c.queue.host
                ),
            )
            .with("host", h)),
            _ => Ok(()),
        }
    }
}

/// Every `heartbeat`: renew the leases of the runs here (stopping the ones
/// lost or canceled elsewhere; stopping all when the database has been
/// unreachable for a whole lease, so no job runs twice), then requeue the
/// jobs whose lease expired.
async fn heartbeats(weak: std::sync::Weak<Manager>, c: Arc<Cluster>) {
    let mut tick = tokio::time::interval(c.heartbeat);
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let Some(m) = weak.upgrade() else { return };
        let running: Vec<(String, i64)> = c
            .tokens
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        match c.queue.renew(&running).await {
            Ok(found) => {
                last_ok = tokio::time::Instant::now();
                for (id, r) in found {
                    match r {
                        Renewal::Kept => {}
                        Renewal::CancelRequested => {
                            let _ = m.cancel(&id, None);
                        }
                        Renewal::Lost => m.stop_run(&c, &id),
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewing job leases failed");
                if last_ok.elapsed() >= c.queue.lease {
                    running.iter().for_each(|(id, _)| m.stop_run(&c, id));
                }
            }
        }
        match c.queue.reap().await {
            Ok(ids) if !ids.is_empty() => {
                tracing::warn!(jobs = ?ids, "leases expired (host lost): jobs requeued");
                m.wake.notify_one();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "requeueing expired leases failed"),
        }
    }
}

impl Manager {
    /// Stops a local run whose lease is (or may be) no longer this shim's:
    /// it goes back to the queue like a preempted run (the fenced write
    /// lands only if the lease was still ours).
    fn stop_run(&self, c: &Cluster, id: &str) {
        let inner = self.inner.lock().unwrap();
        if let Some(r) = inner.running.get(id) {
            tracing::warn!(job = %id, "lease lost: stopping the local run");
            c.lost.lock().unwrap().insert(id.to_string());
            r.preempted.store(true, Ordering::SeqCst);
            r.cancel.notify_one();
        }
    }
}

/// A run stopped for a lost lease: its attempt ends `lease-lost`.
fn lease_lost(rec: &mut JobRecord) {
    if let Some(a) = rec.attempt_log.last_mut() {
        a.outcome = Some("lease-lost".into());
    }
    if let Some(e) = rec.history.last_mut() {
        e.note = Some("lease-lost: this shim could not renew its lease; back in the queue".into());
    }
}

/// The shared queue `exec.queue.postgres` names, connected and migrated;
/// `None` without one. The error names the setting and the fix.
pub async fn connect(
    capability: &str,
    exec: &crate::config::ExecConfig,
    host: &crate::host::HostInfo,
) -> anyhow::Result<Option<Cluster>> {
    let Some(pg) = &exec.queue.postgres else {
        return Ok(None);
    };
    let tenants = match &exec.queue.tenants_from {
        Some(url) => super::tenants_reload::LiveTenants::from_url(url)
            .map_err(|e| anyhow::anyhow!("exec.queue.tenants_from: {e}"))?,
        None => super::tenants_reload::LiveTenants::load(exec.queue.tenants.as_deref())
            .map_err(|e| anyhow::anyhow!("exec.queue.tenants: {e}"))?,
    };
    let tenants = Arc::new(tenants);
    tenants.spawn_reloader();
    let name = pg.host.clone().unwrap_or_else(|| host.hostname.clone());
    let queue = PgQueue::connect(
        &pg.url,
        pg.max_connections,
        capability,
        &name,
        pg.lease,
        tenants,
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}; check exec.queue.postgres.url and that the database is up (the shim needs it to start)"
        )
    })?;
    tracing::info!(host = %name, "on the shared job queue (postgres)");
    Ok(Some(Cluster::new(queue, pg.heartbeat, pg.poll_interval)))
}
