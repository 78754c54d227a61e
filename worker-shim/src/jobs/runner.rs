//! Running one attempt of a job: render the argv, spawn the tool in its own
//! process group (no shell, `RLIMIT_FSIZE`, `PR_SET_PDEATHSIG`, the slot's
//! GPU), read its progress and stderr tail, wait for it under the timeout
//! and a cancel, and say how the run ended ([`Outcome`]).

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
use crate::job::{Failure, FailureClass, JobRecord, Progress};

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
        let rendered = match self.render(rec, &dir) {
            Ok(r) => r,
            Err(f) => return Outcome::Failed(f),
        };
        let mut child = match self.command(rec, &dir, &rendered, gpu).spawn() {
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
        let (status, stopped) = wait(&mut child, pid, limit, cancel).await;
        let tail = output.finish().await;
        let keep = tail.iter().rev().take(STDERR_TAIL).rev().cloned().collect();
        self.by_ref(&rec.id, |r| {
            r.stderr_tail = keep;
            r.pid = None;
        });
        match (status, stopped) {
            (Err(e), _) => Outcome::Failed(internal(format!("waiting for the tool: {e}"))),
            (Ok(_), Some(Stop::Canceled)) => Outcome::Canceled,
            (Ok(_), Some(Stop::Timeout)) => Outcome::TimedOut(timed_out(limit)),
            (Ok(status), None) => self.exited(rec, status, &tail),
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
        // SAFETY: only async-signal-safe calls (setrlimit, prctl) between
        // fork and exec.
        unsafe {
            cmd.pre_exec(move || {
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

/// Waits for the tool under the time limit and a cancel; either kills the
/// whole group.
async fn wait(
    child: &mut Child,
    pid: u32,
    limit: Duration,
    cancel: &Notify,
) -> (std::io::Result<ExitStatus>, Option<Stop>) {
    let stopped = tokio::select! {
        s = child.wait() => return (s, None),
        _ = tokio::time::sleep(limit) => Stop::Timeout,
        _ = cancel.notified() => Stop::Canceled,
    };
    kill_group(pid);
    (child.wait().await, Some(stopped))
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
