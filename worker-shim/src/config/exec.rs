//! The `exec:` section: the tool's argv template and parameters, limits,
//! retries, device placement, retention and failure rules, with the checks
//! the types cannot make.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crank_plumbing::Problems;
use serde::Deserialize;

use crate::exec::classify::{Classifier, FailureRule};
use crate::exec::params::{ParamSchema, ParamSpec};
use crate::exec::progress::ProgressKind;
use crate::exec::template::CommandTemplate;
use crate::job::FailureClass;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// The tool's argv with `{param}` placeholders; never run through a shell.
    pub command: Vec<String>,
    #[serde(default)]
    pub params: BTreeMap<String, ParamSpec>,
    /// Extra environment for the tool.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub progress: ProgressKind,
    #[serde(default)]
    pub output: OutputConfig,
    /// Job directories (input, output) live here.
    pub work_dir: PathBuf,
    /// The job store; default `<work_dir>/jobs.redb`.
    #[serde(default)]
    pub store: Option<PathBuf>,
    #[serde(default = "default_max_input")]
    pub max_input_bytes: u64,
    /// Enforced on the tool with RLIMIT_FSIZE: no file it writes grows past it.
    #[serde(default = "default_max_output")]
    pub max_output_bytes: u64,
    /// New jobs are refused (507) while the work dir holds more than this.
    #[serde(default = "default_max_work_dir")]
    pub max_work_dir_bytes: u64,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default)]
    pub retries: RetryConfig,
    #[serde(default)]
    pub devices: DevicesConfig,
    /// Queued jobs beyond this are refused with 503 `queue-full`.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Failure classification rules tried before the built-in ones.
    #[serde(default)]
    pub failures: Vec<FailureRule>,
    #[serde(default)]
    pub exit_codes: BTreeMap<i32, FailureClass>,
    /// On SIGTERM, how long running jobs may finish before they are stopped
    /// (and re-queued for the next start).
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Where the queue lives: this host's store (the default), or a
    /// PostgreSQL database shared by every shim of the capability.
    #[serde(default)]
    pub queue: QueueConfig,
    /// Per-job CPU and memory limits (see `crate::limits`).
    #[serde(default)]
    pub limits: crate::limits::LimitsConfig,
    /// Inputs and outputs in S3-compatible storage (see `crate::storage`).
    #[serde(default)]
    pub storage: crate::storage::StorageConfig,
    /// The mesh config's `job_templates/` directory (see `crate::templates`).
    #[serde(default)]
    pub templates_dir: Option<PathBuf>,
}

/// `exec.queue`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// The shared queue; absent: the local store (`exec.store`).
    #[serde(default)]
    pub postgres: Option<PostgresQueueConfig>,
    /// `tenants.yaml` (from the mesh config directory): weights and quotas.
    #[serde(default)]
    pub tenants: Option<PathBuf>,
    /// The sidecar's `/mesh/tenants` URL: `tenants.yaml` as the control
    /// plane pushed it; instead of `tenants`.
    #[serde(default)]
    pub tenants_from: Option<String>,
    /// Whether a `live` job preempts a `batch` one when every slot is
    /// busy; default on with `postgres`, off for the embedded queue.
    #[serde(default)]
    pub preemption: Option<bool>,
}

impl QueueConfig {
    pub fn preemption(&self) -> bool {
        self.preemption.unwrap_or(self.postgres.is_some())
    }
}

/// `exec.queue.postgres`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresQueueConfig {
    /// `postgres://USER[:PASSWORD]@HOST:PORT/DB` (no TLS: loopback or a
    /// private network).
    pub url: String,
    /// This shim in leases and attempts; default the hostname. Give each
    /// shim its own when several share a host.
    #[serde(default)]
    pub host: Option<String>,
    /// A claimed job is this shim's while the lease holds; a lease not
    /// renewed for this long means the host is lost and the job is requeued.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// How often leases are renewed (and expired ones requeued).
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
    /// How often an idle shim looks for work submitted to other shims.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(default = "default_pg_connections")]
    pub max_connections: usize,
}

