#!/usr/bin/env bash
# A profile-guided release build of claudekey (issue 21): the proxy's request path laid out and
# inlined by what it does on the benchmark tenant's traffic, the lever left for the latency of a
# request on cold caches (docs/benchmarks-notes.md). Three steps:
#   1. an instrumented release build (`-Cprofile-generate`), in its own target directory;
#   2. training: that proxy, in gateway mode with the suite's full policy (hack/bench_tenant.sh),
#      answers Messages requests at c=1 and c=64, SSE streams with and without response
#      redaction, a request whose prompt is redacted, count_tokens and models, and the same
#      policy with its limits counted in Redis; with --all-roles also, against a private control
#      plane (hack/control-plane.sh on hack/tools.sh's binaries), the controller reconciles 1,000
#      ClaudeKeys (examples/bench_controller) and the webhooks admit Deployments
#      (examples/bench_admission);
#   3. the profiles merged by the `llvm-profdata` of rustc's own LLVM major version, and the
#      release build again with `-Cprofile-use`.
# The result is an ordinary release executable; what PGO changes is only code layout and
# inlining, never behaviour. Code the training never runs is optimised for size.
#
# The proxy alone is trained by default: it runs in every pod and on every request. Training the
# controller and the webhooks as well (--all-roles) spares the controller the 15-25% more CPU per
# ClaudeKey the proxy-only build costs it, but spreads the proxy's code over more pages: idle
# proxy RSS 11.4-13.0 -> 14.1 MB (issue 9's limit is 15 MB), CPU per request at c=64 about 2%
# higher, and 10,000 ClaudeKeys no sooner Ready (docs/benchmarks-notes.md, "the all-roles build
# measured").
#
#   hack/pgo.sh [--all-roles] [OUT]   writes OUT (default target/pgo/claudekey); about twice a
#                                     release build
#
# llvm-profdata: `llvm-profdata-<major>` on PATH or in /usr/lib/llvm-<major>/bin, else Debian's
# llvm-<major> package unpacked into the cache (apt-get download: no root needed).
set -euo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=versions.env
source hack/versions.env
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/claudekey
# shellcheck source=oha.sh
source hack/oha.sh
ALL_ROLES=false
if [ "${1:-}" = --all-roles ]; then
  ALL_ROLES=true
  shift
fi
OUT=${1:-target/pgo/claudekey}
GEN_TARGET=${PGO_TARGET_DIR:-target/pgo-gen}
USE_TARGET=${PGO_TARGET_DIR_USE:-target/pgo-use}

