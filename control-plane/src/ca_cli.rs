//! `crankctl` commands that run the CA: offline intermediates, and the
//! ones that talk to a running `crank-control` over its admin socket
//! (tokens, inventory, revocation, rotation, status).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use crank_certs::Ca;

use crate::server::admin::{
    AdminClient, CaEntry, CaStatus, CertRow, RevokeRequest, RevokeResponse, RotateRequest,
    TokenRequest, TokenResponse,
};
use crate::server::state::{rfc3339, RotationKind};

/// `crankctl ca intermediate`: signs a new intermediate with the root in
/// `root_dir` and writes it to `out`.
pub fn intermediate(
    root_dir: &Path,
    out: &Path,
    trust_domain: &str,
    ttl: Duration,
    force: bool,
) -> Result<()> {
    if out.join("ca.key").exists() && !force {
        bail!(
            "{} already holds a CA key; pass --force to replace it",
            out.display()
        );
    }
    let root = load_root(root_dir, trust_domain)?;
    let inter = root.generate_intermediate(ttl)?;
    inter.save_with_root(out, root.cert_pem())?;
    println!(
        "wrote {0}/ca.crt (intermediate), {0}/ca.key (keep it secret) and {0}/bundle.pem (its root); point crank-control's ca.intermediate at {0}",
        out.display()
    );
    Ok(())
}

fn load_root(dir: &Path, trust_domain: &str) -> Result<Ca> {
    let root = Ca::load(dir, trust_domain).with_context(|| {
        format!(
            "loading the root from {} (made by `crankctl ca init --dir {}`)",
            dir.display(),
            dir.display()
        )
    })?;
    if root.is_intermediate() {
        bail!(
            "{} holds an intermediate; pass the root's directory (made by `crankctl ca init`)",
            dir.display()
        );
    }
    Ok(root)
}

/// `crankctl ca rotate intermediate|root`.
pub fn rotate(
    client: &AdminClient,
    kind: RotationKind,
    root_dir: &Path,
    trust_domain: &str,
    ttl: Duration,
    output: &str,
) -> Result<()> {
    let root = load_root(root_dir, trust_domain)?;
    let inter = root.generate_intermediate(ttl)?;
    let req = RotateRequest {
        kind,
        root_pem: (kind == RotationKind::Root).then(|| root.cert_pem().to_string()),
        intermediate_pem: inter.cert_pem().to_string(),
        intermediate_key_pem: inter.key_pem(),
    };
    let status: CaStatus = client.post("/v1/admin/rotate", &req)?;
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        println!("rotation started; follow it with `crankctl ca status`\n");
        print_status(&status);
    }
    Ok(())
}

pub fn token_create(
    client: &AdminClient,
    service: &str,
    tenant: &str,
    ttl: Option<Duration>,
) -> Result<()> {
    let r: TokenResponse = client.post(
        "/v1/admin/tokens",
        &TokenRequest {
            service: service.into(),
            tenant: tenant.into(),
            ttl_seconds: ttl.map(|t| t.as_secs().max(1)),
        },
    )?;
    eprintln!(
        "one-time join token for {}, valid until {}:",
        r.identity,
        rfc3339(r.expires_at)
    );
    println!("{}", r.token);
    Ok(())
}

pub fn cert_list(client: &AdminClient, output: &str) -> Result<()> {
    let rows: Vec<CertRow> = client.get("/v1/admin/certs")?;
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let now = crate::server::now();
    println!(
        "{:<34} {:<36} {:<8} {:<21} {:<10} REQUESTER",
        "SERIAL", "IDENTITY", "STATUS", "NOT AFTER", "LEFT"
    );
    for r in rows {
        let i = &r.issued;
        println!(
            "{:<34} {:<36} {:<8} {:<21} {:<10} {}",
            i.serial,
            i.identity.dns_name(),
            r.status,
            rfc3339(i.not_after),
            left(i.not_after - now),
            i.requester
        );
    }
    Ok(())
}

