//! Transparent capture in the proxy: the listeners that take the
//! connections the capture rules (`crank-capture`, or `crank-proxy capture
//! install --config FILE`) redirect, so an unmodified app is meshed.
//!
//! | module     | what it holds |
//! |------------|---------------|
//! | [`config`] | the `capture` section: its install flags, validation, listen addresses |
//! | [`detect`] | protocol detection (TLS, HTTP/1, h2, opaque) with its deadline (pure, plus the read) |
//! | [`route`]  | where a captured destination goes (pure over the route table) |
//! | [`listen`] | the listeners' app: original destination, detection, dispatch |
//! | [`forward`] | opaque bytes: into the tunnel, or straight on (idle timeout, limit, access log) |
//! | [`policy`] | connection-level policy on plaintext callers (inbound) and opaque/TLS connects (outbound) |
//! | [`metrics`] | `crank_capture_connections_total`, `crank_capture_refused_total` |
//! | [`cli`]    | `crank-proxy capture install|remove|show` |
//!
//! `docs/reference/capture.md` describes the whole of it.

pub mod cli;
pub mod config;
pub mod detect;
pub mod forward;
pub mod listen;
pub mod metrics;
pub mod policy;
pub mod route;

pub use route::captured_dst;
