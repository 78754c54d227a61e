#!/usr/bin/env bash
# The shim's job queue: submit-to-start latency and jobs per second with
# three shims and no-op jobs, on the shared PostgreSQL queue
# (exec.queue.postgres) against the embedded redb default (three
# independent shims, submissions spread round-robin); then the claim
# query's cost with 100,000 jobs queued (EXPLAIN ANALYZE).
#
#   bash benches/jobs.sh              # both queues, then the claim query
#
# Latency is the record's queue_wait_seconds (submitted_ms to the first
# run's start, both taken by the shims); jobs/s is N over the span from the
# first submission to the last job's end. The no-op tool is `sh -c 'echo >
# "$1"'` (one byte of output, since success needs an output), so the
# figures are the queue's and the shim's, not a tool's.
#
# Knobs: N [400] jobs per queue, P [8] concurrent submitters, SLOTS [4]
# cpu_slots per shim, QUEUED [100000] jobs for the claim query,
# CRANK_SHIM [target/release/crank-shim, else target/debug/crank-shim],
# PG_BIN [/usr/lib/postgresql/15/bin]. Needs curl, python3 and Debian's
# postgresql package; run as root (the server runs as `postgres`) or as a
# user that may run postgres. Not part of .ci/run.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
N=${N:-400}
P=${P:-8}
SLOTS=${SLOTS:-4}
QUEUED=${QUEUED:-100000}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
SHIM=${CRANK_SHIM:-$ROOT/target/release/crank-shim}
[ -x "$SHIM" ] || SHIM=$ROOT/target/debug/crank-shim
[ -x "$SHIM" ] || { echo "no crank-shim: cargo build -p crank-shim" >&2; exit 1; }

