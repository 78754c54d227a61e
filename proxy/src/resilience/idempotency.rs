//! `Idempotency-Key` support for the inbound sidecar
//! (IETF draft-ietf-httpapi-idempotency-key-header).
//!
//! A non-idempotent request (POST, PATCH) that carries an `Idempotency-Key`
//! header may be retried by its client after a timeout or a dropped
//! connection. The proxy makes such retries safe: the first request with a
//! key runs, and the first complete response it produces is stored for a TTL
//! (one hour by default, counted from completion). Within that TTL:
//!
//! * a duplicate request gets the stored response replayed instead of
//!   reaching the application a second time;
//! * a duplicate that arrives while the first request is still in flight
//!   waits for it ([`InFlight::wait`]) and then gets its response; the caller
//!   may instead answer `409 Conflict` straight away if so configured;
//! * a duplicate whose method, path or body differs from the first request
//!   (compared by [`Completed::request_hash`], built with [`RequestHasher`])
//!   is a client error: the caller answers `422 Unprocessable Content`.
//!
//! The module does not build keys itself: the caller scopes the header value
//! by tenant and route and passes the resulting string, so two tenants (or
//! two routes) using the same header value never see each other's responses.
//!
//! Flow, as seen by the caller:
//!
//! 1. [`begin`] looks the key up. [`Begin::First`] hands out a [`Claim`]; the
//!    request is forwarded, and once its response is complete the caller
//!    calls [`Claim::complete`]. Dropping a claim without completing it (the
//!    upstream failed, the client went away) abandons the key: the entry is
//!    removed, waiting duplicates learn [`WaitOutcome::Abandoned`], and the
//!    next request with the key runs again.
//! 2. [`Begin::Done`] carries the stored outcome. Its `response` is `None`
//!    when the first response was larger than
//!    [`StoreLimits::max_response_bytes`]: it cannot be replayed, and the
//!    caller answers `409` saying so rather than running the request twice.
//! 3. [`Begin::InFlight`] means another request with the key is running.
//! 4. [`Begin::Full`] means the store is at capacity and nothing can be
//!    evicted (every entry is in flight); the caller answers `503`.
//!
//! Memory is bounded by entry count, total bytes and per-response size.
//! When a claim or a completion would exceed a bound, expired entries are
//! dropped first, then the oldest completed entries (in completion order).
//! In-flight entries are never evicted. The bytes of an entry are its key
//! length plus, once completed, the stored header names, header values and
//! body.
//!
//! Storage sits behind the object-safe [`IdempotencyStore`] trait
//! (used as `Arc<dyn IdempotencyStore>`), so a store shared between replicas
//! (Redis and the like) can follow the in-process [`MemoryStore`]. The trait
//! is synchronous; waiting is expressed through a tokio `watch` receiver
//! returned in [`Lookup::InFlight`], which a networked store can feed from a
//! task of its own.
//!
//! Time is measured with [`tokio::time::Instant`], so paused-time tests (and
//! `tokio::time::advance`) drive TTLs. Expired entries are invisible to
//! [`begin`]; they are removed lazily and by [`IdempotencyStore::sweep`],
//! which the integrator calls periodically.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use ring::digest;
use tokio::sync::watch;
use tokio::time::Instant;

/// Default time a completed response is kept for replay.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60 * 60);

/// A response kept for replay.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, Bytes)>,
    pub body: Bytes,
}

impl StoredResponse {
    /// Bytes this response accounts for: header names and values plus body.
    pub fn size(&self) -> usize {
        self.headers
            .iter()
            .fold(self.body.len(), |acc, (name, value)| {
                acc.saturating_add(name.len()).saturating_add(value.len())
            })
    }
}

/// What the first request with a key produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Completed {
    /// SHA-256 over the request's method, path and body (see RequestHasher).
    pub request_hash: [u8; 32],
    /// None: the response was larger than `max_response_bytes`, so it cannot
    /// be replayed (the caller answers duplicates with 409 and says why).
    pub response: Option<StoredResponse>,
}

