#!/usr/bin/env bash
# The test command (README): installs the system packages the build and the
# tests need, builds every binary, then runs every test in the workspace
# (unit tests, end-to-end tests with real crank-proxy processes, and the
# quickstart in one-shot mode). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# cmake/pkg-config/build-essential: Pingora's build; protobuf-compiler: the
# gRPC test service; curl: the tests' HTTP client; ffmpeg (and ffprobe):
# the worker shim's transcode tests; prometheus (promtool and the server):
# the SLO rules tests (`promtool check rules`, `promtool test rules`) and
# tests/tests/deploy_observability.rs (`promtool check config`, a real
# Prometheus scraping sidecars); python3-venv:
# the venv for schemathesis (below); chromium: the dashboard's browser
# test (tests/tests/dashboard.rs, headless); nftables, iptables, iproute2:
# transparent capture (crank-capture) and the cross-host tests, whose hosts
# are network namespaces (tests/src/netns.rs, tests/tests/capture.rs);
# etcd-server, etcd-client: the control plane's store and HA tests;
# postgresql: the shim's cluster job queue and the opaque-TCP tests (each
# test starts its own server in a private data directory); systemd:
# `systemd-analyze verify` of the units in deploy/systemd.
packages=(cmake pkg-config build-essential curl ca-certificates protobuf-compiler ffmpeg prometheus python3-venv chromium nftables iptables iproute2 etcd-server etcd-client postgresql postgresql-client systemd)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "tests/run.sh: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Rust: use ~/.cargo/bin when it is not on PATH; install it with rustup
# when missing (rust-toolchain.toml pins the version).
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
  PATH=$HOME/.cargo/bin:$PATH
fi
if ! command -v cargo >/dev/null; then
  echo "tests/run.sh: cargo not found: installing Rust with rustup into ~/.cargo"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --no-modify-path
  PATH=$HOME/.cargo/bin:$PATH
fi

# From PyPI, in a private venv in target/py (made only when missing):
# schemathesis, for tests/tests/openapi.rs (the running servers against
# their OpenAPI documents); kubernetes-validate, for the manifests in
# deploy/kubernetes; moto's S3 server, for the shim's object storage tests.
if [ ! -x target/py/bin/schemathesis ] || [ ! -x target/py/bin/kubernetes-validate ] || [ ! -x target/py/bin/moto_server ]; then
  echo "tests/run.sh: installing schemathesis, kubernetes-validate and moto into target/py"
  [ -x target/py/bin/pip ] || python3 -m venv target/py
  target/py/bin/pip install -q schemathesis kubernetes-validate 'moto[server]'
fi

# Node.js with npm (whichever is installed; Debian's npm when there is
# none), and playwright-core from tests/browser/package-lock.json, for the
# dashboard's browser test. It drives the Chromium above and downloads no
# browser.
if ! command -v npm >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "tests/run.sh: installing npm (and Node.js) from Debian"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends npm
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  echo "tests/run.sh: installing playwright-core into tests/browser/node_modules"
  npm ci --prefix tests/browser --no-audit --no-fund
fi

# As root (CI), the network-namespace tests must run: a skip is a failure.
if [ "$(id -u)" -eq 0 ]; then
  export CRANK_NETNS_REQUIRED=1
fi

cargo build --workspace --bins
cargo test --workspace "$@"

# The vendored Pingora crates are outside the workspace; their own tests
# cover the crank patches and the upstream behaviour they must keep
# (third_party/pingora/PATCHES.md): pingora-pool's (kept empty nodes, key
# hashing) and pingora-core's HTTP protocol tests (body buffers, the chunked
# writer, h2 heads) and its idle-watch tests (patch 12, local listeners only).
# pingora-core's other connector and listener tests need the internet or
# upstream's key files, so they do not run. The
# workspace's lock file pins the dependencies they share with the
# workspace, and the other vendored crates stand in for crates.io's.
PINGORA="$PWD/third_party/pingora"
for crate in pingora-pool pingora-core; do
  cp Cargo.lock "$PINGORA/$crate/Cargo.lock"
done
CARGO_TARGET_DIR="$PWD/target/third-party" \
  cargo test --manifest-path "$PINGORA/pingora-pool/Cargo.toml" --lib
CARGO_TARGET_DIR="$PWD/target/third-party" \
  cargo test --manifest-path "$PINGORA/pingora-core/Cargo.toml" --features rustls \
  --config "patch.crates-io.pingora-pool.path=\"$PINGORA/pingora-pool\"" \
  --config "patch.crates-io.pingora-http.path=\"$PINGORA/pingora-http\"" \
  --config "patch.crates-io.pingora-timeout.path=\"$PINGORA/pingora-timeout\"" \
  --lib -- protocols::http connectors::idle_watch connectors::tests::idle_ \
  connectors::http::v2::tests::idle_ apps::tests::box_in_place

# The README's quickstart, end to end, with the debug binaries just built,
# with the worker shim example in it; one-shot mode also runs every 'try
# next' line it prints.
QS_ONESHOT=1 QS_PROFILE=debug bash deploy/quickstart.sh --with-shim
