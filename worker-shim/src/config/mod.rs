//! `crank-shim --config FILE.yaml`: typed, unknown keys refused, and every
//! error names the file, the field and the fix. See
//! `docs/reference/shim-config.md`.

mod serve;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use self::serve::ServeConfig;

use crate::exec::classify::FailureRule;
use crate::exec::params::ParamSpec;
use crate::exec::progress::ProgressKind;
use crate::job::FailureClass;

/// A config error: which file, which field, what is wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {field}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub field: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The worker is an HTTP server: supervise it and sit in front of it.
    Serve,
    /// The worker is a command-line tool: run it as jobs.
    Exec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShimConfig {
    pub mode: Mode,
    /// Where the sidecar reaches the shim (the sidecar's `inbound.app`).
    pub listen: SocketAddr,
    /// `/ready`, `/live`, `/metrics`, `/v1/host`, `/v1/registration`.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// The capability this worker serves, e.g. `transcode:h264`.
    pub capability: String,
    /// Labels announced at registration, added to the detected ones.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The mesh identity of the worker's sidecar, for the registration.
    #[serde(default)]
    pub identity: Option<String>,
    /// Where the registration is published until the control plane's
    /// registry exists (issue 4).
    #[serde(default)]
    pub registration_file: Option<PathBuf>,
    #[serde(default)]
    pub host: HostConfig,
    #[serde(default)]
    pub serve: Option<ServeConfig>,
    #[serde(default)]
    pub exec: Option<ExecConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Try NVML (loads libnvidia-ml.so.1 at run time).
    #[serde(default = "yes")]
    pub nvml: bool,
    #[serde(default = "default_powercap")]
    pub powercap_root: PathBuf,
    /// How often energy counters are read while jobs run.
    #[serde(default = "default_sample", with = "humantime_serde")]
    pub energy_sample_interval: Duration,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            nvml: true,
            powercap_root: default_powercap(),
            energy_sample_interval: default_sample(),
        }
    }
}

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

fn yes() -> bool {
    true
}
fn default_powercap() -> PathBuf {
    PathBuf::from("/sys/class/powercap")
}
fn default_sample() -> Duration {
    Duration::from_secs(1)
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

/// Reads, parses and validates a shim config file.
pub fn load(path: &Path) -> Result<ShimConfig, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        field: "(file)".into(),
        message: format!("cannot read the config file: {e}; check the --config path"),
    })?;
    let mut cfg = parse(&file, &text)?;
    validate(&file, &cfg)?;
    let base = path.parent().unwrap_or(Path::new("."));
    resolve_paths(&mut cfg, base);
    resolve_program(&file, &mut cfg, base)?;
    Ok(cfg)
}

/// Refuses a `command` whose program would not run (see [`crate::program`]),
/// so that `--check` and the start fail instead of every job. A relative
/// path becomes the absolute one that was checked.
pub fn resolve_program(file: &str, cfg: &mut ShimConfig, base: &Path) -> Result<(), ConfigError> {
    let (section, command, env) = match (cfg.exec.as_mut(), cfg.serve.as_mut()) {
        (Some(e), _) => ("exec", &mut e.command, &e.env),
        (None, Some(s)) => ("serve", &mut s.command, &s.env),
        (None, None) => return Ok(()),
    };
    let Some(program) = command.first_mut() else {
        return Ok(());
    };
    let env_field = format!("{section}.env");
    let path_env = crate::program::child_path(env);
    let resolved = crate::program::resolve(program, base, path_env.as_deref(), &env_field)
        .map_err(|message| ConfigError {
            file: file.to_string(),
            field: format!("{section}.command"),
            message,
        })?;
    if program.contains('/') && !Path::new(program.as_str()).is_absolute() {
        *program = resolved.display().to_string();
    }
    Ok(())
}

/// Relative paths in the config are relative to the config file's
/// directory, as in crank-proxy's config.
pub fn resolve_paths(cfg: &mut ShimConfig, base: &Path) {
    let fix = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    if let Some(r) = cfg.registration_file.as_mut() {
        fix(r);
    }
    fix(&mut cfg.host.powercap_root);
    if let Some(exec) = cfg.exec.as_mut() {
        fix(&mut exec.work_dir);
        if let Some(st) = exec.store.as_mut() {
            fix(st);
        }
    }
}

