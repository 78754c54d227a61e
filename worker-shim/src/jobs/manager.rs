//! The job manager: accepts jobs, keeps the queue, places jobs on device
//! slots, runs the tool, classifies failures, retries, and writes every state
//! change to the store: before answering for a submission or a cancel, and
//! right after the in-memory change when a run starts or ends.
//!
//! One mutex guards the in-memory view (records, queue, slots, running
//! handles). Nothing awaits while holding it. The manager's methods are
//! gathered by concern: taking jobs in (`admission`), running one
//! attempt (`runner`), the end of a run (`finish`); here
//! are the state, recovery at start, dispatch, the caller's actions
//! (get, list, cancel, delete), the drain and retention.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crank_plumbing::Refusal;
use http::StatusCode;
use tokio::sync::Notify;

use super::cluster::Cluster;
use super::finish::RunEnd;
use super::queue::{Devices, Need, PriorityQueue};
use super::runner::kill_leftover;
pub use super::settings::ExecSettings;
use super::store::JobStore;
use crate::host::energy::EnergyAccountant;
use crate::job::{now_ms, Attempt, Failure, FailureClass, JobRecord, JobState, Priority, Progress};
use crate::metrics::JobMetrics;

pub(super) struct Running {
    pub(super) cancel: Arc<Notify>,
    /// Set by a caller's cancel; a drain stops runs without it.
    pub(super) by_user: Arc<AtomicBool>,
    /// Set when a `live` job took its slot: back to the queue, not failed.
    pub(super) preempted: Arc<AtomicBool>,
    pub(super) priority: Priority,
    pub(super) device: usize,
}

pub(super) struct Inner {
    pub(super) records: HashMap<String, JobRecord>,
    pub(super) queue: PriorityQueue,
    pub(super) devices: Devices,
    pub(super) running: HashMap<String, Running>,
    pub(super) draining: bool,
}

pub struct Manager {
    /// Itself, for the tasks it spawns (retry timers, progress updates).
    pub(super) weak: std::sync::Weak<Manager>,
    pub settings: ExecSettings,
    pub(super) store: Arc<dyn JobStore>,
    pub(super) inner: Mutex<Inner>,
    pub(super) wake: Notify,
    /// Signalled each time a run ends (drain waits on it).
    pub(super) ended: Notify,
    energy: Arc<EnergyAccountant>,
    pub(super) metrics: JobMetrics,
    pub(super) next_seq: AtomicU64,
    /// Bytes in job directories (inputs and outputs).
    pub(super) work_dir_bytes: AtomicU64,
    /// This shim as attempts name it (set by [`Manager::attach`]).
    host: OnceLock<String>,
    /// The shared queue, when `exec.queue.postgres` is set.
    cluster: OnceLock<Arc<Cluster>>,
    /// `exec.queue.preemption`: a `live` job may stop a `batch` one.
    preemption: AtomicBool,
}

/// What recovery found in the store at start.
#[derive(Debug, Default, PartialEq)]
pub struct Recovery {
    pub queued: usize,
    /// Jobs that were running when the previous shim stopped.
    pub interrupted: Vec<String>,
}

impl Manager {
    /// Loads the store, recovers interrupted jobs, and returns the manager;
    /// call [`Manager::run`] to start dispatching.
    pub fn open(
        settings: ExecSettings,
        store: Arc<dyn JobStore>,
        devices: Devices,
        energy: Arc<EnergyAccountant>,
        metrics: JobMetrics,
    ) -> Result<(Arc<Manager>, Recovery), String> {
        std::fs::create_dir_all(&settings.work_dir).map_err(|e| {
            format!(
                "cannot create the work dir {}: {e}; fix exec.work_dir or its permissions",
                settings.work_dir.display()
            )
        })?;
        let mut inner = Inner {
            records: HashMap::new(),
            queue: PriorityQueue::default(),
            devices,
            running: HashMap::new(),
            draining: false,
        };
        let (recovery, max_seq) = recover(&settings, &*store, &mut inner)?;
        let used = dir_size(&settings.work_dir);
        let m = Arc::new_cyclic(|weak| Manager {
            weak: weak.clone(),
            settings,
            store,
            inner: Mutex::new(inner),
            wake: Notify::new(),
            ended: Notify::new(),
            energy,
            metrics,
            next_seq: AtomicU64::new(max_seq + 1),
            work_dir_bytes: AtomicU64::new(used),
            host: OnceLock::new(),
            cluster: OnceLock::new(),
            preemption: AtomicBool::new(false),
        });
        m.prune();
        m.refresh_gauges();
        Ok((m, recovery))
    }

