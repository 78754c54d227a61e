//! Per-endpoint circuit breaking (outlier detection) and endpoint choice for
//! one outbound route. The choice among the endpoints that can take a
//! request is [`crate::balancer::choose`] (power of two choices over a
//! latency EWMA, with weights); this module keeps the state it needs: each
//! endpoint's weight, latency estimate and requests in flight
//! ([`Endpoints::start`]).
//!
//! Every endpoint of a route has its own small state machine:
//!
//! ```text
//!            N failures in a row             ejection ran out,
//!            (and the max share allows)      next pick is the probe
//!   Closed ──────────────────────────▶ Open ─────────────────────▶ HalfOpen
//!     ▲                                 ▲                             │
//!     │         probe failed: re-eject  │                             │
//!     │         for twice as long       └─────────────────────────────┤
//!     │         (capped, jittered)                                    │
//!     └───────────────────────────────────────────────────────────────┘
//!                              probe succeeded
//! ```
//!
//! * **Closed**: the endpoint takes any request. Every failure (a 5xx or a
//!   connect failure; the caller classifies) adds one to a counter of
//!   consecutive failures and every success resets it. When the counter
//!   reaches [`BreakerConfig::consecutive_failures`] the endpoint is ejected,
//!   unless [`BreakerConfig::max_ejected_percent`] of the endpoints are
//!   already out; then it stays Closed with its counter kept, and the next
//!   failure tries again.
//! * **Open** (ejected): [`Endpoints::pick`] skips the endpoint. The first
//!   ejection lasts [`BreakerConfig::base_ejection`]; every further ejection
//!   in a row doubles it, up to [`BreakerConfig::max_ejection`]. The length
//!   is multiplied by a random factor in `[1, 1 + jitter]` so endpoints that
//!   failed together are not probed together; `max_ejection` stays a hard
//!   cap, also after jitter.
//! * **HalfOpen**: the ejection ran out. The next pick (that does not
//!   exclude the endpoint) gets it as a *probe* ([`Pick::probe`]); while the probe is out
//!   every other request skips the endpoint. A successful probe closes the
//!   circuit; a failed one re-ejects with the next, longer backoff. A probe
//!   that is never recorded (the request was cancelled) does not hold the
//!   endpoint forever: once it has been out for `base_ejection`, the next
//!   pick may send another probe. A successful probe also resets the
//!   endpoint's latency estimate, so it is back in rotation at once.
//!
//! The count of ejections in a row (what the doubling is based on) is
//! forgotten on sustained success: [`STREAK_RESET_SUCCESSES`] successes in a
//! row after the probe that closed the circuit, or staying Closed for
//! `max_ejection` (checked lazily, on the next result recorded). So an
//! endpoint that fails again right after coming back is ejected for longer,
//! and one that served well in between starts over at `base_ejection`: two
//! short crashes minutes apart each cost one short ejection, not a
//! compounding one.
//!
//! A result that says nothing about the endpoint's health (the peer refused
//! one malformed request) is recorded with [`Endpoints::release`]: it
//! neither counts as a failure nor resets the failure counter, and a probe
//! released this way is handed out again on the next pick.
//!
//! Results of requests that were picked before an endpoint was ejected and
//! complete while it is Open or probing are ignored: only the probe decides
//! whether an ejected endpoint comes back.
//!
//! When no endpoint can take a request (all ejected, or ejected and probing)
//! [`Endpoints::pick`] returns `None` and the proxy fails fast with a 503
//! (`circuit-open`).
//!
//! # Defaults compared
//!
//! | setting                 | here  | Envoy outlier detection     | Linkerd failure accrual |
//! |-------------------------|-------|-----------------------------|-------------------------|
//! | failures in a row       | 5     | `consecutive_5xx` 5         | 7                       |
//! | first ejection          | 5s    | `base_ejection_time` 30s    | backoff min 1s          |
//! | longest ejection        | 60s   | `max_ejection_time` 300s    | backoff max 60s         |
//! | failure statuses        | 502-4 | 5xx (`consecutive_5xx`)     | 5xx                     |
//! | jitter                  | 0.25  | none                        | 0.5                     |
//! | share ejected at most   | 50%   | `max_ejection_percent` 10%  | no limit                |
//!
//! Like Envoy, at least one endpoint may always be ejected, whatever the
//! percentage, so a single-endpoint route can open its circuit. The share
//! is higher than Envoy's 10% because mesh routes usually have few
//! endpoints (10% of 4 would round down to the one-endpoint minimum), and
//! the first ejection is shorter than Envoy's 30s so that a worker that
//! recovers quickly is back in rotation within seconds, closer to Linkerd;
//! the cap is Linkerd's 60s, not Envoy's 300s, so a flapping endpoint is
//! never out for minutes after it is healthy again.
//! Unlike Envoy, which sends ordinary traffic to an endpoint again once its
//! ejection has run out, the return goes through a single probe request,
//! as with Linkerd's failure accrual.

