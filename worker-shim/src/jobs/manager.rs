//! The job manager: accepts jobs, keeps the queue, places jobs on device
//! slots, runs the tool, classifies failures, retries, and writes every state
//! change to the store: before answering for a submission or a cancel, and
//! right after the in-memory change when a run starts or ends.
//!
//! One mutex guards the in-memory view (records, queue, slots, running
//! handles). Nothing awaits while holding it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Notify;

use super::queue::{Devices, Need, PriorityQueue};
use super::store::{JobStore, StoreError};
use crate::config::ExecConfig;
use crate::exec::classify::{Classifier, ExitInfo};
use crate::exec::params::ParamSchema;
use crate::exec::progress::{FfmpegProgress, ProgressKind};
use crate::exec::template::{CommandTemplate, Reserved};
use crate::host::energy::EnergyAccountant;
use crate::job::{
    now_ms, Energy, Failure, FailureClass, JobEnergy, JobRecord, JobState, Priority, Progress,
};
use crate::metrics::JobMetrics;

/// Lines of the tool's standard error kept with the job.
const STDERR_TAIL: usize = 20;

/// Why a submission or an action was refused: an HTTP status, the
/// `x-crank-error` reason, and a sentence with the fix.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    pub detail: String,
    /// Per-parameter problems, for `bad-params`.
    pub problems: Vec<String>,
    pub retry_after: Option<u64>,
}

impl Refusal {
    pub fn new(status: u16, reason: &'static str, detail: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason,
            detail: detail.into(),
            problems: Vec::new(),
            retry_after: None,
        }
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Refusal {
        Refusal::new(500, "store-error", e.to_string())
    }
}

/// Everything about running the tool that comes from config.
pub struct ExecSettings {
    pub capability: String,
    pub template: CommandTemplate,
    pub schema: ParamSchema,
    pub classifier: Classifier,
    pub progress: ProgressKind,
    pub env: BTreeMap<String, String>,
    pub work_dir: PathBuf,
    pub output_ext: String,
    pub max_input_bytes: u64,
    pub max_output_bytes: u64,
    pub max_work_dir_bytes: u64,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub max_queue: usize,
    pub retention_max_jobs: usize,
    pub retention_max_age: Duration,
    /// Parameter values that need a GPU (`devices.gpu_when`).
    pub gpu_when: BTreeMap<String, Vec<String>>,
}

impl ExecSettings {
    pub fn from_config(capability: &str, c: &ExecConfig) -> Result<ExecSettings, String> {
        let schema = ParamSchema::new(c.params.clone())?;
        let template = CommandTemplate::parse(&c.command, &schema)?;
        let classifier = Classifier::new(&c.failures, &c.exit_codes)?;
        Ok(ExecSettings {
            capability: capability.to_string(),
            template,
            schema,
            classifier,
            progress: c.progress,
            env: c.env.clone(),
            work_dir: c.work_dir.clone(),
            output_ext: c.output.extension.clone(),
            max_input_bytes: c.max_input_bytes,
            max_output_bytes: c.max_output_bytes,
            max_work_dir_bytes: c.max_work_dir_bytes,
            timeout: c.timeout,
            max_attempts: c.retries.max_attempts,
            backoff_initial: c.retries.backoff_initial,
            backoff_max: c.retries.backoff_max,
            max_queue: c.max_queue,
            retention_max_jobs: c.retention.max_jobs,
            retention_max_age: c.retention.max_age,
            gpu_when: c.devices.gpu_when.clone(),
        })
    }

    /// What a job with these parameters may run on.
    pub fn need(&self, params: &BTreeMap<String, String>) -> Need {
        if self.gpu_when.is_empty() {
            return Need::Any;
        }
        let gpu = self
            .gpu_when
            .iter()
            .any(|(k, vs)| params.get(k).is_some_and(|v| vs.contains(v)));
        if gpu {
            Need::Gpu
        } else {
            Need::Cpu
        }
    }
}

/// A new job, validated, before it is queued.
pub struct NewJob {
    pub params: BTreeMap<String, String>,
    pub priority: Priority,
    pub requester: Option<String>,
    /// A shorter run timeout than `exec.timeout` (never longer).
    pub timeout: Option<Duration>,
}

struct Running {
    cancel: Arc<Notify>,
    /// Set by a caller's cancel; a drain stops runs without it.
    by_user: Arc<std::sync::atomic::AtomicBool>,
}

