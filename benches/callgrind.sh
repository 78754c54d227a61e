#!/usr/bin/env bash
# Instructions and heap allocations per request of the crank sidecar pair,
# under valgrind.
#
# Instruction and allocation counts do not depend on what else runs on the
# machine, so they compare two binaries (or two configs) where wall-clock
# figures are noise. The path is the bench's: load -> crank outbound (plain
# HTTP) -> mTLS, TLS 1.3, h2 -> crank inbound -> a private nginx upstream,
# one keep-alive connection (curl's URL globbing), one worker thread each.
#
#   bash benches/callgrind.sh [SETUP]          # Ir/req (callgrind)
#   bash benches/callgrind.sh --allocs [SETUP] # allocations and bytes/req (dhat)
#   bash benches/callgrind.sh --check          # Ir/req of crank and crank_all
#                                              # against benches/callgrind-baseline.txt,
#                                              # and how much of proxy/link-order.txt
#                                              # the binary still matches
#   bash benches/callgrind.sh --write-baseline # measure both, write that file
#
# SETUP is `crank` (default: access log off, no policy, tracing or
# resilience sections; the defaults' retries and circuit breaking apply) or
# `crank_all` (as benches/run.sh's crank_all: the shipped Rego policies on the
# inbound side with a file decision log, tracing at 1% on both to a private
# OTLP collector, quotas, both concurrency limits, the route's timeout,
# retries and circuit breaking, and the access log on, to a file). The
# policies are a copy of policies/ with `timeout: 10s` (valgrind is slow).
#
# Ir: after WARMUP requests the counters are zeroed (callgrind_control -z),
# N requests go through, the counters are dumped (-d); Ir is user-space
# instructions. Allocations: DHAT cannot zero its counters, so the pair runs
# twice under `valgrind --tool=dhat`, once with WARMUP requests and once with
# WARMUP+N, each stopped with SIGTERM; (second total - first total) / N is the
# per-request figure (start-up and shutdown cancel out).
#
# Knobs: N [2000], WARMUP [300], TOL [3] (percent, --check), CRANK_PROXY,
# CRANKCTL [target/release/...], NO_POLICY=1 (crank_all without its policy
# section), NO_CACHE=1 (crank_all with the policy decision cache off),
# FRONT_EXTRA / BACK_EXTRA (YAML appended to the configs), BENCH_NO_INSTALL=1
# (do not apt-get valgrind, nginx-light, curl). Outputs go to benches/out/callgrind/<setup>/.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
N=${N:-2000}
WARMUP=${WARMUP:-300}
TOL=${TOL:-3}
CRANK_PROXY=${CRANK_PROXY:-$ROOT/target/release/crank-proxy}
CRANKCTL=${CRANKCTL:-$ROOT/target/release/crankctl}
OUT_ROOT=${OUT:-$ROOT/benches/out/callgrind}
BASELINE=$HERE/callgrind-baseline.txt

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

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }
trap cleanup EXIT

# prepare SETUP: the directory, ports, nginx (upstream and OTLP collector),
# certificates and both configs
prepare() {
    local setup=$1
    OUT=$OUT_ROOT/$setup
    rm -rf "$OUT"; mkdir -p "$OUT"/{certs,nginx/logs}
    P_UP=$(free_port); P_FRONT=$(free_port); P_BACK=$(free_port)
    P_AF=$(free_port); P_AB=$(free_port); P_OTLP=$(free_port)
    cat >"$OUT/nginx/nginx.conf" <<EOF
daemon off; master_process off; worker_processes 1;
pid $OUT/nginx/nginx.pid; error_log $OUT/nginx/logs/error.log;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000; client_max_body_size 64m;
  server { listen 127.0.0.1:$P_UP; location / { return 200 "ok"; } }
  server { listen 127.0.0.1:$P_OTLP; location = /v1/traces { default_type application/x-protobuf; return 200; } } }
