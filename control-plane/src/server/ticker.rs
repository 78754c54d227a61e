//! crank-control's ticker task, and the config directory watch that makes
//! a saved edit publish at once.
//!
//! The ticker runs [`Control::tick`] every half second (rotations,
//! pruning, lease expiry, the server's own certificate, and the config
//! directory check). With `config_dir` set the directory is also watched
//! (inotify, through the `notify` crate): a change is checked and
//! published as soon as its burst of events has been quiet for
//! [`DEBOUNCE`] (an editor's temp file and rename, a `git checkout` of many
//! files: one check, one version), instead of up to 0.5 s later. Only the
//! process that reads the directory acts on an event: the single process
//! without a shared store, or the leading replica with one.
//!
//! The half-second check stays the fallback. When the directory cannot be
//! watched (no inotify, the watch limit reached, the directory missing) a
//! warning names the reason and the watch is tried again every
//! [`MAINTAIN`]; when the directory is replaced (a new inode, e.g. a
//! symlink swapped to a new checkout) the watch moves to the new one
//! within [`MAINTAIN`] too.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Control;

/// How often the ticker runs unless `CRANK_CONTROL_TICK` says otherwise.
pub const DEFAULT_TICK: Duration = Duration::from_millis(500);

/// A burst of events is over when none came for this long.
pub const DEBOUNCE: Duration = Duration::from_millis(15);

/// A burst that never goes quiet is checked after this long anyway.
const MAX_BURST: Duration = Duration::from_millis(250);

/// How often a directory that could not be watched is tried again, and
/// a watched one is checked for having been replaced.
pub const MAINTAIN: Duration = Duration::from_secs(2);

/// The ticker's period: `CRANK_CONTROL_TICK` (a duration such as `500ms`
/// or `1h`, for tests that must show a change did not wait for the tick),
/// else [`DEFAULT_TICK`].
pub fn tick_period(var: Option<&str>) -> Result<Duration, String> {
    let Some(text) = var else {
        return Ok(DEFAULT_TICK);
    };
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        format!("CRANK_CONTROL_TICK={text:?} is not a duration ({e}); write one such as 500ms, or unset it for the default 500ms")
    })?;
    if d < Duration::from_millis(10) {
        return Err(format!(
            "CRANK_CONTROL_TICK={text:?} is too short; use at least 10ms, or unset it for the default 500ms"
        ));
    }
    Ok(d)
}

/// An inotify watch of the config directory (recursive). Events that may
/// change what the directory holds wake [`DirWatch::changed`]; opening and
/// reading files (the check itself does) do not.
pub struct DirWatch {
    dir: PathBuf,
    wake: Arc<Notify>,
    /// The watcher and the directory's (device, inode) it watches.
    armed: Option<(notify::RecommendedWatcher, (u64, u64))>,
    /// The last failure's text (warned once per distinct reason).
    failed: Option<String>,
}

impl DirWatch {
    /// Starts watching `dir`; a failure is a warning, and the ticker
    /// carries on checking every tick.
    pub fn new(dir: &Path) -> DirWatch {
        let mut w = DirWatch {
            dir: dir.to_path_buf(),
            wake: Arc::new(Notify::new()),
            armed: None,
            failed: None,
        };
        w.arm();
        w
    }

    /// True while an inotify watch is in place.
    #[cfg(test)]
    fn is_armed(&self) -> bool {
        self.armed.is_some()
    }

    fn arm(&mut self) {
        match self.try_arm() {
            Ok(armed) => {
                if self.failed.take().is_some() {
                    tracing::info!(dir = %self.dir.display(), "watching the config directory again; edits publish at once");
                } else {
                    tracing::debug!(dir = %self.dir.display(), "watching the config directory");
                }
                self.armed = Some(armed);
                // Whatever changed while it was not watched.
                self.wake.notify_one();
            }
            Err(reason) => {
                if self.failed.as_ref() != Some(&reason) {
                    tracing::warn!(dir = %self.dir.display(), reason = %reason, "cannot watch the config directory; edits are picked up by the check every half second instead (raise fs.inotify.max_user_watches / max_user_instances if that is the reason)");
                }
                self.armed = None;
                self.failed = Some(reason);
            }
        }
    }

    fn try_arm(&self) -> Result<(notify::RecommendedWatcher, (u64, u64)), String> {
        let inode = inode_of(&self.dir).map_err(|e| format!("{e}"))?;
        let wake = self.wake.clone();
        let mut watcher =
            notify::recommended_watcher(move |ev: notify::Result<notify::Event>| match ev {
                Ok(ev) if changes_content(&ev.kind) => wake.notify_one(),
                Ok(_) => {}
                // Lost events (queue overflow): check, to be safe.
                Err(_) => wake.notify_one(),
            })
            .map_err(|e| e.to_string())?;
        watcher
            .watch(&self.dir, RecursiveMode::Recursive)
            .map_err(|e| e.to_string())?;
        Ok((watcher, inode))
    }

    /// Every [`MAINTAIN`]: tries again after a failure, and follows the
    /// directory to its new inode when it was replaced.
    pub fn maintain(&mut self) {
        match &self.armed {
            Some((_, inode)) if inode_of(&self.dir).ok() == Some(*inode) => {}
            _ => {
                self.armed = None;
                self.arm();
            }
        }
    }

    /// A change was seen (or the watch was just armed).
    pub async fn woken(&self) {
        self.wake.notified().await
    }
}

