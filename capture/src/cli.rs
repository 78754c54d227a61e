//! The command line: `crank-capture install | remove | show`, parsed into a
//! [`CaptureConfig`] and run. `main.rs` only calls [`main`].

use crate::apply::{self, BackendChoice, Tools};
use crate::config::{parse_cidrs, parse_ports, CaptureConfig, ConfigError, Inbound, InboundPorts};
use crate::report::{Action, Report, TableReport};
use crate::{iptables, nft};
use clap::{Parser, Subcommand, ValueEnum};

/// Sends an app's TCP through its Crank sidecar with nftables (or iptables)
/// rules, and takes them away again.
#[derive(Debug, Parser)]
#[command(name = "crank-capture", version)]
pub struct Cli {
    /// How to print the report.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Install (or replace) the capture rules.
    Install(InstallArgs),
    /// Remove the capture rules, on every backend; absent rules are fine.
    Remove,
    /// Show the capture rules now installed.
    Show,
}

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// The proxy's uid: its connections are never captured.
    #[arg(long)]
    pub proxy_uid: u32,
    /// The proxy's outbound capture listener port.
    #[arg(long)]
    pub outbound_port: u16,
    /// The proxy's inbound capture listener port.
    #[arg(long, requires = "inbound_ports")]
    pub inbound_port: Option<u16>,
    /// The app's listening ports to capture (8080,9000 or 8000-8100), or `all`.
    #[arg(long, requires = "inbound_port")]
    pub inbound_ports: Option<String>,
    /// Destination ports outbound capture leaves alone (e.g. 22,25,3306).
    #[arg(long, default_value = "")]
    pub exclude_outbound_ports: String,
    /// Destination ranges outbound capture leaves alone (e.g. 10.0.0.0/8);
    /// loopback always is.
    #[arg(long, default_value = "")]
    pub exclude_outbound_cidrs: String,
    /// With `--inbound-ports all`: ports left alone (e.g. 22, the proxy's
    /// own mesh and admin ports).
    #[arg(long, default_value = "")]
    pub exclude_inbound_ports: String,
    /// Capture IPv6 too.
    #[arg(long)]
    pub ipv6: bool,
    /// nftables (`nft`) or iptables; `auto` takes nft when installed.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Print the rules and change nothing (needs no privileges).
    #[arg(long)]
    pub dry_run: bool,
}