/// Parses YAML text; errors carry the field path and the line.
pub fn parse(file: &str, text: &str) -> Result<ShimConfig, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let mut message = e.into_inner().to_string();
        if message.contains("unknown field") {
            message.push_str("; remove it or fix its spelling (see docs/reference/shim-config.md)");
        } else if message.contains("missing field") {
            message.push_str("; add it (see docs/reference/shim-config.md)");
        }
        ConfigError {
            file: file.to_string(),
            field: if field == "." || field.is_empty() {
                "(top level)".into()
            } else {
                field
            },
            message,
        }
    })
}

/// Checks what the types cannot: the mode's section, the template against
/// the schema, the classification rules, sizes and times.
pub fn validate(file: &str, cfg: &ShimConfig) -> Result<(), ConfigError> {
    let fail = |field: &str, message: String| ConfigError {
        file: file.to_string(),
        field: field.to_string(),
        message,
    };
    if !valid_capability(&cfg.capability) {
        return Err(fail(
            "capability",
            format!(
                "{:?} is not a capability name; use lowercase `name:version` like `transcode:h264`",
                cfg.capability
            ),
        ));
    }
    for k in cfg.labels.keys() {
        if k.is_empty()
            || !k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
        {
            return Err(fail(
                &format!("labels.{k}"),
                "label names use letters, digits, `.`, `-`, `_` and `/`".into(),
            ));
        }
    }
    if cfg.host.energy_sample_interval < Duration::from_millis(10) {
        return Err(fail(
            "host.energy_sample_interval",
            "must be at least 10ms, like `1s`".into(),
        ));
    }
    if cfg.admin_listen == Some(cfg.listen) {
        return Err(fail(
            "admin_listen",
            "must differ from `listen`; pick another port".into(),
        ));
    }
    match cfg.mode {
        Mode::Serve => {
            let Some(serve) = &cfg.serve else {
                return Err(fail(
                    "serve",
                    "mode is `serve` but there is no `serve:` section; add one with `command` and `upstream`".into(),
                ));
            };
            if cfg.exec.is_some() {
                return Err(fail(
                    "exec",
                    "mode is `serve`; remove the `exec:` section or set `mode: exec`".into(),
                ));
            }
            serve.validate().map_err(|m| fail("serve", m))?;
        }
        Mode::Exec => {
            let Some(exec) = &cfg.exec else {
                return Err(fail(
                    "exec",
                    "mode is `exec` but there is no `exec:` section; add one with `command` and `work_dir`".into(),
                ));
            };
            if cfg.serve.is_some() {
                return Err(fail(
                    "serve",
                    "mode is `exec`; remove the `serve:` section or set `mode: serve`".into(),
                ));
            }
            validate_exec(exec).map_err(|(f, m)| fail(&format!("exec.{f}"), m))?;
        }
    }
    Ok(())
}

fn valid_capability(c: &str) -> bool {
    let mut parts = c.splitn(2, ':');
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "-_.".contains(ch))
    };
    matches!((parts.next(), parts.next()), (Some(a), Some(b)) if ok(a) && ok(b))
}