struct Inner {
    records: HashMap<String, JobRecord>,
    queue: PriorityQueue,
    devices: Devices,
    running: HashMap<String, Running>,
    draining: bool,
}

pub struct Manager {
    /// Itself, for the tasks it spawns (retry timers, progress updates).
    weak: std::sync::Weak<Manager>,
    pub settings: ExecSettings,
    store: Arc<dyn JobStore>,
    inner: Mutex<Inner>,
    wake: Notify,
    /// Signalled each time a run ends (drain waits on it).
    ended: Notify,
    energy: Arc<EnergyAccountant>,
    metrics: JobMetrics,
    next_seq: AtomicU64,
    /// Bytes in job directories (inputs and outputs).
    work_dir_bytes: AtomicU64,
}

/// What recovery found in the store at start.
#[derive(Debug, Default, PartialEq)]
pub struct Recovery {
    pub queued: usize,
    /// Jobs that were running when the previous shim stopped.
    pub interrupted: Vec<String>,
}

/// Exponential backoff with full jitter between `initial` and the cap.
pub fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let cap = exp.min(max);
    // Jitter in [cap/2, cap]: spreads retries without making them instant.
    let half = cap / 2;
    half + Duration::from_millis(rand::rng().random_range(0..=half.as_millis() as u64))
}