use std::cell::Cell;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::balancer::{self, Candidate, PeakEwma};

/// Settings of the breaker for one route.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Failures in a row that eject an endpoint (0 = never eject).
    pub consecutive_failures: u32,
    /// Length of the first ejection; doubles with each ejection in a row.
    pub base_ejection: Duration,
    /// Cap of the ejection length (also after jitter).
    pub max_ejection: Duration,
    /// 0..=100 (larger values count as 100): the share of the route's
    /// endpoints that may be ejected at once, rounded down; at least one
    /// endpoint may always be ejected.
    pub max_ejected_percent: u32,
    /// 0.0..=1.0 (values outside are clamped, NaN counts as 0): the
    /// ejection length is multiplied by a random factor in `[1, 1 + jitter]`.
    pub jitter: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 50,
            jitter: 0.25,
        }
    }
}

/// Successes in a row, after a probe closed the circuit, that make the
/// breaker forget the ejection streak (the next ejection is `base_ejection`
/// again).
pub const STREAK_RESET_SUCCESSES: u32 = 10;

/// The state of one endpoint's circuit, as reported for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Takes any request.
    Closed,
    /// Ejected; takes no request until the ejection runs out.
    Open,
    /// Ejection ran out: takes one probe request at a time.
    HalfOpen,
}

