//! crank-proxy: the Crank Mesh sidecar, built on Pingora.
//!
//! One [`request::MeshProxy`] (`ProxyHttp`) serves both directions: inbound
//! (peer sidecar → local app, mTLS) and outbound (local app → mesh). The
//! modules form layers, each using only those below it:
//!
//! 1. leaves: [`config`], [`errors`], [`metrics`], [`direction`], [`clock`],
//!    [`headers`], and the mechanisms ([`resilience`], [`routing`],
//!    [`identity`], [`policy`], [`tracing`], [`health`], [`conn`], ...);
//! 2. [`runtime`]: the handles every request stage reads;
//! 3. [`request`]: the Pingora phases and their stages;
//! 4. [`app`]: wiring, the background tasks and the writers ([`app::run`]).
//!
//! `docs/architecture.md` has the module graph, the phase table and the ports.

pub mod app;
pub mod balancer;
pub mod batch;
pub mod capture;
pub mod clock;
pub mod config;
pub mod conn;
pub mod direction;
pub mod drain;
pub mod egress;
pub mod enroll;
pub mod errors;
pub mod framing;
pub mod headers;
pub mod health;
pub mod identity;
pub mod logging;
pub mod mesh;
pub mod metrics;
pub mod policy;
pub mod request;
pub mod resilience;
pub mod routing;
pub mod runtime;
pub mod tap;
pub mod tracing;
pub mod tunnel;

/// The W3C trace-context parser under its old name (the fuzz target uses it).
pub use self::tracing::context as tracecontext;
