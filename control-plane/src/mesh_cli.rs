//! `crankctl status`, `crankctl routes` and `crankctl endpoints`: what
//! crank-control publishes, who applied it, and the registry. Human tables
//! by default, `--output json` for scripts.

use anyhow::{bail, Result};

use crate::registry::Snapshot;
use crate::server::admin::AdminClient;
use crate::server::mesh::{MeshStatus, RouteRow};
use crate::server::state::rfc3339;

fn check_output(output: &str) -> Result<bool> {
    match output {
        "json" => Ok(true),
        "human" => Ok(false),
        other => bail!("unknown --output {other:?}; use human or json"),
    }
}

pub fn status(client: &AdminClient, output: &str) -> Result<()> {
    let s: MeshStatus = client.get("/v1/admin/mesh/status")?;
    if check_output(output)? {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!(
        "config dir:  {}",
        s.config_dir
            .as_deref()
            .unwrap_or("(none: crank-control is only the CA)")
    );
    match &s.version {
        Some(v) => println!(
            "published:   v{} (hash {}) at {}",
            v.seq,
            &v.hash[..12.min(v.hash.len())],
            s.published_at.map(rfc3339).unwrap_or_default()
        ),
        None => println!("published:   nothing yet"),
    }
    if let Some((at, problems)) = &s.last_error {
        println!(
            "last change REJECTED at {} (the published version keeps serving):",
            rfc3339(*at)
        );
        for p in problems {
            println!("  {p}");
        }
    }
    println!(
        "\n{:<36} {:<18} {:<8} {:<10} STATE",
        "PROXY", "INSTANCE", "VERSION", "SEEN"
    );
    for p in &s.proxies {
        println!(
            "{:<36} {:<18} v{:<7} {:<10} {}",
            p.identity,
            p.instance,
            p.seq,
            format!("{}s ago", s.now - p.last_seen),
            if p.stale { "STALE" } else { "current" }
        );
    }
    let stale = s.proxies.iter().filter(|p| p.stale).count();
    if stale > 0 {
        println!("\n{stale} proxy(ies) behind the published version or silent (not seen for 3 watch periods); `crankctl check` says what to do");
    }
    Ok(())
}

pub fn routes(client: &AdminClient, output: &str) -> Result<()> {
    let rows: Vec<RouteRow> = client.get("/v1/admin/mesh/routes")?;
    if check_output(output)? {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    for r in &rows {
        let m = &r.route.matches;
        println!(
            "{}  hosts [{}]{}{}",
            r.route.name,
            m.hosts.join(", "),
            m.path_prefix
                .as_deref()
                .map(|p| format!(" path {p}*"))
                .unwrap_or_default(),
            if r.route.clients.is_empty() {
                String::new()
            } else {
                format!(" clients [{}]", r.route.clients.join(", "))
            }
        );
        for (i, b) in r.route.backends.iter().enumerate() {
            let sel: Vec<String> = b.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "  backend {i}: {} {{{}}} weight {}{}",
                b.capability,
                sel.join(","),
                b.weight,
                if r.empty_backends.contains(&i) {
                    "  (no live endpoint)"
                } else {
                    ""
                }
            );
        }
        for e in &r.endpoints {
            println!(
                "    {:<22} {:<36} weight {}",
                e.address.to_string(),
                e.identity,
                e.weight
            );
        }
    }
    Ok(())
}

pub fn endpoints(client: &AdminClient, output: &str) -> Result<()> {
    let s: Snapshot = client.get("/v1/admin/mesh/endpoints")?;
    if check_output(output)? {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    // The registry's own change counter; a proxy's endpoints fingerprint
    // (its /config_dump) is a different number.
    println!(
        "registry version {} (counts registration changes since crank-control started)",
        s.version
    );
    println!(
        "{:<22} {:<36} {:<28} {:<24} EXPIRES IN",
        "ADDRESS", "IDENTITY", "CAPABILITIES", "LABELS"
    );
    for e in &s.entries {
        let r = &e.registration;
        let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<22} {:<36} {:<28} {:<24} {:.1}s",
            r.address.to_string(),
            r.identity,
            r.capabilities.join(","),
            labels.join(","),
            e.expires_in.as_secs_f64()
        );
    }
    Ok(())
}
