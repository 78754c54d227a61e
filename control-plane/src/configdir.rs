//! The platform engineers' config directory, read and checked as a whole:
//! `capabilities.yaml`, `routes/*.yaml`, `quotas.yaml`, `slo/*.yaml` and
//! `policies/` (Rego with `policy.yaml` and `*_test.rego`). [`load`]
//! returns one [`MeshSnapshot`] or every [`Problem`] found, each with its
//! file, line, field and fix. `crank-control` publishes a snapshot as a new
//! version; `crankctl config validate DIR` runs the same checks offline.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use crank_api::mesh::{CapabilitiesFile, EgressFile, MeshRoute, QuotasFile, RoutesFile, SloFile};
use serde::{Deserialize, Serialize};

mod egress;

/// One thing wrong with the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Relative to the directory (`routes/transcode.yaml`).
    pub file: String,
    pub line: Option<usize>,
    /// The YAML path (`routes[0].backends[1].weight`), when known.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Everything a valid directory says, ready to publish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeshSnapshot {
    /// SHA-256 over every file's relative path and bytes, hex.
    pub hash: String,
    pub capabilities: CapabilitiesFile,
    /// Every route, ordered by name.
    pub routes: Vec<MeshRoute>,
    pub quotas: QuotasFile,
    pub slos: Vec<SloFile>,
    /// `policies/` file name → contents (every file the proxies need).
    pub policies: BTreeMap<String, String>,
    /// `roles.yaml`: who may do what on the remote admin API.
    #[serde(default)]
    pub roles: crate::server::roles::RolesFile,
    /// `egress.yaml`, each `tls.ca` file's PEM text inline.
    #[serde(default)]
    pub egress: EgressFile,
    /// `tenants.yaml`, pushed to the proxies for their worker shims.
    #[serde(default)]
    pub tenants: Option<crank_api::tenants::TenantsFile>,
}

const KNOWN: &str =
    "expected capabilities.yaml, quotas.yaml, roles.yaml, tenants.yaml, egress.yaml, routes/*.yaml, slo/*.yaml, job_templates/*.yaml, egress/ and policies/";

/// A file of the directory that cannot be read: its path relative to the
/// directory (`.` for the directory itself) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadError {
    pub file: String,
    pub message: String,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.message)
    }
}

