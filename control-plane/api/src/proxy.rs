//! The proxy's configuration document (`crank-proxy --config FILE.yaml`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::resilience::*;

/// The whole proxy configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// This workload's certificate, key and trust bundle.
    pub identity: IdentityConfig,
    /// Traffic from peer sidecars (mTLS) to the local app. Optional: a
    /// client-only workload has no inbound side.
    #[serde(default)]
    pub inbound: Option<InboundConfig>,
    /// Traffic from the local app to the mesh.
    #[serde(default)]
    pub outbound: OutboundConfig,
    /// Static routes: a name (usually a capability) to endpoints.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// The admin listener: /live, /ready, /metrics, /config_dump.
    pub admin: AdminConfig,
    /// Worker threads per listener group. Default 1: a sidecar shares its host.
    #[serde(default = "default_threads")]
    pub threads: usize,
    #[serde(default)]
    pub drain: DrainConfig,
    #[serde(default)]
    pub timeouts: TimeoutConfig,
    /// JSON access log line per request on stderr. Default true.
    #[serde(default = "default_true")]
    pub access_log: bool,
    /// Rego policy sets evaluated on each request (inbound, and optionally
    /// outbound for egress). Absent: no policy check.
    #[serde(default)]
    pub policy: Option<PolicyConfig>,
    /// Distributed tracing: W3C Trace Context and OTLP span export. Absent:
    /// the proxy passes `traceparent` through untouched and makes no spans.
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
    /// Rate limits by tenant and capability (429 with `Retry-After`).
    #[serde(default)]
    pub quotas: QuotaConfig,
    /// Routes, quotas and policies from crank-control, and this workload's
    /// registration in its registry. Needs `identity.enroll`. Absent: the
    /// routes and quotas of this file only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshConfig>,
    /// Destinations outside the mesh that routes may send to (a route's
    /// `egress`), and what happens to traffic for a destination nothing
    /// declares. Default: none declared, no egress control.
    #[serde(default, skip_serializing_if = "EgressConfig::is_empty")]
    pub egress: EgressConfig,
    /// Transparent capture (`docs/reference/capture.md`): the listeners
    /// for the connections the capture rules redirect, and the rules
    /// `crank-proxy capture install --config FILE` writes. Absent: no
    /// capture listeners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureConfig>,
    /// What one client may hold of a sidecar: connections per listener, the
    /// time to send a request head, the size of the head.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Opaque TCP through the mesh (`docs/reference/opaque-tcp.md`): the
    /// idle timeout and connection cap of tunnelled connections.
    #[serde(default)]
    pub tunnel: TunnelConfig,
}

/// Opaque TCP tunnels, both directions (`docs/reference/opaque-tcp.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// A tunnel with no byte in either direction for this long is closed
    /// (close reason `idle-timeout`). Default 1h.
    #[serde(default = "default_tunnel_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Open tunnels per direction; one more is refused (outcome `limit`).
    /// Default 4096.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            idle_timeout: default_tunnel_idle(),
            max_connections: default_max_connections(),
        }
    }
}

fn default_tunnel_idle() -> Duration {
    Duration::from_secs(3600)
}

/// Limits that keep slow or hostile clients from exhausting a sidecar, and
/// keep what the outbound side accepts within what the peer's inbound side
/// accepts (so a request is refused at the edge, never by the peer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open connections on the outbound listeners (HTTP proxy and ports
    /// together). A connection past it is closed at once and counted in
    /// `crank_connections_refused_total`. Default 4096: a held
    /// HTTP/1 connection costs about 50 KiB (measured with 2,000 slow
    /// clients), so the cap also bounds memory.
    #[serde(default = "default_max_connections")]
    pub outbound_max_connections: usize,
    /// Open connections on the inbound mTLS listener. Default 4096.
    #[serde(default = "default_max_connections")]
    pub inbound_max_connections: usize,
    /// An HTTP/1 request head must be complete this long after the
    /// connection opened (first request) or after its first byte (later
    /// requests on a kept-alive connection); otherwise the connection is
    /// closed. Default 10s.
    #[serde(default = "default_head_timeout", with = "humantime_serde")]
    pub request_head_timeout: Duration,
    /// A kept-alive downstream connection with no request in progress
    /// (HTTP/1 between requests, HTTP/2 without streams) is closed after
    /// this long, so idle connections cannot hold the connection cap.
    /// Default 60s.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest request header list, counted as HTTP/2 counts it (name +
    /// value + 32 bytes per field, pseudo-headers included). Larger
    /// requests get 431. Default 61440 (60 KiB); the inbound HTTP/2 server
    /// accepts this plus 4 KiB for the headers the calling sidecar adds.
    #[serde(default = "default_max_header_bytes")]
    pub max_request_header_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            outbound_max_connections: default_max_connections(),
            inbound_max_connections: default_max_connections(),
            request_head_timeout: default_head_timeout(),
            idle_timeout: default_idle_timeout(),
            max_request_header_bytes: default_max_header_bytes(),
        }
    }
}