fn default_lease() -> Duration {
    Duration::from_secs(15)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(5)
}
fn default_poll() -> Duration {
    Duration::from_millis(250)
}
fn default_pg_connections() -> usize {
    4
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// The output file is `output.<extension>` in the job directory.
    #[serde(default = "default_ext")]
    pub extension: String,
    #[serde(default = "default_content_type")]
    pub content_type: String,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            extension: default_ext(),
            content_type: default_content_type(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Runs in all, the first included.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_backoff_initial", with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: default_attempts(),
            backoff_initial: default_backoff_initial(),
            backoff_max: default_backoff_max(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// GPU sessions first, then the CPU pool.
    #[default]
    Any,
    /// GPUs only: refused at start on a host without one.
    Gpu,
    /// The CPU pool only.
    Cpu,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesConfig {
    #[serde(default)]
    pub placement: Placement,
    /// Concurrent jobs per GPU (NVENC sessions).
    #[serde(default = "default_sessions")]
    pub sessions_per_gpu: usize,
    /// Concurrent jobs in the CPU pool; default half the cores, at least 1.
    #[serde(default)]
    pub cpu_slots: Option<usize>,
    /// Jobs whose parameter has one of these values need a GPU (for example
    /// `{codec: [h264_nvenc]}`); with it set, every other job runs in the
    /// CPU pool. On a host without a GPU such jobs are refused at submit.
    #[serde(default)]
    pub gpu_when: BTreeMap<String, Vec<String>>,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        DevicesConfig {
            placement: Placement::Any,
            sessions_per_gpu: default_sessions(),
            cpu_slots: None,
            gpu_when: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Finished jobs kept (oldest deleted first, with their files).
    #[serde(default = "default_keep")]
    pub max_jobs: usize,
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            max_jobs: default_keep(),
            max_age: default_max_age(),
        }
    }
}

fn default_max_input() -> u64 {
    1 << 30
}
fn default_max_output() -> u64 {
    4 << 30
}
fn default_max_work_dir() -> u64 {
    20 << 30
}
fn default_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_queue() -> usize {
    1000
}
fn default_drain() -> Duration {
    Duration::from_secs(30)
}
fn default_ext() -> String {
    "out".into()
}
fn default_content_type() -> String {
    "application/octet-stream".into()
}
fn default_attempts() -> u32 {
    3
}
fn default_backoff_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(60)
}
fn default_sessions() -> usize {
    2
}
fn default_keep() -> usize {
    10_000
}
fn default_max_age() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

impl ExecConfig {
    pub fn store_path(&self) -> PathBuf {
        self.store
            .clone()
            .unwrap_or_else(|| self.work_dir.join("jobs.redb"))
    }

    pub fn cpu_slots(&self, cores: usize) -> usize {
        self.devices.cpu_slots.unwrap_or((cores / 2).max(1))
    }
}

/// Notes every problem of the `exec:` section, each under `exec.<field>`.
pub(super) fn check(exec: &ExecConfig, p: &mut Problems) {
    check_tool(exec, p);
    check_output(exec, p);
    check_limits(exec, p);
    check_devices(exec, p);
    check_queue(exec, p);
    for (field, message) in exec
        .limits
        .problems()
        .into_iter()
        .chain(exec.storage.problems())
    {
        p.push(field, message);
    }
    for k in exec.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            p.push(format!("exec.env.{k}"), "is not a valid variable name");
        }
    }
}

/// The parameters, the command template against them, the failure rules.
fn check_tool(exec: &ExecConfig, p: &mut Problems) {
    let schema = match ParamSchema::new(exec.params.clone()) {
        Ok(schema) => Some(schema),
        Err(m) => {
            p.push("exec.params", m);
            None
        }
    };
    if exec.command.is_empty() {
        p.push(
            "exec.command",
            "is empty; give the tool's argv, e.g. [ffmpeg, -i, \"{input}\", \"{output}\"]",
        );
    } else if let Some(schema) = &schema {
        if let Err(m) = CommandTemplate::parse(&exec.command, schema) {
            p.push("exec.command", m);
        }
    }
    if let Err(m) = Classifier::new(&exec.failures, &exec.exit_codes) {
        p.push("exec.failures", m);
    }
}

fn check_output(exec: &ExecConfig, p: &mut Problems) {
    let ext = &exec.output.extension;
    if ext.is_empty() || !ext.chars().all(|c| c.is_ascii_alphanumeric()) {
        p.push(
            "exec.output.extension",
            format!("{ext:?} must be letters and digits only, like `mp4`"),
        );
    }
    if exec
        .output
        .content_type
        .parse::<http::HeaderValue>()
        .is_err()
    {
        p.push("exec.output.content_type", "is not a valid header value");
    }
}

