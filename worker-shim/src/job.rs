//! The job record and its state machine: the one shape that the queue, the
//! runner, the store and the API share.
//!
//! `queued → running → succeeded | failed | canceled | timed_out`, plus
//! `running → queued` when a retryable failure is retried (or a running job
//! was interrupted by a shim restart and has attempts left) and
//! `queued → canceled`, and `queued → failed` when a job it runs `after`
//! failed (`dependency_failed`). Every other transition is refused by
//! [`JobState::can_become`]; [`JobRecord::transition`] is the only way to
//! change a state.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
    TimedOut,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Canceled,
        JobState::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Canceled => "canceled",
            JobState::TimedOut => "timed_out",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// No transition leaves a terminal state.
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }

    /// The valid transitions, and only those.
    pub fn can_become(self, next: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, next),
            (Queued, Running)
                | (Queued, Canceled)
                // a dependency (`after`) failed before this job could start
                | (Queued, Failed)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Canceled)
                | (Running, TimedOut)
                // a retry after a retryable failure, or an interrupted run
                | (Running, Queued)
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Scheduling class. Lower rank runs first; FIFO within a class.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Live,
    High,
    #[default]
    Medium,
    Low,
    Batch,
}

impl Priority {
    pub const ALL: [Priority; 5] = [
        Priority::Live,
        Priority::High,
        Priority::Medium,
        Priority::Low,
        Priority::Batch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Live => "live",
            Priority::High => "high",
            Priority::Medium => "medium",
            Priority::Low => "low",
            Priority::Batch => "batch",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub fn rank(self) -> usize {
        self as usize
    }
}

/// Why a run failed. The class decides whether it is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The input or the parameters are wrong: retrying cannot help.
    BadInput,
    /// The tool died on a signal or failed in a way not explained by its input.
    ToolCrash,
    /// The run went over the job's timeout.
    Timeout,
    /// Memory, disk, or device sessions (NVENC) ran out: worth a retry later.
    OutOfResources,
    /// The shim restarted while the job ran.
    Interrupted,
    /// The shim could not run the job here: the program could not be
    /// started, or the host lacks what the job needs (no GPU driver).
    Internal,
    /// The job went over its CPU or memory limit (`exec.limits`, or the
    /// submission's `limits`): a rerun would hit it again.
    ResourceLimit,
    /// A job it runs `after` did not succeed, so it never started.
    DependencyFailed,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::BadInput => "bad_input",
            FailureClass::ToolCrash => "tool_crash",
            FailureClass::Timeout => "timeout",
            FailureClass::OutOfResources => "out_of_resources",
            FailureClass::Interrupted => "interrupted",
            FailureClass::Internal => "internal",
            FailureClass::ResourceLimit => "resource_limit",
            FailureClass::DependencyFailed => "dependency_failed",
        }
    }

    /// Whether a failure of this class is retried (when attempts are left).
    pub fn retryable(self) -> bool {
        matches!(
            self,
            FailureClass::ToolCrash | FailureClass::OutOfResources | FailureClass::Interrupted
        )
    }
}

/// A classified failure: the class plus what the tool said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub class: FailureClass,
    /// One line for humans: exit status and the tool's last error line.
    pub message: String,
    /// Exit code, when the tool exited.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub exit_code: Option<i32>,
    /// Signal number, when the tool was killed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub signal: Option<i32>,
}

/// Energy measured in one domain over a job's run: joules, or why not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Energy {
    Joules(f64),
    /// Always the literal string "unmeasured" in JSON; never 0.
    Unmeasured(Unmeasured),
}

/// Serialises as the string `"unmeasured"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmeasured {
    Unmeasured,
}

impl Energy {
    pub const UNMEASURED: Energy = Energy::Unmeasured(Unmeasured::Unmeasured);

    pub fn joules(&self) -> Option<f64> {
        match self {
            Energy::Joules(j) => Some(*j),
            Energy::Unmeasured(_) => None,
        }
    }
}

/// Energy attributed to one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEnergy {
    /// GPU board energy (NVML) of the device the job ran on.
    pub gpu: Energy,
    /// CPU package energy (RAPL), shared among the jobs running at the time.
    pub cpu_package: Energy,
}

impl Default for JobEnergy {
    fn default() -> Self {
        JobEnergy {
            gpu: Energy::UNMEASURED,
            cpu_package: Energy::UNMEASURED,
        }
    }
}

/// Progress as the tool reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// 0..=100, when the tool's output lets it be computed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub percent: Option<f64>,
    /// Media time processed so far, in seconds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub processed_seconds: Option<f64>,
    /// Processing speed relative to real time (ffmpeg's `speed=`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub speed: Option<f64>,
}

/// One entry of a job's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    pub state: JobState,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub note: Option<String>,
}

/// Everything the shim knows about one job; what the store keeps and the API
/// shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    /// Submission order; FIFO within a priority follows it.
    pub seq: u64,
    pub capability: String,
    pub priority: Priority,
    pub state: JobState,
    /// Validated parameters, as submitted (after defaults).
    pub params: BTreeMap<String, String>,
    /// The caller's verified identity, from the sidecar's `x-crank-client-id`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub requester: Option<String>,
    /// The tenant of the caller's identity (`spiffe://TD/tenant/T/...`):
    /// quotas and fair share count by it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tenant: Option<String>,
    /// The device pool it runs on (`gpu0`, `cpu`), once placed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device: Option<String>,
    /// This job's run timeout in milliseconds, when the submission asked
    /// for less than `exec.timeout`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub timeout_ms: Option<u64>,
    /// Runs started so far (1 on the first run).
    pub attempts: u32,
    pub max_attempts: u32,
    pub progress: Progress,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub failure: Option<Failure>,
    pub energy: JobEnergy,
    pub submitted_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub started_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub finished_ms: Option<u64>,
    /// Time spent queued before the first run, in seconds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub queue_wait_seconds: Option<f64>,
    /// Time spent running, summed over attempts, in seconds.
    pub run_seconds: f64,
    /// The process id (and process group) of the current run.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pid: Option<u32>,
    /// The tool's last lines of standard error from the latest run.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub stderr_tail: Vec<String>,
    /// Size of the output file once succeeded.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub output_bytes: Option<u64>,
    pub history: Vec<Event>,
    /// Every run of the job: where it ran and how it ended.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub attempt_log: Vec<Attempt>,
    /// Limits, template and dependencies from the submission.
    #[serde(flatten)]
    pub extras: JobExtras,
    /// What each finished attempt used (for `GET /v1/usage`).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub usage: Vec<AttemptUsage>,
}

