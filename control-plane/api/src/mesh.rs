//! The mesh configuration the platform engineers keep in git, as the
//! control plane reads it from its config directory, and the registry of
//! live endpoints.
//!
//! - `routes/*.yaml`: [`RoutesFile`], routes matched by host/authority and
//!   path prefix, whose backends pick endpoints by capability and label
//!   selector, with weights;
//! - `quotas.yaml`: [`QuotasFile`], rate limits by tenant and capability;
//! - `egress.yaml`: [`EgressFile`], destinations outside the mesh;
//! - `slo/*.yaml`: [`SloFile`], latency and availability objectives per
//!   capability;
//! - `policies/*.rego` with their `*_test.rego`.
//!
//! Every struct rejects unknown fields.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::resilience::{CircuitConfig, RetryConfig};

/// One `routes/<name>.yaml` file: one or more routes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    pub routes: Vec<MeshRoute>,
}

/// A route: what requests it takes and where they go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshRoute {
    /// Unique across the directory; proxies' `outbound.ports` refer to it.
    pub name: String,
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    /// Where requests go: each backend is a set of registered endpoints
    /// (capability + label selector) with a weight.
    pub backends: Vec<Backend>,
    /// The whole request's deadline, retries included.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub circuit: CircuitConfig,
    /// Which proxies receive this route: those whose identity's service is
    /// listed (`frontend`), or every proxy when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<String>,
    /// The server talks first (SMTP, MySQL): a sidecar's capture listener
    /// skips protocol detection for a connection to one of the route's
    /// `address:port` or `range:port` hosts. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub server_speaks_first: bool,
}

/// How a request selects a route. Empty: only by the route's name (as
/// `Host`, or a local port bound to it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// `Host` / `:authority` values (port ignored); for captured
    /// connections also `address:port` and `range:port`
    /// (`10.96.0.0/12:5432`, a Kubernetes Service's ClusterIP range).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// A path prefix (`/v1/transcode`); absent: any path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
}

/// A weighted set of endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// The capability the endpoints serve (`transcode:v1`).
    pub capability: String,
    /// Labels every endpoint must carry (`gpu: nvidia`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// Share of the route's traffic, relative to the other backends.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// A destination of `egress.yaml` outside the mesh that serves the
    /// capability, instead of registered endpoints. Such a backend is its
    /// route's only one and has no selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<String>,
}

/// `egress.yaml`: destinations outside the mesh and the mode for the
/// destinations it does not declare (`crate::proxy::EgressConfig`; a
/// `tls.ca` file is relative to the config directory).
pub type EgressFile = crate::proxy::EgressConfig;

fn default_weight() -> u32 {
    100
}

/// `quotas.yaml`: the same limits as a proxy's `quotas.limits`, pushed to
/// every proxy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotasFile {
    #[serde(default)]
    pub limits: Vec<crate::resilience::QuotaLimit>,
}

/// `capabilities.yaml`: the capabilities the mesh knows. Routes, quotas and
/// SLOs may only name these (offline validation cannot see which workers
/// are registered right now).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilitiesFile {
    pub capabilities: Vec<CapabilityDecl>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityDecl {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `slo/<name>.yaml` (the format of the platform review's sketch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloFile {
    pub capability: String,
    pub slo: Slo,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencySlo>,
    /// `99.9%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability: Option<String>,
    /// `0.1%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_budget: Option<String>,
    /// `30d`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub measurement_window: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencySlo {
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub p50: Option<Duration>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub p95: Option<Duration>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub p99: Option<Duration>,
}

/// A published config version: a sequence number and the content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigVersion {
    pub seq: u64,
    /// SHA-256 of the directory's files (names and contents), hex.
    pub hash: String,
}

/// A live endpoint in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointRegistration {
    /// Where peers reach it: the sidecar's inbound mTLS address.
    pub address: SocketAddr,
    /// The identity it proves (`<svc>.<tenant>.<td>`). The control plane
    /// checks it against the registering client's certificate.
    pub identity: String,
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `GET /v1/mesh/watch?instance=I&seq=S&registry=R&wait=30` (mTLS with the
/// enrolled identity). Answers as soon as the published config (`seq`) or
/// the live endpoints (`registry`) differ from what the caller has, or
/// after `wait` seconds (at most 60) with the current state. The query is
/// also the caller's report of the version it applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeshUpdate {
    pub version: ConfigVersion,
    /// The registry version the endpoints below were resolved from.
    pub registry: u64,
    /// The routes this proxy needs (a route's `clients`), with their live
    /// endpoints, in the proxy's own route type.
    pub routes: Vec<crate::proxy::RouteConfig>,
    /// `quotas.yaml`'s limits.
    pub quotas: Vec<crate::resilience::QuotaLimit>,
    /// `policies/` files (name → contents); empty when the directory has none.
    pub policies: BTreeMap<String, String>,
    /// `egress.yaml`, with each `tls.ca` file's PEM text inline. Absent
    /// from older control planes: no egress.
    #[serde(default, skip_serializing_if = "crate::proxy::EgressConfig::is_empty")]
    pub egress: crate::proxy::EgressConfig,
    /// `tenants.yaml` (the job queue's weights and quotas), for the worker
    /// shims behind the proxy (`GET /mesh/tenants` on its admin listener).
    /// Absent when the directory has none, and from older control planes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants: Option<crate::tenants::TenantsFile>,
}

/// `POST /v1/registry/register` (mTLS): the caller's identity must be the
/// registration's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub endpoint: EndpointRegistration,
    /// How long the registration lives without a heartbeat. Default: the
    /// control plane's `registry.lease` (10 s).
    #[serde(default)]
    pub lease_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub lease: String,
    pub lease_seconds: u64,
}

/// `POST /v1/registry/heartbeat` and `POST /v1/registry/deregister`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub lease: String,
}
