//! Logs: JSON lines on stderr through a non-blocking writer, so a slow
//! terminal or pipe never slows requests (under extreme pressure lines are
//! dropped rather than requests delayed). `CRANK_LOG` sets the filter
//! (default `info`); Pingora's own `log` records are bridged in.

use std::sync::Mutex;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

static GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// Installs the subscriber (which also bridges `log` records). Safe to call
/// twice: the second call changes nothing.
pub fn init() {
    let filter = EnvFilter::try_from_env("CRANK_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,pingora_core=warn,pingora_proxy=warn"));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let installed = tracing_subscriber::fmt()
        .json()
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(writer)
        .try_init()
        .is_ok();
    if installed {
        *GUARD.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
    }
}

/// Writes out buffered log lines; call before `std::process::exit`.
pub fn flush() {
    drop(GUARD.lock().unwrap_or_else(|e| e.into_inner()).take());
}