WORK=$(mktemp -d /tmp/crank-jobs-bench.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do { kill -9 "$p"; wait "$p"; } 2>/dev/null || true; done
  local pid
  if pid=$(head -1 "$WORK/pg/data/postmaster.pid" 2>/dev/null); then
    kill -INT "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  fi
  [ -n "${KEEP:-}" ] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
as_pg() { if [ "$(id -u)" = 0 ]; then setpriv --reuid=postgres --regid=postgres --clear-groups "$@"; else "$@"; fi; }

start_pg() {
  PG_PORT=$(free_port)
  mkdir -p "$WORK/pg"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$WORK/pg"
  as_pg "$PG_BIN/initdb" -D "$WORK/pg/data" -U postgres --auth=trust -E UTF8 --locale=C --no-sync >/dev/null
  as_pg "$PG_BIN/postgres" -D "$WORK/pg/data" -k "$WORK/pg" -p "$PG_PORT" \
    -c listen_addresses=127.0.0.1 -c max_connections=200 >"$WORK/pg.log" 2>&1 &
  until "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; do sleep 0.1; done
  psql_do postgres "CREATE DATABASE crank" >/dev/null
}
psql_do() { "$PG_BIN/psql" -X -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$1" -c "$2"; }

# start_shim NAME QUEUE_YAML: a shim with the no-op tool; its URL in $URL.
start_shim() {
  local name=$1 queue=$2 listen admin
  listen=$(free_port); admin=$(free_port)
  cat >"$WORK/$name.yaml" <<EOF
mode: exec
listen: 127.0.0.1:$listen
admin_listen: 127.0.0.1:$admin
capability: noop:v1
registration_file: $WORK/$name-registration.json
host: {powercap_root: $WORK/no-powercap}
exec:
  command: [sh, -c, 'echo > "\$1"', sh, "{output}"]
  work_dir: $WORK/$name-work
  devices: {cpu_slots: $SLOTS}
  max_queue: 100000
$queue
EOF
  CRANK_LOG=warn "$SHIM" --config "$WORK/$name.yaml" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  until curl -sf "http://127.0.0.1:$admin/ready" >/dev/null; do sleep 0.05; done
  URL="http://127.0.0.1:$listen"
}

# run_queue LABEL URL...: N submissions spread over the URLs, P at a time;
# waits for every job, then prints the figures.
run_queue() {
  local label=$1; shift
  local urls=("$@")
  : >"$WORK/ids"
  for i in $(seq 0 $((N - 1))); do echo "${urls[$((i % ${#urls[@]}))]}"; done |
    xargs -P "$P" -I@@ curl -s -X POST -H 'content-type: application/json' \
      --data-binary '{"params": {}}' '@@/v1/jobs' -o /dev/null -w '%{http_code}\n' >"$WORK/codes"
  local ok; ok=$(grep -c '^201$' "$WORK/codes" || true)
  python3 - "$label" "$N" "$ok" "${urls[@]}" <<'PY'
import json, sys, time, urllib.request
label, n, ok, urls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
def jobs():
    seen = {}
    for u in urls:
        with urllib.request.urlopen(f"{u}/v1/jobs?limit=100000") as r:
            for j in json.load(r)["jobs"]:
                seen[j["id"]] = j
    return list(seen.values())
deadline = time.time() + 120
while True:
    js = jobs()
    done = [j for j in js if j["state"] in ("succeeded", "failed", "canceled", "timed_out")]
    if len(done) >= ok:
        break
    if time.time() > deadline:
        sys.exit(f"{label}: only {len(done)} of {ok} jobs ended within the deadline")
        break
    time.sleep(0.2)
waits = sorted(j["queue_wait_seconds"] * 1000 for j in done if j.get("queue_wait_seconds") is not None)
succeeded = sum(j["state"] == "succeeded" for j in done)
span = (max(j["finished_ms"] for j in done) - min(j["submitted_ms"] for j in done)) / 1000
q = lambda p: waits[min(len(waits) - 1, int(p * len(waits)))]
print(f"{label}: {ok}/{n} accepted, {succeeded} succeeded; submit-to-start p50 {q(0.5):.1f} ms, "
      f"p95 {q(0.95):.1f} ms, max {waits[-1]:.1f} ms; {ok / span:.1f} jobs/s over {span:.2f} s")
PY
}

echo "crank-shim: $SHIM; $N no-op jobs, $P submitters, 3 shims x $SLOTS slots; $(nproc) CPUs"

start_pg
PGQ="  queue:
    postgres: {url: \"postgres://postgres@127.0.0.1:$PG_PORT/crank\", host: HOST, lease: 15s, heartbeat: 5s}"
pg_urls=()
for h in a b c; do start_shim "pg-$h" "${PGQ/HOST/pg-$h}"; pg_urls+=("$URL"); done
run_queue "postgres queue" "${pg_urls[@]}"

redb_urls=()
for h in a b c; do start_shim "redb-$h" ""; redb_urls+=("$URL"); done
run_queue "redb (embedded) " "${redb_urls[@]}"

# The claim query at QUEUED queued jobs of 10 tenants: the statement that
# chooses the job (worker-shim/src/jobs/pg.rs, CLAIM_SQL) with its
# parameters written in; locking the chosen row by id (LOCK_SQL) is a
# primary-key lookup.
psql_do crank "INSERT INTO crank_jobs (id, seq, capability, tenant, priority, need, state, record)
  SELECT 'b-' || g, nextval('crank_jobs_seq'), 'noop:v1', 't' || (g % 10), g % 5, 'any', 'queued',
         jsonb_build_object('id', 'b-' || g)
  FROM generate_series(1, $QUEUED) g; ANALYZE crank_jobs" >/dev/null
CLAIM=$(python3 - "$ROOT/worker-shim/src/jobs/pg.rs" <<'PY'
import re, sys
src = open(sys.argv[1]).read()
sql = re.search(r'pub const CLAIM_SQL: &str = "(.*?)";', src, re.S).group(1)
args = {"$1": "'noop:v1'", "$2": "ARRAY['any','cpu']", "$3": "4",
        "$4": "ARRAY['t1','t2']::text[]", "$5": "ARRAY[2.0,1.0]::float8[]",
        "$6": "ARRAY[-1,-1]::int8[]", "$7": "1.0", "$8": "-1", "$9": "ARRAY[]::text[]"}
for k in sorted(args, key=len, reverse=True):
    sql = sql.replace(k, args[k])
print(sql)
PY
)
echo "claim query at $QUEUED queued jobs:"
"$PG_BIN/psql" -X -At -h 127.0.0.1 -p "$PG_PORT" -U postgres -d crank <<SQL | grep -E 'Planning Time|Execution Time|^Limit'
BEGIN;
EXPLAIN (ANALYZE, BUFFERS) $CLAIM;
ROLLBACK;
SQL
