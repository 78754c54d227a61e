//! Rego policy on the request path: the compiled set per direction (swapped
//! atomically on a new revision), the decision, its metrics and its log line.
//!
//! Loading and evaluation live in `crank-policy`; this module adds what only
//! a running proxy has: hot reload, metrics and the decision log.

pub mod check;
pub mod facts;
pub mod log;
mod watch;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use crank_api::proxy::{DecisionLogConfig, PolicyConfig};
use crank_policy::input::RequestFacts;
use crank_policy::{Bundle, Decision, Mode, Outcome, PolicySet};
use prometheus::{Histogram, IntCounter};

use crate::batch::LineBatch;
use crate::direction::Direction;
use crate::metrics::Metrics;

/// Bytes queued for the decision log writer before new lines are dropped
/// (and counted): the request path never waits on the disk. About 10,000
/// lines of the shipped set's size.
const LOG_QUEUE_BYTES: usize = 8 << 20;

/// One direction's policy set, kept current by the reloader.
pub struct PolicyHandle {
    pub direction: Direction,
    pub dir: PathBuf,
    set: ArcSwap<PolicySet>,
    last_error: Mutex<Option<String>>,
    /// The directory as it was at the last read (see [`watch`]).
    seen: Mutex<Option<watch::Fingerprint>>,
    /// This direction's metric series, looked up once each.
    series: Series,
}

/// `crank_policy_decisions_total` by outcome and mode, and
/// `crank_policy_eval_seconds`, for one direction: made on first use (a
/// series appears once it counts something, as before), then a plain
/// handle with no label lookup per request.
#[derive(Default)]
struct Series {
    decisions: [[OnceLock<IntCounter>; 2]; 3],
    eval: OnceLock<Histogram>,
}

impl Series {
    fn decisions(&self, metrics: &Metrics, dir: &str, outcome: Outcome, mode: Mode) -> &IntCounter {
        let o = match outcome {
            Outcome::Allow => 0,
            Outcome::Deny => 1,
            Outcome::Error => 2,
        };
        let m = match mode {
            Mode::Enforce => 0,
            Mode::Audit => 1,
        };
        self.decisions[o][m].get_or_init(|| {
            metrics
                .policy_decisions
                .with_label_values(&[dir, outcome.as_str(), mode.as_str()])
        })
    }

    fn eval(&self, metrics: &Metrics, dir: &str) -> &Histogram {
        self.eval
            .get_or_init(|| metrics.policy_eval.with_label_values(&[dir]))
    }
}

impl PolicyHandle {
    pub fn current(&self) -> Arc<PolicySet> {
        self.set.load_full()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the directory; compiles and swaps in a new revision. A bundle
    /// that does not read or compile changes nothing: the running revision
    /// keeps serving.
    fn reload(&self, metrics: &Metrics) {
        let dir = self.direction.as_str();
        let print = watch::Fingerprint::take(&self.dir);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if print.is_some() && *seen == print {
                return;
            }
            *seen = print;
        }
        let result = Bundle::read(&self.dir).and_then(|b| {
            if b.revision == self.set.load().revision() {
                return Ok(None);
            }
            PolicySet::compile(&b).map(Some)
        });
        let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(None) => {}
            Ok(Some(set)) => {
                let old = self.set.load().revision().to_string();
                metrics
                    .policy_revision
                    .with_label_values(&[dir, &old])
                    .set(0);
                metrics
                    .policy_revision
                    .with_label_values(&[dir, set.revision()])
                    .set(1);
                metrics.policy_reloads.with_label_values(&[dir, "ok"]).inc();
                tracing::info!(direction = dir, from = %old, to = %set.revision(), mode = set.manifest().mode.as_str(), "applied a new policy revision");
                self.set.store(Arc::new(set));
                *last = None;
            }
            Err(e) => {
                let e = e.to_string();
                if last.as_deref() != Some(e.as_str()) {
                    metrics
                        .policy_reloads
                        .with_label_values(&[dir, "error"])
                        .inc();
                    tracing::error!(direction = dir, error = %e, revision = %self.set.load().revision(), "policy change rejected; the running revision keeps serving");
                    *last = Some(e);
                }
            }
        }
    }
}

/// The policy sets of a proxy and the decision log they write to.
pub struct Policies {
    pub inbound: Option<Arc<PolicyHandle>>,
    pub outbound: Option<Arc<PolicyHandle>>,
    log: Option<Arc<LineBatch>>,
}

impl Policies {
    pub fn none() -> Policies {
        Policies {
            inbound: None,
            outbound: None,
            log: None,
        }
    }

    /// Compiles every configured set; an error names the direction and the
    /// file. Used by `--check` and at start.
    pub fn load(
        cfg: &PolicyConfig,
        base: &Path,
    ) -> anyhow::Result<Vec<(Direction, PathBuf, PolicySet)>> {
        let mut out = Vec::new();
        for (direction, src) in [
            (Direction::Inbound, &cfg.inbound),
            (Direction::Outbound, &cfg.outbound),
        ] {
            if let Some(src) = src {
                let dir = if src.dir.is_absolute() {
                    src.dir.clone()
                } else {
                    base.join(&src.dir)
                };
                let set = PolicySet::load(&dir)
                    .map_err(|e| anyhow::anyhow!("policy.{}.dir: {e}", direction.as_str()))?;
                out.push((direction, dir, set));
            }
        }
        Ok(out)
    }

