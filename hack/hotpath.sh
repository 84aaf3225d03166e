#!/usr/bin/env bash
# The proxy's work per request, counted rather than timed (issue 21 item 2): instructions per
# request under valgrind's callgrind and heap allocations (blocks and bytes) per request under
# dhat, through the benchmark suite's full gateway policy and its ~1 KB Messages request.
# Callgrind also simulates 32 KiB L1 caches and counts their misses per request: how much code
# and data a request touches beyond what stays hot, the cost of a request that finds the caches
# cold (after an idle pause, or another process's turn on the core), which timings at c=1 hide.
# Instruction and allocation counts repeat to a fraction of a percent on a noisy machine where
# CPU time per request moves by 10%, so two builds can be compared in one minute.
#
#   hack/hotpath.sh                      build the release proxy here and measure it
#   hack/hotpath.sh --rev ae2885a        the proxy of another revision (built from `git archive`
#                                        once, cached in ~/.cache/claudekey/bench-baseline, the
#                                        cache bench.sh --baseline uses)
#   hack/hotpath.sh --bin PATH           an already built claudekey executable
#   hack/hotpath.sh --nginx              a bare nginx reverse proxy instead (hack/bench.sh's: keep-alive
#                                        to the upstream, the key header set, no logging): the floor a
#                                        proxy that checks nothing reaches on the same request
#   hack/hotpath.sh --stream             the same request streamed (SSE: the fake's reply in 5 text
#                                        deltas, 10 events), response redaction off as in the
#                                        streaming row's claudekey column
#   options: -n N (requests, default 2000)  --warmup W (default 200)  -c C (connections, default 1)
#            --json FILE   append one record {"row":"hotpath",...} (bench.sh's results.jsonl)
#            --keep DIR    keep the callgrind and dhat outputs of the 2N runs there (for
#                          callgrind_annotate and dh_view.html)
#            --label NAME  the record's target name (default: the revision or "worktree")
#            --fake-upstream PATH  the fake_upstream example to answer (default: built here)
#            --top K       also print the K functions with the most instructions per request
#                          (self cost) and the K call sites with the most allocations per request
#
# Each tool runs the proxy twice, with W+N and W+2N requests; the figure is the difference
# divided by N, so start-up, configuration loading and shutdown cancel out.
set -euo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=versions.env
source hack/versions.env
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/claudekey
# shellcheck source=oha.sh
source hack/oha.sh

N=2000 WARMUP=200 CONC=1 REV="" CK="" JSON="" KEEP="" LABEL="" TOP=0 UPSTREAM_BIN="" NGINX=0 STREAM=0
while [ $# -gt 0 ]; do
  case $1 in
    -n) N=$2; shift ;;
    --warmup) WARMUP=$2; shift ;;
    -c) CONC=$2; shift ;;
    --rev) REV=$2; shift ;;
    --bin) CK=$2; shift ;;
    --nginx) NGINX=1 ;;
    --stream) STREAM=1 ;;
    --json) JSON=$2; shift ;;
    --keep) KEEP=$2; shift ;;
    --label) LABEL=$2; shift ;;
    --top) TOP=$2; shift ;;
    --fake-upstream) UPSTREAM_BIN=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
ensure_oha