    /// Names this shim in attempts (`host`), sets whether `live` jobs
    /// preempt `batch` ones, and with `cluster` puts it on the shared
    /// queue. Call once, before [`Manager::run`].
    pub fn attach(&self, host: String, cluster: Option<Cluster>, preemption: bool) {
        let _ = self.host.set(host);
        self.preemption.store(preemption, Ordering::Relaxed);
        if let Some(c) = cluster {
            let _ = self.cluster.set(Arc::new(c));
        }
    }

    pub(super) fn host(&self) -> &str {
        self.host.get().map_or("localhost", String::as_str)
    }

    pub(super) fn cluster(&self) -> Option<Arc<Cluster>> {
        self.cluster.get().cloned()
    }

    pub(super) fn preemption(&self) -> bool {
        self.preemption.load(Ordering::Relaxed)
    }

    /// The dispatcher: starts queued jobs whenever a slot is free.
    pub async fn run(self: Arc<Self>) {
        if let Some(c) = self.cluster() {
            return self.run_cluster(c).await;
        }
        // Retention by age also applies while no job finishes.
        let weak = self.weak.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(600));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(m) => m.prune(),
                    None => return,
                }
            }
        });
        loop {
            for start in self.take_startable() {
                if let Err(e) = self.store.put(&start.rec) {
                    tracing::error!(job = %start.rec.id, error = %e, "could not persist the job's start");
                }
                self.launch(start);
            }
            self.refresh_gauges();
            self.wake.notified().await;
        }
    }

    /// Runs a started job on its own task.
    pub(super) fn launch(self: &Arc<Self>, start: Start) {
        if start.rec.attempts == 1 {
            if let Some(w) = start.rec.queue_wait_seconds {
                self.metrics
                    .queue_wait
                    .with_label_values(&[&self.settings.capability, start.rec.priority.as_str()])
                    .observe(w);
            }
        }
        let me = self.clone();
        tokio::spawn(async move { me.run_job(start).await });
    }

    /// Pops what can start now and marks it running, all under one lock,
    /// so a cancel never finds a job between `queued` and `running`.
    fn take_startable(&self) -> Vec<Start> {
        let mut inner = self.inner.lock().unwrap();
        let mut out = Vec::new();
        if inner.draining {
            return out;
        }
        let now = now_ms();
        while let Some((id, device)) = self.next_placement(&mut inner) {
            if let Some(start) = start_on(&mut inner, id, device, now, self.host()) {
                out.push(start);
            }
        }
        if !self.preemption() {
            return out;
        }
        while let Some(start) = self.preempt_local(&mut inner, now) {
            out.push(start);
        }
        out
    }

    /// The oldest queued `live` job, when every slot that could take it is
    /// busy and one of them runs a `batch` job: that job is stopped (back to
    /// the queue) and the live job starts on its device.
    fn preempt_local(&self, inner: &mut Inner, now: u64) -> Option<Start> {
        let (seq, id) = inner.queue.first(Priority::Live)?;
        let need = inner
            .records
            .get(&id)
            .map_or(Need::Any, |r| self.settings.need(&r.params));
        let (victim_id, device) = victim(inner, need)?;
        inner.queue.remove(Priority::Live, seq);
        preempt(inner, &victim_id);
        inner.devices.acquire_at(device);
        tracing::info!(job = %id, preempted = %victim_id, "live job preempted a batch job");
        start_on(inner, id, device, now, self.host())
    }

    /// The oldest job of the most urgent class that has a free slot, and
    /// that slot (acquired).
    fn next_placement(&self, inner: &mut Inner) -> Option<(String, usize)> {
        let Inner {
            queue,
            devices,
            records,
            ..
        } = inner;
        let need_of = |id: &str| {
            records
                .get(id)
                .map_or(Need::Any, |r| self.settings.need(&r.params))
        };
        // A job waits in the queue until the jobs it runs `after` succeed.
        let ready = |id: &str| {
            records
                .get(id)
                .is_none_or(|r| super::finish::deps_ready(records, r))
        };
        let id = queue.pop_first(|id| ready(id) && devices.has_free(need_of(id)))?;
        match devices.acquire_for(need_of(&id)) {
            Some(device) => Some((id, device)),
            None => {
                // has_free said yes under this same lock; keep it queued anyway.
                if let Some(r) = records.get(&id) {
                    queue.push(r.priority, r.seq, id);
                }
                None
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<JobRecord> {
        self.inner.lock().unwrap().records.get(id).cloned()
    }

    /// Jobs, newest first, optionally of one state.
    pub fn list(&self, state: Option<JobState>, limit: usize) -> Vec<JobRecord> {
        let inner = self.inner.lock().unwrap();
        let mut v: Vec<&JobRecord> = inner
            .records
            .values()
            .filter(|r| state.is_none_or(|s| r.state == s))
            .collect();
        v.sort_by_key(|r| std::cmp::Reverse(r.seq));
        v.into_iter().take(limit).cloned().collect()
    }

    /// The job's directory (output is `output.<ext>` inside).
    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.settings.work_dir.join(id)
    }

    pub fn output_path(&self, id: &str) -> PathBuf {
        self.job_dir(id)
            .join(format!("output.{}", self.settings.output_ext))
    }

    /// Cancels a queued or running job. A running job's whole process group
    /// is killed.
    pub fn cancel(&self, id: &str, by: Option<&str>) -> Result<JobRecord, Refusal> {
        let mut inner = self.inner.lock().unwrap();
        let Some(rec) = inner.records.get(id) else {
            return Err(job_not_found(id));
        };
        match rec.state {
            JobState::Queued => {
                let (p, seq) = (rec.priority, rec.seq);
                inner.queue.remove(p, seq);
                let rec = inner.records.get_mut(id).unwrap();
                let now = now_ms();
                rec.transition(
                    JobState::Canceled,
                    now,
                    Some(format!("canceled while queued{}", by_note(by))),
                )
                .map_err(|e| {
                    Refusal::new(StatusCode::CONFLICT, "invalid-transition", e.to_string())
                })?;
                rec.finished_ms = Some(now);
                let rec = rec.clone();
                self.store.put(&rec)?;
                drop(inner);
                self.count_finished(&rec);
                self.cleanup_input(id);
                self.fail_dependents(id);
                self.refresh_gauges();
                Ok(rec)
            }
            JobState::Running => {
                if let Some(run) = inner.running.get(id) {
                    run.by_user.store(true, Ordering::SeqCst);
                    run.cancel.notify_one();
                }
                // The runner records the transition once the group is dead.
                Ok(rec.clone())
            }
            s => Err(Refusal::new(
                StatusCode::CONFLICT,
                "job-finished",
                format!("job {id} is already {s}; nothing to cancel"),
            )),
        }
    }

    /// Deletes a finished job's record and files.
    pub fn delete(&self, id: &str) -> Result<(), Refusal> {
        let mut inner = self.inner.lock().unwrap();
        let Some(rec) = inner.records.get(id) else {
            return Err(job_not_found(id));
        };
        if !rec.state.is_terminal() {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                "job-active",
                format!(
                    "job {id} is {}; cancel it first (POST /v1/jobs/{id}/cancel)",
                    rec.state
                ),
            ));
        }
        self.store.remove(id)?;
        inner.records.remove(id);
        drop(inner);
        self.discard(&self.job_dir(id));
        self.refresh_gauges();
        Ok(())
    }

    /// Stops taking and starting jobs; waits up to `timeout` for running
    /// jobs, then stops the rest, which go back to `queued` for the next
    /// start (their retry budget is not charged).
    pub async fn drain(&self, timeout: Duration) {
        self.inner.lock().unwrap().draining = true;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ended = self.ended.notified();
            if self.inner.lock().unwrap().running.is_empty() {
                return;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                break;
            }
        }
        let ids: Vec<_> = {
            let inner = self.inner.lock().unwrap();
            for r in inner.running.values() {
                r.cancel.notify_one();
            }
            inner.running.keys().cloned().collect()
        };
        tracing::warn!(jobs = ?ids, "drain timeout: stopping running jobs; they are re-queued for the next start");
        loop {
            let ended = self.ended.notified();
            if self.inner.lock().unwrap().running.is_empty() {
                return;
            }
            ended.await;
        }
    }

    /// Counts a refused submission by its reason.
    pub fn metrics_refused(&self, reason: &str) {
        self.metrics.refused.with_label_values(&[reason]).inc();
    }

    pub fn is_draining(&self) -> bool {
        self.inner.lock().unwrap().draining
    }

    pub(super) fn by_ref(&self, id: &str, f: impl FnOnce(&mut JobRecord)) -> Option<JobRecord> {
        let mut inner = self.inner.lock().unwrap();
        let rec = inner.records.get_mut(id)?;
        f(rec);
        Some(rec.clone())
    }

    async fn run_job(self: Arc<Self>, start: Start) {
        let Start {
            rec,
            device,
            gpu,
            cancel,
            by_user,
            preempted,
        } = start;
        let id = rec.id.clone();
        let t0 = tokio::time::Instant::now();
        self.energy.start(&id, gpu);
        let outcome = self.execute(&rec, gpu, &cancel).await;
        let run = RunEnd {
            outcome,
            energy: self.energy.finish(&id),
            seconds: t0.elapsed().as_secs_f64(),
            user_canceled: by_user.load(Ordering::SeqCst),
            preempted: preempted.load(Ordering::SeqCst),
        };
        self.finish_run(&id, device, run);
    }

    /// Retention: drop the oldest finished jobs beyond `max_jobs`, and those
    /// older than `max_age`, with their files.
    pub(super) fn prune(&self) {
        let cutoff = now_ms().saturating_sub(self.settings.retention_max_age.as_millis() as u64);
        let doomed: Vec<String> = {
            let inner = self.inner.lock().unwrap();
            let mut done: Vec<&JobRecord> = inner
                .records
                .values()
                .filter(|r| r.state.is_terminal())
                .collect();
            done.sort_by_key(|r| r.seq);
            let over = done.len().saturating_sub(self.settings.retention_max_jobs);
            done.iter()
                .enumerate()
                .filter(|(i, r)| *i < over || r.finished_ms.unwrap_or(r.submitted_ms) < cutoff)
                .map(|(_, r)| r.id.clone())
                .collect()
        };
        for id in doomed {
            let _ = self.delete(&id);
        }
    }

    pub fn refresh_gauges(&self) {
        let inner = self.inner.lock().unwrap();
        for p in Priority::ALL {
            self.metrics
                .queue_depth
                .with_label_values(&[p.as_str()])
                .set(inner.queue.depth(p) as i64);
        }
        self.metrics
            .set_states(&self.settings.capability, inner.records.values());
    }
}

