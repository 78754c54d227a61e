//! `crankctl status`, `crankctl routes` and `crankctl endpoints`: what
//! crank-control publishes, who applied it, and the registry. Human tables
//! by default, `-o wide` for more columns, `-o json` for scripts.

use anyhow::{bail, Result};

use crank_api::proxy::EndpointConfig;

use crate::registry::Snapshot;
use crate::server::admin::AdminClient;
use crate::server::mesh::{MeshStatus, RouteRow};
use crate::server::state::rfc3339;

/// How to print: `-o human` (the default), `-o wide` or `-o json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Human,
    Wide,
    Json,
}

fn check_output(output: &str) -> Result<Output> {
    match output {
        "human" => Ok(Output::Human),
        "wide" => Ok(Output::Wide),
        "json" => Ok(Output::Json),
        other => bail!("unknown --output {other:?}; use human, wide or json"),
    }
}

/// The first 12 characters of a hash or revision, `-` when unknown.
fn short(hash: Option<&str>) -> String {
    hash.map_or("-".into(), |h| h.chars().take(12).collect())
}

pub fn status(client: &AdminClient, output: &str) -> Result<()> {
    let s: MeshStatus = client.get("/v1/admin/mesh/status")?;
    let output = check_output(output)?;
    if output == Output::Json {
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
    print!("{}", proxies_table(&s, output == Output::Wide));
    let stale = s.proxies.iter().filter(|p| p.stale).count();
    if stale > 0 {
        println!("\n{stale} proxy(ies) behind the published version or silent (not seen for 3 watch periods); `crankctl check` says what to do");
    }
    Ok(())
}

/// The proxies table; `wide` adds the hash and policy revision each runs.
fn proxies_table(s: &MeshStatus, wide: bool) -> String {
    let mut out = String::new();
    let extra = if wide {
        format!(" {:<12} {:<12}", "HASH", "POLICY")
    } else {
        String::new()
    };
    out += &format!(
        "\n{:<36} {:<18} {:<8} {:<10}{extra} STATE\n",
        "PROXY", "INSTANCE", "VERSION", "SEEN"
    );
    for p in &s.proxies {
        let extra = if wide {
            format!(
                " {:<12} {:<12}",
                short(p.hash.as_deref()),
                short(p.policy_revision.as_deref())
            )
        } else {
            String::new()
        };
        let state = match (p.stale, p.silent) {
            (false, _) => "current",
            (true, true) if wide => "STALE (silent)",
            (true, _) => "STALE",
        };
        out += &format!(
            "{:<36} {:<18} v{:<7} {:<10}{extra} {state}\n",
            p.identity,
            p.instance,
            p.seq,
            format!("{}s ago", s.now - p.last_seen),
        );
    }
    out
}

pub fn routes(client: &AdminClient, output: &str) -> Result<()> {
    let rows: Vec<RouteRow> = client.get("/v1/admin/mesh/routes")?;
    let output = check_output(output)?;
    if output == Output::Json {
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
                match (&b.egress, r.empty_backends.contains(&i)) {
                    (Some(d), _) => format!("  egress {d} (outside the mesh)"),
                    (None, true) => "  (no live endpoint)".to_string(),
                    (None, false) => String::new(),
                }
            );
        }
        for e in &r.endpoints {
            println!("{}", endpoint_line(e, output == Output::Wide));
        }
    }
    Ok(())
}

/// A route's endpoint; `wide` adds its backend index and labels.
fn endpoint_line(e: &EndpointConfig, wide: bool) -> String {
    let extra = if wide {
        let labels: Vec<String> = e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(" backend {} labels {{{}}}", e.backend, labels.join(","))
    } else {
        String::new()
    };
    format!(
        "    {:<22} {:<36} weight {}{extra}",
        e.address.to_string(),
        e.identity,
        e.weight
    )
}

pub fn endpoints(client: &AdminClient, output: &str) -> Result<()> {
    let s: Snapshot = client.get("/v1/admin/mesh/endpoints")?;
    let output = check_output(output)?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    print!("{}", endpoints_table(&s, output == Output::Wide));
    Ok(())
}