/// Every file of the directory (relative path, bytes), sorted; what the
/// content hash covers. Editor leftovers (`.swp`, `~`, dot files) are skipped.
pub fn files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, ReadError> {
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) -> Result<(), ReadError> {
    let entries = std::fs::read_dir(dir).map_err(|e| read_error(root, dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| read_error(root, dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.ends_with('~') || name.ends_with(".swp") {
            continue;
        }
        let path = entry.path();
        // Follows symlinks: `policies -> ../policies` is a common layout.
        let meta = std::fs::metadata(&path).map_err(|e| read_error(root, &path, e))?;
        if meta.is_dir() {
            walk(root, &path, out)?;
        } else {
            let bytes = std::fs::read(&path).map_err(|e| read_error(root, &path, e))?;
            out.push((relative(root, &path), bytes));
        }
    }
    Ok(())
}

/// `path` relative to `root`; `.` for `root` itself.
fn relative(root: &Path, path: &Path) -> String {
    match path.strip_prefix(root) {
        Ok(r) if r.as_os_str().is_empty() => ".".into(),
        Ok(r) => r.to_string_lossy().into_owned(),
        Err(_) => path.to_string_lossy().into_owned(),
    }
}

/// Names the entry that failed; a symlink whose target is missing (a
/// copied directory whose `policies -> ../../policies` now points nowhere)
/// is reported as such, against the link.
fn read_error(root: &Path, path: &Path, e: std::io::Error) -> ReadError {
    let file = relative(root, path);
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    let message = match std::fs::read_link(path) {
        Ok(target) if is_link && e.kind() == std::io::ErrorKind::NotFound => format!(
            "is a symbolic link to {}, which does not exist (a relative link resolves from {}); copy what it points to as well, or replace the link with the files",
            target.display(),
            path.parent().unwrap_or(root).display(),
        ),
        _ if file == "." => format!("cannot read the directory {}: {e}", root.display()),
        _ => format!("cannot read it: {e}"),
    };
    ReadError { file, message }
}

/// The content hash of a file list.
pub fn hash(files: &[(String, Vec<u8>)]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (name, bytes) in files {
        ctx.update(name.as_bytes());
        ctx.update(&[0]);
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(bytes);
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads and checks the whole directory.
pub fn load(dir: &Path) -> Result<MeshSnapshot, Vec<Problem>> {
    let all = files(dir).map_err(|e| vec![problem(&e.file, None, None, e.message)])?;
    let mut p = Vec::new();
    let mut read = Sections::default();
    for (rel, bytes) in &all {
        match std::str::from_utf8(bytes) {
            Ok(text) => read.add(rel, text, &mut p),
            Err(_) => p.push(problem(rel, None, None, "is not UTF-8 text".into())),
        }
    }
    if !read.seen_caps {
        p.push(problem("capabilities.yaml", None, None, "missing; list every capability routes, quotas and SLOs may name (`capabilities: [{name: transcode:v1}]`)".into()));
    }
    let declared = check_capabilities(&read.caps, &mut p);
    let egress = egress::check(&read.egress, &read.egress_files, &mut p);
    check_routes(&read.routes, &declared, &egress, &mut p);
    check_quotas(&read.quotas, &declared, &mut p);
    check_slos(&read.slos, &declared, &mut p);
    for (field, msg) in read.roles.problems() {
        p.push(problem("roles.yaml", None, Some(field), msg));
    }
    if !read.policies.is_empty() {
        check_policies(&dir.join("policies"), &mut p);
    }
    if !p.is_empty() {
        return Err(p);
    }
    let mut routes: Vec<MeshRoute> = read.routes.into_iter().map(|(_, r)| r).collect();
    routes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(MeshSnapshot {
        hash: hash(&all),
        capabilities: read.caps,
        routes,
        quotas: read.quotas,
        slos: read.slos.into_iter().map(|(_, s)| s).collect(),
        policies: read.policies,
        roles: read.roles,
        egress,
        tenants: read.tenants,
    })
}

/// The files of the directory, parsed, by section; routes and SLOs keep
/// the file they came from for the problems.
#[derive(Default)]
struct Sections {
    caps: CapabilitiesFile,
    seen_caps: bool,
    quotas: QuotasFile,
    routes: Vec<(String, MeshRoute)>,
    slos: Vec<(String, SloFile)>,
    policies: BTreeMap<String, String>,
    roles: crate::server::roles::RolesFile,
    egress: EgressFile,
    /// `egress/` files (CA certificates), by path relative to the directory.
    egress_files: BTreeMap<String, String>,
    tenants: Option<crank_api::tenants::TenantsFile>,
}

impl Sections {
    /// Parses one file by where it sits.
    fn add(&mut self, rel: &str, text: &str, p: &mut Vec<Problem>) {
        let parts: Vec<&str> = rel.split('/').collect();
        match parts.as_slice() {
            ["capabilities.yaml"] => {
                self.seen_caps = true;
                if let Some(c) = parse::<CapabilitiesFile>(rel, text, p) {
                    self.caps = c;
                }
            }
            ["roles.yaml"] => {
                if let Some(r) = parse(rel, text, p) {
                    self.roles = r;
                }
            }
            ["quotas.yaml"] => {
                if let Some(q) = parse::<QuotasFile>(rel, text, p) {
                    self.quotas = q;
                }
            }
            ["egress.yaml"] => {
                if let Some(e) = parse::<EgressFile>(rel, text, p) {
                    self.egress = e;
                }
            }
            ["egress", ..] => {
                self.egress_files.insert(rel.to_string(), text.to_string());
            }
            ["routes", f] if is_yaml(f) => {
                if let Some(r) = parse::<RoutesFile>(rel, text, p) {
                    let file = rel.to_string();
                    self.routes
                        .extend(r.routes.into_iter().map(|r| (file.clone(), r)));
                }
            }
            ["slo", f] if is_yaml(f) => {
                if let Some(s) = parse::<SloFile>(rel, text, p) {
                    self.slos.push((rel.to_string(), s));
                }
            }
            ["policies", f] => {
                self.policies.insert(f.to_string(), text.to_string());
            }
            // Read by the worker shims of the template's capability
            // (exec.templates_dir); checked here so a bad one never ships.
            ["job_templates", f] if is_yaml(f) => {
                if let Some(t) = parse::<crank_api::job_template::JobTemplate>(rel, text, p) {
                    for (field, message) in t.problems() {
                        p.push(problem(rel, None, Some(field), message));
                    }
                }
            }
            // For the worker shims: pushed to the proxies (`/mesh/tenants`)
            // or read from disk (exec.queue.tenants); checked here so a bad
            // one never ships.
            ["tenants.yaml"] => {
                if let Some(t) = parse::<crank_api::tenants::TenantsFile>(rel, text, p) {
                    for (field, message) in t.problems() {
                        p.push(problem(rel, None, Some(field), message));
                    }
                    self.tenants = Some(t);
                }
            }
            // Examples and other files below policies/ are the policy
            // author's; only the top level is a policy set.
            ["policies", ..] => {}
            _ => p.push(problem(
                rel,
                None,
                None,
                format!("unknown file; {KNOWN} (a typo such as routes.yaml for routes/x.yaml?)"),
            )),
        }
    }
}

fn is_yaml(f: &str) -> bool {
    f.ends_with(".yaml") || f.ends_with(".yml")
}

fn problem(file: &str, line: Option<usize>, field: Option<String>, message: String) -> Problem {
    Problem {
        file: file.to_string(),
        line,
        field,
        message,
    }
}

/// Parses YAML into `T`, recording a problem with line and field on failure.
fn parse<T: for<'de> Deserialize<'de>>(rel: &str, text: &str, p: &mut Vec<Problem>) -> Option<T> {
    let de = serde_yaml::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Some(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let line = inner.location().map(|l| l.line());
            let mut msg = inner.to_string();
            // serde_yaml appends " at line N column M"; the line is shown already.
            if let Some(i) = msg.find(" at line ") {
                msg.truncate(i);
            }
            // and may start with its own path (`routes[0]: unknown field`).
            if let Some((head, rest)) = msg.split_once(": ") {
                if !head.contains(' ') {
                    msg = rest.to_string();
                }
            }
            p.push(problem(
                rel,
                line,
                (path != ".").then_some(path),
                format!("{msg}; see docs/reference/mesh-config.md"),
            ));
            None
        }
    }
}

fn check_capabilities(caps: &CapabilitiesFile, p: &mut Vec<Problem>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, c) in caps.capabilities.iter().enumerate() {
        let field = Some(format!("capabilities[{i}].name"));
        if c.name.is_empty() || c.name.contains(char::is_whitespace) || c.name == "*" {
            p.push(problem(
                "capabilities.yaml",
                None,
                field,
                format!(
                    "{:?} is not a capability name; use a word like transcode:v1",
                    c.name
                ),
            ));
        } else if !names.insert(c.name.clone()) {
            p.push(problem(
                "capabilities.yaml",
                None,
                field,
                format!("{} is listed twice", c.name),
            ));
        }
    }
    names
}

fn check_routes(
    routes: &[(String, MeshRoute)],
    declared: &BTreeSet<String>,
    egress: &EgressFile,
    p: &mut Vec<Problem>,
) {
    let mut names: BTreeMap<&str, &str> = BTreeMap::new();
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for (file, r) in routes {
        let i = index.entry(file.as_str()).or_insert(0);
        let mut at = At {
            file,
            prefix: format!("routes[{i}]"),
            p,
        };
        let also_in = names.insert(&r.name, file);
        check_route_name(r, also_in, &mut at);
        check_backends(r, declared, &mut at);
        egress::check_backends(r, egress, |f, m| at.push(f, m));
        check_route_rest(r, &mut at);
        *i += 1;
    }
}

/// Where the problems of one route go: its file, and `routes[i]` before
/// each field.
struct At<'a> {
    file: &'a str,
    prefix: String,
    p: &'a mut Vec<Problem>,
}

impl At<'_> {
    fn push(&mut self, field: &str, message: String) {
        let field = Some(format!("{}{field}", self.prefix));
        self.p.push(problem(self.file, None, field, message));
    }
}

