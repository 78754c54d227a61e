//! Per-job CPU and memory limits (`exec.limits`, and a submission's
//! `limits`, never above the config's maximum).
//!
//! Two ways to enforce them, chosen once at start:
//! - **cgroup v2**, where the shim can write a cgroup with the `memory` and
//!   `cpu` controllers: one child cgroup per attempt (`memory.max`,
//!   `memory.swap.max` 0, `cpu.max`), the tool put in it between fork and
//!   exec, `memory.events`' `oom_kill` read after it exits, CPU time from
//!   `cpu.stat`;
//! - **rlimits** otherwise: `RLIMIT_AS` for memory (allocations past it
//!   fail) and `RLIMIT_CPU` for CPU time (the cores times the job's timeout).
//!
//! A run that went over its limit fails with class `resource_limit`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::job::{Failure, FailureClass, JobLimits};

/// The `exec.limits:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Cores per job by default, like `"1.5"`.
    #[serde(default)]
    pub cpu: Option<Quantity>,
    /// Memory per job by default, like `512MiB`.
    #[serde(default)]
    pub memory: Option<Quantity>,
    /// The most a submission may ask for; default the `cpu` above.
    #[serde(default)]
    pub max_cpu: Option<Quantity>,
    /// The most a submission may ask for; default the `memory` above.
    #[serde(default)]
    pub max_memory: Option<Quantity>,
    #[serde(default)]
    pub enforce: Enforce,
    /// The cgroup v2 directory under which job cgroups are made; default
    /// the shim's own cgroup.
    #[serde(default)]
    pub cgroup_parent: Option<PathBuf>,
}

/// A number or a string in YAML (`1.5`, `"1.5"`, `512MiB`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Quantity {
    Number(f64),
    Text(String),
}

impl Quantity {
    fn text(&self) -> String {
        match self {
            Quantity::Number(n) => n.to_string(),
            Quantity::Text(s) => s.clone(),
        }
    }
}

/// How limits are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforce {
    /// cgroup v2 when writable with the memory and cpu controllers, else
    /// rlimits.
    #[default]
    Auto,
    /// cgroup v2 only: the shim refuses to start without it.
    Cgroup,
    /// rlimits only.
    Rlimit,
}

/// `"1.5"` cores → 1500 thousandths.
pub fn parse_cpu(s: &str) -> Result<u64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of cores like \"1.5\""))?;
    if !(v.is_finite() && v > 0.0 && v <= 4096.0) {
        return Err(format!("{s:?} cores must be more than 0 (like \"0.5\")"));
    }
    Ok(((v * 1000.0).round() as u64).max(1))
}

/// `512MiB`, `1GiB`, `300M`, `1048576` → bytes.
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1_000,
        "KiB" | "Ki" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "MiB" | "Mi" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "GiB" | "Gi" => 1 << 30,
        "TiB" | "Ti" => 1 << 40,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?}; use B, KiB, MiB or GiB"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512MiB"))?;
    let bytes = (n * mult as f64) as u64;
    if bytes < 1 << 20 {
        return Err(format!("{s:?} is under 1MiB; no tool runs in that"));
    }
    Ok(bytes)
}

/// The configured defaults and maximums, parsed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bounds {
    pub default: JobLimits,
    pub max: JobLimits,
}

impl LimitsConfig {
    /// Every problem, each under `exec.limits.<field>`.
    pub fn problems(&self) -> Vec<(String, String)> {
        match self.bounds() {
            Ok(_) => Vec::new(),
            Err(p) => p,
        }
    }

    pub fn bounds(&self) -> Result<Bounds, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let mut field =
            |name: &str, q: &Option<Quantity>, parse: fn(&str) -> Result<u64, String>| {
                q.as_ref().and_then(|q| {
                    parse(&q.text())
                        .map_err(|m| problems.push((format!("exec.limits.{name}"), m)))
                        .ok()
                })
            };
        let cpu = field("cpu", &self.cpu, parse_cpu);
        let memory = field("memory", &self.memory, parse_memory);
        let max_cpu = field("max_cpu", &self.max_cpu, parse_cpu).or(cpu);
        let max_memory = field("max_memory", &self.max_memory, parse_memory).or(memory);
        for (name, d, m) in [("cpu", cpu, max_cpu), ("memory", memory, max_memory)] {
            if let (Some(d), Some(m)) = (d, m) {
                if d > m {
                    problems.push((
                        format!("exec.limits.{name}"),
                        format!("is over max_{name}; lower it or raise max_{name}"),
                    ));
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Bounds {
            default: JobLimits {
                cpu_millis: cpu,
                memory_bytes: memory,
            },
            max: JobLimits {
                cpu_millis: max_cpu,
                memory_bytes: max_memory,
            },
        })
    }
}

/// A submission's `limits: {cpu, memory}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    #[serde(default)]
    pub cpu: Option<Quantity>,
    #[serde(default)]
    pub memory: Option<Quantity>,
}

