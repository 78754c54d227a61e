//! What this host is: CPU, memory, GPUs (NVML), CPU energy counters (RAPL);
//! the labels the shim registers with; and per-job energy attribution.
//!
//! [`detect`] returns both the serialisable [`HostInfo`] (what
//! `crank-shim host --json` prints) and a [`HostProbe`] that keeps the NVML
//! handle and RAPL domains for later metrics ([`HostProbe::gpu_stats`]) and
//! energy counters ([`HostProbe::energy_sources`], fed to
//! [`energy::EnergyAccountant`]).

pub mod energy;
pub mod nvml;
pub mod rapl;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use energy::{EnergyAccountant, EnergyCounter, EnergySources};
pub use nvml::{GpuInfo, GpuState, GpuStats, Gpus};
pub use rapl::{RaplDomain, RaplState};

/// Where to look, and whether to load NVML at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostOptions {
    /// Default `/sys/class/powercap`.
    pub powercap_root: PathBuf,
    /// Default `/proc` (`cpuinfo`, `meminfo`).
    pub proc_root: PathBuf,
    /// `false`: do not even try to load NVML (GPU state is none).
    pub nvml: bool,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            powercap_root: PathBuf::from("/sys/class/powercap"),
            proc_root: PathBuf::from("/proc"),
            nvml: true,
        }
    }
}

/// Everything detected about this host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub hostname: String,
    pub cpu: CpuInfo,
    pub memory: MemoryInfo,
    pub gpu: GpuState,
    pub rapl: RaplState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// CPUs this process may use (`std::thread::available_parallelism`,
    /// which honours affinity and cgroup quotas); 1 if unknown.
    pub cores: usize,
    /// The first `model name` of `cpuinfo` (absent on most ARM kernels).
    pub model: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// `MemTotal` of `meminfo`.
    pub total_bytes: Option<u64>,
    /// `MemAvailable` of `meminfo`.
    pub available_bytes: Option<u64>,
}

/// The live handles behind a [`HostInfo`]: the NVML library (when loaded)
/// and the RAPL package domains (when readable). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct HostProbe {
    gpus: Gpus,
    rapl: Vec<RaplDomain>,
}

impl HostProbe {
    /// Utilization and memory per detected GPU now; empty without NVML.
    pub fn gpu_stats(&self) -> Vec<GpuStats> {
        self.gpus.stats()
    }

    /// Fresh energy counters: RAPL packages (summed, wrap-safe) when they
    /// were readable at detection, and one counter per GPU that has an
    /// energy counter or a power reading.
    pub fn energy_sources(&self) -> EnergySources {
        EnergySources {
            cpu_package: if self.rapl.is_empty() {
                None
            } else {
                Some(Box::new(rapl::RaplCounter::new(self.rapl.clone())))
            },
            gpus: self.gpus.energy_counters(),
        }
    }

    /// The GPU handle.
    pub fn gpus(&self) -> &Gpus {
        &self.gpus
    }
}

/// Detect the host. Never fails: what cannot be read is `None` or a
/// `none`/`unavailable` state with its reason.
pub fn detect(opts: &HostOptions) -> (HostInfo, HostProbe) {
    let cpu = CpuInfo {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        model: read(&opts.proc_root.join("cpuinfo")).and_then(|t| parse_cpu_model(&t)),
    };
    let memory = read(&opts.proc_root.join("meminfo"))
        .map(|t| parse_meminfo(&t))
        .unwrap_or(MemoryInfo {
            total_bytes: None,
            available_bytes: None,
        });
    let (gpu, gpus) = Gpus::detect(opts.nvml);
    let rapl = rapl::discover(&opts.powercap_root);
    let probe = HostProbe {
        gpus,
        rapl: rapl.domains().to_vec(),
    };
    let info = HostInfo {
        hostname: hostname(),
        cpu,
        memory,
        gpu,
        rapl,
    };
    (info, probe)
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The kernel's host name (`uname -n`), or `unknown`.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match String::from_utf8_lossy(&buf[..end]).trim() {
        "" => "unknown".to_string(),
        name => name.to_string(),
    }
}

/// The first `model name` value of a `cpuinfo` text.
pub fn parse_cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name")
            .then(|| value.trim().to_string())
            .filter(|v| !v.is_empty())
    })
}

/// `MemTotal` and `MemAvailable` (kB in the file) of a `meminfo` text, in
/// bytes.
pub fn parse_meminfo(meminfo: &str) -> MemoryInfo {
    let field = |name: &str| {
        meminfo.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            kb.checked_mul(1024)
        })
    };
    MemoryInfo {
        total_bytes: field("MemTotal"),
        available_bytes: field("MemAvailable"),
    }
}