log() { printf '[pgo %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "$*"; exit 1; }
ensure_oha

# llvm_profdata — the path of an llvm-profdata that reads this rustc's raw profiles.
llvm_profdata() {
  local major dir p
  major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
  [ -n "$major" ] || die "rustc -vV names no LLVM version"
  for p in "llvm-profdata-$major" "/usr/lib/llvm-$major/bin/llvm-profdata"; do
    if command -v "$p" >/dev/null; then command -v "$p"; return; fi
  done
  dir=$CACHE/llvm-$major
  if [ ! -x "$dir/usr/lib/llvm-$major/bin/llvm-profdata" ]; then
    log "unpacking Debian's llvm-$major into $dir"
    local debs
    debs=$(mktemp -d)
    (cd "$debs" && apt-get download -q "llvm-$major" "libllvm$major" >&2) \
      || die "apt-get download llvm-$major libllvm$major failed (is llvm-$major in Debian's packages?)"
    mkdir -p "$dir"
    for d in "$debs"/*.deb; do dpkg-deb -x "$d" "$dir"; done
    rm -rf "$debs"
  fi
  # A wrapper finds the unpacked libLLVM beside it.
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$dir/usr/lib/x86_64-linux-gnu" \
    "$dir/usr/lib/llvm-$major/bin/llvm-profdata" >"$dir/llvm-profdata"
  chmod +x "$dir/llvm-profdata"
  echo "$dir/llvm-profdata"
}
PROFDATA=$(llvm_profdata)
"$PROFDATA" --version >/dev/null || die "$PROFDATA does not run"

WORK=$(mktemp -d /tmp/claudekey-pgo.XXXXXX)
PIDS=()
cleanup() {
  local p
  [ ! -d "$WORK/cp" ] || CLAUDEKEY_STATE_DIR=$WORK/cp bash hack/control-plane.sh stop >/dev/null 2>&1 || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

log "1/3 instrumented release build ($GEN_TARGET)"
# The flags stay the same from run to run, so an unchanged tree is not built again; where the
# profiles go is said at run time (LLVM_PROFILE_FILE). The build's own scripts and proc macros
# are instrumented too: their profiles go to the work directory, not the flag's /tmp.
RUSTFLAGS="-Cprofile-generate=/tmp" CARGO_TARGET_DIR=$GEN_TARGET \
  LLVM_PROFILE_FILE="$WORK/build-profiles/%m.profraw" nice cargo build --release --locked --bin claudekey
# The load generators and the fake upstream are not trained: a plain release build (the
# control plane's load generators only when their roles are trained).
EXAMPLES=(--example fake_upstream --example bench_stream)
if $ALL_ROLES; then EXAMPLES+=(--example bench_controller --example bench_admission); fi
nice cargo build --release --locked "${EXAMPLES[@]}"
CK=$GEN_TARGET/release/claudekey
EX=${CARGO_TARGET_DIR:-target}/release/examples

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_http() {
  local i
  for i in $(seq 1 300); do
    curl -s -o /dev/null -m 1 "$1" && return 0
    sleep 0.1
  done
  die "no answer from $1"
}
start() { "$@" >>"$WORK/servers.log" 2>&1 & PIDS+=($!); }

# shellcheck source=bench_tenant.sh
source hack/bench_tenant.sh
bench_policy "$WORK/proxy"
bench_body "$WORK/body.json"
mkdir -p "$WORK/proxy-plain"
sed 's/"redactResponses": true/"redactResponses": false/' "$WORK/proxy/proxy.json" >"$WORK/proxy-plain/proxy.json"
python3 - "$WORK" <<'EOF'
import json, sys
body = json.load(open(f"{sys.argv[1]}/body.json"))
body["messages"][0]["content"] += " Reach me at jane.doe@example.com or 555-867-5309, badge EMP-123456."
json.dump(body, open(f"{sys.argv[1]}/body-pii.json", "w"))
json.dump({"model": "claude-sonnet-4-5", "messages": body["messages"]}, open(f"{sys.argv[1]}/count.json", "w"))
EOF

P_UP=$(free_port)
start "$EX/fake_upstream" --listen "127.0.0.1:$P_UP" --key "$UPKEY"
wait_http "http://127.0.0.1:$P_UP/"

REDIS_SERVER=${CLAUDEKEY_REDIS_SERVER:-$(ls "$CACHE"/redis-*/bin/redis-server 2>/dev/null | tail -1)}
[ -x "$REDIS_SERVER" ] || die "redis-server missing: run hack/tools.sh"
P_RD=$(free_port)
start "$REDIS_SERVER" --port "$P_RD" --bind 127.0.0.1 --save "" --appendonly no

# proxy VAR NAME CONFIG [ENV=V...] [taskset -c CPUS] — the instrumented proxy in gateway mode
# (pinned, if asked); its port in VAR.
proxy() {
  local var=$1 name=$2 config=$3 port
  shift 3
  port=$(free_port)
  start env LLVM_PROFILE_FILE="$WORK/profiles/$name-%p.profraw" "$@" "$CK" proxy --mode gateway --config-dir "$config" --listen "127.0.0.1:$port" \
    --upstream "http://127.0.0.1:$P_UP" --audit-log "$WORK/audit-$name.log"
  wait_http "http://127.0.0.1:$port/"
  printf -v "$var" '%s' "$port"
}
load() { # PORT BODY C N [PATH]
  "$OHA" --no-tui --output-format json -m POST -n "$4" -c "$3" \
    -H "x-api-key: $WKEY" -H "anthropic-version: 2023-06-01" \
    -T application/json -D "$2" "http://127.0.0.1:$1${5:-/v1/messages}" >"$WORK/oha.json"
  python3 - "$WORK/oha.json" "$4" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
ok = int((d.get("statusCodeDistribution") or {}).get("200", 0))
if ok != int(sys.argv[2]):
    sys.exit(f"training: {ok} of {sys.argv[2]} requests answered 200: {d.get('statusCodeDistribution')}")
EOF
}

log "2/3 training: the proxy"
# On one core (a sidecar's CPU limit, the benchmark's pinning) the proxy runs tokio's
# single-threaded runtime, with more the multi-threaded one (src/main.rs): both are trained
# (until 02e30d3 only the second was, and a one-core proxy's scheduler was built as cold code).
proxy P full "$WORK/proxy" RUST_LOG=warn taskset -c 0
proxy P_PLAIN plain "$WORK/proxy-plain" RUST_LOG=warn taskset -c 0
proxy P_SHARED shared "$WORK/proxy" RUST_LOG=warn CLAUDEKEY_REDIS_URL="redis://127.0.0.1:$P_RD/0"
load "$P" "$WORK/body.json" 1 4000
load "$P" "$WORK/body.json" 64 30000
load "$P" "$WORK/body-pii.json" 1 500
load "$P" "$WORK/count.json" 1 300 /v1/messages/count_tokens
for _ in $(seq 1 100); do
  curl -sf -o /dev/null -H "x-api-key: $WKEY" -H "anthropic-version: 2023-06-01" "http://127.0.0.1:$P/v1/models"
