//! Resilience knobs: quotas (429), load shedding (503), circuit breaking,
//! request timeouts, retries with a budget, idempotency keys and fault
//! injection. Every knob has a default comparable to Envoy's and Linkerd's;
//! `docs/reference/resilience.md` lists them side by side.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Quotas: token buckets keyed by (tenant, capability).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Checked in order; the first limit whose tenant and capability match
    /// decides. A request no limit matches is not limited.
    #[serde(default)]
    pub limits: Vec<QuotaLimit>,
    /// On the outbound side (edge traffic from callers without a mesh
    /// identity): the request header naming the tenant. Absent, or the
    /// header missing: this workload's own tenant. Inbound, the tenant is
    /// always the verified peer identity's and no header is trusted.
    #[serde(default)]
    pub tenant_header: Option<String>,
    /// Most buckets kept per limit; beyond it, new keys share one overflow
    /// bucket. Idle buckets (full again) are dropped every 10 s.
    /// Default 100000.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// `RateLimit` / `RateLimit-Policy` on responses that passed:
    /// `near-limit` (default: once a quarter of the burst or less is left,
    /// so callers see the limit coming without every response paying for
    /// two headers), `always`, or `never`. A 429 always carries them.
    #[serde(default)]
    pub response_headers: RateLimitHeaders,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RateLimitHeaders {
    #[default]
    NearLimit,
    Always,
    Never,
}

impl RateLimitHeaders {
    /// Whether an allowed response with `remaining` of `burst` left gets
    /// the headers.
    pub fn on_allowed(self, remaining: u32, burst: u32) -> bool {
        match self {
            RateLimitHeaders::Always => true,
            RateLimitHeaders::Never => false,
            RateLimitHeaders::NearLimit => u64::from(remaining) * 4 <= u64::from(burst),
        }
    }
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            limits: Vec::new(),
            tenant_header: None,
            max_keys: default_max_keys(),
            response_headers: RateLimitHeaders::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaLimit {
    /// The policy name in `RateLimit-Policy`. Default `TENANT/CAPABILITY`.
    #[serde(default)]
    pub name: Option<String>,
    /// A tenant, or `*`: each tenant gets its own bucket of this size.
    pub tenant: String,
    /// A capability (inbound: the one the app serves; outbound: the route's
    /// capability, else its name), or `*`: each its own bucket.
    pub capability: String,
    /// `N/s`, `N/min` or `N/h` (also `N/second`, `N/minute`, `N/hour`).
    pub rate: String,
    /// Requests that may pass at once after an idle time. Default: N.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Which side counts it: `inbound` (default: requests from peer
    /// sidecars to the local app), `outbound` (requests from the local app
    /// or from edge callers) or `both`.
    #[serde(default)]
    pub direction: QuotaDirection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaDirection {
    #[default]
    Inbound,
    Outbound,
    Both,
}

/// A concurrency limit with a bounded wait queue: beyond it the proxy
/// answers 503 with `Retry-After` at once, without touching the upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyConfig {
    /// Requests served at once.
    pub max_concurrent: u32,
    /// Requests that may wait for a slot. Default 0: none wait.
    #[serde(default)]
    pub max_queue: u32,
    /// Longest wait for a slot. Default 1s.
    #[serde(default = "default_queue_timeout", with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// The `Retry-After` sent with the 503. Default 1s.
    #[serde(default = "default_retry_after", with = "humantime_serde")]
    pub retry_after: Duration,
}

/// Retries of failed upstream attempts, on the outbound side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first attempt. Default 2; 0 turns retries off.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// What is retried. Default `[connect-failure, reset, gateway-error]`.
    #[serde(default = "default_retry_on")]
    pub on: Vec<RetryOn>,
    /// First backoff; it doubles per retry, with full jitter. Default 25ms.
    #[serde(default = "default_backoff_base", with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Backoff cap. Default 250ms.
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Retries may add this share of the route's requests. Default 0.2.
    #[serde(default = "default_budget_ratio")]
    pub budget_ratio: f32,
    /// Retries always allowed per second, whatever the ratio. Default 10.
    #[serde(default = "default_budget_min")]
    pub budget_min_per_second: u32,
    /// Window the budget counts requests over. Default 10s.
    #[serde(default = "default_budget_window", with = "humantime_serde")]
    pub budget_window: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: default_attempts(),
            on: default_retry_on(),
            backoff_base: default_backoff_base(),
            backoff_max: default_backoff_max(),
            budget_ratio: default_budget_ratio(),
            budget_min_per_second: default_budget_min(),
            budget_window: default_budget_window(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// Connect and TLS handshake failures: nothing was sent, so these are
    /// retried for any method (on an endpoint not tried yet) whenever
    /// `attempts` is above 0, listed or not.
    ConnectFailure,
    /// The connection was reset or closed before a response.
    Reset,
    /// A 502, 503 or 504 response.
    GatewayError,
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    FiveXx,
}

/// Per-endpoint outlier detection on an outbound route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitConfig {
    /// 5xx responses or connect failures in a row that eject an endpoint.
    /// Default 5; 0 turns ejection off.
    #[serde(default = "default_consecutive")]
    pub consecutive_failures: u32,
    /// First ejection; doubles with each ejection in a row. Default 5s.
    #[serde(default = "default_base_ejection", with = "humantime_serde")]
    pub base_ejection: Duration,
    /// Ejection cap. Default 60s.
    #[serde(default = "default_max_ejection", with = "humantime_serde")]
    pub max_ejection: Duration,
    /// Most endpoints ejected at once, in percent (at least one). Default 50.
    #[serde(default = "default_max_ejected")]
    pub max_ejected_percent: u32,
    /// Response statuses that count as an endpoint failure. Default 502,
    /// 503 and 504: statuses that say something about the endpoint's
    /// health. A 500 or 501 from an app is about the request, not the
    /// endpoint (a method it does not implement, a bug one input hits),
    /// and one caller must not be able to eject a healthy endpoint with
    /// it. Connect failures and resets always count.
    #[serde(default = "default_failure_statuses")]
    pub failure_statuses: Vec<u16>,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        CircuitConfig {
            consecutive_failures: default_consecutive(),
            base_ejection: default_base_ejection(),
            max_ejection: default_max_ejection(),
            max_ejected_percent: default_max_ejected(),
            failure_statuses: default_failure_statuses(),
        }
    }
}

