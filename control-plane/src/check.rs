//! `crankctl check`: one health report of the whole mesh for an SRE.
//!
//! It reads what crank-control already serves on its admin socket (the CA
//! status, the mesh status and the registry) and decides, in pure
//! functions of that data and `now`, whether the control plane answers,
//! every proxy runs the published config and the same policy revision, no
//! certificate is close to expiry, no rotation is stuck, the clocks agree
//! and every endpoint's lease is renewed. Each problem comes with the
//! command that fixes it. Exit code: 0 all ok (warnings allowed unless
//! `--strict`), 1 any FAIL, 2 crank-control cannot be reached.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::registry::Snapshot;
use crate::server::admin::{AdminClient, CaStatus, WorkloadRow};
use crate::server::mesh::MeshStatus;
use crate::server::state::{rfc3339, Phase};

/// Exit code when crank-control cannot be reached.
pub const EXIT_UNREACHABLE: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

/// One line of the report: which check, how it went, what, and the fix.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub level: Level,
    pub what: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn ok(check: &'static str, what: impl Into<String>) -> Finding {
    Finding {
        check,
        level: Level::Ok,
        what: what.into(),
        fix: None,
    }
}

fn bad(check: &'static str, level: Level, what: String, fix: impl Into<String>) -> Finding {
    Finding {
        check,
        level,
        what,
        fix: Some(fix.into()),
    }
}

/// Where each check turns to warn or fail.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// Warn when a leaf has less than this fraction of its life left (a
    /// healthy proxy renews at `renew_at`, 2/3 of the life by default).
    pub leaf_warn_fraction: f64,
    /// Roots and intermediates: warn / fail with less than this left.
    pub ca_warn: Duration,
    pub ca_fail: Duration,
    /// Warn when a rotation stays in one phase longer than this.
    pub rotation_stuck: Duration,
    /// Clock skew between this host and crank-control: warn / fail above.
    pub skew_warn: Duration,
    pub skew_fail: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            leaf_warn_fraction: 0.2,
            ca_warn: Duration::from_secs(30 * 86400),
            ca_fail: Duration::from_secs(7 * 86400),
            rotation_stuck: Duration::from_secs(3600),
            skew_warn: Duration::from_secs(5),
            skew_fail: Duration::from_secs(60),
        }
    }
}

/// Everything the checks look at: crank-control's answers and this host's
/// clock when it asked.
pub struct Inputs<'a> {
    pub ca: &'a CaStatus,
    pub mesh: &'a MeshStatus,
    pub endpoints: &'a Snapshot,
    pub local_now: i64,
}

/// Every check, in report order.
pub fn evaluate(i: &Inputs, t: &Thresholds) -> Vec<Finding> {
    let mut out = Vec::new();
    out.extend(clock(i.ca.now, i.local_now, t));
    out.extend(config(i.mesh));
    out.extend(proxies(i.mesh));
    out.extend(policy(i.mesh));
    out.extend(ca_certs(i.ca, t));
    out.extend(leaves(i.ca, t));
    out.extend(rotation(i.ca, t));
    out.extend(endpoints(i.endpoints, i.mesh));
    out
}

/// 0 when nothing failed (and, with `strict`, nothing warned), else 1.
pub fn exit_code(findings: &[Finding], strict: bool) -> u8 {
    let worst = findings.iter().map(|f| f.level).max().unwrap_or(Level::Ok);
    match worst {
        Level::Fail => 1,
        Level::Warn if strict => 1,
        _ => 0,
    }
}

fn secs(d: Duration) -> i64 {
    d.as_secs() as i64
}

fn human(s: i64) -> String {
    humantime::format_duration(Duration::from_secs(s.unsigned_abs())).to_string()
}

const NTP_FIX: &str =
    "check time sync on this host and on crank-control's host (`timedatectl status`, `chronyc tracking`)";

pub fn clock(server_now: i64, local_now: i64, t: &Thresholds) -> Vec<Finding> {
    let skew = server_now - local_now;
    let what = format!(
        "crank-control's clock is {} {} this host's",
        human(skew),
        if skew >= 0 { "ahead of" } else { "behind" }
    );
    let level = if skew.abs() > secs(t.skew_fail) {
        Level::Fail
    } else if skew.abs() > secs(t.skew_warn) {
        Level::Warn
    } else {
        return vec![ok("clock", format!("skew {}s", skew.abs()))];
    };
    vec![bad("clock", level, what, NTP_FIX)]
}

