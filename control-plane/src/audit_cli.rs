//! `crankctl audit`: the audit log as a table or JSON.

use std::time::Duration;

use anyhow::Result;

use crate::server::admin::AdminClient;
use crate::server::audit::AuditEntry;
use crate::server::state::rfc3339;

/// Prints the entries `since` ago with `action`, oldest first.
pub fn audit(
    client: &AdminClient,
    since: Option<Duration>,
    action: Option<&str>,
    output: &str,
) -> Result<()> {
    let mut query: Vec<(&str, String)> = Vec::new();
    if let Some(s) = since {
        query.push((
            "since",
            (crate::server::now() - s.as_secs() as i64).to_string(),
        ));
    }
    if let Some(a) = action {
        query.push(("action", a.to_string()));
    }
    let qs = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(query)
        .finish();
    let path = if qs.is_empty() {
        "/v1/admin/audit".to_string()
    } else {
        format!("/v1/admin/audit?{qs}")
    };
    let entries: Vec<AuditEntry> = client.get(&path)?;
    match output {
        "json" => println!("{}", serde_json::to_string_pretty(&entries)?),
        "human" => print_table(&entries),
        other => anyhow::bail!("-o {other}: use human or json"),
    }
    Ok(())
}

fn print_table(entries: &[AuditEntry]) {
    println!(
        "{:<20} {:<36} {:<8} {:<15} {:<30} {:<8} {:<16} REASON",
        "TIME", "IDENTITY", "ROLE", "ACTION", "TARGET", "RESULT", "REQUEST ID"
    );
    for e in entries {
        println!(
            "{:<20} {:<36} {:<8} {:<15} {:<30} {:<8} {:<16} {}",
            rfc3339(e.time),
            e.identity,
            e.role.as_deref().unwrap_or("-"),
            e.action,
            e.target,
            e.result,
            e.request_id,
            e.reason.as_deref().unwrap_or("")
        );
    }
}