/// Sizes, times, retries, the queue and retention.
fn check_limits(exec: &ExecConfig, p: &mut Problems) {
    for (what, v) in [
        ("max_input_bytes", exec.max_input_bytes),
        ("max_output_bytes", exec.max_output_bytes),
        ("max_work_dir_bytes", exec.max_work_dir_bytes),
    ] {
        if v == 0 {
            p.push(format!("exec.{what}"), "must be more than 0");
        }
    }
    if exec.timeout.is_zero() {
        p.push("exec.timeout", "must be more than 0, like `10m`");
    }
    if exec.retries.max_attempts == 0 {
        p.push(
            "exec.retries.max_attempts",
            "counts the first run too, so it must be at least 1",
        );
    }
    if exec.retries.backoff_initial > exec.retries.backoff_max {
        p.push(
            "exec.retries.backoff_initial",
            "is longer than retries.backoff_max; make it shorter",
        );
    }
    if exec.retention.max_jobs == 0 {
        p.push(
            "exec.retention.max_jobs",
            "must be at least 1, or every output is deleted as its job finishes",
        );
    }
    if exec.max_queue == 0 {
        p.push("exec.max_queue", "must be at least 1");
    }
}

/// The shared queue's URL and timings, and the tenants file.
fn check_queue(exec: &ExecConfig, p: &mut Problems) {
    if let Some(t) = &exec.queue.tenants {
        if let Err(m) = crate::jobs::tenants::Tenants::load(t) {
            p.push("exec.queue.tenants", m);
        }
    }
    if let Some(url) = &exec.queue.tenants_from {
        if exec.queue.tenants.is_some() {
            p.push(
                "exec.queue.tenants_from",
                "set either tenants (a file) or tenants_from (the sidecar), not both".to_string(),
            );
        }
        if let Err(m) = crate::jobs::tenants_reload::check_url(url) {
            p.push("exec.queue.tenants_from", m);
        }
    }
    let Some(pg) = &exec.queue.postgres else {
        return;
    };
    if pg.url.parse::<tokio_postgres::Config>().is_err()
        || !(pg.url.starts_with("postgres://") || pg.url.starts_with("postgresql://"))
    {
        p.push(
            "exec.queue.postgres.url",
            "is not a PostgreSQL URL; use postgres://USER@HOST:PORT/DB",
        );
    }
    if pg.heartbeat.is_zero() || pg.heartbeat * 2 > pg.lease {
        p.push(
            "exec.queue.postgres.heartbeat",
            format!(
                "must be more than 0 and at most half the lease ({}), so one missed renewal does not lose a job",
                humantime::format_duration(pg.lease)
            ),
        );
    }
    if pg.poll_interval.is_zero() {
        p.push(
            "exec.queue.postgres.poll_interval",
            "must be more than 0, like `250ms`",
        );
    }
    if pg.max_connections < 2 {
        p.push("exec.queue.postgres.max_connections", "must be at least 2");
    }
}

/// Slots and placement; `gpu_when` against the declared parameters.
fn check_devices(exec: &ExecConfig, p: &mut Problems) {
    let d = &exec.devices;
    if d.sessions_per_gpu == 0 {
        p.push("exec.devices.sessions_per_gpu", "must be at least 1");
    }
    if d.cpu_slots == Some(0) && d.placement == Placement::Cpu {
        p.push(
            "exec.devices.cpu_slots",
            "is 0 with placement `cpu`: no job could ever run; give it at least 1",
        );
    }
    if !d.gpu_when.is_empty() && d.placement != Placement::Any {
        p.push(
            "exec.devices.gpu_when",
            "only applies with placement `any` (it splits jobs between the GPUs and the CPU pool); remove it or set placement: any",
        );
    }
    for (name, values) in &d.gpu_when {
        let field = format!("exec.devices.gpu_when.{name}");
        let Some(spec) = exec.params.get(name) else {
            p.push(
                field,
                format!("`{name}` is not a declared parameter; use one of params"),
            );
            continue;
        };
        if values.is_empty() {
            p.push(field, "lists no values; give the values that need a GPU");
        } else if let Some(v) = values
            .iter()
            .find(|v| !spec.values.is_empty() && !spec.values.contains(v))
        {
            p.push(
                field,
                format!(
                    "{v:?} is not one of the parameter's values ({}); fix the spelling",
                    spec.values.join(", ")
                ),
            );
        }
    }
}