fn check_route_name(r: &MeshRoute, also_in: Option<&str>, at: &mut At<'_>) {
    if r.name.is_empty() || r.name.contains(char::is_whitespace) {
        at.push(
            ".name",
            format!(
                "{:?} is not a route name; use a word like transcode",
                r.name
            ),
        );
    }
    if let Some(other) = also_in {
        at.push(
            ".name",
            format!(
                "route {} is also defined in {other}; route names are unique across routes/",
                r.name
            ),
        );
    }
}

fn check_backends(r: &MeshRoute, declared: &BTreeSet<String>, at: &mut At<'_>) {
    if r.backends.is_empty() {
        at.push(
            ".backends",
            "no backends; add at least one `{capability: ..., weight: ...}`".into(),
        );
    }
    if !r.backends.is_empty() && r.backends.iter().all(|b| b.weight == 0) {
        at.push(
            ".backends",
            "every backend has weight 0, so the route sends nowhere; give one a weight above 0"
                .into(),
        );
    }
    for (j, b) in r.backends.iter().enumerate() {
        let bf = format!(".backends[{j}]");
        if !declared.contains(&b.capability) {
            at.push(&format!("{bf}.capability"), format!("capability {} is not in capabilities.yaml, so nobody serves it; declare it there or fix the name", b.capability));
        }
        if b.weight > 10_000 {
            at.push(
                &format!("{bf}.weight"),
                format!(
                    "{} is over 10000; weights are relative (90 and 10 make a 90/10 split)",
                    b.weight
                ),
            );
        }
        for (k, v) in &b.selector {
            if k.is_empty() || v.is_empty() {
                at.push(
                    &format!("{bf}.selector"),
                    "label keys and values must not be empty".into(),
                );
            }
        }
    }
}

