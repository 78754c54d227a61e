//! `crankctl policy test|check|eval`.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use crank_policy::testing::{run_tests, TestOutcome, TestResult};
use crank_policy::PolicySet;

/// `crankctl policy ...` (here, not in [`crate::cli`], so that this module
/// depends on nothing else of crankctl).
#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Run the test_* rules of every *_test.rego in DIR, like `opa test`.
    /// Exits non-zero when a test fails or errors, or nothing compiles.
    Test {
        dir: PathBuf,
        /// Only tests whose full name contains this.
        #[arg(long)]
        run: Option<String>,
        /// List passing and skipped tests too.
        #[arg(short, long)]
        verbose: bool,
        /// pretty or json
        #[arg(long, default_value = "pretty")]
        format: String,
    },
    /// Compile DIR as the proxy would (manifest, data, entry points) and print
    /// its revision. Exits non-zero with the file and line of any error.
    Check { dir: PathBuf },
    /// Evaluate one input document (JSON or YAML; `-` for stdin) against DIR
    /// (default `policies`) and print the decision, as the proxy would make it.
    Eval {
        #[arg(default_value = "policies")]
        dir: PathBuf,
        #[arg(long)]
        input: PathBuf,
    },
}

pub fn run(cmd: PolicyCommand) -> Result<()> {
    match cmd {
        PolicyCommand::Test {
            dir,
            run,
            verbose,
            format,
        } => test(&dir, run.as_deref(), verbose, &format),
        PolicyCommand::Check { dir } => check(&dir),
        PolicyCommand::Eval { dir, input } => eval(&dir, &input),
    }
}

fn test(dir: &Path, filter: Option<&str>, verbose: bool, format: &str) -> Result<()> {
    if !matches!(format, "pretty" | "json") {
        bail!("unknown --format {format:?}; use pretty or json");
    }
    let results = run_tests(dir, filter)?;
    if results.is_empty() {
        bail!(
            "no tests found in {}: write test_* rules in *_test.rego files{}",
            dir.display(),
            if filter.is_some() {
                " (or loosen --run)"
            } else {
                ""
            }
        );
    }
    let count = |f: fn(&TestOutcome) -> bool| results.iter().filter(|r| f(&r.outcome)).count();
    let pass = count(|o| *o == TestOutcome::Pass);
    let fail = count(|o| *o == TestOutcome::Fail);
    let error = count(|o| matches!(o, TestOutcome::Error(_)));
    let skip = count(|o| *o == TestOutcome::Skip);
    if format == "json" {
        let list: Vec<_> = results.iter().map(json_result).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print_pretty(&results, verbose);
        let total = results.len();
        println!("{}", "-".repeat(80));
        for (label, n) in [
            ("PASS", pass),
            ("FAIL", fail),
            ("ERROR", error),
            ("SKIPPED", skip),
        ] {
            if n > 0 {
                println!("{label}: {n}/{total}");
            }
        }
    }
    if fail + error > 0 {
        bail!(
            "{} of {} policy tests did not pass",
            fail + error,
            results.len()
        );
    }
    Ok(())
}

fn print_pretty(results: &[TestResult], verbose: bool) {
    let mut file = "";
    for r in results {
        let shown = verbose || matches!(r.outcome, TestOutcome::Fail | TestOutcome::Error(_));
        if !shown {
            continue;
        }
        if r.file != file {
            file = &r.file;
            println!("{file}:");
        }
        let took = format!("{:.1?}", r.elapsed);
        match &r.outcome {
            TestOutcome::Pass => println!("{}: PASS ({took})", r.name),
            TestOutcome::Fail => println!("{}: FAIL ({took})", r.name),
            TestOutcome::Skip => println!("{}: SKIPPED", r.name),
            TestOutcome::Error(e) => println!("{}: ERROR ({took})\n  {e}", r.name),
        }
    }
}

fn json_result(r: &TestResult) -> serde_json::Value {
    let (outcome, error) = match &r.outcome {
        TestOutcome::Pass => ("pass", None),
        TestOutcome::Fail => ("fail", None),
        TestOutcome::Skip => ("skip", None),
        TestOutcome::Error(e) => ("error", Some(e.clone())),
    };
    serde_json::json!({
        "file": r.file, "name": r.name, "outcome": outcome, "error": error,
        "duration_ns": r.elapsed.as_nanos() as u64,
    })
}

fn check(dir: &Path) -> Result<()> {
    let set = PolicySet::load(dir)?;
    let m = set.manifest();
    println!(
        "{}: revision {} compiles ({} module(s); engine {}; mode {}, failure mode {}, allow {}{})",
        dir.display(),
        set.revision(),
        set.files().len(),
        set.engine(),
        m.mode.as_str(),
        format!("{:?}", m.failure_mode).to_lowercase(),
        set.entrypoints().allow,
        set.entrypoints()
            .deny
            .as_ref()
            .map(|d| format!(", deny {d}"))
            .unwrap_or_default()
    );
    if let Some(why) = set.vm_fallback() {
        println!(
            "note: the VM cannot compile this set, so it runs on the slower interpreter: {why}"
        );
    }
    Ok(())
}

fn eval(dir: &Path, input: &Path) -> Result<()> {
    let set = PolicySet::load(dir)?;
    let text = if input == Path::new("-") {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?
    };
    // YAML is a superset of JSON, so one parser takes both.
    let doc: serde_json::Value = serde_yaml::from_str(&text)
        .with_context(|| format!("{}: not a JSON or YAML document", input.display()))?;
    let d = set.decide(&doc);
    let out = serde_json::json!({
        "revision": set.revision(),
        "engine": set.engine(),
        "mode": set.manifest().mode.as_str(),
        "result": d.outcome.as_str(),
        "permitted": d.permitted,
        "reasons": d.reasons,
        "error": d.error,
        "eval_us": d.elapsed.as_secs_f64() * 1e6,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