done
for port in "$P_PLAIN" "$P"; do
  "$EX/bench_stream" --url "http://127.0.0.1:$port" --key "$WKEY" --streams 400 --concurrency 4 \
    --warmup 2 >/dev/null
done
load "$P_SHARED" "$WORK/body.json" 1 1000
load "$P_SHARED" "$WORK/body.json" 64 10000

if $ALL_ROLES; then
  log "2/3 training: the controller and the webhooks against a private control plane"
  eval "$(bash hack/tools.sh --print-env 2>"$WORK/tools.log")" || { tail -20 "$WORK/tools.log" >&2; die "hack/tools.sh failed"; }
  CLAUDEKEY_STATE_DIR=$WORK/cp bash hack/control-plane.sh start >"$WORK/cp.log" 2>&1 \
    || { tail -20 "$WORK/cp.log" >&2; die "the control plane did not start"; }
  export KUBECONFIG=$WORK/cp/kubeconfig
  "$CLAUDEKEY_KUBECTL" apply --server-side -f crds/ >/dev/null
  "$CLAUDEKEY_KUBECTL" create namespace claudekey-pgo >/dev/null
  # role NAME ARGS... — the instrumented executable in another role, its profile named NAME.
  role() {
    local name=$1
    shift
    start env LLVM_PROFILE_FILE="$WORK/profiles/$name-%p.profraw" RUST_LOG=warn "$CK" "$@"
  }
  P_CM=$(free_port)
  role controller controller --namespace claudekey-pgo --leader-election false \
    --metrics-listen "127.0.0.1:$P_CM" --usage-interval 0s --gateway-url http://gateway.pgo:8080
  wait_http "http://127.0.0.1:$P_CM/healthz"
  "$EX/bench_controller" --operator-namespace claudekey-pgo --controller-metrics "http://127.0.0.1:$P_CM/metrics" \
    --count 1000 >/dev/null 2>"$WORK/bench_controller.log" \
    || { tail -20 "$WORK/bench_controller.log" >&2; die "controller training failed"; }
  bench_webhook_pki "$WORK/pki"
  P_WH=$(free_port)
  role webhook webhook --listen "127.0.0.1:$P_WH" --tls-cert-file "$WORK/pki/tls.crt" \
    --tls-key-file "$WORK/pki/tls.key" --proxy-image registry.example/claudekey:pgo
  for _ in $(seq 1 300); do
    curl -s --cacert "$WORK/pki/ca.crt" -o /dev/null "https://127.0.0.1:$P_WH/healthz" && break
    sleep 0.1
  done
  "$EX/bench_admission" --webhook "https://127.0.0.1:$P_WH" --ca-file "$WORK/pki/ca.crt" --count 100 \
    --rounds 1 >/dev/null 2>"$WORK/bench_admission.log" \
    || { tail -20 "$WORK/bench_admission.log" >&2; die "webhook training failed"; }
fi

# The profiles are written at exit: a clean shutdown on SIGTERM.
for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
PIDS=()
ls "$WORK"/profiles/*.profraw >/dev/null 2>&1 || die "the training wrote no profile"

log "3/3 release build with the merged profile ($USE_TARGET)"
"$PROFDATA" merge -o "$WORK/merged.profdata" "$WORK"/profiles/*.profraw
# Named by its content: cargo rebuilds when the profile changes (RUSTFLAGS is in its
# fingerprint, the file's content is not), and not when it does not.
mkdir -p "$USE_TARGET"
PROFILE=$(realpath "$USE_TARGET")/claudekey-$(sha256sum "$WORK/merged.profdata" | cut -c1-16).profdata
find "$USE_TARGET" -maxdepth 1 -name 'claudekey-*.profdata' ! -path "$PROFILE" -delete
cp "$WORK/merged.profdata" "$PROFILE"
RUSTFLAGS="-Cprofile-use=$PROFILE" CARGO_TARGET_DIR=$USE_TARGET \
  nice cargo build --release --locked --bin claudekey
mkdir -p "$(dirname "$OUT")"
cp "$USE_TARGET/release/claudekey" "$OUT"
log "wrote $OUT"