fn new_job_id() -> String {
    let n: u64 = rand::rng().random();
    format!("j-{n:016x}")
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
        let all = store.load_all().map_err(|e| e.to_string())?;
        let mut recovery = Recovery::default();
        let mut inner = Inner {
            records: HashMap::new(),
            queue: PriorityQueue::default(),
            devices,
            running: HashMap::new(),
            draining: false,
        };
        let mut max_seq = 0;
        let now = now_ms();
        for mut rec in all {
            max_seq = max_seq.max(rec.seq);
            match rec.state {
                JobState::Queued => {
                    inner.queue.push(rec.priority, rec.seq, rec.id.clone());
                    recovery.queued += 1;
                }
                JobState::Running => {
                    if let Some(pid) = rec.pid.take() {
                        kill_leftover(pid, settings.template.program());
                    }
                    let failure = Failure {
                        class: FailureClass::Interrupted,
                        message: "the shim stopped while this job ran".into(),
                        exit_code: None,
                        signal: None,
                    };
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
                    rec.failure = Some(failure);
                    rec.transition(to, now, Some(note.into()))
                        .map_err(|e| e.to_string())?;
                    if to == JobState::Queued {
                        inner.queue.push(rec.priority, rec.seq, rec.id.clone());
                        recovery.queued += 1;
                    } else {
                        rec.finished_ms = Some(now);
                    }
                    store.put(&rec).map_err(|e| e.to_string())?;
                    recovery.interrupted.push(rec.id.clone());
                }
                _ => {}
            }
            inner.records.insert(rec.id.clone(), rec);
        }
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
        });
        m.prune();
        m.refresh_gauges();
        Ok((m, recovery))
    }

    /// The dispatcher: starts queued jobs whenever a slot is free.
    pub async fn run(self: Arc<Self>) {
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
                if start.rec.attempts == 1 {
                    if let Some(w) = start.rec.queue_wait_seconds {
                        self.metrics
                            .queue_wait
                            .with_label_values(&[
                                &self.settings.capability,
                                start.rec.priority.as_str(),
                            ])
                            .observe(w);
                    }
                }
                let me = self.clone();
                tokio::spawn(async move { me.run_job(start).await });
            }
            self.refresh_gauges();
            self.wake.notified().await;
        }
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
        loop {
            let Inner {
                queue,
                devices,
                records,
                ..
            } = &mut *inner;
            let need_of = |id: &str| {
                records
                    .get(id)
                    .map_or(Need::Any, |r| self.settings.need(&r.params))
            };
            let Some(id) = queue.pop_first(|id| devices.has_free(need_of(id))) else {
                break;
            };
            let Some(device) = devices.acquire_for(need_of(&id)) else {
                // has_free said yes under this same lock; keep it queued anyway.
                if let Some(r) = records.get(&id) {
                    queue.push(r.priority, r.seq, id);
                }
                break;
            };
            let (gpu, device_name) = {
                let d = &inner.devices.list[device];
                (d.gpu, d.name.clone())
            };
            let Some(rec) = inner.records.get_mut(&id) else {
                inner.devices.release(device);
                continue;
            };
            rec.attempts += 1;
            rec.device = Some(device_name.clone());
            rec.progress = Progress::default();
            rec.stderr_tail.clear();
            if rec.started_ms.is_none() {
                rec.started_ms = Some(now);
                rec.queue_wait_seconds = Some(now.saturating_sub(rec.submitted_ms) as f64 / 1000.0);
            }
            let note = format!("attempt {} on {device_name}", rec.attempts);
            if rec.transition(JobState::Running, now, Some(note)).is_err() {
                rec.attempts -= 1;
                inner.devices.release(device);
                continue;
            }
            let rec = rec.clone();
            let cancel = Arc::new(Notify::new());
            let by_user = Arc::new(std::sync::atomic::AtomicBool::new(false));
            inner.running.insert(
                id,
                Running {
                    cancel: cancel.clone(),
                    by_user: by_user.clone(),
                },
            );
            out.push(Start {
                rec,
                device,
                gpu,
                cancel,
                by_user,
            });
        }
        out
    }

    /// Validates and queues a job. `input` is the already written input file
    /// (inside the job's directory), when the tool takes one.
    pub fn admit_check(&self) -> Result<(), Refusal> {
        let inner = self.inner.lock().unwrap();
        if inner.draining {
            return Err(Refusal {
                retry_after: Some(5),
                ..Refusal::new(
                    503,
                    "draining",
                    "the shim is shutting down; submit to another worker",
                )
            });
        }
        if inner.queue.len() >= self.settings.max_queue {
            return Err(Refusal {
                retry_after: Some(self.queue_retry_after(&inner)),
                ..Refusal::new(
                    503,
                    "queue-full",
                    format!(
                        "{} jobs are already queued (exec.max_queue); retry later or on another worker",
                        inner.queue.len()
                    ),
                )
            });
        }
        let used = self.work_dir_bytes.load(Ordering::Relaxed);
        if used >= self.settings.max_work_dir_bytes {
            return Err(Refusal::new(
                507,
                "work-dir-full",
                format!(
                    "the work directory holds {used} bytes, over exec.max_work_dir_bytes ({}); fetch and delete finished jobs",
                    self.settings.max_work_dir_bytes
                ),
            ));
        }
        Ok(())
    }

    fn queue_retry_after(&self, inner: &Inner) -> u64 {
        // A rough wait: one backoff step per queued job per slot, 1..60 s.
        let slots = inner.devices.capacity().max(1) as u64;
        (inner.queue.len() as u64 / slots).clamp(1, 60)
    }

    /// Refuses a job this host has no device for: a GPU job (by
    /// `devices.gpu_when`) on a host without a GPU, or a CPU job without a
    /// CPU pool.
    pub fn device_check(&self, params: &BTreeMap<String, String>) -> Result<(), Refusal> {
        let need = self.settings.need(params);
        let inner = self.inner.lock().unwrap();
        if inner.devices.has_kind(need) {
            return Ok(());
        }
        let detail = match need {
            Need::Gpu => {
                let which: Vec<String> = self
                    .settings
                    .gpu_when
                    .iter()
                    .filter_map(|(k, vs)| params.get(k).filter(|v| vs.contains(v)).map(|v| format!("{k}={v}")))
                    .collect();
                format!(
                    "{} needs a GPU and this host has none (gpu=none); send it to a worker labelled gpu=nvidia",
                    which.join(", ")
                )
            }
            _ => "this job runs in the CPU pool and this shim has none (exec.devices.cpu_slots is 0); send it to another worker".to_string(),
        };
        Err(Refusal::new(422, "no-matching-device", detail))
    }

    /// Creates the job's directory; returns (id, directory).
    pub fn prepare(&self) -> Result<(String, PathBuf), Refusal> {
        let id = new_job_id();
        let dir = self.settings.work_dir.join(&id);
        std::fs::create_dir_all(&dir).map_err(|e| {
            Refusal::new(
                500,
                "work-dir-error",
                format!("cannot create {}: {e}", dir.display()),
            )
        })?;
        Ok((id, dir))
    }

    /// Counts bytes written into the work dir (inputs as they stream in).
    pub fn add_work_bytes(&self, n: u64) {
        self.work_dir_bytes.fetch_add(n, Ordering::Relaxed);
    }

    fn sub_work_bytes(&self, n: u64) {
        let _ = self
            .work_dir_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }

    /// Removes a directory made by [`Manager::prepare`] for a job that was
    /// then refused.
    pub fn discard(&self, dir: &Path) {
        let size = dir_size(dir);
        let _ = std::fs::remove_dir_all(dir);
        self.sub_work_bytes(size);
    }

    /// Queues a prepared job.
    pub fn enqueue(&self, id: String, job: NewJob) -> Result<JobRecord, Refusal> {
        let now = now_ms();
        let mut rec = JobRecord {
            id: id.clone(),
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            capability: self.settings.capability.clone(),
            priority: job.priority,
            state: JobState::Queued,
            params: job.params,
            requester: job.requester,
            timeout_ms: job.timeout.map(|t| t.as_millis() as u64),
            device: None,
            attempts: 0,
            max_attempts: self.settings.max_attempts,
            progress: Progress::default(),
            failure: None,
            energy: JobEnergy::default(),
            submitted_ms: now,
            started_ms: None,
            finished_ms: None,
            queue_wait_seconds: None,
            run_seconds: 0.0,
            pid: None,
            stderr_tail: Vec::new(),
            output_bytes: None,
            history: Vec::new(),
        };
        rec.history.push(crate::job::Event {
            at_ms: now,
            state: JobState::Queued,
            note: Some("submitted".into()),
        });
        {
            let mut inner = self.inner.lock().unwrap();
            self.store.put(&rec)?;
            inner.queue.push(rec.priority, rec.seq, id.clone());
            inner.records.insert(id, rec.clone());
        }
        self.metrics
            .submitted
            .with_label_values(&[&self.settings.capability, rec.priority.as_str()])
            .inc();
        self.refresh_gauges();
        self.wake.notify_one();
        Ok(rec)
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
            return Err(Refusal::new(404, "job-not-found", format!("no job {id}")));
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
                .map_err(|e| Refusal::new(409, "invalid-transition", e.to_string()))?;
                rec.finished_ms = Some(now);
                let rec = rec.clone();
                self.store.put(&rec)?;
                drop(inner);
                self.count_finished(&rec);
                self.cleanup_input(id);
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
                409,
                "job-finished",
                format!("job {id} is already {s}; nothing to cancel"),
            )),
        }
    }

    /// Deletes a finished job's record and files.
    pub fn delete(&self, id: &str) -> Result<(), Refusal> {
        let mut inner = self.inner.lock().unwrap();
        let Some(rec) = inner.records.get(id) else {
            return Err(Refusal::new(404, "job-not-found", format!("no job {id}")));
        };
        if !rec.state.is_terminal() {
            return Err(Refusal::new(
                409,
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

    fn by_ref(&self, id: &str, f: impl FnOnce(&mut JobRecord)) -> Option<JobRecord> {
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
        } = start;
        let id = rec.id.clone();
        let t0 = tokio::time::Instant::now();
        self.energy.start(&id, gpu);
        let outcome = self.execute(&rec, gpu, &cancel).await;
        let energy = self.energy.finish(&id);
        let ran = t0.elapsed().as_secs_f64();
        let user_canceled = by_user.load(Ordering::SeqCst);
        self.finish_run(&id, device, outcome, energy, ran, user_canceled)
            .await;
    }

    async fn execute(&self, rec: &JobRecord, gpu: Option<u32>, cancel: &Notify) -> Outcome {
        let dir = self.job_dir(&rec.id);
        let input = dir.join("input");
        let reserved = Reserved {
            input: input.exists().then_some(input),
            output: self.output_path(&rec.id),
            workdir: dir.clone(),
            job_id: rec.id.clone(),
        };
        let rendered = match self.settings.template.render(&rec.params, &reserved) {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(internal(format!("rendering the command: {e}"))),
        };
        let _ = std::fs::remove_file(&reserved.output);
        let mut cmd = tokio::process::Command::new(&rendered.program);
        cmd.args(&rendered.args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .envs(&self.settings.env)
            .env("CRANK_JOB_ID", &rec.id)
            .process_group(0)
            .kill_on_drop(true);
        match gpu {
            Some(g) => {
                // NVML indexes follow the PCI bus order; CUDA's default order
                // is fastest first, so pin it to the same numbering.
                cmd.env("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
                    .env("CUDA_VISIBLE_DEVICES", g.to_string());
            }
            None => {
                cmd.env("CUDA_VISIBLE_DEVICES", "");
            }
        }
        let fsize = self.settings.max_output_bytes;
        // SAFETY: only async-signal-safe calls (setrlimit, prctl) between
        // fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: fsize,
                    rlim_max: fsize,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The tool dies with the shim, even on SIGKILL.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return Outcome::Failed(Failure {
                    class: FailureClass::Internal,
                    message: format!("cannot start {}: {e}", rendered.program),
                    exit_code: None,
                    signal: None,
                })
            }
        };
        let pid = child.id().unwrap_or(0);
        tracing::info!(job = %rec.id, pid, command = %crate::exec::template::display(&rendered), "job started");
        if let Some(r) = self.by_ref(&rec.id, |r| r.pid = Some(pid)) {
            let _ = self.store.put(&r);
        }

        let progress = Arc::new(Mutex::new(FfmpegProgress::default()));
        let tail = Arc::new(Mutex::new(std::collections::VecDeque::<String>::new()));
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let track = self.settings.progress == ProgressKind::Ffmpeg;
        let out_task = {
            let progress = progress.clone();
            let updates = self.progress_sink(rec.id.clone());
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if !track {
                        continue;
                    }
                    let p = progress.lock().unwrap().feed_stdout_line(&line);
                    if let Some(p) = p {
                        updates(p);
                    }
                }
            })
        };
        let err_task = {
            let progress = progress.clone();
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if track {
                        progress.lock().unwrap().feed_stderr_line(&line);
                    }
                    let mut t = tail.lock().unwrap();
                    if t.len() == STDERR_TAIL * 4 {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            })
        };

        let limit = rec
            .timeout_ms
            .map(Duration::from_millis)
            .map_or(self.settings.timeout, |t| t.min(self.settings.timeout));
        let timeout = tokio::time::sleep(limit);
        let mut stopped = None;
        let status = tokio::select! {
            s = child.wait() => s,
            _ = timeout => {
                stopped = Some(Stop::Timeout);
                kill_group(pid);
                child.wait().await
            }
            _ = cancel.notified() => {
                stopped = Some(Stop::Canceled);
                kill_group(pid);
                child.wait().await
            }
        };
        // The group may hold the pipes open a moment longer; don't wait forever.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = out_task.await;
            let _ = err_task.await;
        })
        .await;
        let tail: Vec<String> = tail.lock().unwrap().iter().cloned().collect();
        let keep = tail.iter().rev().take(STDERR_TAIL).rev().cloned().collect();
        self.by_ref(&rec.id, |r| {
            r.stderr_tail = keep;
            r.pid = None;
        });
        let status = match status {
            Ok(s) => s,
            Err(e) => return Outcome::Failed(internal(format!("waiting for the tool: {e}"))),
        };
        use std::os::unix::process::ExitStatusExt;
        match stopped {
            Some(Stop::Canceled) => return Outcome::Canceled,
            Some(Stop::Timeout) => {
                return Outcome::TimedOut(Failure {
                    class: FailureClass::Timeout,
                    message: format!(
                        "ran longer than the job timeout ({}); the process group was killed",
                        humantime::format_duration(limit)
                    ),
                    exit_code: None,
                    signal: Some(libc::SIGKILL),
                })
            }
            None => {}
        }
        if status.success() {
            let out = self.output_path(&rec.id);
            return match std::fs::metadata(&out) {
                Ok(m) if m.len() > 0 => Outcome::Succeeded(m.len()),
                _ => Outcome::Failed(Failure {
                    class: FailureClass::ToolCrash,
                    message: format!("the tool exited 0 but wrote no output at {}", out.display()),
                    exit_code: Some(0),
                    signal: None,
                }),
            };
        }
        if status.signal() == Some(libc::SIGXFSZ) {
            return Outcome::Failed(Failure {
                class: FailureClass::OutOfResources,
                message: format!(
                    "the output grew past exec.max_output_bytes ({} bytes): killed by SIGXFSZ",
                    self.settings.max_output_bytes
                ),
                exit_code: None,
                signal: Some(libc::SIGXFSZ),
            });
        }
        let exit = ExitInfo {
            code: status.code(),
            signal: status.signal(),
            timed_out: false,
            killed_by_shim: false,
        };
        Outcome::Failed(self.settings.classifier.classify(&exit, &tail))
    }

    /// Where progress updates go (memory only; the store gets the state
    /// changes).
    fn progress_sink(&self, id: String) -> impl Fn(Progress) + Send + 'static {
        let weak = self.weak.clone();
        move |p| {
            if let Some(m) = weak.upgrade() {
                m.by_ref(&id, |r| r.progress = p);
            }
        }
    }

    async fn finish_run(
        &self,
        id: &str,
        device: usize,
        outcome: Outcome,
        energy: JobEnergy,
        ran: f64,
        user_canceled: bool,
    ) {
        let now = now_ms();
        let draining = self.is_draining();
        let mut retry_in = None;
        let rec = self.by_ref(id, |rec| {
            rec.run_seconds += ran;
            rec.energy = add_energy(&rec.energy, &energy, rec.attempts);
            match outcome {
                Outcome::Succeeded(bytes) => {
                    rec.output_bytes = Some(bytes);
                    rec.failure = None;
                    rec.progress.percent = Some(100.0);
                    let _ = rec.transition(JobState::Succeeded, now, None);
                }
                Outcome::Canceled if draining && !user_canceled => {
                    // Stopped by a shutdown: back to the queue for the next
                    // start, without charging the attempt.
                    rec.attempts = rec.attempts.saturating_sub(1);
                    rec.failure = Some(Failure {
                        class: FailureClass::Interrupted,
                        message: "stopped by a shim shutdown".into(),
                        exit_code: None,
                        signal: Some(libc::SIGKILL),
                    });
                    let _ = rec.transition(
                        JobState::Queued,
                        now,
                        Some("interrupted by shutdown; runs again on the next start".into()),
                    );
                }
                Outcome::Canceled => {
                    let _ = rec.transition(
                        JobState::Canceled,
                        now,
                        Some("canceled while running; process group killed".into()),
                    );
                }
                Outcome::TimedOut(ref f) => {
                    rec.failure = Some(f.clone());
                    let _ = rec.transition(JobState::TimedOut, now, Some(f.message.clone()));
                }
                Outcome::Failed(ref f) => {
                    rec.failure = Some(f.clone());
                    let retry = f.class.retryable() && rec.attempts < rec.max_attempts;
                    if retry && draining {
                        let _ = rec.transition(
                            JobState::Queued,
                            now,
                            Some(format!(
                                "{}: {}; the shim is stopping, so the retry runs on the next start",
                                f.class.as_str(),
                                f.message
                            )),
                        );
                    } else if retry {
                        let wait = backoff(
                            self.settings.backoff_initial,
                            self.settings.backoff_max,
                            rec.attempts,
                        );
                        retry_in = Some(wait);
                        let _ = rec.transition(
                            JobState::Queued,
                            now,
                            Some(format!(
                                "{}: {}; retry {} of {} in {:.1}s",
                                f.class.as_str(),
                                f.message,
                                rec.attempts,
                                rec.max_attempts - 1,
                                wait.as_secs_f64()
                            )),
                        );
                    } else {
                        let _ = rec.transition(
                            JobState::Failed,
                            now,
                            Some(format!("{}: {}", f.class.as_str(), f.message)),
                        );
                    }
                }
            }
            if rec.state.is_terminal() {
                rec.finished_ms = Some(now);
            }
        });
        let Some(rec) = rec else {
            self.release(id, device);
            return;
        };
        if let Err(e) = self.store.put(&rec) {
            tracing::error!(job = id, error = %e, "could not persist the job's end");
        }
        if let Some(bytes) = rec
            .output_bytes
            .filter(|_| rec.state == JobState::Succeeded)
        {
            self.add_work_bytes(bytes);
        }
        tracing::info!(job = id, state = %rec.state, attempts = rec.attempts, "job run ended");
        if let Some(wait) = retry_in {
            let class = rec.failure.as_ref().map(|f| f.class.as_str()).unwrap_or("");
            self.metrics
                .retries
                .with_label_values(&[&self.settings.capability, class])
                .inc();
            let me = self.weak.upgrade();
            let (id2, prio, seq) = (rec.id.clone(), rec.priority, rec.seq);
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                if let Some(m) = me {
                    let mut inner = m.inner.lock().unwrap();
                    // Canceled meanwhile: stays out of the queue.
                    if inner.records.get(&id2).map(|r| r.state) == Some(JobState::Queued) {
                        inner.queue.push(prio, seq, id2);
                    }
                    drop(inner);
                    m.refresh_gauges();
                    m.wake.notify_one();
                }
            });
        } else if rec.state == JobState::Queued {
            // Drain: requeued but not dispatched until the next start.
            let mut inner = self.inner.lock().unwrap();
            inner.queue.push(rec.priority, rec.seq, rec.id.clone());
        }
        if rec.state.is_terminal() {
            self.count_finished(&rec);
            self.cleanup_input(id);
        }
        self.release(id, device);
    }

    fn release(&self, id: &str, device: usize) {
        {
            let mut inner = self.inner.lock().unwrap();
            inner.running.remove(id);
            inner.devices.release(device);
        }
        self.refresh_gauges();
        self.ended.notify_waiters();
        self.wake.notify_one();
    }

    fn count_finished(&self, rec: &JobRecord) {
        let cap = &self.settings.capability;
        self.metrics
            .finished
            .with_label_values(&[cap, rec.state.as_str()])
            .inc();
        if rec.attempts > 0 {
            self.metrics
                .run_time
                .with_label_values(&[cap, rec.state.as_str()])
                .observe(rec.run_seconds);
            for (domain, e) in [
                ("gpu", &rec.energy.gpu),
                ("cpu_package", &rec.energy.cpu_package),
            ] {
                match e.joules() {
                    Some(j) => self
                        .metrics
                        .energy
                        .with_label_values(&[cap, domain])
                        .observe(j),
                    None => self
                        .metrics
                        .energy_unmeasured
                        .with_label_values(&[cap, domain])
                        .inc(),
                }
            }
        }
        self.prune();
    }

    /// Inputs are only needed while a job can still run.
    fn cleanup_input(&self, id: &str) {
        let input = self.job_dir(id).join("input");
        if let Ok(m) = std::fs::metadata(&input) {
            if std::fs::remove_file(&input).is_ok() {
                self.sub_work_bytes(m.len());
            }
        }
    }

    /// Retention: drop the oldest finished jobs beyond `max_jobs`, and those
    /// older than `max_age`, with their files.
    fn prune(&self) {
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
struct Start {
    rec: JobRecord,
    device: usize,
    gpu: Option<u32>,
    cancel: Arc<Notify>,
    by_user: Arc<std::sync::atomic::AtomicBool>,
}

enum Stop {
    Timeout,
    Canceled,
}

enum Outcome {
    Succeeded(u64),
    Canceled,
    TimedOut(Failure),
    Failed(Failure),
}

fn internal(message: String) -> Failure {
    Failure {
        class: FailureClass::Internal,
        message,
        exit_code: None,
        signal: None,
    }
}

fn by_note(by: Option<&str>) -> String {
    by.map(|b| format!(" by {b}")).unwrap_or_default()
}

/// Energy over all attempts: joules add up; a domain unmeasured in any
/// attempt stays unmeasured (a partial sum would under-report).
fn add_energy(total: &JobEnergy, run: &JobEnergy, attempts: u32) -> JobEnergy {
    let add = |a: &Energy, b: &Energy| match (a, b) {
        (Energy::Joules(x), Energy::Joules(y)) => Energy::Joules(x + y),
        _ => Energy::UNMEASURED,
    };
    if attempts <= 1 {
        return run.clone();
    }
    JobEnergy {
        gpu: add(&total.gpu, &run.gpu),
        cpu_package: add(&total.cpu_package, &run.cpu_package),
    }
}

/// SIGKILL to the job's whole process group.
fn kill_group(pid: u32) {
    if pid > 0 {
        // SAFETY: plain syscall; a negative pid names the process group.
        unsafe {
            libc::kill(-(pid as i32), libc::SIGKILL);
        }
    }
}

/// A job's tool may outlive a shim killed with SIGKILL (its children do not
/// get PDEATHSIG). Kill the old group, but only when its leader is still
/// that group's leader and runs the configured program, so a reused pid is
/// never hit.
fn kill_leftover(pid: u32, program: &str) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        // The leader is gone; its group may still have members, but their
        // pgid equals the old pid, which is only reused after they all exit.
        // SAFETY: plain syscall.
        unsafe {
            libc::kill(-(pid as i32), libc::SIGKILL);
        }
        return;
    };
    let pgrp = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(2))
        .and_then(|s| s.parse::<u32>().ok());
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let name = Path::new(program).file_name();
    let same = exe
        .as_deref()
        .and_then(Path::file_name)
        .is_some_and(|n| Some(n) == name);
    if pgrp == Some(pid) && same {
        kill_group(pid);
    }
}

fn dir_size(p: &Path) -> u64 {
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
