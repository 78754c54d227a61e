//! `crankctl` commands: argument types and what each command does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use crank_certs::{Ca, Identity, LeafRequest, DEFAULT_TRUST_DOMAIN};

use crate::ca_cli;
pub use crate::policy_cli::PolicyCommand;
use crate::server::admin::AdminClient;
use crate::server::state::RotationKind;

#[derive(Parser, Debug)]
#[command(name = "crankctl", about = "Operate a Crank Mesh", version)]
pub struct Cli {
    /// crank-control's admin socket (for token, ca rotate/status, cert list/revoke).
    #[arg(
        long,
        global = true,
        env = "CRANK_CONTROL",
        default_value = "state/admin.sock"
    )]
    pub control: PathBuf,
    /// crank-control's remote admin API (`https://HOST:PORT`, its
    /// `admin_listen`) instead of the socket; needs --cert, --key and --ca.
    #[arg(long, global = true, env = "CRANK_SERVER")]
    pub server: Option<String>,
    /// With --server: the client certificate (PEM, from the mesh CA); its
    /// identity's role comes from roles.yaml.
    #[arg(long, global = true, env = "CRANK_CERT")]
    pub cert: Option<PathBuf>,
    /// With --server: the client certificate's key (PEM).
    #[arg(long, global = true, env = "CRANK_KEY")]
    pub key: Option<PathBuf>,
    /// With --server: the mesh roots (bundle.pem) that crank-control's certificate chains to.
    #[arg(long, global = true, env = "CRANK_CA")]
    pub ca: Option<PathBuf>,
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
    /// One-time join tokens for enrollment.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The mesh config directory (routes, quotas, SLOs, policies).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// SLOs of the mesh config directory: Prometheus rules, and a CI gate
    /// on load-test results.
    #[command(subcommand)]
    Slo(SloCommand),
    /// The published config version and every proxy: identity, version
    /// applied, last contact; stale ones flagged.
    Status {
        /// `human`, `wide` (more columns) or `json`.
        #[arg(short = 'o', long, default_value = "human")]
        output: String,
    },
    /// The effective routes with their live endpoints and weights.
    Routes {
        /// `human`, `wide` (more columns) or `json`.
        #[arg(short = 'o', long, default_value = "human")]
        output: String,
    },
    /// The registry: every live endpoint, its capabilities, labels and lease.
    Endpoints {
        /// `human`, `wide` (more columns) or `json`.
        #[arg(short = 'o', long, default_value = "human")]
        output: String,
    },
    /// Stream requests as sidecars finish them (method, path, status,
    /// latency, identities, trace id, x-crank-error; no headers or bodies).
    Tap {
        /// A sidecar's admin address (admin.listen); repeat for several.
        #[arg(long = "proxy", required = true)]
        proxies: Vec<String>,
        #[arg(long)]
        capability: Option<String>,
        #[arg(long)]
        route: Option<String>,
        /// `inbound` or `outbound`.
        #[arg(long)]
        direction: Option<String>,
        #[arg(long)]
        method: Option<String>,
        /// Only paths starting with this.
        #[arg(long)]
        path: Option<String>,
        /// A class (`5xx`) or a status (`429`).
        #[arg(long)]
        status: Option<String>,
        /// Most events a second from each sidecar (1 to 1000).
        #[arg(long, default_value_t = 100)]
        max_rps: u32,
        /// Stop after this many events (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        limit: u64,
        /// `human`, `wide` (adds the capability and the sidecar) or `json`.
        #[arg(short = 'o', long, default_value = "human")]
        output: String,
    },
    /// Live request rate, success rate and latency per route, summed across
    /// sidecars, refreshed in place.
    Top {
        /// A sidecar's admin address (admin.listen); repeat for several.
        #[arg(long = "proxy", required = true)]
        proxies: Vec<String>,
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Tables to show (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        iterations: u64,
        /// `human`, `wide` or `json`.
        #[arg(short = 'o', long, default_value = "human")]
        output: String,
    },
    /// One health report of the mesh: control plane, proxies on the
    /// published config and policy revision, certificate expiry, rotation,
    /// clock skew, endpoint leases; each problem with its fix. Exits 0 when
    /// nothing failed, 1 on any FAIL, 2 when crank-control cannot be reached.
    Check(CheckArgs),
    /// Worker shim jobs: usage per tenant and capability.
    #[command(subcommand)]
    Jobs(crate::jobs_cli::JobsCommand),
    /// The audit log: admin mutations, refused admin calls and config
    /// versions (who, role, what, result, request id), oldest first.
    Audit {
        /// Only entries this recent (`24h`, `30m`).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// Only this action (`cert.revoke`, `token.create`, `ca.rotate`, `config.publish`).
        #[arg(long)]
        action: Option<String>,
        /// `human` or `json`.
        #[arg(short = 'o', long, default_value = "human")]
        output: String,
    },
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// human or json
    #[arg(short, long, default_value = "human")]
    pub output: String,
    /// Exit 1 on warnings too.
    #[arg(long)]
    pub strict: bool,
    /// Warn when a workload certificate has less than this fraction of its
    /// life left (proxies renew at 2/3 of it by default).
    #[arg(long, default_value_t = 0.2)]
    pub leaf_warn_fraction: f64,
    /// Warn when a root or intermediate in use expires within this.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    pub ca_warn: Duration,
    /// Fail when a root or intermediate in use expires within this.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub ca_fail: Duration,
    /// Warn when a rotation stays in one phase longer than this.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub rotation_stuck: Duration,
    /// Warn when crank-control's clock differs from this host's by more.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub skew_warn: Duration,
    /// Fail when crank-control's clock differs from this host's by more.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub skew_fail: Duration,
}

