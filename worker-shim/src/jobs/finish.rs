//! The end of a run: the record's next state (succeeded, back to the queue
//! for a retry after a backoff, or failed, canceled, timed out), what the
//! attempt used, the store, the metrics, the input's cleanup, the jobs that
//! ran `after` it when it did not succeed, and the slot's release.
//!
//! Dependencies (`after`) are decided here too: [`deps_ready`] is what the
//! dispatcher asks before it starts a job, and a job whose dependency ends
//! without success fails at once with `dependency_failed`.

use std::collections::HashMap;
use std::time::Duration;

use crank_plumbing::{Backoff, Jitter, Refusal};
use http::StatusCode;

use super::manager::Manager;
use super::runner::Outcome;
use crate::job::{
    now_ms, AttemptUsage, Energy, Failure, FailureClass, JobEnergy, JobRecord, JobState,
};

/// Fails a queued job whose dependency `parent` ended `parent_state`
/// (class `dependency_failed`); false when the record could not move.
pub(super) fn dependency_failed(
    rec: &mut JobRecord,
    parent: &str,
    parent_state: &str,
    now: u64,
) -> bool {
    let message = format!("job {parent}, which this job runs after, ended {parent_state}");
    rec.failure = Some(Failure {
        class: FailureClass::DependencyFailed,
        message: message.clone(),
        exit_code: None,
        signal: None,
    });
    let note = format!("dependency_failed: {message}");
    if rec.transition(JobState::Failed, now, Some(note)).is_err() {
        return false;
    }
    rec.finished_ms = Some(now);
    true
}

/// The wait before retry number `attempts` (1 after the first run):
/// `backoff_initial` doubling up to `backoff_max`, spread over its upper
/// half ([`Jitter::Equal`]) so retries are spread but never instant.
pub fn retry_delay(initial: Duration, max: Duration, attempts: u32, draw: f64) -> Duration {
    Backoff::new(initial, max, Jitter::Equal).delay(attempts.saturating_sub(1), draw)
}

impl Manager {
    /// Records how a run ended and frees its slot.
    pub(super) fn finish_run(&self, id: &str, device: usize, run: RunEnd) {
        let draining = self.is_draining();
        let on_gpu = {
            let inner = self.inner.lock().unwrap();
            inner
                .devices
                .list
                .get(device)
                .is_some_and(|d| d.gpu.is_some())
        };
        let mut retry_in = None;
        let local = self.cluster().is_none();
        let rec = self.by_ref(id, |rec| {
            rec.run_seconds += run.seconds;
            complete_usage(rec, &run, on_gpu);
            rec.energy = add_energy(&rec.energy, &run.energy, rec.attempts);
            let preempted = run.preempted && matches!(run.outcome, Outcome::Canceled);
            retry_in = match preempted {
                true => {
                    super::manager::preempted(rec, now_ms());
                    None
                }
                false => self.next_state(rec, run.outcome, draining, run.user_canceled),
            };
            rec.end_attempt(now_ms(), &super::manager::attempt_outcome(rec, preempted));
            // Counted before the lock is let go: whoever sees the job end
            // in the API also sees it in /metrics.
            if local && rec.state.is_terminal() {
                self.observe_finished(rec);
            }
        });
        let Some(rec) = rec else {
            self.release(id, device);
            return;
        };
        if let Some(c) = self.cluster() {
            return self.cluster_end(c, rec, retry_in, device);
        }
        self.persist_end(&rec);
        if let Some(wait) = retry_in {
            self.retry_later(&rec, wait);
        } else if rec.state == JobState::Queued {
            // Drain: requeued but not dispatched until the next start.
            let mut inner = self.inner.lock().unwrap();
            inner.queue.push(rec.priority, rec.seq, rec.id.clone());
        }
        if rec.state.is_terminal() {
            self.prune();
            self.cleanup_input(id);
        }
        if rec.state.is_terminal() && rec.state != JobState::Succeeded {
            self.fail_dependents(id);
        }
        self.release(id, device);
    }

