#!/usr/bin/env bash
# Side-by-side benchmark: the same load through four setups on this machine.
#
#   direct        load -> upstream
#   crank pair    load -> crank outbound -> mTLS (TLS 1.3, h2 via ALPN) -> crank inbound -> upstream
#   haproxy pair  load -> haproxy front  -> mTLS (TLS 1.3, h2 via ALPN) -> haproxy back  -> upstream
#   nginx pair    load -> nginx front    -> mTLS (TLS 1.3, HTTP/1.1)    -> nginx back    -> upstream
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
CRANK_THREADS=${CRANK_THREADS:-1}
CRANK_ACCESS_LOG=${CRANK_ACCESS_LOG:-false}  # the peers log nothing per request either

NPROC=$(nproc)
if [[ -z "${LOAD_CPUS+x}" || -z "${SERVER_CPUS+x}" ]]; then
    if (( NPROC >= 2 )); then LOAD_CPUS=${LOAD_CPUS:-0}; SERVER_CPUS=${SERVER_CPUS:-1}
    else LOAD_CPUS=${LOAD_CPUS:-}; SERVER_CPUS=${SERVER_CPUS:-}; fi
fi
[[ "${PIN:-1}" == 0 ]] && { LOAD_CPUS=; SERVER_CPUS=; }
LOAD_PIN=(); SERVER_PIN=()
[[ -n "$LOAD_CPUS" ]] && LOAD_PIN=(taskset -c "$LOAD_CPUS")
[[ -n "$SERVER_CPUS" ]] && SERVER_PIN=(taskset -c "$SERVER_CPUS")

P_UP=$BASE
P_CRANK_FRONT=$((BASE + 10)); P_CRANK_BACK=$((BASE + 11))
P_CRANK_ADMIN_FRONT=$((BASE + 12)); P_CRANK_ADMIN_BACK=$((BASE + 13))
P_HAP_FRONT=$((BASE + 20)); P_HAP_BACK=$((BASE + 21))
P_NGX_FRONT=$((BASE + 30)); P_NGX_BACK=$((BASE + 31))
BACK_NAME=back.bench.crank.local

CERTS=$OUT/certs
RAW=$OUT/raw
CONF=$OUT/conf
SUMMARY=$OUT/summary.tsv
NOTES=$OUT/notes.txt

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

