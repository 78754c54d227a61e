//! What the job manager takes from the `exec:` section, checked and
//! compiled once: the template, the parameter schema, the classifier,
//! limits, retries and retention.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
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
    /// Per-job CPU and memory limits (`exec.limits`), and how they are
    /// enforced here.
    pub limits: crate::limits::Bounds,
    pub enforcer: crate::limits::Enforcer,
    /// Inputs and outputs in a bucket (`exec.storage`); local without.
    pub storage: Option<Arc<crate::storage::Storage>>,
    /// Job templates of this capability (`exec.templates_dir`).
    pub templates: crate::templates::Templates,
    /// Usage summed across shims (a shared queue); this shim's records
    /// without.
    pub usage_source: Option<Arc<dyn crate::usage::UsageSource>>,
}

impl ExecSettings {
    pub fn from_config(capability: &str, c: &ExecConfig) -> Result<ExecSettings, String> {
        let schema = ParamSchema::new(c.params.clone())?;
        let template = CommandTemplate::parse(&c.command, &schema)?;
        let classifier = Classifier::new(&c.failures, &c.exit_codes)?;
        let features = Features::from_config(capability, c, &schema, template.uses_input())?;
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
            limits: features.limits,
            enforcer: features.enforcer,
            storage: features.storage,
            templates: features.templates,
            usage_source: None,
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

/// Limits, storage and templates from the `exec:` section.
struct Features {
    limits: crate::limits::Bounds,
    enforcer: crate::limits::Enforcer,
    storage: Option<Arc<crate::storage::Storage>>,
    templates: crate::templates::Templates,
}

impl Features {
    fn from_config(
        capability: &str,
        c: &ExecConfig,
        schema: &ParamSchema,
        takes_input: bool,
    ) -> Result<Features, String> {
        let limits = c.limits.bounds().map_err(|p| {
            p.iter()
                .map(|(f, m)| format!("{f}: {m}"))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let enforcer = match limits == crate::limits::Bounds::default() {
            true => crate::limits::Enforcer::Rlimit,
            false => crate::limits::Enforcer::choose(&c.limits)?,
        };
        let storage = match &c.storage.s3 {
            Some(s3) => Some(Arc::new(crate::storage::Storage::open(s3)?)),
            None => None,
        };
        let templates = match &c.templates_dir {
            Some(dir) => crate::templates::Templates::load(dir, capability, schema, takes_input)?,
            None => crate::templates::Templates::default(),
        };
        Ok(Features {
            limits,
            enforcer,
            storage,
            templates,
        })
    }
}
