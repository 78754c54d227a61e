//! CPU package energy from the Linux powercap interface (Intel RAPL, and AMD
//! through the same driver).
//!
//! Only package domains are used: directories `intel-rapl:N` (or `amd-rapl:N`)
//! directly under the powercap root, with exactly one colon, whose `name` file
//! starts with `package` (`package-0`, ...). Sub-zones (`intel-rapl:0:0`,
//! core/uncore/dram) are inside the package already, `psys` covers the whole
//! platform (package included) and `intel-rapl-mmio:N` duplicates the package
//! through another interface: summing any of them with the packages would
//! count energy twice.
//!
//! `energy_uj` is a cumulative microjoule counter that wraps at
//! `max_energy_range_uj`; [`RaplCounter`] turns the packages into one
//! wrap-safe cumulative reading.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::energy::EnergyCounter;

/// Whether this host can measure CPU package energy, and why not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RaplState {
    /// Every listed package domain's counter was readable at detection.
    Available { domains: Vec<RaplDomain> },
    /// No usable package counter; `reason` names the cause and the fix.
    Unavailable { reason: String },
}

/// One package domain (`intel-rapl:0`, name `package-0`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RaplDomain {
    /// Content of the domain's `name` file, e.g. `package-0`.
    pub name: String,
    /// The domain directory, e.g. `/sys/class/powercap/intel-rapl:0`.
    pub path: PathBuf,
    /// Where `energy_uj` wraps back to 0.
    pub max_energy_range_uj: u64,
}

impl RaplState {
    /// The package domains when available, else an empty slice.
    pub fn domains(&self) -> &[RaplDomain] {
        match self {
            RaplState::Available { domains } => domains,
            RaplState::Unavailable { .. } => &[],
        }
    }
}

/// The package index of a directory name `intel-rapl:N` / `amd-rapl:N`
/// (exactly one colon), else `None`.
fn package_index(dir_name: &str) -> Option<u32> {
    let (prefix, n) = dir_name.split_once(':')?;
    if prefix != "intel-rapl" && prefix != "amd-rapl" {
        return None;
    }
    n.parse().ok()
}

/// The reason given when `file` cannot be read.
pub fn unreadable_reason(file: &Path, err: &io::Error) -> String {
    if err.kind() == io::ErrorKind::PermissionDenied {
        format!(
            "{} not readable: permission denied (root only since Linux 5.10; run as root or chmod)",
            file.display()
        )
    } else {
        format!("{} not readable: {err}", file.display())
    }
}

/// Read a sysfs file holding one unsigned integer; the error is the
/// human-readable reason.
fn read_u64(file: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(file).map_err(|e| unreadable_reason(file, &e))?;
    text.trim()
        .parse()
        .map_err(|_| format!("{}: not a number: {:?}", file.display(), text.trim()))
}

/// Read a domain's `energy_uj` (microjoules, cumulative, wrapping).
pub fn read_energy_uj(domain_path: &Path) -> Result<u64, String> {
    read_u64(&domain_path.join("energy_uj"))
}

/// Energy between two raw readings of a counter that wraps at `max`:
/// `cur - prev`, or `max - prev + cur` when it wrapped.
pub fn wrapping_delta(prev: u64, cur: u64, max: u64) -> u64 {
    if cur >= prev {
        cur - prev
    } else {
        max.saturating_sub(prev).saturating_add(cur)
    }
}

/// Find the package domains under `powercap_root` and check that their
/// counters are readable now.
pub fn discover(powercap_root: &Path) -> RaplState {
    let unavailable = |reason: String| RaplState::Unavailable { reason };
    let entries = match std::fs::read_dir(powercap_root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return unavailable(format!(
                "no {} (kernel without powercap or not Intel/AMD RAPL)",
                powercap_root.display()
            ))
        }
        Err(e) => return unavailable(unreadable_reason(powercap_root, &e)),
    };
    let mut found: Vec<(u32, String, PathBuf)> = Vec::new();
    for entry in entries.flatten() {
        let dir_name = entry.file_name().to_string_lossy().into_owned();
        let Some(index) = package_index(&dir_name) else {
            continue;
        };
        let path = entry.path();
        let Ok(name) = std::fs::read_to_string(path.join("name")) else {
            continue;
        };
        let name = name.trim().to_string();
        if name.starts_with("package") {
            found.push((index, name, path));
        }
    }
    if found.is_empty() {
        return unavailable(format!(
            "{} has no intel-rapl:N package domain (powercap without the RAPL driver: \
             modprobe intel_rapl_msr, or a virtual machine that hides RAPL)",
            powercap_root.display()
        ));
    }
    found.sort();
    let mut domains = Vec::with_capacity(found.len());
    for (_, name, path) in found {
        // A partial sum would be attributed as if it were the whole CPU.
        if let Err(reason) = read_energy_uj(&path) {
            return unavailable(reason);
        }
        let max_energy_range_uj = match read_u64(&path.join("max_energy_range_uj")) {
            Ok(max) => max,
            Err(reason) => return unavailable(reason),
        };
        domains.push(RaplDomain {
            name,
            path,
            max_energy_range_uj,
        });
    }
    RaplState::Available { domains }
}

