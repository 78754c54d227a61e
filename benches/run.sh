#!/usr/bin/env bash
# Side-by-side benchmark: the same load through four setups on this machine.
#
#   direct        load -> upstream
#   crank pair    load -> crank outbound -> mTLS (TLS 1.3, h2 via ALPN) -> crank inbound -> upstream
#   haproxy pair  load -> haproxy front  -> mTLS (TLS 1.3, h2 via ALPN) -> haproxy back  -> upstream
#   nginx pair    load -> nginx front    -> mTLS (TLS 1.3, HTTP/1.1)    -> nginx back    -> upstream
#
# Tracing overhead (SETUPS="crank crank_trace1 crank_trace100" ROUNDS=5):
#   crank_trace1    the crank pair with `tracing:` on both sidecars, root sampling 0.01
#   crank_trace100  the same, sampling 1.0
#   crank_trace0    the same, sampling 0.0 (optional: trace context propagated, nothing exported)
# Spans go over OTLP/HTTP protobuf to a private nginx "collector" that answers
# POST /v1/traces with 200 and an empty body (a valid empty
# ExportTraceServiceResponse). ROUNDS repeats the setups interleaved.
# Knobs for it: ROUNDS [1], ROTATE [1] (round r starts at the r-th setup),
# TRACE_QUEUE [4096], TRACE_BATCH [512], TRACE_DELAY [1s] (the tracing section),
# OTLP_CPUS [= LOAD_CPUS] (the collector's CPU), SNAPSHOT_BINS [1] (run a copy
# of crank-proxy taken at start). Extra outputs: spans.tsv, raw/*.spans.txt,
# conf/otlp/logs/access.log, and a "Tracing overhead" section in results.md.
#
# Resilience overhead (SETUPS="crank crank_resilience" ROUNDS=5):
#   crank_resilience  the crank pair with every resilience knob set, none of them tripping:
#                     quotas on both sidecars (one limit, tenant "*", capability "*",
#                     100000000/s, direction both: every request takes a token);
#                     inbound concurrency 10000 with a queue of 100, idempotency
#                     (on by default; it acts only on POST/PATCH with Idempotency-Key,
#                     so wrk's GETs never use it); on the route timeout 30s, retry
#                     attempts 2 and circuit consecutive_failures 5 (both also the
#                     defaults), concurrency 10000 with a queue of 100, and faults at
#                     0% (delay and abort are drawn for every request, never fire)
#   crank_res_quotas  only the quotas section (optional, to attribute the cost)
#   crank_res_limits  only the two concurrency limits, route and inbound (optional)
#   crank_res_route   only the route's timeout and 0% faults (optional)
#
# Every feature on (SETUPS="crank crank_all haproxy nginx" ROUNDS=5):
#   crank_all   crank_policy + crank_trace1 + crank_resilience (without the 0%
#               faults) + the access log on, in one pair; see setup_crank_all.
# Every run with haproxy prints a "Pair CPU per request" section (× haproxy).
# Plain `crank` is "off" (it still has the default retries and circuit breaking).
# Extra outputs: resilience.tsv, raw/<setup>[.r<N>].{front,back}.end-metrics.txt (both
# sidecars' /metrics after the oha run), and a "Resilience overhead" section in
# results.md with the resilience counters (429, shed, timeouts, faults, retries,
# ejections) that fired. Hooks, as CRANK_FRONT_EXTRA / CRANK_BACK_EXTRA add top-level
# YAML: CRANK_ROUTE_EXTRA (YAML lines added to the front's route; the script indents
# them) and CRANK_INBOUND_EXTRA (flow-style fields appended inside `inbound: {...}`).
#
# Worker shim overhead (SETUPS="direct shim_serve nginx_hop" ROUNDS=3):
#   shim_serve  load -> crank-shim (serve mode: hyper HTTP/1.1+h2c server -> pooled
#               hyper-util HTTP/1.1 client) -> a second upstream nginx, started and
#               supervised by the shim as its worker (`command`, `daemon off;`, own port,
#               pid and logs under conf/shim.worker/, health_path /healthz)
#   nginx_hop   load -> one nginx reverse proxy (plain HTTP/1.1, keepalive pool of 64) -> upstream
# Both are one plain-HTTP hop, no TLS. CRANK_SHIM [target/release/crank-shim] is
# copied at start like crank-proxy. Extra output: a "Worker shim (serve mode)
# overhead" section in results.md (hop CPU µs/req: the shim's or the hop nginx's
# own utime+stime, not the worker's; ratios against nginx_hop of the same round).
#
# Upstream is a private nginx instance answering `return 200 "ok"`.
# Prints a markdown table and writes benches/out/results.md plus raw outputs
# under benches/out/ (gitignored). See benches/README.md for the knobs.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

OUT=${OUT:-$HERE/out}
BASE=${BENCH_PORT_BASE:-19000}
SETUPS=${SETUPS:-"direct crank crank_policy haproxy nginx"}
CONNS=${CONNS:-16}
DUR=${DUR:-10s}
WARMUP=${WARMUP:-2s}
RATE=${RATE:-2000}
LAT_DUR=${LAT_DUR:-10s}
HAPROXY_ALPN=${HAPROXY_ALPN:-h2}          # h2 or http/1.1 on the haproxy sidecar hop
CERTS_FROM=${CERTS_FROM:-crankctl}         # crankctl; "openssl" is a development fallback only
CRANK_PROXY=${CRANK_PROXY:-$ROOT/target/release/crank-proxy}
CRANKCTL=${CRANKCTL:-$ROOT/target/release/crankctl}
CRANK_SHIM=${CRANK_SHIM:-$ROOT/target/release/crank-shim}
CRANK_THREADS=${CRANK_THREADS:-1}
CRANK_ACCESS_LOG=${CRANK_ACCESS_LOG:-false}  # the peers log nothing per request either
ROUNDS=${ROUNDS:-1}                        # repeat SETUPS this many times, interleaved
ROTATE=${ROTATE:-1}                        # with ROUNDS > 1: round r starts at the r-th setup (drift hits every setup alike)
TRACE_QUEUE=${TRACE_QUEUE:-4096}           # tracing.max_queue_size in the crank_trace* setups
TRACE_BATCH=${TRACE_BATCH:-512}            # tracing.max_export_batch_size
TRACE_DELAY=${TRACE_DELAY:-1s}             # tracing.scheduled_delay
SNAPSHOT_BINS=${SNAPSHOT_BINS:-1}          # copy crank-proxy (and crank-shim) once at start: a concurrent cargo build cannot swap it mid-run

NPROC=$(nproc)
if [[ -z "${LOAD_CPUS+x}" || -z "${SERVER_CPUS+x}" ]]; then
    if (( NPROC >= 2 )); then LOAD_CPUS=${LOAD_CPUS:-0}; SERVER_CPUS=${SERVER_CPUS:-1}
    else LOAD_CPUS=${LOAD_CPUS:-}; SERVER_CPUS=${SERVER_CPUS:-}; fi
fi
[[ "${PIN:-1}" == 0 ]] && { LOAD_CPUS=; SERVER_CPUS=; }
LOAD_PIN=(); SERVER_PIN=()
[[ -n "$LOAD_CPUS" ]] && LOAD_PIN=(taskset -c "$LOAD_CPUS")
[[ -n "$SERVER_CPUS" ]] && SERVER_PIN=(taskset -c "$SERVER_CPUS")
# The OTLP collector stands for a remote service: by default it shares the load
# generator's CPU, so the pair's CPU carries only the sidecars' own export cost.
OTLP_CPUS=${OTLP_CPUS-$LOAD_CPUS}
OTLP_PIN=()
[[ -n "$OTLP_CPUS" ]] && OTLP_PIN=(taskset -c "$OTLP_CPUS")

P_UP=$BASE
P_CRANK_FRONT=$((BASE + 10)); P_CRANK_BACK=$((BASE + 11))
P_CRANK_ADMIN_FRONT=$((BASE + 12)); P_CRANK_ADMIN_BACK=$((BASE + 13))
P_HAP_FRONT=$((BASE + 20)); P_HAP_BACK=$((BASE + 21))
P_NGX_FRONT=$((BASE + 30)); P_NGX_BACK=$((BASE + 31))
P_OTLP=$((BASE + 40))
P_SHIM=$((BASE + 50)); P_SHIM_ADMIN=$((BASE + 51)); P_SHIM_WORKER=$((BASE + 52))
P_NGX_HOP=$((BASE + 60))
BACK_NAME=back.bench.crank.local

