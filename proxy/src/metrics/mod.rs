//! Prometheus metrics of the proxy, all prefixed `crank_`, in one registry
//! served on the admin listener.

pub mod egress;
pub mod tunnel;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Every metric the proxy exports. Cheap to clone (handles are `Arc`s).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// `crank_requests_total{direction, route, status_class}`.
    pub requests: IntCounterVec,
    /// `crank_request_duration_seconds{direction, route}`.
    pub latency: HistogramVec,
    /// `crank_tls_handshake_failures_total{direction, reason}`.
    pub handshake_failures: IntCounterVec,
    /// `crank_open_connections{direction}`.
    pub open_connections: IntGaugeVec,
    /// `crank_proxy_errors_total{direction, reason}`: responses the proxy made itself.
    pub proxy_errors: IntCounterVec,
    /// `crank_connections_refused_total{direction, reason}`: connections
    /// closed at accept (`limit`: the listener's connection cap).
    pub connections_refused: IntCounterVec,
    /// `crank_request_head_timeouts_total{direction}`: connections closed
    /// because a request head was not complete in time.
    pub request_head_timeouts: IntCounterVec,
    /// `crank_tap_events_dropped_total`: events a tap client lost (it fell
    /// behind, or past its `max_rps`).
    pub tap_dropped: IntCounter,
    /// `crank_inflight_requests`.
    pub inflight: IntGauge,
    /// `crank_ready` (1 when /ready answers 200).
    pub ready: IntGauge,
    /// `crank_policy_decisions_total{direction, result, mode}`.
    pub policy_decisions: IntCounterVec,
    /// `crank_policy_eval_seconds{direction}`.
    pub policy_eval: HistogramVec,
    /// `crank_policy_reloads_total{direction, result}`.
    pub policy_reloads: IntCounterVec,
    /// `crank_policy_revision{direction, revision}`: 1 for the running revision.
    pub policy_revision: IntGaugeVec,
    /// `crank_policy_decision_log_dropped_total`.
    pub decision_log_dropped: IntCounter,
    /// `crank_spans_exported_total`.
    pub spans_exported: IntCounter,
    /// `crank_spans_dropped_total{reason}`: `queue_full` or `export_failed`.
    pub spans_dropped: IntCounterVec,
    /// `crank_trace_sampling_ratio`: the ratio new traces are sampled at.
    pub sampling_ratio: Gauge,
    /// `crank_config_reloads_total{result}`: `applied`, or `rejected` when
    /// the file is invalid or changes a field that needs a restart. A save
    /// that changes nothing (comments, spacing) is not counted.
    pub config_reloads: IntCounterVec,
    /// Quotas, shedding, circuits, retries, idempotency, faults.
    pub resilience: ResilienceMetrics,
    /// Certificates, renewals, trust bundle, deny list.
    pub identity: IdentityMetrics,
    /// Opaque TCP tunnels (`crank_tcp_*`).
    pub tunnel: tunnel::TunnelMetrics,
    /// Requests outside the mesh (`crank_egress_*`).
    pub egress: egress::EgressMetrics,
}

/// The workload certificate and what the identity agent does with it.
#[derive(Clone)]
pub struct IdentityMetrics {
    /// `crank_cert_expiry_timestamp_seconds{cert, subject, serial}`: `leaf`
    /// (our own certificate) and one series per `root` of the bundle.
    pub cert_expiry: IntGaugeVec,
    /// `crank_cert_renewals_total{result}`: `success` or `failure`.
    pub renewals: IntCounterVec,
    /// `crank_trust_bundle_version`: the bundle version applied (0 in
    /// static mode and before the first bundle from crank-control).
    pub bundle_version: IntGauge,
    /// `crank_cert_revoked_serials`: serials on the deny list.
    pub revoked_serials: IntGauge,
}

