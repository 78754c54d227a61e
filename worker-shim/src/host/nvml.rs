//! NVIDIA GPUs through NVML.
//!
//! `nvml-wrapper` dlopens `libnvidia-ml.so.1` at run time, so the shim builds
//! and runs on hosts without a driver: detection then reports
//! [`GpuState::None`] with the cause and the fix. One [`Gpus`] handle keeps
//! the loaded library for later metrics ([`Gpus::stats`]) and energy
//! counters ([`Gpus::energy_counters`]). A failing per-device call only
//! empties that field.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use nvml_wrapper::enum_wrappers::device::EncoderType;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};
use serde::{Deserialize, Serialize};

use super::energy::{EnergyCounter, PowerIntegrator};

/// The GPUs of this host, as JSON `{"state":"none","reason":..}` or
/// `{"state":"present","driver_version":..,"devices":[..]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum GpuState {
    /// No usable GPU; `reason` names the cause and the fix.
    None { reason: String },
    Present {
        /// NVIDIA driver version, e.g. `550.54.15`.
        driver_version: Option<String>,
        /// At least one, ordered by NVML index.
        devices: Vec<GpuInfo>,
    },
}

impl GpuState {
    /// The devices when present, else an empty slice.
    pub fn devices(&self) -> &[GpuInfo] {
        match self {
            GpuState::Present { devices, .. } => devices,
            GpuState::None { .. } => &[],
        }
    }
}

/// One GPU at detection time. `None`/`false` where NVML could not tell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// NVML index (the `gpuN` device pool).
    pub index: u32,
    pub uuid: Option<String>,
    /// Product name, e.g. `NVIDIA L4`.
    pub name: Option<String>,
    pub memory_total_bytes: Option<u64>,
    pub memory_used_bytes: Option<u64>,
    /// GPU (SM) utilization over NVML's last sample period.
    pub utilization_percent: Option<u32>,
    /// Has a hardware encoder: H.264 encoder capacity > 0, or (when the
    /// capacity query fails) the encoder utilization query works.
    pub nvenc: bool,
    /// Encoder sessions open now.
    pub nvenc_sessions: Option<u32>,
    /// `total_energy_consumption` works (Volta and later).
    pub energy_counter: bool,
    /// Board power draw now.
    pub power_watts: Option<f64>,
}

/// Live numbers for metrics, per device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuStats {
    pub index: u32,
    pub utilization_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
}

/// The loaded NVML library and the indices of the GPUs found at detection.
/// Cheap to clone; without NVML every method returns nothing.
#[derive(Clone, Default)]
pub struct Gpus {
    nvml: Option<Arc<Nvml>>,
    indices: Vec<u32>,
}

impl fmt::Debug for Gpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gpus")
            .field("nvml", &self.nvml.is_some())
            .field("indices", &self.indices)
            .finish()
    }
}

