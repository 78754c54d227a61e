//! What the dashboard shows: [`DashboardState`], built by
//! [`Control::dashboard_state`] from the CA state, the published mesh
//! config, the registry and the proxies' traffic reports
//! (`POST /v1/mesh/report`).

use serde::{Deserialize, Serialize};

use super::{now, Control};

/// The whole dashboard, as `GET /api/state` serves it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DashboardState {
    /// Unix seconds.
    pub generated_at: i64,
    pub trust_domain: String,
    pub config: ConfigInfo,
    pub workloads: Vec<WorkloadInfo>,
    pub edges: Vec<Edge>,
    pub certs: Vec<CertInfo>,
    pub routes: Vec<RouteInfo>,
    pub slos: Vec<SloInfo>,
    /// Newest first, at most [`MAX_REFUSALS`].
    pub refusals: Vec<RefusalInfo>,
}

/// The published mesh config version.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigInfo {
    pub seq: Option<u64>,
    pub hash: Option<String>,
    pub policy_revision: Option<String>,
}

/// One identity seen in the reports or the registry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    /// DNS form (`hello.acme.crank.local`).
    pub identity: String,
    pub service: String,
    pub tenant: String,
    /// Capabilities its registered endpoints serve.
    pub capabilities: Vec<String>,
    /// Registry endpoints with a live lease.
    pub endpoints: usize,
    /// Proxy instances that reported within their last 3 report periods.
    pub proxies: usize,
    /// Unix seconds of its latest report.
    pub last_report: Option<i64>,
}

/// Calls from a workload to a capability, from the callers' outbound reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    /// The calling workload's identity (DNS form).
    pub source: String,
    /// The route's capability (its first backend's), or the route's name
    /// when the published config does not know the route.
    pub destination: String,
    pub route: String,
    /// Requests per second between each caller instance's last two reports,
    /// summed over the instances.
    pub rps: f64,
    /// Non-5xx share over the same interval; `None` without requests.
    pub success_rate: Option<f64>,
    /// Cumulative since the proxies started.
    pub requests: u64,
    pub errors: u64,
    /// 99th percentile latency over the same interval (milliseconds).
    pub p99_ms: Option<f64>,
}

/// A CA certificate or a workload's current leaf.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CertInfo {
    /// `root`, `intermediate` or `leaf`.
    pub kind: String,
    pub subject: String,
    pub serial: String,
    pub not_after: i64,
    /// Negative when expired.
    pub seconds_left: i64,
    /// `valid`, `expiring`, `expired` or `revoked`.
    pub status: String,
}

/// A route of the published config with its resolved endpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteInfo {
    pub name: String,
    pub capability: Option<String>,
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub address: String,
    pub identity: String,
    pub live: bool,
}

/// A capability's SLO against what the proxies reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SloInfo {
    pub capability: String,
    /// Target share of successful requests (0.999); `None` without one.
    pub availability: Option<f64>,
    /// Non-5xx share of the requests reported; `None` without requests.
    pub sli: Option<f64>,
    /// `1 - (1 - sli) / (1 - availability)`: 1 untouched, 0 spent,
    /// negative when overspent; `None` without requests or target.
    pub budget_left: Option<f64>,
    pub requests: u64,
    pub errors: u64,
}

/// A policy denial or a shed or limited request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RefusalInfo {
    pub at_ms: u64,
    /// The reporting proxy's identity.
    pub proxy: String,
    pub instance: String,
    pub status: u16,
    /// The `x-crank-error` reason.
    pub reason: String,
    pub route: String,
    pub method: String,
    pub path: String,
    /// The caller's identity when known.
    pub source: Option<String>,
}

/// The most refusals the dashboard shows.
pub const MAX_REFUSALS: usize = 50;

impl Control {
    /// The dashboard's state now.
    pub fn dashboard_state(&self) -> DashboardState {
        let t = now();
        let status = self.mesh_status();
        let routes = self
            .mesh_routes()
            .into_iter()
            .map(|r| RouteInfo {
                name: r.route.name.clone(),
                capability: r.route.backends.first().map(|b| b.capability.clone()),
                endpoints: r
                    .endpoints
                    .iter()
                    .map(|e| EndpointInfo {
                        address: e.address.to_string(),
                        identity: e.identity.clone(),
                        live: true,
                    })
                    .collect(),
            })
            .collect();
        let trust_domain = self.cfg.trust_domain.clone();
        DashboardState {
            generated_at: t,
            trust_domain,
            config: ConfigInfo {
                seq: status.version.as_ref().map(|v| v.seq),
                hash: status.version.map(|v| v.hash),
                policy_revision: status.policy_revision,
            },
            routes,
            ..Default::default()
        }
    }
}
