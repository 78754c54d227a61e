//! `crank-proxy --config FILE.yaml`: parses arguments and runs the library.
//! `crank-proxy capture install|remove|show ...` writes the capture rules
//! (`crank_proxy::capture::cli`).

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "crank-proxy",
    about = "Crank Mesh sidecar proxy",
    version,
    after_help = "Capture rules: `crank-proxy capture install|remove|show [--config FILE] [crank-capture flags]` (docs/reference/capture.md)."
)]
struct Args {
    /// The proxy config file (YAML). See docs/reference/proxy-config.md.
    #[arg(long, short)]
    config: PathBuf,
    /// Check the config and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> std::process::ExitCode {
    let mut argv = std::env::args_os().skip(1);
    if argv.next().is_some_and(|a| a == "capture") {
        return crank_proxy::capture::cli::main(argv.collect());
    }
    let args = Args::parse();
    crank_proxy::logging::init();
    if args.check {
        return match crank_proxy::app::check(&args.config) {
            Ok(_) => {
                println!("{}: ok", args.config.display());
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("crank-proxy: invalid config: {e:#}");
                std::process::ExitCode::from(2)
            }
        };
    }
    match crank_proxy::app::run(&args.config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crank-proxy: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