impl CheckArgs {
    pub fn options(&self) -> Result<crate::check::Options> {
        if !(0.0..1.0).contains(&self.leaf_warn_fraction) {
            bail!(
                "--leaf-warn-fraction {} must be from 0 to below 1 (0.2 is the default)",
                self.leaf_warn_fraction
            );
        }
        Ok(crate::check::Options {
            thresholds: crate::check::Thresholds {
                leaf_warn_fraction: self.leaf_warn_fraction,
                ca_warn: self.ca_warn,
                ca_fail: self.ca_fail,
                rotation_stuck: self.rotation_stuck,
                skew_warn: self.skew_warn,
                skew_fail: self.skew_fail,
            },
            strict: self.strict,
            json: crate::check::is_json(&self.output)?,
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Check DIR as crank-control would (schemas, references between files,
    /// Rego compile and tests), offline, for CI pipelines. Exits 1 listing
    /// every problem with its file, line and field.
    Validate {
        dir: PathBuf,
        #[arg(short = 'o', long, default_value = "human")]
        output: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum SloCommand {
    /// Write Prometheus recording rules and multiwindow, multi-burn-rate
    /// alerts (SRE workbook) for every SLO in DIR; check them with
    /// `promtool check rules`.
    Rules {
        dir: PathBuf,
        /// Write the rules here instead of stdout.
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
    },
    /// Compare measured results (JSON: per capability p50/p90/p95/p99 in ms,
    /// error rate, request count), or what Prometheus measured over
    /// --range, with the SLOs in DIR. Exits 1 when an objective is broken
    /// or the results cannot tell.
    Check {
        dir: PathBuf,
        #[arg(
            long,
            required_unless_present = "prometheus",
            conflicts_with = "prometheus"
        )]
        results: Option<PathBuf>,
        /// A Prometheus that scrapes the sidecars (http://HOST:PORT).
        #[arg(long, requires = "range")]
        prometheus: Option<String>,
        /// With --prometheus: how far back to measure (`1h`).
        #[arg(long, requires = "prometheus", value_parser = humantime::parse_duration)]
        range: Option<Duration>,
        /// human or json
        #[arg(short, long, default_value = "human")]
        output: String,
    },
    /// Per capability: the SLI over the window, the error budget left and
    /// the burn rates, from Prometheus or straight from the sidecars.
    /// Exits 0 however the budget stands, unless --fail-on-burn.
    Status {
        dir: PathBuf,
        /// A Prometheus that scrapes the sidecars (http://HOST:PORT).
        #[arg(long, conflicts_with = "proxies")]
        prometheus: Option<String>,
        /// Without Prometheus: a sidecar's admin address; repeat for several.
        #[arg(long = "proxy")]
        proxies: Vec<String>,
        /// With --proxy: time between the two scrapes the burn rate comes from.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Exit 1 when an objective burns at page speed or has spent its budget.
        #[arg(long)]
        fail_on_burn: bool,
        /// `human`, `wide` or `json`.
        #[arg(short = 'o', long, default_value = "human")]
        output: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Make a one-time join token bound to <service>.<tenant>; prints it on stdout.
    Create {
        #[arg(long)]
        service: String,
        #[arg(long)]
        tenant: String,
        /// How long the token can be used, e.g. 30m (default: tokens.default_ttl).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
}

#[derive(Subcommand, Debug)]
pub enum RotateCommand {
    /// Sign a new intermediate with the root in --root and make it the signer;
    /// every workload renews under it, then the old one is retired.
    Intermediate {
        #[arg(long, default_value = "ca/root")]
        root: PathBuf,
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(short = 'o', long, default_value = "human")]
        output: String,
    },
    /// Stage the root in --new-root (made by `crankctl ca init`): added to every
    /// bundle, leaves reissued under it, then the old root removed.
    Root {
        #[arg(long)]
        new_root: PathBuf,
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Lifetime of the intermediate signed under the new root.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(short = 'o', long, default_value = "human")]
        output: String,
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
    /// Sign an intermediate with the root in --root (offline): writes ca.crt,
    /// ca.key (0600) and bundle.pem (the root) into --out, for crank-control.
    Intermediate {
        #[arg(long, default_value = "ca/root")]
        root: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(long)]
        force: bool,
    },
    /// Rotate the signing intermediate or the root while traffic flows.
    #[command(subcommand)]
    Rotate(RotateCommand),
    /// Where a rotation stands: roots, intermediates, every workload and who lags.
    Status {
        #[arg(short = 'o', long, default_value = "human")]
        output: String,
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
    /// Print a certificate's identity, SANs, validity and chain, from a PEM
    /// file or from a live TLS server (--connect HOST:PORT).
    Inspect {
        #[arg(required_unless_present = "connect", conflicts_with = "connect")]
        file: Option<PathBuf>,
        /// Connect to HOST:PORT and inspect the chain it presents.
        #[arg(long)]
        connect: Option<String>,
        /// SNI name to send with --connect (default: the host part).
        #[arg(long)]
        server_name: Option<String>,
        /// A PEM bundle to verify the presented chain against.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Client certificate and key for servers that require one.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// human or json
        #[arg(short = 'o', long, default_value = "human")]
        output: String,
    },
    /// The inventory of issued leaves (serial, identity, status, expiry, requester).
    List {
        #[arg(short = 'o', long, default_value = "human")]
        output: String,
    },
    /// Revoke one leaf by serial, or every unexpired leaf of an identity
    /// (<service>.<tenant>.<trust-domain>); proxies refuse them at once, on
    /// open connections too.
    Revoke { target: String },
}

/// Runs one command; the exit code is 0 unless `crankctl check` says otherwise.
pub fn run(cli: Cli) -> Result<std::process::ExitCode> {
    if let Command::Check(args) = &cli.command {
        let code = crate::check::run(&cli.control, &args.options()?)?;
        return Ok(std::process::ExitCode::from(code));
    }
    run_command(cli).map(|()| std::process::ExitCode::SUCCESS)
}

/// The admin client `--server` (with `--cert`, `--key`, `--ca`) or `--control` names.
fn admin_client(cli: &Cli) -> Result<AdminClient> {
    let Some(url) = &cli.server else {
        return Ok(AdminClient::new(&cli.control));
    };
    match (&cli.cert, &cli.key, &cli.ca) {
        (Some(cert), Some(key), Some(ca)) => AdminClient::remote(url, cert, key, ca),
        _ => bail!("--server needs --cert, --key and --ca (or CRANK_CERT, CRANK_KEY, CRANK_CA): a client certificate from the mesh CA and the mesh roots"),
    }
}

fn run_command(cli: Cli) -> Result<()> {
    let client = admin_client(&cli)?;
    match cli.command {
        Command::Check(_) => unreachable!("handled in run"),
        Command::Ca(cmd) => run_ca(&client, cmd),
        Command::Cert(cmd) => run_cert(&client, cmd),
        Command::Token(TokenCommand::Create {
            service,
            tenant,
            ttl,
        }) => ca_cli::token_create(&client, &service, &tenant, ttl),
        Command::Policy(cmd) => crate::policy_cli::run(cmd),
        Command::Config(ConfigCommand::Validate { dir, output }) => config_validate(&dir, &output),
        Command::Slo(cmd) => run_slo(cmd),
        Command::Status { output } => crate::mesh_cli::status(&client, &output),
        Command::Routes { output } => crate::mesh_cli::routes(&client, &output),
        Command::Endpoints { output } => crate::mesh_cli::endpoints(&client, &output),
        cmd @ (Command::Tap { .. } | Command::Top { .. }) => run_tap(cmd),
        Command::Jobs(cmd) => crate::jobs_cli::run(cmd),
        Command::Audit {
            since,
            action,
            output,
        } => crate::audit_cli::audit(&client, since, action.as_deref(), &output),
    }
}

fn run_ca(client: &AdminClient, cmd: CaCommand) -> Result<()> {
    match cmd {
        CaCommand::Init {
            dir,
            trust_domain,
            ttl,
            force,
        } => ca_init(&dir, &trust_domain, ttl, force),
        CaCommand::Intermediate {
            root,
            out,
            trust_domain,
            ttl,
            force,
        } => ca_cli::intermediate(&root, &out, &trust_domain, ttl, force),
        CaCommand::Rotate(cmd) => {
            let (kind, root, trust_domain, ttl, output) = match cmd {
                RotateCommand::Intermediate {
                    root,
                    trust_domain,
                    ttl,
                    output,
                } => (RotationKind::Intermediate, root, trust_domain, ttl, output),
                RotateCommand::Root {
                    new_root,
                    trust_domain,
                    ttl,
                    output,
                } => (RotationKind::Root, new_root, trust_domain, ttl, output),
            };
            ca_cli::rotate(client, kind, &root, &trust_domain, ttl, &output)
        }
        CaCommand::Status { output } => ca_cli::ca_status(client, &output),
    }
}

fn run_cert(client: &AdminClient, cmd: CertCommand) -> Result<()> {
    match cmd {
        CertCommand::Issue {
            service,
            tenant,
            ca_dir,
            out,
            trust_domain,
            ttl,
        } => {
            let id = Identity::new(&service, &tenant, &trust_domain)?;
            cert_issue(&ca_dir, out.as_ref().unwrap_or(&ca_dir), id, ttl)
        }
        CertCommand::Inspect {
            file,
            connect,
            server_name,
            ca,
            cert,
            key,
            output,
        } => {
            let output: crate::inspect::Output = output.parse().map_err(anyhow::Error::msg)?;
            match (file, connect) {
                (Some(file), _) => crate::inspect::inspect_file(&file, output),
                (None, Some(address)) => crate::inspect::inspect_connect(
                    &crate::inspect::ConnectOptions {
                        address,
                        server_name,
                        ca,
                        cert,
                        key,
                        timeout: Duration::from_secs(10),
                    },
                    output,
                ),
                (None, None) => bail!("name a PEM file or --connect HOST:PORT"),
            }
        }
        CertCommand::List { output } => ca_cli::cert_list(client, &output),
        CertCommand::Revoke { target } => ca_cli::cert_revoke(client, &target),
    }
}

fn run_slo(cmd: SloCommand) -> Result<()> {
    use crate::slo_cli;
    match cmd {
        SloCommand::Rules { dir, out } => slo_cli::rules(&dir, out.as_ref()),
        SloCommand::Check {
            dir,
            results,
            prometheus,
            range,
            output,
        } => {
            let measured = match (&results, &prometheus, range) {
                (Some(r), _, _) => slo_cli::Measured::Results(r),
                (None, Some(url), Some(range)) => slo_cli::Measured::Prometheus { url, range },
                _ => bail!("give --results FILE, or --prometheus URL --range 1h"),
            };
            slo_cli::check(&dir, measured, &output)
        }
        SloCommand::Status {
            dir,
            prometheus,
            proxies,
            interval,
            fail_on_burn,
            output,
        } => slo_cli::status(
            &dir,
            &slo_cli::StatusArgs {
                prometheus,
                proxies,
                interval,
                output,
                fail_on_burn,
            },
        ),
    }
}

/// `crankctl tap` and `crankctl top`.
fn run_tap(cmd: Command) -> Result<()> {
    use crate::tap_cli;
    match cmd {
        Command::Tap {
            proxies,
            capability,
            route,
            direction,
            method,
            path,
            status,
            max_rps,
            limit,
            output,
        } => {
            let mut query: Vec<(String, String)> = [
                ("capability", capability),
                ("route", route),
                ("direction", direction),
                ("method", method),
                ("path", path),
                ("status", status),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
            .collect();
            query.push(("max_rps".into(), max_rps.to_string()));
            tap_cli::tap(&tap_cli::TapArgs {
                proxies,
                query,
                output,
                limit,
            })
        }
        Command::Top {
            proxies,
            interval,
            iterations,
            output,
        } => tap_cli::top(&tap_cli::TopArgs {
            proxies,
            interval,
            iterations,
            output,
        }),
        _ => bail!("not a tap or top command"),
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

fn config_validate(dir: &Path, output: &str) -> Result<()> {
    let result = crate::configdir::load(dir);
    match output {
        "json" => {
            let v = match &result {
                Ok(s) => serde_json::json!({"ok": true, "hash": s.hash, "routes": s.routes.len(), "limits": s.quotas.limits.len(), "slos": s.slos.len(), "policy_files": s.policies.len()}),
                Err(p) => serde_json::json!({"ok": false, "problems": p}),
            };
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        "human" => match &result {
            Ok(s) => println!(
                "{}: ok (hash {}): {} routes, {} quota limits, {} SLOs, {} capabilities, {} policy files",
                dir.display(),
                &s.hash[..12],
                s.routes.len(),
                s.quotas.limits.len(),
                s.slos.len(),
                s.capabilities.capabilities.len(),
                s.policies.len()
            ),
            Err(problems) => {
                for p in problems {
                    eprintln!("{}: {p}", dir.display());
                }
            }
        },
        other => bail!("unknown --output {other:?}; use human or json"),
    }
    match result {
        Ok(_) => Ok(()),
        Err(p) => bail!(
            "{} problem(s) in {}; fix them and validate again (crank-control refuses such a change and keeps serving the last good version)",
            p.len(),
            dir.display()
        ),
    }
}