/// What the inbound HTTP/2 server accepts beyond
/// [`LimitsConfig::max_request_header_bytes`]: room for the headers a
/// calling sidecar adds (`traceparent`, `x-crank-capability`, ...).
pub const SIDECAR_HEADER_HEADROOM: usize = 4096;

fn default_max_connections() -> usize {
    4096
}
fn default_head_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_header_bytes() -> usize {
    60 * 1024
}

/// Spans for each request, exported over OTLP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The share of new traces (requests without a valid sampled or
    /// unsampled `traceparent`) that are sampled, 0.0 to 1.0. A caller's
    /// decision is always followed. Default 1.0. Changing it in the file
    /// applies without a restart.
    #[serde(default = "default_sampling")]
    pub sampling: f64,
    #[serde(default)]
    pub otlp: OtlpConfig,
    /// Spans waiting for export; when full, new spans are dropped and
    /// counted in `crank_spans_dropped_total`. Default 4096.
    #[serde(default = "default_queue")]
    pub max_queue_size: usize,
    /// Most spans in one export request. Default 512.
    #[serde(default = "default_batch")]
    pub max_export_batch_size: usize,
    /// Longest a span waits before its batch is sent. Default 1s.
    #[serde(default = "default_delay", with = "humantime_serde")]
    pub scheduled_delay: Duration,
    /// Extra resource attributes (`deployment.environment: prod`), added to
    /// `OTEL_RESOURCE_ATTRIBUTES`; these win. `service.name` and `crank.*`
    /// are set by the proxy and refused here.
    #[serde(default)]
    pub resource: std::collections::BTreeMap<String, String>,
    /// `service.name` of the spans. Default: `OTEL_SERVICE_NAME`, else the
    /// service part of this workload's identity.
    #[serde(default)]
    pub service_name: Option<String>,
}

/// Where spans go.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector: for `http/protobuf` the traces URL
    /// (`http://jaeger:4318/v1/traces`), for `grpc` the server
    /// (`http://jaeger:4317`). Plain `http://` only: run a local collector
    /// for TLS. Absent: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (plus `/v1/traces` for HTTP), else
    /// the protocol's localhost default.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Headers on each export request. `OTEL_EXPORTER_OTLP_HEADERS` (or
    /// `..._TRACES_HEADERS`) is added and wins for the same name; keep
    /// secrets such as API keys there rather than in this file.
    /// `/config_dump` shows the names only.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Deadline of one export request, retries included. Absent:
    /// `OTEL_EXPORTER_OTLP_TIMEOUT`, else 10s.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// `http/protobuf` (port 4318) or `grpc` (port 4317). Absent:
    /// `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`,
    /// else `http/protobuf`.
    #[serde(default)]
    pub protocol: Option<OtlpProtocol>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "grpc")]
    Grpc,
}

