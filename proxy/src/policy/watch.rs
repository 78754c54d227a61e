//! Whether a policy directory may have changed since the last look, from
//! the files' names, sizes and modification times alone.
//!
//! Reading a bundle means reading, hashing and parsing every file (the data
//! documents are YAML); doing that every `reload_interval` cost more than
//! many requests' worth of CPU. A fingerprint is one `stat` per file. It is
//! trusted only when every file is older than [`RACY`]: a file written
//! within that window could be rewritten with the same size and time stamp
//! (time stamps are only as fine as the kernel's coarse clock), so then the
//! bundle is read in full, as git does for its "racily clean" entries.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How recent a change makes the fingerprint untrusted.
const RACY: Duration = Duration::from_secs(2);

/// Every entry under a directory: path, size, modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(Vec<(PathBuf, u64, SystemTime)>);

impl Fingerprint {
    /// The directory's fingerprint, or `None` when it cannot be taken
    /// (then the bundle is read, and reports the error) or is too recent
    /// to be trusted.
    pub fn take(dir: &Path) -> Option<Fingerprint> {
        let mut entries = Vec::new();
        walk(dir, &mut entries, 0)?;
        entries.sort();
        let now = SystemTime::now();
        let settled = entries
            .iter()
            .all(|(_, _, mtime)| now.duration_since(*mtime).is_ok_and(|age| age >= RACY));
        settled.then_some(Fingerprint(entries))
    }
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64, SystemTime)>, depth: u32) -> Option<()> {
    // Bundle::read reports a loop or an absurd depth; here it only means
    // "read it".
    if depth > 16 {
        return None;
    }
    let meta = std::fs::metadata(dir).ok()?;
    out.push((dir.to_path_buf(), meta.len(), meta.modified().ok()?));
    for entry in std::fs::read_dir(dir).ok()? {
        let path = entry.ok()?.path();
        let meta = std::fs::metadata(&path).ok()?;
        if meta.is_dir() {
            walk(&path, out, depth + 1)?;
        } else {
            out.push((path, meta.len(), meta.modified().ok()?));
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age(path: &Path, secs: u64) {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(secs))
            .unwrap();
    }

    #[test]
    fn a_settled_directory_has_a_fingerprint_that_any_change_moves() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.rego");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let b = dir.path().join("sub/data.yaml");
        std::fs::write(&a, "package a\n").unwrap();
        std::fs::write(&b, "x: 1\n").unwrap();
        // Just written: too recent to trust.
        assert_eq!(Fingerprint::take(dir.path()), None);
        let settle = || {
            for p in [&a, &b] {
                age(p, 60);
            }
            for d in [dir.path().to_path_buf(), dir.path().join("sub")] {
                let f = std::fs::File::open(&d).unwrap();
                f.set_modified(SystemTime::now() - Duration::from_secs(60))
                    .unwrap();
            }
        };
        settle();
        let first = Fingerprint::take(dir.path()).expect("settled");
        assert_eq!(Fingerprint::take(dir.path()), Some(first.clone()));
        // Same size, older time stamp: still a change.
        std::fs::write(&b, "x: 2\n").unwrap();
        age(&b, 30);
        let second = Fingerprint::take(dir.path()).expect("settled");
        assert_ne!(first, second);
        // A new file in a subdirectory.
        std::fs::write(dir.path().join("sub/more.yaml"), "y: 1\n").unwrap();
        settle();
        age(&dir.path().join("sub/more.yaml"), 60);
        assert_ne!(Fingerprint::take(dir.path()), Some(second));
    }
}