fn validate_fix(m: &MeshStatus) -> String {
    format!(
        "crankctl config validate {}",
        m.config_dir.as_deref().unwrap_or("DIR")
    )
}

pub fn config(m: &MeshStatus) -> Vec<Finding> {
    let Some(dir) = &m.config_dir else {
        return vec![ok("config", "no config_dir: crank-control is only the CA")];
    };
    let Some(v) = &m.version else {
        return vec![bad(
            "config",
            Level::Fail,
            format!("nothing published from {dir}: the directory never validated"),
            validate_fix(m),
        )];
    };
    match &m.last_error {
        Some((at, problems)) => vec![bad(
            "config",
            Level::Warn,
            format!(
                "a change to {dir} was rejected at {} ({}); v{} keeps serving",
                rfc3339(*at),
                problems.first().map(|p| p.to_string()).unwrap_or_default(),
                v.seq
            ),
            validate_fix(m),
        )],
        None => vec![ok("config", format!("v{} published from {dir}", v.seq))],
    }
}

fn service_of(identity: &str) -> &str {
    identity.split('.').next().unwrap_or(identity)
}

fn restart_fix(identity: &str) -> String {
    format!(
        "restart its sidecar (e.g. `systemctl restart crank-proxy@{}`), then `crankctl status`",
        service_of(identity)
    )
}

/// Every proxy watches and runs the published version.
pub fn proxies(m: &MeshStatus) -> Vec<Finding> {
    let Some(v) = &m.version else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in &m.proxies {
        let who = format!("{} (instance {})", p.identity, p.instance);
        if p.silent {
            out.push(bad(
                "proxies",
                Level::Fail,
                format!(
                    "{who} silent for {}s: its config watch stopped",
                    m.now - p.last_seen
                ),
                restart_fix(&p.identity),
            ));
        } else if p.seq != v.seq {
            out.push(bad(
                "proxies",
                Level::Fail,
                format!("{who} runs config v{}, v{} is published", p.seq, v.seq),
                format!(
                    "`crankctl status`; the proxy's admin /config_dump says why in mesh.last_rejected; fix the directory (`{}`)",
                    validate_fix(m)
                ),
            ));
        }
    }
    if out.is_empty() {
        out.push(ok(
            "proxies",
            format!("{} proxy(ies) on v{}", m.proxies.len(), v.seq),
        ));
    }
    out
}

/// Every proxy runs the published policy revision.
pub fn policy(m: &MeshStatus) -> Vec<Finding> {
    let Some(published) = &m.policy_revision else {
        return Vec::new();
    };
    let mut others: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in m.proxies.iter().filter(|p| !p.silent) {
        let rev = match &p.policy_revision {
            Some(r) if r == published => continue,
            Some(r) => r.clone(),
            None => format!("unknown (config v{})", p.seq),
        };
        others
            .entry(rev)
            .or_default()
            .push(format!("{} ({})", p.identity, p.instance));
    }
    if others.is_empty() {
        return vec![ok(
            "policy",
            format!("every proxy runs policy revision {published}"),
        )];
    }
    others
        .into_iter()
        .map(|(rev, who)| {
            bad(
                "policy",
                Level::Fail,
                format!(
                    "policy revision {rev} on {}; {published} is published",
                    who.join(", ")
                ),
                format!(
                    "find why they refused the newer version in their /config_dump (mesh.last_rejected); fix the directory (`{}`)",
                    validate_fix(m)
                ),
            )
        })
        .collect()
}