    /// Starts the policy sets: the reload thread and the decision log writer.
    pub fn start(cfg: &PolicyConfig, base: &Path, metrics: &Metrics) -> anyhow::Result<Policies> {
        let mut policies = Policies::none();
        for (direction, dir, set) in Policies::load(cfg, base)? {
            metrics
                .policy_revision
                .with_label_values(&[direction.as_str(), set.revision()])
                .set(1);
            tracing::info!(direction = direction.as_str(), dir = %dir.display(), revision = %set.revision(), mode = set.manifest().mode.as_str(), engine = set.engine(), "loaded policy set");
            if let Some(why) = set.vm_fallback() {
                tracing::warn!(
                    direction = direction.as_str(),
                    reason = why,
                    "policy runs on the slower interpreter: the VM cannot compile it"
                );
            }
            let handle = Arc::new(PolicyHandle {
                direction,
                dir,
                set: ArcSwap::from_pointee(set),
                last_error: Mutex::new(None),
                seen: Mutex::new(None),
                series: Series::default(),
            });
            match direction {
                Direction::Inbound => policies.inbound = Some(handle),
                Direction::Outbound => policies.outbound = Some(handle),
            }
        }
        if cfg.decision_log.enabled {
            let writer = Arc::new(Mutex::new(LogWriter::open(&cfg.decision_log, base)?));
            let queue = LineBatch::new(LOG_QUEUE_BYTES);
            let (q, w) = (queue.clone(), writer.clone());
            std::thread::Builder::new()
                .name("crank-decision-log".into())
                .spawn(move || q.run(move |lines| lock(&w).write_batch(lines)))?;
            // Before exit, what is queued is written (crate::drain).
            let (q, w) = (queue.clone(), writer);
            crate::logging::on_flush(move || q.flush(|lines| lock(&w).write_batch(lines)));
            policies.log = Some(queue);
        }
        let handles: Vec<Arc<PolicyHandle>> = policies
            .inbound
            .iter()
            .chain(policies.outbound.iter())
            .cloned()
            .collect();
        if !handles.is_empty() {
            let metrics = metrics.clone();
            let every = cfg.reload_interval.max(Duration::from_millis(50));
            std::thread::Builder::new()
                .name("crank-policy-reload".into())
                .spawn(move || loop {
                    std::thread::sleep(every);
                    for h in &handles {
                        h.reload(&metrics);
                    }
                })?;
        }
        Ok(policies)
    }

    pub fn for_direction(&self, d: Direction) -> Option<&Arc<PolicyHandle>> {
        match d {
            Direction::Inbound => self.inbound.as_ref(),
            Direction::Outbound => self.outbound.as_ref(),
        }
    }

    /// Evaluates, counts and logs one request.
    pub fn check(
        &self,
        handle: &PolicyHandle,
        set: &PolicySet,
        facts: &RequestFacts,
        trace_id: Option<&str>,
        metrics: &Metrics,
    ) -> Decision {
        let value = crank_policy::build_value(facts, set.manifest());
        self.check_value(handle, set, facts, value, trace_id, metrics)
    }

    /// Evaluates, counts and logs one decision on an input document built
    /// from `facts` (with more in it: an opaque TCP tunnel adds
    /// `input.connection`, see [`facts::connection_input`]).
    pub fn check_input(
        &self,
        handle: &PolicyHandle,
        set: &PolicySet,
        facts: &RequestFacts,
        doc: serde_json::Value,
        trace_id: Option<&str>,
        metrics: &Metrics,
    ) -> Decision {
        let value = crank_policy::RegoValue::from(doc);
        self.check_value(handle, set, facts, value, trace_id, metrics)
    }

    /// [`Policies::check_input`] on an input built as a regorus value
    /// ([`crank_policy::build_value`]): the request path's way, with no
    /// JSON document in between.
    pub fn check_value(
        &self,
        handle: &PolicyHandle,
        set: &PolicySet,
        facts: &RequestFacts,
        input: crank_policy::RegoValue,
        trace_id: Option<&str>,
        metrics: &Metrics,
    ) -> Decision {
        let manifest = set.manifest();
        let decision = set.decide_value(input);
        let dir = handle.direction.as_str();
        let series = &handle.series;
        series
            .decisions(metrics, dir, decision.outcome, manifest.mode)
            .inc();
        series
            .eval(metrics, dir)
            .observe(decision.elapsed.as_secs_f64());
        let wanted = manifest.decision_log.log_allowed || decision.outcome != Outcome::Allow;
        if let (Some(log), true) = (&self.log, wanted) {
            let mut line =
                log::Line::new(facts, manifest, set.revision(), dir, &decision, trace_id).to_json();
            line.push('\n');
            if !log.push(line.as_bytes()) {
                metrics.decision_log_dropped.inc();
            }
        }
        decision
    }
}