impl IdentityMetrics {
    fn new(registry: &Registry) -> Self {
        let cert_expiry = IntGaugeVec::new(
            Opts::new(
                "crank_cert_expiry_timestamp_seconds",
                "Expiry (Unix time) of this workload's certificate (cert=leaf) and of each trusted root (cert=root)",
            ),
            &["cert", "subject", "serial"],
        )
        .expect("static metric");
        let renewals = IntCounterVec::new(
            Opts::new(
                "crank_cert_renewals_total",
                "Certificate renewals with crank-control, by result (success, failure)",
            ),
            &["result"],
        )
        .expect("static metric");
        for r in ["success", "failure"] {
            renewals.with_label_values(&[r]);
        }
        let bundle_version = IntGauge::new(
            "crank_trust_bundle_version",
            "Version of the trust bundle applied (0: static or bootstrap bundle)",
        )
        .expect("static metric");
        let revoked_serials = IntGauge::new(
            "crank_cert_revoked_serials",
            "Certificate serials on the revocation deny list",
        )
        .expect("static metric");
        for c in [
            Box::new(cert_expiry.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(renewals.clone()),
            Box::new(bundle_version.clone()),
            Box::new(revoked_serials.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        IdentityMetrics {
            cert_expiry,
            renewals,
            bundle_version,
            revoked_serials,
        }
    }
}

/// One counter or gauge per resilience decision (see
/// `docs/reference/metrics.md`).
#[derive(Clone)]
pub struct ResilienceMetrics {
    /// `crank_ratelimited_total{direction, tenant, capability}`.
    pub ratelimited: IntCounterVec,
    /// `crank_shed_total{direction, route, reason}`: `queue-full`,
    /// `queue-timeout`, `circuit-open`, `idempotency-store-full`.
    pub shed: IntCounterVec,
    /// `crank_circuit_state{route, endpoint}`: 0 closed, 1 open, 2 half-open.
    pub circuit_state: IntGaugeVec,
    /// `crank_circuit_ejections_total{route, endpoint}`.
    pub ejections: IntCounterVec,
    /// `crank_retries_total{route, reason}`.
    pub retries: IntCounterVec,
    /// `crank_retry_budget_exhausted_total{route}`.
    pub budget_exhausted: IntCounterVec,
    /// `crank_idempotent_replays_total{result}`: `replayed`, `mismatch`,
    /// `in-use`, `unavailable`.
    pub replays: IntCounterVec,
    /// `crank_idempotency_keys`: responses kept plus requests running.
    pub idempotency_keys: IntGauge,
    /// `crank_faults_injected_total{route, kind}`: `delay` or `abort`.
    pub faults: IntCounterVec,
    /// `crank_request_timeouts_total{route}`.
    pub timeouts: IntCounterVec,
}

impl ResilienceMetrics {
    fn new(registry: &Registry) -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric names");
            c
        };
        let circuit_state = IntGaugeVec::new(
            Opts::new(
                "crank_circuit_state",
                "Outlier detection state of each endpoint: 0 closed, 1 open (ejected), 2 half-open (probing)",
            ),
            &["route", "endpoint"],
        )
        .expect("static metric");
        registry
            .register(Box::new(circuit_state.clone()))
            .expect("unique metric names");
        let idempotency_keys = IntGauge::new(
            "crank_idempotency_keys",
            "Idempotency keys held: responses kept for replay plus requests running",
        )
        .expect("static metric");
        registry
            .register(Box::new(idempotency_keys.clone()))
            .expect("unique metric names");
        ResilienceMetrics {
            ratelimited: counter(
                "crank_ratelimited_total",
                "Requests refused with 429 because the tenant's quota was spent",
                &["direction", "tenant", "capability"],
            ),
            shed: counter(
                "crank_shed_total",
                "Requests refused with 503 without reaching the upstream, by reason",
                &["direction", "route", "reason"],
            ),
            circuit_state,
            ejections: counter(
                "crank_circuit_ejections_total",
                "Endpoints ejected by outlier detection",
                &["route", "endpoint"],
            ),
            retries: counter(
                "crank_retries_total",
                "Upstream attempts retried, by the failure that caused the retry",
                &["route", "reason"],
            ),
            budget_exhausted: counter(
                "crank_retry_budget_exhausted_total",
                "Failures not retried because the route's retry budget was spent",
                &["route"],
            ),
            replays: counter(
                "crank_idempotent_replays_total",
                "Requests with a known Idempotency-Key: replayed, or refused (mismatch, in-use, unavailable)",
                &["result"],
            ),
            idempotency_keys,
            faults: counter(
                "crank_faults_injected_total",
                "Faults injected by route config, by kind (delay, abort)",
                &["route", "kind"],
            ),
            timeouts: counter(
                "crank_request_timeouts_total",
                "Requests answered 504 request-timeout because the route's deadline passed",
                &["route"],
            ),
        }
    }
}

/// Requests, latency, proxy-made answers, readiness.
struct TrafficMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
    proxy_errors: IntCounterVec,
    tap_dropped: IntCounter,
    inflight: IntGauge,
    ready: IntGauge,
}