CERTS=$OUT/certs
RAW=$OUT/raw
CONF=$OUT/conf
SUMMARY=$OUT/summary.tsv
SPANS=$OUT/spans.tsv
NOTES=$OUT/notes.txt
ROUND=1
TRACE_RUN=0; [[ " $SETUPS " == *" crank_trace"* ]] && TRACE_RUN=1
RES_RUN=0; [[ " $SETUPS " == *" crank_res"* ]] && RES_RUN=1
SHIM_RUN=0; [[ " $SETUPS " == *" shim_serve "* ]] && SHIM_RUN=1
RESIL=$OUT/resilience.tsv

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- processes
PIDS=()
SAMPLER_PID=
cleanup() {
    local pid
    [[ -n "$SAMPLER_PID" ]] && kill "$SAMPLER_PID" 2>/dev/null
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    PIDS=()
    declare -F reap_shim_worker >/dev/null && reap_shim_worker
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# start_bg LOGFILE CMD... ; sets LAST_PID (the server process itself: taskset execs).
start_bg() {
    local logf=$1; shift
    "${SERVER_PIN[@]}" "$@" >"$logf" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# stop_pids PID... : stop the given processes and forget them.
stop_pids() {
    local pid keep=() p
    for pid in "$@"; do kill "$pid" 2>/dev/null; done
    for pid in "$@"; do
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    done
    for p in "${PIDS[@]}"; do [[ " $* " == *" $p "* ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

wait_port() { # PORT PID
    for _ in $(seq 100); do
        port_busy "$1" && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# wait_ok URL : the setup answers "ok" end to end.
wait_ok() {
    local body end=$((SECONDS + 10))
    while (( SECONDS < end )); do
        body=$(curl -s -m 1 "$1" 2>/dev/null) && [[ "$body" == ok* ]] && return 0
        sleep 0.2
    done
    return 1
}

secs() { # 10s / 2m / 10 -> seconds
    local v=$1
    case "$v" in
        *ms) echo 1 ;;
        *s) echo "${v%s}" ;;
        *m) echo $(( ${v%m} * 60 )) ;;
        *) echo "$v" ;;
    esac
}

# ---------------------------------------------------------------- RSS
kib_of() { # PID FIELD -> KiB, or empty
    local k v _
    while read -r k v _; do
        [[ "$k" == "$2:" ]] && { echo "$v"; return; }
    done <"/proc/$1/status" 2>/dev/null
}

# sampler PID... : appends "pid rss_kib" lines to $RSS_SAMPLES every 0.2 s.
rss_sampler() {
    local pid v
    while :; do
        for pid in "$@"; do
            v=$(kib_of "$pid" VmRSS); [[ -n "$v" ]] && echo "$pid $v"
        done
        sleep 0.2
    done >>"$RSS_SAMPLES"
}

# PID -> RSS under load: max of the VmRSS samples taken during the wrk run,
# in KiB (VmHWM when there is no sample). VmHWM itself, the peak since the
# process started (start-up included), goes to raw/<tag>.rss.txt.
# thread_switches PID... -> "pid/tid comm voluntary nonvoluntary" per thread
thread_switches() {
    local pid t
    for pid in "$@"; do
        for t in /proc/"$pid"/task/*; do
            [[ -r "$t/status" ]] || continue
            awk -v id="$pid/${t##*/}" '/^Name:/ { n = $2 } /^voluntary_ctxt_switches:/ { v = $2 }
                /^nonvoluntary_ctxt_switches:/ { nv = $2 } END { print id, n, v, nv }' "$t/status"
        done
    done
}

# switches_delta BEFORE AFTER REQUESTS -> per thread: switches during the run
# and per 1,000 requests, busiest first
switches_delta() {
    awk -v n="$3" 'NR == FNR { v[$1] = $3; nv[$1] = $4; next }
        { d = $3 - v[$1]; dn = $4 - nv[$1]; if (d + dn > 0)
            printf "%s %s voluntary=%d nonvoluntary=%d per_1000_requests=%.1f\n", $1, $2, d, dn, (d + dn) * 1000 / n }' \
        <(echo "$1") <(echo "$2") | sort -t= -k4 -rn
}

peak_kib() {
    local sampled
    sampled=$(awk -v p="$1" '$1 == p && $2 > m { m = $2 } END { print m + 0 }' "$RSS_SAMPLES" 2>/dev/null)
    if [[ "${sampled:-0}" -gt 0 ]]; then echo "$sampled"; else kib_of "$1" VmHWM; fi
}

fmt_ms() { awk -v v="$1" 'BEGIN { if (v == "" || v == "-") print "-"; else printf "%.3f", v }'; }

mib() { awk -v k="$1" 'BEGIN { if (k == "" || k == 0) print "-"; else printf "%.1f", k / 1024 }'; }

# ---------------------------------------------------------------- setup
# Installs what the run needs when it is missing: Debian packages (wrk,
# haproxy, nginx, jq, curl), oha from crates.io, and the release binaries.
# BENCH_NO_INSTALL=1 skips this.
install_missing() {
    [[ "${BENCH_NO_INSTALL:-0}" == 1 ]] && return 0
    local missing=() sudo=()
    for pair in wrk:wrk haproxy:haproxy nginx:nginx-light jq:jq curl:curl; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    [[ "$(id -u)" -eq 0 ]] || sudo=(sudo)
    if [[ ${#missing[@]} -gt 0 ]]; then
        log "installing ${missing[*]} (apt-get)"
        "${sudo[@]}" apt-get update -qq
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if ! command -v oha >/dev/null && [[ ! -x "$HOME/.cargo/bin/oha" ]]; then
        log "installing oha (cargo install oha --locked; a few minutes)"
        cargo install oha --locked >"$OUT/oha-install.log" 2>&1 || log "oha install failed; latency falls back to wrk (see $OUT/oha-install.log)"
    fi
    if [[ ! -x "$CRANK_PROXY" || ! -x "$CRANKCTL" ]]; then
        log "building release binaries (cargo build --release -p crank-proxy -p crank-control)"
        (cd "$ROOT" && cargo build --release -p crank-proxy -p crank-control)
    fi
    if (( SHIM_RUN )) && [[ ! -x "$CRANK_SHIM" ]]; then
        log "building crank-shim (cargo build --release -p crank-shim)"
        (cd "$ROOT" && cargo build --release -p crank-shim)
    fi
}
mkdir -p "$OUT"
install_missing

# ---------------------------------------------------------------- load tools
OHA=$(command -v oha || true)
[[ -z "$OHA" && -x "$HOME/.cargo/bin/oha" ]] && OHA=$HOME/.cargo/bin/oha
OHA_JSON_FLAG=()
if [[ -n "$OHA" ]]; then
    OHA_HELP=$("$OHA" --help 2>&1)
    if grep -q -- '--output-format' <<<"$OHA_HELP"; then OHA_JSON_FLAG=(--output-format json)
    elif grep -q -- '--json' <<<"$OHA_HELP"; then OHA_JSON_FLAG=(--json)
    fi
    grep -q -- '--latency-correction' <<<"$OHA_HELP" || { log "oha lacks --latency-correction; not using it"; OHA=; }
    [[ ${#OHA_JSON_FLAG[@]} -eq 0 ]] && { log "oha has no JSON output flag; not using it"; OHA=; }
    command -v jq >/dev/null || { log "jq missing; not using oha"; OHA=; }
fi

# measure NAME URL FRONT_PID BACK_PID  -> appends a row to $SUMMARY
measure() {
    local name=$1 url=$2 fpid=${3:-} bpid=${4:-}
    local tag=$name; (( ROUNDS > 1 )) && tag=$name.r$ROUND
    local pids=() wrkf=$RAW/$tag.wrk.txt
    # crank setups of a tracing run: span counters are read after each phase,
    # once the exporter's scheduled delay has passed (every crank setup alike)
    local spans=0 settle=0
    if (( TRACE_RUN )) && [[ "$name" == crank* ]]; then
        spans=1; settle=$(( $(secs "$TRACE_DELAY") + 1 ))
    fi
    [[ -n "$fpid" ]] && pids+=("$fpid")
    [[ -n "$bpid" ]] && pids+=("$bpid")
    local tmo=$(( $(secs "$DUR") + 30 ))

    log "$name: warm-up $WARMUP"
    timeout 60 "${LOAD_PIN[@]}" wrk -t1 -c"$CONNS" -d"$WARMUP" "$url" >"$RAW/$tag.warmup.txt" 2>&1 &
    local wpid=$!
    sleep "$(awk -v w="$(secs "$WARMUP")" 'BEGIN { print (w > 1 ? w / 2 : 0.5) }')"
    observe_hop "$name" "$tag"
    wait "$wpid"
    local s0f="" s0b="" s1f="" s1b="" c0=0 c1=0
    if (( spans )); then
        sleep "$settle"
        s0f=$(span_counts "$P_CRANK_ADMIN_FRONT"); s0b=$(span_counts "$P_CRANK_ADMIN_BACK"); c0=$(collector_lines)
    fi

    RSS_SAMPLES=$RAW/$tag.rss-samples.txt; : >"$RSS_SAMPLES"
    local p idle=""
    for p in "${pids[@]}"; do idle+="$p VmRSS=$(kib_of "$p" VmRSS)kB threads=$(kib_of "$p" Threads); "; done
    if (( ${#pids[@]} )); then
        rss_sampler "${pids[@]}" &
        SAMPLER_PID=$!
    fi

    local busy t0 t1
    busy="rustc=$(pgrep -c -x rustc 2>/dev/null || true) load1=$(cut -d' ' -f1 /proc/loadavg)"
    t0=$(cpu_ticks "${pids[@]}")
    log "$name: wrk -t1 -c$CONNS -d$DUR"
    timeout "$tmo" "${LOAD_PIN[@]}" wrk -t1 -c"$CONNS" -d"$DUR" --latency "$url" >"$wrkf" 2>&1
    t1=$(cpu_ticks "${pids[@]}")
    busy+=" / rustc=$(pgrep -c -x rustc 2>/dev/null || true) load1=$(cut -d' ' -f1 /proc/loadavg)"
    if (( spans )); then
        sleep "$settle"
        s1f=$(span_counts "$P_CRANK_ADMIN_FRONT"); s1b=$(span_counts "$P_CRANK_ADMIN_BACK"); c1=$(collector_lines)
    fi

    local rf="" rb=""
    if [[ -n "$SAMPLER_PID" ]]; then
        kill "$SAMPLER_PID" 2>/dev/null; wait "$SAMPLER_PID" 2>/dev/null; SAMPLER_PID=
        [[ -n "$fpid" ]] && rf=$(peak_kib "$fpid")
        [[ -n "$bpid" ]] && rb=$(peak_kib "$bpid")
        {
            echo "after the warm-up, before wrk: $idle"
            echo "under load (max of VmRSS samples during wrk): front=${rf}kB back=${rb}kB"
            echo "VmHWM (peak since start, start-up included): front=$(kib_of "$fpid" VmHWM)kB back=$(kib_of "$bpid" VmHWM)kB"
            # the split after wrk: heap and stacks (anon) against mapped binary and libraries (file)
            local p
            for p in $fpid $bpid; do
                echo "after wrk: $p RssAnon=$(kib_of "$p" RssAnon)kB RssFile=$(kib_of "$p" RssFile)kB"
            done
        } >"$RAW/$tag.rss.txt"
        # which mappings hold the resident pages (when a reading is high,
        # the file pages say whether it is the binary's code or data)
        if [[ -n "$fpid" ]]; then cat "/proc/$fpid/smaps" >"$RAW/$tag.front.smaps.txt" 2>/dev/null || true; fi
        if [[ -n "$bpid" ]]; then cat "/proc/$bpid/smaps" >"$RAW/$tag.back.smaps.txt" 2>/dev/null || true; fi
    fi

    local rps wrk_errs non2xx sock wrk_p50 wrk_p99 nreq cpu_us=""
    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$wrkf")
    nreq=$(awk '/ requests in / { print $1; exit }' "$wrkf")
    # CPU of both sidecars (all threads, the OTLP exporter's included) per request of the wrk run
    if [[ -n "$t0" && -n "$t1" && "${nreq:-0}" -gt 0 ]]; then
        cpu_us=$(awk -v a="$t0" -v b="$t1" -v n="$nreq" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", (b - a) / hz * 1e6 / n }')
    fi
    non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$wrkf")
    sock=$(awk '/Socket errors:/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$wrkf")
    wrk_errs=$(( ${non2xx:-0} + ${sock:-0} ))
    wrk_p50=$(awk '$1 == "50%" { print $2 }' "$wrkf")
    wrk_p99=$(awk '$1 == "99%" { print $2 }' "$wrkf")
    if [[ -z "$rps" ]]; then
        fail_row "$name" "wrk produced no result: $(tail -2 "$wrkf" | tr '\n' ' ')"
        return
    fi

    local lat_src p50="" p99="" p999="" pmax="" lat_rps="" lat_ok=""
    if [[ -n "$OHA" ]]; then
        lat_src=oha
        local ohaf=$RAW/$tag.oha.json
        log "$name: oha -q $RATE -c$CONNS -z $LAT_DUR --latency-correction"
        local sw0; sw0=$(thread_switches $fpid $bpid)
        timeout $(( $(secs "$LAT_DUR") + 30 )) "${LOAD_PIN[@]}" "$OHA" --no-tui "${OHA_JSON_FLAG[@]}" \
            --latency-correction -q "$RATE" -c "$CONNS" -z "$LAT_DUR" "$url" >"$ohaf" 2>"$RAW/$tag.oha.stderr"
        # where the wake-ups go at the fixed rate: context switches per
        # thread of both sidecars during the oha run
        switches_delta "$sw0" "$(thread_switches $fpid $bpid)" "$(( RATE * $(secs "$LAT_DUR") ))" >"$RAW/$tag.switches.txt"
        if jq -e . "$ohaf" >/dev/null 2>&1; then
            # lat_ok = requests that failed or were not 200 (oha counts any status as success);
            # requests still in flight when -z ends ("aborted due to deadline") are not failures
            read -r p50 p99 p999 pmax lat_rps lat_ok < <(jq -r '
                def ms: if . == null then "-" else (. * 1000 | tostring) end;
                [(.latencyPercentiles.p50 | ms), (.latencyPercentiles.p99 | ms),
                 (.latencyPercentiles["p99.9"] | ms), (.summary.slowest | ms),
                 (.summary.requestsPerSec // 0 | round | tostring),
                 (((.statusCodeDistribution // {}) | to_entries | map(select(.key != "200") | .value) | add // 0)
                  + ((.errorDistribution // {}) | to_entries | map(select(.key != "aborted due to deadline") | .value) | add // 0) | tostring)] | @tsv' "$ohaf")
            if [[ "$lat_rps" =~ ^[0-9]+$ ]] && (( lat_rps < RATE * 95 / 100 )); then
                echo "$name: oha reached only $lat_rps of $RATE req/s; its latency is at that rate's saturation" >>"$NOTES"
            fi
        else
            log "$name: oha output unreadable (see $RAW/$tag.oha.stderr)"
        fi
    else
        lat_src="wrk-c$CONNS"
        p50=$(to_ms "$wrk_p50"); p99=$(to_ms "$wrk_p99")
        p999=-; pmax=$(awk '$1 == "Latency" { print $4; exit }' "$wrkf"); pmax=$(to_ms "$pmax")
    fi

    if (( spans )); then
        sleep "$settle"
        local s2f s2b c2
        s2f=$(span_counts "$P_CRANK_ADMIN_FRONT"); s2b=$(span_counts "$P_CRANK_ADMIN_BACK"); c2=$(collector_lines)
        {
            echo "counters: exported dropped{queue_full} dropped{export_failed}"
            echo "after warm-up: front $s0f; back $s0b; collector log lines $c0"
            echo "after wrk:     front $s1f; back $s1b; collector log lines $c1"
            echo "after oha:     front $s2f; back $s2b; collector log lines $c2"
        } >"$RAW/$tag.spans.txt"
        local post200 bytes other
        read -r post200 bytes other < <(collector_delta "$c0" "$c1")
        # spans.tsv: tag setup round wrk-requests | wrk run: exported front back, dropped front back |
        # whole run (warm-up, wrk, oha): exported front back, dropped front back | collector POSTs bytes other (wrk run)
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$tag" "$name" "$ROUND" "${nreq:-0}" \
            "$(span_delta "$s0f" "$s1f" 1)" "$(span_delta "$s0b" "$s1b" 1)" \
            "$(span_delta "$s0f" "$s1f" 2)" "$(span_delta "$s0b" "$s1b" 2)" \
            "$(span_delta "" "$s2f" 1)" "$(span_delta "" "$s2b" 1)" \
            "$(span_delta "" "$s2f" 2)" "$(span_delta "" "$s2b" 2)" \
            "$post200" "$bytes" "$other" >>"$SPANS"
        log "$name: spans in the wrk run ($nreq requests): exported front $(span_delta "$s0f" "$s1f" 1) back $(span_delta "$s0b" "$s1b" 1), dropped front $(span_delta "$s0f" "$s1f" 2) back $(span_delta "$s0b" "$s1b" 2); collector got $post200 POSTs, $bytes bytes"
    fi

    # crank setups of a resilience run: both sidecars' counters once everything
    # (warm-up, wrk, oha) is done, to show what the layer decided
    if (( RES_RUN )) && [[ "$name" == crank* ]]; then
        local rcf rcb
        curl -s -m 2 "http://127.0.0.1:$P_CRANK_ADMIN_FRONT/metrics" >"$RAW/$tag.front.end-metrics.txt" 2>&1
        curl -s -m 2 "http://127.0.0.1:$P_CRANK_ADMIN_BACK/metrics" >"$RAW/$tag.back.end-metrics.txt" 2>&1
        rcf=$(res_counts "$RAW/$tag.front.end-metrics.txt"); rcb=$(res_counts "$RAW/$tag.back.end-metrics.txt")
        printf '%s\t%s\t%s\t%s\t%s\n' "$tag" "$name" "$ROUND" "$rcf" "$rcb" >>"$RESIL"
        log "$name: counters front $rcf, back $rcb (requests,4xx+5xx,no-response,429,shed,timeouts,faults,retries,budget-exhausted,ejections,replays,proxy-errors)"
    fi

    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$name" "${rps:-0}" "$wrk_errs" "$lat_src" "${p50:--}" "${p99:--}" "${p999:--}" "${pmax:--}" \
        "${lat_rps:--}" "${lat_ok:--}" "${rf:-}" "${rb:-}" "$ROUND" "${cpu_us:--}" "$busy" >>"$SUMMARY"
    log "$name: ${rps:-?} req/s (errors $wrk_errs), latency p50 ${p50:-?} ms p99 ${p99:-?} ms, RSS front ${rf:--} kB back ${rb:--} kB, pair CPU ${cpu_us:-?} µs/req ($busy)"
}

to_ms() { # wrk duration (123.45us / 1.23ms / 1.02s) -> ms
    awk -v v="$1" 'BEGIN {
        if (v == "") { print "-"; exit }
        n = v + 0
        if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n *= 1000
        printf "%.3f", n }'
}

fail_row() { # NAME REASON [FAILED|SKIPPED]
    local what=${3:-FAILED}
    printf '%s\t%s\t-\t-\t-\t-\t-\t-\t-\t-\t\t\t%s\t-\t\n' "$1" "$what" "$ROUND" >>"$SUMMARY"
    echo "$1: $what — $2" >>"$NOTES"
    log "$1: $what — $2"
}

# cpu_ticks PID... -> utime + stime of all of them (all threads), in clock ticks; empty without PIDs
cpu_ticks() {
    (( $# )) || return 0
    local pid total=0 t
    for pid in "$@"; do
        t=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{ print $12 + $13 }')
        [[ -n "$t" ]] || return 0
        total=$(( total + t ))
    done
    echo "$total"
}

# span_counts ADMIN_PORT -> "exported,dropped_queue_full,dropped_export_failed" from crank's /metrics
span_counts() {
    curl -s -m 2 "http://127.0.0.1:$1/metrics" 2>/dev/null | awk '
        /^crank_spans_exported_total / { e = $2 }
        /^crank_spans_dropped_total\{.*reason="queue_full"/ { q = $2 }
        /^crank_spans_dropped_total\{.*reason="export_failed"/ { f = $2 }
        END { printf "%d,%d,%d\n", e, q, f }'
}

# span_delta BEFORE AFTER FIELD -> AFTER - BEFORE for field 1 (exported) or 2 (dropped, both reasons)
span_delta() {
    awk -v a="$1" -v b="$2" -v f="$3" 'BEGIN {
        na = split(a, x, ","); nb = split(b, y, ",")
        if (nb < 3) { print "?"; exit }
        if (na < 3) { x[1] = x[2] = x[3] = 0 }
        if (f == 1) print y[1] - x[1]; else print (y[2] + y[3]) - (x[2] + x[3]) }'
}

# res_counts METRICS_FILE -> "requests,4xx+5xx,no-response,ratelimited,shed,timeouts,faults,
# retries,budget_exhausted,ejections,replays,proxy_errors": crank's counters summed over their
# labels (a labelled counter is absent until it first counts: absent = 0); "?" when unreadable.
# no-response = status_class "error": no response was sent, e.g. the client closed the
# connection with the request in flight, as wrk and oha do when their time is up.
res_counts() {
    grep -q '^crank_' "$1" 2>/dev/null || { echo "?"; return; }
    awk '
        /^crank_requests_total\{/ { n[1] += $NF
            if ($0 ~ /status_class="[45]xx"/) n[2] += $NF; else if ($0 ~ /status_class="error"/) n[3] += $NF }
        /^crank_ratelimited_total\{/ { n[4] += $NF }
        /^crank_shed_total\{/ { n[5] += $NF }
        /^crank_request_timeouts_total\{/ { n[6] += $NF }
        /^crank_faults_injected_total\{/ { n[7] += $NF }
        /^crank_retries_total\{/ { n[8] += $NF }
        /^crank_retry_budget_exhausted_total\{/ { n[9] += $NF }
        /^crank_circuit_ejections_total\{/ { n[10] += $NF }
        /^crank_idempotent_replays_total\{/ { n[11] += $NF }
        /^crank_proxy_errors_total\{/ { n[12] += $NF }
        END { for (i = 1; i <= 12; i++) printf "%s%d", (i > 1 ? "," : ""), n[i]; print "" }' "$1"
}

collector_lines() { if [[ -f "$CONF/otlp/logs/access.log" ]]; then wc -l <"$CONF/otlp/logs/access.log"; else echo 0; fi; }

# collector_delta FROM TO -> "POSTs-answered-200 body-bytes (Content-Length) other-requests" among access-log lines FROM+1..TO
collector_delta() {
    [[ -f "$CONF/otlp/logs/access.log" ]] || { echo "0 0 0"; return; }
    awk -v a="$1" -v b="$2" 'NR > a && NR <= b { if ($2 == 200 && $3 == "POST") { n++; bytes += $4 } else o++ }
        END { printf "%d %d %d\n", n, bytes, o }' "$CONF/otlp/logs/access.log"
}

# ---------------------------------------------------------------- certs
certs_crankctl() {
    [[ -x "$CRANKCTL" ]] || die "$CRANKCTL not found; build it (cargo build --release -p crank-control) or set CRANKCTL"
    "$CRANKCTL" ca init --dir "$CERTS" --force >"$RAW/certs.log" 2>&1 || die "crankctl ca init failed: $(cat "$RAW/certs.log")"
    for svc in front back; do
        "$CRANKCTL" cert issue --ca-dir "$CERTS" --service "$svc" --tenant bench >>"$RAW/certs.log" 2>&1 \
            || die "crankctl cert issue $svc failed: $(cat "$RAW/certs.log")"
    done
}

# Development fallback only: same shape as crankctl's output (P-256, DNS + SPIFFE URI SANs).
certs_openssl() {
    local d=$CERTS svc
    openssl ecparam -name prime256v1 -genkey -noout -out "$d/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$d/ca.key" -days 2 -subj "/O=Crank Mesh/CN=bench root CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:1" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
        -out "$d/ca.crt" 2>/dev/null
    cp "$d/ca.crt" "$d/bundle.pem"
    for svc in front back; do
        openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "$d/$svc.bench.key"
        openssl req -new -key "$d/$svc.bench.key" -subj "/O=bench/CN=$svc.bench.crank.local" -out "$d/$svc.csr" 2>/dev/null
        openssl x509 -req -in "$d/$svc.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 1 \
            -extfile <(printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=digitalSignature,keyEncipherment" \
                "extendedKeyUsage=serverAuth,clientAuth" \
                "subjectAltName=DNS:$svc.bench.crank.local,URI:spiffe://crank.local/tenant/bench/svc/$svc") \
            -out "$d/$svc.bench.crt" 2>/dev/null
    done
}

# ---------------------------------------------------------------- setups
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)

# nginx_conf NAME HTTP_BODY -> writes $CONF/NAME/nginx.conf (one process, daemon off)
nginx_conf() {
    local body=$2 d=$CONF/$1
    mkdir -p "$d/tmp" "$d/logs"
    cat >"$d/nginx.conf" <<EOF
# generated by benches/run.sh
worker_processes 1;
master_process off;   # one process, like the other sidecars (see benches/README.md)
daemon off;
pid $d/nginx.pid;
error_log $d/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $d/tmp/body;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
$body
}
EOF
}

nginx_start() { # NAME HTTP_BODY ; sets LAST_PID
    local name=$1 d=$CONF/$1
    nginx_conf "$@"
    start_bg "$RAW/$name.log" "$NGINX_BIN" -p "$d" -e "$d/logs/error.log" -c "$d/nginx.conf"
}

start_upstream() {
    nginx_start upstream "    server {
        listen 127.0.0.1:$P_UP reuseport backlog=4096;
        location / { default_type text/plain; return 200 \"ok\"; }
    }"
    UP_PID=$LAST_PID
    wait_port "$P_UP" "$UP_PID" || die "upstream nginx did not start: $(cat "$RAW/upstream.log" "$CONF/upstream/logs/error.log" 2>/dev/null)"
}

setup_direct() { FRONT_PID=; BACK_PID=; URL=http://127.0.0.1:$P_UP/; }

setup_crank() {
    [[ -x "$CRANK_PROXY" ]] || { SKIP_REASON="$CRANK_PROXY not built"; SKIPPED=1; return 1; }
    local d=$CONF/crank; mkdir -p "$d"
    # hooks for the route and the inbound map; unset, the files are as they always were
    local route_extra="" inbound_extra=""
    [[ -n "${CRANK_ROUTE_EXTRA:-}" ]] && route_extra=$'\n'$(sed 's/^/    /' <<<"$CRANK_ROUTE_EXTRA")
    [[ -n "${CRANK_INBOUND_EXTRA:-}" ]] && inbound_extra=", $CRANK_INBOUND_EXTRA"
    cat >"$d/front.yaml" <<EOF
# crank outbound sidecar (generated by benches/run.sh)
identity: {cert: $CERTS/front.bench.crt, key: $CERTS/front.bench.key, trust_bundle: $CERTS/bundle.pem}
outbound:
  ports:
    - listen: 127.0.0.1:$P_CRANK_FRONT
      route: back
routes:
  - name: back
    endpoints:
      - address: 127.0.0.1:$P_CRANK_BACK
        identity: $BACK_NAME$route_extra
admin: {listen: 127.0.0.1:$P_CRANK_ADMIN_FRONT}
threads: $CRANK_THREADS
access_log: $CRANK_ACCESS_LOG
drain: {deadline: 1s}
${CRANK_FRONT_EXTRA:-}
EOF
    cat >"$d/back.yaml" <<EOF
# crank inbound sidecar (generated by benches/run.sh)
identity: {cert: $CERTS/back.bench.crt, key: $CERTS/back.bench.key, trust_bundle: $CERTS/bundle.pem}
inbound: {listen: 127.0.0.1:$P_CRANK_BACK, app: 127.0.0.1:$P_UP, app_protocol: http1$inbound_extra}
admin: {listen: 127.0.0.1:$P_CRANK_ADMIN_BACK}
threads: $CRANK_THREADS
access_log: $CRANK_ACCESS_LOG
drain: {deadline: 1s}
${CRANK_BACK_EXTRA:-}
EOF
    local f
    for f in front back; do
        "$CRANK_PROXY" --config "$d/$f.yaml" --check >"$RAW/crank.$f.check.txt" 2>&1 \
            || { SKIP_REASON="crank-proxy --check $f.yaml: $(tail -3 "$RAW/crank.$f.check.txt")"; return 1; }
    done
    start_bg "$RAW/crank.back.log" "$CRANK_PROXY" --config "$d/back.yaml"; BACK_PID=$LAST_PID
    start_bg "$RAW/crank.front.log" "$CRANK_PROXY" --config "$d/front.yaml"; FRONT_PID=$LAST_PID
    local a
    for a in "$P_CRANK_ADMIN_BACK" "$P_CRANK_ADMIN_FRONT"; do
        for _ in $(seq 100); do
            curl -sf -m 1 "http://127.0.0.1:$a/ready" >/dev/null 2>&1 && break
            kill -0 "$FRONT_PID" 2>/dev/null && kill -0 "$BACK_PID" 2>/dev/null || break
            sleep 0.1
        done
        curl -sf -m 1 "http://127.0.0.1:$a/ready" >/dev/null 2>&1 \
            || { SKIP_REASON="crank admin :$a not ready (see $RAW/crank.*.log)"; return 1; }
    done
    URL=http://127.0.0.1:$P_CRANK_FRONT/; HOP_PORT=$P_CRANK_BACK
}

haproxy_check_alpn() {
    # Does this haproxy accept `alpn` on server lines (needs 1.8+ with OpenSSL ALPN)?
    local f=$CONF/haproxy/alpn-check.cfg
    printf 'defaults\n  mode http\n  timeout connect 1s\n  timeout client 1s\n  timeout server 1s\nfrontend f\n  bind 127.0.0.1:1\n  default_backend b\nbackend b\n  server s 127.0.0.1:1 ssl verify none alpn h2\n' >"$f"
    haproxy -c -f "$f" >/dev/null 2>&1
}

setup_haproxy() {
    local d=$CONF/haproxy; mkdir -p "$d"
    cat "$CERTS/front.bench.crt" "$CERTS/front.bench.key" >"$d/front.pem"
    cat "$CERTS/back.bench.crt" "$CERTS/back.bench.key" >"$d/back.pem"
    chmod 600 "$d/front.pem" "$d/back.pem"
    HAP_ALPN_USED=$HAPROXY_ALPN
    if [[ "$HAP_ALPN_USED" == h2 ]] && ! haproxy_check_alpn; then
        HAP_ALPN_USED=http/1.1
        echo "haproxy: this version rejects 'alpn h2' on server lines; the sidecar hop uses HTTP/1.1" >>"$NOTES"
    fi
    local common="global
    nbthread 1
    maxconn 4096
    stats socket $d/%s.sock mode 600 level admin
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    http-reuse always
    option http-keep-alive
"
    {
        printf "# haproxy front (outbound) sidecar, generated by benches/run.sh\n$common" front
        cat <<EOF
frontend out
    bind 127.0.0.1:$P_HAP_FRONT
    default_backend to_back
backend to_back
    server back 127.0.0.1:$P_HAP_BACK ssl crt $d/front.pem ca-file $CERTS/bundle.pem verify required verifyhost $BACK_NAME sni str($BACK_NAME) alpn $HAP_ALPN_USED ssl-min-ver TLSv1.3
EOF
    } >"$d/front.cfg"
    {
        printf "# haproxy back (inbound) sidecar, generated by benches/run.sh\n$common" back
        cat <<EOF
frontend in
    bind 127.0.0.1:$P_HAP_BACK ssl crt $d/back.pem ca-file $CERTS/bundle.pem verify required alpn h2,http/1.1 ssl-min-ver TLSv1.3
    default_backend app
backend app
    server app 127.0.0.1:$P_UP
EOF
    } >"$d/back.cfg"
    local f
    for f in front back; do
        haproxy -c -f "$d/$f.cfg" >"$RAW/haproxy.$f.check.txt" 2>&1 \
            || { SKIP_REASON="haproxy -c $f.cfg: $(tail -3 "$RAW/haproxy.$f.check.txt")"; return 1; }
    done
    start_bg "$RAW/haproxy.back.log" haproxy -db -f "$d/back.cfg"; BACK_PID=$LAST_PID
    start_bg "$RAW/haproxy.front.log" haproxy -db -f "$d/front.cfg"; FRONT_PID=$LAST_PID
    wait_port "$P_HAP_BACK" "$BACK_PID" && wait_port "$P_HAP_FRONT" "$FRONT_PID" \
        || { SKIP_REASON="haproxy did not start (see $RAW/haproxy.*.log)"; return 1; }
    URL=http://127.0.0.1:$P_HAP_FRONT/; HOP_PORT=$P_HAP_BACK
}

setup_nginx() {
    if ! "$NGINX_BIN" -V 2>&1 | grep -q -- --with-http_ssl_module; then
        SKIP_REASON="$NGINX_BIN lacks http_ssl_module (apt-get install nginx-full)"; return 1
    fi
    nginx_start nginx.back "    upstream app { server 127.0.0.1:$P_UP; keepalive 64; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$P_NGX_BACK ssl;
        ssl_certificate $CERTS/back.bench.crt;
        ssl_certificate_key $CERTS/back.bench.key;
        ssl_client_certificate $CERTS/bundle.pem;
        ssl_verify_client on;
        ssl_protocols TLSv1.3;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }"
    BACK_PID=$LAST_PID
    nginx_start nginx.front "    upstream back { server 127.0.0.1:$P_NGX_BACK; keepalive 64; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$P_NGX_FRONT;
        location / {
            proxy_pass https://back;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_ssl_certificate $CERTS/front.bench.crt;
            proxy_ssl_certificate_key $CERTS/front.bench.key;
            proxy_ssl_trusted_certificate $CERTS/bundle.pem;
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_name $BACK_NAME;
            proxy_ssl_server_name on;
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_session_reuse on;
        }
    }"
    FRONT_PID=$LAST_PID
    wait_port "$P_NGX_BACK" "$BACK_PID" && wait_port "$P_NGX_FRONT" "$FRONT_PID" \
        || { SKIP_REASON="nginx pair did not start (see $CONF/nginx.*/logs/error.log)"; return 1; }
    URL=http://127.0.0.1:$P_NGX_FRONT/; HOP_PORT=$P_NGX_BACK
}

# crank with the shipped Rego policies (policies/, engine rvm) on the inbound
# side, every decision logged to a file: the cost of policy per request.
setup_crank_policy() {
    local log="{path: $RAW/crank.decisions.log}"
    [[ "${CRANK_POLICY_LOG:-file}" == off ]] && log="{enabled: false}"
    CRANK_BACK_EXTRA="policy:
  inbound: {dir: $ROOT/policies}
  decision_log: $log" setup_crank
}

# The OTLP "collector" for the crank_trace* setups: a private nginx answering
# POST /v1/traces with 200 and an empty body, which is a valid, empty
# ExportTraceServiceResponse in protobuf, so the exporter really serialises and
# sends every batch. It discards the bodies without buffering them and logs one
# line per request (status, method, Content-Length, Content-Type, Content-Encoding)
# to count what arrived.
start_collector() {
    [[ -n "${OTLP_PID:-}" ]] && kill -0 "$OTLP_PID" 2>/dev/null && return 0
    local SERVER_PIN=("${OTLP_PIN[@]}")
    nginx_start otlp "    log_format otlp '\$msec \$status \$request_method \$content_length \$content_type \$http_content_encoding';
    server {
        listen 127.0.0.1:$P_OTLP backlog=4096;
        access_log $CONF/otlp/logs/access.log otlp;
        client_max_body_size 64m;
        location = /v1/traces {
            if (\$request_method != POST) { return 405; }
            default_type application/x-protobuf;
            return 200;
        }
        location / { return 404; }
    }"
    OTLP_PID=$LAST_PID
    wait_port "$P_OTLP" "$OTLP_PID" || { SKIP_REASON="OTLP collector (nginx) did not start (see $CONF/otlp/logs/error.log)"; return 1; }
}

# setup_crank_trace RATIO: the crank pair with the same `tracing:` section on
# both sidecars. wrk sends no traceparent, so the outbound sidecar's root
# ratio decides and the inbound one follows its sampled flag.
setup_crank_trace() {
    start_collector || return 1
    local t="tracing:
  sampling: $1
  scheduled_delay: $TRACE_DELAY
  max_queue_size: $TRACE_QUEUE
  max_export_batch_size: $TRACE_BATCH
  otlp: {endpoint: \"http://127.0.0.1:$P_OTLP/v1/traces\"}"
    CRANK_FRONT_EXTRA="$t" CRANK_BACK_EXTRA="$t" setup_crank
}
setup_crank_trace0() { setup_crank_trace 0.0; }   # tracing on, nothing sampled: the cost of propagation alone
setup_crank_trace1() { setup_crank_trace 0.01; }
setup_crank_trace100() { setup_crank_trace 1.0; }

# The resilience layer (issue #5), every part set so that nothing trips: each
# request pays for the checks (a quota token, a concurrency slot, the deadline
# check, two fault draws) and none is refused, delayed or retried.
RES_QUOTAS="quotas:
  limits:
    - {tenant: '*', capability: '*', rate: 100000000/s, direction: both}"
RES_LIMIT="{max_concurrent: 10000, max_queue: 100}"
RES_ROUTE="timeout: 30s
fault: {delay: {percent: 0, duration: 1s}, abort: {percent: 0, status: 503}}"

# setup_crank_res QUOTAS LIMITS ROUTE (1 or 0 each): the crank pair with those parts.
setup_crank_res() {
    local q="" route="" inbound=""
    (( $1 )) && q=$RES_QUOTAS
    if (( $2 )); then route="concurrency: $RES_LIMIT"; inbound="concurrency: $RES_LIMIT"; fi
    (( $3 )) && route+="${route:+$'\n'}$RES_ROUTE"
    CRANK_FRONT_EXTRA="$q" CRANK_BACK_EXTRA="$q" CRANK_ROUTE_EXTRA="$route" CRANK_INBOUND_EXTRA="$inbound" setup_crank
}
# All on. retry, circuit and idempotency are written out although they are the
# defaults (plain `crank` has them too), so that the file shows the whole layer.
setup_crank_resilience() {
    CRANK_FRONT_EXTRA="$RES_QUOTAS" CRANK_BACK_EXTRA="$RES_QUOTAS" \
    CRANK_ROUTE_EXTRA="$RES_ROUTE
retry: {attempts: 2}
circuit: {consecutive_failures: 5}
concurrency: $RES_LIMIT" \
    CRANK_INBOUND_EXTRA="concurrency: $RES_LIMIT, idempotency: {enabled: true}" setup_crank
}
# Every feature a production user turns on, in one pair: the shipped Rego
# policies on the inbound side with every decision logged to a file
# (crank_policy), tracing at 1% on both sidecars to the private collector
# (crank_trace1), the resilience layer without the 0% faults (crank_resilience:
# quotas, both concurrency limits, the route's timeout, retries, circuit
# breaking), and the access log on (`access_log: true`, the default: one JSON
# line per request on stderr, which start_bg sends to a file as a log shipper
# would read it).
setup_crank_all() {
    start_collector || return 1
    local log="{path: $RAW/crank.decisions.log}"
    [[ "${CRANK_POLICY_LOG:-file}" == off ]] && log="{enabled: false}"
    local t="tracing:
  sampling: 0.01
  scheduled_delay: $TRACE_DELAY
  max_queue_size: $TRACE_QUEUE
  max_export_batch_size: $TRACE_BATCH
  otlp: {endpoint: \"http://127.0.0.1:$P_OTLP/v1/traces\"}"
    CRANK_ACCESS_LOG=true \
    CRANK_FRONT_EXTRA="$RES_QUOTAS
$t" \
    CRANK_BACK_EXTRA="$RES_QUOTAS
$t
policy:
  inbound: {dir: $ROOT/policies}
  decision_log: $log" \
    CRANK_ROUTE_EXTRA="timeout: 30s
retry: {attempts: 2}
circuit: {consecutive_failures: 5}
concurrency: $RES_LIMIT" \
    CRANK_INBOUND_EXTRA="concurrency: $RES_LIMIT, idempotency: {enabled: true}" setup_crank
}
setup_crank_res_quotas() { setup_crank_res 1 0 0; }
setup_crank_res_limits() { setup_crank_res 0 1 0; }
setup_crank_res_route() { setup_crank_res 0 0 1; }

# shim_serve: crank-shim in serve mode in front of its own worker, a second
# instance of the upstream nginx (same `return 200 "ok"`, daemon off, one
# process) that the shim starts as `command`, health-checks on /healthz and
# stops (SIGTERM to its process group) when the shim gets SIGTERM. The worker
# inherits the shim's CPU pinning. FRONT_PID is the shim alone: its RSS and
# CPU are the hop's; the worker stands in for the upstream and is not counted.
SHIM_WORKER_PIDFILE=$CONF/shim.worker/nginx.pid
reap_shim_worker() { # a worker the shim left behind (the shim was SIGKILLed) would hold its port
    local pid
    pid=$(cat "${SHIM_WORKER_PIDFILE:-/nonexistent}" 2>/dev/null) || return 0
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 0
    [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == *nginx* ]] || return 0
    kill "$pid" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
}

setup_shim_serve() {
    [[ -x "$CRANK_SHIM" ]] || { SKIP_REASON="$CRANK_SHIM not built (cargo build --release -p crank-shim)"; SKIPPED=1; return 1; }
    reap_shim_worker
    local d=$CONF/shim wd=$CONF/shim.worker; mkdir -p "$d"
    rm -f "$SHIM_WORKER_PIDFILE"
    nginx_conf shim.worker "    server {
        listen 127.0.0.1:$P_SHIM_WORKER reuseport backlog=4096;
        location = /healthz { default_type text/plain; return 200 \"ok\"; }
        location / { default_type text/plain; return 200 \"ok\"; }
    }"
    cat >"$d/shim.yaml" <<EOF
# crank-shim in serve mode (generated by benches/run.sh)
mode: serve
listen: 127.0.0.1:$P_SHIM
admin_listen: 127.0.0.1:$P_SHIM_ADMIN
capability: bench:ok
registration_file: $d/registration.json
host: {nvml: false}
serve:
  command: [$NGINX_BIN, -p, $wd, -e, $wd/logs/error.log, -c, $wd/nginx.conf]
  upstream: 127.0.0.1:$P_SHIM_WORKER
  health_path: /healthz
  health_interval: 1s
  drain_timeout: 1s
  stop_timeout: 1s
EOF
    "$CRANK_SHIM" --config "$d/shim.yaml" --check >"$RAW/shim.check.txt" 2>&1 \
        || { SKIP_REASON="crank-shim --check: $(tail -3 "$RAW/shim.check.txt")"; return 1; }
    local logf=$RAW/shim.log; (( ROUNDS > 1 )) && logf=$RAW/shim_serve.r$ROUND.log
    start_bg "$logf" "$CRANK_SHIM" --config "$d/shim.yaml"; FRONT_PID=$LAST_PID
    for _ in $(seq 100); do
        curl -sf -m 1 "http://127.0.0.1:$P_SHIM_ADMIN/ready" >/dev/null 2>&1 && break
        kill -0 "$FRONT_PID" 2>/dev/null || break
        sleep 0.1
    done
    curl -sf -m 1 "http://127.0.0.1:$P_SHIM_ADMIN/ready" >/dev/null 2>&1 \
        || { SKIP_REASON="crank-shim admin :$P_SHIM_ADMIN not ready (see $logf, $wd/logs/error.log)"; return 1; }
    URL=http://127.0.0.1:$P_SHIM/; HOP_PORT=$P_SHIM_WORKER
}

# nginx_hop: the shim's peer, one plain-HTTP/1.1 nginx reverse proxy with a
# keep-alive pool to the upstream; no TLS, like the shim.
setup_nginx_hop() {
    nginx_start nginx.hop "    upstream app { server 127.0.0.1:$P_UP; keepalive 64; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$P_NGX_HOP backlog=4096;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }"
    FRONT_PID=$LAST_PID
    wait_port "$P_NGX_HOP" "$FRONT_PID" || { SKIP_REASON="nginx hop did not start (see $CONF/nginx.hop/logs/error.log)"; return 1; }
    URL=http://127.0.0.1:$P_NGX_HOP/; HOP_PORT=$P_UP
}

hop_of() {
    case "$1" in
        direct) echo "—" ;;
        crank) echo "mTLS 1.3, h2 (ALPN)" ;;
        crank_trace0) echo "mTLS 1.3, h2 (ALPN), tracing on, 0% sampled" ;;
        crank_trace1) echo "mTLS 1.3, h2 (ALPN), tracing 1% (OTLP/HTTP)" ;;
        crank_trace100) echo "mTLS 1.3, h2 (ALPN), tracing 100% (OTLP/HTTP)" ;;
        crank_policy) echo "mTLS 1.3, h2 (ALPN), Rego policy + decision log" ;;
        crank_resilience) echo "mTLS 1.3, h2 (ALPN), resilience all on (quotas, limits, timeout, 0% faults)" ;;
        crank_all) echo "mTLS 1.3, h2 (ALPN), all on: Rego policy + decision log, tracing 1%, quotas, limits, timeout, retries, circuit, access log" ;;
        crank_res_quotas) echo "mTLS 1.3, h2 (ALPN), quotas only" ;;
        crank_res_limits) echo "mTLS 1.3, h2 (ALPN), concurrency limits only" ;;
        crank_res_route) echo "mTLS 1.3, h2 (ALPN), route timeout + 0% faults only" ;;
        haproxy) [[ "${HAP_ALPN_USED:-$HAPROXY_ALPN}" == h2 ]] && echo "mTLS 1.3, h2 (ALPN)" || echo "mTLS 1.3, HTTP/1.1" ;;
        nginx) echo "mTLS 1.3, HTTP/1.1 pool" ;;
        shim_serve) echo "crank-shim serve mode (plain HTTP/1.1, hyper-util pool) -> its nginx worker" ;;
        nginx_hop) echo "one nginx proxy (plain HTTP/1.1, keepalive 64)" ;;
    esac
}

# ---------------------------------------------------------------- report
report() {
    # best peer per round (one round unless ROUNDS > 1)
    local -A best=()
    local r v
    while read -r r v; do best[$r]=$v; done < <(awk -F'\t' '($1 == "haproxy" || $1 == "nginx") && $2 != "FAILED" && $2 != "SKIPPED" && $2 > m[$13] { m[$13] = $2 }
        END { for (r in m) print r, m[r] }' "$SUMMARY")
    local lat_hdr="latency @ $RATE req/s (oha, corrected)"
    [[ -z "$OHA" ]] && lat_hdr="latency @ c$CONNS closed loop (wrk; oha unavailable)"
    {
        echo "# Crank Mesh side-by-side benchmark"
        echo
        echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); git: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo none)"
        echo "- machine: $NPROC CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r)"
        echo "- pinning: load generator on CPU ${LOAD_CPUS:-any}; upstream and both sidecars on CPU ${SERVER_CPUS:-any}"
        echo "- tools: $(wrk --version 2>&1 | head -1 | awk '{print "wrk " $2}'); ${OHA:+$("$OHA" --version 2>&1 | head -1); }$(haproxy -v 2>&1 | head -1 | awk '{print "haproxy " $3}'); $("$NGINX_BIN" -v 2>&1 | awk -F'/' '{print "nginx " $2}'); $(openssl version | awk '{print $1 " " $2}')"
        [[ -x "$CRANK_PROXY" ]] && echo "- crank-proxy: $("$CRANK_PROXY" --version 2>/dev/null | head -1 || true) ($(stat -c %y "$CRANK_PROXY" | cut -d. -f1)), threads: $CRANK_THREADS, access_log: $CRANK_ACCESS_LOG$([[ " $SETUPS " == *" crank_all "* ]] && echo " (crank_all: true)")"
        echo "- certs: $CERTS_FROM (ECDSA P-256, TLS 1.3 only, client certs verified on every hop)"
        echo "- throughput: \`wrk -t1 -c$CONNS -d$DUR\` after a $WARMUP warm-up; latency: \`oha -c$CONNS -q $RATE -z $LAT_DUR --latency-correction\`"
        echo "- upstream: nginx \`return 200 \"ok\"\`, 1 process; every sidecar 1 process, 1 worker thread$( (( SHIM_RUN )) && echo " (crank-shim: 1 process, 2 tokio worker threads)")"
        (( ROUNDS > 1 )) && echo "- rounds: $ROUNDS, setups interleaved ($SETUPS)$( (( ROTATE )) && echo ", each round starting one setup later")"
        echo
        echo "| setup | sidecar hop | req/s (c$CONNS) | × best peer | p50 ms | p99 ms | p99.9 ms | max ms | RSS front MiB | RSS back MiB | RSS pair MiB | errors |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        local name rps errs src p50 p99 p999 pmax lrps lok rf rb round cpu busy label
        # \037 as the separator: a tab in IFS would merge empty fields
        while IFS=$'\037' read -r name rps errs src p50 p99 p999 pmax lrps lok rf rb round cpu busy; do
            label=$name; (( ROUNDS > 1 )) && label="$name (r$round)"
            if [[ "$rps" == FAILED || "$rps" == SKIPPED ]]; then
                echo "| $label | $(hop_of "$name") | ${rps,,} | | | | | | | | | |"
                continue
            fi
            local ratio pair
            ratio=$(awk -v a="$rps" -v b="${best[$round]:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
            pair=""; [[ -n "$rf" || -n "$rb" ]] && pair=$(( ${rf:-0} + ${rb:-0} ))
            local e=$errs
            [[ "$src" == oha ]] && e="$errs / ${lok:--}"
            printf '| %s | %s | %.0f | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
                "$label" "$(hop_of "$name")" "$rps" "$ratio" "$(fmt_ms "$p50")" "$(fmt_ms "$p99")" \
                "$(fmt_ms "$p999")" "$(fmt_ms "$pmax")" \
                "$(mib "$rf")" "$(mib "$rb")" "$(mib "$pair")" "$e"
        done < <(tr '\t' '\037' <"$SUMMARY")
        echo
        echo "× best peer = req/s ÷ the higher req/s of the haproxy and nginx pairs in this run$( (( ROUNDS > 1 )) && echo " (same round)"). Latency: $lat_hdr."
        echo "RSS = resident set under load: max of VmRSS sampled every 0.2 s during the wrk run (the peak since start, VmHWM, is in raw/<setup>.rss.txt)."
        if [[ -n "$OHA" ]]; then
            echo "errors = wrk (socket errors + non-2xx) / oha (failed + non-200); anything but 0 / 0 makes the row invalid."
        else
            echo "errors = wrk socket errors + non-2xx responses."
        fi
        cpu_report
        (( TRACE_RUN )) && [[ -s "$SPANS" ]] && trace_report
        (( RES_RUN )) && resilience_report
        (( SHIM_RUN )) && shim_report
        if [[ -s "$NOTES" ]]; then echo; echo "Notes:"; sed 's/^/- /' "$NOTES"; fi
    } >"$OUT/results.md"
    cat "$OUT/results.md"
}

# Pair CPU per request of every setup with sidecars (column 14 of summary.tsv),
# and its ratio to the haproxy pair of the same round: median (min–max) over rounds.
cpu_report() {
    grep -q $'^haproxy\t' "$SUMMARY" || return 0
    echo
    echo "## Pair CPU per request"
    echo
    echo "utime + stime of both sidecars (every thread) over the wrk run ÷ its requests. × haproxy = this row ÷ the haproxy pair's of the same round; median (min–max) over the rounds."
    echo
    echo "| setup | rounds | pair CPU µs/req | × haproxy |"
    echo "|---|---:|---:|---:|"
    awk -F'\t' '
        function med(a, n,   i, j, t) { for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j-1] > a[j]; j--) { t = a[j]; a[j] = a[j-1]; a[j-1] = t }
            return n % 2 ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2 }
        $2 == "FAILED" || $2 == "SKIPPED" || $14 == "-" || $14 == "" { next }
        { cpu[$1, $13] = $14; if (!($1 in seen)) { seen[$1] = 1; order[++ns] = $1 } }
        END {
            for (k = 1; k <= ns; k++) {
                s = order[k]; n = 0; m = 0
                for (key in cpu) { split(key, p, SUBSEP); if (p[1] != s) continue
                    c[++n] = cpu[key]
                    if ((("haproxy", p[2]) in cpu) && cpu["haproxy", p[2]] > 0) r[++m] = cpu[key] / cpu["haproxy", p[2]] }
                if (!n) continue
                lo = c[1]; hi = c[1]; for (i = 1; i <= n; i++) { if (c[i] < lo) lo = c[i]; if (c[i] > hi) hi = c[i] }
                cs = sprintf("%.1f (%.1f–%.1f)", med(c, n), lo, hi)
                rs = "-"
                if (m) { lo = r[1]; hi = r[1]; for (i = 1; i <= m; i++) { if (r[i] < lo) lo = r[i]; if (r[i] > hi) hi = r[i] }
                    rs = sprintf("%.2f (%.2f–%.2f)", med(r, m), lo, hi) }
                printf "| %s | %d | %s | %s |\n", s, n, cs, rs
                delete c; delete r
            }
        }' "$SUMMARY"
}

# The per-round ratio table of the tracing, resilience and shim reports: rows
# of setup $base (plain `crank`, or `nginx_hop` for the shim) are the baseline
# of their round ($13); rows of $base and of setups whose name starts with
# $family are collected per setup;
# col(which, rel) gives the median (min–max) of a column, or of its ratio
# to the same round's baseline.
RATIO_AWK='
        $1 == base { o_rps[$13] = $2; o_cpu[$13] = $14; o_p50[$13] = $5; o_p99[$13] = $6 }
        $1 == base || index($1, family) == 1 { m = ++cnt[$1]; if (m == 1) order[++ns] = $1
            v_rps[$1, m] = $2; v_cpu[$1, m] = $14; v_p50[$1, m] = $5; v_p99[$1, m] = $6; v_r[$1, m] = $13 }
        function med(a, k,   i, j, t, h) {   # median (min–max) of a[1..k], sorted in place
            for (i = 2; i <= k; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
            if (k == 0) return "-"
            h = (k % 2) ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
            return sprintf(fmt, h) " (" sprintf(fmt, a[1]) "–" sprintf(fmt, a[k]) ")"
        }
        function col(which, rel,   i, k, a, r, v, b) {
            k = 0; split("", a)
            for (i = 1; i <= cnt[s]; i++) {
                r = v_r[s, i]
                if (which == "rps") { v = v_rps[s, i]; b = o_rps[r] } else if (which == "cpu") { v = v_cpu[s, i]; b = o_cpu[r] }
                else if (which == "p50") { v = v_p50[s, i]; b = o_p50[r] } else { v = v_p99[s, i]; b = o_p99[r] }
                if (v == "-" || v == "") continue
                if (rel) { if (b == "" || b == "-" || b <= 0) continue; a[++k] = v / b } else a[++k] = v + 0
            }
            return med(a, k)
        }
'

# trace_report: the tracing-overhead tables, from summary.tsv and spans.tsv.
# Every traced row is compared with the untraced `crank` row of its round.
trace_report() {
    echo
    echo "## Tracing overhead"
    echo
    echo "Both sidecars have \`tracing:\` (queue $TRACE_QUEUE, batch $TRACE_BATCH, scheduled delay $TRACE_DELAY), exporting OTLP/HTTP protobuf to"
    echo "an nginx collector on CPU ${OTLP_CPUS:-any} that answers 200 with an empty body. wrk sends no traceparent: the outbound sidecar's"
    echo "root ratio decides, the inbound one follows. × off = this row ÷ the \`crank\` (tracing off) row of the same round."
    echo
    echo "| round | setup | req/s (c$CONNS) | × off | p50 ms | p99 ms | pair CPU µs/req | × off | spans exported front / back (wrk run) | dropped front / back | collector POSTs (MiB) | other load at wrk start / end |"
    echo "|---:|---|---:|---:|---:|---:|---:|---:|---|---|---|---|"
    awk -F'\t' -v spans="$SPANS" '
        BEGIN { while ((getline line < spans) > 0) { split(line, f, "\t"); k = f[2] SUBSEP f[3]
                    req[k] = f[4]; ef[k] = f[5]; eb[k] = f[6]; df[k] = f[7]; db[k] = f[8]; posts[k] = f[13]; bytes[k] = f[14]; other[k] = f[15] } }
        $2 != "FAILED" && $2 != "SKIPPED" && $1 == "crank" { off_rps[$13] = $2; off_cpu[$13] = $14 }
        { row[++n] = $0 }
        function ratio(a, b) { return (b > 0 && a != "-" && a != "") ? sprintf("%.2f", a / b) : "-" }
        END {
            for (i = 1; i <= n; i++) {
                split(row[i], c, "\t"); if (c[1] !~ /^crank(_trace|$)/) continue
                k = c[1] SUBSEP c[13]
                if (c[2] == "FAILED" || c[2] == "SKIPPED") { printf "| %s | %s | %s | | | | | | | | | |\n", c[13], c[1], tolower(c[2]); continue }
                sp = (k in req) ? sprintf("%s / %s of %s requests", ef[k], eb[k], req[k]) : "-"
                dr = (k in req) ? sprintf("%s / %s", df[k], db[k]) : "-"
                co = (k in req) ? sprintf("%s (%.2f)%s", posts[k], bytes[k] / 1048576, other[k] > 0 ? ", " other[k] " not 200" : "") : "-"
                printf "| %s | %s | %.0f | %s | %.3f | %.3f | %s | %s | %s | %s | %s | %s |\n", c[13], c[1], c[2],
                    ratio(c[2], off_rps[c[13]]), c[5], c[6], c[14], ratio(c[14], off_cpu[c[13]]), sp, dr, co, c[15]
            }
        }' "$SUMMARY"
    echo
    echo "Ratios over the rounds, each taken against the untraced run of the same round: median (min–max)."
    echo
    echo "| setup | rounds | req/s median (min–max) | req/s × off | pair CPU µs/req median | CPU/req × off | p50 × off | p99 × off | spans dropped, all rounds |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' -v base=crank -v family=crank_trace -v spans="$SPANS" '
        BEGIN { while ((getline line < spans) > 0) { split(line, f, "\t"); drop[f[2]] += f[11] + f[12] } }
        $2 == "FAILED" || $2 == "SKIPPED" { next }
'"$RATIO_AWK"'
        END {
            for (q = 1; q <= ns; q++) {
                s = order[q]
                fmt = "%.0f"; c1 = col("rps", 0); fmt = "%.1f"; c3 = col("cpu", 0)
                fmt = "%.2f"; c2 = col("rps", 1); c4 = col("cpu", 1); c5 = col("p50", 1); c6 = col("p99", 1)
                printf "| %s | %d | %s | %s | %s | %s | %s | %s | %s |\n", s, cnt[s], c1, c2, c3, c4, c5, c6, (s in drop) ? drop[s] : "-"
            }
        }' "$SUMMARY"
    echo
    echo "pair CPU µs/req = utime+stime of both sidecar processes (all threads, the exporter included) during the wrk run ÷ its requests."
    echo "Spans: crank_spans_exported_total and crank_spans_dropped_total (both reasons) from each sidecar's /metrics, read $(( $(secs "$TRACE_DELAY") + 1 )) s"
    echo "after the warm-up and after the wrk run (one scheduled delay for the last batch to go out); the difference is the wrk run's."
    echo "Collector POSTs: answered 200 in that window, from the collector's access log. Raw counters: raw/<setup>.r<round>.spans.txt."
}

# resilience_report: the resilience-overhead tables, from summary.tsv and resilience.tsv.
# Every crank_res* row is compared with the plain `crank` row of its round.
resilience_report() {
    echo
    echo "## Resilience overhead"
    echo
    echo "\`crank_resilience\`: quotas on both sidecars (tenant \`*\`, capability \`*\`, 100000000/s, direction both), inbound"
    echo "concurrency 10000 (queue 100) and idempotency (acts only on POST/PATCH with \`Idempotency-Key\`: not exercised by GETs),"
    echo "route timeout 30s, retry attempts 2, circuit consecutive_failures 5, route concurrency 10000 (queue 100), faults at 0%."
    echo "\`crank_res_quotas\` / \`_limits\` / \`_route\`: only the quotas / the two concurrency limits / the route's timeout and faults."
    echo "Nothing is set to trip. × off = this row ÷ the plain \`crank\` row of the same round."
    echo
    echo "| round | setup | req/s (c$CONNS) | × off | p50 ms | p99 ms | pair CPU µs/req | × off | RSS front / back MiB | requests front / back | 4xx+5xx front / back | no response front / back | 429 / shed / timeouts / faults | retries / budget / ejections | proxy errors front / back |"
    echo "|---:|---|---:|---:|---:|---:|---:|---:|---|---|---|---|---|---|---|"
    awk -F'\t' -v res="$RESIL" '
        BEGIN { while ((getline line < res) > 0) { split(line, f, "\t"); k = f[2] SUBSEP f[3]; fr[k] = f[4]; bk[k] = f[5] } }
        $2 != "FAILED" && $2 != "SKIPPED" && $1 == "crank" { off_rps[$13] = $2; off_cpu[$13] = $14 }
        { row[++n] = $0 }
        function ratio(a, b) { return (b > 0 && a != "-" && a != "") ? sprintf("%.2f", a / b) : "-" }
        function mib(k) { return (k == "" || k == 0) ? "-" : sprintf("%.1f", k / 1024) }
        END {
            for (i = 1; i <= n; i++) {
                split(row[i], c, "\t"); if (c[1] !~ /^crank(_res|$)/) continue
                k = c[1] SUBSEP c[13]
                if (c[2] == "FAILED" || c[2] == "SKIPPED") { printf "| %s | %s | %s | | | | | | | | | | | | |\n", c[13], c[1], tolower(c[2]); continue }
                if ((k in fr) && split(fr[k], a, ",") == 12 && split(bk[k], b, ",") == 12) {
                    rq = a[1] " / " b[1]; bad = a[2] " / " b[2]; nr = a[3] " / " b[3]
                    dec = (a[4] + b[4]) " / " (a[5] + b[5]) " / " (a[6] + b[6]) " / " (a[7] + b[7])
                    rt = (a[8] + b[8]) " / " (a[9] + b[9]) " / " (a[10] + b[10]); pe = a[12] " / " b[12]
                } else { rq = bad = nr = dec = rt = pe = "?" }
                printf "| %s | %s | %.0f | %s | %.3f | %.3f | %s | %s | %s / %s | %s | %s | %s | %s | %s | %s |\n", c[13], c[1], c[2],
                    ratio(c[2], off_rps[c[13]]), c[5], c[6], c[14], ratio(c[14], off_cpu[c[13]]), mib(c[11]), mib(c[12]), rq, bad, nr, dec, rt, pe
            }
        }' "$SUMMARY"
    echo
    echo "Ratios over the rounds, each taken against the plain \`crank\` run of the same round: median (min–max)."
    echo
    echo "| setup | rounds | req/s median (min–max) | req/s × off | pair CPU µs/req median (min–max) | CPU/req × off | p50 ms median | p50 × off | p99 ms median | p99 × off | 429 + shed + timeouts + faults, all rounds |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' -v base=crank -v family=crank_res -v res="$RESIL" '
        BEGIN { while ((getline line < res) > 0) { split(line, f, "\t")
                    if (split(f[4], a, ",") == 12 && split(f[5], b, ",") == 12) fired[f[2]] += a[4] + a[5] + a[6] + a[7] + b[4] + b[5] + b[6] + b[7]
                    else unread[f[2]] = 1 } }
        $2 == "FAILED" || $2 == "SKIPPED" { next }
'"$RATIO_AWK"'
        END {
            for (q = 1; q <= ns; q++) {
                s = order[q]
                fmt = "%.0f"; c1 = col("rps", 0); fmt = "%.1f"; c3 = col("cpu", 0); fmt = "%.3f"; c5 = col("p50", 0); c7 = col("p99", 0)
                fmt = "%.2f"; c2 = col("rps", 1); c4 = col("cpu", 1); c6 = col("p50", 1); c8 = col("p99", 1)
                sub(/ \(.*/, "", c5); sub(/ \(.*/, "", c7)
                printf "| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", s, cnt[s], c1, c2, c3, c4, c5, c6, c7, c8,
                    (s in unread) ? "? (metrics unreadable)" : ((s in fired) ? fired[s] : "-")
            }
        }' "$SUMMARY"
    echo
    echo "pair CPU µs/req = utime+stime of both sidecar processes (all threads) during the wrk run ÷ its requests."
    echo "Counters: both sidecars' /metrics read after the oha run (the whole life of that setup's processes: readiness checks,"
    echo "warm-up, wrk, oha), summed over labels; raw/<setup>[.r<round>].{front,back}.end-metrics.txt. requests = crank_requests_total,"
    echo "4xx+5xx = its 4xx and 5xx classes, no response = its \`error\` class (no response sent: the client closed the connection"
    echo "with the request in flight, as wrk and oha do when their time is up; not errors in the main table either);"
    echo "429 = crank_ratelimited_total, shed = crank_shed_total, timeouts = crank_request_timeouts_total, faults = crank_faults_injected_total,"
    echo "retries / budget / ejections = crank_retries_total / crank_retry_budget_exhausted_total / crank_circuit_ejections_total,"
    echo "proxy errors = crank_proxy_errors_total (responses the proxy made itself)."
}

# shim_report: the worker-shim tables, from summary.tsv. shim_serve is compared
# with the nginx_hop row of its round.
shim_report() {
    echo
    echo "## Worker shim (serve mode) overhead"
    echo
    echo "\`shim_serve\`: load -> crank-shim (serve mode, tokio runtime with 2 worker threads) -> its own nginx worker (same config"
    echo "as the upstream, started and health-checked by the shim). \`nginx_hop\`: load -> one nginx proxy (HTTP/1.1, keepalive 64)"
    echo "-> upstream. Both plain HTTP, no TLS. \`direct\`: no hop. × nginx_hop = this row ÷ the \`nginx_hop\` row of the same round."
    echo
    echo "| round | setup | req/s (c$CONNS) | × nginx_hop | p50 ms | p99 ms | p99.9 ms | hop CPU µs/req | × nginx_hop | hop RSS MiB (peak) |"
    echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' '
        $2 != "FAILED" && $2 != "SKIPPED" && $1 == "nginx_hop" { b_rps[$13] = $2; b_cpu[$13] = $14 }
        { row[++n] = $0 }
        function ratio(a, b) { return (b > 0 && a != "-" && a != "") ? sprintf("%.2f", a / b) : "-" }
        function mib(k) { return (k == "" || k == 0) ? "-" : sprintf("%.1f", k / 1024) }
        function ms(v) { return (v == "" || v == "-") ? "-" : sprintf("%.3f", v) }
        END {
            for (i = 1; i <= n; i++) {
                split(row[i], c, "\t"); if (c[1] != "direct" && c[1] != "shim_serve" && c[1] != "nginx_hop") continue
                if (c[2] == "FAILED" || c[2] == "SKIPPED") { printf "| %s | %s | %s | | | | | | | |\n", c[13], c[1], tolower(c[2]); continue }
                printf "| %s | %s | %.0f | %s | %s | %s | %s | %s | %s | %s |\n", c[13], c[1], c[2], ratio(c[2], b_rps[c[13]]),
                    ms(c[5]), ms(c[6]), ms(c[7]), c[14], ratio(c[14], b_cpu[c[13]]), mib(c[11])
            }
        }' "$SUMMARY"
    echo
    echo "Over the rounds: median (min–max); ratios taken per round against \`nginx_hop\`."
    echo
    echo "| setup | rounds | req/s | req/s × nginx_hop | hop CPU µs/req | CPU/req × nginx_hop | p50 ms | p50 × nginx_hop | p99 ms | p99 × nginx_hop |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' -v base=nginx_hop -v family=shim_serve '
        $2 == "FAILED" || $2 == "SKIPPED" { next }
'"$RATIO_AWK"'
        END {
            for (q = 1; q <= ns; q++) {
                s = order[q]
                fmt = "%.0f"; c1 = col("rps", 0); fmt = "%.1f"; c3 = col("cpu", 0); fmt = "%.3f"; c5 = col("p50", 0); c7 = col("p99", 0)
                fmt = "%.2f"; c2 = col("rps", 1); c4 = col("cpu", 1); c6 = col("p50", 1); c8 = col("p99", 1)
                printf "| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s |\n", s, cnt[s], c1, c2, c3, c4, c5, c6, c7, c8
            }
        }' "$SUMMARY"
    echo
    echo "hop CPU µs/req = utime+stime of the hop process alone (crank-shim, all its threads; or the nginx proxy) during the wrk run"
    echo "÷ its requests; the shim's nginx worker and the upstream are not counted. RSS = the hop process's under load (max of"
    echo "VmRSS sampled every 0.2 s during wrk); its VmRSS after the warm-up, its VmHWM and the RssAnon/RssFile split after wrk are in raw/<setup>[.r<round>].rss.txt, its /proc/PID/smaps after wrk in raw/<setup>[.r<round>].<front|back>.smaps.txt."
}

# ---------------------------------------------------------------- main
main() {
    command -v wrk >/dev/null || die "wrk not installed"
    command -v haproxy >/dev/null || log "haproxy not installed; its row will fail"
    command -v curl >/dev/null || die "curl not installed"
    mkdir -p "$OUT" "$RAW" "$CONF" "$CERTS"
    # The script itself (RSS sampler, curl checks) stays off the servers' CPU.
    [[ -n "$LOAD_CPUS" ]] && taskset -pc "$LOAD_CPUS" $$ >/dev/null
    rm -f "$RAW"/* "$SUMMARY" "$SPANS" "$NOTES"; : >"$SUMMARY"; : >"$NOTES"
    (( TRACE_RUN )) && : >"$SPANS"
    rm -f "$RESIL"; (( RES_RUN )) && : >"$RESIL"
    rm -f "$CONF/otlp/logs/access.log"

    # A cargo build running beside the bench may replace target/release/crank-proxy;
    # every setup of this run uses one copy taken now.
    if [[ "$SNAPSHOT_BINS" == 1 && -x "$CRANK_PROXY" ]]; then
        mkdir -p "$OUT/bin"
        cp -p "$CRANK_PROXY" "$OUT/bin/crank-proxy" && CRANK_PROXY=$OUT/bin/crank-proxy
        log "crank-proxy copied to $CRANK_PROXY (sha256 $(sha256sum "$CRANK_PROXY" | cut -c1-12))"
    fi
    if [[ "$SNAPSHOT_BINS" == 1 ]] && (( SHIM_RUN )) && [[ -x "$CRANK_SHIM" ]]; then
        mkdir -p "$OUT/bin"
        cp -p "$CRANK_SHIM" "$OUT/bin/crank-shim" && CRANK_SHIM=$OUT/bin/crank-shim
        log "crank-shim copied to $CRANK_SHIM (sha256 $(sha256sum "$CRANK_SHIM" | cut -c1-12))"
    fi

    local p
    for p in $P_UP $P_CRANK_FRONT $P_CRANK_BACK $P_CRANK_ADMIN_FRONT $P_CRANK_ADMIN_BACK \
             $P_HAP_FRONT $P_HAP_BACK $P_NGX_FRONT $P_NGX_BACK $P_OTLP \
             $P_SHIM $P_SHIM_ADMIN $P_SHIM_WORKER $P_NGX_HOP; do
        port_busy "$p" && die "port $p is in use (set BENCH_PORT_BASE)"
    done

    log "certs via $CERTS_FROM into $CERTS"
    rm -f "$CERTS"/*
    case "$CERTS_FROM" in
        crankctl) certs_crankctl ;;
        openssl) certs_openssl; echo "certs from openssl (development fallback), not crankctl" >>"$NOTES" ;;
        *) die "CERTS_FROM must be crankctl or openssl" ;;
    esac
    [[ -n "$OHA" ]] || echo "oha not found: latency columns are wrk's closed-loop percentiles at c$CONNS, not a fixed rate" >>"$NOTES"
    echo "nginx cannot speak HTTP/2 to an upstream: its sidecar hop is a keep-alive pool of HTTP/1.1 connections (keepalive 64)" >>"$NOTES"
    echo "nginx runs with master_process off (one process per sidecar, like haproxy and crank)" >>"$NOTES"

    start_upstream
    wait_ok "http://127.0.0.1:$P_UP/" || die "upstream does not answer"

    local s i off list=($SETUPS) n
    n=${#list[@]}
    for (( ROUND = 1; ROUND <= ROUNDS; ROUND++ )); do
        # interleaved rounds; with ROTATE=1 round r starts at the r-th setup
        off=0; (( ROTATE && ROUNDS > 1 )) && off=$(( (ROUND - 1) % n ))
        for (( i = 0; i < n; i++ )); do
            s=${list[(i + off) % n]}
            FRONT_PID=; BACK_PID=; URL=; SKIP_REASON=; SKIPPED=0; HOP_PORT=
            log "== $s$( (( ROUNDS > 1 )) && echo " (round $ROUND of $ROUNDS)")"
            if ! "setup_$s"; then
                fail_row "$s" "${SKIP_REASON:-setup failed}" "$( ((SKIPPED)) && echo SKIPPED || echo FAILED)"
                stop_pids ${FRONT_PID:-} ${BACK_PID:-}; reap_shim_worker
                continue
            fi
            if ! wait_ok "$URL"; then
                fail_row "$s" "no 200 \"ok\" through $URL: $(curl -s -m 2 -o /dev/null -w '%{http_code}' "$URL")"
                stop_pids ${FRONT_PID:-} ${BACK_PID:-}; reap_shim_worker
                continue
            fi
            measure "$s" "$URL" "$FRONT_PID" "$BACK_PID"
            [[ -n "$FRONT_PID$BACK_PID" ]] && stop_pids ${FRONT_PID:-} ${BACK_PID:-}
            if [[ "$s" == shim_serve ]]; then
                # the shim stops its worker on SIGTERM; one still alive is noted, then stopped
                local wp; wp=$(cat "$SHIM_WORKER_PIDFILE" 2>/dev/null)
                [[ -n "$wp" ]] && kill -0 "$wp" 2>/dev/null && echo "shim_serve (r$ROUND): the worker outlived the shim's stop; the script stopped it" >>"$NOTES"
                reap_shim_worker
            fi
            if [[ "$s" == crank* ]] && (( ROUNDS > 1 )); then
                local f; for f in front back; do
                    [[ -f "$RAW/crank.$f.log" ]] && mv "$RAW/crank.$f.log" "$RAW/$s.r$ROUND.$f.log"
                done
            fi
        done
    done
    if (( TRACE_RUN )); then
        local w
        w=$(grep -l -i 'export failed\|tracing:' "$RAW"/crank*.log 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')
        [[ -n "$w" ]] && echo "tracing warnings in the sidecar logs: $w(see $RAW)" >>"$NOTES"
    fi
    stop_pids "$UP_PID" ${OTLP_PID:-}
    echo
    report
}

# observe_hop NAME [TAG]: during the warm-up, note how many TCP connections carry the
# sidecar hop, and for haproxy which mux its front uses towards the back (the
# h1/h2 counters of backend `to_back` in `show stat`). TAG names raw files
# (NAME.rN with ROUNDS > 1); the note is written in the first round only.
observe_hop() {
    [[ -n "${HOP_PORT:-}" ]] || return 0
    local n tag=${2:-$1}
    n=$(ss -Htn state established "dport = :$HOP_PORT" 2>/dev/null | wc -l)
    (( ROUND == 1 )) && echo "$1: $n TCP connection(s) on the sidecar hop under c$CONNS load" >>"$NOTES"
    if [[ "$1" == crank || "$1" == crank_all || "$1" == crank_trace* || "$1" == crank_res* ]]; then
        local pre=crank; [[ "$tag" != crank ]] && pre=$tag
        curl -s -m 2 "http://127.0.0.1:$P_CRANK_ADMIN_FRONT/metrics" >"$RAW/$pre.front.metrics.txt" 2>&1
        curl -s -m 2 "http://127.0.0.1:$P_CRANK_ADMIN_BACK/metrics" >"$RAW/$pre.back.metrics.txt" 2>&1
    fi
    if [[ "$1" == haproxy ]] && command -v python3 >/dev/null; then
        python3 - "$CONF/haproxy/front.sock" >"$RAW/haproxy.front.show-stat.txt" 2>&1 <<'PY'
import csv, io, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b"show stat\n"); data = b""
while True:
    b = s.recv(65536)
    if not b: break
    data += b
text = data.decode(errors="replace")
rows = list(csv.reader(io.StringIO(text)))
head = [h.lstrip("# ") for h in rows[0]]
for row in rows[1:]:
    d = dict(zip(head, row))
    if d.get("pxname") == "to_back" and d.get("svname") == "BACKEND":
        print("HOP h2_open_connections=%s h2_headers_rcvd=%s h1_total_streams=%s" % (
            d.get("h2_open_connections") or "?", d.get("h2_headers_rcvd") or "?", d.get("h1_total_streams") or "?"))
print(text)
PY
        local hop
        hop=$(grep -m1 '^HOP ' "$RAW/haproxy.front.show-stat.txt" | cut -c5-)
        echo "haproxy: front's backend to the back, \`show stat\` during warm-up: ${hop:-unreadable} (ALPN offered: $HAP_ALPN_USED)" >>"$NOTES"
    fi
}

main "$@"
