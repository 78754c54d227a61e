//! Running one attempt of a job: fetch its input from object storage when
//! this host lacks it, render the argv, spawn the tool in its own process
//! group (no shell, `RLIMIT_FSIZE`, `PR_SET_PDEATHSIG`, the slot's GPU, the
//! job's CPU and memory limits in a cgroup or as rlimits), read its
//! progress and stderr tail, wait for it under the timeout and a cancel,
//! note the CPU time it used, store its output, and say how the run ended
//! ([`Outcome`]).

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::manager::Manager;
use crate::exec::classify::ExitInfo;
use crate::exec::progress::{FfmpegProgress, ProgressKind};
use crate::exec::template::{Rendered, Reserved};
use crate::job::{AttemptUsage, Failure, FailureClass, JobLimits, JobRecord, Progress};
use crate::limits::{Enforcer, JobCgroup};

/// Lines of the tool's standard error kept with the job.
const STDERR_TAIL: usize = 20;

/// How one run ended.
pub(super) enum Outcome {
    /// With an output of this many bytes.
    Succeeded(u64),
    Canceled,
    TimedOut(Failure),
    Failed(Failure),
}

/// Why the shim stopped a run.
enum Stop {
    Timeout,
    Canceled,
}

impl Manager {
    /// Runs the job once on its slot (`gpu`: the GPU's index, `None` in the
    /// CPU pool) until it exits, times out or `cancel` fires.
    pub(super) async fn execute(
        &self,
        rec: &JobRecord,
        gpu: Option<u32>,
        cancel: &Notify,
    ) -> Outcome {
        let dir = self.job_dir(&rec.id);
        if let Err(f) = self.fetch_stored_input(rec, &dir).await {
            return Outcome::Failed(f);
        }
        let rendered = match self.render(rec, &dir) {
            Ok(r) => r,
            Err(f) => return Outcome::Failed(f),
        };
        let limits = rec.extras.limits.unwrap_or_default();
        let (cgroup, confine) = match self.confine(rec, &limits) {
            Ok(c) => c,
            Err(f) => return Outcome::Failed(f),
        };
        let mut child = match self.command(rec, &dir, &rendered, gpu, confine).spawn() {
            Ok(c) => c,
            Err(e) => {
                return Outcome::Failed(internal(format!("cannot start {}: {e}", rendered.program)))
            }
        };
        let pid = child.id().unwrap_or(0);
        tracing::info!(job = %rec.id, pid, command = %crate::exec::template::display(&rendered), "job started");
        if let Some(r) = self.by_ref(&rec.id, |r| r.pid = Some(pid)) {
            let _ = self.store.put(&r);
        }
        let output = Output::read(
            &mut child,
            self.tracks_progress(),
            self.progress_sink(&rec.id),
        );
        let limit = self.run_limit(rec);
        let (status, stopped, cpu) = wait(&mut child, pid, limit, cancel).await;
        let tail = output.finish().await;
        let cpu_seconds = cgroup.as_ref().and_then(JobCgroup::cpu_seconds).or(cpu);
        self.note_run(rec, &tail, cpu_seconds.unwrap_or(0.0));
        let over = |status: &ExitStatus| {
            let oom = cgroup.as_ref().is_some_and(JobCgroup::oom_killed);
            crate::limits::over_limit(&limits, oom, status.signal(), &tail)
        };
        match (status, stopped) {
            (Err(e), _) => Outcome::Failed(internal(format!("waiting for the tool: {e}"))),
            (Ok(_), Some(Stop::Canceled)) => Outcome::Canceled,
            (Ok(_), Some(Stop::Timeout)) => Outcome::TimedOut(timed_out(limit)),
            (Ok(status), None) if !status.success() && over(&status).is_some() => {
                Outcome::Failed(over(&status).unwrap_or_else(|| internal(String::new())))
            }
            (Ok(status), None) => {
                self.store_output(rec, self.exited(rec, status, &tail))
                    .await
            }
        }
    }

