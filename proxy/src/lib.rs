//! crank-proxy: the Crank Mesh sidecar, built on Pingora.
//!
//! One [`proxy::MeshProxy`] (`ProxyHttp`) serves both directions: inbound
//! (peer sidecar → local app, mTLS) and outbound (local app → mesh). Each
//! concern lives in its own module; [`server::run`] wires them together.
//! `docs/architecture.md` has the phase table and the ports.

pub mod admin;
pub mod balancer;
pub mod config;
pub mod conn;
pub mod drain;
pub mod enroll;
pub mod errors;
pub mod framing;
pub mod health;
pub mod identity;
pub mod logging;
pub mod mesh;
pub mod metrics;
pub mod otlp;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod resilience;
pub mod routing;
pub mod server;
pub mod spans;
pub mod state;
pub mod tap;
pub mod tracecontext;