peak_kib() { # PID -> max(sampled VmRSS, VmHWM) in KiB
    local hwm sampled
    hwm=$(kib_of "$1" VmHWM)
    sampled=$(awk -v p="$1" '$1 == p && $2 > m { m = $2 } END { print m + 0 }' "$RSS_SAMPLES" 2>/dev/null)
    echo $(( ${hwm:-0} > ${sampled:-0} ? ${hwm:-0} : ${sampled:-0} ))
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
    local pids=() wrkf=$RAW/$name.wrk.txt
    [[ -n "$fpid" ]] && pids+=("$fpid")
    [[ -n "$bpid" ]] && pids+=("$bpid")
    local tmo=$(( $(secs "$DUR") + 30 ))

    log "$name: warm-up $WARMUP"
    timeout 60 "${LOAD_PIN[@]}" wrk -t1 -c"$CONNS" -d"$WARMUP" "$url" >"$RAW/$name.warmup.txt" 2>&1 &
    local wpid=$!
    sleep "$(awk -v w="$(secs "$WARMUP")" 'BEGIN { print (w > 1 ? w / 2 : 0.5) }')"
    observe_hop "$name"
    wait "$wpid"

    RSS_SAMPLES=$RAW/$name.rss-samples.txt; : >"$RSS_SAMPLES"
    local p idle=""
    for p in "${pids[@]}"; do idle+="$p VmRSS=$(kib_of "$p" VmRSS)kB threads=$(kib_of "$p" Threads); "; done
    if (( ${#pids[@]} )); then
        rss_sampler "${pids[@]}" &
        SAMPLER_PID=$!
    fi

    log "$name: wrk -t1 -c$CONNS -d$DUR"
    timeout "$tmo" "${LOAD_PIN[@]}" wrk -t1 -c"$CONNS" -d"$DUR" --latency "$url" >"$wrkf" 2>&1

    local rf="" rb=""
    if [[ -n "$SAMPLER_PID" ]]; then
        kill "$SAMPLER_PID" 2>/dev/null; wait "$SAMPLER_PID" 2>/dev/null; SAMPLER_PID=
        [[ -n "$fpid" ]] && rf=$(peak_kib "$fpid")
        [[ -n "$bpid" ]] && rb=$(peak_kib "$bpid")
        {
            echo "idle before warm-up: $idle"
            echo "peak (max of VmRSS samples during wrk, VmHWM after wrk): front=${rf}kB back=${rb}kB"
        } >"$RAW/$name.rss.txt"
    fi

    local rps wrk_errs non2xx sock wrk_p50 wrk_p99
    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$wrkf")
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
        local ohaf=$RAW/$name.oha.json
        log "$name: oha -q $RATE -c$CONNS -z $LAT_DUR --latency-correction"
        timeout $(( $(secs "$LAT_DUR") + 30 )) "${LOAD_PIN[@]}" "$OHA" --no-tui "${OHA_JSON_FLAG[@]}" \
            --latency-correction -q "$RATE" -c "$CONNS" -z "$LAT_DUR" "$url" >"$ohaf" 2>"$RAW/$name.oha.stderr"
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
            log "$name: oha output unreadable (see $RAW/$name.oha.stderr)"
        fi
    else
        lat_src="wrk-c$CONNS"
        p50=$(to_ms "$wrk_p50"); p99=$(to_ms "$wrk_p99")
        p999=-; pmax=$(awk '$1 == "Latency" { print $4; exit }' "$wrkf"); pmax=$(to_ms "$pmax")
    fi

    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$name" "${rps:-0}" "$wrk_errs" "$lat_src" "${p50:--}" "${p99:--}" "${p999:--}" "${pmax:--}" \
        "${lat_rps:--}" "${lat_ok:--}" "${rf:-}" "${rb:-}" >>"$SUMMARY"
    log "$name: ${rps:-?} req/s (errors $wrk_errs), latency p50 ${p50:-?} ms p99 ${p99:-?} ms, RSS front ${rf:--} kB back ${rb:--} kB"
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
    printf '%s\t%s\t-\t-\t-\t-\t-\t-\t-\t-\t\t\n' "$1" "$what" >>"$SUMMARY"
    echo "$1: $what — $2" >>"$NOTES"
    log "$1: $what — $2"
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

# nginx_conf NAME SERVER_BLOCKS -> writes $CONF/NAME/nginx.conf
nginx_start() { # NAME HTTP_BODY ; sets LAST_PID
    local name=$1 body=$2 d=$CONF/$1
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
        identity: $BACK_NAME
admin: {listen: 127.0.0.1:$P_CRANK_ADMIN_FRONT}
threads: $CRANK_THREADS
access_log: $CRANK_ACCESS_LOG
drain: {deadline: 1s}
EOF
    cat >"$d/back.yaml" <<EOF
# crank inbound sidecar (generated by benches/run.sh)
identity: {cert: $CERTS/back.bench.crt, key: $CERTS/back.bench.key, trust_bundle: $CERTS/bundle.pem}
inbound: {listen: 127.0.0.1:$P_CRANK_BACK, app: 127.0.0.1:$P_UP, app_protocol: http1}
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

hop_of() {
    case "$1" in
        direct) echo "—" ;;
        crank) echo "mTLS 1.3, h2 (ALPN)" ;;
        crank_policy) echo "mTLS 1.3, h2 (ALPN), Rego policy + decision log" ;;
        haproxy) [[ "${HAP_ALPN_USED:-$HAPROXY_ALPN}" == h2 ]] && echo "mTLS 1.3, h2 (ALPN)" || echo "mTLS 1.3, HTTP/1.1" ;;
        nginx) echo "mTLS 1.3, HTTP/1.1 pool" ;;
    esac
}

