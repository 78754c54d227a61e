#!/usr/bin/env bash
# Crank Mesh quickstart: builds the mesh, makes a root and an intermediate CA,
# starts crank-control (the mesh CA), and runs a frontend and a backend demo
# app, each behind its own crank-proxy sidecar that enrolls with a one-time
# join token and renews its certificate by itself; mTLS between the sidecars.
# With --with-shim it also runs the worker shim example (deploy/shim/
# transcode.yaml: ffmpeg as capability transcode:v1) behind its own sidecar,
# and a caller sidecar for tenant acme that may use it.
# Ctrl-C stops everything.
#
#   bash deploy/quickstart.sh                 # run until Ctrl-C
#   bash deploy/quickstart.sh --with-shim     # also the ffmpeg worker (installs ffmpeg)
#   QS_ONESHOT=1 bash deploy/quickstart.sh    # check end to end, run every printed
#                                             # 'try next' line, stop, exit 0/1
#   QS_BASE_PORT=28000 bash deploy/quickstart.sh   # move every port (default 18000)
#   QS_PROFILE=debug bash deploy/quickstart.sh      # use debug builds (the test suite does)
#
# Ports, state and logs are described in deploy/README.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=$ROOT/.quickstart
CA=$STATE/ca
PROFILE=${QS_PROFILE:-release}
case "$PROFILE" in
    release) PROFILE_FLAG=(--release) ;;
    debug) PROFILE_FLAG=() ;;
    *) echo "quickstart: QS_PROFILE must be release or debug" >&2; exit 1 ;;
esac
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE
BASE=${QS_BASE_PORT:-18000}
ONESHOT=${QS_ONESHOT:-0}
WITH_SHIM=${QS_WITH_SHIM:-0}
READY_TIMEOUT=30

log() { printf '==> %s\n' "$*"; }
die() { printf 'quickstart: error: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,/^# Ports, state/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
for arg in "$@"; do
    case "$arg" in
        --with-shim) WITH_SHIM=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument $arg; try --with-shim or --help" ;;
    esac
done

[[ $BASE =~ ^[0-9]+$ ]] && ((BASE >= 1024 && BASE + 904 <= 65535)) ||
    die "QS_BASE_PORT=$BASE must be a number from 1024 to 64631 (every port is BASE + 70..904)"

LO=127.0.0.1
BACKEND_APP=$((BASE + 80))
BACKEND_INBOUND=$((BASE + 443))
BACKEND_ADMIN=$((BASE + 901))
FRONTEND_APP=$((BASE + 81))
FRONTEND_HTTP_PROXY=$((BASE + 140))
FRONTEND_BACKEND_PORT=$((BASE + 501))
FRONTEND_ADMIN=$((BASE + 902))
FRONTEND_INBOUND=$((BASE + 444))
CONTROL=$((BASE + 445))
DASHBOARD=$((BASE + 480))
ALL_PORTS=("$BACKEND_APP" "$BACKEND_INBOUND" "$BACKEND_ADMIN" "$FRONTEND_APP"
    "$FRONTEND_HTTP_PROXY" "$FRONTEND_BACKEND_PORT" "$FRONTEND_ADMIN" "$FRONTEND_INBOUND" "$CONTROL" "$DASHBOARD")
# --with-shim: crank-shim (deploy/shim/transcode.yaml, its ports moved here),
# its sidecar (transcoder.media), and a caller sidecar (web.acme).
SHIM_LISTEN=$((BASE + 70))
SHIM_ADMIN=$((BASE + 71))
TRANSCODER_INBOUND=$((BASE + 446))
TRANSCODER_ADMIN=$((BASE + 903))
WEB_HTTP_PROXY=$((BASE + 141))
WEB_ADMIN=$((BASE + 904))
if [[ $WITH_SHIM == 1 ]]; then
    ALL_PORTS+=("$SHIM_LISTEN" "$SHIM_ADMIN" "$TRANSCODER_INBOUND" "$TRANSCODER_ADMIN" "$WEB_HTTP_PROXY" "$WEB_ADMIN")
fi
# crankctl finds crank-control's admin socket here (the printed commands
# spell it out with --control instead).
export CRANK_CONTROL=$STATE/control/admin.sock