/// Cumulative, wrap-safe energy of all package domains together, as an
/// [`EnergyCounter`]. The first read is the baseline (0 J); later reads add
/// each package's [`wrapping_delta`] since the previous successful read, so
/// it must be read at least once per wrap period (minutes to hours; the
/// accountant's sampler does it).
#[derive(Debug)]
pub struct RaplCounter {
    domains: Vec<RaplDomain>,
    state: Mutex<RaplCounterState>,
}

#[derive(Debug, Default)]
struct RaplCounterState {
    /// Raw `energy_uj` per domain at the previous successful read.
    last_raw: Option<Vec<u64>>,
    total_uj: u128,
}

impl RaplCounter {
    pub fn new(domains: Vec<RaplDomain>) -> RaplCounter {
        RaplCounter {
            domains,
            state: Mutex::new(RaplCounterState::default()),
        }
    }
}

impl EnergyCounter for RaplCounter {
    /// Joules since the first read. A failing domain fails the whole read
    /// and leaves the previous raw values in place.
    fn read_joules(&self) -> Result<f64, String> {
        if self.domains.is_empty() {
            return Err("no RAPL package domain".to_string());
        }
        let raw = self
            .domains
            .iter()
            .map(|d| read_energy_uj(&d.path))
            .collect::<Result<Vec<u64>, String>>()?;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(prev) = &state.last_raw {
            let added: u128 = self
                .domains
                .iter()
                .zip(prev.iter().zip(&raw))
                .map(|(d, (&p, &c))| u128::from(wrapping_delta(p, c, d.max_energy_range_uj)))
                .sum();
            state.total_uj += added;
        }
        state.last_raw = Some(raw);
        Ok(state.total_uj as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn domain(root: &Path, dir: &str, name: &str, energy: &str, max: &str) -> PathBuf {
        let p = root.join(dir);
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join("name"), format!("{name}\n")).unwrap();
        fs::write(p.join("energy_uj"), format!("{energy}\n")).unwrap();
        fs::write(p.join("max_energy_range_uj"), format!("{max}\n")).unwrap();
        p
    }

    #[test]
    fn discovers_only_package_domains_in_index_order() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir(root.join("intel-rapl")).unwrap(); // the control type
        domain(root, "intel-rapl:1", "package-1", "5", "1000");
        domain(root, "intel-rapl:0", "package-0", "7", "2000");
        domain(root, "intel-rapl:0:0", "core", "1", "1000");
        domain(root, "intel-rapl:2", "psys", "1", "1000");
        domain(root, "intel-rapl-mmio:0", "package-0", "1", "1000");
        let RaplState::Available { domains } = discover(root) else {
            panic!("expected available: {:?}", discover(root));
        };
        let names: Vec<_> = domains.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["package-0", "package-1"]);
        assert_eq!(domains[0].path, root.join("intel-rapl:0"));
        assert_eq!(domains[0].max_energy_range_uj, 2000);
        assert_eq!(domains[1].max_energy_range_uj, 1000);
        let v = serde_json::to_value(discover(root)).unwrap();
        assert_eq!(v["state"], "available");
        assert_eq!(v["domains"][0]["name"], "package-0");
        assert_eq!(v["domains"][1]["max_energy_range_uj"], 1000);
    }

    #[test]
    fn amd_rapl_domains_are_accepted() {
        let t = tempfile::tempdir().unwrap();
        domain(t.path(), "amd-rapl:0", "package-0", "1", "1000");
        assert_eq!(discover(t.path()).domains().len(), 1);
    }

    #[test]
    fn missing_root_and_missing_packages_are_specific_reasons() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("powercap");
        let RaplState::Unavailable { reason } = discover(&missing) else {
            panic!("expected unavailable");
        };
        assert_eq!(
            reason,
            format!(
                "no {} (kernel without powercap or not Intel/AMD RAPL)",
                missing.display()
            )
        );
        let v = serde_json::to_value(discover(&missing)).unwrap();
        assert_eq!(v["state"], "unavailable");
        assert_eq!(v["reason"], reason);

        fs::create_dir(&missing).unwrap();
        domain(&missing, "intel-rapl:0:0", "core", "1", "1000");
        let RaplState::Unavailable { reason } = discover(&missing) else {
            panic!("expected unavailable");
        };
        assert!(
            reason.contains("no intel-rapl:N package domain"),
            "{reason}"
        );
    }

    #[test]
    fn unreadable_or_missing_counter_files_make_rapl_unavailable() {
        let t = tempfile::tempdir().unwrap();
        let p = domain(t.path(), "intel-rapl:0", "package-0", "1", "1000");
        fs::remove_file(p.join("max_energy_range_uj")).unwrap();
        let RaplState::Unavailable { reason } = discover(t.path()) else {
            panic!("expected unavailable");
        };
        assert!(
            reason.starts_with(&format!(
                "{}/max_energy_range_uj not readable:",
                p.display()
            )),
            "{reason}"
        );

        fs::write(p.join("max_energy_range_uj"), "1000").unwrap();
        fs::write(p.join("energy_uj"), "garbage").unwrap();
        let RaplState::Unavailable { reason } = discover(t.path()) else {
            panic!("expected unavailable");
        };
        assert!(reason.contains("energy_uj: not a number"), "{reason}");

        fs::remove_file(p.join("energy_uj")).unwrap();
        assert!(matches!(discover(t.path()), RaplState::Unavailable { .. }));
    }

    #[test]
    fn permission_denied_names_the_kernel_change_and_the_fix() {
        let file = Path::new("/sys/class/powercap/intel-rapl:0/energy_uj");
        let err = io::Error::from(io::ErrorKind::PermissionDenied);
        assert_eq!(
            unreadable_reason(file, &err),
            "/sys/class/powercap/intel-rapl:0/energy_uj not readable: permission denied \
             (root only since Linux 5.10; run as root or chmod)"
        );
    }

    #[test]
    fn permission_denied_on_the_real_file_when_not_root() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let p = domain(t.path(), "intel-rapl:0", "package-0", "1", "1000");
        let f = p.join("energy_uj");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o000)).unwrap();
        let state = discover(t.path());
        if fs::read(&f).is_ok() {
            // Running as root (or with CAP_DAC_OVERRIDE): mode 000 does not
            // stop the read, so the domain is available.
            assert_eq!(state.domains().len(), 1);
        } else {
            let RaplState::Unavailable { reason } = state else {
                panic!("expected unavailable");
            };
            assert!(reason.contains("permission denied (root only since Linux 5.10"));
        }
    }

    #[test]
    fn wrapping_delta_handles_wraparound() {
        assert_eq!(wrapping_delta(100, 250, 1000), 150);
        assert_eq!(wrapping_delta(900, 50, 1000), 150);
        assert_eq!(wrapping_delta(5, 5, 1000), 0);
        // A bogus previous value above max does not underflow.
        assert_eq!(wrapping_delta(2000, 5, 1000), 5);
    }

    #[test]
    fn counter_sums_packages_and_survives_wraparound() {
        let t = tempfile::tempdir().unwrap();
        let p0 = domain(t.path(), "intel-rapl:0", "package-0", "900000", "1000000");
        let p1 = domain(t.path(), "intel-rapl:1", "package-1", "100", "10000000");
        let counter = RaplCounter::new(discover(t.path()).domains().to_vec());
        assert_eq!(counter.read_joules().unwrap(), 0.0);
        // Package 0 wraps: 900000 -> 1000000 -> 50000 is 150000 uJ.
        fs::write(p0.join("energy_uj"), "50000").unwrap();
        fs::write(p1.join("energy_uj"), "2000100").unwrap();
        // Package 1 does not wrap: +2 J.
        assert!((counter.read_joules().unwrap() - 2.15).abs() < 1e-9);
        fs::write(p0.join("energy_uj"), "1050000").unwrap();
        assert!((counter.read_joules().unwrap() - 3.15).abs() < 1e-9);
    }

    #[test]
    fn counter_read_fails_when_a_file_disappears_and_keeps_its_baseline() {
        let t = tempfile::tempdir().unwrap();
        let p0 = domain(t.path(), "intel-rapl:0", "package-0", "1000000", "10000000");
        let counter = RaplCounter::new(discover(t.path()).domains().to_vec());
        assert_eq!(counter.read_joules().unwrap(), 0.0);
        fs::remove_file(p0.join("energy_uj")).unwrap();
        let err = counter.read_joules().unwrap_err();
        assert!(err.contains("energy_uj not readable"), "{err}");
        fs::write(p0.join("energy_uj"), "3000000").unwrap();
        assert!((counter.read_joules().unwrap() - 2.0).abs() < 1e-9);
        assert!(RaplCounter::new(Vec::new()).read_joules().is_err());
    }
}