    /// Refuses `after` naming a job this shim does not know, or one that
    /// already ended without success.
    pub fn check_after(&self, after: &[String]) -> Result<(), Refusal> {
        if self.cluster().is_some() {
            // The shared queue checks them in the submission's transaction.
            return Ok(());
        }
        let inner = self.inner.lock().unwrap();
        for dep in after {
            match inner.records.get(dep).map(|r| r.state) {
                None => {
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "dependency-not-found",
                        format!(
                            "after: no job {dep} here; name jobs of this capability that exist"
                        ),
                    ))
                }
                Some(s) if s.is_terminal() && s != JobState::Succeeded => {
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

    /// Fails the queued jobs that run after `id` (and theirs, in turn):
    /// `id` ended without success.
    pub(super) fn fail_dependents(&self, id: &str) {
        let mut pending = vec![id.to_string()];
        while let Some(parent) = pending.pop() {
            let failed = self.fail_waiting_on(&parent);
            for rec in &failed {
                if let Err(e) = self.store.put(rec) {
                    tracing::error!(job = %rec.id, error = %e, "could not persist the dependency failure");
                }
                self.count_finished(rec);
                self.cleanup_input(&rec.id);
            }
            pending.extend(failed.into_iter().map(|r| r.id));
        }
        self.refresh_gauges();
    }

    /// The queued jobs waiting on `parent`, moved to failed.
    fn fail_waiting_on(&self, parent: &str) -> Vec<JobRecord> {
        let mut inner = self.inner.lock().unwrap();
        let parent_state = inner
            .records
            .get(parent)
            .map_or("gone".to_string(), |r| r.state.to_string());
        let waiting: Vec<String> = inner
            .records
            .values()
            .filter(|r| r.state == JobState::Queued && r.extras.after.iter().any(|a| a == parent))
            .map(|r| r.id.clone())
            .collect();
        let now = now_ms();
        let mut out = Vec::new();
        for id in waiting {
            let Some(rec) = inner.records.get_mut(&id) else {
                continue;
            };
            let (prio, seq) = (rec.priority, rec.seq);
            if dependency_failed(rec, parent, &parent_state, now) {
                out.push(rec.clone());
                inner.queue.remove(prio, seq);
            }
        }
        out
    }

    /// Moves the record on from `running`; `Some(wait)` when it is to be
    /// retried after `wait`.
    fn next_state(
        &self,
        rec: &mut JobRecord,
        outcome: Outcome,
        draining: bool,
        user_canceled: bool,
    ) -> Option<Duration> {
        let now = now_ms();
        let mut retry_in = None;
        match outcome {
            Outcome::Succeeded(bytes) => {
                rec.output_bytes = Some(bytes);
                rec.failure = None;
                rec.progress.percent = Some(100.0);
                let _ = rec.transition(JobState::Succeeded, now, None);
            }
            Outcome::Canceled if draining && !user_canceled => interrupted(rec, now),
            Outcome::Canceled => {
                let note = "canceled while running; process group killed";
                let _ = rec.transition(JobState::Canceled, now, Some(note.into()));
            }
            Outcome::TimedOut(f) => {
                let note = f.message.clone();
                rec.failure = Some(f);
                let _ = rec.transition(JobState::TimedOut, now, Some(note));
            }
            Outcome::Failed(f) => retry_in = self.failed(rec, f, draining, now),
        }
        if rec.state.is_terminal() {
            rec.finished_ms = Some(now);
        }
        retry_in
    }

    /// A failed run: retried when its class allows and attempts are left
    /// (on the next start when the shim drains), else failed.
    fn failed(
        &self,
        rec: &mut JobRecord,
        f: Failure,
        draining: bool,
        now: u64,
    ) -> Option<Duration> {
        let what = format!("{}: {}", f.class.as_str(), f.message);
        let retry = f.class.retryable() && rec.attempts < rec.max_attempts;
        rec.failure = Some(f);
        if !retry {
            let _ = rec.transition(JobState::Failed, now, Some(what));
            return None;
        }
        if draining {
            let note = format!("{what}; the shim is stopping, so the retry runs on the next start");
            let _ = rec.transition(JobState::Queued, now, Some(note));
            return None;
        }
        let s = &self.settings;
        let wait = retry_delay(
            s.backoff_initial,
            s.backoff_max,
            rec.attempts,
            rand::random(),
        );
        let note = format!(
            "{what}; retry {} of {} in {:.1}s",
            rec.attempts,
            rec.max_attempts - 1,
            wait.as_secs_f64()
        );
        let _ = rec.transition(JobState::Queued, now, Some(note));
        Some(wait)
    }

    fn persist_end(&self, rec: &JobRecord) {
        if let Err(e) = self.store.put(rec) {
            tracing::error!(job = %rec.id, error = %e, "could not persist the job's end");
        }
        if let Some(bytes) = rec
            .output_bytes
            .filter(|_| rec.state == JobState::Succeeded)
        {
            self.add_work_bytes(bytes);
        }
        tracing::info!(job = %rec.id, state = %rec.state, attempts = rec.attempts, "job run ended");
    }

    /// Puts the job back in the queue after `wait`, at its original place,
    /// unless it was canceled meanwhile.
    fn retry_later(&self, rec: &JobRecord, wait: Duration) {
        let class = rec.failure.as_ref().map(|f| f.class.as_str()).unwrap_or("");
        self.metrics
            .retries
            .with_label_values(&[&self.settings.capability, class])
            .inc();
        let me = self.weak.upgrade();
        let (id, prio, seq) = (rec.id.clone(), rec.priority, rec.seq);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let Some(m) = me else { return };
            {
                let mut inner = m.inner.lock().unwrap();
                if inner.records.get(&id).map(|r| r.state) == Some(JobState::Queued) {
                    inner.queue.push(prio, seq, id);
                }
            }
            m.refresh_gauges();
            m.wake.notify_one();
        });
    }