/// The match, the timeout and the retry attempts.
fn check_route_rest(r: &MeshRoute, at: &mut At<'_>) {
    if let Some(prefix) = &r.matches.path_prefix {
        if !prefix.starts_with('/') {
            at.push(
                ".match.path_prefix",
                format!("{prefix:?} must start with /"),
            );
        }
    }
    for h in &r.matches.hosts {
        let range = h.contains('/') && range_with_port(h);
        if h.is_empty() || h.contains(char::is_whitespace) || (h.contains('/') && !range) {
            at.push(
                ".match.hosts",
                format!("{h:?} is not a host name, address:port or range:port (10.96.0.0/12:5432)"),
            );
        }
    }
    let with_port = |h: &String| h.parse::<std::net::SocketAddr>().is_ok() || range_with_port(h);
    if r.server_speaks_first && !r.matches.hosts.iter().any(with_port) {
        at.push(
            ".server_speaks_first",
            "applies to the route's address:port or range:port hosts, and it has none; add the server's (match.hosts: ['10.96.0.25:25'])".into(),
        );
    }
    if r.timeout.is_some_and(|t| t.is_zero()) {
        at.push(".timeout", "is zero; remove it for no deadline".into());
    }
    if r.retry.attempts > 10 {
        at.push(
            ".retry.attempts",
            format!("{} is not 0 to 10", r.retry.attempts),
        );
    }
}

/// `10.96.0.0/12:5432` or `[fd00::/108]:5432`: an address range (no
/// bits past the prefix) and a port.
fn range_with_port(h: &str) -> bool {
    let Some((net, port)) = h.rsplit_once(':') else {
        return false;
    };
    let net = net.trim_start_matches('[').trim_end_matches(']');
    let Some((addr, prefix)) = net.split_once('/') else {
        return false;
    };
    let max = match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => 32,
        Ok(std::net::IpAddr::V6(_)) => 128,
        Err(_) => return false,
    };
    let prefix_ok = prefix.parse::<u8>().is_ok_and(|p| p <= max);
    prefix_ok && port.parse::<u16>().is_ok_and(|p| p > 0)
}

