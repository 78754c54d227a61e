//! `crankctl slo rules`, `crankctl slo check` and `crankctl slo status`:
//! read the mesh config directory with the same loader and checks as
//! `crankctl config validate`, then write Prometheus rules, judge a load
//! test's results (or what Prometheus measured), or show how each SLO
//! stands now.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::slo::check::{self, Results, Status, Verdict};
use crate::slo::prom::Prometheus;
use crate::slo::{objectives, rules, status, CapabilitySlo};

fn load(dir: &Path) -> Result<Vec<CapabilitySlo>> {
    match crate::configdir::load(dir) {
        Ok(s) => Ok(objectives(&s)),
        Err(problems) => {
            for p in &problems {
                eprintln!("{}: {p}", dir.display());
            }
            bail!(
                "{} problem(s) in {dir}; fix them (`crankctl config validate {dir}` lists them too)",
                problems.len(),
                dir = dir.display()
            )
        }
    }
}

/// Writes the rules to `out` (stdout without it); notes go to stderr.
pub fn rules(dir: &Path, out: Option<&PathBuf>) -> Result<()> {
    let slos = load(dir)?;
    let file = rules::generate(&slos, &dir.display().to_string());
    for n in &file.notes {
        eprintln!("note: {n}");
    }
    match out {
        Some(path) => {
            std::fs::write(path, &file.yaml)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "wrote {} recording rules and {} alerts for {} SLO(s) to {}; check it with `promtool check rules {}`",
                file.recording_rules,
                file.alerts,
                slos.len(),
                path.display(),
                path.display()
            );
        }
        None => print!("{}", file.yaml),
    }
    Ok(())
}

/// Where `crankctl slo check` gets the measured figures.
pub enum Measured<'a> {
    /// A load test's results file.
    Results(&'a Path),
    /// Prometheus, over the last `range`.
    Prometheus { url: &'a str, range: Duration },
}

/// Judges the measured figures against the SLOs; an error when any
/// objective is broken or could not be judged.
pub fn check(dir: &Path, measured: Measured, output: &str) -> Result<()> {
    let json = match output {
        "json" => true,
        "human" => false,
        other => bail!("unknown --output {other:?}; use human or json"),
    };
    let slos = load(dir)?;
    let (parsed, source) = match measured {
        Measured::Results(results) => (read_results(results)?, results.display().to_string()),
        Measured::Prometheus { url, range } => {
            let prom = Prometheus::new(url)?;
            let r = status::results_from_prometheus(&slos, &prom, range)?;
            if r.capabilities.is_empty() {
                bail!(
                    "no SLO in {} has a route whose first backend is its capability, so Prometheus has nothing to measure (add a route for it)",
                    dir.display()
                );
            }
            let source = format!(
                "Prometheus at {url} over the last {}",
                humantime::format_duration(range)
            );
            (r, source)
        }
    };
    let verdicts = check::check(&slos, &parsed).with_context(|| source.clone())?;
    let failing = verdicts.iter().filter(|v| v.status != Status::Met).count();
    if json {
        let v = serde_json::json!({"ok": failing == 0, "objectives": verdicts});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_human(&verdicts);
    }
    if failing > 0 {
        bail!("{failing} objective(s) not met: broken, or not measured by {source}");
    }
    Ok(())
}

fn read_results(results: &Path) -> Result<Results> {
    let text = std::fs::read_to_string(results)
        .with_context(|| format!("reading the results file {}", results.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a results file; see docs/reference/cli.md#crankctl-slo-check",
            results.display()
        )
    })
}

/// What `crankctl slo status` reads and shows.
pub struct StatusArgs {
    pub prometheus: Option<String>,
    pub proxies: Vec<String>,
    pub interval: Duration,
    pub output: String,
    pub fail_on_burn: bool,
}

/// Shows each SLO's SLI, budget left and burn rates; with `fail_on_burn`,
/// an error when an objective burns at page speed or has spent its budget.
pub fn status(dir: &Path, args: &StatusArgs) -> Result<()> {
    if !matches!(args.output.as_str(), "human" | "wide" | "json") {
        bail!("--output {}: use human, wide or json", args.output);
    }
    let slos = load(dir)?;
    let report = match (&args.prometheus, args.proxies.is_empty()) {
        (Some(url), true) => status::from_prometheus(&slos, &Prometheus::new(url)?)?,
        (None, false) => {
            let addrs = args
                .proxies
                .iter()
                .map(|p| crate::tap_cli::resolve(p))
                .collect::<Result<Vec<_>>>()?;
            status::from_sidecars(&slos, &addrs, args.interval)?
        }
        (Some(_), false) => bail!("give --prometheus URL or --proxy HOST:PORT, not both"),
        (None, true) => bail!(
            "say where the figures come from: --prometheus URL (a Prometheus that scrapes the sidecars) or --proxy HOST:PORT (a sidecar's admin.listen; repeat for several)"
        ),
    };
    match args.output.as_str() {
        "json" => println!("{}", serde_json::to_string_pretty(&report)?),
        o => println!("{}", status::table(&report, o == "wide")),
    }
    let burning = report.burning();
    if args.fail_on_burn && !burning.is_empty() {
        bail!(
            "--fail-on-burn: {} burning its error budget at page speed or out of budget",
            burning.join(", ")
        );
    }
    Ok(())
}

fn print_human(verdicts: &[Verdict]) {
    for v in verdicts {
        let status = match v.status {
            Status::Met => "ok",
            Status::Broken => "BROKEN",
            Status::NotMeasured => "UNKNOWN",
        };
        let over = v
            .over_by
            .as_deref()
            .map(|o| format!(": {o}"))
            .unwrap_or_default();
        println!(
            "{status:<7} {} {}: {} (objective {}){over}",
            v.capability, v.objective, v.measured, v.target
        );
    }
}