EOF
    nginx -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" >"$OUT/nginx/logs/stdout.log" 2>&1 &
    PIDS+=($!)

    "$CRANKCTL" ca init --dir "$OUT/certs" --force >"$OUT/certs.log" 2>&1
    for svc in front back; do
        "$CRANKCTL" cert issue --ca-dir "$OUT/certs" --service "$svc" --tenant bench >>"$OUT/certs.log" 2>&1
    done
    local access=false route="" inbound="" front_x="" back_x=""
    case "$setup" in
        crank) ;;
        crank_all)
            access=true
            # the shipped set with a longer evaluation limit: under valgrind an
            # evaluation is ~50x slower and the first ones pass 50 ms
            cp -r "$ROOT/policies" "$OUT/policies"
            sed -i 's/^timeout: .*/timeout: 10s/' "$OUT/policies/policy.yaml"
            grep -q '^timeout: 10s' "$OUT/policies/policy.yaml" || die "no top-level timeout: in $ROOT/policies/policy.yaml"
            # NO_CACHE=1: a module that calls time.now_ns turns the decision
            # cache off (docs/reference/policy.md); its rule is never evaluated
            [[ -z "${NO_CACHE:-}" ]] || printf 'package crank.bench_no_cache\nnow := time.now_ns()\n' >"$OUT/policies/no_cache.rego"
            local quotas="quotas:
  limits:
    - {tenant: '*', capability: '*', rate: 100000000/s, direction: both}"
            local limit="{max_concurrent: 10000, max_queue: 100}"
            local trace="tracing:
  sampling: 0.01
  scheduled_delay: 1s
  otlp: {endpoint: \"http://127.0.0.1:$P_OTLP/v1/traces\"}"
            route="
    timeout: 30s
    retry: {attempts: 2}
    circuit: {consecutive_failures: 5}
    concurrency: $limit"
            inbound=", concurrency: $limit, idempotency: {enabled: true}"
            front_x="$quotas
$trace"
            back_x="$quotas
$trace"
            # NO_POLICY=1: the same pair without the policy section, so that
            # the difference is the policy's cost (issue #19)
            [[ -n "${NO_POLICY:-}" ]] || back_x="$back_x
policy:
  inbound: {dir: $OUT/policies}
  decision_log: {path: $OUT/decisions.log}"
            ;;
        *) die "unknown setup '$setup': use crank or crank_all" ;;
    esac
    local C=$OUT/certs
    cat >"$OUT/front.yaml" <<EOF
identity: {cert: $C/front.bench.crt, key: $C/front.bench.key, trust_bundle: $C/bundle.pem}
outbound: {ports: [{listen: 127.0.0.1:$P_FRONT, route: back}]}
routes:
  - name: back
    endpoints: [{address: 127.0.0.1:$P_BACK, identity: back.bench.crank.local}]$route
admin: {listen: 127.0.0.1:$P_AF}
threads: 1
access_log: $access
drain: {deadline: 1s}
$front_x
${FRONT_EXTRA:-}
EOF
    cat >"$OUT/back.yaml" <<EOF
identity: {cert: $C/back.bench.crt, key: $C/back.bench.key, trust_bundle: $C/bundle.pem}
inbound: {listen: 127.0.0.1:$P_BACK, app: 127.0.0.1:$P_UP, app_protocol: http1$inbound}
admin: {listen: 127.0.0.1:$P_AB}
threads: 1
access_log: $access
drain: {deadline: 1s}
$back_x
${BACK_EXTRA:-}
EOF
    local f
    for f in front back; do
        "$CRANK_PROXY" --config "$OUT/$f.yaml" --check >"$OUT/$f.check.txt" 2>&1 \
            || die "crank-proxy --check $OUT/$f.yaml: $(tail -3 "$OUT/$f.check.txt")"
    done
}

