//! Quotas: token buckets keyed by (tenant, capability) that turn an
//! over-quota request into `429 Too Many Requests`.
//!
//! Example: tenant `acme` has a quota of 100 requests/min on
//! `transcode:v1`. The first 100 requests pass, the 101st gets a 429 with
//! `Retry-After` and the `RateLimit` / `RateLimit-Policy` headers, and other
//! tenants are not affected.
//!
//! # Model
//!
//! Every configured [`Limit`] owns one keyed GCRA limiter (`governor`): a
//! bucket holds `burst` tokens and gets one token back every `per / count`,
//! so `count` requests per `per` pass in the long run and up to `burst` pass
//! at once after an idle time. Each request takes one token; a request that
//! finds the bucket empty is denied and takes nothing.
//!
//! # Matching
//!
//! [`Quotas::check`] walks the limits in config order and the first limit
//! whose tenant and capability both match decides alone: later limits are
//! not consulted, so put specific limits before `*` ones. `*` matches any
//! value, and each distinct value seen gets its own bucket: `tenant: "*"`
//! gives every tenant its own bucket of the limit's size; it is not one
//! bucket shared by all tenants. An exact tenant with an exact capability
//! is a single bucket. A request that no limit matches is not limited
//! (`None`).
//!
//! # Memory bound and eviction
//!
//! Buckets are created on first use. [`Quotas::evict_idle`] (run it
//! periodically) drops the buckets that are full again, using governor's
//! `retain_recent`: a bucket is dropped once it has been full for at least
//! one refill interval (`per / count`), which makes it indistinguishable from
//! a fresh one, so eviction never gives a tenant tokens back early.
//!
//! Each limit keeps at most `max_keys` buckets of its own. When a limit
//! holds `max_keys` buckets and a request with a new key arrives, that
//! limit's idle buckets are dropped first (at most once per second per
//! limit, so a flood of new keys cannot make every request scan the map);
//! if the limit is still full, the new key shares one overflow bucket of
//! that limit (same size as the others). Such requests are still limited,
//! only together, and memory stays bounded at `max_keys + 1` buckets per
//! limit. The bound is checked before the bucket is inserted, so concurrent
//! requests with new keys may pass it by at most the number of threads
//! inserting at that moment.
//!
//! # Headers
//!
//! A [`RateDecision`] renders the IETF `draft-ietf-httpapi-ratelimit-headers`
//! fields (structured fields; the policy name is an sf-string):
//!
//! * `RateLimit-Policy: "acme-transcode";q=100;w=60`: quota `q` per window
//!   of `w` seconds.
//! * `RateLimit: "acme-transcode";r=0;t=1`: `r` requests left now; `t`
//!   seconds until the bucket is full again (allowed) or until the next
//!   request may pass (denied).
//! * `Retry-After: 1` on a 429: [`RateDecision::retry_after_secs`].
//!
//! All seconds are rounded up, so a client that waits as told is not
//! denied again.
//!
//! # Time
//!
//! The limiters read tokio's clock (`tokio::time::Instant`), so tests can
//! pause and advance time. Outside a runtime it is the system's monotonic
//! clock.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::fmt::Write as _;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::StateStore;
use governor::{Quota, RateLimiter};

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// The longest bucket span (`burst` refill intervals) kept: 100 years.
/// Governor counts nanoseconds in a `u64` (about 584 years) and adds spans
/// without overflow checks, so longer periods and bursts are clamped to this.
const MAX_SPAN_NANOS: u64 = 100 * 365 * 24 * 3600 * NANOS_PER_SEC;

/// When a limit is full, drop its idle buckets at most this often.
const SWEEP_EVERY_NANOS: u64 = NANOS_PER_SEC;

/// One configured quota.
#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    /// Policy name used in the headers, e.g. `acme-transcode`.
    pub name: String,
    /// An exact tenant, or `*`: any tenant, each tenant with its own bucket.
    pub tenant: String,
    /// An exact capability, or `*`: any capability, each its own bucket.
    pub capability: String,
    /// Requests per `per` (at least 1; 0 is treated as 1).
    pub count: u32,
    /// The window (more than zero; zero is treated as 1 ns).
    pub per: Duration,
    /// Bucket size: requests that may pass at once (at least 1; 0 is
    /// treated as 1). The config default is `count`.
    pub burst: u32,
}

