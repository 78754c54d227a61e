//! Logs: JSON lines on stderr through a non-blocking writer, so a slow
//! terminal or pipe never slows requests. `CRANK_LOG` sets the filter
//! (default `info`); Pingora's own `log` records are bridged in.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let _ = tracing_log::LogTracer::init();
    let filter = EnvFilter::try_from_env("CRANK_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,pingora_core=warn,pingora_proxy=warn"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