/// Why NVML is unusable, with the fix, for an error of `stage` (`"init"`,
/// `"device count"`).
pub fn failure_reason(stage: &str, err: &NvmlError) -> String {
    const NOT_FOUND: &str = "NVIDIA driver library not found (libnvidia-ml.so.1): no NVIDIA \
        driver on this host; install the NVIDIA driver, or in a container run with the NVIDIA \
        container toolkit (docker --gpus all, Kubernetes runtimeClassName: nvidia)";
    match err {
        NvmlError::LibloadingError(e) => {
            let msg = e.to_string();
            if msg.contains("No such file") {
                NOT_FOUND.to_string()
            } else {
                format!(
                    "libnvidia-ml.so.1 could not be loaded ({msg}): reinstall the NVIDIA driver"
                )
            }
        }
        NvmlError::LibraryNotFound => NOT_FOUND.to_string(),
        NvmlError::FailedToLoadSymbol(_) | NvmlError::FunctionNotFound => format!(
            "libnvidia-ml.so.1 lacks an NVML function ({err}): the NVIDIA driver is too old, \
             upgrade it"
        ),
        NvmlError::DriverNotLoaded => "libnvidia-ml.so.1 is installed but the NVIDIA kernel \
            driver is not loaded: load it (modprobe nvidia) and check dmesg for NVRM errors"
            .to_string(),
        NvmlError::NoPermission => "NVML has no permission to talk to the NVIDIA driver: give \
            the shim access to /dev/nvidiactl and /dev/nvidia*"
            .to_string(),
        NvmlError::LibRmVersionMismatch => "NVML library and NVIDIA kernel driver versions \
            differ (driver upgraded without reboot): reboot or reload the nvidia kernel modules"
            .to_string(),
        NvmlError::InsufficientPower => "a GPU's external power cables are not properly \
            attached: check its power connectors"
            .to_string(),
        NvmlError::GpuLost => {
            "a GPU fell off the bus: check dmesg (Xid 79) and reboot the host".to_string()
        }
        NvmlError::IrqIssue => "the NVIDIA kernel driver reports an interrupt problem with a \
            GPU: check dmesg and reboot the host"
            .to_string(),
        other => format!("NVML {stage} failed: {other}; compare with nvidia-smi on this host"),
    }
}

fn none(reason: String) -> (GpuState, Gpus) {
    (GpuState::None { reason }, Gpus::default())
}

impl Gpus {
    /// Load NVML (unless `enabled` is false) and describe every GPU.
    pub fn detect(enabled: bool) -> (GpuState, Gpus) {
        if !enabled {
            return none("NVML disabled by configuration: GPUs not probed".to_string());
        }
        Gpus::from_init(Nvml::init())
    }

    /// Describe the GPUs behind an NVML initialisation result.
    pub fn from_init(init: Result<Nvml, NvmlError>) -> (GpuState, Gpus) {
        let nvml = match init {
            Ok(nvml) => nvml,
            Err(e) => return none(failure_reason("init", &e)),
        };
        let count = match nvml.device_count() {
            Ok(n) => n,
            Err(e) => return none(failure_reason("device count", &e)),
        };
        if count == 0 {
            return none(
                "NVML loaded but reports 0 GPUs: none installed, or hidden from this \
                 container (NVIDIA_VISIBLE_DEVICES / --gpus)"
                    .to_string(),
            );
        }
        let mut devices = Vec::new();
        let mut last_err = None;
        for index in 0..count {
            match nvml.device_by_index(index) {
                Ok(device) => devices.push(describe(index, &device)),
                Err(e) => {
                    tracing::warn!(index, error = %e, "NVML cannot open GPU; leaving it out");
                    last_err = Some(e);
                }
            }
        }
        if devices.is_empty() {
            let why = last_err.map_or_else(String::new, |e| failure_reason("device open", &e));
            return none(format!(
                "NVML reports {count} GPUs but none could be opened: {why}"
            ));
        }
        let driver_version = nvml.sys_driver_version().ok();
        let indices = devices.iter().map(|d| d.index).collect();
        let state = GpuState::Present {
            driver_version,
            devices,
        };
        let gpus = Gpus {
            nvml: Some(Arc::new(nvml)),
            indices,
        };
        (state, gpus)
    }

