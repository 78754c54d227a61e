//! crank-shim: an unmodified worker behind a thin shim, as a mesh citizen.
//!
//! - `serve` mode ([`serve`]): the worker is an HTTP server; the shim starts
//!   it, restarts it with backoff, health-checks it, sits in front of it and
//!   drains it on SIGTERM.
//! - `exec` mode ([`jobs`], [`exec`], [`api`]): the worker is a command-line
//!   tool such as ffmpeg; the shim runs it as jobs behind `/v1/jobs`, with a
//!   priority queue, device slots, timeouts, retries, cancellation and a
//!   persistent job store.
//! - [`host`]: CPU, memory, GPUs (NVML, loaded at run time) and RAPL, as
//!   `/v1/host` and registration labels; energy per job.
//!
//! Dependencies point down, no cycle: leaves ([`job`], [`program`],
//! [`registration`], [`listener`], [`limits`], [`storage`]) → [`exec`],
//! [`host`], [`templates`] → [`config`], [`metrics`] → the mechanisms
//! ([`jobs`], [`serve`]) → [`usage`], [`api`] → [`cron`] → [`run`] (the
//! wiring). Issue #18's job features: per-job limits ([`limits`]), object
//! storage ([`storage`]), templates and their schedules ([`templates`],
//! [`cron`]), usage accounting ([`usage`]). The plumbing the three Crank
//! binaries share (config errors, the accept loop, backoff, signals, the
//! refusal body) is
//! `crank-plumbing`'s. `docs/architecture.md` ("Worker shim modules") has
//! the picture.
//!
//! See `docs/guides/service-owner.md` (putting a program behind the shim)
//! and `docs/reference/shim-config.md`.

pub mod api;
pub mod config;
pub mod cron;
pub mod exec;
pub mod host;
pub mod job;
pub mod jobs;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod program;
pub mod registration;
pub mod run;
pub mod serve;
pub mod storage;
pub mod templates;
pub mod usage;
