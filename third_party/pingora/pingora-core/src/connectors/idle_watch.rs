// Copyright 2026 Cloudflare, Inc.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
// http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

//! Idle watchers started a moment after a connection's release.
//!
//! crank patch 12 (issue #19): every connection released to a keep-alive
//! pool got a task of its own at once (`idle_poll` for a TCP/TLS stream,
//! `idle_timeout` for an h2 connection), to notice the peer closing it and
//! to enforce the idle timeout. On a busy pool the next request takes the
//! connection back within microseconds, so nearly every one of those tasks
//! was spawned, polled once, woken by the reuse and dropped: 4–6k
//! instructions and two allocations per request.
//!
//! Here a release only queues what its watcher needs ([`IdleWatch`]). One
//! drain task per thread that released something wakes every
//! [`WATCH_DELAY`] and starts the watchers of the connections still idle;
//! those already taken again cost nothing more. A pooled connection is
//! therefore watched from between 0 and `WATCH_DELAY` after its release
//! instead of at once: its idle timeout still counts from the release, and
//! a connection that the peer closes in that window is still refused on
//! reuse (`test_reusable_stream`, `is_closed`), as it was before when a
//! request came before the watcher had run.

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

/// How long after its release an idle connection may wait for its watcher.
pub(crate) const WATCH_DELAY: Duration = Duration::from_millis(50);

/// A released connection whose watcher has not started.
pub(crate) trait IdleWatch: Send + 'static {
    /// Start the watcher, unless the connection has left the pool since its
    /// release (taken again, evicted or closed).
    fn start(self);
}

struct Queue<W> {
    due: Vec<W>,
    draining: bool,
}

/// Released connections waiting for their watchers; one per thread, so that
/// a release contends only with its own thread's drain.
pub(crate) struct Deferred<W> {
    queue: Arc<Mutex<Queue<W>>>,
}

impl<W: IdleWatch> Deferred<W> {
    pub(crate) fn new() -> Self {
        Deferred {
            queue: Arc::new(Mutex::new(Queue {
                due: Vec::new(),
                draining: false,
            })),
        }
    }

    /// Queue `watch`; the first one queued while no drain runs starts one.
    pub(crate) fn push(&self, watch: W) {
        let mut queue = self.queue.lock();
        queue.due.push(watch);
        if queue.draining {
            return;
        }
        queue.draining = true;
        drop(queue);
        let queue = self.queue.clone();
        pingora_runtime::current_handle().spawn(drain(queue));
    }
}

/// Every `WATCH_DELAY`, start what was queued; stop once a wait queued
/// nothing (the next release starts a new drain).
async fn drain<W: IdleWatch>(queue: Arc<Mutex<Queue<W>>>) {
    let mut batch = Vec::new();
    loop {
        pingora_timeout::sleep(WATCH_DELAY).await;
        {
            let mut queue = queue.lock();
            if queue.due.is_empty() {
                queue.draining = false;
                return;
            }
            std::mem::swap(&mut queue.due, &mut batch);
        }
        for watch in batch.drain(..) {
            watch.start();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(Arc<AtomicUsize>);

    impl IdleWatch for Count {
        fn start(self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn queued_watches_start_after_the_delay_and_the_drain_stops_when_idle() {
        let started = Arc::new(AtomicUsize::new(0));
        let deferred = Deferred::new();
        for _ in 0..3 {
            deferred.push(Count(started.clone()));
        }
        assert_eq!(
            started.load(Ordering::SeqCst),
            0,
            "nothing starts at release"
        );
        tokio::time::sleep(WATCH_DELAY * 3).await;
        assert_eq!(started.load(Ordering::SeqCst), 3);
        // the drain found an empty queue and stopped; a new push starts another
        tokio::time::sleep(WATCH_DELAY * 2).await;
        assert!(!deferred.queue.lock().draining);
        deferred.push(Count(started.clone()));
        assert!(deferred.queue.lock().draining);
        tokio::time::sleep(WATCH_DELAY * 3).await;
        assert_eq!(started.load(Ordering::SeqCst), 4);
    }
}
