#!/usr/bin/env bash
# gpu-check.sh: check the shim's host detection on a real NVIDIA host.
#
# Builds crank-shim (release), prints what it detects (`crank-shim host
# --json`: GPUs through NVML, RAPL, CPU, memory), then what nvidia-smi says,
# so the two can be compared by eye: GPU names, memory totals (nvidia-smi
# prints MiB, the shim bytes) and encoder session counts should agree.
#
# Usage: scripts/gpu-check.sh   (from anywhere; needs cargo; run as root to
# see RAPL, whose energy_uj is root-only since Linux 5.10)
set -euo pipefail

cd "$(dirname "$0")/.."
cargo build --release -p crank-shim

echo "== crank-shim host --json"
"${CARGO_TARGET_DIR:-target}/release/crank-shim" host --json

echo
echo "== nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,encoder.stats.sessionCount,power.draw \
    --format=csv
else
  echo "nvidia-smi not found: no NVIDIA driver tools on this host"
fi
