//! Running jobs in `exec` mode: the priority queue and device slots
//! ([`queue`]), the store ([`store`]) and the manager that runs them
//! ([`manager`]). The job record itself is [`crate::job`].

pub mod manager;
pub mod queue;
pub mod store;
