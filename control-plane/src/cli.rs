//! `crankctl` commands: argument types and what each command does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use crank_certs::{Ca, CertSummary, Identity, LeafRequest, DEFAULT_TRUST_DOMAIN};

#[derive(Parser, Debug)]
#[command(name = "crankctl", about = "Operate a Crank Mesh", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Certificate authority commands.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Workload certificate commands.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Rego policy sets: test, check, evaluate.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

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

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Make a new root CA: writes ca.crt, ca.key (0600) and bundle.pem into DIR.
    Init {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// How long the root is valid, e.g. 365d.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Replace an existing CA in DIR.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Issue a workload leaf: writes <service>.<tenant>.crt and .key into --out.
    Issue {
        #[arg(long)]
        service: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Directory holding ca.crt and ca.key.
        #[arg(long, default_value = "certs")]
        ca_dir: PathBuf,
        /// Output directory (defaults to --ca-dir).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Leaf lifetime, e.g. 24h.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Print a certificate's identity, SANs and validity.
    Inspect {
        file: PathBuf,
        /// human or json
        #[arg(long, default_value = "human")]
        output: String,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ca(CaCommand::Init {
            dir,
            trust_domain,
            ttl,
            force,
        }) => ca_init(&dir, &trust_domain, ttl, force),
        Command::Cert(CertCommand::Issue {
            service,
            tenant,
            ca_dir,
            out,
            trust_domain,
            ttl,
        }) => {
            let id = Identity::new(&service, &tenant, &trust_domain)?;
            cert_issue(&ca_dir, out.as_ref().unwrap_or(&ca_dir), id, ttl)
        }
        Command::Cert(CertCommand::Inspect { file, output }) => cert_inspect(&file, &output),
        Command::Policy(cmd) => crate::policy_cli::run(cmd),
    }
}

fn ca_init(dir: &Path, trust_domain: &str, ttl: Duration, force: bool) -> Result<()> {
    if dir.join("ca.key").exists() && !force {
        bail!(
            "{} already holds a CA; pass --force to replace it (every issued leaf stops being trusted)",
            dir.display()
        );
    }
    Identity::new("x", "x", trust_domain)?;
    let ca = Ca::generate(trust_domain, ttl)?;
    ca.save(dir)?;
    println!(
        "wrote {0}/ca.crt, {0}/ca.key (keep it secret) and {0}/bundle.pem for trust domain {trust_domain}",
        dir.display()
    );
    Ok(())
}

fn cert_issue(ca_dir: &Path, out: &Path, id: Identity, ttl: Duration) -> Result<()> {
    let ca = Ca::load(ca_dir, &id.trust_domain).with_context(|| {
        format!(
            "loading the CA from {} (run `crankctl ca init` first)",
            ca_dir.display()
        )
    })?;
    let leaf = ca.issue(&LeafRequest::new(id.clone(), ttl))?;
    let (crt, key) = leaf.save(out, &format!("{}.{}", id.service, id.tenant))?;
    println!(
        "issued {} ({}), valid {}: {crt} {key}",
        id.dns_name(),
        id.spiffe_id(),
        humantime::format_duration(ttl)
    );
    Ok(())
}

fn cert_inspect(file: &Path, output: &str) -> Result<()> {
    let pem = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let certs = crank_certs::pem::certs_from_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let summaries = certs
        .iter()
        .map(|c| CertSummary::from_der(c))
        .collect::<Result<Vec<_>, _>>()?;
    match output {
        "json" => println!("{}", serde_json::to_string_pretty(&summaries)?),
        "human" => {
            for (i, s) in summaries.iter().enumerate() {
                let role = if i == 0 { "leaf" } else { "chain" };
                println!("[{i}] {role}");
                println!("  subject:   {}", s.subject);
                println!("  issuer:    {}", s.issuer);
                println!("  serial:    {}", s.serial);
                if let Some(id) = &s.identity {
                    println!("  identity:  {id}");
                }
                println!("  dns SANs:  {}", s.dns_sans.join(", "));
                println!("  uri SANs:  {}", s.uri_sans.join(", "));
                println!("  not before {}", fmt_ts(s.not_before));
                println!("  not after  {}", fmt_ts(s.not_after));
                println!("  CA:        {}", s.is_ca);
            }
        }
        other => bail!("unknown --output {other:?}; use human or json"),
    }
    Ok(())
}

fn fmt_ts(ts: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}