/// Roots and intermediates in use (retired ones are left out).
pub fn ca_certs(s: &CaStatus, t: &Thresholds) -> Vec<Finding> {
    let mut out = Vec::new();
    let kinds = [
        (
            "root",
            &s.roots,
            "crankctl ca init --dir NEW_ROOT && crankctl ca rotate root --new-root NEW_ROOT",
        ),
        (
            "intermediate",
            &s.intermediates,
            "crankctl ca rotate intermediate --root ROOT_DIR",
        ),
    ];
    for (kind, entries, fix) in kinds {
        for e in entries.iter().filter(|e| e.state != "retired") {
            let left = e.not_after - s.now;
            let level = if left < secs(t.ca_fail) {
                Level::Fail
            } else if left < secs(t.ca_warn) {
                Level::Warn
            } else {
                continue;
            };
            let when = if left <= 0 {
                format!("expired {} ago", human(left))
            } else {
                format!("expires in {}", human(left))
            };
            out.push(bad(
                "ca",
                level,
                format!("{kind} {} ({}) {when}", e.subject, e.state),
                fix,
            ));
        }
    }
    if out.is_empty() {
        out.push(ok(
            "ca",
            format!(
                "{} root(s), {} intermediate(s) valid beyond {}",
                s.roots.len(),
                s.intermediates.len(),
                human(secs(t.ca_warn))
            ),
        ));
    }
    out
}

/// Workload leaves: expired is a failure, less than the warn fraction of
/// the life left means renewal is overdue. Workloads not seen within
/// `workloads.stale_after` no longer count.
pub fn leaves(s: &CaStatus, t: &Thresholds) -> Vec<Finding> {
    let stale_after = s.stale_after_seconds.map_or(i64::MAX, |v| v as i64);
    let mut out = Vec::new();
    let mut counted = 0;
    for w in &s.workloads {
        if w.state == "stale" || s.now - w.last_seen > stale_after {
            continue;
        }
        counted += 1;
        out.extend(leaf(w, s.now, t));
    }
    if out.is_empty() {
        out.push(ok(
            "certs",
            format!("{counted} workload certificate(s) renewed in time"),
        ));
    }
    out
}

/// What is wrong with one counted workload's leaf, if anything.
fn leaf(w: &WorkloadRow, now: i64, t: &Thresholds) -> Option<Finding> {
    let reenroll = format!(
        "re-enroll: `crankctl token create --service {} --tenant {}` into its token_file, then restart it (e.g. `systemctl restart crank-proxy@{}`)",
        service_of(&w.identity),
        w.identity.split('.').nth(1).unwrap_or("TENANT"),
        service_of(&w.identity)
    );
    let who = format!("{} (instance {})", w.identity, w.instance);
    if w.state == "revoked" {
        return Some(bad(
            "certs",
            Level::Fail,
            format!("{who} serves revoked serial {}", w.serial),
            reenroll,
        ));
    }
    let not_after = w.not_after?;
    let left = not_after - now;
    if left <= 0 {
        return Some(bad(
            "certs",
            Level::Fail,
            format!("{who}: certificate expired {} ago", human(left)),
            reenroll,
        ));
    }
    let life = w.not_before.map(|b| not_after - b).unwrap_or(0);
    (life > 0 && (left as f64) < t.leaf_warn_fraction * life as f64).then(|| {
        bad(
            "certs",
            Level::Warn,
            format!(
                "{who}: certificate expires in {} ({}% of its life left): renewal is overdue",
                human(left),
                left * 100 / life
            ),
            format!(
                "look at the sidecar's log for renewal errors; if its identity is lost, {reenroll}"
            ),
        )
    })
}

pub fn rotation(s: &CaStatus, t: &Thresholds) -> Vec<Finding> {
    if s.phase == Phase::Idle {
        return vec![ok("rotation", "idle")];
    }
    let since = s.phase_since.unwrap_or(s.now);
    let lagging: Vec<String> = s
        .workloads
        .iter()
        .filter(|w| w.lagging.is_some())
        .map(|w| format!("{} ({})", w.identity, w.instance))
        .collect();
    let what = format!(
        "phase {} for {}{}",
        s.phase.as_str(),
        human(s.now - since),
        if lagging.is_empty() {
            String::new()
        } else {
            format!("; held back by {}", lagging.join(", "))
        }
    );
    if s.now - since > secs(t.rotation_stuck) {
        vec![bad(
            "rotation",
            Level::Warn,
            what,
            "`crankctl ca status` (LAGGING says why); restart the lagging sidecars, or wait: one silent for workloads.stale_after stops counting",
        )]
    } else {
        vec![ok("rotation", what)]
    }
}