    /// Indices of the GPUs found at detection.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// Current utilization and memory of every detected GPU (fields are
    /// `None` where the call fails now).
    pub fn stats(&self) -> Vec<GpuStats> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        self.indices
            .iter()
            .map(|&index| {
                let device = nvml.device_by_index(index).ok();
                let memory = device.as_ref().and_then(|d| d.memory_info().ok());
                GpuStats {
                    index,
                    utilization_percent: device
                        .as_ref()
                        .and_then(|d| d.utilization_rates().ok())
                        .map(|u| u.gpu),
                    memory_used_bytes: memory.as_ref().map(|m| m.used),
                    memory_total_bytes: memory.as_ref().map(|m| m.total),
                }
            })
            .collect()
    }

    /// An energy counter per GPU: NVML's cumulative energy when the device
    /// has it, else its power draw integrated over time, else none.
    pub fn energy_counters(&self) -> BTreeMap<u32, Box<dyn EnergyCounter>> {
        let mut counters: BTreeMap<u32, Box<dyn EnergyCounter>> = BTreeMap::new();
        let Some(nvml) = &self.nvml else {
            return counters;
        };
        for &index in &self.indices {
            let Ok(device) = nvml.device_by_index(index) else {
                continue;
            };
            let counter = NvmlEnergyCounter {
                nvml: nvml.clone(),
                index,
            };
            if device.total_energy_consumption().is_ok() {
                counters.insert(index, Box::new(counter));
            } else if device.power_usage().is_ok() {
                counters.insert(
                    index,
                    Box::new(PowerIntegrator::new(move || counter.read_watts())),
                );
            }
        }
        counters
    }
}

fn describe(index: u32, d: &Device<'_>) -> GpuInfo {
    let memory = d.memory_info().ok();
    GpuInfo {
        index,
        uuid: d.uuid().ok(),
        name: d.name().ok(),
        memory_total_bytes: memory.as_ref().map(|m| m.total),
        memory_used_bytes: memory.as_ref().map(|m| m.used),
        utilization_percent: d.utilization_rates().ok().map(|u| u.gpu),
        nvenc: match d.encoder_capacity(EncoderType::H264) {
            Ok(capacity) => capacity > 0,
            Err(_) => d.encoder_utilization().is_ok(),
        },
        nvenc_sessions: d.encoder_stats().ok().map(|s| s.session_count),
        energy_counter: d.total_energy_consumption().is_ok(),
        power_watts: d.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
    }
}

/// NVML's `total_energy_consumption` (millijoules since the driver loaded)
/// of one GPU. It restarts from 0 when the driver reloads; the accountant
/// treats that backwards step as unmeasured.
pub struct NvmlEnergyCounter {
    nvml: Arc<Nvml>,
    index: u32,
}

impl NvmlEnergyCounter {
    fn device(&self) -> Result<Device<'_>, String> {
        self.nvml
            .device_by_index(self.index)
            .map_err(|e| format!("GPU {}: {e}", self.index))
    }

    fn read_watts(&self) -> Result<f64, String> {
        let mw = self
            .device()?
            .power_usage()
            .map_err(|e| format!("GPU {} power_usage: {e}", self.index))?;
        Ok(f64::from(mw) / 1000.0)
    }
}