impl TrafficMetrics {
    fn new(registry: &Registry) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "crank_requests_total",
                "Requests handled, by direction, route and status class",
            ),
            &["direction", "route", "status_class"],
        )
        .expect("static metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "crank_request_duration_seconds",
                "Request latency through the proxy, from request start to the end of the response",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 120.0, 300.0,
            ]),
            &["direction", "route"],
        )
        .expect("static metric");
        let proxy_errors = IntCounterVec::new(
            Opts::new(
                "crank_proxy_errors_total",
                "Error responses made by the proxy itself (x-crank-error), by reason",
            ),
            &["direction", "reason"],
        )
        .expect("static metric");
        let tap_dropped = IntCounter::new(
            "crank_tap_events_dropped_total",
            "Tap events a tap client lost: it fell behind, or went past its max_rps",
        )
        .expect("static metric");
        let inflight =
            IntGauge::new("crank_inflight_requests", "Requests in flight").expect("static metric");
        let ready = IntGauge::new("crank_ready", "1 when the proxy is ready to serve")
            .expect("static metric");
        register(
            registry,
            [
                Box::new(requests.clone()) as Box<dyn Collector>,
                Box::new(latency.clone()),
                Box::new(proxy_errors.clone()),
                Box::new(tap_dropped.clone()),
                Box::new(inflight.clone()),
                Box::new(ready.clone()),
            ],
        );
        TrafficMetrics {
            requests,
            latency,
            proxy_errors,
            tap_dropped,
            inflight,
            ready,
        }
    }
}

/// Connections and handshakes.
struct ConnMetrics {
    handshake_failures: IntCounterVec,
    open_connections: IntGaugeVec,
    connections_refused: IntCounterVec,
    request_head_timeouts: IntCounterVec,
}

impl ConnMetrics {
    fn new(registry: &Registry) -> Self {
        let handshake_failures = IntCounterVec::new(
            Opts::new(
                "crank_tls_handshake_failures_total",
                "Refused or failed mTLS handshakes, by direction and reason",
            ),
            &["direction", "reason"],
        )
        .expect("static metric");
        let open_connections = IntGaugeVec::new(
            Opts::new(
                "crank_open_connections",
                "Open downstream connections, by direction",
            ),
            &["direction"],
        )
        .expect("static metric");
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "crank_connections_refused_total",
                "Downstream connections closed at accept, by direction and reason (limit: the listener's connection cap)",
            ),
            &["direction", "reason"],
        )
        .expect("static metric");
        let request_head_timeouts = IntCounterVec::new(
            Opts::new(
                "crank_request_head_timeouts_total",
                "Downstream connections closed because a request head was not complete within limits.request_head_timeout",
            ),
            &["direction"],
        )
        .expect("static metric");
        register(
            registry,
            [
                Box::new(handshake_failures.clone()) as Box<dyn Collector>,
                Box::new(open_connections.clone()),
                Box::new(connections_refused.clone()),
                Box::new(request_head_timeouts.clone()),
            ],
        );
        ConnMetrics {
            handshake_failures,
            open_connections,
            connections_refused,
            request_head_timeouts,
        }
    }
}

/// Policy decisions, evaluation time, reloads, the decision log.
struct PolicyMetrics {
    policy_decisions: IntCounterVec,
    policy_eval: HistogramVec,
    policy_reloads: IntCounterVec,
    policy_revision: IntGaugeVec,
    decision_log_dropped: IntCounter,
}

impl PolicyMetrics {
    fn new(registry: &Registry) -> Self {
        let policy_decisions = IntCounterVec::new(
            Opts::new(
                "crank_policy_decisions_total",
                "Policy decisions, by direction, result (allow, deny, error) and mode (enforce, audit)",
            ),
            &["direction", "result", "mode"],
        )
        .expect("static metric");
        let policy_eval = HistogramVec::new(
            HistogramOpts::new(
                "crank_policy_eval_seconds",
                "Time to evaluate the policy for one request",
            )
            .buckets(vec![
                0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.025,
                0.1,
            ]),
            &["direction"],
        )
        .expect("static metric");
        let policy_reloads = IntCounterVec::new(
            Opts::new(
                "crank_policy_reloads_total",
                "Policy revisions applied (ok) or rejected (error), by direction",
            ),
            &["direction", "result"],
        )
        .expect("static metric");
        let policy_revision = IntGaugeVec::new(
            Opts::new(
                "crank_policy_revision",
                "1 for the policy revision each direction runs",
            ),
            &["direction", "revision"],
        )
        .expect("static metric");
        let decision_log_dropped = IntCounter::new(
            "crank_policy_decision_log_dropped_total",
            "Decision log lines dropped because the writer fell behind",
        )
        .expect("static metric");
        register(
            registry,
            [
                Box::new(policy_decisions.clone()) as Box<dyn Collector>,
                Box::new(policy_eval.clone()),
                Box::new(policy_reloads.clone()),
                Box::new(policy_revision.clone()),
                Box::new(decision_log_dropped.clone()),
            ],
        );
        PolicyMetrics {
            policy_decisions,
            policy_eval,
            policy_reloads,
            policy_revision,
            decision_log_dropped,
        }
    }
}

