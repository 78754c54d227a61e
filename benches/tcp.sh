#!/usr/bin/env bash
# Opaque TCP (issue #16): throughput and latency of three paths to the same
# echo server on this machine, interleaved round by round.
#
#   direct        client -> echo
#   crank pair    client -> crank outbound.tcp -> mTLS (TLS 1.3, tunnel) -> crank inbound (inbound.tcp) -> echo
#   haproxy pair  client -> haproxy mode tcp   -> mTLS (TLS 1.3)         -> haproxy mode tcp          -> echo
#
# Per setup and round: throughput (MiB/s) of one connection pushing MIB MiB
# through the echo and reading it back (both directions at once), and the
# round-trip latency of PINGS 64-byte ping-pongs on one open connection
# (p50, p99 in µs), then CONNS fresh connections each doing one ping-pong
# (connections/s: the handshake cost). Ratios are to the direct path and to
# the haproxy pair of the same round; the summary is the median over rounds.
#
#   bash benches/tcp.sh                    # ROUNDS=5
#   ROUNDS=3 MIB=64 bash benches/tcp.sh
#
# Knobs: ROUNDS [5], MIB [256], PINGS [5000], CONNS [300], CRANK_PROXY and
# CRANKCTL [target/release/...], BENCH_NO_INSTALL=1 (do not apt-get haproxy).
# The client and the echo server are Python (the same for every setup);
# each crank sidecar and haproxy runs one thread. Outputs: benches/out/tcp/.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
ROUNDS=${ROUNDS:-5}
MIB=${MIB:-256}
PINGS=${PINGS:-5000}
CONNS=${CONNS:-300}
CRANK_PROXY=${CRANK_PROXY:-$ROOT/target/release/crank-proxy}
CRANKCTL=${CRANKCTL:-$ROOT/target/release/crankctl}
OUT=${OUT:-$ROOT/benches/out/tcp}

die() { echo "tcp.sh: $*" >&2; exit 1; }
[[ -x "$CRANK_PROXY" ]] || die "$CRANK_PROXY not found; cargo build --release -p crank-proxy, or set CRANK_PROXY"
[[ -x "$CRANKCTL" ]] || die "$CRANKCTL not found; cargo build --release -p crank-control, or set CRANKCTL"
if ! command -v haproxy >/dev/null && [[ -z "${BENCH_NO_INSTALL:-}" ]]; then
    sudo=""; [[ $(id -u) -eq 0 ]] || sudo=sudo
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq haproxy
fi
command -v haproxy >/dev/null || die "haproxy is missing (apt-get install haproxy)"
command -v python3 >/dev/null || die "python3 is missing"

rm -rf "$OUT"; mkdir -p "$OUT/conf" "$OUT/raw"
CERTS=$OUT/certs
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P_ECHO=$(port); P_CF=$(port); P_CB=$(port); P_CA1=$(port); P_CA2=$(port); P_HF=$(port); P_HB=$(port)

"$CRANKCTL" ca init --dir "$CERTS" --force >"$OUT/raw/certs.log" 2>&1 || die "crankctl ca init: $(cat "$OUT/raw/certs.log")"
for svc in front back; do
    "$CRANKCTL" cert issue --ca-dir "$CERTS" --service "$svc" --tenant bench >>"$OUT/raw/certs.log" 2>&1 \
        || die "crankctl cert issue $svc: $(cat "$OUT/raw/certs.log")"
done

cat >"$OUT/conf/echo.py" <<'PY'
import socket, sys, threading
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(262144)
    try:
        while True:
            n = c.recv_into(buf)
            if n == 0:
                break
            c.sendall(memoryview(buf)[:n])
    except OSError:
        pass
    finally:
        c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1024)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
PY

cat >"$OUT/conf/client.py" <<'PY'
import socket, sys, threading, time
port, mib, pings, conns = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def conn():
    c = socket.create_connection(("127.0.0.1", port)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); return c
# Throughput: write MIB MiB while reading the echo back.
c = conn(); total = mib << 20; chunk = b"\x5a" * 262144
def writer():
    left = total
    while left > 0:
        n = min(left, len(chunk)); c.sendall(chunk[:n]); left -= n
    c.shutdown(socket.SHUT_WR)
t0 = time.perf_counter(); w = threading.Thread(target=writer); w.start()
got = 0; buf = bytearray(262144)
while True:
    n = c.recv_into(buf)
    if n == 0: break
    got += n
w.join(); secs = time.perf_counter() - t0; c.close()
assert got == total, f"echo returned {got} of {total} bytes"
# Latency: 64-byte ping-pongs on one connection.
c = conn(); msg = b"p" * 64; lat = []
for _ in range(pings):
    t = time.perf_counter(); c.sendall(msg); left = 64
    while left: left -= len(c.recv(left))
    lat.append(time.perf_counter() - t)
c.close(); lat.sort()
# New connections, one ping-pong each.
t1 = time.perf_counter()
for _ in range(conns):
    c = conn(); c.sendall(msg); left = 64
    while left: left -= len(c.recv(left))
    c.close()
cps = conns / (time.perf_counter() - t1)
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1e6
print(f"{total / secs / 1048576:.1f}\t{q(0.5):.0f}\t{q(0.99):.0f}\t{cps:.0f}")
PY