impl CircuitState {
    /// Value for a gauge metric: Closed 0, Open 1, HalfOpen 2.
    pub fn gauge(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
        }
    }

    /// Label for logs and metrics: `closed`, `open`, `half-open`.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half-open",
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The endpoint chosen for one request; hand it back to [`Endpoints::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    /// Index of the endpoint in the route.
    pub index: usize,
    /// This request is the single probe of a HalfOpen endpoint.
    pub probe: bool,
}

/// A change of an endpoint's circuit state, returned by
/// [`Endpoints::record`] for logging and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// Index of the endpoint in the route.
    pub index: usize,
    /// State before the change.
    pub from: CircuitState,
    /// State after the change.
    pub to: CircuitState,
    /// Length of the ejection when `to` is [`CircuitState::Open`].
    pub ejection: Option<Duration>,
}

/// Where one endpoint stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed,
    /// Ejected at `since` for `len`. Kept as a start and a length (not a
    /// deadline) so that no `Instant` addition can overflow.
    Open {
        since: Instant,
        len: Duration,
    },
    /// The ejection ran out and a probe was handed out at `since`.
    Probing {
        since: Instant,
    },
}

#[derive(Debug, Clone)]
struct Slot {
    phase: Phase,
    /// Consecutive failures while Closed.
    failures: u32,
    /// Ejections in a row: the exponent of the backoff.
    streak: u32,
    /// When a successful probe last closed the circuit.
    closed_at: Option<Instant>,
    /// Successes in a row since the circuit last closed (while a streak is
    /// remembered).
    successes: u32,
    /// Share of the traffic, relative to the route's other endpoints.
    weight: u32,
    /// The route's weighted backend this endpoint belongs to.
    group: u32,
    /// Latency estimate for the balancer.
    ewma: PeakEwma,
    /// Requests in flight ([`InFlight`] guards).
    pending: u32,
}

impl Slot {
    fn new(weight: u32, now: Instant) -> Self {
        Self {
            phase: Phase::Closed,
            failures: 0,
            streak: 0,
            closed_at: None,
            successes: 0,
            weight,
            group: 0,
            ewma: PeakEwma::new(now),
            pending: 0,
        }
    }

    fn is_ejected(&self) -> bool {
        !matches!(self.phase, Phase::Closed)
    }
}

#[derive(Debug)]
struct Table {
    slots: Vec<Slot>,
}

/// Breaker and balancer state for the n endpoints of one route.
///
/// All methods take `&self`; share it between tasks behind an `Arc`. One
/// mutex guards the whole route, held only for a scan of the endpoints.
#[derive(Debug)]
pub struct Endpoints {
    cfg: BreakerConfig,
    /// Sanitised `cfg.jitter`.
    jitter: f64,
    max_ejected: usize,
    table: Arc<Mutex<Table>>,
}

impl Endpoints {
    /// Breaker state for `n` endpoints of weight 1, all Closed.
    pub fn new(n: usize, cfg: BreakerConfig) -> Self {
        Self::weighted(&vec![1; n], cfg)
    }

    /// Breaker state for endpoints of the given weights (0 counts as 1),
    /// all Closed.
    pub fn weighted(weights: &[u32], cfg: BreakerConfig) -> Self {
        let grouped: Vec<(u32, u32)> = weights.iter().map(|w| (*w, 0)).collect();
        Self::grouped(&grouped, cfg)
    }

    /// Breaker state for endpoints of the given (weight, backend group).
    pub fn grouped(weights: &[(u32, u32)], cfg: BreakerConfig) -> Self {
        let n = weights.len();
        let now = Instant::now();
        let pct = cfg.max_ejected_percent.min(100) as usize;
        let max_ejected = (n.saturating_mul(pct) / 100).max(1);
        let jitter = if cfg.jitter > 0.0 {
            cfg.jitter.min(1.0)
        } else {
            0.0 // negative or NaN
        };
        Self {
            cfg,
            jitter,
            max_ejected,
            table: Arc::new(Mutex::new(Table {
                slots: weights
                    .iter()
                    .map(|(w, g)| {
                        let mut s = Slot::new((*w).max(1), now);
                        s.group = *g;
                        s
                    })
                    .collect(),
            })),
        }
    }

    /// The settings this breaker was made with.
    pub fn config(&self) -> &BreakerConfig {
        &self.cfg
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    /// No endpoints at all: [`Endpoints::pick`] always returns `None`.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many endpoints may be ejected at once.
    pub fn max_ejected(&self) -> usize {
        self.max_ejected
    }

    /// Chooses among the endpoints that can take a request now, skipping
    /// the indices in `exclude` (endpoints this request already tried)
    /// unless no other endpoint can take it.
    ///
    /// An Open endpoint whose ejection has run out becomes HalfOpen and
    /// takes exactly one probe request at a time (`Pick::probe == true`);
    /// it goes before any other endpoint, and other requests skip it. A
    /// probe that has been out for `base_ejection` without being recorded
    /// counts as lost, and another probe may be given. Among the Closed
    /// endpoints the balancer chooses ([`crate::balancer::choose`]: power of
    /// two choices by weight and latency cost).
    ///
    /// `None`: no endpoint can take a request (all ejected or probing); the
    /// caller answers 503 `circuit-open`.
    pub fn pick(&self, exclude: &[usize]) -> Option<Pick> {
        let now = Instant::now();
        let probe_timeout = self.cfg.base_ejection;
        let mut table = self.lock();
        // This thread's candidate vector, reused: no allocation per pick.
        let mut scratch = CANDIDATES.try_with(|c| c.take()).unwrap_or_default();
        let pick = pick_in(&mut table, exclude, now, probe_timeout, &mut scratch);
        scratch.clear();
        let _ = CANDIDATES.try_with(|c| c.set(scratch));
        pick
    }

    /// Counts a request sent to endpoint `index` as in flight until the
    /// guard is finished or dropped; its latency runs from now (or from
    /// [`InFlight::sent`]).
    pub fn start(&self, index: usize) -> InFlight {
        if let Some(slot) = self.lock().slots.get_mut(index) {
            slot.pending = slot.pending.saturating_add(1);
        }
        InFlight {
            table: Arc::clone(&self.table),
            index,
            since: Instant::now(),
        }
    }

    /// The latency estimate of endpoint `index` in seconds (for metrics);
    /// `None` for an index out of range.
    pub fn latency_estimate(&self, index: usize) -> Option<f64> {
        let now = Instant::now();
        self.lock().slots.get(index).map(|s| s.ewma.estimate(now))
    }

    /// The result of a request sent to `pick`: `success` is a response that
    /// is neither a 5xx nor a connect failure (the caller classifies).
    ///
    /// * Closed endpoint: a success resets the consecutive-failure counter;
    ///   a failure increments it, and reaching the threshold ejects the
    ///   endpoint if the max share allows (else it stays Closed with the
    ///   counter kept, and the next failure tries again).
    /// * The probe of a HalfOpen endpoint: success closes the circuit and
    ///   resets the counter; failure re-ejects with the next (doubled,
    ///   capped, jittered) backoff.
    /// * Results that arrive while the endpoint is Open, non-probe results
    ///   while it is probing, and unknown indices are ignored. Only the
    ///   first probe result counts; a later one (from a probe that had been
    ///   given up on) is treated like an ordinary request if the endpoint
    ///   is Closed again by then, and ignored otherwise.
    ///
    /// Returns `Some` when the state changed, for logging and metrics.
    pub fn record(&self, pick: Pick, success: bool) -> Option<Transition> {
        let now = Instant::now();
        let mut table = self.lock();
        let index = pick.index;
        let ejected = table.slots.iter().filter(|s| s.is_ejected()).count();
        let slot = table.slots.get_mut(index)?;
        match slot.phase {
            Phase::Probing { .. } if pick.probe => {
                if success {
                    slot.phase = Phase::Closed;
                    slot.failures = 0;
                    slot.closed_at = Some(now);
                    slot.ewma = PeakEwma::new(now);
                    Some(Transition {
                        index,
                        from: CircuitState::HalfOpen,
                        to: CircuitState::Closed,
                        ejection: None,
                    })
                } else {
                    let len = self.eject(slot, now);
                    Some(Transition {
                        index,
                        from: CircuitState::HalfOpen,
                        to: CircuitState::Open,
                        ejection: Some(len),
                    })
                }
            }
            Phase::Closed => {
                if let Some(at) = slot.closed_at {
                    if now.saturating_duration_since(at) >= self.cfg.max_ejection {
                        slot.streak = 0;
                        slot.closed_at = None;
                    }
                }
                if success {
                    slot.failures = 0;
                    if slot.streak > 0 {
                        slot.successes = slot.successes.saturating_add(1);
                        if slot.successes >= STREAK_RESET_SUCCESSES {
                            slot.streak = 0;
                            slot.successes = 0;
                            slot.closed_at = None;
                        }
                    }
                    return None;
                }
                slot.successes = 0;
                slot.failures = slot.failures.saturating_add(1);
                let threshold = self.cfg.consecutive_failures;
                if threshold == 0 || slot.failures < threshold || ejected >= self.max_ejected {
                    return None;
                }
                let len = self.eject(slot, now);
                Some(Transition {
                    index,
                    from: CircuitState::Closed,
                    to: CircuitState::Open,
                    ejection: Some(len),
                })
            }
            Phase::Open { .. } | Phase::Probing { .. } => None,
        }
    }

    /// The request sent to `pick` ended in a way that says nothing about
    /// the endpoint (the peer refused that one request as malformed, say):
    /// no failure is counted and the failure counter is kept. A probe
    /// released this way does not hold the endpoint: the next pick may
    /// send another.
    pub fn release(&self, pick: Pick) {
        let mut table = self.lock();
        if let Some(slot) = table.slots.get_mut(pick.index) {
            if pick.probe {
                if let Phase::Probing { .. } = slot.phase {
                    slot.phase = Phase::Open {
                        since: Instant::now(),
                        len: Duration::ZERO,
                    };
                }
            }
        }
    }

    /// The state of endpoint `index`: Open while its ejection runs,
    /// HalfOpen once the ejection has run out (whether or not a probe has
    /// been handed out yet) until the probe's result closes or re-opens it.
    /// An index out of range reports Closed.
    pub fn state(&self, index: usize) -> CircuitState {
        let now = Instant::now();
        let table = self.lock();
        table
            .slots
            .get(index)
            .map_or(CircuitState::Closed, |slot| report(slot, now))
    }

    /// [`Endpoints::state`] of every endpoint, in index order.
    pub fn states(&self) -> Vec<CircuitState> {
        let now = Instant::now();
        let table = self.lock();
        table.slots.iter().map(|slot| report(slot, now)).collect()
    }

    /// Number of endpoints not Closed (Open or HalfOpen); these count
    /// against the max ejected share.
    pub fn ejected(&self) -> usize {
        let table = self.lock();
        table.slots.iter().filter(|s| s.is_ejected()).count()
    }

    /// Ejects `slot` now with the next backoff; returns its length.
    fn eject(&self, slot: &mut Slot, now: Instant) -> Duration {
        slot.streak = slot.streak.saturating_add(1);
        slot.failures = 0;
        slot.successes = 0;
        slot.closed_at = None;
        let len = self.ejection_len(slot.streak);
        slot.phase = Phase::Open { since: now, len };
        len
    }

    /// Length of ejection number `streak` (1-based) in a row:
    /// `base · 2^(streak-1)`, times the jitter factor, capped at `max`.
    fn ejection_len(&self, streak: u32) -> Duration {
        let max = self.cfg.max_ejection;
        let shift = streak.saturating_sub(1).min(31);
        let raw = self
            .cfg
            .base_ejection
            .checked_mul(1u32 << shift)
            .unwrap_or(max)
            .min(max);
        if self.jitter == 0.0 || raw.is_zero() {
            return raw;
        }
        let factor = 1.0 + self.jitter * rand::random::<f64>();
        Duration::try_from_secs_f64(raw.as_secs_f64() * factor)
            .unwrap_or(max)
            .min(max)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request in flight to one endpoint, from [`Endpoints::start`]: counted
/// in the endpoint's cost until finished or dropped (a cancelled request
/// stops counting without a sample).
#[derive(Debug)]
pub struct InFlight {
    table: Arc<Mutex<Table>>,
    index: usize,
    since: Instant,
}

impl InFlight {
    /// The request went out now (connection ready): its latency runs from
    /// here, so connect and TLS handshake time does not count.
    pub fn sent(&mut self) {
        self.since = Instant::now();
    }

    /// The attempt's outcome for the balancer: `served` (response headers
    /// arrived and the endpoint is not failing) feeds the latency since
    /// [`InFlight::sent`] into the estimate; otherwise the estimate is
    /// doubled. Returns the new estimate in seconds.
    pub fn finish(self, served: bool) -> Option<f64> {
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let slot = table.slots.get_mut(self.index)?;
        if served {
            slot.ewma
                .observe(now.saturating_duration_since(self.since), now);
        } else {
            slot.ewma.penalize(now);
        }
        Some(slot.ewma.estimate(now))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = table.slots.get_mut(self.index) {
            slot.pending = slot.pending.saturating_sub(1);
        }
    }
}

/// [`Endpoints::pick`] on the locked table, with `cands` as scratch space.
fn pick_in(
    table: &mut Table,
    exclude: &[usize],
    now: Instant,
    probe_timeout: Duration,
    cands: &mut Vec<Candidate>,
) -> Option<Pick> {
    // First pass honours `exclude`; the second (only worth it when
    // something was excluded) lets a retry go back to a tried endpoint.
    for honour_exclude in [true, false] {
        if !honour_exclude && exclude.is_empty() {
            break;
        }
        cands.clear();
        for (index, slot) in table.slots.iter_mut().enumerate() {
            if honour_exclude && exclude.contains(&index) {
                continue;
            }
            match admit(slot, now, probe_timeout) {
                Some(true) => return Some(Pick { index, probe: true }),
                Some(false) => cands.push(Candidate {
                    index,
                    weight: slot.weight,
                    group: slot.group,
                    cost: balancer::cost(slot.ewma.estimate(now), slot.pending),
                }),
                None => {}
            }
        }
        if let Some(index) = balancer::choose(cands, rand::random()) {
            return Some(Pick {
                index,
                probe: false,
            });
        }
    }
    None
}

thread_local! {
    /// [`Endpoints::pick`]'s candidates, kept between picks.
    static CANDIDATES: Cell<Vec<Candidate>> = const { Cell::new(Vec::new()) };
}

/// Whether `slot` can take a request now: `Some(probe)` if so. Turns an
/// Open slot whose ejection ran out (or a probe that was lost) into a
/// fresh probe.
fn admit(slot: &mut Slot, now: Instant, probe_timeout: Duration) -> Option<bool> {
    match slot.phase {
        Phase::Closed => Some(false),
        Phase::Open { since, len } if now.saturating_duration_since(since) >= len => {
            slot.phase = Phase::Probing { since: now };
            Some(true)
        }
        Phase::Probing { since } if now.saturating_duration_since(since) >= probe_timeout => {
            slot.phase = Phase::Probing { since: now };
            Some(true)
        }
        Phase::Open { .. } | Phase::Probing { .. } => None,
    }
}

fn report(slot: &Slot, now: Instant) -> CircuitState {
    match slot.phase {
        Phase::Closed => CircuitState::Closed,
        Phase::Open { since, len } if now.saturating_duration_since(since) < len => {
            CircuitState::Open
        }
        Phase::Open { .. } | Phase::Probing { .. } => CircuitState::HalfOpen,
    }
}

#[cfg(test)]
mod tests;