/// A job taken off the queue and marked running, with its slot.
pub(super) struct Start {
    pub(super) rec: JobRecord,
    pub(super) device: usize,
    gpu: Option<u32>,
    cancel: Arc<Notify>,
    by_user: Arc<AtomicBool>,
    preempted: Arc<AtomicBool>,
}

/// A running `batch` job on a device that fits `need`, when no slot for
/// `need` is free: (its id, its device).
pub(super) fn victim(inner: &Inner, need: Need) -> Option<(String, usize)> {
    if inner.devices.has_free(need) {
        return None;
    }
    inner
        .running
        .iter()
        .filter(|(_, r)| r.priority == Priority::Batch && !r.preempted.load(Ordering::SeqCst))
        .filter(|(_, r)| {
            inner
                .devices
                .list
                .get(r.device)
                .is_some_and(|d| need.fits(d))
        })
        .map(|(id, r)| (id.clone(), r.device))
        .min()
}

/// Stops a running job for a `live` one; it goes back to the queue.
pub(super) fn preempt(inner: &mut Inner, id: &str) {
    if let Some(r) = inner.running.get(id) {
        r.preempted.store(true, Ordering::SeqCst);
        r.cancel.notify_one();
    }
}

/// A preempted run: back to the queue with its attempts as they are and
/// one more allowed, so a preemption never uses up the retry budget and is
/// never a failure.
pub(super) fn preempted(rec: &mut JobRecord, now: u64) {
    rec.max_attempts += 1;
    rec.failure = None;
    let note = "preempted by a live job; back in the queue";
    let _ = rec.transition(JobState::Queued, now, Some(note.into()));
}

