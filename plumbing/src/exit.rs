//! The `main` helper: the end of every binary's `main`: a Tokio runtime,
//! the run, and the result as an exit code, with the error and its causes
//! printed as `NAME: error: cause: cause`.

use std::error::Error;
use std::future::Future;
use std::process::ExitCode;

type BoxError = Box<dyn Error + Send + Sync>;

/// A multi-thread runtime with `threads` workers (`None`: one per core).
pub fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        b.worker_threads(n.max(1));
    }
    b.enable_all().build()
}

/// Runs `work` on a new runtime; see [`exit_code`].
pub fn run<F, E>(name: &str, threads: Option<usize>, work: F) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    match runtime(threads) {
        Ok(rt) => exit_code(name, rt.block_on(work)),
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `Ok` → success; `Err` → the chain on stderr and failure.
pub fn exit_code<E: Into<BoxError>>(name: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {}", chain(&*e.into()));
            ExitCode::FAILURE
        }
    }
}

/// The error and its sources, joined by `: ` (as `anyhow`'s `{:#}`).
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("cannot bind admin_socket")
        }
    }

    impl Error for Outer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn chain_joins_every_cause() {
        let e = Outer(std::io::Error::other("permission denied"));
        assert_eq!(chain(&e), "cannot bind admin_socket: permission denied");
    }

    #[test]
    fn results_become_exit_codes() {
        assert_eq!(exit_code::<BoxError>("t", Ok(())), ExitCode::SUCCESS);
        assert_eq!(exit_code("t", Err("boom")), ExitCode::FAILURE);
        let code = run("t", Some(1), async { Ok::<_, BoxError>(()) });
        assert_eq!(code, ExitCode::SUCCESS);
    }
}
