//! Test harness for end-to-end tests: builds certs, writes proxy configs,
//! starts real `crank-proxy` processes on ephemeral ports.
