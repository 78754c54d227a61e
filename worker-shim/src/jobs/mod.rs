//! Running jobs in `exec` mode: the priority queue and device slots
//! ([`queue`]), the store ([`store`]) and the manager that runs them
//! ([`manager`], with its concerns in `admission`, `runner`, `finish` and
//! `settings`). The job record itself is [`crate::job`].

mod admission;
pub mod cluster;
mod finish;
pub mod manager;
pub mod pg;
mod pg_usage;
pub mod queue;
mod runner;
mod settings;
pub mod store;
pub mod tenants;
pub mod tenants_reload;

pub use admission::NewJob;
pub use finish::retry_delay;
pub use manager::{ExecSettings, Manager, Recovery};
