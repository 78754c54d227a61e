#!/usr/bin/env bash
# Instructions per request of the crank sidecar pair, under callgrind.
#
# Instruction counts do not depend on what else runs on the machine, so they
# compare two binaries (or two configs) where wall-clock figures are noise.
# The path is the bench's `crank` setup: load -> crank outbound (plain HTTP)
# -> mTLS, TLS 1.3, h2 -> crank inbound -> a private nginx upstream. Both
# sidecars run under `valgrind --tool=callgrind`; after WARMUP requests the
# counters are zeroed, N requests go through one keep-alive connection
# (curl's URL globbing), and the counters are dumped. Prints user-space
# instructions (Ir) per request for each sidecar and the pair.
#
#   bash benches/callgrind.sh                 # N=2000, target/release binaries
#   N=3000 CRANK_PROXY=/tmp/base/crank-proxy bash benches/callgrind.sh
#   FRONT_EXTRA='limits: {...}' BACK_EXTRA='...' bash benches/callgrind.sh
#
# Installs valgrind, nginx-light and curl with apt-get when missing
# (BENCH_NO_INSTALL=1 skips that). Outputs go to benches/out/callgrind/.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
N=${N:-2000}
WARMUP=${WARMUP:-300}
CRANK_PROXY=${CRANK_PROXY:-$ROOT/target/release/crank-proxy}
CRANKCTL=${CRANKCTL:-$ROOT/target/release/crankctl}
OUT=${OUT:-$ROOT/benches/out/callgrind}

die() { echo "callgrind.sh: $*" >&2; exit 1; }

if [[ -z "${BENCH_NO_INSTALL:-}" ]]; then
    missing=()
    command -v valgrind >/dev/null || missing+=(valgrind)
    command -v nginx >/dev/null || missing+=(nginx-light)
    command -v curl >/dev/null || missing+=(curl)
    if ((${#missing[@]})); then
        sudo=""; [[ $(id -u) -eq 0 ]] || sudo=sudo
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
fi
[[ -x "$CRANK_PROXY" ]] || die "$CRANK_PROXY is missing: cargo build --release -p crank-proxy"
[[ -x "$CRANKCTL" ]] || die "$CRANKCTL is missing: cargo build --release -p crank-control"

rm -rf "$OUT"; mkdir -p "$OUT"/{certs,nginx/logs}
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
P_UP=$(free_port); P_FRONT=$(free_port); P_BACK=$(free_port)
P_AF=$(free_port); P_AB=$(free_port)

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

cat >"$OUT/nginx/nginx.conf" <<EOF
daemon off; master_process off; worker_processes 1;
pid $OUT/nginx/nginx.pid; error_log $OUT/nginx/logs/error.log;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$P_UP; location / { return 200 "ok"; } } }
EOF
nginx -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" &
PIDS+=($!)

"$CRANKCTL" ca init --dir "$OUT/certs" --force >"$OUT/certs.log" 2>&1
for svc in front back; do
    "$CRANKCTL" cert issue --ca-dir "$OUT/certs" --service "$svc" --tenant bench >>"$OUT/certs.log" 2>&1
done
C=$OUT/certs
cat >"$OUT/front.yaml" <<EOF
identity: {cert: $C/front.bench.crt, key: $C/front.bench.key, trust_bundle: $C/bundle.pem}
outbound: {ports: [{listen: 127.0.0.1:$P_FRONT, route: back}]}
routes:
  - name: back
    endpoints: [{address: 127.0.0.1:$P_BACK, identity: back.bench.crank.local}]
admin: {listen: 127.0.0.1:$P_AF}
threads: 1
access_log: false
drain: {deadline: 1s}
${FRONT_EXTRA:-}
EOF
cat >"$OUT/back.yaml" <<EOF
identity: {cert: $C/back.bench.crt, key: $C/back.bench.key, trust_bundle: $C/bundle.pem}
inbound: {listen: 127.0.0.1:$P_BACK, app: 127.0.0.1:$P_UP, app_protocol: http1}
admin: {listen: 127.0.0.1:$P_AB}
threads: 1
access_log: false
drain: {deadline: 1s}
${BACK_EXTRA:-}
EOF

start() { # name
    valgrind --tool=callgrind --callgrind-out-file="$OUT/$1.cg" \
        "$CRANK_PROXY" --config "$OUT/$1.yaml" >"$OUT/$1.log" 2>&1 &
    PIDS+=($!)
    eval "PID_$1=$!"
}
start back
start front
for a in $P_AB $P_AF; do
    for _ in $(seq 600); do
        curl -sf -m 2 "http://127.0.0.1:$a/ready" >/dev/null 2>&1 && break
        sleep 0.2
    done
    curl -sf -m 2 "http://127.0.0.1:$a/ready" >/dev/null || die "sidecar admin :$a not ready (see $OUT/*.log)"
done

load() { # count
    local codes
    codes=$(curl -s -o /dev/null -w '%{http_code}\n' "http://127.0.0.1:$P_FRONT/bench?[1-$1]" | sort | uniq -c)
    [[ "$codes" =~ ^[[:space:]]*$1\ 200$ ]] || die "not every request got 200: $codes"
}
load "$WARMUP"
callgrind_control -z "$PID_front" >/dev/null
callgrind_control -z "$PID_back" >/dev/null
load "$N"
callgrind_control -d "$PID_front" >/dev/null
callgrind_control -d "$PID_back" >/dev/null

ir() { # name: the Ir of the dump taken after zeroing
    local f
    f=$(ls "$OUT/$1.cg".* 2>/dev/null | tail -1)
    [[ -n "$f" ]] || die "no callgrind dump for $1"
    awk '/^(summary|totals):/ {print $2; exit}' "$f"
}
front=$(ir front); back=$(ir back)
printf '| binary | front Ir/req | back Ir/req | pair Ir/req |\n|---|---:|---:|---:|\n'
printf '| %s | %d | %d | %d |\n' "$CRANK_PROXY" $((front / N)) $((back / N)) $(((front + back) / N))
