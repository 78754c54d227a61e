//! Per-job energy attribution.
//!
//! The host has at most one CPU package counter (RAPL, all packages summed)
//! and one counter per GPU (NVML). Counters are cumulative; nothing measures
//! a single process, so energy is attributed by time sharing:
//!
//! * at every [`EnergyAccountant::start`], [`EnergyAccountant::finish`] and
//!   periodic [`EnergyAccountant::sample`], every counter is read;
//! * the delta since the previous reading is split equally among the jobs
//!   that were running during that interval: the CPU package delta among
//!   all running jobs, a GPU's delta among the jobs placed on that GPU index;
//!   energy spent while no job runs (idle) goes to nobody;
//! * a domain is [`Energy::UNMEASURED`] for a job (never 0) when the host has
//!   no counter for it, when a read failed or the counter went backwards
//!   (driver reload) during any interval the job ran in, and — for the GPU
//!   domain — when the job ran on the CPU only: "0 J of GPU energy" would
//!   claim a measurement that was never made.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::job::{Energy, JobEnergy};

/// A cumulative energy reading in joules that only goes up; an
/// implementation that wraps (RAPL) handles the wrap itself.
pub trait EnergyCounter: Send + Sync {
    /// Joules since an arbitrary origin fixed for this counter; the error
    /// says why the reading failed.
    fn read_joules(&self) -> Result<f64, String>;
}

/// The counters of one host, as [`crate::host::HostProbe::energy_sources`]
/// builds them.
#[derive(Default)]
pub struct EnergySources {
    /// All CPU packages together (RAPL), when readable.
    pub cpu_package: Option<Box<dyn EnergyCounter>>,
    /// Per GPU index (NVML), for the GPUs that have a counter.
    pub gpus: BTreeMap<u32, Box<dyn EnergyCounter>>,
}

impl fmt::Debug for EnergySources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnergySources")
            .field("cpu_package", &self.cpu_package.is_some())
            .field("gpus", &self.gpus.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// An [`EnergyCounter`] for a device that reports only its power draw:
/// integrates watts over (tokio) time, by the trapezoid rule between reads
/// (the first read after creation uses its own power for the whole span).
pub struct PowerIntegrator {
    read_watts: Box<dyn Fn() -> Result<f64, String> + Send + Sync>,
    state: Mutex<IntegratorState>,
}

struct IntegratorState {
    last: Instant,
    last_watts: Option<f64>,
    total_joules: f64,
}

impl PowerIntegrator {
    /// Starts integrating now; `read_watts` gives the current draw.
    pub fn new(read_watts: impl Fn() -> Result<f64, String> + Send + Sync + 'static) -> Self {
        PowerIntegrator {
            read_watts: Box::new(read_watts),
            state: Mutex::new(IntegratorState {
                last: Instant::now(),
                last_watts: None,
                total_joules: 0.0,
            }),
        }
    }
}

impl EnergyCounter for PowerIntegrator {
    fn read_joules(&self) -> Result<f64, String> {
        let watts = (self.read_watts)()?;
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mean = s.last_watts.map_or(watts, |prev| (prev + watts) / 2.0);
        s.total_joules += mean * now.duration_since(s.last).as_secs_f64();
        s.last = now;
        s.last_watts = Some(watts);
        Ok(s.total_joules)
    }
}

struct Domain {
    counter: Box<dyn EnergyCounter>,
    /// The previous good reading; `None` after a failure (and the interval
    /// up to the next good reading is then unmeasured).
    last: Option<f64>,
    /// Warned about the current run of failures already.
    warned: bool,
}

impl Domain {
    fn new(counter: Box<dyn EnergyCounter>, what: &str) -> Domain {
        let mut d = Domain {
            counter,
            last: None,
            warned: false,
        };
        d.read(what);
        d
    }

    /// Read the counter: `Some(delta)` since the previous good reading, or
    /// `None` when this interval cannot be measured.
    fn read(&mut self, what: &str) -> Option<f64> {
        let result = self.counter.read_joules().and_then(|now| match self.last {
            Some(prev) if now < prev => Err(format!(
                "counter went backwards ({prev} J -> {now} J; driver reloaded?)"
            )),
            _ => Ok(now),
        });
        match result {
            Ok(now) => {
                let delta = self.last.map(|prev| now - prev);
                self.last = Some(now);
                self.warned = false;
                delta
            }
            Err(e) => {
                if !self.warned {
                    tracing::warn!(
                        domain = what,
                        error = %e,
                        "energy counter read failed: jobs running now get unmeasured {what} energy"
                    );
                    self.warned = true;
                }
                self.last = None;
                None
            }
        }
    }
}

#[derive(Debug)]
struct JobAccount {
    gpu: Option<u32>,
    cpu_joules: f64,
    cpu_measured: bool,
    gpu_joules: f64,
    gpu_measured: bool,
}

struct Inner {
    cpu: Option<Domain>,
    gpus: BTreeMap<u32, Domain>,
    jobs: HashMap<String, JobAccount>,
}

impl Inner {
    fn sample(&mut self) {
        if let Some(cpu) = &mut self.cpu {
            let delta = cpu.read("cpu_package");
            let n = self.jobs.len();
            for job in self.jobs.values_mut() {
                match delta {
                    Some(d) => job.cpu_joules += d / n as f64,
                    None => job.cpu_measured = false,
                }
            }
        }
        for (&index, gpu) in &mut self.gpus {
            let delta = gpu.read("gpu");
            let n = self.jobs.values().filter(|j| j.gpu == Some(index)).count();
            for job in self.jobs.values_mut().filter(|j| j.gpu == Some(index)) {
                match delta {
                    Some(d) => job.gpu_joules += d / n as f64,
                    None => job.gpu_measured = false,
                }
            }
        }
    }
}

/// Attributes host energy to jobs (see the module docs for the rule).
/// Shared behind an `Arc`; every method takes a short internal lock and
/// reads the counters synchronously (sysfs reads, NVML calls).
pub struct EnergyAccountant {
    inner: Mutex<Inner>,
}

impl fmt::Debug for EnergyAccountant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("EnergyAccountant")
            .field("cpu_package", &inner.cpu.is_some())
            .field("gpus", &inner.gpus.keys().collect::<Vec<_>>())
            .field("running", &inner.jobs.len())
            .finish()
    }
}