fn default_sampling() -> f64 {
    1.0
}
fn default_queue() -> usize {
    4096
}
fn default_batch() -> usize {
    512
}
fn default_delay() -> Duration {
    Duration::from_secs(1)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The policy set checked on requests from peer sidecars.
    #[serde(default)]
    pub inbound: Option<PolicySource>,
    /// The policy set checked on requests from the local app (egress).
    #[serde(default)]
    pub outbound: Option<PolicySource>,
    /// How often the policy directories are checked for a new revision.
    /// Default 1s.
    #[serde(default = "default_reload", with = "humantime_serde")]
    pub reload_interval: Duration,
    #[serde(default)]
    pub decision_log: DecisionLogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySource {
    /// A directory of `.rego` files, `*_test.rego` tests, `data.yaml` and an
    /// optional `policy.yaml` (mode, failure mode, input shape, entry points).
    pub dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionLogConfig {
    /// Write decision log lines at all. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// `-` for stdout (default), or a file path.
    #[serde(default = "default_decision_log_path")]
    pub path: PathBuf,
    /// A file is rotated when it would pass this size. Default 50 MiB.
    #[serde(default = "default_decision_log_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept (`FILE.1` … `FILE.N`). Default 3.
    #[serde(default = "default_decision_log_keep")]
    pub keep: u32,
}

impl Default for DecisionLogConfig {
    fn default() -> Self {
        DecisionLogConfig {
            enabled: true,
            path: default_decision_log_path(),
            max_bytes: default_decision_log_bytes(),
            keep: default_decision_log_keep(),
        }
    }
}

fn default_reload() -> Duration {
    Duration::from_secs(1)
}
fn default_decision_log_path() -> PathBuf {
    PathBuf::from("-")
}
fn default_decision_log_bytes() -> u64 {
    50 << 20
}
fn default_decision_log_keep() -> u32 {
    3
}

/// This workload's identity: either a static certificate and key (`cert`
/// and `key`, issued with `crankctl cert issue`), or `enroll`, where the
/// proxy makes its own key, enrolls with crank-control using a join token,
/// renews before expiry and follows trust bundle and revocation changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// PEM leaf certificate (chain after it, if any). Static mode only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// PEM private key. Static mode only. Never shown in /config_dump.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// PEM roots trusted for peers (may hold several during a rotation).
    /// With `enroll`: the bootstrap bundle that verifies crank-control until
    /// the first bundle arrives from it (then `state_dir/bundle.pem` is used).
    pub trust_bundle: PathBuf,
    /// Get the certificate from crank-control instead of files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enroll: Option<EnrollConfig>,
}

/// Enrollment with crank-control (`identity.enroll`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollConfig {
    /// crank-control's workload API, `host:port` (TLS): one address or a
    /// list of replicas (`["10.0.0.1:8443", "10.0.0.2:8443"]`). A host
    /// that resolves to several addresses is tried address by address.
    pub control_plane: ControlPlane,
    /// The name crank-control's certificate must prove. Default
    /// `control.crank-system.<trust_domain>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// This workload's service (a DNS label).
    pub service: String,
    /// This workload's tenant (a DNS label).
    pub tenant: String,
    /// Default `crank.local`.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// A file holding the one-time join token (`crankctl token create`).
    /// Absent: the `CRANK_JOIN_TOKEN` environment variable. Needed for the
    /// first enrollment; while the certificate is revoked or expired the
    /// sidecar reads it every 2 s and enrolls again by itself with a token
    /// it has not used yet (`state_dir/token.used` remembers the last one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Where the key (`key.pem`, mode 0600), the chain (`cert.pem`), the
    /// bundle (`bundle.pem`), the instance id (`instance`) and the digest of
    /// the last join token used (`token.used`) are kept. Enrollment trusts
    /// crank-control through `trust_bundle` plus the roots in `bundle.pem`.
    pub state_dir: PathBuf,
    /// Renew at this fraction of the certificate's lifetime (minus up to
    /// 10% of the lifetime of random jitter). Default 0.66; 0.1 to 0.9.
    #[serde(default = "default_renew_at")]
    pub renew_at: f64,
    /// How long one watch long-poll waits for a change. Default 30s; 1s to 60s.
    #[serde(default = "default_watch_wait", with = "humantime_serde")]
    pub watch_wait: Duration,
}

/// crank-control's replicas (`identity.enroll.control_plane`): one
/// `host:port` or a list; serialized back the way it was written (a string
/// when there is one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlane(pub Vec<String>);

impl ControlPlane {
    /// The addresses as configured, in order.
    pub fn addresses(&self) -> &[String] {
        &self.0
    }
}

impl From<&str> for ControlPlane {
    fn from(addr: &str) -> Self {
        ControlPlane(vec![addr.to_string()])
    }
}

impl std::fmt::Display for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl Serialize for ControlPlane {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_str(one),
            all => all.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ControlPlane {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "a \"host:port\" or a list of them")]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::One(a) => ControlPlane(vec![a]),
            OneOrMany::Many(all) => ControlPlane(all),
        })
    }
}