/// The outcome of [`Quotas::check`] for a request some limit matched.
#[derive(Debug, Clone, PartialEq)]
pub struct RateDecision {
    /// Whether the request may pass; `false` means answer 429.
    pub allowed: bool,
    /// The deciding limit's [`Limit::name`] (shared, not copied per check).
    pub policy: Arc<str>,
    /// The deciding limit's [`Limit::count`].
    pub quota: u32,
    /// The deciding limit's bucket size (after clamping).
    pub burst: u32,
    /// [`Limit::per`] in whole seconds, at least 1.
    pub window_secs: u64,
    /// Tokens left after this request (0 when denied).
    pub remaining: u32,
    /// Allowed: seconds until the bucket is full again. Denied: seconds
    /// until the next request may pass. Rounded up.
    pub reset_secs: u64,
    /// Denied: seconds until one request may pass, rounded up, at least 1
    /// (the `Retry-After` value). Allowed: 0.
    pub retry_after_secs: u64,
}

impl RateDecision {
    /// The `RateLimit-Policy` field value: `"acme-transcode";q=100;w=60`.
    pub fn policy_header(&self) -> String {
        let mut out = String::with_capacity(self.policy.len() + 32);
        push_sf_string(&mut out, &self.policy);
        let _ = write!(out, ";q={};w={}", self.quota, self.window_secs);
        out
    }

    /// The `RateLimit` field value: `"acme-transcode";r=0;t=36`.
    pub fn ratelimit_header(&self) -> String {
        let mut out = String::with_capacity(self.policy.len() + 32);
        push_sf_string(&mut out, &self.policy);
        let _ = write!(out, ";r={};t={}", self.remaining, self.reset_secs);
        out
    }
}

/// Appends `s` as a structured-field string (RFC 8941 sf-string): quotes
/// and backslashes are escaped; characters an sf-string cannot hold
/// (controls, non-ASCII) become `_`, so the header value is always valid.
fn push_sf_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('_'),
        }
    }
    out.push('"');
}

/// The configured quotas of one proxy: one keyed limiter per [`Limit`].
pub struct Quotas {
    limits: Vec<LimitState>,
    max_keys: usize,
}

impl Quotas {
    /// Builds the limiters. `max_keys`: most buckets kept per limit (memory
    /// bound); beyond it new keys share one overflow bucket per limit (0:
    /// every key shares it).
    pub fn new(limits: Vec<Limit>, max_keys: usize) -> Quotas {
        Quotas {
            limits: limits.into_iter().map(LimitState::new).collect(),
            max_keys,
        }
    }

    /// Whether no limit is configured (then [`check`](Self::check) always
    /// returns `None`).
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Takes one token for this request from the first limit (config
    /// order) whose tenant and capability match; that limit alone decides.
    /// `None` when no limit matches: the request is not limited.
    pub fn check(&self, tenant: &str, capability: &str) -> Option<RateDecision> {
        let limit = self
            .limits
            .iter()
            .find(|limit| limit.matches(tenant, capability))?;
        Some(limit.check(tenant, capability, self.max_keys))
    }

    /// Drops the buckets that are full again (governor's `retain_recent`,
    /// then `shrink_to_fit`); returns the buckets left over all limits.
    pub fn evict_idle(&self) -> usize {
        for limit in &self.limits {
            limit.limiter.retain_recent();
            limit.limiter.shrink_to_fit();
        }
        self.key_count()
    }

    /// Buckets currently held, over all limits (overflow buckets included).
    pub fn key_count(&self) -> usize {
        self.limits.iter().map(|limit| limit.store.len()).sum()
    }
}

impl fmt::Debug for Quotas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quotas")
            .field(
                "limits",
                &self
                    .limits
                    .iter()
                    .map(|limit| &limit.limit)
                    .collect::<Vec<_>>(),
            )
            .field("max_keys", &self.max_keys)
            .field("keys", &self.key_count())
            .finish()
    }
}

type Limiter = RateLimiter<BucketKey, SharedStore, TokioClock, StateInformationMiddleware>;