impl EnergyAccountant {
    /// Takes the first (baseline) reading of every counter.
    pub fn new(sources: EnergySources) -> EnergyAccountant {
        let inner = Inner {
            cpu: sources.cpu_package.map(|c| Domain::new(c, "cpu_package")),
            gpus: sources
                .gpus
                .into_iter()
                .map(|(i, c)| (i, Domain::new(c, "gpu")))
                .collect(),
            jobs: HashMap::new(),
        };
        EnergyAccountant {
            inner: Mutex::new(inner),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A job starts running, on GPU `gpu` (its index) or on the CPU only
    /// (`None`). Energy before this call is not its own. Starting an id that
    /// is already running begins a fresh account for it (what it had
    /// accumulated is dropped).
    pub fn start(&self, job_id: &str, gpu: Option<u32>) {
        let mut inner = self.lock();
        inner.sample();
        let account = JobAccount {
            gpu,
            cpu_joules: 0.0,
            cpu_measured: true,
            gpu_joules: 0.0,
            gpu_measured: true,
        };
        inner.jobs.insert(job_id.to_string(), account);
    }

    /// The job stopped: samples, forgets it, and returns its share.
    /// `cpu_package` is joules when the host has a CPU counter and every
    /// read while the job ran succeeded; `gpu` likewise for the counter of
    /// the GPU it ran on, and [`Energy::UNMEASURED`] for a CPU-only job. An
    /// unknown id gets both unmeasured.
    pub fn finish(&self, job_id: &str) -> JobEnergy {
        let mut inner = self.lock();
        inner.sample();
        let Some(job) = inner.jobs.remove(job_id) else {
            return JobEnergy::default();
        };
        let cpu_package = if inner.cpu.is_some() && job.cpu_measured {
            Energy::Joules(job.cpu_joules)
        } else {
            Energy::UNMEASURED
        };
        let gpu = match job.gpu {
            Some(i) if inner.gpus.contains_key(&i) && job.gpu_measured => {
                Energy::Joules(job.gpu_joules)
            }
            _ => Energy::UNMEASURED,
        };
        JobEnergy { gpu, cpu_package }
    }

    /// Read every counter and attribute the deltas to the running jobs.
    pub fn sample(&self) {
        self.lock().sample();
    }

    /// Ids of the jobs being accounted, sorted.
    pub fn running(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().jobs.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Samples every `every` (first tick immediately) until the task is
    /// dropped or aborted. Frequent samples bound the error of the equal
    /// split and keep RAPL counters from wrapping twice between reads.
    pub async fn run_sampler(self: Arc<Self>, every: Duration) {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            self.sample();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A counter the test moves by hand; `None` makes reads fail.
    #[derive(Clone, Default)]
    struct Fake {
        joules: Arc<Mutex<Option<f64>>>,
        reads: Arc<AtomicUsize>,
    }

    impl Fake {
        fn new(j: f64) -> Fake {
            let f = Fake::default();
            f.set(j);
            f
        }
        fn set(&self, j: f64) {
            *self.joules.lock().unwrap() = Some(j);
        }
        fn add(&self, j: f64) {
            let mut v = self.joules.lock().unwrap();
            *v = Some(v.unwrap_or(0.0) + j);
        }
        fn fail(&self) {
            *self.joules.lock().unwrap() = None;
        }
    }

    impl EnergyCounter for Fake {
        fn read_joules(&self) -> Result<f64, String> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.joules
                .lock()
                .unwrap()
                .ok_or_else(|| "fake failure".into())
        }
    }

    fn sources(cpu: Option<&Fake>, gpus: &[(u32, &Fake)]) -> EnergySources {
        EnergySources {
            cpu_package: cpu.map(|c| Box::new(c.clone()) as Box<dyn EnergyCounter>),
            gpus: gpus
                .iter()
                .map(|(i, g)| (*i, Box::new((*g).clone()) as Box<dyn EnergyCounter>))
                .collect(),
        }
    }

    fn joules(e: &Energy) -> f64 {
        e.joules().unwrap_or_else(|| panic!("unmeasured: {e:?}"))
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn a_single_job_gets_the_whole_delta_and_idle_energy_goes_to_nobody() {
        let cpu = Fake::new(1000.0);
        let gpu = Fake::new(50.0);
        let acc = EnergyAccountant::new(sources(Some(&cpu), &[(0, &gpu)]));
        cpu.add(7.0); // idle, before the job
        gpu.add(3.0);
        acc.start("a", Some(0));
        cpu.add(40.0);
        gpu.add(100.0);
        acc.sample();
        cpu.add(2.0);
        gpu.add(20.0);
        let e = acc.finish("a");
        assert!(close(joules(&e.cpu_package), 42.0), "{e:?}");
        assert!(close(joules(&e.gpu), 120.0), "{e:?}");
        assert!(acc.running().is_empty());
    }

    #[test]
    fn overlapping_jobs_split_the_overlap_equally() {
        let cpu = Fake::new(0.0);
        let acc = EnergyAccountant::new(sources(Some(&cpu), &[]));
        acc.start("a", None);
        cpu.add(10.0); // a alone
        acc.start("b", None);
        cpu.add(30.0); // a and b
        let a = acc.finish("a");
        cpu.add(5.0); // b alone
        let b = acc.finish("b");
        assert!(close(joules(&a.cpu_package), 25.0), "{a:?}");
        assert!(close(joules(&b.cpu_package), 20.0), "{b:?}");
        // CPU-only jobs: the GPU domain is unmeasured, never 0.
        assert_eq!(a.gpu, Energy::UNMEASURED);
        assert_eq!(b.gpu, Energy::UNMEASURED);
    }

    #[test]
    fn gpu_delta_goes_only_to_jobs_on_that_gpu() {
        let cpu = Fake::new(0.0);
        let g0 = Fake::new(0.0);
        let g1 = Fake::new(0.0);
        let acc = EnergyAccountant::new(sources(Some(&cpu), &[(0, &g0), (1, &g1)]));
        acc.start("x", Some(0));
        acc.start("y", Some(0));
        acc.start("z", Some(1));
        acc.start("c", None);
        cpu.add(80.0);
        g0.add(60.0);
        g1.add(9.0);
        let x = acc.finish("x");
        let y = acc.finish("y");
        let z = acc.finish("z");
        let c = acc.finish("c");
        assert!(close(joules(&x.gpu), 30.0));
        assert!(close(joules(&y.gpu), 30.0));
        assert!(close(joules(&z.gpu), 9.0));
        assert_eq!(c.gpu, Energy::UNMEASURED);
        for e in [&x, &y, &z, &c] {
            assert!(close(joules(&e.cpu_package), 20.0), "{e:?}");
        }
    }

    #[test]
    fn a_gpu_without_a_counter_is_unmeasured() {
        let g0 = Fake::new(0.0);
        let acc = EnergyAccountant::new(sources(None, &[(0, &g0)]));
        acc.start("on1", Some(1));
        g0.add(5.0);
        let e = acc.finish("on1");
        assert_eq!(e.gpu, Energy::UNMEASURED);
        assert_eq!(e.cpu_package, Energy::UNMEASURED);
    }

    #[test]
    fn a_host_without_sources_reports_both_unmeasured() {
        let acc = EnergyAccountant::new(EnergySources::default());
        acc.start("a", Some(0));
        acc.sample();
        let e = acc.finish("a");
        assert_eq!(e, JobEnergy::default());
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["gpu"], "unmeasured");
        assert_eq!(v["cpu_package"], "unmeasured");
        assert_eq!(acc.finish("never-started"), JobEnergy::default());
    }

    #[test]
    fn a_read_error_makes_the_domain_unmeasured_for_jobs_running_then() {
        let cpu = Fake::new(0.0);
        let gpu = Fake::new(0.0);
        let acc = EnergyAccountant::new(sources(Some(&cpu), &[(0, &gpu)]));
        acc.start("before", Some(0));
        cpu.add(10.0);
        acc.sample();
        cpu.fail();
        gpu.add(4.0);
        acc.sample(); // cpu fails while "before" runs
        cpu.set(100.0);
        acc.sample(); // first good read after the failure: still unmeasured
        let before = acc.finish("before");
        assert_eq!(before.cpu_package, Energy::UNMEASURED);
        assert!(close(joules(&before.gpu), 4.0), "{before:?}");

        acc.start("after", Some(0));
        cpu.add(6.0);
        let after = acc.finish("after");
        assert!(close(joules(&after.cpu_package), 6.0), "{after:?}");
    }

    #[test]
    fn a_counter_going_backwards_is_unmeasured_not_negative() {
        let gpu = Fake::new(500.0);
        let acc = EnergyAccountant::new(sources(None, &[(0, &gpu)]));
        acc.start("a", Some(0));
        gpu.set(3.0); // driver reloaded
        assert_eq!(acc.finish("a").gpu, Energy::UNMEASURED);
        acc.start("b", Some(0));
        gpu.add(2.0);
        assert!(close(joules(&acc.finish("b").gpu), 2.0));
    }

    #[test]
    fn restarting_a_running_id_starts_a_fresh_account() {
        let cpu = Fake::new(0.0);
        let acc = EnergyAccountant::new(sources(Some(&cpu), &[]));
        acc.start("a", None);
        cpu.add(10.0);
        acc.start("a", None);
        cpu.add(1.0);
        assert!(close(joules(&acc.finish("a").cpu_package), 1.0));
    }

    #[tokio::test(start_paused = true)]
    async fn power_integrator_integrates_watts_over_paused_time() {
        let watts = Arc::new(Mutex::new(Ok::<f64, String>(100.0)));
        let w = watts.clone();
        let counter = PowerIntegrator::new(move || w.lock().unwrap().clone());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(close(counter.read_joules().unwrap(), 200.0));
        *watts.lock().unwrap() = Ok(300.0);
        tokio::time::advance(Duration::from_secs(1)).await;
        // Trapezoid: (100 + 300) / 2 W over 1 s.
        assert!(close(counter.read_joules().unwrap(), 400.0));
        *watts.lock().unwrap() = Err("power_usage: not supported".into());
        assert_eq!(
            counter.read_joules().unwrap_err(),
            "power_usage: not supported"
        );
        *watts.lock().unwrap() = Ok(300.0);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(close(counter.read_joules().unwrap(), 550.0));
    }

    #[tokio::test(start_paused = true)]
    async fn power_integrator_feeds_the_accountant() {
        let integrator = PowerIntegrator::new(|| Ok(50.0));
        let acc = EnergyAccountant::new(EnergySources {
            cpu_package: None,
            gpus: BTreeMap::from([(0, Box::new(integrator) as Box<dyn EnergyCounter>)]),
        });
        tokio::time::advance(Duration::from_secs(10)).await; // idle
        acc.start("a", Some(0));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(close(joules(&acc.finish("a").gpu), 200.0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_sampler_reads_every_interval() {
        let cpu = Fake::new(0.0);
        let acc = Arc::new(EnergyAccountant::new(sources(Some(&cpu), &[])));
        assert_eq!(cpu.reads.load(Ordering::SeqCst), 1); // baseline
        let task = tokio::spawn(acc.clone().run_sampler(Duration::from_secs(1)));
        tokio::task::yield_now().await;
        assert_eq!(cpu.reads.load(Ordering::SeqCst), 2); // first tick
        for expected in 3..=5 {
            tokio::time::advance(Duration::from_secs(1)).await;
            tokio::task::yield_now().await;
            assert_eq!(cpu.reads.load(Ordering::SeqCst), expected);
        }
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
    }
}