/// Bounds of a store.
#[derive(Debug, Clone)]
pub struct StoreLimits {
    /// How long a completed response is kept, counted from completion.
    pub ttl: Duration,
    /// Most entries (completed and in flight) held at once.
    pub max_entries: usize,
    /// Most bytes held at once (see the module doc for how they are counted).
    pub max_total_bytes: usize,
    /// Largest response (header names and values plus body) kept for replay;
    /// larger ones are stored as `response: None`.
    pub max_response_bytes: usize,
}

impl Default for StoreLimits {
    /// One hour TTL, 10 000 entries, 64 MiB in all, 1 MiB per response.
    fn default() -> Self {
        StoreLimits {
            ttl: DEFAULT_TTL,
            max_entries: 10_000,
            max_total_bytes: 64 * 1024 * 1024,
            max_response_bytes: 1024 * 1024,
        }
    }
}

/// Counters describing a store's current contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Entries held, completed and in flight (expired ones not yet swept
    /// included).
    pub entries: usize,
    /// Entries whose first request is still running.
    pub in_flight: usize,
    /// Bytes accounted to all entries.
    pub bytes: usize,
}

/// State of an in-flight key, as published to waiters.
#[derive(Debug, Clone)]
pub enum FlightState {
    /// The first request is still running.
    Running,
    /// The first request completed with this outcome.
    Done(Arc<Completed>),
    /// The first request was abandoned (or its entry removed); the key is
    /// free again.
    Abandoned,
}

/// What a store answers to [`IdempotencyStore::claim`].
#[derive(Debug)]
pub enum Lookup {
    /// No live entry: a new in-flight entry was created, owned by `token`.
    Claimed { token: u64 },
    /// A completed entry within its TTL.
    Done(Arc<Completed>),
    /// Another request holds the key. The receiver sees
    /// [`FlightState::Done`] or [`FlightState::Abandoned`] when it ends; a
    /// closed channel that never left `Running` counts as abandoned.
    InFlight(watch::Receiver<FlightState>),
    /// At `max_entries` (or `max_total_bytes`) and nothing can be evicted.
    Full,
}

/// Storage for idempotency entries. Object safe: used as
/// `Arc<dyn IdempotencyStore>`; callers normally go through [`begin`] and
/// [`Claim`] rather than calling these methods directly.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Looks `key` up and, when it has no live entry (absent or expired),
    /// creates an in-flight entry for it and returns its claim token.
    fn claim(&self, key: &str) -> Lookup;

    /// Completes the in-flight entry of `key` if `token` still owns it,
    /// publishing the outcome to waiters. A response larger than
    /// `max_response_bytes` (or one that cannot fit at all) is stored as
    /// `None`. Returns false, changing nothing, for a stale or unknown token.
    fn complete(&self, key: &str, token: u64, completed: Completed) -> bool;

    /// Removes the in-flight entry of `key` if `token` still owns it, telling
    /// waiters [`FlightState::Abandoned`]. Returns false, changing nothing,
    /// for a stale or unknown token.
    fn abandon(&self, key: &str, token: u64) -> bool;

    /// Removes whatever entry `key` has (an in-flight one tells its waiters
    /// it was abandoned, and its claim becomes stale). Returns whether there
    /// was one.
    fn remove(&self, key: &str) -> bool;

    /// Removes expired entries; returns how many.
    fn sweep(&self) -> usize;

    /// Current counters.
    fn stats(&self) -> StoreStats;

    /// The bounds this store enforces.
    fn limits(&self) -> &StoreLimits;
}

/// Looks `key` (already scoped by tenant and route) up in `store`.
pub fn begin(store: &Arc<dyn IdempotencyStore>, key: &str) -> Begin {
    match store.claim(key) {
        Lookup::Claimed { token } => Begin::First(Claim {
            store: Arc::clone(store),
            key: key.to_owned(),
            token,
            finished: false,
        }),
        Lookup::Done(completed) => Begin::Done(completed),
        Lookup::InFlight(rx) => Begin::InFlight(InFlight { rx }),
        Lookup::Full => Begin::Full,
    }
}

/// Outcome of [`begin`].
#[derive(Debug)]
pub enum Begin {
    /// No entry: this request runs. Complete the claim when its response is
    /// complete; dropping it un-completed abandons the key (the entry is
    /// removed and waiters are told).
    First(Claim),
    /// A completed entry within its TTL.
    Done(Arc<Completed>),
    /// Another request with this key is running.
    InFlight(InFlight),
    /// The store is at max_entries and every entry is in flight: nothing can
    /// be evicted (the caller answers 503). Also returned when the in-flight
    /// keys alone use up `max_total_bytes`.
    Full,
}

