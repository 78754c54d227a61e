//! `crank-control`: the mesh control plane (CA, enrollment, renewal, CA
//! rotation, revocation). All logic lives in `crank_control::server`.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "crank-control", about = "Crank Mesh control plane", version)]
struct Args {
    /// The control plane config (see docs/reference/control-config.md).
    #[arg(long, default_value = "control.yaml")]
    config: PathBuf,
    /// Check the config and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cfg = match crank_control::server::config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("crank-control: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.check {
        if let Err(e) = crank_control::server::check_ca(&cfg) {
            eprintln!("crank-control: {e:#}");
            return std::process::ExitCode::from(2);
        }
        println!("{}: ok", args.config.display());
        return std::process::ExitCode::SUCCESS;
    }
    crank_plumbing::exit::run("crank-control", Some(2), crank_control::server::run(cfg))
}
