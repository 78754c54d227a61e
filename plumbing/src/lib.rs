//! The plumbing that all three Crank Mesh binaries (crank-proxy,
//! crank-control, crank-shim) need, written once:
//!
//! | module      | what it holds |
//! |-------------|---------------|
//! | [`config`]  | load a YAML file into a typed struct; [`config::ConfigError`] names the file, the field and the fix; [`config::Problems`] collects every problem so a bad config is refused whole |
//! | [`serve`](mod@serve) | the one accept loop: graceful stop, backoff on accept errors (no spin), an optional connection limit |
//! | [`backoff`] | exponential [`backoff::Backoff`] with an explicit [`backoff::Jitter`] rule and an injectable random draw |
//! | [`signal`]  | SIGTERM/SIGINT as a future; [`signal::Drain`]: stop signal plus in-flight count with a deadline |
//! | [`headers`] | the hop-by-hop list and the `x-crank-*` header names |
//! | [`refusal`] | [`refusal::Refusal`]: the one error body every response the mesh makes on its own uses |
//! | [`exit`]    | build a runtime, run, turn the result into an exit code and print the error chain |
//!
//! No Pingora, no TLS and no HTTP server here: this crate is a leaf.

pub mod backoff;
pub mod config;
pub mod exit;
pub mod headers;
pub mod refusal;
pub mod serve;
pub mod signal;

pub use backoff::{Backoff, Jitter};
pub use config::{ConfigError, Problems};
pub use refusal::Refusal;
pub use serve::{serve, serve_with, Listener, ServeOptions};
pub use signal::{Drain, Signals};