/// Ownership of an in-flight key by the request that runs it.
pub struct Claim {
    store: Arc<dyn IdempotencyStore>,
    key: String,
    token: u64,
    finished: bool,
}

impl Claim {
    /// Stores the outcome for replay and hands it to waiting duplicates.
    /// Does nothing if the claim went stale (its entry was removed).
    pub fn complete(mut self, c: Completed) {
        self.finished = true;
        self.store.complete(&self.key, self.token, c);
    }

    /// Gives the key up now; the same as dropping the claim.
    pub fn abandon(self) {
        drop(self);
    }

    /// The scoped key this claim holds.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The store's `max_response_bytes`: a caller buffering the response can
    /// stop buffering past it and complete with `response: None`.
    pub fn max_response_bytes(&self) -> usize {
        self.store.limits().max_response_bytes
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.finished {
            self.finished = true;
            self.store.abandon(&self.key, self.token);
        }
    }
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("key", &self.key)
            .field("token", &self.token)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

/// A handle on another request's in-flight key.
#[derive(Debug)]
pub struct InFlight {
    rx: watch::Receiver<FlightState>,
}

impl InFlight {
    /// Wraps a receiver a store handed out (for callers of
    /// [`IdempotencyStore::claim`] that do not go through [`begin`]).
    pub fn from_receiver(rx: watch::Receiver<FlightState>) -> Self {
        InFlight { rx }
    }

    /// Waits up to `timeout` for the first request to finish.
    pub async fn wait(mut self, timeout: Duration) -> WaitOutcome {
        let rx = &mut self.rx;
        let waited = tokio::time::timeout(timeout, async move {
            match rx.wait_for(|s| !matches!(s, FlightState::Running)).await {
                Ok(state) => match &*state {
                    FlightState::Done(c) => WaitOutcome::Done(Arc::clone(c)),
                    FlightState::Running | FlightState::Abandoned => WaitOutcome::Abandoned,
                },
                // The sender went away without publishing an outcome.
                Err(_) => WaitOutcome::Abandoned,
            }
        })
        .await;
        waited.unwrap_or(WaitOutcome::TimedOut)
    }
}

/// How waiting on an in-flight key ended.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitOutcome {
    /// The first request completed (replay it, or 409 if `response` is None).
    Done(Arc<Completed>),
    /// The first request was abandoned; the key is free (call [`begin`]
    /// again).
    Abandoned,
    /// The first request was still running when the timeout passed.
    TimedOut,
}

/// Prefix that separates these hashes from any other SHA-256 use.
const HASH_DOMAIN: &[u8] = b"crank-mesh idempotency-key request v1\0";

/// Incremental SHA-256 over method, path and body chunks (ring::digest).
///
/// Method and path are length-prefixed, so no split of the same bytes
/// between method, path and body gives the same hash; the body's chunking
/// does not matter. The method is hashed as given (HTTP methods are case
/// sensitive); `path` is whatever the caller considers the request target
/// (normally path and query).
pub struct RequestHasher {
    ctx: digest::Context,
}

impl RequestHasher {
    pub fn new(method: &str, path: &str) -> Self {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(HASH_DOMAIN);
        for part in [method.as_bytes(), path.as_bytes()] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        RequestHasher { ctx }
    }

    /// Feeds the next body chunk.
    pub fn update(&mut self, chunk: &[u8]) {
        self.ctx.update(chunk);
    }

    pub fn finish(self) -> [u8; 32] {
        let digest = self.ctx.finish();
        let mut out = [0u8; 32];
        for (o, b) in out.iter_mut().zip(digest.as_ref()) {
            *o = *b;
        }
        out
    }

    /// The hash of a request whose body is all in `body`.
    pub fn digest(method: &str, path: &str, body: &[u8]) -> [u8; 32] {
        let mut h = RequestHasher::new(method, path);
        h.update(body);
        h.finish()
    }
}

impl fmt::Debug for RequestHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestHasher").finish_non_exhaustive()
    }
}

