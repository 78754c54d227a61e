//! Stop signals and draining.
//!
//! [`Signals`] turns SIGTERM and SIGINT into a future (install once, then
//! [`Signals::recv`] as often as needed: a second signal can mean "now").
//! [`Drain`] is what the tasks of a process share to stop together: a stop
//! flag they can wait on ([`Drain::signaled`]) and a count of in-flight work
//! ([`Drain::guard`]) that [`Drain::drain`] waits for, up to a deadline.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

/// SIGTERM and SIGINT, installed.
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs the handlers (needs a Tokio runtime with I/O enabled).
    pub fn install() -> std::io::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT; says which (`"SIGTERM"`).
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct State {
    stopping: bool,
    in_flight: usize,
}

/// A stop flag and an in-flight count, shared by cloning.
#[derive(Debug, Clone)]
pub struct Drain {
    state: Arc<watch::Sender<State>>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        Drain {
            state: Arc::new(watch::Sender::new(State::default())),
        }
    }

    /// Asks every task to stop taking new work (idempotent).
    pub fn start(&self) {
        self.state
            .send_if_modified(|s| !std::mem::replace(&mut s.stopping, true));
    }

    pub fn is_draining(&self) -> bool {
        self.state.borrow().stopping
    }

    /// Resolves once [`Drain::start`] was called (at once if it was).
    pub async fn signaled(&self) {
        let mut rx = self.state.subscribe();
        // The sender lives in `self`, so the channel cannot close here.
        let _ = rx.wait_for(|s| s.stopping).await;
    }

    /// Counts one piece of in-flight work until the guard is dropped.
    pub fn guard(&self) -> Guard {
        self.state.send_modify(|s| s.in_flight += 1);
        Guard {
            state: self.state.clone(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.state.borrow().in_flight
    }

    /// Starts the drain, then waits until no work is in flight or
    /// `deadline` passed; `true` when everything finished in time.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.start();
        let mut rx = self.state.subscribe();
        let done = tokio::time::timeout(deadline, rx.wait_for(|s| s.in_flight == 0)).await;
        done.is_ok()
    }
}

/// One piece of in-flight work; see [`Drain::guard`].
#[derive(Debug)]
pub struct Guard {
    state: Arc<watch::Sender<State>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.state.send_modify(|s| s.in_flight -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_guards_up_to_the_deadline() {
        let d = Drain::new();
        let g1 = d.guard();
        let g2 = d.guard();
        assert_eq!(d.in_flight(), 2);
        assert!(!d.is_draining());
        let waiter = {
            let d = d.clone();
            tokio::spawn(async move { d.signaled().await })
        };
        let d2 = d.clone();
        let drained = tokio::spawn(async move { d2.drain(Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        waiter.await.unwrap();
        assert!(d.is_draining());
        drop(g1);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!drained.is_finished());
        drop(g2);
        assert!(drained.await.unwrap());
        assert_eq!(d.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_gives_up_at_the_deadline() {
        let d = Drain::new();
        let _stuck = d.guard();
        let t0 = tokio::time::Instant::now();
        assert!(!d.drain(Duration::from_secs(3)).await);
        assert_eq!(t0.elapsed(), Duration::from_secs(3));
        d.start(); // again: no change, no panic
        d.signaled().await;
    }

    #[tokio::test]
    async fn signals_install() {
        assert!(Signals::install().is_ok());
    }
}