/// The registry table; `wide` adds the lease id, registration and last
/// heartbeat times.
fn endpoints_table(s: &Snapshot, wide: bool) -> String {
    // The registry's own change counter; a proxy's endpoints fingerprint
    // (its /config_dump) is a different number.
    let mut out = format!(
        "registry version {} (counts registration changes since crank-control started)\n",
        s.version
    );
    let extra = if wide {
        format!(
            " {:<32} {:<20} {:<20}",
            "LEASE", "REGISTERED", "LAST HEARTBEAT"
        )
    } else {
        String::new()
    };
    out += &format!(
        "{:<22} {:<36} {:<28} {:<24} {:<10}{extra}\n",
        "ADDRESS", "IDENTITY", "CAPABILITIES", "LABELS", "EXPIRES IN"
    );
    for e in &s.entries {
        let r = &e.registration;
        let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let expires = format!("{:.1}s", e.expires_in.as_secs_f64());
        let (expires, extra) = if wide {
            let extra = format!(
                " {:<32} {:<20} {}",
                e.lease.to_string(),
                rfc3339(unix(e.registered_at)),
                rfc3339(unix(e.last_heartbeat))
            );
            (format!("{expires:<10}"), extra)
        } else {
            (expires, String::new())
        };
        out += &format!(
            "{:<22} {:<36} {:<28} {:<24} {expires}{extra}\n",
            r.address.to_string(),
            r.identity,
            r.capabilities.join(","),
            labels.join(","),
        );
    }
    out
}

fn unix(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::mesh::ProxyRow;

    fn status() -> MeshStatus {
        let row = |instance: &str, stale, silent, hash: Option<&str>| ProxyRow {
            identity: "web.demo.crank.local".into(),
            instance: instance.into(),
            seq: 3,
            last_seen: 90,
            stale,
            silent,
            hash: hash.map(String::from),
            policy_revision: hash.map(|_| "0123456789abcdef".into()),
        };
        MeshStatus {
            config_dir: None,
            version: None,
            published_at: None,
            last_error: None,
            policy_revision: None,
            proxies: vec![
                row("a", false, false, Some("3d481ae8274bffff")),
                row("b", true, true, None),
            ],
            now: 100,
        }
    }

    #[test]
    fn output_formats_are_human_wide_and_json() {
        assert_eq!(check_output("human").unwrap(), Output::Human);
        assert_eq!(check_output("wide").unwrap(), Output::Wide);
        assert_eq!(check_output("json").unwrap(), Output::Json);
        let e = check_output("yaml").unwrap_err().to_string();
        assert!(e.contains("use human, wide or json"), "{e}");
    }

    #[test]
    fn wide_status_adds_hash_and_policy_columns() {
        let human = proxies_table(&status(), false);
        assert!(!human.contains("HASH"), "{human}");
        assert!(human.contains("v3       10s ago    current"), "{human}");
        let wide = proxies_table(&status(), true);
        let lines: Vec<&str> = wide.lines().collect();
        assert!(
            lines[1].contains("SEEN       HASH         POLICY       STATE"),
            "{wide}"
        );
        assert!(
            lines[2].ends_with("3d481ae8274b 0123456789ab current"),
            "{wide}"
        );
        assert!(
            lines[3].ends_with("-            -            STALE (silent)"),
            "{wide}"
        );
    }

    #[test]
    fn wide_endpoints_add_lease_and_times() {
        let json = serde_json::json!({"version": 2, "entries": [{
            "lease": "00112233445566778899aabbccddeeff",
            "registration": {"address": "127.0.0.1:9000", "identity": "web.demo.crank.local",
                             "capabilities": ["hello:v1"], "labels": {"pool": "a"}},
            "registered_at_unix": 0, "last_heartbeat_unix": 60, "expires_in_ms": 4500}]});
        let snap: Snapshot = serde_json::from_value(json).unwrap();
        let human = endpoints_table(&snap, false);
        assert!(
            human
                .lines()
                .nth(2)
                .unwrap()
                .ends_with("pool=a                   4.5s"),
            "{human}"
        );
        assert!(!human.contains("LEASE"), "{human}");
        let wide = endpoints_table(&snap, true);
        let row = wide.lines().nth(2).unwrap();
        assert!(
            row.ends_with("4.5s       00112233445566778899aabbccddeeff 1970-01-01T00:00:00Z 1970-01-01T00:01:00Z"),
            "{wide}"
        );
    }

    #[test]
    fn wide_route_endpoints_add_backend_and_labels() {
        let e: EndpointConfig = serde_json::from_value(serde_json::json!({
            "address": "127.0.0.1:9000", "identity": "web.demo.crank.local",
            "weight": 5, "labels": {"pool": "b", "zone": "z1"}, "backend": 1}))
        .unwrap();
        assert!(endpoint_line(&e, false).ends_with("weight 5"));
        assert!(endpoint_line(&e, true).ends_with("weight 5 backend 1 labels {pool=b,zone=z1}"));
    }
}
