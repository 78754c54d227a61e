//! The shim's Prometheus metrics (`GET /metrics` on the admin listener).
//! Reference: `docs/reference/metrics.md`.

use prometheus::{
    exponential_buckets, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::host::GpuStats;
use crate::job::{JobRecord, JobState, Priority};

#[derive(Clone)]
pub struct JobMetrics {
    /// Jobs the shim holds now, by state (terminal ones until retention
    /// removes them).
    pub jobs: IntGaugeVec,
    pub submitted: IntCounterVec,
    pub finished: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub queue_wait: HistogramVec,
    pub run_time: HistogramVec,
    pub retries: IntCounterVec,
    pub energy: HistogramVec,
    pub energy_unmeasured: IntCounterVec,
    pub refused: IntCounterVec,
}

impl JobMetrics {
    /// Registers the job metrics in `reg`.
    pub fn new(reg: &Registry) -> prometheus::Result<JobMetrics> {
        const CS: &[&str] = &["capability", "state"];
        const CP: &[&str] = &["capability", "priority"];
        const CD: &[&str] = &["capability", "domain"];
        let m = JobMetrics {
            jobs: registered(reg, IntGaugeVec::new(opts("crank_jobs", "Jobs held by the shim, by state"), CS)?)?,
            submitted: registered(reg, IntCounterVec::new(opts("crank_jobs_submitted_total", "Jobs accepted"), CP)?)?,
            finished: registered(reg, IntCounterVec::new(
                opts("crank_jobs_finished_total", "Jobs that reached a terminal state"),
                CS,
            )?)?,
            queue_depth: registered(reg, IntGaugeVec::new(
                opts("crank_job_queue_depth", "Jobs waiting to run, by priority"),
                &["priority"],
            )?)?,
            queue_wait: histogram(
                reg,
                ("crank_job_queue_wait_seconds", "Time from submission to the first run"),
                exponential_buckets(0.01, 3.0, 12)?,
                CP,
            )?,
            run_time: histogram(
                reg,
                ("crank_job_run_seconds", "Running time of finished jobs, all attempts"),
                exponential_buckets(0.1, 3.0, 11)?,
                CS,
            )?,
            retries: registered(reg, IntCounterVec::new(
                opts("crank_job_retries_total", "Runs re-queued after a retryable failure, by failure class"),
                &["capability", "class"],
            )?)?,
            energy: histogram(
                reg,
                ("crank_job_energy_joules", "Energy attributed to each finished job, by domain (gpu, cpu_package); unmeasured jobs are not observed"),
                exponential_buckets(1.0, 4.0, 12)?,
                CD,
            )?,
            energy_unmeasured: registered(reg, IntCounterVec::new(
                opts("crank_job_energy_unmeasured_total", "Finished jobs whose energy this host could not measure, by domain"),
                CD,
            )?)?,
            refused: registered(reg, IntCounterVec::new(
                opts("crank_jobs_refused_total", "Submissions refused, by reason (the x-crank-error of the answer)"),
                &["reason"],
            )?)?,
        };
        for p in Priority::ALL {
            m.queue_depth.with_label_values(&[p.as_str()]).set(0);
        }
        Ok(m)
    }

    /// Recomputes the by-state gauges from the records.
    pub fn set_states<'a>(&self, capability: &str, records: impl Iterator<Item = &'a JobRecord>) {
        let mut counts = [0i64; 6];
        for r in records {
            counts[JobState::ALL
                .iter()
                .position(|s| *s == r.state)
                .unwrap_or(0)] += 1;
        }
        for (s, n) in JobState::ALL.iter().zip(counts) {
            self.jobs
                .with_label_values(&[capability, s.as_str()])
                .set(n);
        }
    }
}

/// GPU gauges, refreshed from NVML at each scrape.
#[derive(Clone)]
pub struct GpuMetrics {
    pub count: IntGauge,
    pub utilization: GaugeVec,
    pub memory_used: GaugeVec,
    pub memory_total: GaugeVec,
}

impl GpuMetrics {
    pub fn new(reg: &Registry) -> prometheus::Result<GpuMetrics> {
        let m = GpuMetrics {
            count: IntGauge::new(
                "crank_gpus",
                "GPUs the shim can use (0: no GPU or no driver)",
            )?,
            utilization: GaugeVec::new(
                Opts::new("crank_gpu_utilization_percent", "GPU utilisation (NVML)"),
                &["gpu"],
            )?,
            memory_used: GaugeVec::new(
                Opts::new("crank_gpu_memory_used_bytes", "GPU memory in use (NVML)"),
                &["gpu"],
            )?,
            memory_total: GaugeVec::new(
                Opts::new("crank_gpu_memory_total_bytes", "GPU memory (NVML)"),
                &["gpu"],
            )?,
        };
        reg.register(Box::new(m.count.clone()))?;
        reg.register(Box::new(m.utilization.clone()))?;
        reg.register(Box::new(m.memory_used.clone()))?;
        reg.register(Box::new(m.memory_total.clone()))?;
        Ok(m)
    }

    pub fn update(&self, stats: &[GpuStats]) {
        self.count.set(stats.len() as i64);
        for s in stats {
            let gpu = s.index.to_string();
            if let Some(u) = s.utilization_percent {
                self.utilization.with_label_values(&[&gpu]).set(u as f64);
            }
            if let Some(b) = s.memory_used_bytes {
                self.memory_used.with_label_values(&[&gpu]).set(b as f64);
            }
            if let Some(b) = s.memory_total_bytes {
                self.memory_total.with_label_values(&[&gpu]).set(b as f64);
            }
        }
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

/// `c`, registered in `reg`.
fn registered<C>(reg: &Registry, c: C) -> prometheus::Result<C>
where
    C: prometheus::core::Collector + Clone + 'static,
{
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

/// A histogram `(name, help)` with `buckets`, registered in `reg`.
fn histogram(
    reg: &Registry,
    (name, help): (&str, &str),
    buckets: Vec<f64>,
    labels: &[&str],
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    registered(reg, h)
}