python3 "$OUT/conf/echo.py" "$P_ECHO" & PIDS+=($!)

cat >"$OUT/conf/back.yaml" <<EOF
identity: {cert: $CERTS/back.bench.crt, key: $CERTS/back.bench.key, trust_bundle: $CERTS/bundle.pem}
admin: {listen: 127.0.0.1:$P_CA2}
threads: 1
access_log: false
inbound:
  listen: 127.0.0.1:$P_CB
  app: 127.0.0.1:$P_ECHO
  tcp: [{app: 127.0.0.1:$P_ECHO, capability: echo}]
EOF
cat >"$OUT/conf/front.yaml" <<EOF
identity: {cert: $CERTS/front.bench.crt, key: $CERTS/front.bench.key, trust_bundle: $CERTS/bundle.pem}
admin: {listen: 127.0.0.1:$P_CA1}
threads: 1
access_log: false
outbound:
  tcp: [{listen: 127.0.0.1:$P_CF, capability: echo}]
routes:
  - {name: echo, capability: echo, endpoints: [{address: 127.0.0.1:$P_CB, identity: back.bench.crank.local}]}
EOF
"$CRANK_PROXY" --config "$OUT/conf/back.yaml" >"$OUT/raw/crank.back.log" 2>&1 & PIDS+=($!)
"$CRANK_PROXY" --config "$OUT/conf/front.yaml" >"$OUT/raw/crank.front.log" 2>&1 & PIDS+=($!)

cat "$CERTS/front.bench.crt" "$CERTS/front.bench.key" >"$OUT/conf/front.pem"
cat "$CERTS/back.bench.crt" "$CERTS/back.bench.key" >"$OUT/conf/back.pem"
chmod 600 "$OUT/conf/"*.pem
common="global
    nbthread 1
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
"
printf "%s\nlisten front\n    bind 127.0.0.1:%s\n    server back 127.0.0.1:%s ssl crt %s ca-file %s verify required verifyhost back.bench.crank.local sni str(back.bench.crank.local) ssl-min-ver TLSv1.3\n" \
    "$common" "$P_HF" "$P_HB" "$OUT/conf/front.pem" "$CERTS/bundle.pem" >"$OUT/conf/front.cfg"
printf "%s\nlisten back\n    bind 127.0.0.1:%s ssl crt %s ca-file %s verify required ssl-min-ver TLSv1.3\n    server echo 127.0.0.1:%s\n" \
    "$common" "$P_HB" "$OUT/conf/back.pem" "$CERTS/bundle.pem" "$P_ECHO" >"$OUT/conf/back.cfg"
haproxy -db -f "$OUT/conf/back.cfg" >"$OUT/raw/haproxy.back.log" 2>&1 & PIDS+=($!)
haproxy -db -f "$OUT/conf/front.cfg" >"$OUT/raw/haproxy.front.log" 2>&1 & PIDS+=($!)

ready() { for _ in $(seq 200); do curl -sf "http://127.0.0.1:$1/ready" >/dev/null && return 0; sleep 0.05; done; return 1; }
ready "$P_CA1" && ready "$P_CA2" || die "crank sidecars not ready: $(tail -5 "$OUT/raw/crank."*.log)"
sleep 0.5

declare -A PORT=([direct]=$P_ECHO [crank]=$P_CF [haproxy]=$P_HF)
SETUPS=(direct crank haproxy)
RESULTS=$OUT/results.tsv
printf "round\tsetup\tMiB_s\tp50_us\tp99_us\tconn_s\n" >"$RESULTS"
for r in $(seq "$ROUNDS"); do
    for i in 0 1 2; do
        s=${SETUPS[$(( (i + r - 1) % 3 ))]}
        line=$(python3 "$OUT/conf/client.py" "${PORT[$s]}" "$MIB" "$PINGS" "$CONNS") || die "$s failed in round $r"
        printf "%s\t%s\t%s\n" "$r" "$s" "$line" | tee -a "$RESULTS"
    done
done

python3 - "$RESULTS" <<'PY' | tee "$OUT/summary.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
by = {}
for r in rows:
    by.setdefault(r["round"], {})[r["setup"]] = r
def med(setup, key, ref=None):
    vals = []
    for rnd in by.values():
        v = float(rnd[setup][key])
        vals.append(v / float(rnd[ref][key]) if ref else v)
    return statistics.median(vals), min(vals), max(vals)
print("| setup | MiB/s | p50 µs | p99 µs | conn/s | MiB/s × direct | MiB/s × haproxy | p50 × haproxy | conn/s × haproxy |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for s in ["direct", "crank", "haproxy"]:
    f = lambda k: f"{med(s, k)[0]:.0f}"
    rr = lambda k, ref: "{:.2f} ({:.2f}–{:.2f})".format(*med(s, k, ref))
    print(f"| {s} | {f('MiB_s')} | {f('p50_us')} | {f('p99_us')} | {f('conn_s')} | {rr('MiB_s','direct')} | {rr('MiB_s','haproxy')} | {rr('p50_us','haproxy')} | {rr('conn_s','haproxy')} |")
print(f"\nMedian (min–max) over {len(by)} interleaved rounds; ratios within the same round.")
PY