/// In-process [`IdempotencyStore`]: a mutex around a map and a
/// completion-order index.
#[derive(Debug)]
pub struct MemoryStore {
    limits: StoreLimits,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
enum Slot {
    InFlight {
        tx: watch::Sender<FlightState>,
    },
    Done {
        completed: Arc<Completed>,
        /// None: `completed_at + ttl` does not fit in an Instant (never expires).
        expires_at: Option<Instant>,
        /// Key of this entry in `Inner::order`.
        seq: u64,
    },
}

#[derive(Debug)]
struct Entry {
    token: u64,
    bytes: usize,
    slot: Slot,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Completed entries by completion sequence. The TTL is the same for all
    /// entries and counts from completion, so this is also expiry order.
    order: BTreeMap<u64, String>,
    bytes: usize,
    in_flight: usize,
    next_token: u64,
    next_seq: u64,
}

fn is_expired(expires_at: Option<Instant>, now: Instant) -> bool {
    expires_at.is_some_and(|at| now >= at)
}

impl Inner {
    /// Takes `key`'s entry out of the map and the accounting, without
    /// telling anyone.
    fn detach(&mut self, key: &str) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        self.bytes = self.bytes.saturating_sub(entry.bytes);
        match &entry.slot {
            Slot::InFlight { .. } => self.in_flight = self.in_flight.saturating_sub(1),
            Slot::Done { seq, .. } => {
                self.order.remove(seq);
            }
        }
        Some(entry)
    }

    /// Removes `key`'s entry; an in-flight one tells its waiters it was
    /// abandoned.
    fn remove(&mut self, key: &str) -> bool {
        match self.detach(key) {
            Some(entry) => {
                if let Slot::InFlight { tx } = entry.slot {
                    tx.send_replace(FlightState::Abandoned);
                }
                true
            }
            None => false,
        }
    }

    /// Removes the oldest completed entry; false when there is none.
    fn evict_oldest(&mut self) -> bool {
        match self.order.pop_first() {
            Some((_, key)) => {
                self.detach(&key);
                true
            }
            None => false,
        }
    }

    /// Removes expired entries (they are the oldest completed ones).
    fn purge_expired(&mut self, now: Instant) -> usize {
        let mut removed = 0;
        while let Some((_, key)) = self.order.first_key_value() {
            let live = matches!(
                self.entries.get(key),
                Some(Entry { slot: Slot::Done { expires_at, .. }, .. })
                    if !is_expired(*expires_at, now)
            );
            if live {
                break;
            }
            // Expired (or an index entry with no completed entry behind it,
            // never expected): drop it either way.
            self.evict_oldest();
            removed += 1;
        }
        removed
    }

    fn fits(&self, add_entries: usize, add_bytes: usize, limits: &StoreLimits) -> bool {
        self.entries.len().saturating_add(add_entries) <= limits.max_entries
            && self.bytes.saturating_add(add_bytes) <= limits.max_total_bytes
    }

    /// Evicts until `add_entries` more entries of `add_bytes` fit: expired
    /// entries first, then the oldest completed ones. False when even that
    /// is not enough (only in-flight entries are left).
    fn make_room(
        &mut self,
        now: Instant,
        add_entries: usize,
        add_bytes: usize,
        limits: &StoreLimits,
    ) -> bool {
        if self.fits(add_entries, add_bytes, limits) {
            return true;
        }
        self.purge_expired(now);
        while !self.fits(add_entries, add_bytes, limits) {
            if !self.evict_oldest() {
                return false;
            }
        }
        true
    }
}