# start_pair TOOL [TAG]: both sidecars under valgrind --tool=TOOL, wait until ready
start_pair() {
    local tool=$1 tag=${2:-$1} name opt
    for name in back front; do
        case "$tool" in
            # names in every dump file, so that callgrind_annotate can read the
            # per-request dump (.cg.1) alone
            callgrind) opt=(--tool=callgrind --compress-strings=no --callgrind-out-file="$OUT/$name.cg") ;;
            dhat) opt=(--tool=dhat --dhat-out-file="$OUT/$name.$tag.dhat.json") ;;
        esac
        # CRANK_TRIM_TEXT=0: the one-time unmapping of start-up pages
        # (proxy/src/app/trim.rs) would fall among the measured requests
        # under valgrind's slowness; it is not per-request work
        CRANK_TRIM_TEXT=0 valgrind "${opt[@]}" "$CRANK_PROXY" --config "$OUT/$name.yaml" >"$OUT/$name.$tag.log" 2>&1 &
        PIDS+=($!)
        eval "PID_$name=$!"
    done
    local a
    for a in $P_AB $P_AF; do
        for _ in $(seq 600); do
            curl -sf -m 2 "http://127.0.0.1:$a/ready" >/dev/null 2>&1 && break
            sleep 0.2
        done
        curl -sf -m 2 "http://127.0.0.1:$a/ready" >/dev/null || die "sidecar admin :$a not ready (see $OUT/*.$tag.log)"
    done
}

# stop_pair: SIGTERM to both sidecars (front first), wait for valgrind to write its output
stop_pair() {
    local p
    for p in "$PID_front" "$PID_back"; do
        kill -TERM "$p" 2>/dev/null || true
        for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$p" 2>/dev/null && die "sidecar $p did not stop within 30 s of SIGTERM"
    done
    return 0
}

load() { # count
    (( $1 > 0 )) || return 0
    local codes
    codes=$(curl -s -o /dev/null -w '%{http_code}\n' "http://127.0.0.1:$P_FRONT/bench?[1-$1]" | sort | uniq -c)
    [[ "$codes" =~ ^[[:space:]]*$1\ 200$ ]] || die "not every request got 200: $codes"
}

ir() { # name: the Ir of the dump taken after zeroing
    local f
    f=$(ls "$OUT/$1.cg".* 2>/dev/null | tail -1)
    [[ -n "$f" ]] || die "no callgrind dump for $1"
    awk '/^(summary|totals):/ {print $2; exit}' "$f"
}

# measure_ir SETUP: prints "SETUP front back pair" (Ir per request)
measure_ir() {
    trap cleanup EXIT # also in the $(...) subshells of --check
    prepare "$1"
    start_pair callgrind
    load "$WARMUP"
    callgrind_control -z "$PID_front" >/dev/null 2>&1
    callgrind_control -z "$PID_back" >/dev/null 2>&1
    load "$N"
    callgrind_control -d "$PID_front" >/dev/null 2>&1
    callgrind_control -d "$PID_back" >/dev/null 2>&1
    local front back
    front=$(ir front); back=$(ir back)
    cleanup
    echo "$1 $((front / N)) $((back / N)) $(((front + back) / N))"
}

dhat_totals() { # file -> "blocks bytes" allocated over the whole run
    python3 - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(sum(p["tbk"] for p in d["pps"]), sum(p["tb"] for p in d["pps"]))
PY
}

# measure_allocs SETUP: prints "SETUP front-allocs back-allocs pair-allocs front-bytes back-bytes pair-bytes" per request
measure_allocs() {
    trap cleanup EXIT
    prepare "$1"
    local run name
    for run in w n; do
        start_pair dhat "$run"
        load "$WARMUP"
        [[ $run == n ]] && load "$N"
        stop_pair
        for name in front back; do
            [[ -s "$OUT/$name.$run.dhat.json" ]] || die "no dhat output for $name ($run); see $OUT/$name.$run.log"
        done
    done
    local fw fn bw bn
    fw=$(dhat_totals "$OUT/front.w.dhat.json"); fn=$(dhat_totals "$OUT/front.n.dhat.json")
    bw=$(dhat_totals "$OUT/back.w.dhat.json"); bn=$(dhat_totals "$OUT/back.n.dhat.json")
    cleanup
    awk -v s="$1" -v n="$N" -v fw="$fw" -v fn="$fn" -v bw="$bw" -v bn="$bn" 'BEGIN {
        split(fw, a, " "); split(fn, b, " "); split(bw, c, " "); split(bn, d, " ")
        fa = (b[1] - a[1]) / n; ba = (d[1] - c[1]) / n; fb = (b[2] - a[2]) / n; bb = (d[2] - c[2]) / n
        printf "%s %.1f %.1f %.1f %.0f %.0f %.0f\n", s, fa, ba, fa + ba, fb, bb, fb + bb }'
}

