//! What the job manager takes from the `exec:` section, checked and
//! compiled once: the template, the parameter schema, the classifier,
//! limits, retries and retention.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::queue::Need;
use crate::config::ExecConfig;
use crate::exec::classify::Classifier;
use crate::exec::params::ParamSchema;
use crate::exec::progress::ProgressKind;
use crate::exec::template::CommandTemplate;

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