impl Bounds {
    /// The limits a job gets: what it asked for (each within the maximum),
    /// else the defaults. The refusal names the maximum.
    pub fn resolve(&self, req: Option<&LimitsRequest>) -> Result<JobLimits, String> {
        let Some(req) = req else {
            return Ok(self.default);
        };
        let cpu = pick(
            "cpu",
            req.cpu.as_ref(),
            parse_cpu,
            self.default.cpu_millis,
            self.max.cpu_millis,
            |m| format!("{} cores", m as f64 / 1000.0),
        )?;
        let memory = pick(
            "memory",
            req.memory.as_ref(),
            parse_memory,
            self.default.memory_bytes,
            self.max.memory_bytes,
            |b| format!("{} MiB", b >> 20),
        )?;
        Ok(JobLimits {
            cpu_millis: cpu,
            memory_bytes: memory,
        })
    }
}

fn pick(
    name: &str,
    asked: Option<&Quantity>,
    parse: fn(&str) -> Result<u64, String>,
    default: Option<u64>,
    max: Option<u64>,
    show: fn(u64) -> String,
) -> Result<Option<u64>, String> {
    let Some(q) = asked else { return Ok(default) };
    let v = parse(&q.text()).map_err(|m| format!("limits.{name}: {m}"))?;
    match max {
        Some(m) if v > m => Err(format!(
            "limits.{name} {} is over this worker's maximum of {} (exec.limits.max_{name}); ask for at most that",
            show(v),
            show(m)
        )),
        _ => Ok(Some(v)),
    }
}

/// How this shim enforces limits, decided at start.
#[derive(Debug, Clone, PartialEq)]
pub enum Enforcer {
    /// Job cgroups are made under this cgroup v2 directory.
    Cgroup(PathBuf),
    Rlimit,
}

impl Enforcer {
    pub fn name(&self) -> &'static str {
        match self {
            Enforcer::Cgroup(_) => "cgroup",
            Enforcer::Rlimit => "rlimit",
        }
    }

    /// cgroup v2 where the config allows it and it is usable here.
    pub fn choose(cfg: &LimitsConfig) -> Result<Enforcer, String> {
        if cfg.enforce == Enforce::Rlimit {
            return Ok(Enforcer::Rlimit);
        }
        let parent = cfg.cgroup_parent.clone().or_else(own_cgroup);
        let usable = parent.as_deref().map(prepare_parent);
        match (cfg.enforce, parent, usable) {
            (_, Some(p), Some(Ok(()))) => Ok(Enforcer::Cgroup(p)),
            (Enforce::Cgroup, p, u) => Err(format!(
                "exec.limits.enforce is `cgroup` but no usable cgroup v2 directory was found ({}); set enforce: rlimit or auto, or exec.limits.cgroup_parent to a delegated cgroup",
                match (p, u) {
                    (Some(p), Some(Err(e))) => format!("{}: {e}", p.display()),
                    _ => "the shim is not in a cgroup v2 hierarchy".into(),
                }
            )),
            _ => Ok(Enforcer::Rlimit),
        }
    }
}

/// The shim's own cgroup v2 directory (`0::/path` in /proc/self/cgroup,
/// under the cgroup2 mount).
fn own_cgroup() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let mount = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })?;
    Some(mount.join(rel.trim_start_matches('/')))
}

/// The parent must offer `memory` and `cpu` to its children: enabled in
/// its `cgroup.subtree_control` (written when missing).
fn prepare_parent(parent: &Path) -> Result<(), String> {
    let controllers = std::fs::read_to_string(parent.join("cgroup.controllers"))
        .map_err(|e| format!("reading cgroup.controllers: {e}"))?;
    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
    if !(has("memory") && has("cpu")) {
        return Err(format!(
            "the memory and cpu controllers are not available (cgroup.controllers: {:?})",
            controllers.trim()
        ));
    }
    let control = parent.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&control).unwrap_or_default();
    if enabled.contains("memory") && enabled.contains("cpu") {
        return Ok(());
    }
    std::fs::write(&control, "+memory +cpu")
        .map_err(|e| format!("enabling memory and cpu in cgroup.subtree_control: {e}"))
}