    pub(super) fn release(&self, id: &str, device: usize) {
        {
            let mut inner = self.inner.lock().unwrap();
            inner.running.remove(id);
            inner.devices.release(device);
        }
        self.refresh_gauges();
        self.ended.notify_waiters();
        self.wake.notify_one();
    }

    pub(super) fn count_finished(&self, rec: &JobRecord) {
        self.observe_finished(rec);
        self.prune();
    }

    /// The metrics of a job that ended: the count, its run time and energy.
    /// Takes no lock of the manager's.
    fn observe_finished(&self, rec: &JobRecord) {
        let cap = &self.settings.capability;
        let m = &self.metrics;
        m.finished
            .with_label_values(&[cap, rec.state.as_str()])
            .inc();
        if rec.attempts > 0 {
            m.run_time
                .with_label_values(&[cap, rec.state.as_str()])
                .observe(rec.run_seconds);
            for (domain, e) in [
                ("gpu", &rec.energy.gpu),
                ("cpu_package", &rec.energy.cpu_package),
            ] {
                match e.joules() {
                    Some(j) => m.energy.with_label_values(&[cap, domain]).observe(j),
                    None => m.energy_unmeasured.with_label_values(&[cap, domain]).inc(),
                }
            }
        }
    }

    /// Inputs are only needed while a job can still run.
    pub(super) fn cleanup_input(&self, id: &str) {
        let input = self.job_dir(id).join("input");
        if let Ok(m) = std::fs::metadata(&input) {
            if std::fs::remove_file(&input).is_ok() {
                self.sub_work_bytes(m.len());
            }
        }
    }
}

/// Whether every job `rec` runs after has succeeded (a dependency no
/// longer here was removed by retention after it finished).
pub fn deps_ready(records: &HashMap<String, JobRecord>, rec: &JobRecord) -> bool {
    rec.extras.after.iter().all(|dep| {
        records
            .get(dep)
            .is_none_or(|d| d.state == JobState::Succeeded)
    })
}

/// Completes the attempt's usage entry (its CPU time was noted by the
/// runner): when it ended, its GPU time and energy.
fn complete_usage(rec: &mut JobRecord, run: &RunEnd, on_gpu: bool) {
    let attempt = rec.attempts;
    if rec
        .usage
        .last()
        .is_none_or(|u| u.attempt != attempt || u.finished_ms != 0)
    {
        rec.usage.push(AttemptUsage {
            attempt,
            ..AttemptUsage::default()
        });
    }
    if let Some(u) = rec.usage.last_mut() {
        u.finished_ms = now_ms();
        u.gpu_seconds = if on_gpu { run.seconds } else { 0.0 };
        u.energy_joules = match (run.energy.gpu.joules(), run.energy.cpu_package.joules()) {
            (Some(g), Some(c)) => Some(g + c),
            (None, Some(c)) if !on_gpu => Some(c),
            _ => None,
        };
    }
}

/// How a run ended, with what it cost.
pub(super) struct RunEnd {
    pub outcome: Outcome,
    pub energy: JobEnergy,
    pub seconds: f64,
    /// Canceled by a caller (a drain stops runs without it).
    pub user_canceled: bool,
    /// Stopped for a `live` job: back to the queue, not a failure.
    pub preempted: bool,
}

/// Stopped by a shutdown: back to the queue for the next start, without
/// charging the attempt.
fn interrupted(rec: &mut JobRecord, now: u64) {
    rec.attempts = rec.attempts.saturating_sub(1);
    rec.failure = Some(Failure {
        class: FailureClass::Interrupted,
        message: "stopped by a shim shutdown".into(),
        exit_code: None,
        signal: Some(libc::SIGKILL),
    });
    let note = "interrupted by shutdown; runs again on the next start";
    let _ = rec.transition(JobState::Queued, now, Some(note.into()));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 s doubling to the 60 s cap, within [d/2, d].
    #[test]
    fn retries_back_off_over_the_upper_half() {
        let (initial, max) = (Duration::from_secs(1), Duration::from_secs(60));
        let secs = |attempts, draw| retry_delay(initial, max, attempts, draw).as_secs_f64();
        let top: Vec<f64> = (1..=8).map(|a| secs(a, 1.0)).collect();
        assert_eq!(top, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]);
        assert_eq!(secs(3, 0.0), 2.0);
        assert_eq!(secs(0, 1.0), 1.0, "never before the first run");
    }

    #[test]
    fn energy_adds_up_unless_an_attempt_went_unmeasured() {
        let j = |gpu, cpu| JobEnergy {
            gpu,
            cpu_package: cpu,
        };
        let total = j(Energy::Joules(2.0), Energy::Joules(1.0));
        let run = j(Energy::Joules(3.0), Energy::UNMEASURED);
        assert_eq!(add_energy(&total, &run, 1), run, "the first attempt");
        assert_eq!(
            add_energy(&total, &run, 2),
            j(Energy::Joules(5.0), Energy::UNMEASURED)
        );
    }
}
