//! Transparent capture in the proxy: the listeners that take the
//! connections the capture rules (`crank-capture`, or `crank-proxy capture
//! install --config FILE`) redirect, so an unmodified app is meshed.
//!
//! | module     | what it holds |
//! |------------|---------------|
//! | [`config`] | the `capture` section: its install flags, validation, listen addresses (in `crate::config::capture`, a leaf, so the config checks need no capture) |
//! | [`detect`] | protocol detection (TLS, HTTP/1, h2, opaque) with its deadline (pure, plus the read) |
//! | [`route`]  | where a captured destination goes (pure over the route table; in `crate::routing::captured`, so `request` routes by original destination without going up to capture) |
//! | [`listen`] | the listeners' app: original destination, detection, dispatch |
//! | [`forward`] | opaque bytes: into the tunnel, or straight on (idle timeout, limit, access log) |
//! | [`policy`] | connection-level policy on plaintext callers (inbound) and opaque/TLS connects (outbound) (in `crate::tunnel::policy`, which the tunnel uses too) |
//! | [`metrics`] | `crank_capture_connections_total`, `crank_capture_refused_total` |
//! | [`cli`]    | `crank-proxy capture install|remove|show` |
//!
//! `docs/reference/capture.md` describes the whole of it.

pub mod cli;
pub mod detect;
pub mod forward;
pub mod listen;
pub mod metrics;

pub use crate::config::capture as config;
pub use crate::routing::captured as route;
pub use crate::routing::captured::captured_dst;
pub use crate::tunnel::policy;