/// One attempt's cgroup.
pub struct JobCgroup {
    path: PathBuf,
    procs: std::fs::File,
}

impl JobCgroup {
    /// Creates `<parent>/crank-<job>-<attempt>` with the limits.
    pub fn create(parent: &Path, name: &str, limits: &JobLimits) -> Result<JobCgroup, String> {
        let path = parent.join(format!("crank-{name}"));
        std::fs::create_dir_all(&path)
            .map_err(|e| format!("creating the job cgroup {}: {e}", path.display()))?;
        let write = |file: &str, v: String| {
            std::fs::write(path.join(file), v)
                .map_err(|e| format!("writing {file} in {}: {e}", path.display()))
        };
        if let Some(m) = limits.memory_bytes {
            write("memory.max", m.to_string())?;
            // No swap, so the limit is the memory the job can hold.
            let _ = write("memory.swap.max", "0".into());
        }
        if let Some(c) = limits.cpu_millis {
            write("cpu.max", format!("{} 100000", c * 100))?;
        }
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(path.join("cgroup.procs"))
            .map_err(|e| format!("opening cgroup.procs in {}: {e}", path.display()))?;
        Ok(JobCgroup { path, procs })
    }

    /// The descriptor the child writes `0` to (itself) before exec.
    pub fn procs_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.procs.as_raw_fd()
    }

    /// Whether the kernel's OOM killer killed a process of this cgroup.
    pub fn oom_killed(&self) -> bool {
        std::fs::read_to_string(self.path.join("memory.events"))
            .ok()
            .and_then(|t| stat_value(&t, "oom_kill"))
            .is_some_and(|n| n > 0)
    }

    /// CPU time used by every process of the cgroup.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let t = std::fs::read_to_string(self.path.join("cpu.stat")).ok()?;
        stat_value(&t, "usage_usec").map(|u| u as f64 / 1e6)
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        // Any process left is killed first: a cgroup with members cannot go.
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        let _ = std::fs::remove_dir(&self.path);
    }
}

fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// In the child, between fork and exec: join the cgroup, or set the
/// rlimits. Only async-signal-safe calls.
///
/// # Safety
/// Call only from a `pre_exec` hook.
pub unsafe fn apply_in_child(
    cgroup_fd: Option<i32>,
    rlimits: &[(Rlimit, u64)],
) -> std::io::Result<()> {
    if let Some(fd) = cgroup_fd {
        if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    for &(resource, v) in rlimits {
        let lim = libc::rlimit {
            rlim_cur: v,
            rlim_max: v,
        };
        let which = match resource {
            Rlimit::AddressSpace => libc::RLIMIT_AS,
            Rlimit::CpuSeconds => libc::RLIMIT_CPU,
        };
        if libc::setrlimit(which, &lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A limit set with `setrlimit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rlimit {
    /// `RLIMIT_AS`, bytes.
    AddressSpace,
    /// `RLIMIT_CPU`, seconds.
    CpuSeconds,
}

/// The rlimits for a job on the rlimit path: address space for memory,
/// CPU seconds for cores over the run's time limit (one second of slack).
pub fn rlimits(limits: &JobLimits, run_limit: std::time::Duration) -> Vec<(Rlimit, u64)> {
    let mut out = Vec::new();
    if let Some(m) = limits.memory_bytes {
        out.push((Rlimit::AddressSpace, m));
    }
    if let Some(c) = limits.cpu_millis {
        let secs = (run_limit.as_secs_f64() * c as f64 / 1000.0).ceil() as u64 + 1;
        out.push((Rlimit::CpuSeconds, secs));
    }
    out
}

/// What the tool's standard error says when an allocation failed under
/// `RLIMIT_AS` (Python, glibc, C++, Rust, shells).
const ALLOC_FAILED: &[&str] = &[
    "memoryerror",
    "cannot allocate memory",
    "out of memory",
    "bad_alloc",
    "memory allocation of",
    "memory exhausted",
    "xmalloc",
];

/// A run that ended over its limit, as a `resource_limit` failure: the
/// cgroup's OOM kill, `SIGXCPU`, or a failed allocation under `RLIMIT_AS`.
pub fn over_limit(
    limits: &JobLimits,
    oom_killed: bool,
    signal: Option<i32>,
    tail: &[String],
) -> Option<Failure> {
    let mem = limits.memory_bytes.map(|b| format!("{} MiB", b >> 20));
    let failure = |message: String| Failure {
        class: FailureClass::ResourceLimit,
        message,
        exit_code: None,
        signal,
    };
    if let (true, Some(m)) = (oom_killed, &mem) {
        return Some(failure(format!(
            "resource-limit: the job used more than its memory limit ({m}) and was killed by the kernel's OOM killer; ask for more memory (limits.memory) or use a smaller input"
        )));
    }
    if signal == Some(libc::SIGXCPU) {
        return Some(failure(format!(
            "resource-limit: the job used all the CPU time its limit allows ({} cores over its timeout): killed by SIGXCPU",
            limits.cpu_millis.unwrap_or(0) as f64 / 1000.0
        )));
    }
    let said = |l: &String| {
        let l = l.to_ascii_lowercase();
        ALLOC_FAILED.iter().any(|p| l.contains(p))
    };
    match mem {
        Some(m) if tail.iter().any(said) => Some(failure(format!(
            "resource-limit: the job could not allocate past its memory limit ({m}); ask for more memory (limits.memory) or use a smaller input"
        ))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_to_thousandths_and_bytes() {
        assert_eq!(parse_cpu("1.5"), Ok(1500));
        assert_eq!(parse_cpu("0.25"), Ok(250));
        assert!(parse_cpu("0").is_err());
        assert!(parse_cpu("lots").is_err());
        assert_eq!(parse_memory("512MiB"), Ok(512 << 20));
        assert_eq!(parse_memory("1GiB"), Ok(1 << 30));
        assert_eq!(parse_memory("300M"), Ok(300_000_000));
        assert_eq!(parse_memory("2097152"), Ok(2 << 20));
        assert!(parse_memory("12 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_memory("10KiB").unwrap_err().contains("under 1MiB"));
    }

    fn bounds(yaml: &str) -> Result<Bounds, Vec<(String, String)>> {
        serde_yaml::from_str::<LimitsConfig>(yaml).unwrap().bounds()
    }

    #[test]
    fn a_job_may_ask_for_up_to_the_maximum_and_is_told_it() {
        let b = bounds("{cpu: \"1.5\", memory: 512MiB, max_memory: 1GiB}").unwrap();
        assert_eq!(b.resolve(None).unwrap().memory_bytes, Some(512 << 20));
        let req = |y: &str| serde_yaml::from_str::<LimitsRequest>(y).unwrap();
        let got = b.resolve(Some(&req("{memory: 1GiB, cpu: 0.5}"))).unwrap();
        assert_eq!(got.memory_bytes, Some(1 << 30));
        assert_eq!(got.cpu_millis, Some(500));
        let err = b.resolve(Some(&req("{memory: 2GiB}"))).unwrap_err();
        assert!(
            err.contains("maximum of 1024 MiB") && err.contains("max_memory"),
            "{err}"
        );
        let err = b.resolve(Some(&req("{cpu: 2}"))).unwrap_err();
        assert!(err.contains("maximum of 1.5 cores"), "{err}");
    }

    #[test]
    fn bad_limits_name_the_field() {
        let p = bounds("{cpu: \"many\", memory: 1GiB, max_memory: 512MiB}").unwrap_err();
        let fields: Vec<&str> = p.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["exec.limits.cpu", "exec.limits.memory"], "{p:?}");
    }

    #[test]
    fn over_limit_is_told_from_the_kernel_the_signal_or_the_tool() {
        let lim = JobLimits {
            cpu_millis: Some(1000),
            memory_bytes: Some(64 << 20),
        };
        let oom = over_limit(&lim, true, Some(libc::SIGKILL), &[]).unwrap();
        assert_eq!(oom.class, FailureClass::ResourceLimit);
        assert!(oom.message.contains("64 MiB"), "{}", oom.message);
        assert!(over_limit(&lim, false, Some(libc::SIGXCPU), &[]).is_some());
        let tail = vec!["MemoryError".to_string()];
        assert!(over_limit(&lim, false, None, &tail).is_some());
        assert!(over_limit(&lim, false, None, &["bad codec".into()]).is_none());
        let none = JobLimits::default();
        assert!(
            over_limit(&none, false, None, &tail).is_none(),
            "no limit set"
        );
    }

    #[test]
    fn rlimits_cover_memory_and_cpu_time_over_the_timeout() {
        let lim = JobLimits {
            cpu_millis: Some(1500),
            memory_bytes: Some(256 << 20),
        };
        let r = rlimits(&lim, std::time::Duration::from_secs(10));
        assert_eq!(
            r,
            [(Rlimit::AddressSpace, 256 << 20), (Rlimit::CpuSeconds, 16)]
        );
    }
}
