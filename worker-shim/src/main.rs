//! `crank-shim`: puts an unmodified worker (an HTTP server, or a command-line
//! tool such as ffmpeg) behind a thin shim. See `docs/guides/service-owner.md`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use crank_shim::config::ShimConfig;
use crank_shim::host::HostOptions;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Crank Mesh worker shim: serve or exec an unmodified worker"
)]
struct Args {
    /// The shim's config file (YAML, docs/reference/shim-config.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Validate the config and exit: 0 when valid, 2 with the error.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Detect this host (CPU, memory, GPUs through NVML, RAPL) and print it.
    Host {
        /// JSON, as `GET /v1/host` shows it.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CRANK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    match args.cmd {
        Some(Cmd::Host { json }) => host(args.config.as_deref(), json),
        None => start(args.config.as_deref(), args.check),
    }
}

/// The config, or exit code 2 with the error on stderr.
fn load(path: &Path) -> Result<ShimConfig, ExitCode> {
    crank_shim::config::load(path).map_err(|e| {
        eprintln!("crank-shim: config rejected: {e}");
        ExitCode::from(2)
    })
}

/// `crank-shim host [--json]`: what this host has, as `GET /v1/host`
/// shows it. With `--config`, probed as that shim would (its `nvml` and
/// `powercap_root`).
fn host(config: Option<&Path>, json: bool) -> ExitCode {
    let mut opts = HostOptions::default();
    if let Some(path) = config {
        match load(path) {
            Ok(cfg) => {
                opts.nvml = cfg.host.nvml;
                opts.powercap_root = cfg.host.powercap_root;
            }
            Err(code) => return code,
        }
    }
    let (info, _probe) = crank_shim::host::detect(&opts);
    println!(
        "{}",
        serde_json::to_string_pretty(&info).unwrap_or_default()
    );
    if !json {
        for (k, v) in crank_shim::host::labels(&info) {
            println!("label {k}={v}");
        }
    }
    ExitCode::SUCCESS
}

/// Checks the config (`--check`), or runs the shim on a two-thread runtime.
fn start(config: Option<&Path>, check: bool) -> ExitCode {
    let Some(path) = config else {
        eprintln!("crank-shim: give --config FILE (or `crank-shim host`); see --help");
        return ExitCode::from(2);
    };
    let cfg = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if check {
        println!("{}: valid", path.display());
        return ExitCode::SUCCESS;
    }
    crank_plumbing::exit::run("crank-shim", Some(2), crank_shim::run::run(cfg))
}