    /// The stderr tail and the attempt's CPU time, once the tool is gone.
    fn note_run(&self, rec: &JobRecord, tail: &[String], cpu_seconds: f64) {
        let keep = tail.iter().rev().take(STDERR_TAIL).rev().cloned().collect();
        self.by_ref(&rec.id, |r| {
            r.stderr_tail = keep;
            r.pid = None;
            // Completed (GPU time, energy, end) when the run is recorded.
            r.usage.push(AttemptUsage {
                attempt: r.attempts,
                cpu_seconds,
                ..AttemptUsage::default()
            });
        });
    }

    /// The attempt's cgroup (on the cgroup path, with a limit to enforce)
    /// and what the child does to join it, or the rlimits it sets.
    fn confine(
        &self,
        rec: &JobRecord,
        limits: &JobLimits,
    ) -> Result<(Option<JobCgroup>, Confine), Failure> {
        let cgroup = self.job_cgroup(rec, limits)?;
        let confine = Confine {
            cgroup_fd: cgroup.as_ref().map(JobCgroup::procs_fd),
            rlimits: match cgroup {
                Some(_) => Vec::new(),
                None => crate::limits::rlimits(limits, self.run_limit(rec)),
            },
        };
        Ok((cgroup, confine))
    }

    /// The attempt's cgroup, on the cgroup path with a limit to enforce.
    fn job_cgroup(
        &self,
        rec: &JobRecord,
        limits: &JobLimits,
    ) -> Result<Option<JobCgroup>, Failure> {
        match &self.settings.enforcer {
            Enforcer::Cgroup(parent) if *limits != JobLimits::default() => {
                JobCgroup::create(parent, &format!("{}-{}", rec.id, rec.attempts), limits)
                    .map(Some)
                    .map_err(internal)
            }
            _ => Ok(None),
        }
    }

