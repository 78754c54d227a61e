//! `crank-shim --config FILE.yaml`: typed, unknown keys refused, and every
//! error names the file, the field and the fix. See
//! `docs/reference/shim-config.md`.

mod exec;
mod serve;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crank_plumbing::Problems;
use serde::Deserialize;

pub use self::exec::{
    DevicesConfig, ExecConfig, OutputConfig, Placement, PostgresQueueConfig, QueueConfig,
    RetentionConfig, RetryConfig,
};
pub use self::serve::ServeConfig;
/// A config error: the file, and each problem's field, what is wrong and
/// how to fix it (crank-plumbing's, shared by the three binaries).
pub use crank_plumbing::ConfigError;

/// The reference page that parse errors point to.
const DOC: &str = "docs/reference/shim-config.md";

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

fn yes() -> bool {
    true
}
fn default_powercap() -> PathBuf {
    PathBuf::from("/sys/class/powercap")
}
fn default_sample() -> Duration {
    Duration::from_secs(1)
}
/// Reads, parses and validates a shim config file.
pub fn load(path: &Path) -> Result<ShimConfig, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::unreadable(&file, &e))?;
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
        .map_err(|message| ConfigError::new(file, format!("{section}.command"), message))?;
    if program.contains('/') && !Path::new(program.as_str()).is_absolute() {
        *program = resolved.display().to_string();
    }
    Ok(())
}

/// Relative paths in the config are relative to the config file's
/// directory, as in crank-proxy's config.
pub fn resolve_paths(cfg: &mut ShimConfig, base: &Path) {
    let mut paths = vec![&mut cfg.host.powercap_root];
    paths.extend(cfg.registration_file.as_mut());
    if let Some(exec) = cfg.exec.as_mut() {
        paths.push(&mut exec.work_dir);
        paths.extend(exec.store.as_mut());
        paths.extend(exec.queue.tenants.as_mut());
        paths.extend(exec.templates_dir.as_mut());
    }
    crank_plumbing::config::resolve_paths(base, paths);
}

/// Parses YAML text; an error names the field, the line, the value found
/// and the fix.
pub fn parse(file: &str, text: &str) -> Result<ShimConfig, ConfigError> {
    crank_plumbing::config::parse_yaml(file, text, DOC)
}

/// Checks what the types cannot: the mode's section, the template against
/// the schema, the classification rules, sizes and times.
/// Checks what the types cannot: the mode's section, the template against
/// the schema, the classification rules, sizes and times. Every problem is
/// listed, each under its field.
pub fn validate(file: &str, cfg: &ShimConfig) -> Result<(), ConfigError> {
    let mut p = Problems::new(file);
    check_top(cfg, &mut p);
    match cfg.mode {
        Mode::Serve => check_serve_mode(cfg, &mut p),
        Mode::Exec => check_exec_mode(cfg, &mut p),
    }
    p.finish()
}

/// The fields of both modes.
fn check_top(cfg: &ShimConfig, p: &mut Problems) {
    if !valid_capability(&cfg.capability) {
        p.push(
            "capability",
            format!(
                "{:?} is not a capability name; use lowercase `name:version` like `transcode:h264`",
                cfg.capability
            ),
        );
    }
    for k in cfg.labels.keys() {
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/');
        if k.is_empty() || !k.chars().all(valid) {
            p.push(
                format!("labels.{k}"),
                "label names use letters, digits, `.`, `-`, `_` and `/`",
            );
        }
    }
    if cfg.host.energy_sample_interval < Duration::from_millis(10) {
        p.push(
            "host.energy_sample_interval",
            "must be at least 10ms, like `1s`",
        );
    }
    if cfg.admin_listen == Some(cfg.listen) {
        p.push(
            "admin_listen",
            "must differ from `listen`; pick another port",
        );
    }
}

fn check_serve_mode(cfg: &ShimConfig, p: &mut Problems) {
    match &cfg.serve {
        None => p.push(
            "serve",
            "mode is `serve` but there is no `serve:` section; add one with `command` and `upstream`",
        ),
        Some(serve) => p.check("serve", serve.validate()),
    }
    if cfg.exec.is_some() {
        p.push(
            "exec",
            "mode is `serve`; remove the `exec:` section or set `mode: exec`",
        );
    }
}

fn check_exec_mode(cfg: &ShimConfig, p: &mut Problems) {
    match &cfg.exec {
        None => p.push(
            "exec",
            "mode is `exec` but there is no `exec:` section; add one with `command` and `work_dir`",
        ),
        Some(exec) => exec::check(exec, p),
    }
    if cfg.serve.is_some() {
        p.push(
            "serve",
            "mode is `exec`; remove the `serve:` section or set `mode: serve`",
        );
    }
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

    #[test]
    fn tenants_come_from_a_file_or_the_sidecar_not_both() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("tenants.yaml");
        std::fs::write(&file, "tenants: []\n").unwrap();
        let with = |queue: String| {
            check(&GOOD.replace(
                "  work_dir: /tmp/work",
                &format!("  work_dir: /tmp/work\n  queue: {{{queue}}}"),
            ))
        };
        let url = "tenants_from: http://127.0.0.1:18901/mesh/tenants";
        assert!(with(url.to_string()).is_ok());
        let e = with(format!("tenants: {}, {url}", file.display())).unwrap_err();
        assert_eq!(e.field, "exec.queue.tenants_from", "{e}");
        assert!(e.message.contains("not both"), "{e}");
        let e = with("tenants_from: 127.0.0.1:18901".into()).unwrap_err();
        assert_eq!(e.field, "exec.queue.tenants_from", "{e}");
        assert!(e.message.contains("http://"), "{e}");
    }
}
