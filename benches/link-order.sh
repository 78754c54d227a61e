#!/usr/bin/env bash
# Regenerates proxy/link-order.txt: the functions a running sidecar executes,
# hottest first, which proxy/build.rs hands to the linker so that they sit
# side by side in the release binary (fewer resident pages; issue #19).
#
#   bash benches/link-order.sh            # uses target/release/crank-proxy
#   CRANK_PROXY=<bin> bash benches/link-order.sh
#
# It runs benches/callgrind.sh for `crank` and `crank_all` (both sidecars
# under callgrind: start-up, warm-up, N requests, shutdown) with mangled
# names, and keeps every function of the binary that executed at least one
# instruction: first those that ran during the requests, by their
# instructions there (summed over the four sidecars), then the start-up and
# shutdown ones.
# Build the binary with CRANK_LINK_ORDER=0 or from a tree where the list is
# current; rebuild (cargo build --release -p crank-proxy) afterwards. A stale
# list costs only the packing: names that no longer exist are ignored.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
export CRANK_PROXY=${CRANK_PROXY:-$ROOT/target/release/crank-proxy}
WORK=${OUT:-$ROOT/benches/out/link-order}
DEST=${DEST:-$ROOT/proxy/link-order.txt}
mkdir -p "$WORK/shim"

# callgrind.sh zeroes the counters after the warm-up; here the start-up
# counts too (it touches the pages as much as requests do), so `-z` becomes
# `-d`: the start-up goes into its own dump file instead of being dropped.
cat >"$WORK/shim/valgrind" <<'EOF'
#!/usr/bin/env bash
# mangled names, compressed as this script's parser reads them
args=()
for a in "$@"; do [[ "$a" == --compress-strings=no ]] || args+=("$a"); done
exec /usr/bin/valgrind --demangle=no "${args[@]}"
EOF
cat >"$WORK/shim/callgrind_control" <<'EOF'
#!/usr/bin/env bash
[[ "$1" == -z ]] && set -- -d "${@:2}"
exec /usr/bin/callgrind_control "$@"
EOF
chmod +x "$WORK/shim/valgrind" "$WORK/shim/callgrind_control"

for setup in crank crank_all; do
    rm -rf "${WORK:?}/$setup"
    PATH="$WORK/shim:$PATH" OUT="$WORK" bash "$HERE/callgrind.sh" "$setup" >"$WORK/$setup.txt"
done

python3 - "$CRANK_PROXY" "$DEST" "$WORK"/crank/*.cg* "$WORK"/crank_all/*.cg* <<'PY'
import collections, re, subprocess, sys

binary, dest, dumps = sys.argv[1], sys.argv[2], sys.argv[3:]
nm = subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True, check=True)
text = {l.split()[2] for l in nm.stdout.splitlines() if len(l.split()) == 3 and l.split()[1] in "tTwW"}
entry = re.compile(r"^(fn|cfn|ob|cob)=\((\d+)\)(?: (.*))?$")
ir, hot = collections.Counter(), collections.Counter()
for path in dumps:
    # <name>.cg.2 is the dump of the N requests (callgrind.sh's -d after the load)
    requests = path.endswith(".cg.2")
    fns, obs, fn, ob, after_call = {}, {}, None, None, False
    for line in open(path):
        m = entry.match(line.rstrip("\n"))
        if m:
            kind, key, name = m.groups()
            table = fns if kind in ("fn", "cfn") else obs
            if name:
                table[key] = name
            if kind == "ob":
                ob = obs.get(key)
            elif kind == "fn":
                fn = fns.get(key) if ob == binary or (ob or "").endswith("/crank-proxy") else None
            continue
        if line.startswith("calls="):
            after_call = True  # the next cost line is the callee's, not this function's
            continue
        if line[:1].isdigit() or line[:1] in "+-*":
            if after_call:
                after_call = False
            elif fn:
                parts = line.split()
                if len(parts) >= 2:
                    ir[fn] += int(parts[1])
                    if requests:
                        hot[fn] += int(parts[1])
# the request path first, hottest first; then what only start-up and shutdown run
names = sorted((n for n, c in ir.items() if c > 0 and n in text), key=lambda n: (-hot[n], -ir[n]))
with open(dest, "w") as out:
    out.write("# Functions of crank-proxy that run in a sidecar: those of the request path,\n")
    out.write("# hottest first, then those of start-up and shutdown (callgrind runs of the\n")
    out.write("# crank and crank_all pairs, instructions summed over the four sidecars).\n")
    out.write("# proxy/build.rs links them side by side; regenerate: bash benches/link-order.sh\n")
    out.writelines(n + "\n" for n in names)
print(f"{dest}: {len(names)} functions")
PY