impl InstallArgs {
    /// The typed, validated config.
    pub fn config(&self) -> Result<CaptureConfig, ConfigError> {
        let excl_in = parse_ports("--exclude-inbound-ports", &self.exclude_inbound_ports)?;
        let inbound = match (self.inbound_port, self.inbound_ports.as_deref()) {
            (Some(port), Some(list)) => {
                let ports = if list.trim() == "all" {
                    InboundPorts::AllExcept(excl_in)
                } else if !excl_in.is_empty() {
                    return Err(ConfigError::ExcludeWithList);
                } else {
                    InboundPorts::Only(parse_ports("--inbound-ports", list)?)
                };
                Some(Inbound { port, ports })
            }
            _ => None,
        };
        let cfg = CaptureConfig {
            proxy_uid: self.proxy_uid,
            outbound_port: self.outbound_port,
            inbound,
            exclude_outbound_ports: parse_ports(
                "--exclude-outbound-ports",
                &self.exclude_outbound_ports,
            )?,
            exclude_outbound_cidrs: parse_cidrs(
                "--exclude-outbound-cidrs",
                &self.exclude_outbound_cidrs,
            )?,
            ipv6: self.ipv6,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Runs the parsed command: the report, or the error to print.
pub fn run(cli: &Cli) -> anyhow::Result<Report> {
    Ok(match &cli.command {
        Cmd::Install(args) if args.dry_run => dry_run(&args.config()?, args.backend),
        Cmd::Install(args) => apply::install(&args.config()?, args.backend)?,
        Cmd::Remove => apply::remove()?,
        Cmd::Show => apply::show()?,
    })
}

/// The rules `install` would apply on a clean host, as the tool takes them.
pub fn dry_run(cfg: &CaptureConfig, choice: BackendChoice) -> Report {
    let use_nft = match choice {
        BackendChoice::Nft => true,
        BackendChoice::Iptables => false,
        BackendChoice::Auto => {
            Tools::discover().nft.is_some() || Tools::discover().iptables.is_none()
        }
    };
    let script = |backend, name: &str, rules| TableReport {
        backend,
        name: name.to_string(),
        installed_before: false,
        installed: false,
        changed: false,
        rules,
    };
    let clean = iptables::NatState::default();
    let mut tables = Vec::new();
    if use_nft {
        tables.push(script("nftables", "nft -f -", nft::install_script(cfg)));
    } else {
        let v4 = iptables::install_script(cfg, iptables::Family::V4, &clean);
        tables.push(script("iptables", "iptables-restore --noflush", v4));
        if cfg.ipv6 {
            let v6 = iptables::install_script(cfg, iptables::Family::V6, &clean);
            tables.push(script("ip6tables", "ip6tables-restore --noflush", v6));
        }
    }
    let mut r = Report::new(Action::Install, Some(cfg.clone()), tables);
    r.dry_run = true;
    r
}

/// Prints the report in the chosen form.
pub fn print(report: &Report, output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        ),
        Output::Text if report.dry_run => {
            for t in &report.tables {
                println!("# {}: the input of `{}`", t.backend, t.name);
                print!("{}", t.rules);
            }
            for line in &report.summary {
                println!("# {line}");
            }
        }
        Output::Text => print!("{}", report.text()),
    }
}

/// The binary: parse, run, print; errors go to stderr with exit code 1.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(report) => {
            print(&report, cli.output);
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crank-capture: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<CaptureConfig, String> {
        let mut argv = vec![
            "crank-capture",
            "install",
            "--proxy-uid",
            "1337",
            "--outbound-port",
            "15001",
        ];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.kind().to_string())?;
        let Cmd::Install(a) = cli.command else {
            unreachable!()
        };
        a.config().map_err(|e| e.to_string())
    }

    #[test]
    fn inbound_flags_come_together() {
        let all = parse(&[
            "--inbound-port",
            "15006",
            "--inbound-ports",
            "all",
            "--exclude-inbound-ports",
            "22",
        ])
        .unwrap();
        assert_eq!(
            all.inbound.unwrap().ports,
            InboundPorts::AllExcept(parse_ports("p", "22").unwrap())
        );
        assert!(parse(&["--inbound-port", "15006"]).is_err());
        assert!(parse(&["--inbound-ports", "8080"]).is_err());
        assert_eq!(parse(&[]).unwrap().inbound, None);
        let e = parse(&[
            "--inbound-port",
            "15006",
            "--inbound-ports",
            "8080",
            "--exclude-inbound-ports",
            "22",
        ]);
        assert!(e
            .unwrap_err()
            .contains("only applies with --inbound-ports all"));
    }

    #[test]
    fn dry_run_renders_the_chosen_backend() {
        let cfg = parse(&["--ipv6"]).unwrap();
        let r = dry_run(&cfg, BackendChoice::Iptables);
        let backends: Vec<&str> = r.tables.iter().map(|t| t.backend).collect();
        assert_eq!(backends, ["iptables", "ip6tables"]);
        assert!(r.dry_run && !r.changed);
        let r = dry_run(&cfg, BackendChoice::Nft);
        assert_eq!(r.tables[0].rules, nft::install_script(&cfg));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["action"], "install");
        assert_eq!(json["config"]["outbound_port"], 15001);
    }

    #[test]
    fn summary_is_in_the_dry_run() {
        let r = dry_run(&parse(&[]).unwrap(), BackendChoice::Nft);
        assert_eq!(
            r.summary,
            crate::report::summary(&r.config.clone().unwrap())
        );
    }
}
