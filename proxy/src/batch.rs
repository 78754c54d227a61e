//! Lines handed from the request path to a writer thread without waking it
//! for every line (issue #19, latency): the access log and the decision
//! log.
//!
//! A channel wakes its receiver once per line: at 2,000 requests a second
//! that was 2,000 wake-ups of a writer thread per log and sidecar, each
//! taking the CPU from the worker thread the requests run on. Here a line is
//! appended to a shared buffer under a short lock; the writer takes the
//! whole buffer, writes it, and waits [`PAUSE`] before it looks again, so
//! under load it wakes at most 50 times a second whatever the rate. When a
//! look finds nothing the writer parks, and the first line after that wakes
//! it. A line waits at most [`PAUSE`] (plus the write) before it is written;
//! [`LineBatch::flush`] writes what is queued at once (before exit).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::Thread;
use std::time::Duration;

/// How long the writer waits after writing a batch before it takes the next.
pub const PAUSE: Duration = Duration::from_millis(20);

/// The queue between the request path and one writer thread.
pub struct LineBatch {
    buf: Mutex<Vec<u8>>,
    /// Bytes the buffer may hold; a line that does not fit is dropped.
    cap: usize,
    /// The writer is parked (or about to park): the next line must wake it.
    parked: AtomicBool,
    writer: OnceLock<Thread>,
    dropped: AtomicU64,
    /// Held while a batch is taken and written, by the writer thread or a
    /// flush, so that batches come out in order.
    writing: Mutex<()>,
}

impl LineBatch {
    /// An empty queue of at most `cap` bytes.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(LineBatch {
            buf: Mutex::new(Vec::new()),
            cap,
            parked: AtomicBool::new(false),
            writer: OnceLock::new(),
            dropped: AtomicU64::new(0),
            writing: Mutex::new(()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.buf.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `line` (with its newline). False when the queue is full: the
    /// line is dropped and counted, the request path never waits.
    pub fn push(&self, line: &[u8]) -> bool {
        let mut buf = self.lock();
        if buf.len() + line.len() > self.cap {
            drop(buf);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let was_empty = buf.is_empty();
        buf.extend_from_slice(line);
        drop(buf);
        if was_empty && self.parked.load(Ordering::SeqCst) {
            if let Some(t) = self.writer.get() {
                t.unpark();
            }
        }
        true
    }

    /// Lines dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Swaps the queued bytes into `into` (which must be empty).
    fn take(&self, into: &mut Vec<u8>) {
        std::mem::swap(&mut *self.lock(), into);
    }

    /// Writes what is queued now with `write`, in the caller's thread (before
    /// exit), after any batch the writer thread is writing.
    pub fn flush(&self, write: impl FnOnce(&[u8])) {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let mut batch = Vec::new();
        self.take(&mut batch);
        if !batch.is_empty() {
            write(&batch);
        }
    }

    /// The writer thread's loop: `write` gets each batch (whole lines) and
    /// runs while the caller's sink state is held. Never returns.
    pub fn run(self: Arc<Self>, mut write: impl FnMut(&[u8])) -> ! {
        let _ = self.writer.set(std::thread::current());
        let mut batch = Vec::new();
        loop {
            let writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
            self.take(&mut batch);
            if batch.is_empty() {
                drop(writing);
                self.parked.store(true, Ordering::SeqCst);
                // A line pushed before `parked` was set did not wake us:
                // look again before parking.
                if self.lock().is_empty() {
                    std::thread::park_timeout(Duration::from_secs(1));
                }
                self.parked.store(false, Ordering::SeqCst);
                continue;
            }
            write(&batch);
            drop(writing);
            batch.clear();
            std::thread::sleep(PAUSE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every line reaches the writer, in order, across parks and batches.
    #[test]
    fn every_line_arrives_in_order() {
        let batch = LineBatch::new(1 << 20);
        let got = Arc::new(Mutex::new(Vec::<u8>::new()));
        let (b, g) = (batch.clone(), got.clone());
        std::thread::spawn(move || b.run(move |bytes| g.lock().unwrap().extend_from_slice(bytes)));
        let mut want = Vec::new();
        for round in 0..5 {
            for i in 0..200 {
                let line = format!("round {round} line {i}\n");
                assert!(batch.push(line.as_bytes()));
                want.extend_from_slice(line.as_bytes());
            }
            // let the writer drain and park before the next round
            wait_for("the round written", || {
                got.lock().unwrap().len() == want.len()
            });
            std::thread::sleep(PAUSE * 3);
        }
        assert_eq!(*got.lock().unwrap(), want);
        assert_eq!(batch.dropped(), 0);
    }

    /// A full queue drops (and counts) the line instead of waiting.
    #[test]
    fn a_full_queue_drops_and_counts() {
        let batch = LineBatch::new(10);
        assert!(batch.push(b"12345\n"));
        assert!(!batch.push(b"67890\n"));
        assert!(batch.push(b"abc\n"));
        assert_eq!(batch.dropped(), 1);
        let mut out = Vec::new();
        batch.flush(|b| out.extend_from_slice(b));
        assert_eq!(out, b"12345\nabc\n");
        // flushed: room again
        assert!(batch.push(b"67890\n"));
    }

    /// `flush` writes what is queued at once, without the writer thread.
    #[test]
    fn flush_writes_what_is_queued() {
        let batch = LineBatch::new(1024);
        batch.push(b"a\n");
        batch.push(b"b\n");
        let mut out = Vec::new();
        batch.flush(|b| out.extend_from_slice(b));
        assert_eq!(out, b"a\nb\n");
        let mut again = Vec::new();
        batch.flush(|b| again.extend_from_slice(b));
        assert!(again.is_empty());
    }
}