fn check_quotas(q: &QuotasFile, declared: &BTreeSet<String>, p: &mut Vec<Problem>) {
    let mut seen = BTreeSet::new();
    for (i, l) in q.limits.iter().enumerate() {
        let at = |f: &str| Some(format!("limits[{i}].{f}"));
        if let Err(e) = crank_api::resilience::parse_rate(&l.rate) {
            p.push(problem("quotas.yaml", None, at("rate"), e));
        }
        if l.capability != "*" && !declared.contains(&l.capability) {
            p.push(problem("quotas.yaml", None, at("capability"), format!("capability {} is not in capabilities.yaml; declare it, or use * for every capability", l.capability)));
        }
        if l.tenant.is_empty() {
            p.push(problem(
                "quotas.yaml",
                None,
                at("tenant"),
                "is empty; name a tenant or use *".into(),
            ));
        }
        if !seen.insert((
            l.tenant.clone(),
            l.capability.clone(),
            format!("{:?}", l.direction),
        )) {
            p.push(problem("quotas.yaml", None, at("tenant"), format!("a limit for tenant {} and capability {} is already above; the first one would always win", l.tenant, l.capability)));
        }
    }
}

/// `99.9%` → 99.9; `None` unless it is `N%` in (0, 100].
pub(crate) fn percent(s: &str) -> Option<f64> {
    let v: f64 = s.trim().strip_suffix('%')?.trim().parse().ok()?;
    (v > 0.0 && v <= 100.0).then_some(v)
}

fn check_slos(slos: &[(String, SloFile)], declared: &BTreeSet<String>, p: &mut Vec<Problem>) {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (file, s) in slos {
        let mut at = At {
            file,
            prefix: String::new(),
            p,
        };
        if !declared.contains(&s.capability) {
            at.push(
                "capability",
                format!("capability {} is not in capabilities.yaml", s.capability),
            );
        }
        if let Some(other) = seen.insert(&s.capability, file) {
            at.push(
                "capability",
                format!("{} already has an SLO in {other}", s.capability),
            );
        }
        check_slo_numbers(s, &mut at);
    }
}

/// Percentages that parse and agree, latency percentiles that do not
/// decrease.
fn check_slo_numbers(s: &SloFile, at: &mut At<'_>) {
    for (f, v) in [
        ("slo.availability", &s.slo.availability),
        ("slo.error_budget", &s.slo.error_budget),
    ] {
        if let Some(v) = v {
            if percent(v).is_none() {
                at.push(f, format!("{v:?} is not a percentage like 99.9%"));
            }
        }
    }
    if let (Some(a), Some(b)) = (
        s.slo.availability.as_deref().and_then(percent),
        s.slo.error_budget.as_deref().and_then(percent),
    ) {
        if ((100.0 - a) - b).abs() > 1e-6 {
            at.push("slo.error_budget", format!("{b}% does not match availability {a}% (the budget is 100% minus the availability: {:.4}%)", 100.0 - a));
        }
    }
    if let Some(l) = &s.slo.latency {
        let order = [("p50", l.p50), ("p95", l.p95), ("p99", l.p99)];
        let set: Vec<_> = order
            .iter()
            .filter_map(|(n, d)| d.map(|d| (*n, d)))
            .collect();
        for w in set.windows(2) {
            if w[0].1 > w[1].1 {
                at.push(
                    &format!("slo.latency.{}", w[1].0),
                    format!(
                        "is below {} ({:?} < {:?}); percentiles must not decrease",
                        w[0].0, w[1].1, w[0].1
                    ),
                );
            }
        }
    }
}

