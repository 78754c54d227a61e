//! Unmaps the start-up code of the binary once the sidecar is running
//! (issue #19, memory).
//!
//! A sidecar touches a few MiB of its 14 MiB of code and 4 MiB of read-only
//! data while it starts (config parsing, rustls and regorus set-up, the
//! listeners) and far less per request; the kernel maps those pages 64 KiB
//! at a time (fault-around) and keeps them in the process's RSS. A few
//! seconds after start, this drops the process's page-table entries for its
//! own executable's read-only mappings (`madvise(MADV_DONTNEED)`): the pages
//! stay in the page cache (shared with every other sidecar on the host,
//! reclaimable), and the request path maps back what it runs, once, with a
//! minor fault. Only mappings that are not writable and hold no private
//! (copy-on-write) page are touched: for those, dropping the entries cannot
//! change a byte the process sees. The relocated read-only data (RELRO),
//! the heap and the libraries are left alone. `CRANK_TRIM_TEXT=0` turns it
//! off.

use std::time::Duration;

/// An address range `[start, end)` of a mapping.
type Range = (usize, usize);

/// Starts a thread that trims once, `after` the call.
pub fn spawn(after: Duration) {
    if std::env::var("CRANK_TRIM_TEXT").as_deref() == Ok("0") {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("crank-trim".into())
        .spawn(move || {
            std::thread::sleep(after);
            match trim() {
                Ok(bytes) => {
                    tracing::debug!(bytes, "start-up pages of the binary unmapped")
                }
                Err(e) => tracing::debug!(error = %e, "start-up pages of the binary kept"),
            }
        });
    if let Err(e) = spawned {
        tracing::debug!(error = %e, "no trim thread; start-up pages of the binary kept");
    }
}

/// Drops this process's page-table entries for the read-only, unmodified
/// mappings of its executable; returns the bytes of address space advised.
pub fn trim() -> std::io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut bytes = 0;
    for (start, end) in droppable(&smaps, &exe.to_string_lossy()) {
        // SAFETY: [start, end) is a whole mapping of this executable that is
        // not writable and holds no anonymous (copy-on-write) page, as
        // /proc/self/smaps said just now; nothing makes such a mapping
        // writable later. MADV_DONTNEED on a private file mapping only drops
        // page-table entries: the next access maps the same page-cache page
        // again, with the same bytes. No Rust object lives in it.
        let rc =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        bytes += end - start;
    }
    Ok(bytes)
}

/// The mappings of `exe` in `smaps` (the text of /proc/PID/smaps) that may
/// be dropped: not writable, private, and with `Anonymous: 0 kB`.
fn droppable(smaps: &str, exe: &str) -> Vec<Range> {
    let mut out = Vec::new();
    // The mapping being read: its range, whether its header qualifies, and
    // whether an `Anonymous: 0 kB` line was seen (required: without it
    // nothing says the mapping is unmodified).
    let mut current: Option<(Range, bool, bool)> = None;
    let mut flush = |current: &mut Option<(Range, bool, bool)>| {
        if let Some((range, true, true)) = current.take() {
            out.push(range);
        }
    };
    for line in smaps.lines() {
        if let Some((range, ok)) = mapping_header(line, exe) {
            flush(&mut current);
            current = Some((range, ok, false));
        } else if let Some(kb) = line.strip_prefix("Anonymous:") {
            if let Some((_, ok, unmodified)) = current.as_mut() {
                *unmodified = kb.trim() == "0 kB";
                *ok &= *unmodified;
            }
        }
    }
    flush(&mut current);
    out
}

/// A header line (`start-end perms offset dev inode path`): the range, and
/// whether it is a private, non-writable mapping of `exe`. `None` for the
/// other lines of an entry.
fn mapping_header(line: &str, exe: &str) -> Option<(Range, bool)> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    if perms.len() != 4 || end <= start {
        return None;
    }
    let path = fields.nth(3).unwrap_or("");
    let ok = path == exe && !perms.contains('w') && perms.ends_with('p');
    Some(((start, end), ok))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0400000 r--p 00000000 fd:01 1234 /opt/crank/crank-proxy
Size:               4096 kB
Rss:                3000 kB
Anonymous:             0 kB
55d0a0400000-55d0a1200000 r-xp 00400000 fd:01 1234 /opt/crank/crank-proxy
Size:              14336 kB
Anonymous:             0 kB
55d0a1200000-55d0a1400000 r--p 01200000 fd:01 1234 /opt/crank/crank-proxy
Size:               2048 kB
Anonymous:          1612 kB
55d0a1400000-55d0a1410000 rw-p 01400000 fd:01 1234 /opt/crank/crank-proxy
Anonymous:            64 kB
55d0a2000000-55d0a2100000 rw-p 00000000 00:00 0 [heap]
Anonymous:          1024 kB
7f0000000000-7f0000100000 r-xp 00000000 fd:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7f0000200000-7f0000210000 r--s 00000000 fd:01 1234 /opt/crank/crank-proxy
Anonymous:             0 kB
";

    /// Only the executable's private read-only mappings without a private
    /// page: not RELRO (relocated), not its data, not the heap or libc, not
    /// a shared mapping.
    #[test]
    fn only_unmodified_read_only_mappings_of_the_binary() {
        assert_eq!(
            droppable(SMAPS, "/opt/crank/crank-proxy"),
            vec![
                (0x55d0_a000_0000, 0x55d0_a040_0000),
                (0x55d0_a040_0000, 0x55d0_a120_0000)
            ]
        );
        assert!(droppable(SMAPS, "/other").is_empty());
        assert!(droppable("", "/opt/crank/crank-proxy").is_empty());
        // Without an `Anonymous:` line nothing says a mapping is
        // unmodified: it is kept.
        let bare = "1000-2000 r-xp 00000000 fd:01 1 /x\n3000-4000 r-xp 00000000 fd:01 1 /x\nAnonymous: 0 kB\n";
        assert_eq!(droppable(bare, "/x"), vec![(0x3000, 0x4000)]);
    }

    /// On this (test) process: the code and read-only data run and read
    /// the same after the trim.
    #[test]
    fn the_process_runs_on_after_a_trim() {
        const TEXT: &str = "read-only data survives the trim";
        let before: u64 = (1..=1000u64).map(|i| i * i).sum();
        let bytes = trim().expect("trim on Linux");
        assert!(bytes > 0, "the test binary has read-only mappings");
        let after: u64 = (1..=1000u64).map(|i| i * i).sum();
        assert_eq!(before, after);
        assert_eq!(
            std::hint::black_box(TEXT),
            "read-only data survives the trim"
        );
        // And again: a second trim is as harmless as the first.
        assert!(trim().expect("second trim") > 0);
    }
}
