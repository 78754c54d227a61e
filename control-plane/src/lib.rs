//! crank-control: the mesh control plane library and the `crankctl` commands.
//!
//! Today it holds the dev-CA commands (`crankctl ca init`, `crankctl cert
//! issue`, `crankctl cert inspect`) and the policy commands (`crankctl policy
//! test|check|eval`). Enrollment, config distribution and the
//! registry build on this crate in later issues.

mod audit_cli;
mod ca_cli;
pub mod check;
pub mod cli;
pub mod configdir;
pub mod inspect;
mod jobs_cli;
mod mesh_cli;
mod policy_cli;
pub mod registry;
pub mod server;
pub mod slo;
mod slo_cli;
pub mod store;
pub mod tap_cli;
