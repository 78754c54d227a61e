//! Scheduled job templates: each template with a `schedule` fires a job
//! on this shim at every tick of its cron expression (UTC), as if it had
//! been submitted by template name.
//!
//! With the embedded queue each shim fires its own templates. A job fired
//! here carries its tick (`scheduled_ms`), so that a shared queue can keep
//! one job per (template, tick) however many shims fire it
//! ([`crate::job::JobExtras::idempotency_key`]).

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::jobs::Manager;
use crate::templates::Template;

/// Starts one timer per scheduled template; each stops with the manager or
/// its drain.
pub fn spawn(m: &Arc<Manager>) {
    for t in m.settings.templates.by_name.values() {
        if t.cron.is_some() {
            tracing::info!(template = %t.name, schedule = ?t.spec.schedule, "job template scheduled");
            tokio::spawn(ticks(Arc::downgrade(m), t.clone()));
        }
    }
}

async fn ticks(m: Weak<Manager>, t: Template) {
    let Some(cron) = t.cron.clone() else { return };
    loop {
        let now = chrono::Utc::now();
        let next = match cron.find_next_occurrence(&now, false) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(template = %t.name, error = %e, "the schedule has no next tick; it stops");
                return;
            }
        };
        let wait = (next - now).to_std().unwrap_or(Duration::ZERO);
        tokio::time::sleep(wait).await;
        let Some(m) = m.upgrade() else { return };
        if m.is_draining() {
            return;
        }
        let tick = next.timestamp_millis().max(0) as u64;
        match crate::api::submit_template(&m, &t.name, tick).await {
            Ok(rec) => {
                tracing::info!(template = %t.name, job = %rec.id, tick, "scheduled job fired")
            }
            Err(r) => {
                tracing::warn!(template = %t.name, tick, reason = r.reason, message = %r.message, "scheduled job refused")
            }
        }
    }
}
