//! Load shedding: a concurrency limit with a bounded, timed wait queue.
//! A request beyond `max_concurrent` waits for a slot if fewer than
//! `max_queue` already wait, for at most `queue_timeout`; otherwise it is
//! refused at once (503 `overloaded` or `queue-timeout`, with
//! `Retry-After`), without touching the upstream. Waiters are served in
//! arrival order (tokio's semaphore is fair).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crank_api::proxy::ConcurrencyConfig;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a request was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// Every slot is taken and the queue is full.
    QueueFull,
    /// The request waited `queue_timeout` without getting a slot.
    QueueTimeout,
}

impl Shed {
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::QueueFull => "queue-full",
            Shed::QueueTimeout => "queue-timeout",
        }
    }
}

#[derive(Debug)]
pub struct Limiter {
    slots: Arc<Semaphore>,
    max: u32,
    waiting: AtomicU32,
    max_queue: u32,
    queue_timeout: Duration,
    /// Sent as `Retry-After` with the 503.
    pub retry_after: Duration,
}

/// Held for as long as the request runs; dropping it frees the slot.
pub type Permit = OwnedSemaphorePermit;

/// Counts a waiter; the count drops even when the waiting request is
/// cancelled (the caller went away).
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Limiter {
    pub fn new(cfg: &ConcurrencyConfig) -> Self {
        Limiter {
            slots: Arc::new(Semaphore::new(cfg.max_concurrent as usize)),
            max: cfg.max_concurrent,
            waiting: AtomicU32::new(0),
            max_queue: cfg.max_queue,
            queue_timeout: cfg.queue_timeout,
            retry_after: cfg.retry_after,
        }
    }

    /// A slot now, a slot after waiting in the queue, or why not.
    pub async fn acquire(&self) -> Result<Permit, Shed> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Shed::QueueFull);
        }
        let _waiting = Waiting(&self.waiting);
        match tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(Shed::QueueTimeout),
        }
    }

    /// Requests holding a slot.
    pub fn in_use(&self) -> u32 {
        self.max
            .saturating_sub(self.slots.available_permits() as u32)
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(max: u32, queue: u32, timeout_ms: u64) -> Arc<Limiter> {
        Arc::new(Limiter::new(&ConcurrencyConfig {
            max_concurrent: max,
            max_queue: queue,
            queue_timeout: Duration::from_millis(timeout_ms),
            retry_after: Duration::from_secs(1),
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_is_refused_at_once() {
        let l = limiter(2, 0, 1000);
        let a = l.acquire().await.unwrap();
        let _b = l.acquire().await.unwrap();
        assert_eq!(l.in_use(), 2);
        let t0 = tokio::time::Instant::now();
        assert_eq!(l.acquire().await.unwrap_err(), Shed::QueueFull);
        assert_eq!(t0.elapsed(), Duration::ZERO, "refused without waiting");
        drop(a);
        assert!(l.acquire().await.is_ok(), "a freed slot is taken");
    }

    #[tokio::test(start_paused = true)]
    async fn queued_request_gets_a_freed_slot_or_times_out() {
        let l = limiter(1, 1, 500);
        let first = l.acquire().await.unwrap();
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.acquire().await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert_eq!(l.waiting(), 1);
        // A second waiter finds the queue full.
        assert_eq!(l.acquire().await.unwrap_err(), Shed::QueueFull);
        tokio::time::advance(Duration::from_millis(200)).await;
        drop(first);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!(l.waiting(), 0);

        let _held = l.acquire().await.unwrap();
        let t0 = tokio::time::Instant::now();
        assert_eq!(l.acquire().await.unwrap_err(), Shed::QueueTimeout);
        assert_eq!(t0.elapsed(), Duration::from_millis(500));
        assert_eq!(l.waiting(), 0, "a timed-out waiter leaves the queue");
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiter_leaves_the_queue() {
        let l = limiter(1, 1, 10_000);
        let _held = l.acquire().await.unwrap();
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.acquire().await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert_eq!(l.waiting(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(l.waiting(), 0);
    }
}
