//! Jobs in `exec` mode: the record and its state machine ([`model`]), the
//! priority queue and device slots ([`queue`]), the store ([`store`]) and
//! the manager that runs them ([`manager`]).

pub mod manager;
pub mod model;
pub mod queue;
pub mod store;