/// Chaos on a route: delay or abort a share of requests. Off unless set.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    #[serde(default)]
    pub delay: Option<DelayFault>,
    #[serde(default)]
    pub abort: Option<AbortFault>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelayFault {
    /// Share of requests delayed, 0 to 100.
    pub percent: f64,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbortFault {
    /// Share of requests answered by the proxy, 0 to 100.
    pub percent: f64,
    /// The status sent, 400 to 599.
    pub status: u16,
}

/// `Idempotency-Key` support on the inbound side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// Default true: a request with a non-idempotent method (POST, PATCH,
    /// ...) and an `Idempotency-Key` is answered once.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How long a response is kept for replay. Default 1h.
    #[serde(default = "default_idem_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// Most keys kept. Default 10000.
    #[serde(default = "default_idem_entries")]
    pub max_entries: usize,
    /// Most bytes kept over all responses. Default 64 MiB.
    #[serde(default = "default_idem_bytes")]
    pub max_total_bytes: usize,
    /// Larger responses are not kept; a duplicate gets 409. Default 1 MiB.
    #[serde(default = "default_idem_response")]
    pub max_response_bytes: usize,
    /// A duplicate that arrives while the first is running: `wait` for its
    /// response (default) or `reject` with 409.
    #[serde(default)]
    pub in_flight: InFlightMode,
    /// Longest a duplicate waits for the first. Default 30s.
    #[serde(default = "default_idem_wait", with = "humantime_serde")]
    pub wait_timeout: Duration,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            enabled: true,
            ttl: default_idem_ttl(),
            max_entries: default_idem_entries(),
            max_total_bytes: default_idem_bytes(),
            max_response_bytes: default_idem_response(),
            in_flight: InFlightMode::default(),
            wait_timeout: default_idem_wait(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InFlightMode {
    #[default]
    Wait,
    Reject,
}

fn default_true() -> bool {
    true
}
fn default_max_keys() -> usize {
    100_000
}
fn default_queue_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_after() -> Duration {
    Duration::from_secs(1)
}
fn default_attempts() -> u32 {
    2
}
fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::GatewayError,
    ]
}
fn default_backoff_base() -> Duration {
    Duration::from_millis(25)
}
fn default_backoff_max() -> Duration {
    Duration::from_millis(250)
}
fn default_budget_ratio() -> f32 {
    0.2
}
fn default_budget_min() -> u32 {
    10
}
fn default_budget_window() -> Duration {
    Duration::from_secs(10)
}
fn default_consecutive() -> u32 {
    5
}
fn default_base_ejection() -> Duration {
    Duration::from_secs(5)
}
fn default_max_ejection() -> Duration {
    Duration::from_secs(60)
}
fn default_failure_statuses() -> Vec<u16> {
    vec![502, 503, 504]
}
fn default_max_ejected() -> u32 {
    50
}
fn default_idem_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_idem_entries() -> usize {
    10_000
}
fn default_idem_bytes() -> usize {
    64 << 20
}
fn default_idem_response() -> usize {
    1 << 20
}
fn default_idem_wait() -> Duration {
    Duration::from_secs(30)
}

/// Parses a quota rate: `100/min`, `10/s`, `5000/h` (also `second`,
/// `minute`, `hour`, `sec`, `m`). Returns (count, window).
pub fn parse_rate(s: &str) -> Result<(u32, Duration), String> {
    let fix = "write it as N/s, N/min or N/h, for example 100/min";
    let (n, unit) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} has no '/'; {fix}"))?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("{:?} is not a whole number; {fix}", n.trim()))?;
    if n == 0 {
        return Err(format!(
            "{s:?} allows nothing; {fix} with N at least 1, or remove the limit"
        ));
    }
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        u => return Err(format!("unknown unit {u:?}; {fix}")),
    };
    Ok((n, per))
}
