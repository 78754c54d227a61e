#!/usr/bin/env bash
# Config distribution benchmark (issue #4): N simulated watching proxies
# against one real crank-control; see tests/src/bin/mesh-watch-bench.rs.
#
#   bash benches/mesh-watch.sh                 # N = 100, 1000, 2000 (+5000 with 16+ GiB free)
#   WATCHERS=100,1000 UPDATES=10 bash benches/mesh-watch.sh
#   REPLICAS=3 WATCHERS=10000 bash benches/mesh-watch.sh   # 3 etcd + 3 replicas, then SIGKILL of the leader
#
# Knobs: WATCHERS (comma list), UPDATES [20] (config edits per N),
# BENCH_NO_BUILD=1 (use the binaries already built), PROFILE [release] or
# debug (target/debug, `cargo build` without --release), REPLICAS [1]: 3
# runs crank-control as three replicas with store: etcd on three etcd
# members (Debian's etcd-server), watchers spread over them, UPDATES edits,
# SIGKILL of the leading replica, one edit at once, UPDATES edits more.
# CONTROL_BIN_DIR [target/$PROFILE]: where crank-control and crankctl are
# (a saved copy, to compare two builds with the same bench client).
# OUT [benches/out]: the directory for the output file (one per person
# when several run benches on one machine).
# Output: a markdown table and a JSON summary on stdout, also written to
# $OUT/mesh-watch.txt (mesh-watch-ha.txt with REPLICAS=3).
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE="${PROFILE:-release}"
flag=(--release)
[[ "$PROFILE" == debug ]] && flag=()
if [[ -z "${BENCH_NO_BUILD:-}" ]]; then
  cargo build "${flag[@]}" -p crank-control --bins
  cargo build "${flag[@]}" -p crank-tests --bin mesh-watch-bench
fi

# Every watcher holds one socket in the bench and one in crank-control,
# which inherits this limit (the bench also raises its soft limit to the hard one).
ulimit -n "$(ulimit -Hn)" || true
echo "open files limit: $(ulimit -n)"

if [[ -z "${WATCHERS:-}" ]]; then
  WATCHERS=100,1000,2000
  free_gib=$(awk '/MemAvailable/ {print int($2 / 1048576)}' /proc/meminfo)
  if (( free_gib >= 16 && $(ulimit -n) >= 12000 )); then WATCHERS+=,5000; fi
fi

OUT="${OUT:-benches/out}"
mkdir -p "$OUT"
out="$OUT/mesh-watch.txt"
[[ "${REPLICAS:-1}" != 1 ]] && out="$OUT/mesh-watch-ha.txt"
echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $(uname -r), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "profile: $PROFILE, replicas: ${REPLICAS:-1}, crank-control: ${CONTROL_BIN_DIR:-target/$PROFILE}, load: $(cut -d' ' -f1-3 /proc/loadavg)"
CRANK_BIN_DIR="${CONTROL_BIN_DIR:-$PWD/target/$PROFILE}" "target/$PROFILE/mesh-watch-bench" \
  --watchers "$WATCHERS" --updates "${UPDATES:-20}" --replicas "${REPLICAS:-1}" | tee "$out"
