//! `crank-shim`: puts an unmodified worker (an HTTP server, or a command-line
//! tool such as ffmpeg) behind a thin shim. See `docs/guides/service-owner.md`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    if let Some(Cmd::Host { json }) = args.cmd {
        // With --config, probe as that shim would (its nvml and powercap_root).
        let mut opts = crank_shim::host::HostOptions::default();
        if let Some(path) = &args.config {
            match crank_shim::config::load(path) {
                Ok(cfg) => {
                    opts.nvml = cfg.host.nvml;
                    opts.powercap_root = cfg.host.powercap_root;
                }
                Err(e) => {
                    eprintln!("crank-shim: config rejected: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        let (info, _probe) = crank_shim::host::detect(&opts);
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&info).unwrap_or_default()
            );
        } else {
            let labels = crank_shim::host::labels(&info);
            println!(
                "{}",
                serde_json::to_string_pretty(&info).unwrap_or_default()
            );
            for (k, v) in labels {
                println!("label {k}={v}");
            }
        }
        return ExitCode::SUCCESS;
    }
    let Some(path) = args.config else {
        eprintln!("crank-shim: give --config FILE (or `crank-shim host`); see --help");
        return ExitCode::from(2);
    };
    let cfg = match crank_shim::config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("crank-shim: config rejected: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("{}: valid", path.display());
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crank-shim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(crank_shim::run::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crank-shim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
