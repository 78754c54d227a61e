//! `GET /v1/usage?tenant=&since=`: CPU-seconds, GPU-seconds, energy and
//! job counts per tenant and capability, for cost allocation
//! (`crankctl jobs usage`). Summed over every shim's jobs when the queue
//! is shared, else over this shim's.

use crank_plumbing::Refusal;
use http::{Response, StatusCode};

use super::{json, Body};
use crate::job::now_ms;
use crate::jobs::Manager;
use crate::usage::{parse_since, LocalUsage, UsageQuery, UsageReport, UsageSource};

/// Default window: the last 30 days.
const DEFAULT_SINCE: &str = "30d";

pub(super) async fn usage(
    m: &std::sync::Arc<Manager>,
    query: Option<&str>,
) -> Result<Response<Body>, Refusal> {
    let bad = |msg: String| Refusal::new(StatusCode::BAD_REQUEST, "bad-query", msg);
    let (mut tenant, mut since) = (None, DEFAULT_SINCE.to_string());
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "tenant" if !v.is_empty() => tenant = Some(v.into_owned()),
            "since" => since = v.into_owned(),
            _ => {}
        }
    }
    let q = UsageQuery {
        tenant,
        since_ms: parse_since(&since, now_ms()).map_err(bad)?,
    };
    let (source, rows) = match &m.settings.usage_source {
        Some(s) => ("queue", s.usage(&q).await),
        None => ("local", LocalUsage(m.clone()).usage(&q).await),
    };
    let rows = rows.map_err(|e| {
        Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "usage-unavailable",
            format!("summing usage failed: {e}; retry later"),
        )
        .retry_after(5)
    })?;
    Ok(json(
        StatusCode::OK,
        &UsageReport {
            since_ms: q.since_ms,
            tenant: q.tenant,
            source: source.into(),
            usage: rows,
        },
    ))
}