ir_table() { # lines "setup front back pair" on stdin
    printf '| setup | binary | front Ir/req | back Ir/req | pair Ir/req |\n|---|---|---:|---:|---:|\n'
    while read -r s f b p; do printf '| %s | %s | %d | %d | %d |\n' "$s" "$CRANK_PROXY" "$f" "$b" "$p"; done
}

# check: measure both setups, compare the pair (and each sidecar) with the baseline
check() {
    [[ -s "$BASELINE" ]] || die "$BASELINE is missing: bash benches/callgrind.sh --write-baseline"
    local s f b p bf bb bp fail=0 res
    res=$(measure_ir crank; measure_ir crank_all)
    printf '| setup | sidecar | baseline Ir/req | now Ir/req | change | verdict (tolerance %s%%) |\n|---|---|---:|---:|---:|---|\n' "$TOL"
    while read -r s f b p; do
        read -r bf bb bp < <(awk -v s="$s" '$1 == s { print $2, $3, $4 }' "$BASELINE")
        [[ -n "${bp:-}" ]] || { echo "| $s | - | none | $p | - | no baseline for $s |"; fail=1; continue; }
        local side now base v
        for side in front back pair; do
            case $side in front) now=$f base=$bf ;; back) now=$b base=$bb ;; pair) now=$p base=$bp ;; esac
            v=$(awk -v n="$now" -v b="$base" -v t="$TOL" 'BEGIN { c = (n - b) * 100 / b
                printf "%+.2f%% %s", c, (c > t ? "REGRESSION" : (c < -t ? "faster: update the baseline" : "ok")) }')
            echo "| $s | $side | $base | $now | ${v%% *} | ${v#* } |"
            [[ "$v" == *REGRESSION* ]] && fail=1
        done
    done <<<"$res"
    link_order_note
    (( fail == 0 )) || { echo "callgrind.sh --check: instructions per request grew by more than $TOL% (see above)" >&2; return 1; }
}

# link_order_note: how much of proxy/link-order.txt the binary still has.
# A stale list does not change instructions, only RSS (2-3 MiB per
# everything-on sidecar under load when about 1 name in 8 had gone), so it
# is a note, not a failure.
link_order_note() {
    local list=$ROOT/proxy/link-order.txt total found
    [[ -s "$list" ]] && command -v nm >/dev/null || return 0
    total=$(grep -v '^#' "$list" | sort -u | wc -l)
    found=$(nm "$CRANK_PROXY" 2>/dev/null | awk '{ print $NF }' | sort -u \
        | comm -12 - <(grep -v '^#' "$list" | sort -u) | wc -l)
    echo "link order: $found of $total names of proxy/link-order.txt are in $CRANK_PROXY"
    if (( total > 0 && found * 100 < total * 95 )); then
        echo "link order: under 95 %: regenerate it (bash benches/link-order.sh) and rebuild; a stale list costs RSS (docs/benchmarks.md)"
    fi
}

case "${1:-crank}" in
    --check) check ;;
    --write-baseline)
        res=$(measure_ir crank; measure_ir crank_all)
        {
            echo "# setup front-Ir/req back-Ir/req pair-Ir/req; written by bash benches/callgrind.sh --write-baseline"
            echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) git $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo none), N=$N WARMUP=$WARMUP, valgrind $(valgrind --version | sed 's/valgrind-//'), $(nproc) CPUs $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
            echo "$res"
        } >"$BASELINE"
        cat "$BASELINE" ;;
    --allocs)
        printf '| setup | front allocs/req | back allocs/req | pair allocs/req | front bytes/req | back bytes/req | pair bytes/req |\n|---|---:|---:|---:|---:|---:|---:|\n'
        measure_allocs "${2:-crank}" | while read -r s a b c d e f; do printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$s" "$a" "$b" "$c" "$d" "$e" "$f"; done ;;
    crank | crank_all) measure_ir "$1" | ir_table ;;
    *) die "unknown argument '$1': use crank, crank_all, --allocs [SETUP], --check or --write-baseline" ;;
esac
