#!/usr/bin/env python3
"""The shape figures of the Rust tree that docs/architecture.md tracks.

    scripts/code-shape.py [--over N] [--list] [--cycles CRATE_SRC]

Prints: files over 800 lines (test files and `*_tests.rs` tables apart),
non-test functions over 60 and over 80 lines (with --list, each one), and
with --cycles, the import cycles between the modules of one crate's src/.

Functions are found by a small lexer (strings, chars, comments and raw
strings skipped, braces counted), not a full parser: good enough for
counting, and it needs nothing but Python. Code under `#[cfg(test)]` and
files under tests/, benches/ or named `*tests.rs` are not counted.
"""
import argparse
import os
import re
import sys

SKIP_DIRS = {"target", "fuzz", ".git", "node_modules"}
FN_RE = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:const\s+)?(?:async\s+)?(?:unsafe\s+)?(?:extern\s+\"C\"\s+)?fn\s+([A-Za-z0-9_]+)")


def rust_files(root):
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        for f in sorted(files):
            if f.endswith(".rs"):
                yield os.path.join(d, f)


def is_test_file(path):
    parts = path.split(os.sep)
    return (
        "tests" in parts
        or "benches" in parts
        or path.endswith("tests.rs")
        or path.endswith("_test.rs")
    )


def code_mask(text):
    """Same length as text; string/char/comment contents replaced by spaces."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                out[k] = " "
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            for k in range(i, j):
                if out[k] != "\n":
                    out[k] = " "
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 8]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            close = '"' + m.group(1)
            j = text.find(close, i + len(m.group(0)))
            j = n if j < 0 else j + len(close)
            for k in range(i, j):
                if out[k] != "\n":
                    out[k] = " "
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j += 1
            for k in range(i, min(j, n)):
                if out[k] != "\n":
                    out[k] = " "
            i = j
        elif c == "'":
            # a char literal ('a', '\n', '\u{..}') or a lifetime ('a)
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'", text[i:])
            if m:
                for k in range(i, i + len(m.group(0))):
                    out[k] = " "
                i += len(m.group(0))
            else:
                i += 1
        else:
            i += 1
    return "".join(out)


def test_ranges(masked_lines):
    """Line ranges (start, end) of items under #[cfg(test)]."""
    ranges = []
    for idx, line in enumerate(masked_lines):
        if re.search(r"#\[cfg\(test\)\]", line):
            # the item starts at the next line with a '{' or ';'
            depth, started = 0, False
            for j in range(idx + 1, len(masked_lines)):
                for ch in masked_lines[j]:
                    if ch == "{":
                        depth, started = depth + 1, True
                    elif ch == "}":
                        depth -= 1
                if started and depth == 0:
                    ranges.append((idx, j))
                    break
                if not started and masked_lines[j].rstrip().endswith(";"):
                    break
    return ranges


def functions(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    masked = code_mask(text).split("\n")
    tests = test_ranges(masked)
    found = []
    for idx, line in enumerate(masked):
        m = FN_RE.match(line)
        if not m or any(a <= idx <= b for a, b in tests):
            continue
        depth, started, end = 0, False, None
        for j in range(idx, len(masked)):
            seg = masked[j] if j != idx else masked[j][m.end():]
            for ch in seg:
                if ch == "{":
                    depth, started = depth + 1, True
                elif ch == "}":
                    depth -= 1
                elif ch == ";" and not started and depth == 0:
                    end = j  # a declaration without a body
                    break
            if end is not None or (started and depth == 0):
                end = j if end is None else end
                break
        if started and end is not None:
            found.append((m.group(1), idx + 1, end - idx + 1))
    return found, len(text.split("\n"))


def module_graph(src):
    """Edges between the top-level modules of one crate (`crate::x` uses)."""
    mods = {}
    for path in rust_files(src):
        rel = os.path.relpath(path, src)
        top = rel.split(os.sep)[0]
        top = top[:-3] if top.endswith(".rs") else top
        if top in ("lib", "main", "bin"):
            continue
        text = code_mask(open(path, encoding="utf-8").read())
        lines = text.split("\n")
        tests = test_ranges(lines)
        body = "\n".join(l for i, l in enumerate(lines) if not any(a <= i <= b for a, b in tests))
        deps = set(re.findall(r"crate::([a-z_0-9]+)", body))
        if re.search(r"(^|[^a-z_:])super::", body) and os.sep in rel:
            pass  # super:: inside a module dir stays inside the module
        mods.setdefault(top, set()).update(d for d in deps if d != top)
    return mods


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=".")
    ap.add_argument("--list", action="store_true", help="list each long function and big file")
    ap.add_argument("--over", type=int, default=60)
    ap.add_argument("--cycles", metavar="CRATE_SRC", action="append", default=[])
    a = ap.parse_args()
    long60, long80, big = [], [], []
    for path in rust_files(a.root):
        rel = os.path.relpath(path, a.root)
        if is_test_file(rel):
            continue
        fns, nlines = functions(path)
        if nlines > 800:
            big.append((nlines, rel))
        for name, line, length in fns:
            if length > a.over:
                long60.append((length, f"{rel}:{line} {name}"))
            if length > 80:
                long80.append((length, f"{rel}:{line} {name}"))
    print(f"files over 800 lines: {len(big)}")
    if a.list:
        for n, rel in sorted(big, reverse=True):
            print(f"  {n:5} {rel}")
    print(f"functions over {a.over} lines: {len(long60)}")
    print(f"functions over 80 lines: {len(long80)}")
    if a.list:
        for n, what in sorted(long60, reverse=True):
            print(f"  {n:4} {what}")
    for src in a.cycles:
        cs = cycles(module_graph(src))
        print(f"import cycles in {src}: {len(cs)}")
        for c in cs:
            print(f"  {len(c)} modules: {' '.join(c)}")


if __name__ == "__main__":
    main()