impl EnergyCounter for NvmlEnergyCounter {
    fn read_joules(&self) -> Result<f64, String> {
        let mj = self
            .device()?
            .total_energy_consumption()
            .map_err(|e| format!("GPU {} total_energy_consumption: {e}", self.index))?;
        Ok(mj as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn a_missing_library_says_no_driver_and_how_to_fix() {
        let init = Nvml::builder()
            .lib_path(OsStr::new("/nonexistent/libnvidia-ml.so.1"))
            .init();
        let (state, gpus) = Gpus::from_init(init);
        let GpuState::None { reason } = &state else {
            panic!("expected none: {state:?}");
        };
        assert!(
            reason.starts_with(
                "NVIDIA driver library not found (libnvidia-ml.so.1): no NVIDIA driver on this host"
            ),
            "{reason}"
        );
        assert!(reason.contains("install the NVIDIA driver"), "{reason}");
        assert!(gpus.stats().is_empty());
        assert!(gpus.energy_counters().is_empty());
        let v = serde_json::to_value(&state).unwrap();
        assert_eq!(v["state"], "none");
        assert_eq!(v["reason"], reason.as_str());
    }

    #[test]
    fn a_library_without_nvml_symbols_says_the_driver_is_too_old() {
        let init = Nvml::builder().lib_path(OsStr::new("libc.so.6")).init();
        let (GpuState::None { reason }, _) = Gpus::from_init(init) else {
            panic!("libc is not NVML");
        };
        assert!(reason.contains("lacks an NVML function"), "{reason}");
        assert!(reason.contains("upgrade"), "{reason}");
    }

    #[test]
    fn a_file_that_is_not_a_library_is_reported_with_the_loader_error() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("libnvidia-ml.so.1");
        std::fs::write(&fake, b"not an ELF file").unwrap();
        let init = Nvml::builder().lib_path(fake.as_os_str()).init();
        let (GpuState::None { reason }, _) = Gpus::from_init(init) else {
            panic!("garbage is not NVML");
        };
        assert!(
            reason.starts_with("libnvidia-ml.so.1 could not be loaded ("),
            "{reason}"
        );
    }

    #[test]
    fn driver_errors_name_cause_and_fix() {
        let r = failure_reason("init", &NvmlError::DriverNotLoaded);
        assert!(r.contains("kernel driver is not loaded") && r.contains("modprobe nvidia"));
        let r = failure_reason("init", &NvmlError::LibRmVersionMismatch);
        assert!(r.contains("reboot"));
        let r = failure_reason("init", &NvmlError::NoPermission);
        assert!(r.contains("/dev/nvidiactl"));
        let r = failure_reason("device count", &NvmlError::Unknown);
        assert!(r.starts_with("NVML device count failed: "), "{r}");
    }

    #[test]
    fn disabled_nvml_is_not_even_loaded() {
        let (state, gpus) = Gpus::detect(false);
        assert_eq!(
            state,
            GpuState::None {
                reason: "NVML disabled by configuration: GPUs not probed".into()
            }
        );
        assert!(gpus.nvml.is_none() && gpus.indices().is_empty());
    }

    #[test]
    fn real_detection_is_consistent_on_any_host() {
        // No GPU on CI: none with a reason; on a GPU host: present.
        let (state, gpus) = Gpus::detect(true);
        match &state {
            GpuState::None { reason } => {
                assert!(!reason.is_empty());
                assert!(gpus.nvml.is_none());
                assert!(gpus.stats().is_empty());
            }
            GpuState::Present { devices, .. } => {
                assert!(!devices.is_empty());
                let stats = gpus.stats();
                assert_eq!(stats.len(), devices.len());
                for (s, d) in stats.iter().zip(devices) {
                    assert_eq!(s.index, d.index);
                    assert_eq!(s.memory_total_bytes, d.memory_total_bytes);
                }
                let counters = gpus.energy_counters();
                for d in devices {
                    if d.energy_counter || d.power_watts.is_some() {
                        assert!(counters[&d.index].read_joules().unwrap() >= 0.0);
                    }
                }
            }
        }
    }

    #[test]
    fn present_state_serialises_with_its_tag() {
        let state = GpuState::Present {
            driver_version: Some("550.54.15".into()),
            devices: vec![GpuInfo {
                index: 0,
                uuid: Some("GPU-1234".into()),
                name: Some("NVIDIA L4".into()),
                memory_total_bytes: Some(24 << 30),
                memory_used_bytes: None,
                utilization_percent: Some(3),
                nvenc: true,
                nvenc_sessions: Some(0),
                energy_counter: true,
                power_watts: Some(16.5),
            }],
        };
        let v = serde_json::to_value(&state).unwrap();
        assert_eq!(v["state"], "present");
        assert_eq!(v["driver_version"], "550.54.15");
        assert_eq!(v["devices"][0]["name"], "NVIDIA L4");
        assert_eq!(
            v["devices"][0]["memory_used_bytes"],
            serde_json::Value::Null
        );
        assert_eq!(v["devices"][0]["nvenc"], true);
        assert_eq!(serde_json::from_value::<GpuState>(v).unwrap(), state);
        assert_eq!(state.devices().len(), 1);
    }
}