impl EnrollConfig {
    /// `server_name`, or its default from the trust domain.
    pub fn server_name(&self) -> String {
        self.server_name
            .clone()
            .unwrap_or_else(|| format!("control.crank-system.{}", self.trust_domain))
    }
}

/// Config distribution from crank-control (`mesh`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// How long one `GET /v1/mesh/watch` long-poll waits for a change.
    /// Default 30s; 1s to 60s.
    #[serde(default = "default_watch_wait", with = "humantime_serde")]
    pub watch_wait: Duration,
    /// Where the last applied update is kept (`mesh.json`), so a restart
    /// serves it even while crank-control is away. Default:
    /// `identity.enroll.state_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Where pushed policy files are written. Must be `policy.inbound.dir`
    /// when an inbound policy set is configured. Absent: pushed policies
    /// are ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_dir: Option<PathBuf>,
    /// Register the local workload in crank-control's registry. Absent: not
    /// registered (a client-only workload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub register: Option<MeshRegisterConfig>,
    /// How often this proxy pushes its traffic report (request counts,
    /// latency histogram, recent policy denials and shed requests) to
    /// crank-control for its dashboard. Default 10s; `0s` turns it off;
    /// otherwise 1s to 10m.
    #[serde(default = "default_report_interval", with = "humantime_serde")]
    pub report_interval: Duration,
}

/// This workload's endpoint in crank-control's registry (`mesh.register`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshRegisterConfig {
    /// The address peers reach this sidecar on. Default: `inbound.listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<SocketAddr>,
    /// Capabilities served (`transcode:v1`).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Labels peers' route selectors match (`gpu: nvidia`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// crank-shim's `registration_file`: its capabilities are added and its
    /// labels win. While the file is absent the workload is not registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_file: Option<PathBuf>,
    /// How long the registration lives without a heartbeat; heartbeats go
    /// every lease/3. Default 10s; 1s to 5m.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
}

fn default_lease() -> Duration {
    Duration::from_secs(10)
}

/// The trust domain when a config names none. The same value as
/// `crank_certs::DEFAULT_TRUST_DOMAIN` (a test in crank-control checks it):
/// a copy, so that this crate needs nothing but serde.
pub const DEFAULT_TRUST_DOMAIN: &str = "crank.local";

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
}
fn default_renew_at() -> f64 {
    0.66
}
fn default_watch_wait() -> Duration {
    Duration::from_secs(30)
}

fn default_report_interval() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// Where peer sidecars connect (mTLS, TLS 1.3, ALPN h2 then http/1.1).
    pub listen: SocketAddr,
    /// The local app's address.
    pub app: SocketAddr,
    /// How to speak to the app. Default `auto`: h2c for gRPC, HTTP/1.1 otherwise.
    #[serde(default)]
    pub app_protocol: AppProtocol,
    /// The capability this app serves when the caller's sidecar does not
    /// name one (`x-crank-capability`); used as `destination.capability` in
    /// policy input.
    #[serde(default)]
    pub capability: Option<String>,
    /// A concurrency limit in front of the app (503 when full). Absent: none.
    #[serde(default)]
    pub concurrency: Option<ConcurrencyConfig>,
    /// `Idempotency-Key` replay. On by default.
    #[serde(default)]
    pub idempotency: IdempotencyConfig,
    /// Local TCP servers that peer sidecars may reach over an opaque TCP
    /// tunnel (`docs/reference/opaque-tcp.md`). Empty: tunnels are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<InboundTcpConfig>,
}

/// A local TCP server behind this sidecar, reachable over a tunnel that
/// names its capability or (captured traffic) its port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundTcpConfig {
    /// Where the server listens (`127.0.0.1:5432`).
    pub app: SocketAddr,
    /// The capability tunnels name to reach it (`db:postgres`).
    #[serde(default)]
    pub capability: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// h2c for requests with `content-type: application/grpc*`, HTTP/1.1 otherwise.
    #[default]
    Auto,
    Http1,
    H2c,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// An HTTP proxy listener for apps that honour `HTTP_PROXY`: the route is
    /// chosen by the request's Host / `:authority`.
    #[serde(default)]
    pub http_proxy: Option<SocketAddr>,
    /// Local upstream ports, each bound to one route.
    #[serde(default)]
    pub ports: Vec<PortConfig>,
    /// Local TCP ports whose connections are tunnelled, as opaque bytes over
    /// mTLS, to the sidecar serving a capability (`docs/reference/opaque-tcp.md`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpPortConfig>,
}