# Our own calls go straight to loopback, whatever proxy the user's shell sets.
qcurl() { curl --noproxy '*' --max-time 15 "$@"; }

# --- stopping -------------------------------------------------------------

PIDS=()
NAMES=()

stop_all() {
    local status=$?
    trap - INT TERM EXIT
    ((${#PIDS[@]})) || exit "$status"
    kill -TERM "${PIDS[@]}" 2>/dev/null || true
    # The sidecars drain for up to 5 s; give everything 10 s, then insist.
    local deadline=$((SECONDS + 10)) pid
    for pid in "${PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait "${PIDS[@]}" 2>/dev/null || true
    echo "stopped (logs are in ${STATE#"$ROOT"/}/)"
    exit "$status"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- steps ----------------------------------------------------------------

install_system_packages() {
    local pkgs=(cmake pkg-config build-essential curl ca-certificates) missing=() p
    # The shim example runs ffmpeg.
    [[ $WITH_SHIM == 1 ]] && pkgs+=(ffmpeg)
    if ! command -v dpkg >/dev/null; then
        log "not a Debian system: make sure ${pkgs[*]} (or their equivalents) are installed"
        return
    fi
    for p in "${pkgs[@]}"; do
        dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        log "system packages present: ${pkgs[*]}"
        return
    fi
    local sudo=()
    if (($(id -u) != 0)); then
        command -v sudo >/dev/null || die "missing ${missing[*]}; run as root or install sudo"
        sudo=(sudo)
    fi
    log "installing ${missing[*]}"
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

build() {
    if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
        PATH=$HOME/.cargo/bin:$PATH
    fi
    if ! command -v cargo >/dev/null; then
        # A fresh machine has no Rust: install it the official way (rustup,
        # no changes to shell profiles); rust-toolchain.toml pins the version.
        log "cargo not found: installing Rust with rustup into ~/.cargo"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
            sh -s -- -y --profile minimal --no-modify-path ||
            die "installing Rust failed; install it yourself (https://rustup.rs) and rerun"
        PATH=$HOME/.cargo/bin:$PATH
    fi
    log "building ($PROFILE): crank-proxy, crank-control, crankctl, crank-shim, the demo apps"
    (cd "$ROOT" && cargo build "${PROFILE_FLAG[@]}" --workspace --bins)
}

check_ports_free() {
    local port
    for port in "${ALL_PORTS[@]}"; do
        if (exec 3<>"/dev/tcp/$LO/$port") 2>/dev/null; then
            die "$LO:$port is already in use (an earlier quickstart still running?); stop it or set QS_BASE_PORT"
        fi
    done
}

make_ca() {
    log "making a root CA (kept offline in real life) and an intermediate in ${CA#"$ROOT"/}"
    rm -rf "$STATE/control" "$STATE"/*-identity "$CA" "$STATE/shim"
    mkdir -p "$STATE"
    "$BIN/crankctl" ca init --dir "$CA/root"
    "$BIN/crankctl" ca intermediate --root "$CA/root" --out "$CA/int1"
    cat >"$STATE/control.yaml" <<EOF
listen: $LO:$CONTROL
state_dir: control
admin_socket: control/admin.sock
# The web dashboard (read-only, no login: loopback only).
dashboard_listen: $LO:$DASHBOARD
ca:
  intermediate: ca/int1
# Routes, quotas, SLOs and policies from files, pushed to the sidecars.
config_dir: $(yq "$ROOT/deploy/mesh-config")
EOF
}

# A YAML single-quoted scalar.
yq() { local s=${1//\'/\'\'}; printf "'%s'" "$s"; }

# identity_yaml SERVICE [TENANT]: the sidecar enrolls as SERVICE.TENANT (default
# tenant demo) with a fresh one-time token.
identity_yaml() {
    local tenant=${2:-demo}
    "$BIN/crankctl" token create --service "$1" --tenant "$tenant" 2>/dev/null >"$STATE/$1.token"
    cat <<EOF
identity:
  trust_bundle: $(yq "$CA/root/bundle.pem")
  enroll:
    control_plane: $LO:$CONTROL
    service: $1
    tenant: $tenant
    token_file: $(yq "$STATE/$1.token")
    state_dir: $(yq "$STATE/$1-identity")
EOF
}

common_yaml() {
    cat <<EOF
admin:
  listen: $LO:$1
threads: 1
drain:
  deadline: 5s
EOF
}

write_configs() {
    log "writing sidecar configs in ${STATE#"$ROOT"/}"
    {
        identity_yaml backend
        cat <<EOF
inbound:
  listen: $LO:$BACKEND_INBOUND
  app: $LO:$BACKEND_APP
  app_protocol: auto
# The shipped Rego policies (policies/), checked on every inbound request.
policy:
  inbound:
    dir: $(yq "$ROOT/policies")
  decision_log:
    path: $(yq "$STATE/backend-decisions.log")
# Register this workload (capability hello:v1) in crank-control's registry;
# the frontend's route to it comes from deploy/mesh-config/routes/hello.yaml.
mesh:
  report_interval: 2s    # traffic reports for the dashboard (default 10s)
  register:
    capabilities: [hello:v1]
    labels: {pool: demo}
EOF
        common_yaml "$BACKEND_ADMIN"
    } >"$STATE/backend-proxy.yaml"
    {
        identity_yaml frontend
        cat <<EOF
inbound:
  listen: $LO:$FRONTEND_INBOUND
  app: $LO:$FRONTEND_APP
  app_protocol: auto
outbound:
  http_proxy: $LO:$FRONTEND_HTTP_PROXY
  ports:
    - listen: $LO:$FRONTEND_BACKEND_PORT
      route: backend
routes:
  - name: backend
    hosts: [backend]
    endpoints:
      - address: $LO:$BACKEND_INBOUND
        identity: backend.demo.crank.local
# Routes, quotas and policies pushed by crank-control replace the ones
# above (they stay as the fallback until the first update arrives).
mesh:
  report_interval: 2s    # traffic reports for the dashboard (default 10s)
EOF
        common_yaml "$FRONTEND_ADMIN"
    } >"$STATE/frontend-proxy.yaml"
    if [[ $WITH_SHIM == 1 ]]; then write_shim_configs; fi
}

# The shipped shim example as it is, with its ports and paths moved into this
# run; the transcoder's sidecar; the web.acme caller's sidecar; a sample clip.
write_shim_configs() {
    local src=$ROOT/deploy/shim/transcode.yaml dst=$STATE/transcode-shim.yaml key
    mkdir -p "$STATE/shim/work"
    sed -e "s|^listen: .*|listen: $LO:$SHIM_LISTEN|" \
        -e "s|^admin_listen: .*|admin_listen: $LO:$SHIM_ADMIN|" \
        -e "s|^registration_file: .*|registration_file: $(yq "$STATE/shim/registration.json")|" \
        -e "s|^  work_dir: .*|  work_dir: $(yq "$STATE/shim/work")|" "$src" >"$dst"
    for key in "listen: $LO:$SHIM_LISTEN" "admin_listen: $LO:$SHIM_ADMIN" "registration_file: '" "  work_dir: '"; do
        grep -q "^$key" "$dst" || die "deploy/shim/transcode.yaml has no '${key%%:*}:' line to move into ${STATE#"$ROOT"/}"
    done
    {
        identity_yaml transcoder media
        cat <<EOF
inbound:
  listen: $LO:$TRANSCODER_INBOUND
  app: $LO:$SHIM_LISTEN
# The shipped policies: only tenants with role media (policies/data.yaml) may
# call transcode:v1, so web.acme may and frontend.demo may not.
policy:
  inbound:
    dir: $(yq "$ROOT/policies")
  decision_log:
    path: $(yq "$STATE/transcoder-decisions.log")
# Register what crank-shim writes (capability transcode:v1 and its labels,
# gpu=none without an NVIDIA GPU): deploy/mesh-config/routes/transcode.yaml
# routes there.
mesh:
  report_interval: 2s
  register:
    from_file: $(yq "$STATE/shim/registration.json")
EOF
        common_yaml "$TRANSCODER_ADMIN"
    } >"$STATE/transcoder-proxy.yaml"
    {
        identity_yaml web acme
        cat <<EOF
# A caller of tenant acme (role media): send requests through this proxy.
outbound:
  http_proxy: $LO:$WEB_HTTP_PROXY
mesh:
  report_interval: 2s
EOF
        common_yaml "$WEB_ADMIN"
    } >"$STATE/web-proxy.yaml"
    ffmpeg -hide_banner -loglevel error -f lavfi -i testsrc=duration=2:size=320x240:rate=25 \
        -f lavfi -i sine=frequency=440:duration=2 -c:v mpeg4 -c:a pcm_s16le -y "$STATE/clip.mkv" ||
        die "ffmpeg could not make the sample clip ${STATE#"$ROOT"/}/clip.mkv"
}

# start NAME COMMAND...: runs COMMAND in the background, logging to .quickstart/NAME.log.
start() {
    local name=$1
    shift
    "$@" >"$STATE/$name.log" 2>&1 &
    PIDS+=("$!")
    NAMES+=("$name")
}

start_control() {
    log "starting crank-control (the mesh CA) on $LO:$CONTROL"
    start control "$BIN/crank-control" --config "$STATE/control.yaml"
    local deadline=$((SECONDS + READY_TIMEOUT))
    until "$BIN/crankctl" ca status >/dev/null 2>&1; do
        if ! kill -0 "${PIDS[0]}" 2>/dev/null; then
            tail -n 20 "$STATE/control.log" >&2 || true
            die "crank-control exited; see ${STATE#"$ROOT"/}/control.log"
        fi
        ((SECONDS < deadline)) || die "crank-control did not answer within ${READY_TIMEOUT}s; see ${STATE#"$ROOT"/}/control.log"
        sleep 0.2
    done
    log "crank-control ready (crankctl ca status answers); dashboard: http://$LO:$DASHBOARD/"
}

start_all() {
    log "starting the backend app, both sidecars and the frontend app"
    start backend "$BIN/crank-demo-backend" --listen "$LO:$BACKEND_APP" --name backend
    start backend-proxy "$BIN/crank-proxy" --config "$STATE/backend-proxy.yaml"
    start frontend-proxy "$BIN/crank-proxy" --config "$STATE/frontend-proxy.yaml"
    # How an unmodified app adopts its sidecar: HTTP_PROXY. The lowercase one
    # wins in most clients, so set both, and clear NO_PROXY.
    local proxy=http://$LO:$FRONTEND_HTTP_PROXY
    start frontend env HTTP_PROXY="$proxy" http_proxy="$proxy" NO_PROXY= no_proxy= \
        "$BIN/crank-demo-frontend" --listen "$LO:$FRONTEND_APP" --name frontend \
        --backend-url http://backend/hello
    if [[ $WITH_SHIM == 1 ]]; then
        log "starting crank-shim (ffmpeg as transcode:v1), its sidecar and the web.acme caller's sidecar"
        start transcode-shim "$BIN/crank-shim" --config "$STATE/transcode-shim.yaml"
        start transcoder-proxy "$BIN/crank-proxy" --config "$STATE/transcoder-proxy.yaml"
        start web-proxy "$BIN/crank-proxy" --config "$STATE/web-proxy.yaml"
    fi
}

# wait_ready INDEX URL: polls URL until 200, failing if process INDEX exits or time runs out.
wait_ready() {
    local i=$1 url=$2 name=${NAMES[$1]} deadline=$((SECONDS + READY_TIMEOUT))
    until qcurl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; do
        if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
            tail -n 20 "$STATE/$name.log" >&2 || true
            die "$name exited; its log is ${STATE#"$ROOT"/}/$name.log (last lines above)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 20 "$STATE/$name.log" >&2 || true
            die "$name did not answer $url within ${READY_TIMEOUT}s; see ${STATE#"$ROOT"/}/$name.log"
        fi
        sleep 0.2
    done
    log "$name ready ($url)"
}

wait_all_ready() {
    wait_ready 1 "http://$LO:$BACKEND_APP/healthz"
    wait_ready 2 "http://$LO:$BACKEND_ADMIN/ready"
    wait_ready 3 "http://$LO:$FRONTEND_ADMIN/ready"
    wait_ready 4 "http://$LO:$FRONTEND_APP/healthz"
    if [[ $WITH_SHIM == 1 ]]; then
        wait_ready 5 "http://$LO:$SHIM_ADMIN/ready"
        wait_ready 6 "http://$LO:$TRANSCODER_ADMIN/ready"
        wait_ready 7 "http://$LO:$WEB_ADMIN/ready"
    fi
}

# check WHAT CURL_ARGS...: one request that must answer 200 with the backend's
# JSON for GET /hello; prints the body and leaves it in BODY.
BODY=
check() {
    local what=$1 out code
    shift
    out=$(curl --max-time 15 -sS -w '\n%{http_code}' "$@" 2>&1) || true
    code=${out##*$'\n'}
    BODY=${out%$'\n'*}
    BODY=${BODY%$'\n'}
    printf '%s\n' "$BODY"
    if [[ $code != 200 ]]; then
        echo "FAIL: $what answered HTTP $code" >&2
        return 1
    fi
    if ! grep -q '"service": "backend"' <<<"$BODY" || ! grep -q '"path": "/hello"' <<<"$BODY"; then
        echo "FAIL: $what: the answer does not show the backend receiving GET /hello" >&2
        return 1
    fi
    echo "OK: $what reached the backend"
}

# check_dashboard: the dashboard's /api/state answers JSON naming both
# workloads and their certificates (the sidecars report every 2 s; up to 15 s).
check_dashboard() {
    local url=http://$LO:$DASHBOARD/api/state state="" deadline=$((SECONDS + 15))
    while ((SECONDS < deadline)); do
        if state=$(qcurl -fsS "$url" 2>&1) && grep -q '"identity":"frontend.demo.crank.local"' <<<"$state" &&
            grep -q '"identity":"backend.demo.crank.local"' <<<"$state" && grep -q '"kind":"leaf"' <<<"$state"; then
            echo "OK: the dashboard at http://$LO:$DASHBOARD/ shows both workloads and their certificates"
            return 0
        fi
        sleep 0.5
    done
    echo "FAIL: the dashboard's state ($url) does not show both workloads and their certificates within 15 s: ${state:0:300}; see ${STATE#"$ROOT"/}/control.log" >&2
    return 1
}

# wait_pushed: true once the frontend sidecar applied a config from crank-control
# and the backend is registered (up to 15 s).
wait_pushed() {
    local deadline=$((SECONDS + 15))
    until qcurl -fsS "http://$LO:$FRONTEND_ADMIN/config_dump" 2>/dev/null | grep -q '"source": "pushed"' &&
        "$BIN/crankctl" endpoints 2>/dev/null | grep -q 'hello:v1'; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# via_web ARGS...: curl through the web.acme caller's sidecar.
via_web() { curl --max-time 15 -sS -x "http://$LO:$WEB_HTTP_PROXY" "$@"; }

# check_shim: web.acme submits the sample clip to the transcoder through the
# mesh (route, quota and policy from deploy/mesh-config), the job succeeds and
# its output downloads; frontend.demo is refused by the shipped policy.
check_shim() {
    log "shim example: web.acme sidecar -> mTLS -> transcoder sidecar (policy) -> crank-shim -> ffmpeg"
    local deadline=$((SECONDS + 20)) out id state=
    until via_web -f -o /dev/null http://transcode/v1/schema 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            echo "FAIL: web.acme cannot reach http://transcode/v1/schema within 20 s; see ${STATE#"$ROOT"/}/web-proxy.log, transcoder-proxy.log, transcode-shim.log" >&2
            return 1
        fi
        sleep 0.3
    done
    out=$(via_web --data-binary "@$STATE/clip.mkv" 'http://transcode/v1/jobs?height=144&preset=ultrafast') || true
    id=$(sed -n 's/^ *"id": *"\([^"]*\)".*/\1/p' <<<"$out" | head -n 1)
    if [[ -z $id ]]; then
        echo "FAIL: the job submission was not accepted: $out" >&2
        return 1
    fi
    deadline=$((SECONDS + 60))
    while ((SECONDS < deadline)); do
        state=$(via_web "http://transcode/v1/jobs/$id" | sed -n 's/^  "state": *"\([^"]*\)".*/\1/p')
        [[ $state == succeeded || $state == failed || $state == timed_out || $state == canceled ]] && break
        sleep 1
    done
    if [[ $state != succeeded ]]; then
        echo "FAIL: job $id ended $state (or did not end in 60 s); see ${STATE#"$ROOT"/}/transcode-shim.log" >&2
        return 1
    fi
    via_web -f -o "$STATE/out.mp4" "http://transcode/v1/jobs/$id/output" && [[ -s $STATE/out.mp4 ]] || {
        echo "FAIL: the output of job $id did not download" >&2
        return 1
    }
    echo "OK: job $id transcoded ${STATE#"$ROOT"/}/clip.mkv to ${STATE#"$ROOT"/}/out.mp4 ($(wc -c <"$STATE/out.mp4") bytes)"
    out=$(curl --max-time 15 -sS -i -x "http://$LO:$FRONTEND_HTTP_PROXY" http://transcode/v1/schema) || true
    if grep -q '^HTTP/[0-9.]* 403' <<<"$out" && grep -q 'needs role' <<<"$out"; then
        echo "OK: frontend.demo is refused by the shipped policy (tenant demo has no role media)"
    else
        echo "FAIL: frontend.demo should get 403 from the transcoder's policy, got: $out" >&2
        return 1
    fi
}

sample_requests() {
    log "sample request: frontend app -> HTTP_PROXY (frontend sidecar) -> mTLS -> backend sidecar -> backend app"
    echo "\$ curl -s http://$LO:$FRONTEND_APP/"
    local failed=0
    if ! wait_pushed; then
        echo "FAIL: the frontend sidecar did not get its routes from crank-control within 15 s; see ${STATE#"$ROOT"/}/frontend-proxy.log and control.log" >&2
        return 1
    fi
    check "the frontend (GET /)" --noproxy '*' "http://$LO:$FRONTEND_APP/" || failed=1
    if [[ $ONESHOT == 1 ]]; then
        log "also checking the local upstream port and the HTTP proxy listener"
        check "the local upstream port" --noproxy '*' "http://$LO:$FRONTEND_BACKEND_PORT/hello" || failed=1
        check "the HTTP proxy listener" -x "http://$LO:$FRONTEND_HTTP_PROXY" "http://backend/hello" || failed=1
        check_dashboard || failed=1
        echo "OK: the frontend sidecar runs the routes crank-control pushed (deploy/mesh-config):"
        "$BIN/crankctl" routes | sed 's/^/    /'
        if grep -q '"result":"allow"' "$STATE/backend-decisions.log" 2>/dev/null; then
            echo "OK: the backend sidecar's policy allowed them (decision log ${STATE#"$ROOT"/}/backend-decisions.log)"
        else
            echo "FAIL: no allow decision in ${STATE#"$ROOT"/}/backend-decisions.log" >&2
            failed=1
        fi
    fi
    if [[ $WITH_SHIM == 1 ]]; then
        check_shim || failed=1
    fi
    return "$failed"
}

# q PATH: PATH relative to the repository root when inside it, quoted for a shell.
q() { printf '%q' "${1#"$ROOT"/}"; }

# next_steps: the 'try next' lines. Each is a whole command that works on its
# own, pasted into a fresh shell in the repository root (ports, socket and
# paths spelled out); one-shot mode runs every one of them.
next_steps() {
    local ctl
    ctl="$(q "$BIN/crankctl") --control $(q "$STATE/control/admin.sock")"
    step() { printf '  %-60s # %s\n' "$1" "$2"; }
    step "curl http://$LO:$FRONTEND_APP/" "the frontend app; it calls the backend via its sidecar"
    step "curl http://$LO:$FRONTEND_BACKEND_PORT/" "the backend through the sidecar's local upstream port"
    step "curl -x http://$LO:$FRONTEND_HTTP_PROXY http://backend/" "the backend through the sidecar's HTTP proxy"
    step "curl http://$LO:$FRONTEND_ADMIN/metrics" "frontend sidecar admin: /metrics /config_dump /ready /live"
    step "curl http://$LO:$FRONTEND_ADMIN/config_dump" "the config the frontend sidecar runs"
    step "curl http://$LO:$BACKEND_ADMIN/ready" "backend sidecar admin, same endpoints"
    step "tail -n 5 $(q "$STATE/backend-decisions.log")" "the backend sidecar's policy decisions (policies/)"
    step "$ctl ca status" "the CA: roots, intermediates, every workload"
    step "$ctl cert list" "every issued certificate and its expiry"
    step "$ctl status" "the published mesh config (deploy/mesh-config) and every sidecar"
    step "$ctl routes" "the routes with their live endpoints"
    step "$ctl endpoints" "the registry: who serves which capability"
    step "curl http://$LO:$DASHBOARD/api/state" "what the dashboard shows, as JSON"
    if [[ $WITH_SHIM == 1 ]]; then
        step "curl -x http://$LO:$WEB_HTTP_PROXY http://transcode/v1/schema" "the transcoder's parameters, as tenant acme"
        step "curl -x http://$LO:$WEB_HTTP_PROXY --data-binary @$(q "$STATE/clip.mkv") 'http://transcode/v1/jobs?height=144&preset=ultrafast'" "submit a transcode job"
        step "curl -x http://$LO:$WEB_HTTP_PROXY http://transcode/v1/jobs" "the jobs; then GET /v1/jobs/ID and /v1/jobs/ID/output"
        step "curl http://$LO:$SHIM_ADMIN/v1/registration" "what crank-shim registers (capability transcode:v1, labels)"
        step "tail -n 5 $(q "$STATE/transcoder-decisions.log")" "the transcoder sidecar's policy decisions"
    fi
}

print_next_steps() {
    local s=${STATE#"$ROOT"/}
    echo
    echo "Crank Mesh quickstart is running."
    echo "Dashboard: http://$LO:$DASHBOARD/ (open it in a browser: the mesh live, certificates, routes, SLOs, refusals)"
    echo "Try next, from $ROOT:"
    next_steps
    echo "Logs:    $s/*.log (one per process)"
    echo "Configs: $s/control.yaml $s/*-proxy.yaml; CA in $s/ca/, enrolled keys in $s/*-identity/"
}

# run_next_steps: runs each 'try next' line as printed, alone, in a fresh
# shell (no inherited environment) in the repository root. curl gets -f, so
# an HTTP error fails the line too.
run_next_steps() {
    log "running every 'try next' line as printed, each in a fresh shell in $ROOT"
    local line out failed=0
    while IFS= read -r line; do
        line=${line#  }
        printf '$ %s\n' "$line"
        if out=$(cd "$ROOT" && env -i PATH="$PATH" HOME="$HOME" bash --norc --noprofile -c \
            "curl() { command curl -f -sS --max-time 15 \"\$@\"; }; $line" 2>&1); then
            printf '%s\n' "$out" | head -n 3 | cut -c1-100 | sed 's/^/    /'
        else
            printf '%s\n' "$out" | tail -n 10 | sed 's/^/    /' >&2
            echo "FAIL: this 'try next' line does not work as printed: $line" >&2
            failed=1
        fi
    done < <(next_steps)
    ((failed == 0)) && echo "OK: every 'try next' line works as printed"
    return "$failed"
}

# Returns when a child exits on its own, naming it.
watch_children() {
    wait -n || true
    local i
    for i in "${!PIDS[@]}"; do
        if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
            die "${NAMES[$i]} exited; see ${STATE#"$ROOT"/}/${NAMES[$i]}.log"
        fi
    done
}

main() {
    cd "$ROOT"
    install_system_packages
    build
    check_ports_free
    make_ca
    start_control
    write_configs
    start_all
    wait_all_ready
    if [[ $ONESHOT == 1 ]]; then
        sample_requests || die "the end-to-end check failed; logs are in ${STATE#"$ROOT"/}/"
        print_next_steps
        run_next_steps || die "a printed 'try next' line failed; logs are in ${STATE#"$ROOT"/}/"
        log "end-to-end check passed"
        exit 0
    fi
    sample_requests || echo "warning: the sample request failed; the logs in ${STATE#"$ROOT"/}/ say why" >&2
    print_next_steps
    echo "Press Ctrl-C to stop."
    while true; do watch_children; done
}

main "$@"
