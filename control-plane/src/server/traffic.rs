//! What the dashboard shows: [`DashboardState`], built by
//! [`Control::dashboard_state`] from the CA state, the published mesh
//! config, the registry and the proxies' traffic reports, which arrive on
//! `POST /v1/mesh/report` ([`Control::mesh_report`]) and are kept in
//! memory ([`store`]). The rows are pure functions of those ([`aggregate`]).

pub mod aggregate;
pub mod store;

use std::collections::HashMap;

use crank_api::report::TrafficReport;
use crank_certs::Identity;

use hyper::body::Incoming;
use hyper::Request;
use serde::{Deserialize, Serialize};

use super::http::{json, Resp};
use super::state::Refusal;
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

/// Largest report body crank-control reads (256 KiB).
pub const MAX_REPORT_BODY: usize = 256 * 1024;

fn refusal(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Reads and checks a report body.
async fn report_body(req: Request<Incoming>) -> Result<TrafficReport, Refusal> {
    let r: TrafficReport = super::http::json_body(req, MAX_REPORT_BODY, "traffic report").await?;
    super::http::check_instance(&r.instance)?;
    r.validate()
        .map_err(|e| refusal(400, "bad-request", format!("the traffic report: {e}")))?;
    Ok(r)
}

/// A report's instance against the one its certificate was issued to
/// (`None` when crank-control did not issue it: any instance is taken).
fn instance_of_cert(issued_to: Option<&str>, reported: &str, serial: &str) -> Result<(), Refusal> {
    match issued_to {
        Some(issued) if issued != reported => Err(refusal(
            403,
            "instance-mismatch",
            format!(
                "the report is for instance {reported:?} but certificate {serial} was issued to instance {issued:?}; a proxy reports as the instance it enrolled as"
            ),
        )),
        _ => Ok(()),
    }
}

impl Control {
    fn traffic(&self) -> std::sync::MutexGuard<'_, store::TrafficStore> {
        self.traffic.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `POST /v1/mesh/report`: keeps a proxy's traffic report under the
    /// identity of its client certificate. When crank-control issued that
    /// certificate (`serial` is in its inventory), the report's instance
    /// must be the one it was issued to.
    pub(super) async fn mesh_report(
        &self,
        req: Request<Incoming>,
        id: Identity,
        serial: &str,
    ) -> Result<Resp, Refusal> {
        let r = report_body(req).await?;
        let issued_to = self.state().issued(serial).map(|i| i.instance.clone());
        instance_of_cert(issued_to.as_deref(), &r.instance, serial)?;
        let refusals = r.refusals.len();
        self.traffic()
            .record(&id.dns_name(), r, now_ms())
            .map_err(|e| match e {
                store::StoreFull::PerIdentity { .. } => {
                    refusal(429, "too-many-instances", e.to_string())
                }
                _ => refusal(503, "report-store-full", e.to_string()),
            })?;
        Ok(json(
            200,
            &serde_json::json!({"ok": true, "refusals": refusals}),
        ))
    }

    /// The dashboard's state now.
    pub fn dashboard_state(&self) -> DashboardState {
        let (t, t_ms) = (now(), now_ms());
        let status = self.mesh_status();
        let published = self.mesh().current.clone();
        let entries = self.registry.snapshot(super::mesh::instant()).entries;
        let route_rows = published
            .as_ref()
            .map(|p| super::mesh::route_rows(p, &entries))
            .unwrap_or_default();
        let capability_of: HashMap<String, String> = route_rows
            .iter()
            .filter_map(|r| {
                Some((
                    r.route.name.clone(),
                    r.route.backends.first()?.capability.clone(),
                ))
            })
            .collect();
        let objectives = published
            .as_ref()
            .map(|p| crate::slo::objectives(&p.snapshot))
            .unwrap_or_default();
        let certs = aggregate::certs(&self.state(), t);
        let mut traffic = self.traffic();
        traffic.prune(t_ms);
        let instances: Vec<&store::InstanceReports> = traffic.instances().collect();
        DashboardState {
            generated_at: t,
            trust_domain: self.cfg.trust_domain.clone(),
            config: ConfigInfo {
                seq: status.version.as_ref().map(|v| v.seq),
                hash: status.version.map(|v| v.hash),
                policy_revision: status.policy_revision,
            },
            workloads: aggregate::workloads(&instances, &entries, t_ms),
            edges: aggregate::edges(&instances, &capability_of, t_ms),
            certs,
            routes: route_rows.iter().map(route_info).collect(),
            slos: aggregate::slos(&objectives, &instances),
            refusals: traffic.refusals().to_vec(),
        }
    }
}

/// A route with its resolved endpoints: every one has a live lease (the
/// registry drops expired ones before resolving).
fn route_info(r: &super::mesh::RouteRow) -> RouteInfo {
    RouteInfo {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_names_the_instance_its_certificate_was_issued_to() {
        assert!(instance_of_cert(Some("ab12"), "ab12", "0a").is_ok());
        assert!(
            instance_of_cert(None, "made-up", "0a").is_ok(),
            "not issued here"
        );
        let e = instance_of_cert(Some("ab12"), "made-up", "0a").unwrap_err();
        assert_eq!((e.status, e.code), (403, "instance-mismatch"));
        assert!(
            e.message.contains("ab12") && e.message.contains("made-up"),
            "{}",
            e.message
        );
    }
}