/// One outbound TCP port: every connection to `listen` goes to the
/// capability's sidecar over an opaque TCP tunnel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpPortConfig {
    pub listen: SocketAddr,
    /// The capability of a route in `routes` (its `capability`, or its name).
    pub capability: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    pub listen: SocketAddr,
    /// The name of a route in `routes`.
    pub route: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Route name, usually the capability (`transcode:v1`) or service name.
    pub name: String,
    /// Host / authority values (port ignored) that select this route on the
    /// HTTP proxy listener. The route name always matches too.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Only requests whose path starts with this (`/v1/`) match by host.
    /// Absent: any path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Peer sidecars serving this route. Empty (the default) for a route
    /// with `egress`.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// The capability this route reaches (`transcode:v1`). The outbound
    /// sidecar sends it to the peer in `x-crank-capability`; the peer's
    /// policy sees it as `destination.capability`.
    #[serde(default)]
    pub capability: Option<String>,
    /// The whole request's deadline, retries included (504
    /// `request-timeout`). Absent: none beyond `timeouts.upstream_read`.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// The upstream is safe to call twice: requests with any method may
    /// be retried. Default false (only GET, HEAD, OPTIONS, TRACE, PUT and
    /// DELETE are).
    #[serde(default)]
    pub idempotent: bool,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub circuit: CircuitConfig,
    /// A concurrency limit for this route (503 when full). Absent: none.
    #[serde(default)]
    pub concurrency: Option<ConcurrencyConfig>,
    /// Fault injection (chaos drills). Absent: off.
    #[serde(default)]
    pub fault: Option<FaultConfig>,
    /// The name of a destination in `egress.destinations`: the route sends
    /// there, outside the mesh, instead of to `endpoints` (which must be
    /// empty). Absent: a mesh route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<String>,
    /// The server on this route's `address:port` (or `range:port`) hosts
    /// talks first (SMTP, MySQL): a captured connection to one of them
    /// skips protocol detection. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub server_speaks_first: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// The peer sidecar's inbound address.
    pub address: SocketAddr,
    /// The identity the peer must prove, DNS or SPIFFE form.
    pub identity: String,
    /// Share of the route's traffic, relative to its other endpoints
    /// (1..=10000). Default 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Informational labels (pool, zone, version); shown in `/config_dump`,
    /// not used to route. Default empty.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The weighted backend of a route pushed by crank-control that this
    /// endpoint belongs to. Traffic is split between backends first (by
    /// the sum of their endpoints' weights), then balanced within the
    /// backend. Default 0: one backend.
    #[serde(default)]
    pub backend: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainConfig {
    /// How long in-flight requests get after SIGTERM. Default 30s.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub deadline: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            deadline: default_drain(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutConfig {
    /// TCP + TLS connect timeout to a peer sidecar or the app. Default 5s.
    #[serde(default = "default_connect", with = "humantime_serde")]
    pub connect: Duration,
    /// Idle time allowed between reads from the upstream. Default 60s.
    #[serde(default = "default_read", with = "humantime_serde")]
    pub upstream_read: Duration,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        TimeoutConfig {
            connect: default_connect(),
            upstream_read: default_read(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_threads() -> usize {
    1
}
fn default_drain() -> Duration {
    Duration::from_secs(30)
}
fn default_connect() -> Duration {
    Duration::from_secs(5)
}
fn default_read() -> Duration {
    Duration::from_secs(60)
}

/// Transparent capture (`capture`): what the capture listeners do, and the
/// rules `crank-proxy capture install --config FILE` writes (the same as
/// `crank-capture install`'s flags of the same names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// The uid the proxy runs as: its own connects are never captured.
    pub proxy_uid: u32,
    /// The outbound capture listener, on `127.0.0.1` (and `[::1]` with
    /// `ipv6`). Default 15001.
    #[serde(default = "default_capture_outbound")]
    pub outbound_port: u16,
    /// The inbound capture listener, on `0.0.0.0` (and `[::]` with `ipv6`),
    /// used with `inbound_ports`. Default 15006.
    #[serde(default = "default_capture_inbound")]
    pub inbound_port: u16,
    /// The app's listening ports to capture: `8080,9000`, `8000-8100`, or
    /// `all`. Absent: no inbound capture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound_ports: Option<PortList>,
    /// With `inbound_ports: all`: ports left alone (ssh, the proxy's mTLS
    /// and admin ports).
    #[serde(default)]
    pub exclude_inbound_ports: PortList,
    /// Destination ports outbound capture leaves alone.
    #[serde(default)]
    pub exclude_outbound_ports: PortList,
    /// Destination ranges outbound capture leaves alone (`10.0.0.0/8`,
    /// `169.254.169.254`); loopback always is.
    #[serde(default)]
    pub exclude_outbound_cidrs: Vec<String>,
    /// Capture IPv6 too. Default false.
    #[serde(default)]
    pub ipv6: bool,
    /// `auto` (nftables when installed, else iptables), `nft` or `iptables`.
    #[serde(default = "default_capture_backend")]
    pub backend: String,
    /// Destination ports whose server talks first (SMTP banner, MySQL
    /// greeting): protocol detection is skipped at once, the connection
    /// is opaque TCP. Replaces the default list (21, 22, 25, 110, 143, 587,
    /// 3306, 4444, 4567, 4568) when given.
    #[serde(default = "default_server_speaks_first")]
    pub server_speaks_first: Vec<u16>,
    /// How long detection waits for a client's first bytes before the
    /// connection is taken as opaque TCP. Default 1s.
    #[serde(default = "default_detect_timeout", with = "humantime_serde")]
    pub detect_timeout: Duration,
    /// Inbound: callers without a sidecar (plain TCP on a captured port).
    /// `allow` (default, as Linkerd's `all-unauthenticated` and Istio's
    /// PERMISSIVE) or `deny`.
    #[serde(default)]
    pub inbound_plaintext: CapturePlaintext,
    /// Outbound: destinations that are neither in the mesh nor declared
    /// egress. `passthrough` (default: connected as the app asked) or
    /// `refuse`.
    #[serde(default)]
    pub undeclared: CaptureUndeclared,
}

/// What the inbound capture listener does with a caller without a sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CapturePlaintext {
    #[default]
    Allow,
    Deny,
}

/// What the outbound capture listener does with an undeclared destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureUndeclared {
    #[default]
    Passthrough,
    Refuse,
}