impl MemoryStore {
    pub fn new(limits: StoreLimits) -> MemoryStore {
        MemoryStore {
            limits,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(StoreLimits::default())
    }
}

impl IdempotencyStore for MemoryStore {
    fn claim(&self, key: &str) -> Lookup {
        let now = Instant::now();
        let mut guard = self.lock();
        let inner = &mut *guard;

        match inner.entries.get(key).map(|e| &e.slot) {
            Some(Slot::InFlight { tx }) => return Lookup::InFlight(tx.subscribe()),
            Some(Slot::Done {
                completed,
                expires_at,
                ..
            }) => {
                if !is_expired(*expires_at, now) {
                    return Lookup::Done(Arc::clone(completed));
                }
                // Expired: invisible, removed lazily here.
                inner.detach(key);
            }
            None => {}
        }

        let bytes = key.len();
        if !inner.make_room(now, 1, bytes, &self.limits) {
            return Lookup::Full;
        }
        let token = inner.next_token;
        inner.next_token = inner.next_token.wrapping_add(1);
        let (tx, _rx) = watch::channel(FlightState::Running);
        inner.entries.insert(
            key.to_owned(),
            Entry {
                token,
                bytes,
                slot: Slot::InFlight { tx },
            },
        );
        inner.bytes = inner.bytes.saturating_add(bytes);
        inner.in_flight = inner.in_flight.saturating_add(1);
        Lookup::Claimed { token }
    }

    fn complete(&self, key: &str, token: u64, completed: Completed) -> bool {
        let now = Instant::now();
        let limits = &self.limits;
        let mut guard = self.lock();
        let inner = &mut *guard;

        match inner.entries.get(key) {
            Some(Entry {
                token: t,
                slot: Slot::InFlight { .. },
                ..
            }) if *t == token => {}
            _ => return false,
        }
        let Some(Entry {
            slot: Slot::InFlight { tx },
            ..
        }) = inner.detach(key)
        else {
            return false;
        };

        let key_bytes = key.len();
        let Completed {
            request_hash,
            mut response,
        } = completed;
        let mut response_bytes = response.as_ref().map_or(0, StoredResponse::size);
        if response_bytes > limits.max_response_bytes
            || key_bytes.saturating_add(response_bytes) > limits.max_total_bytes
        {
            response = None;
            response_bytes = 0;
        }
        if response.is_some()
            && !inner.make_room(now, 1, key_bytes.saturating_add(response_bytes), limits)
        {
            // Only in-flight entries are left and they leave no room: keep
            // the hash so duplicates still learn the request ran.
            response = None;
            response_bytes = 0;
        }
        if response.is_none() {
            // Always fits: the in-flight entry just released these bytes
            // and its slot.
            inner.make_room(now, 1, key_bytes, limits);
        }

        let completed = Arc::new(Completed {
            request_hash,
            response,
        });
        let seq = inner.next_seq;
        inner.next_seq = inner.next_seq.wrapping_add(1);
        let bytes = key_bytes.saturating_add(response_bytes);
        inner.order.insert(seq, key.to_owned());
        inner.entries.insert(
            key.to_owned(),
            Entry {
                token,
                bytes,
                slot: Slot::Done {
                    completed: Arc::clone(&completed),
                    expires_at: now.checked_add(limits.ttl),
                    seq,
                },
            },
        );
        inner.bytes = inner.bytes.saturating_add(bytes);
        tx.send_replace(FlightState::Done(completed));
        true
    }

    fn abandon(&self, key: &str, token: u64) -> bool {
        let mut inner = self.lock();
        match inner.entries.get(key) {
            Some(Entry {
                token: t,
                slot: Slot::InFlight { .. },
                ..
            }) if *t == token => inner.remove(key),
            _ => false,
        }
    }

    fn remove(&self, key: &str) -> bool {
        self.lock().remove(key)
    }

    fn sweep(&self) -> usize {
        let now = Instant::now();
        self.lock().purge_expired(now)
    }

    fn stats(&self) -> StoreStats {
        let inner = self.lock();
        StoreStats {
            entries: inner.entries.len(),
            in_flight: inner.in_flight,
            bytes: inner.bytes,
        }
    }

    fn limits(&self) -> &StoreLimits {
        &self.limits
    }
}

/// The inbound idempotency store, when enabled.
pub fn store_for(cfg: &crank_api::proxy::ProxyConfig) -> Option<Arc<dyn IdempotencyStore>> {
    let c = &cfg.inbound.as_ref()?.idempotency;
    c.enabled.then(|| {
        Arc::new(MemoryStore::new(StoreLimits {
            ttl: c.ttl,
            max_entries: c.max_entries,
            max_total_bytes: c.max_total_bytes,
            max_response_bytes: c.max_response_bytes,
        })) as Arc<dyn IdempotencyStore>
    })
}

#[cfg(test)]
mod tests;