fn validate_exec(exec: &ExecConfig) -> Result<(), (String, String)> {
    let schema = crate::exec::params::ParamSchema::new(exec.params.clone())
        .map_err(|m| ("params".to_string(), m))?;
    if exec.command.is_empty() {
        return Err((
            "command".into(),
            "is empty; give the tool's argv, e.g. [ffmpeg, -i, \"{input}\", \"{output}\"]".into(),
        ));
    }
    crate::exec::template::CommandTemplate::parse(&exec.command, &schema)
        .map_err(|m| ("command".to_string(), m))?;
    crate::exec::classify::Classifier::new(&exec.failures, &exec.exit_codes)
        .map_err(|m| ("failures".to_string(), m))?;
    if exec.output.extension.is_empty()
        || !exec
            .output
            .extension
            .chars()
            .all(|c| c.is_ascii_alphanumeric())
    {
        return Err((
            "output.extension".into(),
            format!(
                "{:?} must be letters and digits only, like `mp4`",
                exec.output.extension
            ),
        ));
    }
    if exec
        .output
        .content_type
        .parse::<http::HeaderValue>()
        .is_err()
    {
        return Err((
            "output.content_type".into(),
            "is not a valid header value".into(),
        ));
    }
    for (what, v) in [
        ("max_input_bytes", exec.max_input_bytes),
        ("max_output_bytes", exec.max_output_bytes),
        ("max_work_dir_bytes", exec.max_work_dir_bytes),
    ] {
        if v == 0 {
            return Err((what.into(), "must be more than 0".into()));
        }
    }
    if exec.timeout.is_zero() {
        return Err(("timeout".into(), "must be more than 0, like `10m`".into()));
    }
    if exec.retries.max_attempts == 0 {
        return Err((
            "retries.max_attempts".into(),
            "counts the first run too, so it must be at least 1".into(),
        ));
    }
    if exec.retries.backoff_initial > exec.retries.backoff_max {
        return Err((
            "retries.backoff_initial".into(),
            "is longer than retries.backoff_max; make it shorter".into(),
        ));
    }
    if exec.devices.sessions_per_gpu == 0 {
        return Err((
            "devices.sessions_per_gpu".into(),
            "must be at least 1".into(),
        ));
    }
    if exec.devices.cpu_slots == Some(0) && exec.devices.placement == Placement::Cpu {
        return Err((
            "devices.cpu_slots".into(),
            "is 0 with placement `cpu`: no job could ever run; give it at least 1".into(),
        ));
    }
    if !exec.devices.gpu_when.is_empty() && exec.devices.placement != Placement::Any {
        return Err((
            "devices.gpu_when".into(),
            "only applies with placement `any` (it splits jobs between the GPUs and the CPU pool); remove it or set placement: any".into(),
        ));
    }
    for (name, values) in &exec.devices.gpu_when {
        let Some(spec) = exec.params.get(name) else {
            return Err((
                format!("devices.gpu_when.{name}"),
                format!("`{name}` is not a declared parameter; use one of params"),
            ));
        };
        if values.is_empty() {
            return Err((
                format!("devices.gpu_when.{name}"),
                "lists no values; give the values that need a GPU".into(),
            ));
        }
        if !spec.values.is_empty() {
            if let Some(v) = values.iter().find(|v| !spec.values.contains(v)) {
                return Err((
                    format!("devices.gpu_when.{name}"),
                    format!(
                        "{v:?} is not one of the parameter's values ({}); fix the spelling",
                        spec.values.join(", ")
                    ),
                ));
            }
        }
    }
    if exec.retention.max_jobs == 0 {
        return Err((
            "retention.max_jobs".into(),
            "must be at least 1, or every output is deleted as its job finishes".into(),
        ));
    }
    if exec.max_queue == 0 {
        return Err(("max_queue".into(), "must be at least 1".into()));
    }
    for k in exec.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err((format!("env.{k}"), "is not a valid variable name".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
mode: exec
listen: 127.0.0.1:7070
capability: transcode:h264
exec:
  command: [ffmpeg, -i, "{input}", -vf, "scale=-2:{height}", "{output}"]
  params:
    height: {type: integer, min: 144, max: 2160, default: 720}
  work_dir: /tmp/work
"#;

    fn check(text: &str) -> Result<ShimConfig, ConfigError> {
        let cfg = parse("t.yaml", text)?;
        validate("t.yaml", &cfg)?;
        Ok(cfg)
    }

    #[test]
    fn a_minimal_exec_config_gets_the_documented_defaults() {
        let cfg = check(GOOD).unwrap();
        let exec = cfg.exec.unwrap();
        assert_eq!(exec.timeout, Duration::from_secs(3600));
        assert_eq!(exec.retries.max_attempts, 3);
        assert_eq!(exec.devices.sessions_per_gpu, 2);
        assert_eq!(exec.cpu_slots(8), 4);
        assert_eq!(exec.cpu_slots(1), 1);
        assert_eq!(exec.store_path(), PathBuf::from("/tmp/work/jobs.redb"));
        assert!(cfg.host.nvml);
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        let mut cfg = check(&GOOD.replace("/tmp/work", "work")).unwrap();
        resolve_paths(&mut cfg, Path::new("/etc/crank"));
        let exec = cfg.exec.unwrap();
        assert_eq!(exec.work_dir, PathBuf::from("/etc/crank/work"));
        assert_eq!(
            exec.store_path(),
            PathBuf::from("/etc/crank/work/jobs.redb")
        );
        assert_eq!(cfg.host.powercap_root, PathBuf::from("/sys/class/powercap"));
    }

    #[test]
    fn a_program_that_would_not_run_is_refused_at_load() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg_path = tmp.path().join("shim.yaml");
        let load_with = |program: &str, extra: &str| {
            let text = GOOD.replace("[ffmpeg,", &format!("[{program},"));
            std::fs::write(&cfg_path, format!("{text}{extra}")).unwrap();
            load(&cfg_path)
        };
        let e = load_with("no-such-tool-xyz", "  env: {PATH: /nowhere:/either}\n").unwrap_err();
        assert_eq!(e.field, "exec.command", "{e}");
        assert!(e.file.ends_with("shim.yaml"), "{e}");
        for piece in [
            "\"no-such-tool-xyz\"",
            "\"/nowhere:/either\"",
            "exec.env.PATH",
        ] {
            assert!(e.message.contains(piece), "{piece}: {e}");
        }
        let e = load_with("./tool.sh", "").unwrap_err();
        assert!(e.message.contains("does not exist"), "{e}");

        // A relative path is the config directory's, and runs as absolute.
        let tool = tmp.path().join("tool.sh");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let cfg = load_with("./tool.sh", "").unwrap();
        assert_eq!(
            cfg.exec.unwrap().command[0],
            tmp.path().join("./tool.sh").display().to_string()
        );
        // A bare name is found on the PATH the tool gets (exec.env.PATH).
        let dir = tmp.path().display();
        let cfg = load_with("tool.sh", &format!("  env: {{PATH: {dir}}}\n")).unwrap();
        assert_eq!(cfg.exec.unwrap().command[0], "tool.sh");
    }

    #[test]
    fn errors_name_the_field_and_the_fix() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "capability: transcode:h264",
                "capability: Transcode",
                "capability",
            ),
            (
                "  work_dir: /tmp/work",
                "  work_dir: /tmp/work\n  timeout: 0s",
                "exec.timeout",
            ),
            (
                "  work_dir: /tmp/work",
                "  work_dir: /tmp/work\n  retries: {max_attempts: 0}",
                "exec.retries.max_attempts",
            ),
            (
                "  work_dir: /tmp/work",
                "  work_dir: /tmp/work\n  colour: red",
                "exec.colour",
            ),
            ("scale=-2:{height}", "scale=-2:{width}", "exec.command"),
            ("mode: exec", "mode: serve", "serve"),
            (
                "  work_dir: /tmp/work",
                "  work_dir: /tmp/work\n  devices: {gpu_when: {codec: [h264_nvenc]}}",
                "exec.devices.gpu_when.codec",
            ),
            (
                "  work_dir: /tmp/work",
                "  work_dir: /tmp/work\n  output: {extension: ../mp4}",
                "exec.output.extension",
            ),
        ];
        for (from, to, field) in cases {
            assert!(GOOD.contains(from), "{from}");
            let e = check(&GOOD.replace(from, to)).unwrap_err();
            assert_eq!(e.field, *field, "{to}: {e}");
            assert!(e.to_string().starts_with("t.yaml: "), "{e}");
        }
        let e = check(&GOOD.replace(
            "  work_dir: /tmp/work",
            "  work_dir: /tmp/work\n  colour: red",
        ))
        .unwrap_err();
        assert!(e.message.contains("unknown field `colour`"), "{e}");
        assert!(e.message.contains("docs/reference/shim-config.md"), "{e}");
    }
}