/// One limit with its limiter.
struct LimitState {
    limit: Limit,
    /// [`Limit::name`], handed to every decision without a copy.
    name: Arc<str>,
    any_tenant: bool,
    any_capability: bool,
    /// `count`, at least 1.
    quota: u32,
    window_secs: u64,
    /// Bucket size after clamping.
    burst: u32,
    /// Refill interval of one token, in nanoseconds (at least 1).
    period_nanos: u64,
    /// The limiter's buckets, shared with the limiter so new keys can be
    /// told from known ones.
    store: Arc<DashMapStateStore<BucketKey>>,
    limiter: Limiter,
    /// Clock reading (nanoseconds) before which no overflow sweep runs.
    next_sweep: AtomicU64,
}

impl LimitState {
    fn new(limit: Limit) -> LimitState {
        let quota = limit.count.max(1);
        let per = limit.per.max(Duration::from_nanos(1));
        let period_nanos = u64::try_from((per / quota).as_nanos())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_SPAN_NANOS);
        let max_burst = u32::try_from(MAX_SPAN_NANOS / period_nanos).unwrap_or(u32::MAX);
        let burst = limit.burst.clamp(1, max_burst.max(1));
        let burst_nz = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        // `with_period` is `None` only for a zero period, ruled out above.
        let gcra = Quota::with_period(Duration::from_nanos(period_nanos))
            .unwrap_or(Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst_nz);
        let store = Arc::new(DashMapStateStore::<BucketKey>::default());
        let clock = TokioClock {
            base: tokio::time::Instant::now(),
        };
        let limiter: Limiter = RateLimiter::new(gcra, SharedStore(Arc::clone(&store)), clock);
        LimitState {
            name: Arc::from(limit.name.as_str()),
            any_tenant: limit.tenant == "*",
            any_capability: limit.capability == "*",
            quota,
            window_secs: limit.per.as_secs().max(1),
            burst,
            period_nanos,
            store,
            limiter,
            next_sweep: AtomicU64::new(0),
            limit,
        }
    }

    fn matches(&self, tenant: &str, capability: &str) -> bool {
        (self.any_tenant || self.limit.tenant == tenant)
            && (self.any_capability || self.limit.capability == capability)
    }

    /// The bucket key: the parts a `*` stands for (the exact parts are the
    /// same for every request this limit matches). A key this thread built
    /// recently is reused (an `Arc` clone), so the common case allocates
    /// nothing.
    fn key_for(&self, tenant: &str, capability: &str) -> BucketKey {
        let tenant = if self.any_tenant { tenant } else { "" };
        let capability = if self.any_capability { capability } else { "" };
        RECENT_KEYS
            .try_with(|recent| recent.borrow_mut().get(tenant, capability))
            .unwrap_or_else(|_| BucketKey::seen(tenant, capability))
    }

    /// `key` itself, or the overflow key when this limit is full.
    fn admit(&self, key: BucketKey, max_keys: usize) -> BucketKey {
        if self.store.contains_key(&key) || self.own_buckets() < max_keys {
            return key;
        }
        self.sweep_throttled();
        if self.own_buckets() < max_keys {
            key
        } else {
            BucketKey::Overflow
        }
    }

    /// Buckets held, the overflow bucket not counted.
    fn own_buckets(&self) -> usize {
        let overflow = usize::from(self.store.contains_key(&BucketKey::Overflow));
        self.store.len().saturating_sub(overflow)
    }

    /// `retain_recent`, unless another sweep of this limit ran in the last
    /// second.
    fn sweep_throttled(&self) {
        let now = self.limiter.clock().now().as_u64();
        let due = self.next_sweep.load(Ordering::Relaxed);
        if now >= due
            && self
                .next_sweep
                .compare_exchange(
                    due,
                    now.saturating_add(SWEEP_EVERY_NANOS),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            self.limiter.retain_recent();
        }
    }

    fn check(&self, tenant: &str, capability: &str, max_keys: usize) -> RateDecision {
        let key = self.admit(self.key_for(tenant, capability), max_keys);
        let _ = LAST_TAT.try_with(|tat| tat.set(0));
        match self.limiter.check_key(&key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let tat = LAST_TAT.try_with(Cell::get).unwrap_or(0);
                let until_full = if tat != 0 {
                    // The limiter started when its clock read (almost) 0,
                    // so the new theoretical arrival time `tat` is a
                    // reading of the same clock: the bucket is full again
                    // at `tat`.
                    tat.saturating_sub(self.limiter.clock().now().as_u64())
                } else {
                    // Not recorded (cannot happen with `SharedStore`):
                    // an upper bound, exact when requests are aligned.
                    u64::from(self.burst.saturating_sub(remaining))
                        .saturating_mul(self.period_nanos)
                };
                self.decision(true, remaining, ceil_secs(until_full).max(1), 0)
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                let secs = ceil_secs(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX)).max(1);
                self.decision(false, 0, secs, secs)
            }
        }
    }

    fn decision(
        &self,
        allowed: bool,
        remaining: u32,
        reset_secs: u64,
        retry_after_secs: u64,
    ) -> RateDecision {
        RateDecision {
            allowed,
            policy: Arc::clone(&self.name),
            quota: self.quota,
            burst: self.burst,
            window_secs: self.window_secs,
            remaining,
            reset_secs,
            retry_after_secs,
        }
    }
}