/// How an attempt ended, for the attempt log.
pub(super) fn attempt_outcome(rec: &JobRecord, preempted: bool) -> String {
    if preempted {
        return "preempted".into();
    }
    match (rec.state, &rec.failure) {
        (JobState::Queued, Some(f)) => f.class.as_str().to_string(),
        (s, _) => s.as_str().to_string(),
    }
}

/// 404 `job-not-found`: never submitted, deleted, or removed by retention.
pub fn job_not_found(id: &str) -> Refusal {
    Refusal::new(
        StatusCode::NOT_FOUND,
        "job-not-found",
        format!("no job {id}"),
    )
}

fn by_note(by: Option<&str>) -> String {
    by.map(|b| format!(" by {b}")).unwrap_or_default()
}

/// Marks the job running on `device` and returns what its run needs; `None`
/// (slot released) when the job is gone or cannot start.
pub(super) fn start_on(
    inner: &mut Inner,
    id: String,
    device: usize,
    now: u64,
    host: &str,
) -> Option<Start> {
    let (gpu, device_name) = {
        let d = &inner.devices.list[device];
        (d.gpu, d.name.clone())
    };
    let Some(rec) = inner.records.get_mut(&id) else {
        inner.devices.release(device);
        return None;
    };
    rec.attempts += 1;
    rec.device = Some(device_name.clone());
    rec.progress = Progress::default();
    rec.stderr_tail.clear();
    if rec.started_ms.is_none() {
        rec.started_ms = Some(now);
        rec.queue_wait_seconds = Some(now.saturating_sub(rec.submitted_ms) as f64 / 1000.0);
    }
    let note = format!("attempt {} on {host}/{device_name}", rec.attempts);
    if rec.transition(JobState::Running, now, Some(note)).is_err() {
        rec.attempts -= 1;
        inner.devices.release(device);
        return None;
    }
    rec.attempt_log.push(Attempt {
        attempt: rec.attempts,
        host: host.to_string(),
        device: Some(device_name),
        started_ms: now,
        ended_ms: None,
        outcome: None,
    });
    let rec = rec.clone();
    let running = Running {
        cancel: Arc::new(Notify::new()),
        by_user: Arc::new(AtomicBool::new(false)),
        preempted: Arc::new(AtomicBool::new(false)),
        priority: rec.priority,
        device,
    };
    let start = Start {
        rec,
        device,
        gpu,
        cancel: running.cancel.clone(),
        by_user: running.by_user.clone(),
        preempted: running.preempted.clone(),
    };
    inner.running.insert(id, running);
    Some(start)
}