/// Creating, writing, renaming, removing, attribute changes: anything but
/// opening, reading and closing without a write.
fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

fn inode_of(dir: &Path) -> std::io::Result<(u64, u64)> {
    let m = std::fs::metadata(dir)?;
    if !m.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    Ok((m.dev(), m.ino()))
}

/// A burst of directory events being waited out: when it started and
/// when the last event came.
#[derive(Clone, Copy)]
struct Burst {
    first: Instant,
    last: Instant,
}

impl Burst {
    /// When the burst counts as over.
    fn due(&self) -> Instant {
        (self.last + DEBOUNCE).min(self.first + MAX_BURST)
    }
}

impl Control {
    /// The ticker task: [`Control::tick`] every `period`, and the config
    /// directory checked as soon as a burst of edits is over.
    pub(super) async fn run_ticker(self: Arc<Self>, period: Duration) {
        let mut every = tokio::time::interval(period);
        let mut maintain = tokio::time::interval(MAINTAIN);
        maintain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch = self.cfg.config_dir.as_deref().map(DirWatch::new);
        let mut burst: Option<Burst> = None;
        loop {
            let due = burst.map(|b| b.due());
            tokio::select! {
                _ = every.tick() => self.tick().await,
                _ = maintain.tick(), if watch.is_some() => {
                    if let Some(w) = watch.as_mut() {
                        w.maintain();
                    }
                }
                () = woken(watch.as_ref()) => {
                    let now = Instant::now();
                    let first = burst.map_or(now, |b| b.first);
                    burst = Some(Burst { first, last: now });
                }
                () = sleep_until(due) => {
                    burst = None;
                    self.check_config_dir().await;
                }
            }
        }
    }

    /// Reads the config directory now, where this process is the one that
    /// does: without a shared store, or as the leading replica.
    async fn check_config_dir(&self) {
        if self.store.is_none() {
            self.tick_mesh();
        } else if self.is_leader() {
            self.publish_shared().await;
        }
    }
}

async fn woken(watch: Option<&DirWatch>) {
    match watch {
        Some(w) => w.woken().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_period_is_500ms_or_a_valid_duration() {
        assert_eq!(tick_period(None), Ok(Duration::from_millis(500)));
        assert_eq!(tick_period(Some("1h")), Ok(Duration::from_secs(3600)));
        assert_eq!(tick_period(Some(" 20ms ")), Ok(Duration::from_millis(20)));
        let e = tick_period(Some("soon")).unwrap_err();
        assert!(
            e.contains("CRANK_CONTROL_TICK") && e.contains("500ms"),
            "{e}"
        );
        let e = tick_period(Some("1ms")).unwrap_err();
        assert!(e.contains("at least 10ms"), "{e}");
    }

    #[test]
    fn reading_the_directory_is_not_a_change() {
        use notify::event::{CreateKind, ModifyKind, RemoveKind, RenameMode};
        let read = [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
        ];
        assert!(read.iter().all(|k| !changes_content(k)));
        let change = [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Modify(ModifyKind::Any),
            EventKind::Remove(RemoveKind::File),
            EventKind::Any,
        ];
        assert!(change.iter().all(changes_content));
    }

    #[test]
    fn a_burst_ends_when_quiet_or_after_max_burst() {
        let t = Instant::now();
        let b = Burst { first: t, last: t };
        assert_eq!(b.due(), t + DEBOUNCE);
        let long = Burst {
            first: t,
            last: t + MAX_BURST,
        };
        assert_eq!(long.due(), t + MAX_BURST);
    }

    /// A rename into the watched directory wakes it; reading its files
    /// does not.
    #[tokio::test]
    async fn an_edit_wakes_the_watch_and_a_read_does_not() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("routes")).unwrap();
        let w = DirWatch::new(d.path());
        assert!(w.is_armed());
        // Arming wakes once (changes made while not watched).
        tokio::time::timeout(Duration::from_secs(5), w.woken())
            .await
            .expect("armed");
        let tmp = d.path().join("routes/r.yaml.tmp");
        std::fs::write(&tmp, "routes: []\n").unwrap();
        std::fs::rename(&tmp, d.path().join("routes/r.yaml")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.woken())
            .await
            .expect("an edit in a subdirectory wakes the watch");
        // Drain what the edit left, then read: no wake-up.
        while tokio::time::timeout(Duration::from_millis(100), w.woken())
            .await
            .is_ok()
        {}
        std::fs::read(d.path().join("routes/r.yaml")).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), w.woken())
                .await
                .is_err(),
            "reading is not a change"
        );
    }

    #[tokio::test]
    async fn a_missing_directory_is_not_watched_and_is_tried_again() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("mesh");
        let mut w = DirWatch::new(&dir);
        assert!(!w.is_armed());
        assert!(w.failed.as_ref().is_some_and(|r| !r.is_empty()));
        w.maintain();
        assert!(!w.is_armed(), "still missing");
        std::fs::create_dir(&dir).unwrap();
        w.maintain();
        assert!(w.is_armed(), "armed once the directory exists");
        // Replaced by a new directory: the watch follows it.
        std::fs::rename(&dir, d.path().join("old")).unwrap();
        std::fs::create_dir(&dir).unwrap();
        let before = w.armed.as_ref().unwrap().1;
        w.maintain();
        assert_ne!(w.armed.as_ref().unwrap().1, before);
    }
}
