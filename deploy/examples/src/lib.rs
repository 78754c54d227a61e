//! crank-examples: the two small demo apps the quickstart runs behind sidecars.
//!
//! - [`backend`]: answers every request with JSON describing exactly what it
//!   received (method, path, HTTP version, headers, body size), so a user can
//!   see that the sidecars pass requests through unchanged.
//! - [`frontend`]: on `GET /` calls a backend URL with a plain HTTP/1.1 client
//!   that honours `HTTP_PROXY`, the way an unmodified app adopts a sidecar.
//!
//! The binaries in `src/bin/` only parse arguments and call these modules, so
//! the tests in `tests/` boot the same code on ephemeral ports.

pub mod backend;
pub mod client;
pub mod frontend;
pub mod proxy_env;
pub mod server;