/// Fills `inner` from the store: queued jobs back in the queue in order;
/// jobs that were running are interrupted (their leftover process group
/// killed) and re-queued, or failed with no attempts left. Returns what it
/// found and the highest sequence number.
fn recover(
    settings: &ExecSettings,
    store: &dyn JobStore,
    inner: &mut Inner,
) -> Result<(Recovery, u64), String> {
    let mut recovery = Recovery::default();
    let mut max_seq = 0;
    let now = now_ms();
    for mut rec in store.load_all().map_err(|e| e.to_string())? {
        max_seq = max_seq.max(rec.seq);
        if rec.state == JobState::Running {
            interrupt(settings, &mut rec, now)?;
            store.put(&rec).map_err(|e| e.to_string())?;
            recovery.interrupted.push(rec.id.clone());
        }
        if rec.state == JobState::Queued {
            inner.queue.push(rec.priority, rec.seq, rec.id.clone());
            recovery.queued += 1;
        }
        inner.records.insert(rec.id.clone(), rec);
    }
    Ok((recovery, max_seq))
}

/// A job the previous shim was running when it stopped.
fn interrupt(settings: &ExecSettings, rec: &mut JobRecord, now: u64) -> Result<(), String> {
    if let Some(pid) = rec.pid.take() {
        kill_leftover(pid, settings.template.program());
    }
    let (to, note) = if rec.attempts < settings.max_attempts {
        (
            JobState::Queued,
            "interrupted: the shim stopped while this job ran; re-queued",
        )
    } else {
        (
            JobState::Failed,
            "interrupted: the shim stopped while this job ran; no attempts left",
        )
    };
    rec.failure = Some(Failure {
        class: FailureClass::Interrupted,
        message: "the shim stopped while this job ran".into(),
        exit_code: None,
        signal: None,
    });
    rec.end_attempt(now, "interrupted");
    rec.transition(to, now, Some(note.into()))
        .map_err(|e| e.to_string())?;
    if to == JobState::Failed {
        rec.finished_ms = Some(now);
    }
    Ok(())
}

pub(super) fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}