# ---------------------------------------------------------------- report
report() {
    local best
    best=$(awk -F'\t' '($1 == "haproxy" || $1 == "nginx") && $2 != "FAILED" && $2 > m { m = $2 } END { print m + 0 }' "$SUMMARY")
    local lat_hdr="latency @ $RATE req/s (oha, corrected)"
    [[ -z "$OHA" ]] && lat_hdr="latency @ c$CONNS closed loop (wrk; oha unavailable)"
    {
        echo "# Crank Mesh side-by-side benchmark"
        echo
        echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); git: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo none)"
        echo "- machine: $NPROC CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r)"
        echo "- pinning: load generator on CPU ${LOAD_CPUS:-any}; upstream and both sidecars on CPU ${SERVER_CPUS:-any}"
        echo "- tools: $(wrk --version 2>&1 | head -1 | awk '{print "wrk " $2}'); ${OHA:+$("$OHA" --version 2>&1 | head -1); }$(haproxy -v 2>&1 | head -1 | awk '{print "haproxy " $3}'); $("$NGINX_BIN" -v 2>&1 | awk -F'/' '{print "nginx " $2}'); $(openssl version | awk '{print $1 " " $2}')"
        [[ -x "$CRANK_PROXY" ]] && echo "- crank-proxy: $("$CRANK_PROXY" --version 2>/dev/null | head -1 || true) ($(stat -c %y "$CRANK_PROXY" | cut -d. -f1)), threads: $CRANK_THREADS, access_log: $CRANK_ACCESS_LOG"
        echo "- certs: $CERTS_FROM (ECDSA P-256, TLS 1.3 only, client certs verified on every hop)"
        echo "- throughput: \`wrk -t1 -c$CONNS -d$DUR\` after a $WARMUP warm-up; latency: \`oha -c$CONNS -q $RATE -z $LAT_DUR --latency-correction\`"
        echo "- upstream: nginx \`return 200 \"ok\"\`, 1 process; every sidecar 1 process, 1 worker thread"
        echo
        echo "| setup | sidecar hop | req/s (c$CONNS) | × best peer | p50 ms | p99 ms | p99.9 ms | max ms | RSS front MiB | RSS back MiB | RSS pair MiB | errors |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        local name rps errs src p50 p99 p999 pmax lrps lok rf rb
        while IFS=$'\t' read -r name rps errs src p50 p99 p999 pmax lrps lok rf rb; do
            if [[ "$rps" == FAILED || "$rps" == SKIPPED ]]; then
                echo "| $name | $(hop_of "$name") | ${rps,,} | | | | | | | | | |"
                continue
            fi
            local ratio pair
            ratio=$(awk -v a="$rps" -v b="$best" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
            pair=""; [[ -n "$rf" || -n "$rb" ]] && pair=$(( ${rf:-0} + ${rb:-0} ))
            local e=$errs
            [[ "$src" == oha ]] && e="$errs / ${lok:--}"
            printf '| %s | %s | %.0f | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
                "$name" "$(hop_of "$name")" "$rps" "$ratio" "$(fmt_ms "$p50")" "$(fmt_ms "$p99")" \
                "$(fmt_ms "$p999")" "$(fmt_ms "$pmax")" \
                "$(mib "$rf")" "$(mib "$rb")" "$(mib "$pair")" "$e"
        done <"$SUMMARY"
        echo
        echo "× best peer = req/s ÷ the higher req/s of the haproxy and nginx pairs in this run. Latency: $lat_hdr."
        echo "RSS = peak resident set (max of VmRSS sampled every 0.2 s during the wrk run and VmHWM after it)."
        if [[ -n "$OHA" ]]; then
            echo "errors = wrk (socket errors + non-2xx) / oha (failed + non-200); anything but 0 / 0 makes the row invalid."
        else
            echo "errors = wrk socket errors + non-2xx responses."
        fi
        if [[ -s "$NOTES" ]]; then echo; echo "Notes:"; sed 's/^/- /' "$NOTES"; fi
    } >"$OUT/results.md"
    cat "$OUT/results.md"
}

# ---------------------------------------------------------------- main
main() {
    command -v wrk >/dev/null || die "wrk not installed"
    command -v haproxy >/dev/null || log "haproxy not installed; its row will fail"
    command -v curl >/dev/null || die "curl not installed"
    mkdir -p "$OUT" "$RAW" "$CONF" "$CERTS"
    # The script itself (RSS sampler, curl checks) stays off the servers' CPU.
    [[ -n "$LOAD_CPUS" ]] && taskset -pc "$LOAD_CPUS" $$ >/dev/null
    rm -f "$RAW"/* "$SUMMARY" "$NOTES"; : >"$SUMMARY"; : >"$NOTES"

    local p
    for p in $P_UP $P_CRANK_FRONT $P_CRANK_BACK $P_CRANK_ADMIN_FRONT $P_CRANK_ADMIN_BACK \
             $P_HAP_FRONT $P_HAP_BACK $P_NGX_FRONT $P_NGX_BACK; do
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

    local s
    for s in $SETUPS; do
        FRONT_PID=; BACK_PID=; URL=; SKIP_REASON=; SKIPPED=0; HOP_PORT=
        log "== $s"
        if ! "setup_$s"; then
            fail_row "$s" "${SKIP_REASON:-setup failed}" "$( ((SKIPPED)) && echo SKIPPED || echo FAILED)"
            stop_pids ${FRONT_PID:-} ${BACK_PID:-}
            continue
        fi
        if ! wait_ok "$URL"; then
            fail_row "$s" "no 200 \"ok\" through $URL: $(curl -s -m 2 -o /dev/null -w '%{http_code}' "$URL")"
            stop_pids ${FRONT_PID:-} ${BACK_PID:-}
            continue
        fi
        measure "$s" "$URL" "$FRONT_PID" "$BACK_PID"
        [[ -n "$FRONT_PID$BACK_PID" ]] && stop_pids ${FRONT_PID:-} ${BACK_PID:-}
    done
    stop_pids "$UP_PID"
    echo
    report
}

# observe_hop NAME: during the warm-up, note how many TCP connections carry the
# sidecar hop, and for haproxy which mux its front uses towards the back (the
# h1/h2 counters of backend `to_back` in `show stat`).
observe_hop() {
    [[ -n "${HOP_PORT:-}" ]] || return 0
    local n
    n=$(ss -Htn state established "dport = :$HOP_PORT" 2>/dev/null | wc -l)
    echo "$1: $n TCP connection(s) on the sidecar hop under c$CONNS load" >>"$NOTES"
    if [[ "$1" == crank ]]; then
        curl -s -m 2 "http://127.0.0.1:$P_CRANK_ADMIN_FRONT/metrics" >"$RAW/crank.front.metrics.txt" 2>&1
        curl -s -m 2 "http://127.0.0.1:$P_CRANK_ADMIN_BACK/metrics" >"$RAW/crank.back.metrics.txt" 2>&1
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
