//! `crankctl`: the operator CLI. All logic lives in `crank_control::cli`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    // `crankctl cert list | head` ends quietly, like other Unix tools.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = crank_control::cli::Cli::parse();
    match crank_control::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("crankctl: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