fn ceil_secs(nanos: u64) -> u64 {
    nanos.div_ceil(NANOS_PER_SEC)
}

/// A bucket of one limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum BucketKey {
    /// The tenant (when the limit's tenant is `*`, else empty) followed by
    /// the capability (likewise); `tenant_len` keeps `("ab", "c")` and
    /// `("a", "bc")` apart.
    Seen { parts: Arc<str>, tenant_len: usize },
    /// The bucket shared by new keys while the limit holds `max_keys`.
    Overflow,
}

impl BucketKey {
    fn seen(tenant: &str, capability: &str) -> BucketKey {
        let mut parts = String::with_capacity(tenant.len() + capability.len());
        parts.push_str(tenant);
        parts.push_str(capability);
        BucketKey::Seen {
            parts: Arc::from(parts),
            tenant_len: tenant.len(),
        }
    }

    fn is(&self, tenant: &str, capability: &str) -> bool {
        match self {
            BucketKey::Seen { parts, tenant_len } => {
                *tenant_len == tenant.len()
                    && parts.len() == tenant.len() + capability.len()
                    && parts.starts_with(tenant)
                    && parts.ends_with(capability)
            }
            BucketKey::Overflow => false,
        }
    }
}

/// The last few bucket keys this thread built, newest first.
#[derive(Default)]
struct RecentKeys([Option<BucketKey>; RECENT_KEYS_HELD]);

const RECENT_KEYS_HELD: usize = 4;

impl RecentKeys {
    /// The key for (tenant, capability): a recent one, or a new one that
    /// replaces the oldest.
    fn get(&mut self, tenant: &str, capability: &str) -> BucketKey {
        if let Some(i) = self
            .0
            .iter()
            .position(|k| k.as_ref().is_some_and(|k| k.is(tenant, capability)))
        {
            self.0[..=i].rotate_right(1);
        } else {
            self.0.rotate_right(1);
            self.0[0] = Some(BucketKey::seen(tenant, capability));
        }
        self.0[0]
            .clone()
            .unwrap_or_else(|| BucketKey::seen(tenant, capability))
    }
}

thread_local! {
    static RECENT_KEYS: RefCell<RecentKeys> = RefCell::default();
    /// The theoretical arrival time the last allowed check on this thread
    /// stored: when its bucket is full again.
    static LAST_TAT: Cell<u64> = const { Cell::new(0) };
}

/// Governor's `DashMap` store, shared with [`LimitState`] (to tell new keys
/// from known ones) and recording each stored state in `LAST_TAT` (the
/// middleware's snapshot does not expose it; `reset_secs` needs it).
struct SharedStore(Arc<DashMapStateStore<BucketKey>>);

impl StateStore for SharedStore {
    type Key = BucketKey;

    fn measure_and_replace<T, F, E>(&self, key: &BucketKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        StateStore::measure_and_replace(&*self.0, key, |prev| {
            let outcome = f(prev);
            if let Ok((_, tat)) = &outcome {
                let _ = LAST_TAT.try_with(|last| last.set(tat.as_u64()));
            }
            outcome
        })
    }
}

impl ShrinkableKeyedStateStore<BucketKey> for SharedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&*self.0, drop_below);
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&*self.0);
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Governor clock on tokio's clock (pausable in tests): nanoseconds since
/// `base`.
#[derive(Debug, Clone, Copy)]
struct TokioClock {
    base: tokio::time::Instant,
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        let elapsed = self.base.elapsed().as_nanos();
        Nanos::from(u64::try_from(elapsed).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests;