/// Ports in `crank-capture`'s flag syntax (`22,25,8000-8100`, or `all`);
/// YAML may give a number, a string or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(transparent)]
pub struct PortList(pub String);

impl<'de> Deserialize<'de> for PortList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Item {
            Num(u64),
            Text(String),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            One(Item),
            Many(Vec<Item>),
        }
        let text = |i: Item| match i {
            Item::Num(n) => n.to_string(),
            Item::Text(t) => t,
        };
        Ok(PortList(match Form::deserialize(d)? {
            Form::One(i) => text(i),
            Form::Many(v) => v.into_iter().map(text).collect::<Vec<_>>().join(","),
        }))
    }
}

fn default_capture_outbound() -> u16 {
    15001
}
fn default_capture_inbound() -> u16 {
    15006
}
fn default_capture_backend() -> String {
    "auto".into()
}
fn default_server_speaks_first() -> Vec<u16> {
    vec![21, 22, 25, 110, 143, 587, 3306, 4444, 4567, 4568]
}
fn default_detect_timeout() -> Duration {
    Duration::from_secs(1)
}

/// `egress`: destinations outside the mesh (the same shape as the mesh
/// config's `egress.yaml`, which crank-control pushes).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// What happens to traffic for a destination no route and no entry of
    /// `destinations` declares: `allow` (passed through), `audit` (passed
    /// through and logged as `egress-not-declared`) or `deny` (403
    /// `egress-not-declared`). Absent: no egress control; on the HTTP proxy
    /// listener a host no route takes gets 404 `no-route`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<EgressMode>,
    /// The declared destinations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<EgressDestination>,
}

