//! Running command-line tools as jobs: the declared parameters and their
//! validation ([`params`]), the argv command template ([`template`]), the
//! tool's own progress output ([`progress`]) and the classification of a
//! failed run ([`classify`]).
//!
//! Nothing here spawns a process or touches a shell: these are the pure parts
//! the runner composes.

pub mod classify;
pub mod params;
pub mod progress;
pub mod template;