/// Registry entries: a lease that missed its renewals, or an endpoint
/// whose proxy is silent.
pub fn endpoints(r: &Snapshot, m: &MeshStatus) -> Vec<Finding> {
    let mut out = Vec::new();
    for e in &r.entries {
        let reg = &e.registration;
        let since = m.now
            - e.last_heartbeat
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
        let lease = since + e.expires_in.as_secs() as i64;
        let who = format!("{} ({})", reg.address, reg.identity);
        // Heartbeats come every third of the lease: more than half gone
        // means at least one was missed.
        if lease > 0 && since * 2 > lease {
            out.push(bad(
                "endpoints",
                Level::Warn,
                format!(
                    "{who}: no heartbeat for {since}s, lease ends in {:.1}s",
                    e.expires_in.as_secs_f64()
                ),
                restart_fix(&reg.identity),
            ));
        } else if m.config_dir.is_some()
            && m.proxies
                .iter()
                .filter(|p| p.identity == reg.identity)
                .all(|p| p.silent)
        {
            out.push(bad(
                "endpoints",
                Level::Warn,
                format!("{who} is registered but no proxy of it watches the config"),
                restart_fix(&reg.identity),
            ));
        }
    }
    if out.is_empty() {
        out.push(ok(
            "endpoints",
            format!("{} endpoint(s) with live leases", r.entries.len()),
        ));
    }
    out
}

/// The human report: one line per finding, the fix under each problem.
pub fn render_human(findings: &[Finding]) -> String {
    let mut s = String::new();
    for f in findings {
        s.push_str(&format!(
            "{:<4}  {:<10} {}\n",
            f.level.label(),
            f.check,
            f.what
        ));
        if let Some(fix) = &f.fix {
            s.push_str(&format!("{:<16} fix: {fix}\n", ""));
        }
    }
    let count = |l: Level| findings.iter().filter(|f| f.level == l).count();
    s.push_str(&format!(
        "\n{} failed, {} warning(s), {} ok\n",
        count(Level::Fail),
        count(Level::Warn),
        count(Level::Ok)
    ));
    s
}

/// What `crankctl check` was asked.
#[derive(Debug, Clone)]
pub struct Options {
    pub thresholds: Thresholds,
    pub strict: bool,
    pub json: bool,
}

fn unix_now() -> i64 {
    crate::server::now()
}

/// Runs the checks against the crank-control at `socket`; returns the exit code.
pub fn run(socket: &Path, opts: &Options) -> Result<u8> {
    let client = AdminClient::new(socket);
    let before = unix_now();
    let fetched = (|| -> Result<(CaStatus, MeshStatus, Snapshot)> {
        Ok((
            client.get("/v1/admin/status")?,
            client.get("/v1/admin/mesh/status")?,
            client.get("/v1/admin/mesh/endpoints")?,
        ))
    })();
    let (ca, mesh, endpoints) = match fetched {
        Ok(v) => v,
        Err(e) => {
            let f = bad(
                "control",
                Level::Fail,
                format!(
                    "cannot reach crank-control at {}: {e:#}",
                    socket.display()
                ),
                "start crank-control (its log says why it stopped), or pass --control PATH / set CRANK_CONTROL to its admin_socket",
            );
            print(&[f], 2, opts.json)?;
            return Ok(EXIT_UNREACHABLE);
        }
    };
    let after = unix_now();
    let mut findings = vec![ok(
        "control",
        format!(
            "crank-control answers at {} (trust domain {})",
            socket.display(),
            ca.trust_domain
        ),
    )];
    let inputs = Inputs {
        ca: &ca,
        mesh: &mesh,
        endpoints: &endpoints,
        local_now: (before + after) / 2,
    };
    findings.extend(evaluate(&inputs, &opts.thresholds));
    let code = exit_code(&findings, opts.strict);
    print(&findings, code, opts.json)?;
    Ok(code)
}

fn print(findings: &[Finding], code: u8, json: bool) -> Result<()> {
    if json {
        let v = serde_json::json!({"exit_code": code, "checks": findings});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render_human(findings));
    }
    Ok(())
}

/// Parses `--output`.
pub fn is_json(output: &str) -> Result<bool> {
    match output {
        "json" => Ok(true),
        "human" => Ok(false),
        other => bail!("unknown --output {other:?}; use human or json"),
    }
}

#[cfg(test)]
mod tests;
