//! crank-shim: supervises or executes an unmodified worker behind a sidecar.
//!
//! Not built yet: the worker shim issue brings `serve` and `exec` modes, host
//! capabilities (NVML, RAPL) and the job API. The crate exists so the
//! workspace layout matches `docs/architecture.md`.