/// What a submission may add to its parameters: resource limits, the
/// template it came from, and the jobs it runs after.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobExtras {
    /// The limits this job runs under (the config's defaults, or lower).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub limits: Option<JobLimits>,
    /// The job template it was made from (`job_templates/<name>.yaml`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub template: Option<String>,
    /// For a job fired by a template's `schedule`: the tick (Unix ms), so a
    /// shared queue can fire each (template, tick) once.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub scheduled_ms: Option<u64>,
    /// Job ids that must succeed before this one starts.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub after: Vec<String>,
}

impl JobExtras {
    /// One job per (template, tick) for a scheduled job: the key a shared
    /// queue keeps unique, so only one shim's firing of a tick is kept.
    pub fn idempotency_key(&self) -> Option<String> {
        let (t, tick) = (self.template.as_ref()?, self.scheduled_ms?);
        Some(format!("cron:{t}:{tick}"))
    }
}

/// Per-job resource limits, as enforced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobLimits {
    /// CPU in thousandths of a core (1500 is 1.5 cores).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cpu_millis: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub memory_bytes: Option<u64>,
}

/// What one finished attempt used, for cost allocation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttemptUsage {
    pub attempt: u32,
    /// When the attempt ended (Unix ms).
    pub finished_ms: u64,
    /// User and system CPU time of the tool and its children.
    pub cpu_seconds: f64,
    /// Time on a GPU slot times the GPUs it held (0 in the CPU pool).
    pub gpu_seconds: f64,
    /// GPU plus CPU package energy, when both were measured.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub energy_joules: Option<f64>,
}

/// One run of a job: the host and slot it ran on, and how it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1 for the first run.
    pub attempt: u32,
    /// The shim that ran it (`exec.queue.postgres.host`, else the hostname).
    pub host: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device: Option<String>,
    pub started_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ended_ms: Option<u64>,
    /// How it ended: a state (`succeeded`, `failed`, …), or `host-lost`
    /// (its lease expired), `preempted`, `interrupted`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub outcome: Option<String>,
}

impl JobRecord {
    /// Closes the open entry of the attempt log, if any.
    pub fn end_attempt(&mut self, at_ms: u64, outcome: &str) {
        if let Some(a) = self
            .attempt_log
            .iter_mut()
            .rev()
            .find(|a| a.ended_ms.is_none())
        {
            a.ended_ms = Some(at_ms);
            a.outcome = Some(outcome.to_string());
        }
    }
}

/// A refused state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTransition {
    pub job: String,
    pub from: JobState,
    pub to: JobState,
}

impl fmt::Display for InvalidTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "job {} cannot go from {} to {}",
            self.job, self.from, self.to
        )
    }
}

impl std::error::Error for InvalidTransition {}

impl JobRecord {
    /// Change state (and record it in the history), if the state machine
    /// allows it.
    pub fn transition(
        &mut self,
        to: JobState,
        at_ms: u64,
        note: Option<String>,
    ) -> Result<(), InvalidTransition> {
        if !self.state.can_become(to) {
            return Err(InvalidTransition {
                job: self.id.clone(),
                from: self.state,
                to,
            });
        }
        self.state = to;
        self.history.push(Event {
            at_ms,
            state: to,
            note,
        });
        Ok(())
    }
}

/// Unix time now, in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_documented_transitions_are_allowed() {
        use JobState::*;
        let allowed = [
            (Queued, Running),
            (Queued, Canceled),
            (Queued, Failed),
            (Running, Succeeded),
            (Running, Failed),
            (Running, Canceled),
            (Running, TimedOut),
            (Running, Queued),
        ];
        for from in JobState::ALL {
            for to in JobState::ALL {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
        for s in JobState::ALL {
            assert_eq!(s.is_terminal(), !matches!(s, Queued | Running));
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn priorities_order_live_first_and_parse_by_name() {
        let mut ps = vec![
            Priority::Batch,
            Priority::Live,
            Priority::Low,
            Priority::High,
        ];
        ps.sort();
        assert_eq!(
            ps,
            [
                Priority::Live,
                Priority::High,
                Priority::Low,
                Priority::Batch
            ]
        );
        assert_eq!(Priority::parse("live"), Some(Priority::Live));
        assert_eq!(Priority::parse("urgent"), None);
    }

    #[test]
    fn unmeasured_energy_is_the_string_never_zero() {
        let e = JobEnergy::default();
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["gpu"], "unmeasured");
        assert_eq!(v["cpu_package"], "unmeasured");
        let back: JobEnergy = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        let m = JobEnergy {
            gpu: Energy::Joules(12.5),
            cpu_package: Energy::UNMEASURED,
        };
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["gpu"], 12.5);
        assert_eq!(serde_json::from_value::<JobEnergy>(v).unwrap(), m);
    }
}