    /// With object storage, a job's input may have been received by
    /// another shim: fetched into the job directory when missing here.
    async fn fetch_stored_input(&self, rec: &JobRecord, dir: &Path) -> Result<(), Failure> {
        let Some(storage) = &self.settings.storage else {
            return Ok(());
        };
        let input = dir.join("input");
        if !self.settings.template.uses_input() || input.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| internal(format!("creating {}: {e}", dir.display())))?;
        let n = storage
            .download(&rec.id, "input", &input)
            .await
            .map_err(|e| internal(e.to_string()))?;
        self.add_work_bytes(n);
        Ok(())
    }

    /// With object storage, a succeeded run's output goes to the bucket
    /// (and leaves the local disk); a failed upload fails the run.
    async fn store_output(&self, rec: &JobRecord, outcome: Outcome) -> Outcome {
        let (Some(storage), Outcome::Succeeded(bytes)) = (&self.settings.storage, &outcome) else {
            return outcome;
        };
        let path = self.output_path(&rec.id);
        match storage.upload(&rec.id, "output", &path).await {
            Ok(_) => {
                if std::fs::remove_file(&path).is_ok() {
                    self.sub_work_bytes(*bytes);
                }
                outcome
            }
            Err(e) => Outcome::Failed(internal(format!(
                "the tool succeeded but its output could not be stored: {e}"
            ))),
        }
    }

    /// The argv for this job; an old output is removed first.
    fn render(&self, rec: &JobRecord, dir: &Path) -> Result<Rendered, Failure> {
        let input = dir.join("input");
        let reserved = Reserved {
            input: input.exists().then_some(input),
            output: self.output_path(&rec.id),
            workdir: dir.to_path_buf(),
            job_id: rec.id.clone(),
        };
        let rendered = self
            .settings
            .template
            .render(&rec.params, &reserved)
            .map_err(|e| internal(format!("rendering the command: {e}")))?;
        let _ = std::fs::remove_file(&reserved.output);
        Ok(rendered)
    }

    /// The tool's process: no shell, in the job's directory, its own
    /// process group, the slot's GPU, the output size limit, and death
    /// with the shim.
    fn command(
        &self,
        rec: &JobRecord,
        dir: &Path,
        rendered: &Rendered,
        gpu: Option<u32>,
        confine: Confine,
    ) -> Command {
        let mut cmd = Command::new(&rendered.program);
        cmd.args(&rendered.args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .envs(&self.settings.env)
            .env("CRANK_JOB_ID", &rec.id)
            .process_group(0)
            .kill_on_drop(true);
        match gpu {
            Some(g) => {
                // NVML indexes follow the PCI bus order; CUDA's default order
                // is fastest first, so pin it to the same numbering.
                cmd.env("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
                    .env("CUDA_VISIBLE_DEVICES", g.to_string());
            }
            None => {
                cmd.env("CUDA_VISIBLE_DEVICES", "");
            }
        }
        let fsize = self.settings.max_output_bytes;
        // SAFETY: only async-signal-safe calls (write, setrlimit, prctl)
        // between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                crate::limits::apply_in_child(confine.cgroup_fd, &confine.rlimits)?;
                let lim = libc::rlimit {
                    rlim_cur: fsize,
                    rlim_max: fsize,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The tool dies with the shim, even on SIGKILL.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd
    }

    fn tracks_progress(&self) -> bool {
        self.settings.progress == ProgressKind::Ffmpeg
    }

    /// The job's own timeout, never longer than `exec.timeout`.
    fn run_limit(&self, rec: &JobRecord) -> Duration {
        rec.timeout_ms
            .map(Duration::from_millis)
            .map_or(self.settings.timeout, |t| t.min(self.settings.timeout))
    }

    /// A tool that exited by itself: success needs a non-empty output;
    /// otherwise the output limit, then the classifier.
    fn exited(&self, rec: &JobRecord, status: ExitStatus, tail: &[String]) -> Outcome {
        if status.success() {
            let out = self.output_path(&rec.id);
            return match std::fs::metadata(&out) {
                Ok(m) if m.len() > 0 => Outcome::Succeeded(m.len()),
                _ => Outcome::Failed(Failure {
                    class: FailureClass::ToolCrash,
                    message: format!("the tool exited 0 but wrote no output at {}", out.display()),
                    exit_code: Some(0),
                    signal: None,
                }),
            };
        }
        if status.signal() == Some(libc::SIGXFSZ) {
            return Outcome::Failed(Failure {
                class: FailureClass::OutOfResources,
                message: format!(
                    "the output grew past exec.max_output_bytes ({} bytes): killed by SIGXFSZ",
                    self.settings.max_output_bytes
                ),
                exit_code: None,
                signal: Some(libc::SIGXFSZ),
            });
        }
        let exit = ExitInfo {
            code: status.code(),
            signal: status.signal(),
            timed_out: false,
            killed_by_shim: false,
        };
        Outcome::Failed(self.settings.classifier.classify(&exit, tail))
    }

    /// Where progress updates go (memory only; the store gets the state
    /// changes).
    fn progress_sink(&self, id: &str) -> impl Fn(Progress) + Send + 'static {
        let weak = self.weak.clone();
        let id = id.to_string();
        move |p| {
            if let Some(m) = weak.upgrade() {
                m.by_ref(&id, |r| r.progress = p);
            }
        }
    }
}

/// Where the tool is confined: the cgroup's `cgroup.procs` it joins, or
/// the rlimits it gets.
struct Confine {
    cgroup_fd: Option<i32>,
    rlimits: Vec<(crate::limits::Rlimit, u64)>,
}

/// Waits for the tool under the time limit and a cancel; either kills the
/// whole group. Also returns the CPU time the tool and the children it
/// waited for used, read while it is a zombie (before it is reaped).
async fn wait(
    child: &mut Child,
    pid: u32,
    limit: Duration,
    cancel: &Notify,
) -> (std::io::Result<ExitStatus>, Option<Stop>, Option<f64>) {
    let mut exited = tokio::task::spawn_blocking(move || exit_without_reaping(pid));
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    let stopped = tokio::select! {
        ok = &mut exited => match ok {
            Ok(true) => None,
            // waitid could not wait: wait by reaping, without CPU time.
            _ => tokio::select! {
                s = child.wait() => return (s, None, None),
                _ = &mut deadline => Some(Stop::Timeout),
                _ = cancel.notified() => Some(Stop::Canceled),
            },
        },
        _ = &mut deadline => Some(Stop::Timeout),
        _ = cancel.notified() => Some(Stop::Canceled),
    };
    if stopped.is_some() {
        kill_group(pid);
        if !exited.is_finished() {
            let _ = tokio::time::timeout(Duration::from_secs(10), exited).await;
        }
    }
    let cpu = zombie_cpu_seconds(pid);
    (child.wait().await, stopped, cpu)
}

/// Blocks until `pid` has exited, leaving it to be reaped by its `Child`;
/// false when it cannot wait.
fn exit_without_reaping(pid: u32) -> bool {
    loop {
        // SAFETY: plain syscall on our own child; WNOWAIT leaves it a zombie.
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            return true;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
        }
    }
}