fn check_policies(dir: &Path, p: &mut Vec<Problem>) {
    if let Err(e) = crank_policy::PolicySet::load(dir) {
        p.push(problem(
            "policies/",
            None,
            None,
            format!("does not compile: {e}"),
        ));
        return;
    }
    match crank_policy::testing::run_tests(dir, None) {
        Ok(results) => {
            for r in results {
                match &r.outcome {
                    crank_policy::testing::TestOutcome::Fail => p.push(problem(
                        "policies/",
                        None,
                        Some(r.name.clone()),
                        format!(
                            "test failed; run `crankctl policy test {} -v` to see why",
                            dir.display()
                        ),
                    )),
                    crank_policy::testing::TestOutcome::Error(e) => p.push(problem(
                        "policies/",
                        None,
                        Some(r.name.clone()),
                        format!("test error: {e}"),
                    )),
                    _ => {}
                }
            }
        }
        Err(e) => p.push(problem(
            "policies/",
            None,
            None,
            format!("tests cannot run: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let p = d.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        d
    }

    const CAPS: (&str, &str) = (
        "capabilities.yaml",
        "capabilities:\n  - name: transcode:v1\n  - name: summarize:v2\n",
    );
    const ROUTE: (&str, &str) = ("routes/transcode.yaml", "routes:\n  - name: transcode\n    match: {hosts: [transcode], path_prefix: /v1}\n    backends:\n      - {capability: transcode:v1, selector: {pool: cpu}, weight: 90}\n      - {capability: transcode:v1, selector: {gpu: nvidia}, weight: 10}\n");

    #[test]
    fn a_valid_directory_loads_with_a_stable_hash() {
        let d = dir(&[CAPS, ROUTE, ("quotas.yaml", "limits:\n  - {tenant: '*', capability: transcode:v1, rate: 100/s}\n"), ("slo/summarize.yaml", "capability: summarize:v2\nslo:\n  latency: {p50: 100ms, p95: 500ms, p99: 2000ms}\n  availability: 99.9%\n  error_budget: 0.1%\n  measurement_window: 30d\n")]);
        let a = load(d.path()).unwrap();
        assert_eq!(a.routes.len(), 1);
        assert_eq!(a.routes[0].backends[1].weight, 10);
        assert_eq!(a.slos[0].capability, "summarize:v2");
        assert_eq!(load(d.path()).unwrap().hash, a.hash);
        std::fs::write(
            d.path().join("routes/transcode.yaml"),
            ROUTE.1.replace("weight: 10", "weight: 20"),
        )
        .unwrap();
        assert_ne!(load(d.path()).unwrap().hash, a.hash);
    }

    fn problems(files: &[(&str, &str)]) -> Vec<Problem> {
        load(dir(files).path()).unwrap_err()
    }

    /// tenants.yaml (the shared job queue's weights and quotas, read by the
    /// shims) is a known file, checked with the directory.
    #[test]
    fn tenants_yaml_is_checked_with_the_rest() {
        let good = "tenants:\n  - {name: acme, weight: 2, max_queued: 10}\n  - {name: '*'}\n";
        assert!(load(dir(&[CAPS, ("tenants.yaml", good)]).path()).is_ok());
        let bad = "tenants:\n  - {name: acme, weight: 0}\n";
        let p = load(dir(&[CAPS, ("tenants.yaml", bad)]).path()).unwrap_err();
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].file, "tenants.yaml");
        assert_eq!(p[0].field.as_deref(), Some("tenants[0].weight"));
        assert!(p[0].message.contains("more than 0"), "{}", p[0].message);
    }

    /// roles.yaml is read with the directory: its bindings publish with the
    /// version, and a bad identity refuses the whole change.
    #[test]
    fn roles_yaml_is_loaded_and_checked_with_the_rest() {
        let roles = "roles:\n  admin: [alice.ops.crank.local]\n";
        let snap = load(dir(&[CAPS, ("roles.yaml", roles)]).path()).unwrap();
        assert_eq!(snap.roles.roles.admin, vec!["alice.ops.crank.local"]);
        let bad = dir(&[CAPS, ("roles.yaml", "roles:\n  viewer: [bob]\n")]);
        let p = load(bad.path()).unwrap_err();
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].file, "roles.yaml");
        assert_eq!(p[0].field.as_deref(), Some("roles.viewer[0]"));
        assert!(p[0].message.contains("DNS name"), "{}", p[0].message);
        let typo = load(dir(&[CAPS, ("roles.yaml", "roles:\n  admins: []\n")]).path()).unwrap_err();
        assert!(
            typo[0].message.contains("unknown field `admins`"),
            "{typo:?}"
        );
    }

    #[test]
    fn captured_routes_take_ranges_with_ports_and_server_speaks_first() {
        let route = |rest: &str| {
            format!("routes:\n  - name: a\n    backends: [{{capability: transcode:v1}}]\n{rest}")
        };
        let ok = route("    match: {hosts: ['10.96.0.0/12:5432', '[fd00::/108]:25', '10.96.0.25:25']}\n    server_speaks_first: true\n");
        let snap = load(dir(&[CAPS, ("routes/a.yaml", &ok)]).path()).unwrap();
        assert!(snap.routes[0].server_speaks_first);
        let cases = [
            (
                "    match: {hosts: ['10.96.0.0/12']}\n",
                "routes[0].match.hosts",
                "range:port",
            ),
            (
                "    match: {hosts: ['10.96.0.0/40:80']}\n",
                "routes[0].match.hosts",
                "range:port",
            ),
            (
                "    match: {hosts: [smtp]}\n    server_speaks_first: true\n",
                "routes[0].server_speaks_first",
                "match.hosts: ['10.96.0.25:25']",
            ),
        ];
        for (rest, field, msg) in cases {
            let ps = problems(&[CAPS, ("routes/a.yaml", &route(rest))]);
            let hit = ps.iter().find(|p| p.field.as_deref() == Some(field));
            let hit = hit.unwrap_or_else(|| panic!("no problem at {field} in {ps:?}"));
            assert!(hit.message.contains(msg), "{}", hit.message);
        }
    }

    #[test]
    fn every_problem_names_file_field_and_fix() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, Option<&'a str>, &'a str);
        let cases: &[Case] = &[
            (&[CAPS, ("routes/a.yaml", "routes:\n  - name: a\n    backendz: []\n")], "routes/a.yaml", None, "unknown field `backendz`"),
            (&[CAPS, ("routes/a.yaml", "routes:\n  - name: a\n    backends: [{capability: nope:v1}]\n")], "routes/a.yaml", Some("routes[0].backends[0].capability"), "nobody serves it"),
            (&[CAPS, ROUTE, ("routes/b.yaml", "routes:\n  - name: transcode\n    backends: [{capability: transcode:v1}]\n")], "routes/transcode.yaml", Some("routes[0].name"), "also defined in routes/b.yaml"),
            (&[CAPS, ("routes/a.yaml", "routes:\n  - name: a\n    backends: [{capability: transcode:v1, weight: 0}]\n")], "routes/a.yaml", Some("routes[0].backends"), "weight 0"),
            (&[CAPS, ("routes/a.yaml", "routes:\n  - name: a\n    match: {path_prefix: v1}\n    backends: [{capability: transcode:v1}]\n")], "routes/a.yaml", Some("routes[0].match.path_prefix"), "must start with /"),
            (&[CAPS, ("quotas.yaml", "limits:\n  - {tenant: acme, capability: transcode:v1, rate: lots}\n")], "quotas.yaml", Some("limits[0].rate"), "N/s"),
            (&[CAPS, ("quotas.yaml", "limits:\n  - {tenant: acme, capability: gone:v1, rate: 1/s}\n")], "quotas.yaml", Some("limits[0].capability"), "not in capabilities.yaml"),
            (&[CAPS, ("slo/x.yaml", "capability: transcode:v1\nslo: {availability: 99.9%, error_budget: 1%}\n")], "slo/x.yaml", Some("slo.error_budget"), "does not match"),
            (&[CAPS, ("slo/x.yaml", "capability: transcode:v1\nslo: {latency: {p50: 1s, p99: 10ms}}\n")], "slo/x.yaml", Some("slo.latency.p99"), "must not decrease"),
            (&[CAPS, ("routes.yaml", "routes: []\n")], "routes.yaml", None, "unknown file"),
            (&[ROUTE], "capabilities.yaml", None, "missing"),
            (&[CAPS, ("policies/policy.yaml", "mode: enforce\n"), ("policies/a.rego", "package crank.authz\nallow if {\n")], "policies/", None, "does not compile"),
        ];
        for (files, file, field, msg) in cases {
            let ps = problems(files);
            let hit = ps
                .iter()
                .find(|p| p.file == *file && (field.is_none() || p.field.as_deref() == *field));
            let hit = hit.unwrap_or_else(|| panic!("no problem for {file} {field:?} in {ps:?}"));
            assert!(hit.to_string().contains(msg), "{hit} should say {msg:?}");
        }
    }

    #[test]
    fn a_failing_policy_test_names_the_command_with_the_real_path() {
        let d = dir(&[
            CAPS,
            ("policies/policy.yaml", "mode: enforce\n"),
            ("policies/a.rego", "package crank.authz\nallow := false\n"),
            (
                "policies/a_test.rego",
                "package crank.authz_test\nimport data.crank.authz\ntest_allows if authz.allow\n",
            ),
        ]);
        let ps = load(d.path()).unwrap_err();
        let want = format!(
            "crankctl policy test {} -v",
            d.path().join("policies").display()
        );
        assert!(
            ps.iter().any(|p| p.message.contains(&want)),
            "{want}: {ps:?}"
        );
        assert!(!ps.iter().any(|p| p.message.contains("DIR/")), "{ps:?}");
    }

    #[test]
    fn yaml_errors_carry_the_line() {
        let ps = problems(&[CAPS, ("routes/a.yaml", "routes:\n  - name: a\n    backends:\n      - {capability: transcode:v1, weight: lots}\n")]);
        assert_eq!(ps[0].line, Some(4), "{ps:?}");
        assert!(
            ps[0]
                .to_string()
                .starts_with("routes/a.yaml:4: routes[0].backends[0].weight: "),
            "{}",
            ps[0]
        );
    }

    #[test]
    fn a_dangling_symlink_is_reported_against_the_link() {
        // `deploy/mesh-config` copied somewhere else: its `policies ->
        // ../../policies` points nowhere.
        let d = dir(&[CAPS, ROUTE]);
        std::os::unix::fs::symlink("../../policies", d.path().join("policies")).unwrap();
        let ps = load(d.path()).unwrap_err();
        assert_eq!(ps.len(), 1, "{ps:?}");
        assert_eq!(ps[0].file, "policies", "{ps:?}");
        let text = ps[0].to_string();
        assert!(
            text.starts_with(
                "policies: is a symbolic link to ../../policies, which does not exist"
            ),
            "{text}"
        );
        assert!(text.contains("copy what it points to"), "{text}");

        // Deeper down too, with the path from the directory.
        let d = dir(&[CAPS, ROUTE]);
        std::os::unix::fs::symlink("gone.yaml", d.path().join("routes/b.yaml")).unwrap();
        let ps = load(d.path()).unwrap_err();
        assert_eq!(ps[0].file, "routes/b.yaml", "{ps:?}");
        assert!(ps[0].message.contains("gone.yaml"), "{ps:?}");

        // The directory itself missing is still about the directory.
        let ps = load(&d.path().join("nope")).unwrap_err();
        assert_eq!(ps[0].file, ".", "{ps:?}");
        assert!(
            ps[0].message.starts_with("cannot read the directory"),
            "{ps:?}"
        );
    }

    #[test]
    fn the_shipped_policies_pass_as_a_policies_dir() {
        let d = dir(&[CAPS]);
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        std::fs::create_dir_all(d.path().join("policies")).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), d.path().join("policies").join(e.file_name())).unwrap();
            }
        }
        let snap = load(d.path()).unwrap();
        assert!(snap.policies.contains_key("policy.yaml"));
    }
}
