//! Taking a job in: the checks before any input byte is read (draining,
//! queue and work dir full, a device this host has), the job's directory,
//! and queueing the record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crank_plumbing::Refusal;
use http::StatusCode;
use rand::Rng;

use super::manager::{dir_size, Inner, Manager};
use super::queue::Need;
use crate::job::{now_ms, Event, JobEnergy, JobRecord, JobState, Priority, Progress};

/// A new job, validated, before it is queued.
pub struct NewJob {
    pub params: BTreeMap<String, String>,
    pub priority: Priority,
    pub requester: Option<String>,
    /// A shorter run timeout than `exec.timeout` (never longer).
    pub timeout: Option<Duration>,
    /// Limits, template and dependencies (`after`).
    pub extras: crate::job::JobExtras,
}

fn new_job_id() -> String {
    let n: u64 = rand::rng().random();
    format!("j-{n:016x}")
}

impl Manager {
    /// Refuses new work while draining, with the queue full, or with the
    /// work directory over its limit.
    pub fn admit_check(&self) -> Result<(), Refusal> {
        let inner = self.inner.lock().unwrap();
        if inner.draining {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                "the shim is shutting down; submit to another worker",
            )
            .retry_after(5));
        }
        if inner.queue.len() >= self.settings.max_queue {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue-full",
                format!(
                    "{} jobs are already queued (exec.max_queue); retry later or on another worker",
                    inner.queue.len()
                ),
            )
            .retry_after(queue_retry_after(&inner)));
        }
        let used = self.work_dir_bytes.load(Ordering::Relaxed);
        if used >= self.settings.max_work_dir_bytes {
            return Err(Refusal::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "work-dir-full",
                format!(
                    "the work directory holds {used} bytes, over exec.max_work_dir_bytes ({}); fetch and delete finished jobs",
                    self.settings.max_work_dir_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Refuses a job this host has no device for: a GPU job (by
    /// `devices.gpu_when`) on a host without a GPU, or a CPU job without a
    /// CPU pool.
    pub fn device_check(&self, params: &BTreeMap<String, String>) -> Result<(), Refusal> {
        let need = self.settings.need(params);
        if self.inner.lock().unwrap().devices.has_kind(need) {
            return Ok(());
        }
        let message = match need {
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
        Err(Refusal::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "no-matching-device",
            message,
        ))
    }

    /// Creates the job's directory; returns (id, directory).
    pub fn prepare(&self) -> Result<(String, PathBuf), Refusal> {
        let id = new_job_id();
        let dir = self.settings.work_dir.join(&id);
        std::fs::create_dir_all(&dir).map_err(|e| {
            Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
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

    pub(super) fn sub_work_bytes(&self, n: u64) {
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
        if let (Some(s), Some(id)) = (&self.settings.storage, dir.file_name()) {
            s.remove_later(&id.to_string_lossy());
        }
    }

    /// Queues a prepared job: written to the store before it is answered.
    pub fn enqueue(&self, id: String, job: NewJob) -> Result<JobRecord, Refusal> {
        let rec = self.new_record(id, job);
        {
            let mut inner = self.inner.lock().unwrap();
            self.store.put(&rec)?;
            inner.queue.push(rec.priority, rec.seq, rec.id.clone());
            inner.records.insert(rec.id.clone(), rec.clone());
        }
        self.count_submitted(&rec);
        self.refresh_gauges();
        self.wake.notify_one();
        Ok(rec)
    }

    pub(super) fn count_submitted(&self, rec: &JobRecord) {
        self.metrics
            .submitted
            .with_label_values(&[&self.settings.capability, rec.priority.as_str()])
            .inc();
    }

    pub(super) fn new_record(&self, id: String, job: NewJob) -> JobRecord {
        let tenant = super::tenants::tenant_of(job.requester.as_deref());
        let now = now_ms();
        JobRecord {
            id,
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            capability: self.settings.capability.clone(),
            priority: job.priority,
            state: JobState::Queued,
            params: job.params,
            requester: job.requester,
            tenant: Some(tenant),
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
            history: vec![Event {
                at_ms: now,
                state: JobState::Queued,
                note: Some("submitted".into()),
            }],
            attempt_log: Vec::new(),
            extras: job.extras,
            usage: Vec::new(),
        }
    }
}

/// A rough wait for a full queue: one backoff step per queued job per
/// slot, 1 to 60 s.
fn queue_retry_after(inner: &Inner) -> u64 {
    let slots = inner.devices.capacity().max(1) as u64;
    (inner.queue.len() as u64 / slots).clamp(1, 60)
}

/// The store failed: the job's state could not be kept.
impl From<super::store::StoreError> for Refusal {
    fn from(e: super::store::StoreError) -> Refusal {
        Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store-error",
            e.to_string(),
        )
    }
}