pub fn cert_revoke(client: &AdminClient, target: &str) -> Result<()> {
    let r: RevokeResponse = client.post(
        "/v1/admin/revoke",
        &RevokeRequest {
            target: target.into(),
        },
    )?;
    if r.revoked.is_empty() {
        println!(
            "already revoked; deny list version {}",
            r.revocations_version
        );
    } else {
        println!(
            "revoked {}; deny list version {} goes to every proxy now",
            r.revoked.join(", "),
            r.revocations_version
        );
    }
    Ok(())
}

pub fn ca_status(client: &AdminClient, output: &str) -> Result<()> {
    let s: CaStatus = client.get("/v1/admin/status")?;
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print_status(&s);
    }
    Ok(())
}

fn left(secs: i64) -> String {
    if secs <= 0 {
        return "EXPIRED".into();
    }
    let d = Duration::from_secs(secs as u64);
    if secs >= 86400 {
        format!("{}d{}h", secs / 86400, (secs % 86400) / 3600)
    } else if secs >= 3600 {
        format!("{}h{}m", secs / 3600, (secs % 3600) / 60)
    } else {
        humantime::format_duration(d).to_string()
    }
}

fn print_status(s: &CaStatus) {
    print_rotation(s);
    println!("\nROOTS");
    print_cas(&s.roots, s.now);
    println!("\nINTERMEDIATES");
    print_cas(&s.intermediates, s.now);
    print_workloads(s);
    if !s.history.is_empty() {
        println!("\nHISTORY");
        for h in &s.history {
            println!("  {h}");
        }
    }
}

/// The header: trust domain, where a rotation stands, bundle and deny list.
fn print_rotation(s: &CaStatus) {
    let what = match (s.phase, s.rotation_kind) {
        (crate::server::state::Phase::Idle, _) => "idle (no rotation in progress)".to_string(),
        (p, k) => format!(
            "{} rotation, phase {} since {}{}",
            match k {
                Some(RotationKind::Root) => "root",
                _ => "intermediate",
            },
            p.as_str(),
            s.phase_since.map(rfc3339).unwrap_or_default(),
            s.target_bundle
                .map(|v| format!(" (bundle target v{v})"))
                .unwrap_or_default()
        ),
    };
    println!("trust domain:   {}", s.trust_domain);
    if let Some(replica) = &s.replica {
        let leader = s
            .leader
            .as_deref()
            .unwrap_or("none (an election is under way)");
        println!("replica:        {replica} (leader: {leader})");
    }
    println!("rotation:       {what}");
    if let Some(wait) = s.resync_wait_seconds {
        println!("                paused {wait}s more: crank-control restarted and waits for every workload to report again");
    }
    println!("trust bundle:   v{}", s.bundle_version);
    println!(
        "deny list:      v{} ({} serials)",
        s.revocations_version, s.revoked_serials
    );
}

fn print_cas(cas: &[CaEntry], now: i64) {
    for c in cas {
        println!(
            "  {:<9} {}  serial {}  expires {} ({})",
            c.state,
            c.subject,
            c.serial,
            rfc3339(c.not_after),
            left(c.not_after - now)
        );
    }
}

fn print_workloads(s: &CaStatus) {
    println!("\nWORKLOADS");
    println!(
        "  {:<36} {:<18} {:<8} {:<7} {:<10} {:<9} LAGGING",
        "IDENTITY", "INSTANCE", "STATE", "BUNDLE", "CERT LEFT", "SEEN"
    );
    for w in &s.workloads {
        println!(
            "  {:<36} {:<18} {:<8} v{:<6} {:<10} {:<9} {}",
            w.identity,
            w.instance,
            w.state,
            w.bundle_version,
            w.not_after
                .map(|n| left(n - s.now))
                .unwrap_or_else(|| "?".into()),
            format!("{}s ago", s.now - w.last_seen),
            w.lagging.as_deref().unwrap_or("-")
        );
    }
    let lagging = s.workloads.iter().filter(|w| w.lagging.is_some()).count();
    if lagging > 0 {
        println!("\n{lagging} workload(s) hold back the rotation (see LAGGING); stale ones (not seen within workloads.stale_after) do not");
    }
}
