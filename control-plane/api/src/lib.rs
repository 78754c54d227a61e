//! crank-api: the typed contract between the control plane and the data plane.
//!
//! [`proxy::ProxyConfig`] is what a `crank-proxy` runs on. Today it is read from
//! a static YAML file; the control plane will serve the same type under `/v1/`.
//! Every struct rejects unknown fields, and every optional knob has a
//! documented default (see `docs/reference/proxy-config.md`). Serde only:
//! no TLS or certificate code, so every binary can depend on it.

pub mod identity;
pub mod job_template;
pub mod mesh;
pub mod proxy;
pub mod registration;
pub mod report;
pub mod resilience;
pub mod tenants;