/// User plus system time of a process and its waited-for children, from
/// `/proc/<pid>/stat` (utime, stime, cutime, cstime).
fn zombie_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = rest
        .get(11..15)?
        .iter()
        .map(|v| v.parse::<u64>().unwrap_or(0))
        .sum();
    // SAFETY: plain libc query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Some(ticks as f64 / hz as f64)
}

/// The readers of the tool's stdout (progress) and stderr (progress and
/// the tail kept with the job).
struct Output {
    tail: Arc<Mutex<VecDeque<String>>>,
    tasks: [JoinHandle<()>; 2],
}

impl Output {
    fn read(child: &mut Child, track: bool, updates: impl Fn(Progress) + Send + 'static) -> Self {
        let progress = Arc::new(Mutex::new(FfmpegProgress::default()));
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let out = {
            let progress = progress.clone();
            each_line(stdout, move |line| {
                if track {
                    let p = progress.lock().unwrap().feed_stdout_line(&line);
                    p.into_iter().for_each(&updates);
                }
            })
        };
        let err = {
            let tail = tail.clone();
            each_line(stderr, move |line| {
                if track {
                    progress.lock().unwrap().feed_stderr_line(&line);
                }
                let mut t = tail.lock().unwrap();
                if t.len() == STDERR_TAIL * 4 {
                    t.pop_front();
                }
                t.push_back(line);
            })
        };
        Output {
            tail,
            tasks: [out, err],
        }
    }

    /// The stderr lines kept, once the readers are done (the group may hold
    /// the pipes open a moment longer: not waited for beyond 5 s).
    async fn finish(self) -> Vec<String> {
        let [out, err] = self.tasks;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = out.await;
            let _ = err.await;
        })
        .await;
        let tail = self.tail.lock().unwrap();
        tail.iter().cloned().collect()
    }
}

fn each_line(
    stream: impl AsyncRead + Unpin + Send + 'static,
    mut f: impl FnMut(String) + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            f(line);
        }
    })
}

fn timed_out(limit: Duration) -> Failure {
    Failure {
        class: FailureClass::Timeout,
        message: format!(
            "ran longer than the job timeout ({}); the process group was killed",
            humantime::format_duration(limit)
        ),
        exit_code: None,
        signal: Some(libc::SIGKILL),
    }
}

pub(super) fn internal(message: String) -> Failure {
    Failure {
        class: FailureClass::Internal,
        message,
        exit_code: None,
        signal: None,
    }
}

/// SIGKILL to the job's whole process group.
pub(super) fn kill_group(pid: u32) {
    if pid > 0 {
        // SAFETY: plain syscall; a negative pid names the process group.
        unsafe {
            libc::kill(-(pid as i32), libc::SIGKILL);
        }
    }
}

/// A job's tool may outlive a shim killed with SIGKILL (its children do not
/// get PDEATHSIG). Kill the old group, but only when its leader is still
/// that group's leader and runs the configured program, so a reused pid is
/// never hit.
pub(super) fn kill_leftover(pid: u32, program: &str) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        // The leader is gone; its group may still have members, but their
        // pgid equals the old pid, which is only reused after they all exit.
        // SAFETY: plain syscall.
        unsafe {
            libc::kill(-(pid as i32), libc::SIGKILL);
        }
        return;
    };
    let pgrp = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(2))
        .and_then(|s| s.parse::<u32>().ok());
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let name = Path::new(program).file_name();
    let same = exe
        .as_deref()
        .and_then(Path::file_name)
        .is_some_and(|n| Some(n) == name);
    if pgrp == Some(pid) && same {
        kill_group(pid);
    }
}