/// The decision log writer, shared by its thread and the exit flush.
fn lock(w: &Mutex<LogWriter>) -> std::sync::MutexGuard<'_, LogWriter> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

/// A 128-bit random id, as 32 hex digits.
pub fn new_decision_id() -> String {
    hex128(rand::random())
}

/// `n` as 32 lower-case hex digits, zero-padded: what `{:032x}` writes,
/// without the formatter.
fn hex128(n: u128) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    (0..32)
        .rev()
        .map(|i| char::from(DIGITS[((n >> (4 * i)) & 15) as usize]))
        .collect()
}

/// Writes decision log lines to stdout or a size-bounded, rotated file.
struct LogWriter {
    path: Option<PathBuf>,
    max_bytes: u64,
    keep: u32,
    file: Option<std::fs::File>,
    written: u64,
}

impl LogWriter {
    fn open(cfg: &DecisionLogConfig, base: &Path) -> anyhow::Result<LogWriter> {
        if cfg.path == Path::new("-") {
            return Ok(LogWriter {
                path: None,
                max_bytes: cfg.max_bytes,
                keep: cfg.keep,
                file: None,
                written: 0,
            });
        }
        let path = if cfg.path.is_absolute() {
            cfg.path.clone()
        } else {
            base.join(&cfg.path)
        };
        let file = open_append(&path).map_err(|e| {
            anyhow::anyhow!(
                "policy.decision_log.path: cannot open {}: {e}; fix the path or use - for stdout",
                path.display()
            )
        })?;
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(LogWriter {
            path: Some(path),
            max_bytes: cfg.max_bytes.max(4096),
            keep: cfg.keep,
            file: Some(file),
            written,
        })
    }

    /// Writes a batch of whole lines (each ends with a newline) and flushes.
    fn write_batch(&mut self, lines: &[u8]) {
        match &self.path {
            None => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(lines);
                let _ = out.flush();
            }
            Some(_) if self.written + lines.len() as u64 <= self.max_bytes => {
                // No line of the batch rotates the file: one write for all.
                if let Some(f) = &mut self.file {
                    if f.write_all(lines).is_ok() {
                        self.written += lines.len() as u64;
                    }
                }
                if let Some(f) = &mut self.file {
                    let _ = f.flush();
                }
            }
            Some(_) => {
                for line in lines.split_inclusive(|b| *b == b'\n') {
                    self.write_line(line);
                }
                if let Some(f) = &mut self.file {
                    let _ = f.flush();
                }
            }
        }
    }

    /// One line, with its newline.
    fn write_line(&mut self, line: &[u8]) {
        let len = line.len() as u64;
        if self.written + len > self.max_bytes && self.written > 0 {
            self.rotate();
        }
        if let Some(f) = &mut self.file {
            if f.write_all(line).is_ok() {
                self.written += len;
            }
        }
    }

    /// `FILE` → `FILE.1` → … → `FILE.keep`; the oldest is removed.
    fn rotate(&mut self) {
        let Some(path) = self.path.clone() else {
            return;
        };
        self.file = None;
        let name = |i: u32| PathBuf::from(format!("{}.{i}", path.display()));
        if self.keep == 0 {
            let _ = std::fs::remove_file(&path);
        } else {
            let _ = std::fs::remove_file(name(self.keep));
            for i in (1..self.keep).rev() {
                let _ = std::fs::rename(name(i), name(i + 1));
            }
            let _ = std::fs::rename(&path, name(1));
        }
        match open_append(&path) {
            Ok(f) => {
                self.file = Some(f);
                self.written = 0;
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot reopen the decision log after rotation")
            }
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_ids_are_padded_hex_as_formatted() {
        for n in [
            0u128,
            1,
            0xabc,
            u128::MAX,
            0x0f00_0000_0000_0000_0000_0000_0000_00ff,
        ] {
            assert_eq!(hex128(n), format!("{n:032x}"));
        }
    }

    #[test]
    fn decision_ids_are_unique_hex() {
        let a = new_decision_id();
        let b = new_decision_id();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn decision_log_file_is_size_bounded_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DecisionLogConfig {
            enabled: true,
            path: "decisions.log".into(),
            max_bytes: 4096,
            keep: 2,
        };
        let mut w = LogWriter::open(&cfg, dir.path()).unwrap();
        // 999 bytes and a newline per line, in batches of 4 and 1 lines
        let line = format!("{}\n", "x".repeat(999));
        for _ in 0..4 {
            w.write_batch(line.repeat(4).as_bytes());
            w.write_batch(line.as_bytes());
        }
        let size = |n: &str| std::fs::metadata(dir.path().join(n)).map(|m| m.len());
        // whole lines only, in order, in every file
        let text = std::fs::read_to_string(dir.path().join("decisions.log")).unwrap();
        assert!(text.lines().all(|l| l.len() == 999), "{}", text.len());
        assert!(size("decisions.log").unwrap() <= 4096);
        assert_eq!(size("decisions.log.1").unwrap(), 4000);
        assert_eq!(size("decisions.log.2").unwrap(), 4000);
        assert!(
            size("decisions.log.3").is_err(),
            "only `keep` old files stay"
        );
    }
}