/// Span export and sampling, and config reloads.
struct TracingMetrics {
    spans_exported: IntCounter,
    spans_dropped: IntCounterVec,
    sampling_ratio: Gauge,
    config_reloads: IntCounterVec,
}

impl TracingMetrics {
    fn new(registry: &Registry) -> Self {
        let spans_exported = IntCounter::new(
            "crank_spans_exported_total",
            "Spans the OTLP collector accepted",
        )
        .expect("static metric");
        let spans_dropped = IntCounterVec::new(
            Opts::new(
                "crank_spans_dropped_total",
                "Spans dropped: the export queue was full (queue_full) or the collector did not accept a batch (export_failed)",
            ),
            &["reason"],
        )
        .expect("static metric");
        for r in ["queue_full", "export_failed"] {
            spans_dropped.with_label_values(&[r]);
        }
        let sampling_ratio = Gauge::new(
            "crank_trace_sampling_ratio",
            "Share of new traces sampled (tracing.sampling); 0 when tracing is off",
        )
        .expect("static metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "crank_config_reloads_total",
                "Changes to the config file applied without a restart (applied) or refused (rejected)",
            ),
            &["result"],
        )
        .expect("static metric");
        register(
            registry,
            [
                Box::new(spans_exported.clone()) as Box<dyn Collector>,
                Box::new(spans_dropped.clone()),
                Box::new(sampling_ratio.clone()),
                Box::new(config_reloads.clone()),
            ],
        );
        TracingMetrics {
            spans_exported,
            spans_dropped,
            sampling_ratio,
            config_reloads,
        }
    }
}

/// Registers each metric of a group once.
fn register<const N: usize>(registry: &Registry, all: [Box<dyn Collector>; N]) {
    for c in all {
        registry.register(c).expect("unique metric names");
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let t = TrafficMetrics::new(&registry);
        let c = ConnMetrics::new(&registry);
        let p = PolicyMetrics::new(&registry);
        let s = TracingMetrics::new(&registry);
        let resilience = ResilienceMetrics::new(&registry);
        let identity = IdentityMetrics::new(&registry);
        let tunnel = tunnel::TunnelMetrics::new(&registry);
        let egress = egress::EgressMetrics::new(&registry);
        Metrics {
            tunnel,
            egress,
            resilience,
            identity,
            registry,
            requests: t.requests,
            latency: t.latency,
            handshake_failures: c.handshake_failures,
            open_connections: c.open_connections,
            proxy_errors: t.proxy_errors,
            connections_refused: c.connections_refused,
            request_head_timeouts: c.request_head_timeouts,
            tap_dropped: t.tap_dropped,
            inflight: t.inflight,
            ready: t.ready,
            policy_decisions: p.policy_decisions,
            policy_eval: p.policy_eval,
            policy_reloads: p.policy_reloads,
            policy_revision: p.policy_revision,
            decision_log_dropped: p.decision_log_dropped,
            spans_exported: s.spans_exported,
            spans_dropped: s.spans_dropped,
            sampling_ratio: s.sampling_ratio,
            config_reloads: s.config_reloads,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(8192);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding to a Vec cannot fail");
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// "2xx", "4xx", ... for a status code; "error" when no response was sent.
pub fn status_class(code: u16) -> &'static str {
    match code {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_names() {
        let m = Metrics::new();
        m.requests.with_label_values(&["inbound", "r", "2xx"]).inc();
        m.handshake_failures
            .with_label_values(&["inbound", "unknown-ca"])
            .inc();
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(
            "crank_requests_total{direction=\"inbound\",route=\"r\",status_class=\"2xx\"} 1"
        ));
        assert!(text.contains(
            "crank_tls_handshake_failures_total{direction=\"inbound\",reason=\"unknown-ca\"} 1"
        ));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("crank_"), "{line}");
        }
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(503), "5xx");
        assert_eq!(status_class(0), "error");
    }
}