/// Lowercase ASCII letters and digits, every other run of characters one
/// dash, none at the ends: `NVIDIA GeForce RTX 4090` → `nvidia-geforce-rtx-4090`.
pub fn slug(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// Registration labels:
///
/// * `gpu` = `nvidia` | `none`; `gpu.count` = number of GPUs (0 for none);
/// * `gpu.model` = slug of GPU 0's name (only with a GPU whose name is known);
/// * `nvenc` = `true` when any GPU has an encoder;
/// * `cpu.cores`;
/// * `energy.gpu` = `measured` when there is at least one GPU and every GPU
///   has an energy counter or a power reading, else `unmeasured`;
/// * `energy.cpu` = `measured` when RAPL is available, else `unmeasured`.
pub fn labels(info: &HostInfo) -> BTreeMap<String, String> {
    let devices = info.gpu.devices();
    let measured = |yes: bool| if yes { "measured" } else { "unmeasured" };
    let mut l = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        l.insert(k.to_string(), v);
    };
    put(
        "gpu",
        if devices.is_empty() { "none" } else { "nvidia" }.to_string(),
    );
    put("gpu.count", devices.len().to_string());
    if let Some(name) = devices.first().and_then(|d| d.name.as_deref()) {
        put("gpu.model", slug(name));
    }
    put("nvenc", devices.iter().any(|d| d.nvenc).to_string());
    put("cpu.cores", info.cpu.cores.to_string());
    let gpu_measured = !devices.is_empty()
        && devices
            .iter()
            .all(|d| d.energy_counter || d.power_watts.is_some());
    put("energy.gpu", measured(gpu_measured).to_string());
    let cpu_measured = matches!(info.rapl, RaplState::Available { .. });
    put("energy.cpu", measured(cpu_measured).to_string());
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\n\
        model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz\n\nprocessor\t: 1\n\
        model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz\n";
    const MEMINFO: &str = "MemTotal:       16318432 kB\nMemFree:         1000000 kB\n\
        MemAvailable:   12000000 kB\nMemAvailableX:  1 kB\n";

    fn fake_host(root: &Path, rapl: bool) -> HostOptions {
        let proc_root = root.join("proc");
        fs::create_dir_all(&proc_root).unwrap();
        fs::write(proc_root.join("cpuinfo"), CPUINFO).unwrap();
        fs::write(proc_root.join("meminfo"), MEMINFO).unwrap();
        let powercap_root = root.join("powercap");
        if rapl {
            let d = powercap_root.join("intel-rapl:0");
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("name"), "package-0\n").unwrap();
            fs::write(d.join("energy_uj"), "1000\n").unwrap();
            fs::write(d.join("max_energy_range_uj"), "262143328850\n").unwrap();
        }
        HostOptions {
            powercap_root,
            proc_root,
            nvml: false,
        }
    }

    #[test]
    fn parses_cpuinfo_and_meminfo() {
        assert_eq!(
            parse_cpu_model(CPUINFO).as_deref(),
            Some("Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz")
        );
        assert_eq!(parse_cpu_model("processor : 0\nBogoMIPS : 50\n"), None);
        let m = parse_meminfo(MEMINFO);
        assert_eq!(m.total_bytes, Some(16318432 * 1024));
        assert_eq!(m.available_bytes, Some(12000000 * 1024));
        let m = parse_meminfo("MemTotal: lots\n");
        assert_eq!((m.total_bytes, m.available_bytes), (None, None));
    }

    #[test]
    fn detects_a_fake_host_without_gpu_but_with_rapl() {
        let t = tempfile::tempdir().unwrap();
        let opts = fake_host(t.path(), true);
        let (info, probe) = detect(&opts);
        assert!(!info.hostname.is_empty());
        assert_eq!(
            info.cpu.cores,
            std::thread::available_parallelism().unwrap().get()
        );
        assert_eq!(
            info.cpu.model.as_deref(),
            Some("Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz")
        );
        assert_eq!(info.memory.total_bytes, Some(16318432 * 1024));
        assert!(matches!(info.gpu, GpuState::None { .. }));
        assert_eq!(info.rapl.domains().len(), 1);
        assert!(probe.gpu_stats().is_empty());

        let sources = probe.energy_sources();
        assert!(sources.gpus.is_empty());
        let cpu = sources.cpu_package.expect("rapl counter");
        assert_eq!(cpu.read_joules().unwrap(), 0.0);
        fs::write(opts.powercap_root.join("intel-rapl:0/energy_uj"), "3001000").unwrap();
        assert!((cpu.read_joules().unwrap() - 3.0).abs() < 1e-9);

        let v = serde_json::to_value(&info).unwrap();
        assert_eq!(v["gpu"]["state"], "none");
        assert_eq!(v["rapl"]["state"], "available");
        assert_eq!(v["rapl"]["domains"][0]["name"], "package-0");
        assert_eq!(v["memory"]["available_bytes"], 12000000u64 * 1024);
        assert_eq!(serde_json::from_value::<HostInfo>(v).unwrap(), info);

        let l = labels(&info);
        assert_eq!(l["gpu"], "none");
        assert_eq!(l["gpu.count"], "0");
        assert!(!l.contains_key("gpu.model"));
        assert_eq!(l["nvenc"], "false");
        assert_eq!(l["cpu.cores"], info.cpu.cores.to_string());
        assert_eq!(l["energy.gpu"], "unmeasured");
        assert_eq!(l["energy.cpu"], "measured");
    }

    #[test]
    fn missing_proc_and_powercap_degrade_to_none() {
        let t = tempfile::tempdir().unwrap();
        let opts = HostOptions {
            powercap_root: t.path().join("no-powercap"),
            proc_root: t.path().join("no-proc"),
            nvml: false,
        };
        let (info, probe) = detect(&opts);
        assert_eq!(info.cpu.model, None);
        assert_eq!(info.memory.total_bytes, None);
        let RaplState::Unavailable { reason } = &info.rapl else {
            panic!("expected unavailable");
        };
        assert!(reason.contains("kernel without powercap"), "{reason}");
        assert!(probe.energy_sources().cpu_package.is_none());
        assert_eq!(labels(&info)["energy.cpu"], "unmeasured");
    }

    #[test]
    fn the_real_host_is_detected_without_panicking() {
        let (info, probe) = detect(&HostOptions::default());
        assert!(info.cpu.cores >= 1);
        assert_eq!(probe.gpu_stats().len(), info.gpu.devices().len());
        let l = labels(&info);
        assert_eq!(l["gpu.count"], info.gpu.devices().len().to_string());
    }

    fn gpu(index: u32, name: &str, nvenc: bool, energy: bool, power: Option<f64>) -> GpuInfo {
        GpuInfo {
            index,
            uuid: None,
            name: Some(name.to_string()),
            memory_total_bytes: Some(80 << 30),
            memory_used_bytes: Some(0),
            utilization_percent: Some(0),
            nvenc,
            nvenc_sessions: Some(0),
            energy_counter: energy,
            power_watts: power,
        }
    }

    #[test]
    fn labels_for_a_gpu_host() {
        let mut info = HostInfo {
            hostname: "h".into(),
            cpu: CpuInfo {
                cores: 16,
                model: None,
            },
            memory: MemoryInfo {
                total_bytes: None,
                available_bytes: None,
            },
            gpu: GpuState::Present {
                driver_version: None,
                devices: vec![
                    gpu(0, "NVIDIA H100 80GB HBM3", false, true, Some(70.0)),
                    gpu(1, "NVIDIA L4", true, false, Some(16.0)),
                ],
            },
            rapl: RaplState::Unavailable { reason: "x".into() },
        };
        let l = labels(&info);
        let expected: BTreeMap<String, String> = [
            ("gpu", "nvidia"),
            ("gpu.count", "2"),
            ("gpu.model", "nvidia-h100-80gb-hbm3"),
            ("nvenc", "true"),
            ("cpu.cores", "16"),
            ("energy.gpu", "measured"),
            ("energy.cpu", "unmeasured"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(l, expected);

        // One GPU that can measure nothing makes GPU energy unmeasured.
        info.gpu = GpuState::Present {
            driver_version: None,
            devices: vec![gpu(0, "Tesla K80", false, false, None)],
        };
        let l = labels(&info);
        assert_eq!(l["energy.gpu"], "unmeasured");
        assert_eq!(l["nvenc"], "false");
        assert_eq!(l["gpu.model"], "tesla-k80");
    }

    #[test]
    fn slug_is_lowercase_with_single_dashes() {
        assert_eq!(slug("NVIDIA GeForce RTX 4090"), "nvidia-geforce-rtx-4090");
        assert_eq!(
            slug("  NVIDIA A100-SXM4-40GB (MIG) "),
            "nvidia-a100-sxm4-40gb-mig"
        );
        assert_eq!(slug("Quadro RTX 6000/8000"), "quadro-rtx-6000-8000");
        assert_eq!(slug("--"), "");
    }
}