impl EgressConfig {
    pub fn is_empty(&self) -> bool {
        self.mode.is_none() && self.destinations.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressMode {
    Allow,
    Audit,
    Deny,
}

impl EgressMode {
    pub fn as_str(self) -> &'static str {
        match self {
            EgressMode::Allow => "allow",
            EgressMode::Audit => "audit",
            EgressMode::Deny => "deny",
        }
    }
}

/// A destination outside the mesh: where it is and how to speak to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressDestination {
    /// Unique; routes (`egress: NAME`) refer to it.
    pub name: String,
    /// `host:port`, `ip:port` or `[ipv6]:port`. A DNS name is resolved at
    /// each new connection.
    pub address: String,
    /// TLS to the destination, verified against `ca` (never the mesh's
    /// own roots). Absent: plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<EgressTls>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressTls {
    /// The roots the destination's certificate must chain to: PEM text, or
    /// a PEM file (in the mesh config: relative to the config directory;
    /// crank-control pushes the file's contents).
    pub ca: String,
    /// The name sent as SNI and checked against the certificate. Default:
    /// the address's host; required when the address is an IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

impl EgressTls {
    /// Whether `ca` holds PEM text rather than a file name.
    pub fn ca_is_inline(&self) -> bool {
        self.ca.contains("-----BEGIN")
    }
}

/// The host of an egress address: a DNS name or an IP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressHost {
    Name(String),
    Ip(std::net::IpAddr),
}

impl EgressDestination {
    /// The address's host (lower-cased) and port, or why it is not one.
    pub fn host_port(&self) -> Result<(EgressHost, u16), String> {
        parse_egress_address(&self.address)
    }

    /// The SNI and certificate name: `tls.server_name`, else a DNS host.
    pub fn server_name(&self) -> Option<String> {
        let tls = self.tls.as_ref()?;
        if let Some(n) = &tls.server_name {
            return Some(n.clone());
        }
        match self.host_port() {
            Ok((EgressHost::Name(n), _)) => Some(n),
            _ => None,
        }
    }

    /// Problems with the destination apart from the CA's contents, each
    /// as (field under the destination, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        if !is_dns_name(&self.name) {
            p.push(("name", format!("{:?} is not a name of lower-case letters, digits, '-' and '.'; name the destination (`ray-serve`)", self.name)));
        }
        let host = match self.host_port() {
            Err(e) => {
                p.push(("address", e));
                return p;
            }
            Ok((host, _)) => host,
        };
        let Some(tls) = &self.tls else { return p };
        match &tls.server_name {
            None if matches!(host, EgressHost::Ip(_)) => p.push(("tls.server_name", format!("is needed: address {} is an IP, so give the name its certificate carries (`server_name: ray-head.internal`)", self.address))),
            Some(n) if !is_dns_name(&n.to_ascii_lowercase()) => p.push(("tls.server_name", format!("{n:?} is not a DNS name; give the name the destination's certificate carries"))),
            _ => {}
        }
        if tls.ca.trim().is_empty() {
            p.push((
                "tls.ca",
                "is empty; give the PEM file of the CA that signed the destination's certificate"
                    .into(),
            ));
        }
        p
    }
}

/// `host:port` with a DNS name, an IPv4 address or a bracketed IPv6 one.
pub fn parse_egress_address(a: &str) -> Result<(EgressHost, u16), String> {
    let fix = "write `host:port` (`ray-head.internal:8000`, `10.0.0.5:8265` or `[fd00::5]:8265`)";
    if let Ok(sa) = a.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(format!("address {a:?} has port 0; {fix}"));
        }
        return Ok((EgressHost::Ip(sa.ip()), sa.port()));
    }
    let Some((host, port)) = a.rsplit_once(':') else {
        return Err(format!("address {a:?} has no port; {fix}"));
    };
    let port: u16 = match port.parse() {
        Ok(p) if p > 0 => p,
        _ => {
            return Err(format!(
                "address {a:?}: port {port:?} is not 1 to 65535; {fix}"
            ))
        }
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
        return Err(format!(
            "address {a:?} is not a valid IP address and port; {fix}"
        ));
    }
    if !is_dns_name(&host) {
        return Err(format!(
            "address {a:?}: {host:?} is not a DNS name or IP address; {fix}"
        ));
    }
    Ok((EgressHost::Name(host), port))
}

/// Lower-case letters, digits, '-' and '.', in labels of 1 to 63 bytes.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}