log() { printf '[hotpath %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
WORK=$(mktemp -d /tmp/claudekey-hotpath.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -n "${HOTPATH_KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

# The fake upstream always comes from this tree; only the proxy changes between revisions.
TARGET=${CARGO_TARGET_DIR:-target}
if [ -n "$REV" ]; then
  SHORT=$(git rev-parse --short=12 "$REV^{commit}")
  CK=$CACHE/bench-baseline/$SHORT/claudekey
  if [ ! -x "$CK" ]; then
    log "building $SHORT (release, nice; cached in $CACHE/bench-baseline)"
    mkdir -p "$WORK/src" "$(dirname "$CK")"
    git archive "$SHORT" | tar -x -C "$WORK/src"
    (cd "$WORK/src" && CARGO_TARGET_DIR=$CACHE/bench-baseline/target \
      nice cargo build --release --locked --bin claudekey)
    cp "$CACHE/bench-baseline/target/release/claudekey" "$CK"
  fi
  LABEL=${LABEL:-$SHORT}
fi
if [ "$NGINX" = 1 ]; then
  command -v nginx >/dev/null || { echo "nginx is missing (apt-get install nginx-light)" >&2; exit 1; }
  CK=$(command -v nginx) LABEL=${LABEL:-nginx}
  [ -x "$TARGET/release/examples/fake_upstream" ] || [ -n "$UPSTREAM_BIN" ] ||
    nice cargo build --release --locked --example fake_upstream
elif [ -z "$CK" ]; then
  log "release build (nice)"
  nice cargo build --release --locked --bin claudekey --example fake_upstream
elif [ -z "$UPSTREAM_BIN" ] && [ ! -x "$TARGET/release/examples/fake_upstream" ]; then
  nice cargo build --release --locked --example fake_upstream
fi
CK=${CK:-$TARGET/release/claudekey}
LABEL=${LABEL:-worktree}
UPSTREAM_BIN=${UPSTREAM_BIN:-$TARGET/release/examples/fake_upstream}
[ -x "$UPSTREAM_BIN" ] || { log "$UPSTREAM_BIN missing"; exit 1; }

# An executable on jemalloc (src/main.rs) allocates through `_rjem_*` entry points dhat cannot
# see: its allocations are the calls callgrind counted into them (no byte count). One on glibc's
# malloc (an older revision) is counted by dhat, blocks and bytes.
JEMALLOC=0
# (grep reads all of nm's output: with -q, nm's SIGPIPE would fail the pipeline.)
if nm "$CK" 2>/dev/null | grep -E ' T _rjem_malloc$' >/dev/null; then JEMALLOC=1; fi

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_http() {
  local i
  for i in $(seq 1 1200); do
    if curl -s -o /dev/null -m 1 "$1"; then return 0; fi
    sleep 0.1
  done
  log "no answer from $1"; return 1
}

# The same keys, policy and body as hack/bench.sh.
# shellcheck source=bench_tenant.sh
source hack/bench_tenant.sh
bench_policy "$WORK/proxy"
bench_body "$WORK/body.json"
if [ "$STREAM" = 1 ]; then
  sed -i 's/"redactResponses": true/"redactResponses": false/' "$WORK/proxy/proxy.json"
  python3 - "$WORK/body.json" <<'EOF'
import json, sys
body = json.load(open(sys.argv[1]))
body["stream"] = True
json.dump(body, open(sys.argv[1], "w"))
EOF
fi

P_UP=$(free_port)
"$UPSTREAM_BIN" --listen "127.0.0.1:$P_UP" --key "$UPKEY" >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$P_UP/"

load() { # URL COUNT
  [ "$2" -gt 0 ] || return 0
  "$OHA" --no-tui --output-format json -m POST -n "$2" -c "$CONC" \
    -H "x-api-key: $WKEY" -H "anthropic-version: 2023-06-01" \
    -T application/json -D "$WORK/body.json" "$1" >"$WORK/oha.json"
  python3 - "$WORK/oha.json" "$2" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
ok = int((d.get("statusCodeDistribution") or {}).get("200", 0))
if ok != int(sys.argv[2]):
    sys.exit(f"only {ok} of {sys.argv[2]} requests answered 200: {d.get('statusCodeDistribution')} {d.get('errorDistribution')}")
EOF
}

# allocator_calls FILE — calls into malloc, calloc, realloc and jemalloc's entry points in a
# callgrind profile (a callee is named once, `cfn=(id) name`, then by id; its `calls=` follows).
allocator_calls() {
  python3 - "$1" <<'EOF'
import re, sys
names, total, callee = {}, 0, ""
alloc = re.compile(r"^(_rjem_)?(malloc|mallocx|calloc|realloc|rallocx)$")
for line in open(sys.argv[1]):
    m = re.match(r"(c?)fn=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
    if m:
        if m.group(3) is not None:
            names[m.group(2)] = m.group(3)
        if m.group(1):
            callee = names.get(m.group(2), "")
    elif line.startswith("calls=") and alloc.match(callee):
        total += int(line[6:].split()[0])
print(total)
EOF
}

# events CALLGRIND_OUT — its totals of instructions, L1 instruction misses and L1 data misses
# (reads and writes), in that order.
events() {
  python3 - "$1" <<'EOF'
import sys
lines = open(sys.argv[1]).read().splitlines()
names = next(l for l in lines if l.startswith("events:")).split()[1:]
total = dict(zip(names, map(int, next(l for l in lines if l.startswith("totals:")).split()[1:])))
print(total["Ir"], total["I1mr"], total["D1mr"] + total["D1mw"])
EOF
}

# instructions_in CALLGRIND_OUT yes|no PATTERN — instructions of the functions whose name matches
# PATTERN (a Python regex): their self costs summed (no), or the largest inclusive cost (yes).
instructions_in() {
  callgrind_annotate --show=Ir --inclusive="$2" --threshold=100 "$1" 2>/dev/null |
    python3 -c '
import re, sys
inclusive, pattern, costs = sys.argv[1] == "yes", re.compile(sys.argv[2]), []
for line in sys.stdin:
    m = re.match(r"\s*([\d,]+) \([ \d.]+%\)\s+(.*)$", line)
    if m and pattern.search(m.group(2)):
        costs.append(int(m.group(1).replace(",", "")))
print(max(costs, default=0) if inclusive else sum(costs))' "$2" "$3"
}

# sha256_instructions CALLGRIND_OUT — instructions spent in SHA-256 block functions (the sha2
# crate's and ring's), self cost. Valgrind's virtual CPU has no SHA extensions, so both crates
# fall back to their portable code there (~2,300 instructions a block); on a CPU with them
# (sha_ni: this VM has) a block takes about a tenth of that. Printed apart, so the figure can be
# read both ways.
sha256_instructions() {
  instructions_in "$1" no 'sha256::compress256|sha256_block_data_order'
}

# pipeline_instructions CALLGRIND_OUT — instructions inside claudekey's request pipeline (the
# future of `pipeline::handle`, inclusive): the policy, building the upstream request, reading and
# scanning the answer. The rest of a request is hyper's HTTP/1 on both sides, tokio, and the
# exchange's end (settlement, metrics, the audit line). 0 for nginx.
pipeline_instructions() {
  instructions_in "$1" yes '^(\?\?\?:)?claudekey::proxy::pipeline::handle::\{\{closure\}\} '
}

# run TOOL COUNT — the proxy under valgrind TOOL for WARMUP+COUNT requests; prints the tool's
# total (instructions, or "blocks bytes").
run() {
  local tool=$1 count=$2 port out pid
  port=$(free_port)
  out=$WORK/$tool.$count.out
  # On one core, as the suite pins the proxy: it then runs tokio's single-threaded runtime
  # (src/main.rs), the one measured there.
  local sim=()
  [ "$tool" != callgrind ] || sim=(--cache-sim=yes --I1=32768,8,64 --D1=32768,8,64 --LL=8388608,16,64)
  local proxy=("$CK" proxy --mode gateway --config-dir "$WORK/proxy" --listen "127.0.0.1:$port"
    --upstream "http://127.0.0.1:$P_UP" --audit-log "$WORK/audit.$tool.$count.log")
  if [ "$NGINX" = 1 ]; then
    bench_nginx "$WORK/nginx.$count" "$port" "$P_UP"
    proxy=("$CK" -e "$WORK/nginx.$count/error.log" -p "$WORK/nginx.$count" -c "$WORK/nginx.$count/nginx.conf")
  fi
  RUST_LOG=warn taskset -c 0 valgrind --tool="$tool" "${sim[@]}" "--$tool-out-file=$out" --log-file="$WORK/$tool.$count.log" \
    "${proxy[@]}" >"$WORK/proxy.$tool.$count.stdout" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  wait_http "http://127.0.0.1:$port/"
  load "http://127.0.0.1:$port/v1/messages" "$WARMUP"
  load "http://127.0.0.1:$port/v1/messages" "$count"
  kill -TERM "$pid"
  wait "$pid" || { log "the proxy under $tool exited with $?: $(tail -5 "$WORK/$tool.$count.log")"; return 1; }
  case $tool in
    callgrind) echo "$(events "$out") $(allocator_calls "$out") $(sha256_instructions "$out") $(pipeline_instructions "$out")" ;;
    dhat) sed -n 's/.*Total: *\([0-9,]*\) bytes in \([0-9,]*\) blocks.*/\2 \1/p' "$WORK/$tool.$count.log" | tr -d , ;;
  esac
  if [ -n "$KEEP" ] && [ "$count" = $((2 * N)) ]; then
    mkdir -p "$KEEP"; cp "$out" "$KEEP/$tool.$LABEL.out"
  fi
}

log "$LABEL: $CK, $WARMUP warm-up requests, then $N and $((2 * N)) (c=$CONC)"
read -r I1 M1 D1 C1 S1 P1 <<<"$(run callgrind "$N")"; read -r I2 M2 D2 C2 S2 P2 <<<"$(run callgrind $((2 * N)))"
if [ "$JEMALLOC" = 1 ] || [ "$NGINX" = 1 ]; then
  B1=$C1 B2=$C2 Y1=-1 Y2=-1
else
  read -r B1 Y1 <<<"$(run dhat "$N")"; read -r B2 Y2 <<<"$(run dhat $((2 * N)))"
fi
HOTPATH_STREAM=$STREAM python3 - "$LABEL" "$N" "$I1" "$I2" "$B1" "$B2" "$Y1" "$Y2" "$JSON" "$M1" "$M2" "$D1" "$D2" "$S1" "$S2" "$P1" "$P2" <<'EOF'
import json, os, sys
label, n = sys.argv[1], int(sys.argv[2])
i1, i2, b1, b2, y1, y2 = (int(x) for x in sys.argv[3:9])
m1, m2, d1, d2, s1, s2, p1, p2 = (int(x) for x in sys.argv[10:18])
# A streamed request is its own row: the suite's hot-path rows compare non-streaming requests.
row = "hotpath_stream" if os.environ["HOTPATH_STREAM"] == "1" else "hotpath"
rec = {"row": row, "target": label, "n": n,
       "instructions": (i2 - i1) / n, "allocations": (b2 - b1) / n,
       "alloc_bytes": None if y1 < 0 else (y2 - y1) / n,
       "l1i_misses": (m2 - m1) / n, "l1d_misses": (d2 - d1) / n,
       "sha256_portable_instructions": (s2 - s1) / n,
       "pipeline_instructions": (p2 - p1) / n if p2 else None}
size = "bytes not counted (allocator calls, from callgrind)" if rec["alloc_bytes"] is None else \
    f"{rec['alloc_bytes']:,.0f} bytes allocated/request"
print(f"{label}: {rec['instructions']:,.0f} instructions/request, "
      f"{rec['allocations']:.1f} allocations/request, {size}, "
      f"{rec['l1i_misses']:,.0f} L1i and {rec['l1d_misses']:,.0f} L1d misses/request (32 KiB simulated)")
if rec["sha256_portable_instructions"]:
    print(f"  of which {rec['sha256_portable_instructions']:,.0f} instructions in SHA-256 block functions, run "
          "portably under valgrind (no SHA extensions there; a CPU with sha_ni needs about a tenth)")
if rec["pipeline_instructions"] is not None:
    print(f"  {rec['pipeline_instructions']:,.0f} of them inside the request pipeline (pipeline::handle, inclusive); "
          "the rest is hyper on both sides, tokio and the exchange's end")
if sys.argv[9]:
    with open(sys.argv[9], "a") as f:
        f.write(json.dumps(rec) + "\n")
EOF

[ "$TOP" -gt 0 ] || exit 0
# Per-request profiles: each function's (each allocation site's) cost in the 2N run minus the N
# run, divided by N.
for count in "$N" $((2 * N)); do
  callgrind_annotate --show=Ir --sort=Ir --inclusive=no --threshold=100 "$WORK/callgrind.$count.out" >"$WORK/annotate.$count.txt"
done
python3 - "$N" "$TOP" "$WORK" <<'EOF'
import collections, json, re, sys
n, top, work = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def functions(path):
    costs = collections.Counter()
    for line in open(path):
        m = re.match(r"\s*([\d,]+) \([ \d.]+%\)\s+(.*?)(?: \[.*\])?$", line)
        if m and "PROGRAM TOTALS" not in line:
            name = m.group(2).split(":", 1)[1] if m.group(2).startswith("???:") else m.group(2)
            costs[name] += int(m.group(1).replace(",", ""))
    return costs

a, b = functions(f"{work}/annotate.{n}.txt"), functions(f"{work}/annotate.{2 * n}.txt")
print("\ninstructions per request, by function (self):")
for name, cost in sorted(((k, (b[k] - a[k]) / n) for k in b), key=lambda x: -x[1])[:top]:
    print(f"{cost:10,.0f}  {name[:160]}")

# Frames that only say "an allocation happened": the allocator, Box/Vec/String growth, clones.
ALLOC = re.compile(r"^(malloc|calloc|realloc|free|posix_memalign|aligned_alloc|memalign|__rust_|__rdl_|"
                   r"alloc::|<alloc::|.*RawVec|.*raw_vec|.*reserve|.*finish_grow|.*do_reserve|"
                   r"<.* as core::clone::Clone>::clone|.*::to_owned|.*to_vec)")

def sites(path):
    d = json.load(open(path))
    ftbl = d["ftbl"]
    costs = collections.Counter()
    for pp in d["pps"]:
        names = [re.sub(r" \(in /.*\)$|^0x[0-9A-F]+: ", "", ftbl[i]) for i in pp["fs"]]
        names = [re.sub(r" \(in /.*\)$", "", x) for x in names]
        site = next((x for x in names if not ALLOC.match(x)), names[-1] if names else "?")
        costs[site] += pp["tbk"]
    return costs

try:
    a, b = sites(f"{work}/dhat.{n}.out"), sites(f"{work}/dhat.{2 * n}.out")
except FileNotFoundError:
    print("\n(allocation sites come from dhat, which needs a build on glibc's malloc)")
    sys.exit(0)
print("\nallocations per request, by first caller outside the allocator:")
for name, cost in sorted(((k, (b[k] - a[k]) / n) for k in b), key=lambda x: -x[1])[:top]:
    if cost > 0:
        print(f"{cost:8.2f}  {name[:160]}")
EOF
