//! `crankctl slo rules` and `crankctl slo check`: read the mesh config
//! directory with the same loader and checks as `crankctl config validate`,
//! then write Prometheus rules or judge a load test's results.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::slo::check::{self, Results, Status, Verdict};
use crate::slo::{objectives, rules, CapabilitySlo};

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

/// Judges `results` against the SLOs; an error when any objective is broken
/// or could not be judged.
pub fn check(dir: &Path, results: &Path, output: &str) -> Result<()> {
    let json = match output {
        "json" => true,
        "human" => false,
        other => bail!("unknown --output {other:?}; use human or json"),
    };
    let slos = load(dir)?;
    let text = std::fs::read_to_string(results)
        .with_context(|| format!("reading the results file {}", results.display()))?;
    let parsed: Results = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a results file; see docs/reference/cli.md#crankctl-slo-check",
            results.display()
        )
    })?;
    let verdicts = check::check(&slos, &parsed).with_context(|| results.display().to_string())?;
    let failing = verdicts.iter().filter(|v| v.status != Status::Met).count();
    if json {
        let v = serde_json::json!({"ok": failing == 0, "objectives": verdicts});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_human(&verdicts);
    }
    if failing > 0 {
        bail!(
            "{failing} objective(s) not met: broken, or not measured by {}",
            results.display()
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
