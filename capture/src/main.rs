//! `crank-capture`: installs, shows and removes the transparent-capture
//! rules. All of it lives in the library ([`crank_capture::cli`]).

fn main() -> std::process::ExitCode {
    crank_capture::cli::main()
}
