#!/usr/bin/env bash
# claudekey's benchmark suite (issue 9): one command, one table, every row measured in the same
# run on this machine, interleaved and repeated; medians with the spread (min..max over the
# repetitions). Prints the table (ratios and targets first) and writes it, with the command and
# the versions, to docs/benchmarks.md.
#
#   hack/bench.sh                 full run (about 15 minutes plus --soak)
#   hack/bench.sh --smoke         every row for about a second, nothing installed, docs untouched
#   options: --reps N (default 5)  --soak SECONDS (default 60; the issue's figure is 300)
#            --out FILE (default docs/benchmarks.md)  --no-litellm  --no-nginx  --no-webhook
#            --no-portkey  --no-agentgateway  (the peer gateways; hack/peers.sh installs/builds them)
#            --no-criterion  skip rows 4 and 6's criterion benches (their release build is long)
#            --baseline REV  also measure the claudekey proxy built from git revision REV, as one
#                            more target of row 1 interleaved with the others (a regression check
#                            that holds on a noisy machine: both builds see the same noise); a
#                            plain release build, so `--baseline HEAD` measures what PGO adds
#            --no-pgo        measure a plain release build of claudekey, not the profile-guided
#                            one hack/pgo.sh makes (the build README's release steps ship);
#                            --smoke always does
#            --claudekey PATH  measure this claudekey executable (say, hack/pgo.sh's output
#                            from an unchanged tree) instead of building one
#
# Rows: (1) proxy overhead vs direct, nginx and LiteLLM with oha at c=1/16/64, claudekey against
# nginx at c=1 in paired rounds, and an open-loop rate sweep; (2) streaming TTFB and per-delta
# gaps through a paced upstream; (3) RSS idle, at 1k req/s and after a soak; (4) webhook handler time (criterion) and Deployment create latency
# through the real apiserver with and without the webhooks; (5) controller scale: 1,000 and
# 10,000 ClaudeKeys applied at once, time to all Ready, API requests per ClaudeKey (by verb and
# resource), controller RSS;
# (6) redaction and key-scan throughput (criterion); (7) shared limits: the same proxy counting
# its limits in Redis (a real redis-server from hack/tools.sh) against in-memory limits, at
# c=1/16/64 in row 1's interleaved cells, with Redis on the load generator's core and on the
# proxy's core; the reference of one round trip to each Redis from the proxy's core (PING,
# EVALSHA); and the limit accuracy of two proxy processes sharing requestsPerMinute: 60.
# The peer gateways agentgateway and Portkey (hack/peers.sh) are targets of rows 1, 2 and 3 too.
#
# CPUs: proxies run on core 0, the load generator and the upstream on core 1 (taskset).
# Everything listens on 127.0.0.1 and everything started here is stopped on exit (except
# agentgateway's LLM listener, which binds every interface with no option; it gets loopback traffic only).
set -euo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=versions.env
source hack/versions.env
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/claudekey

SMOKE=0 REPS=5 SOAK=60 OUT=docs/benchmarks.md
USE_LITELLM=1 USE_NGINX=1 USE_WEBHOOK=1 BASELINE=""
USE_PORTKEY=1 USE_AGENTGATEWAY=1 USE_CRITERION=1 USE_PGO=1 CK_GIVEN=""
COMMAND="hack/bench.sh $*"
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --reps) REPS=$2; shift ;;
    --soak) SOAK=$2; shift ;;
    --out) OUT=$2; shift ;;
    --no-litellm) USE_LITELLM=0 ;;
    --no-nginx) USE_NGINX=0 ;;
    --no-webhook) USE_WEBHOOK=0 ;;
    --no-portkey) USE_PORTKEY=0 ;;
    --no-agentgateway) USE_AGENTGATEWAY=0 ;;
    --no-criterion) USE_CRITERION=0 ;;
    --baseline) BASELINE=$2; shift ;;
    --no-pgo) USE_PGO=0 ;;
    --claudekey) CK_GIVEN=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ "$SMOKE" = 1 ]; then
  REPS=1 SOAK=1
  CELL=0.5 SWEEP_STEP=0.5 STREAMS=2 TTFB_STREAMS=10 ADMISSION_N=3 SCALE_N=20 SCALE_BIG=40 PAIRS=2 PAIR_CELL=0.5
  CRITERION=(--warm-up-time 0.1 --measurement-time 0.3 --sample-size 10)
else
  CELL=3 SWEEP_STEP=3 STREAMS=8 TTFB_STREAMS=200 ADMISSION_N=100 SCALE_N=1000 SCALE_BIG=10000 PAIRS=16 PAIR_CELL=2
  CRITERION=(--warm-up-time 1 --measurement-time 4)
fi

WORK=$(mktemp -d /tmp/claudekey-bench.XXXXXX)
RAW=$WORK/raw
mkdir -p "$RAW"
PIDS=()
CP_STATE=""
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "$CP_STATE" ]; then
    CLAUDEKEY_STATE_DIR=$CP_STATE bash hack/control-plane.sh stop >/dev/null 2>&1 || true
  fi
  if [ "${KEEP_WORK:-0}" != 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free loopback port (bound and released; a race is possible but harmless here).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_http URL [HEADER...] — until the server answers at all (any status), 60 s at most.
wait_http() {
  local url=$1 i
  for i in $(seq 1 600); do
    if curl -s -o /dev/null -m 1 "$url"; then return 0; fi
    sleep 0.1
  done
  log "no answer from $url"; return 1
}

# start NAME CORE CMD... — run CMD pinned to CORE in the background, log to $WORK/NAME.log.
start() {
  local name=$1 core=$2; shift 2
  taskset -c "$core" "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  eval "PID_${name//-/_}=$!"
}

# Total CPU seconds (user+system) of PID and its descendants.
cpu_seconds() {
  local pid=$1 total=0 p ticks
  local hz
  hz=$(getconf CLK_TCK)
  for p in $pid $(pgrep -P "$pid" 2>/dev/null || true); do
    if [ -r "/proc/$p/stat" ]; then
      # fields after the ")" so a command name with spaces cannot shift them
      ticks=$(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')
      total=$((total + ticks))
    fi
  done
  awk -v t="$total" -v hz="$hz" 'BEGIN{printf "%.3f", t/hz}'
}

# round_cpu — CPU seconds used so far, one JSON object: the control plane's processes (when this
# run started it), the controller and the row 8 gateway, and the machine's busy and idle time
# from /proc/stat (busy: user, nice, system, irq, softirq; idle: idle and iowait). Taken before
# and after a controller round (`t`: when, in seconds), the differences say which process the
# round's time went to.
round_cpu() {
  local n pid
  printf '{"t":%s,' "$(date +%s.%N)"
  if [ -n "${CP_STATE:-}" ]; then
    for n in kube-apiserver etcd kube-controller-manager; do
      pid=$(cut -d' ' -f1 "$CP_STATE/pids/$n.pid" 2>/dev/null) || continue
      printf '"%s":%s,' "$n" "$(cpu_seconds "$pid")"
    done
  fi
  printf '"controller":%s,' "$(cpu_seconds "$PID_controller")"
  if [ -n "${PID_gateway_tenants:-}" ]; then printf '"gateway":%s,' "$(cpu_seconds "$PID_gateway_tenants")"; fi
  awk -v hz="$(getconf CLK_TCK)" '/^cpu /{printf "\"machine_busy\":%.2f,\"machine_idle\":%.2f}", ($2+$3+$4+$7+$8)/hz, ($5+$6)/hz}' /proc/stat
}

rss_kib() {
  local total=0 p kb
  for p in $1 $(pgrep -P "$1" 2>/dev/null || true); do
    kb=$(awk '/^VmRSS:/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    total=$((total + ${kb:-0}))
  done
  echo "$total"
}

# ---------------------------------------------------------------------------
# tools
# ---------------------------------------------------------------------------
# shellcheck source=oha.sh
source hack/oha.sh
LITELLM_VENV=$CACHE/litellm-$LITELLM_VERSION
if [ ! -x "$OHA" ]; then
  [ "$SMOKE" = 1 ] && { log "oha $OHA_VERSION missing: run hack/bench.sh once without --smoke"; exit 1; }
  ensure_oha
fi
if [ "$USE_NGINX" = 1 ] && ! command -v nginx >/dev/null; then
  if [ "$SMOKE" = 1 ]; then USE_NGINX=0; else
    log "installing nginx (Debian)"; apt-get install -y -q nginx-light >/dev/null
  fi
fi
if [ "$USE_LITELLM" = 1 ] && [ ! -x "$LITELLM_VENV/bin/litellm" ]; then
  if [ "$SMOKE" = 1 ]; then USE_LITELLM=0; else
    log "installing litellm[proxy]==$LITELLM_VERSION (PyPI) into $LITELLM_VENV"
    python3 -m venv "$LITELLM_VENV"
    nice "$LITELLM_VENV/bin/pip" install -q "litellm[proxy]==$LITELLM_VERSION"
  fi
fi

# The peer gateways, from hack/peers.sh's cache (Portkey: npm; agentgateway: built from source,
# about 21 minutes on 2 cores the first time). A smoke run skips a peer that is not there.
PORTKEY_JS=$CACHE/portkey-$PORTKEY_VERSION/node_modules/@portkey-ai/gateway/build/start-server.js
AGW_BIN=$CACHE/agentgateway-$AGENTGATEWAY_VERSION/bin/agentgateway
if [ "$USE_PORTKEY" = 1 ] && [ ! -f "$PORTKEY_JS" ]; then
  if [ "$SMOKE" = 1 ]; then USE_PORTKEY=0; else
    log "installing @portkey-ai/gateway $PORTKEY_VERSION (npm) into $CACHE"; bash hack/peers.sh --only portkey
  fi
fi
if [ "$USE_AGENTGATEWAY" = 1 ] && [ ! -x "$AGW_BIN" ]; then
  if [ "$SMOKE" = 1 ]; then USE_AGENTGATEWAY=0; else
    log "building agentgateway $AGENTGATEWAY_VERSION from source into $CACHE (nice)"; bash hack/peers.sh --only agentgateway
  fi
fi

# BENCH_PROFILE=dev builds without optimisation and skips criterion: only for working on this
# script (its figures mean nothing).
if [ "${BENCH_PROFILE:-release}" = dev ]; then
  log "dev build (figures will be meaningless)"
  [ "${BENCH_SKIP_BUILD:-0}" = 1 ] || nice cargo build --locked --bin claudekey \
    --example fake_upstream --example bare_forward --example bench_stream --example bench_admission --example bench_controller --example bench_wake --example bench_redis --example bench_tenants
  BIN=target/debug
else
  log "release build (nice)"
  nice cargo build --release --locked --bin claudekey \
    --example fake_upstream --example bare_forward --example bench_stream --example bench_admission --example bench_controller --example bench_wake --example bench_redis --example bench_tenants
  BIN=target/release
fi
CK=$BIN/claudekey
CK_BUILD="plain release build"
if [ -n "$CK_GIVEN" ]; then
  [ -x "$CK_GIVEN" ] || { log "--claudekey $CK_GIVEN is not an executable"; exit 1; }
  CK=$CK_GIVEN CK_BUILD="given: $CK_GIVEN"
elif [ "$USE_PGO" = 1 ] && [ "$SMOKE" = 0 ] && [ "$BIN" = target/release ]; then
  log "profile-guided build (hack/pgo.sh)"
  hack/pgo.sh target/pgo/claudekey
  CK=target/pgo/claudekey CK_BUILD="profile-guided build (hack/pgo.sh)"
fi

# The baseline build: the same profile from `git archive REV`, cached by commit outside the repo.
if [ -n "$BASELINE" ]; then
  BASE_REV=$(git rev-parse --short=12 "$BASELINE^{commit}")
  BASE_BIN=$CACHE/bench-baseline/$BASE_REV/claudekey
  if [ ! -x "$BASE_BIN" ]; then
    log "building the baseline $BASE_REV (release, nice; cached in $CACHE/bench-baseline)"
    rm -rf "$WORK/base-src"; mkdir -p "$WORK/base-src" "$(dirname "$BASE_BIN")"
    git archive "$BASE_REV" | tar -x -C "$WORK/base-src"
    (cd "$WORK/base-src" && CARGO_TARGET_DIR=$CACHE/bench-baseline/target \
      nice cargo build --release --locked --bin claudekey)
    cp "$CACHE/bench-baseline/target/release/claudekey" "$BASE_BIN"
  fi
fi

# ---------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------
# UPKEY, WKEY, WSHA, bench_policy and bench_body: the tenant hack/hotpath.sh measures too.
# shellcheck source=bench_tenant.sh
source hack/bench_tenant.sh
MASTER=sk-bench-litellm-master-key
P_UP=$(free_port); P_UPS=$(free_port); P_CK=$(free_port); P_CKS=$(free_port)
P_CKR=$(free_port); P_CKB=$(free_port); P_NG=$(free_port); P_NGS=$(free_port); P_LL=$(free_port)

# 64 deltas of 8 characters; a request's max_tokens cuts it short (row 2's TTFB streams ask
# for 2 tokens: one delta), so every target's one streaming config serves both stream lengths.
PACED_REPLY=$(python3 -c 'print(("The lighthouse keeper counted the ships. " * 13)[:512])')
start upstream 1 "$BIN/examples/fake_upstream" --listen "127.0.0.1:$P_UP" --key "$UPKEY"
start upstream-paced 1 "$BIN/examples/fake_upstream" --listen "127.0.0.1:$P_UPS" --key "$UPKEY" \
  --delta-delay-ms 20 --chunk-chars 8 --reply "$PACED_REPLY" --stop-at-max-tokens
# A bare echo on the proxy's core: the round trip any extra hop pays here (streaming row).
P_ECHO=$(free_port)
start echo 0 "$BIN/examples/bench_wake" serve --listen "127.0.0.1:$P_ECHO"
# hyper and tokio alone, forwarding to the paced upstream: the HTTP stack's share (streaming row).
P_BARE=$(free_port)
start bare 0 "$BIN/examples/bare_forward" --listen "127.0.0.1:$P_BARE" --upstream "127.0.0.1:$P_UPS" --key "$UPKEY"

# Full gateway policy (hack/bench_tenant.sh).
bench_policy "$WORK/proxy"
# The same policy without response redaction, for the streaming row's pass-through timing.
mkdir -p "$WORK/proxy-plain"
sed 's/"redactResponses": true/"redactResponses": false/' "$WORK/proxy/proxy.json" >"$WORK/proxy-plain/proxy.json"
export RUST_LOG=warn
start claudekey 0 "$CK" proxy --mode gateway --config-dir "$WORK/proxy" --listen "127.0.0.1:$P_CK" \
  --upstream "http://127.0.0.1:$P_UP" --audit-log "$WORK/audit.log"
start claudekey-stream 0 "$CK" proxy --mode gateway --config-dir "$WORK/proxy-plain" --listen "127.0.0.1:$P_CKS" \
  --upstream "http://127.0.0.1:$P_UPS" --audit-log "$WORK/audit-stream.log"
# Row 7: the same policy counted in Redis (on the load generator's core, like the upstream).
REDIS_SERVER=${CLAUDEKEY_REDIS_SERVER:-$(ls "$CACHE"/redis-*/bin/redis-server 2>/dev/null | tail -1)}
[ -x "$REDIS_SERVER" ] || { log "redis-server missing: run hack/tools.sh"; exit 1; }
P_RD=$(free_port); P_CKSH=$(free_port); P_ACC1=$(free_port); P_ACC2=$(free_port)
start redis 1 "$REDIS_SERVER" --port "$P_RD" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK"
start claudekey-shared 0 env CLAUDEKEY_REDIS_URL="redis://127.0.0.1:$P_RD/0" "$CK" proxy --mode gateway \
  --config-dir "$WORK/proxy" --listen "127.0.0.1:$P_CKSH" --upstream "http://127.0.0.1:$P_UP" --audit-log "$WORK/audit-shared.log"
# The other placement, measured too: Redis on the proxy's core (a round trip without waking the
# other vCPU, but Redis's script time then competes with the proxy for its core).
P_RD0=$(free_port); P_CKSH0=$(free_port)
mkdir -p "$WORK/redis-core0"
start redis-core0 0 "$REDIS_SERVER" --port "$P_RD0" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK/redis-core0"
start claudekey-shared-r0 0 env CLAUDEKEY_REDIS_URL="redis://127.0.0.1:$P_RD0/0" "$CK" proxy --mode gateway \
  --config-dir "$WORK/proxy" --listen "127.0.0.1:$P_CKSH0" --upstream "http://127.0.0.1:$P_UP" --audit-log "$WORK/audit-shared-r0.log"
# Two proxy processes of one ClaudeKey with requestsPerMinute: 60, sharing Redis (accuracy).
mkdir -p "$WORK/proxy-rpm"
python3 - "$WORK/proxy/proxy.json" "$WORK/proxy-rpm/proxy.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
c["claudeKey"]["name"] = "bench-rpm"
c["policy"]["limits"] = {"requestsPerMinute": 60}
json.dump(c, open(sys.argv[2], "w"))
EOF
for i in 1 2; do
  port_var=P_ACC$i
  start "claudekey-acc$i" 0 env CLAUDEKEY_REDIS_URL="redis://127.0.0.1:$P_RD/0" "$CK" proxy --mode gateway \
    --config-dir "$WORK/proxy-rpm" --listen "127.0.0.1:${!port_var}" --upstream "http://127.0.0.1:$P_UP" \
    --audit-log "$WORK/audit-acc$i.log"
done
start claudekey-stream-redact 0 "$CK" proxy --mode gateway --config-dir "$WORK/proxy" --listen "127.0.0.1:$P_CKR" \
  --upstream "http://127.0.0.1:$P_UPS" --audit-log "$WORK/audit-stream-redact.log"
if [ -n "$BASELINE" ]; then
  start baseline 0 "$BASE_BIN" proxy --mode gateway --config-dir "$WORK/proxy" --listen "127.0.0.1:$P_CKB" \
    --upstream "http://127.0.0.1:$P_UP" --audit-log "$WORK/audit-baseline.log"
fi

if [ "$USE_NGINX" = 1 ]; then
  bench_nginx "$WORK/nginx" "$P_NG" "$P_UP" "$P_NGS" "$P_UPS"
  start nginx 0 nginx -e "$WORK/nginx/error.log" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf"
fi

if [ "$USE_LITELLM" = 1 ]; then
  cat >"$WORK/litellm.yaml" <<EOF
model_list:
  - model_name: claude-sonnet-4-5
    litellm_params:
      model: anthropic/claude-sonnet-4-5
      api_base: http://127.0.0.1:$P_UP
      api_key: $UPKEY
general_settings:
  master_key: $MASTER
litellm_settings:
  telemetry: false
EOF
  # No network beyond loopback: use the bundled model cost map, no telemetry, quiet logs.
  start litellm 0 env LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOG=ERROR LITELLM_TELEMETRY=False \
    "$LITELLM_VENV/bin/litellm" --config "$WORK/litellm.yaml" \
    --host 127.0.0.1 --port "$P_LL" --num_workers 1
fi

# Portkey's gateway (Node): one process serves both upstreams, since its open-source build takes
# the whole routing config per request, in the x-portkey-config header (no server-side config:
# the provider key rides in that header, see docs/benchmarks-notes.md). The closest policy it has
# to claudekey's: its built-in guardrails, a model allowlist and a regex guard on the prompt (deny
# on match). It listens on every interface with no option for the address: a preload makes it
# bind loopback.
if [ "$USE_PORTKEY" = 1 ]; then
  P_PK=$(free_port)
  cat >"$WORK/portkey-loopback.cjs" <<'EOF'
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" && typeof args[1] !== "string") args.splice(1, args[1] === undefined ? 1 : 0, "127.0.0.1");
  return listen.apply(this, args);
};
EOF
  portkey_config() {
    python3 -c 'import json, sys; print(json.dumps({"provider": "anthropic", "api_key": sys.argv[1],
      "custom_host": sys.argv[2] + "/v1", "input_guardrails": [{"deny": True,
      "default.modelWhitelist": {"models": ["claude-sonnet-4-5", "claude-haiku-4-5"]},
      "default.regexMatch": {"rule": "EMP-[0-9]{6}", "not": True}}]}))' "$UPKEY" "$1"
  }
  PK_CONFIG=$(portkey_config "http://127.0.0.1:$P_UP")
  PK_CONFIG_STREAM=$(portkey_config "http://127.0.0.1:$P_UPS")
  start portkey 0 env NODE_ENV=production node --require "$WORK/portkey-loopback.cjs" "$PORTKEY_JS" \
    --port="$P_PK" --headless
fi

# agentgateway: its `llm` config with the closest policy it has to claudekey's: workload API keys
# (strict), models by glob (the allowlist), local rate limits far above the load (checked, never
# hit), a prompt guard masking the built-in detectors and the custom pattern in requests and (not
# on the streaming instance, like claudekey-stream) responses. Its LLM listener binds every
# interface (no option for the address): only loopback traffic is sent to it.
if [ "$USE_AGENTGATEWAY" = 1 ]; then
  P_AG=$(free_port); P_AGS=$(free_port)
  agw_config() {  # agw_config PORT UPSTREAM_PORT RESPONSE_GUARD(0|1)
    local rules='[{builtin: email}, {builtin: ssn}, {builtin: phoneNumber}, {builtin: creditCard}, {pattern: "EMP-[0-9]{6}"}]' m
    printf 'config:\n  adminAddr: 127.0.0.1:%s\n  readinessAddr: 127.0.0.1:%s\n  statsAddr: 127.0.0.1:%s\n' \
      "$(free_port)" "$(free_port)" "$(free_port)"
    printf 'llm:\n  port: %s\n  policies:\n' "$1"
    printf '    apiKey:\n      mode: strict\n      location: {header: {name: x-api-key}}\n'
    printf '      keys: [{keyHash: "sha256:%s"}]\n' "$WSHA"
    printf '    localRateLimit:\n'
    printf '    - {maxTokens: 1000000000, tokensPerFill: 1000000000, fillInterval: 60s, type: requests}\n'
    printf '    - {maxTokens: 1000000000000, tokensPerFill: 1000000000000, fillInterval: 60s, type: tokens}\n'
    printf '    guardrails:\n      request: [{regex: {action: mask, rules: %s}}]\n' "$rules"
    if [ "$3" = 1 ]; then printf '      response: [{regex: {action: mask, rules: %s}}]\n' "$rules"; fi
    printf '  models:\n'
    for m in 'claude-sonnet-4-*' 'claude-haiku-4-*'; do
      printf '  - name: "%s"\n    provider: anthropic\n    params: {apiKey: "%s", baseUrl: "http://127.0.0.1:%s"}\n' \
        "$m" "$UPKEY" "$2"
    done
  }
  agw_config "$P_AG" "$P_UP" 1 >"$WORK/agentgateway.yaml"
  agw_config "$P_AGS" "$P_UPS" 0 >"$WORK/agentgateway-stream.yaml"
  # One worker thread for its one core (what it picks by itself under taskset; said explicitly).
  start agentgateway 0 env WORKER_THREADS=1 "$AGW_BIN" -f "$WORK/agentgateway.yaml"
  start agentgateway-stream 0 env WORKER_THREADS=1 "$AGW_BIN" -f "$WORK/agentgateway-stream.yaml"
fi

wait_http "http://127.0.0.1:$P_UP/"
wait_http "http://127.0.0.1:$P_UPS/"
wait_http "http://127.0.0.1:$P_CK/"
wait_http "http://127.0.0.1:$P_CKS/"
wait_http "http://127.0.0.1:$P_CKR/"
if [ -n "$BASELINE" ]; then wait_http "http://127.0.0.1:$P_CKB/"; fi
wait_http "http://127.0.0.1:$P_CKSH/"
wait_http "http://127.0.0.1:$P_CKSH0/"
wait_http "http://127.0.0.1:$P_ACC1/"
wait_http "http://127.0.0.1:$P_ACC2/"
if [ "$USE_NGINX" = 1 ]; then wait_http "http://127.0.0.1:$P_NG/"; fi
if [ "$USE_LITELLM" = 1 ]; then wait_http "http://127.0.0.1:$P_LL/health/liveliness"; fi
if [ "$USE_PORTKEY" = 1 ]; then wait_http "http://127.0.0.1:$P_PK/"; fi
if [ "$USE_AGENTGATEWAY" = 1 ]; then wait_http "http://127.0.0.1:$P_AG/"; wait_http "http://127.0.0.1:$P_AGS/"; fi


# ---------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------
# A prompt-sized Messages request (hack/bench_tenant.sh).
bench_body "$WORK/body.json"

TARGETS=(direct claudekey shared shared-r0)
if [ -n "$BASELINE" ]; then TARGETS+=(baseline); fi
if [ "$USE_NGINX" = 1 ]; then TARGETS+=(nginx); fi
if [ "$USE_LITELLM" = 1 ]; then TARGETS+=(litellm); fi
if [ "$USE_AGENTGATEWAY" = 1 ]; then TARGETS+=(agentgateway); fi
if [ "$USE_PORTKEY" = 1 ]; then TARGETS+=(portkey); fi

target_url() {
  case $1 in
    direct) echo "http://127.0.0.1:$P_UP/v1/messages" ;;
    claudekey) echo "http://127.0.0.1:$P_CK/v1/messages" ;;
    baseline) echo "http://127.0.0.1:$P_CKB/v1/messages" ;;
    shared) echo "http://127.0.0.1:$P_CKSH/v1/messages" ;;
    shared-r0) echo "http://127.0.0.1:$P_CKSH0/v1/messages" ;;
    nginx) echo "http://127.0.0.1:$P_NG/v1/messages" ;;
    litellm) echo "http://127.0.0.1:$P_LL/v1/messages" ;;
    agentgateway) echo "http://127.0.0.1:$P_AG/v1/messages" ;;
    portkey) echo "http://127.0.0.1:$P_PK/v1/messages" ;;
  esac
}
target_key() {
  case $1 in
    direct|nginx) echo "$UPKEY" ;;   # nginx overwrites it with the same upstream key
    claudekey|baseline|shared|shared-r0|agentgateway) echo "$WKEY" ;;
    portkey) echo "$WKEY" ;;   # not checked (Portkey has no client keys); its upstream key is in PK_CONFIG
    litellm) echo "$MASTER" ;;
  esac
}
target_pid() {
  case $1 in
    direct) echo "$PID_upstream" ;;
    claudekey) echo "$PID_claudekey" ;;
    baseline) echo "$PID_baseline" ;;
    shared) echo "$PID_claudekey_shared" ;;
    shared-r0) echo "$PID_claudekey_shared_r0" ;;
    nginx) echo "$PID_nginx" ;;
    litellm) echo "$PID_litellm" ;;
    agentgateway) echo "$PID_agentgateway" ;;
    portkey) echo "$PID_portkey" ;;
  esac
}
# target_headers TARGET — extra request header arguments, one per line (Portkey's per-request config).
target_headers() {
  if [ "$1" = portkey ]; then printf '%s\n' -H "x-portkey-config: $PK_CONFIG"; fi
}

# anon_kib PID — the anonymous part of the resident set (heap and stacks: what the process
# itself allocated). The rest of VmRSS is pages of the executable, shared and reclaimable.
anon_kib() {
  awk '/^RssAnon:/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0
}

# rss_line TARGET PHASE — one RSS record for the target's process (tree).
rss_line() {
  local pid; pid=$(target_pid "$1")
  echo "{\"row\":\"rss\",\"target\":\"$1\",\"phase\":\"$2\",\"kib\":$(rss_kib "$pid"),\"anon_kib\":$(anon_kib "$pid")}" >>"$RAW/results.jsonl"
}
# Idle RSS right after start, before any traffic.
for t in "${TARGETS[@]}"; do if [ "$t" != direct ]; then rss_line "$t" idle; fi; done

# ports_settled — waits (up to 60 s) until fewer than 4,000 loopback sockets are in TIME_WAIT.
# A target that opens a connection per request leaves tens of thousands behind a 3 s cell at
# c=64; the next cell, whoever it measures, would then fail to connect once the ~28k ephemeral
# ports are gone, and its figures would be the previous target's doing.
ports_settled() {
  local i
  for i in $(seq 1 120); do
    [ "$(ss -Htan state time-wait | wc -l)" -lt 4000 ] && return 0
    sleep 0.5
  done
  log "still $(ss -Htan state time-wait | wc -l) sockets in TIME_WAIT after 60 s; measuring anyway"
}

# oha_run OUT TARGET ARGS... — one oha run on core 1; the JSON summary goes to OUT.
oha_run() {
  local out=$1 target=$2 extra; shift 2
  ports_settled
  mapfile -t extra < <(target_headers "$target")
  taskset -c 1 "$OHA" --no-tui --output-format json -m POST "${extra[@]}" \
    -H "x-api-key: $(target_key "$target")" -H "anthropic-version: 2023-06-01" \
    -T application/json -D "$WORK/body.json" "$@" "$(target_url "$target")" >"$out" 2>"$out.err"
}

# Every target must answer 200 before anything is measured.
for t in "${TARGETS[@]}"; do
  mapfile -t extra < <(target_headers "$t")
  code=$(curl -s -o "$WORK/check-$t.json" -w '%{http_code}' -X POST "$(target_url "$t")" "${extra[@]}" \
    -H "x-api-key: $(target_key "$t")" -H 'anthropic-version: 2023-06-01' \
    -H 'content-type: application/json' --data-binary "@$WORK/body.json")
  if [ "$code" != 200 ]; then
    log "$t answered $code: $(head -c 300 "$WORK/check-$t.json")"; exit 1
  fi
done

# shuffled WORDS... — the words in a random order (interleaving without a fixed bias).
shuffled() { printf '%s\n' "$@" | shuf; }

# cell_order REP — row 1's targets for one repetition: shuffled, except that the shared-limits
# targets sit right next to the local claudekey they are paired with (row 7), after it in odd
# repetitions and before it in even ones. This VM's speed drifts up to 40% between cells seconds
# apart, so a pair split across the repetition, or always in one order, measures the drift.
cell_order() {
  local rep=$1 t pair=() rest=()
  for t in "${TARGETS[@]}"; do
    case $t in shared|shared-r0) pair+=("$t") ;; claudekey) ;; *) rest+=("$t") ;; esac
  done
  if [ $((rep % 2)) = 1 ]; then pair=(claudekey "${pair[@]}"); else pair=("${pair[@]}" claudekey); fi
  { printf '%s\n' "${rest[@]}"; echo "${pair[*]}"; } | shuf | tr ' ' '\n'
}

log "row 1: warm-up"
for t in "${TARGETS[@]}"; do oha_run "$RAW/warmup-$t.json" "$t" -c 16 -z 1s; done

log "row 1: closed loop at c=1/16/64, $REPS repetitions of ${CELL}s cells, interleaved"
for rep in $(seq 1 "$REPS"); do
  for c in 1 16 64; do
    for t in $(cell_order "$rep"); do
      pid=$(target_pid "$t")
      before=$(cpu_seconds "$pid")
      oha_run "$RAW/closed-$t-c$c-r$rep.json" "$t" -c "$c" -z "${CELL}s"
      after=$(cpu_seconds "$pid")
      echo "{\"row\":\"closed\",\"target\":\"$t\",\"c\":$c,\"rep\":$rep,\"cpu_s\":$(awk -v a="$after" -v b="$before" 'BEGIN{print a-b}'),\"file\":\"closed-$t-c$c-r$rep.json\"}" >>"$RAW/results.jsonl"
    done
  done
done

# Issue 21's c=1 targets compare claudekey with nginx, a few microseconds apart, while this VM's
# speed drifts by tens of percent between cells: short rounds of the two back to back, in a
# random order, give one difference per round that the drift mostly cancels from; the table
# gives their median.
if [ "$USE_NGINX" = 1 ]; then
  log "row 1: claudekey against nginx at c=1, $PAIRS paired rounds of ${PAIR_CELL}s"
  for round in $(seq 1 "$PAIRS"); do
    for t in $(shuffled claudekey nginx); do
      oha_run "$RAW/pair-$t-r$round.json" "$t" -c 1 -z "${PAIR_CELL}s"
      echo "{\"row\":\"pair\",\"target\":\"$t\",\"round\":$round,\"file\":\"pair-$t-r$round.json\"}" >>"$RAW/results.jsonl"
    done
  done
fi

# Open loop: a constant arrival rate (oha -q, latency corrected for coordinated omission); a
# rate passes when p99 <= 5 ms, >= 95% of the rate was achieved and every request succeeded.
# 32 connections carry 20k req/s at ~1.5 ms each; with 128, opening the connections of every
# step (and, through a proxy, the upstream connections behind them) dominated the p99.
sweep_rates() {
  if [ "$SMOKE" = 1 ]; then echo "500 1000"; return; fi
  case $1 in
    litellm) echo "25 50 100 200 400 800 1600" ;;
    portkey) echo "250 500 1000 2000 3000 4000 6000 8000" ;;
    *) echo "1000 2000 4000 6000 8000 10000 12000 16000 20000" ;;
  esac
}
SWEEP_REPS=$(( REPS < 2 ? REPS : 2 ))
log "row 1: open-loop sweep, $SWEEP_REPS repetitions"
for rep in $(seq 1 "$SWEEP_REPS"); do
  for t in $(shuffled "${TARGETS[@]}"); do
    # Row 7 compares shared against local limits in the closed-loop cells only.
    if [ "$t" = shared ] || [ "$t" = shared-r0 ]; then continue; fi
    # The sweep measures a proxy in service: one closed-loop second first, so its upstream
    # connection pool and heap are warm (the closed-loop cells may have ended minutes ago).
    oha_run "$WORK/sweep-warm.json" "$t" -c 32 -z 1s || true
    for rate in $(sweep_rates "$t"); do
      f="sweep-$t-q$rate-r$rep.json"
      oha_run "$RAW/$f" "$t" -c 32 -q "$rate" -z "${SWEEP_STEP}s" --latency-correction || true
      echo "{\"row\":\"sweep\",\"target\":\"$t\",\"rate\":$rate,\"rep\":$rep,\"file\":\"$f\"}" >>"$RAW/results.jsonl"
      if ! python3 hack/bench_report.py --passes "$RAW/$f" "$rate"; then break; fi
    done
  done
done

# ---------------------------------------------------------------------------
# row 7: limit accuracy across two proxy processes
# ---------------------------------------------------------------------------
# requestsPerMinute: 60 allows a burst of 60, then one a second: 100 requests at once through
# each of two processes sharing Redis should pass 60 (+1 a second), not 120.
log "row 7: limit accuracy, two proxies sharing requestsPerMinute: 60"
acc_start=$(date +%s.%N)
for i in 1 2; do
  port_var=P_ACC$i
  taskset -c 1 "$OHA" --no-tui --output-format json -m POST -H "x-api-key: $WKEY" \
    -H "anthropic-version: 2023-06-01" -T application/json -D "$WORK/body.json" -n 100 -c 8 \
    "http://127.0.0.1:${!port_var}/v1/messages" >"$RAW/accuracy-$i.json" 2>"$RAW/accuracy-$i.err" &
  eval "ACC_PID$i=$!"
done
wait "$ACC_PID1" "$ACC_PID2"
acc_s=$(awk -v a="$(date +%s.%N)" -v b="$acc_start" 'BEGIN{print a-b}')
echo "{\"row\":\"accuracy\",\"limit\":60,\"proxies\":2,\"sent\":200,\"seconds\":$acc_s,\"files\":[\"accuracy-1.json\",\"accuracy-2.json\"]}" >>"$RAW/results.jsonl"

# The reference for "at most one loopback round trip added": back-to-back round trips (PING, and
# EVALSHA of the admission script) from a bare client on the proxy's core, to each Redis.
log "row 7: round trips to Redis from the proxy's core"
for rep in $(seq 1 "$REPS"); do
  for placement in $(shuffled 1 0); do
    port=$([ "$placement" = 1 ] && echo "$P_RD" || echo "$P_RD0")
    line=$(taskset -c 0 "$BIN/examples/bench_redis" --addr "127.0.0.1:$port" \
      --samples "$([ "$SMOKE" = 1 ] && echo 50 || echo 2000)")
    echo "{\"row\":\"redis_rtt\",\"redis_core\":$placement,\"rep\":$rep,\"m\":$line}" >>"$RAW/results.jsonl"
  done
done

# ---------------------------------------------------------------------------
# row 2: streaming
# ---------------------------------------------------------------------------
log "row 2: streaming through a paced upstream (64 deltas, 20 ms apart; TTFB from $TTFB_STREAMS one-delta streams), with and without response redaction"
for rep in $(seq 1 "$REPS"); do
  for t in $(shuffled direct claudekey claudekey-redact bare $([ "$USE_NGINX" = 1 ] && echo nginx) \
      $([ "$USE_AGENTGATEWAY" = 1 ] && echo agentgateway) $([ "$USE_PORTKEY" = 1 ] && echo portkey)); do
    extra=()
    case $t in
      direct) url=http://127.0.0.1:$P_UPS key=$UPKEY ;;
      nginx) url=http://127.0.0.1:$P_NGS key=$UPKEY ;;
      bare) url=http://127.0.0.1:$P_BARE key=$WKEY ;;
      claudekey) url=http://127.0.0.1:$P_CKS key=$WKEY ;;
      claudekey-redact) url=http://127.0.0.1:$P_CKR key=$WKEY ;;
      agentgateway) url=http://127.0.0.1:$P_AGS key=$WKEY ;;
      portkey) url=http://127.0.0.1:$P_PK key=$WKEY extra=(--header "x-portkey-config: $PK_CONFIG_STREAM") ;;
    esac
    line=$(taskset -c 1 "$BIN/examples/bench_stream" --url "$url" --key "$key" "${extra[@]}" \
      --streams "$STREAMS" --concurrency 1 --warmup 2)
    echo "{\"row\":\"stream\",\"target\":\"$t\",\"rep\":$rep,\"m\":$line}" >>"$RAW/results.jsonl"
    # The TTFB percentiles: many streams of one delta, so the p99 is not a maximum. Each starts
    # after 60 ms of quiet (three 20 ms paces: what these streams took while the fake still
    # paced the events after the last delta), so a first byte finds the proxy's core idle.
    line=$(taskset -c 1 "$BIN/examples/bench_stream" --url "$url" --key "$key" "${extra[@]}" \
      --streams "$TTFB_STREAMS" --concurrency 1 --warmup 5 --max-tokens 2 --pause-ms 60)
    echo "{\"row\":\"stream_ttfb\",\"target\":\"$t\",\"rep\":$rep,\"m\":$line}" >>"$RAW/results.jsonl"
  done
  # The floor: a round trip to the echo on the proxy's core, back to back and after the pace.
  for idle in 0 20; do
    line=$(taskset -c 1 "$BIN/examples/bench_wake" probe --addr "127.0.0.1:$P_ECHO" --idle-ms "$idle" \
      --samples "$([ "$SMOKE" = 1 ] && echo 20 || echo 200)")
    echo "{\"row\":\"wake\",\"rep\":$rep,\"m\":$line}" >>"$RAW/results.jsonl"
  done
done

# ---------------------------------------------------------------------------
# row 3: footprint
# ---------------------------------------------------------------------------
log "row 3: soak at 1k req/s for ${SOAK}s (RSS sampled every second)"
(
  while kill -0 "$PID_claudekey" 2>/dev/null; do
    echo "$(date +%s.%N) $(rss_kib "$PID_claudekey")"
    sleep 1
  done
) >"$RAW/soak-rss.txt" &
SAMPLER=$!
PIDS+=("$SAMPLER")
before=$(cpu_seconds "$PID_claudekey")
oha_run "$RAW/soak.json" claudekey -c 16 -q 1000 -z "${SOAK}s" --latency-correction
after=$(cpu_seconds "$PID_claudekey")
kill "$SAMPLER" 2>/dev/null || true
sleep 2
{
  echo "{\"row\":\"soak\",\"seconds\":$SOAK,\"cpu_s\":$(awk -v a="$after" -v b="$before" 'BEGIN{print a-b}'),\"file\":\"soak.json\",\"samples\":\"soak-rss.txt\"}"
} >>"$RAW/results.jsonl"
for t in "${TARGETS[@]}"; do if [ "$t" != direct ]; then rss_line "$t" after; fi; done

# ---------------------------------------------------------------------------
# rows 4 and 6: criterion (handler time, redaction, scan)
# ---------------------------------------------------------------------------
log "rows 4 and 6: criterion benches (webhook, redact, scan)"
CARGO_TARGET=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
rm -rf "$CARGO_TARGET/criterion"
for b in $([ "${BENCH_PROFILE:-release}" = dev ] || [ "$USE_CRITERION" = 0 ] || echo webhook redact scan); do
  taskset -c 0 nice cargo bench --locked --bench "$b" -- "${CRITERION[@]}" >"$WORK/criterion-$b.log" 2>&1 \
    || { log "criterion $b failed:"; tail -20 "$WORK/criterion-$b.log" >&2; exit 1; }
done
if [ -d "$CARGO_TARGET/criterion" ]; then cp -r "$CARGO_TARGET/criterion" "$RAW/criterion"; fi

# ---------------------------------------------------------------------------
# row 4: webhook through the real apiserver; webhook RSS idle
# ---------------------------------------------------------------------------
if [ "$USE_WEBHOOK" = 1 ]; then
  KCFG=${CLAUDEKEY_TEST_KUBECONFIG:-}
  if [ -z "$KCFG" ] && [ "$SMOKE" = 0 ]; then
    CP_STATE=$WORK/cp
    log "row 4: starting a private control plane in $CP_STATE"
    CLAUDEKEY_STATE_DIR=$CP_STATE bash hack/control-plane.sh start >"$WORK/cp.log" 2>&1 \
      || { tail -30 "$WORK/cp.log" >&2; exit 1; }
    KCFG=$CP_STATE/kubeconfig
  fi
  if [ -n "$KCFG" ]; then
    export KUBECONFIG=$KCFG
    kubectl apply --server-side -f crds/ >/dev/null
    bench_webhook_pki "$WORK/pki"
    P_WH=$(free_port)
    start webhook 0 "$CK" webhook --listen "127.0.0.1:$P_WH" --tls-cert-file "$WORK/pki/tls.crt" \
      --tls-key-file "$WORK/pki/tls.key" --proxy-image registry.example/claudekey:bench
    for i in $(seq 1 300); do
      curl -s --cacert "$WORK/pki/ca.crt" -o /dev/null "https://127.0.0.1:$P_WH/healthz" && break
      sleep 0.1
    done
    sleep 2
    echo "{\"row\":\"rss\",\"target\":\"webhook\",\"phase\":\"idle\",\"kib\":$(rss_kib "$PID_webhook")}" >>"$RAW/results.jsonl"
    log "row 4: Deployment create latency with and without the webhooks"
    taskset -c 1 "$BIN/examples/bench_admission" --webhook "https://127.0.0.1:$P_WH" \
      --ca-file "$WORK/pki/ca.crt" --count "$ADMISSION_N" --rounds "$(( REPS < 3 ? REPS : 3 ))" \
      >"$RAW/admission.json" 2>"$WORK/admission.log" \
      || { log "bench_admission failed:"; tail -20 "$WORK/admission.log" >&2; exit 1; }
    echo "{\"row\":\"admission\",\"file\":\"admission.json\"}" >>"$RAW/results.jsonl"
  fi
fi

# ---------------------------------------------------------------------------
# row 5: controller scale (same control plane as row 4)
# ---------------------------------------------------------------------------
if [ "$USE_WEBHOOK" = 1 ] && [ -n "${KCFG:-}" ]; then
  OPNS=claudekey-bench
  kubectl create namespace "$OPNS" >/dev/null 2>&1 || true
  P_CM=$(free_port)
  start controller 0 "$CK" controller --namespace "$OPNS" --leader-election false \
    --metrics-listen "127.0.0.1:$P_CM" --usage-interval 0s --gateway-url http://gateway.bench:8080
  wait_http "http://127.0.0.1:$P_CM/healthz"
  sleep 2
  echo "{\"row\":\"rss\",\"target\":\"controller\",\"phase\":\"idle\",\"kib\":$(rss_kib "$PID_controller")}" >>"$RAW/results.jsonl"
  # A round's namespaces are deleted in the background: the next round starts once their
  # ClaudeKeys are gone, so it does not count the deletions (Secrets, the orphan sweep) too.
  bench_claudekeys_gone() {
    for _ in $(seq 1 600); do
      [ "$(kubectl get claudekeys -A -l claudekey.io/bench=1 --no-headers 2>/dev/null | wc -l)" = 0 ] && return
      sleep 0.5
    done
    log "ClaudeKeys of the last round still there after 300 s"; exit 1
  }
  log "row 5: $SCALE_N ClaudeKeys applied at once, $(( REPS < 3 ? REPS : 3 )) rounds"
  (
    while kill -0 "$PID_controller" 2>/dev/null; do rss_kib "$PID_controller"; sleep 0.5; done
  ) >"$RAW/controller-rss.txt" &
  SAMPLER=$!
  PIDS+=("$SAMPLER")
  for rep in $(seq 1 $(( REPS < 3 ? REPS : 3 ))); do
    line=$(taskset -c 1 "$BIN/examples/bench_controller" --operator-namespace "$OPNS" \
      --controller-metrics "http://127.0.0.1:$P_CM/metrics" --count "$SCALE_N" 2>"$WORK/scale.log") \
      || { log "bench_controller failed:"; tail -20 "$WORK/scale.log" >&2; exit 1; }
    echo "{\"row\":\"scale\",\"rep\":$rep,\"m\":$line}" >>"$RAW/results.jsonl"
    bench_claudekeys_gone
  done
  echo "{\"row\":\"rss\",\"target\":\"controller\",\"phase\":\"peak\",\"kib\":$(sort -n "$RAW/controller-rss.txt" | tail -1)}" >>"$RAW/results.jsonl"
  # Row 8 (issue 21): one gateway serving every ClaudeKey's config Secret from the operator
  # namespace, at one tenant and then at one more than the large round below.
  # Its upstream holds the key bench_controller puts in the upstream-key Secret.
  P_GWT=$(free_port) P_GWU=$(free_port)
  start upstream-tenants 1 "$BIN/examples/fake_upstream" --listen "127.0.0.1:$P_GWU" \
    --key "sk-ant-api03-$(printf 'BenchUpstream_%.0s' 1 2 3 4 5 6 7)AA"
  start gateway-tenants 0 "$CK" proxy --mode gateway --config-secrets "$OPNS" --listen "127.0.0.1:$P_GWT" \
    --upstream "http://127.0.0.1:$P_GWU" --audit-log "$WORK/audit-gwt.log"
  solo=$(taskset -c 1 "$BIN/examples/bench_controller" --operator-namespace "$OPNS" \
    --controller-metrics "http://127.0.0.1:$P_CM/metrics" --count 1 --namespaces 1 --keep 2>"$WORK/scale.log") \
    || { log "bench_controller failed:"; tail -20 "$WORK/scale.log" >&2; exit 1; }
  SOLO_NS=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["kept"][0])' "$solo")
  printf '%s' '{"model":"claude-haiku-4-5","max_tokens":256,"messages":[{"role":"user","content":"Summarise the ticket: the order arrived two days late."}]}' >"$WORK/body-haiku.json"
  gateway_tenants_cells() {   # $1: tenants label
    local key rep
    key=$(kubectl get secret -n "$SOLO_NS" ck-0000-client -o jsonpath='{.data.ANTHROPIC_API_KEY}' | base64 -d)
    for _ in $(seq 1 600); do
      curl -s -o /dev/null -w '%{http_code}' -H "x-api-key: $key" -H 'anthropic-version: 2023-06-01' \
        -H 'content-type: application/json' --data-binary @"$WORK/body-haiku.json" \
        "http://127.0.0.1:$P_GWT/v1/messages" | grep -q 200 && break
      sleep 0.1
    done
    for rep in $(seq 1 "$REPS"); do
      taskset -c 1 "$OHA" --no-tui --output-format json -m POST -H "x-api-key: $key" \
        -H "anthropic-version: 2023-06-01" -T application/json -D "$WORK/body-haiku.json" -c 64 -z "${CELL}s" \
        "http://127.0.0.1:$P_GWT/v1/messages" >"$RAW/gwt-$1-r$rep.json" 2>/dev/null
      echo "{\"row\":\"gateway_tenants\",\"tenants\":\"$1\",\"rep\":$rep,\"file\":\"gwt-$1-r$rep.json\"}" >>"$RAW/results.jsonl"
    done
    echo "{\"row\":\"rss\",\"target\":\"gateway-tenants\",\"phase\":\"$1\",\"kib\":$(rss_kib "$PID_gateway_tenants")}" >>"$RAW/results.jsonl"
  }
  log "row 8: one gateway, one tenant: c=64"
  gateway_tenants_cells one
  # One round ten times larger (issue 21): 10,000 ClaudeKeys over 100 namespaces, once (it
  # takes minutes); the controller's RSS peak of this round is its own row.
  log "row 5: $SCALE_BIG ClaudeKeys applied at once, 1 round (the row 8 gateway serves them too)"
  rss_before_big=$(wc -l <"$RAW/controller-rss.txt")
  cpu_before=$(round_cpu)
  line=$(taskset -c 1 "$BIN/examples/bench_controller" --operator-namespace "$OPNS" \
    --controller-metrics "http://127.0.0.1:$P_CM/metrics" --count "$SCALE_BIG" --namespaces 100 \
    --timeout 900s --keep --gateway "http://127.0.0.1:$P_GWT" 2>"$WORK/scale.log") \
    || { log "bench_controller failed:"; tail -20 "$WORK/scale.log" >&2; exit 1; }
  echo "{\"row\":\"scale\",\"rep\":1,\"m\":$line}" >>"$RAW/results.jsonl"
  echo "{\"row\":\"scale_cpu\",\"count\":$SCALE_BIG,\"cores\":$(getconf _NPROCESSORS_ONLN),\"before\":$cpu_before,\"after\":$(round_cpu)}" >>"$RAW/results.jsonl"
  log "row 8: one gateway, $SCALE_BIG + 1 tenants: c=64"
  gateway_tenants_cells many
  for ns in $SOLO_NS $(python3 -c 'import json,sys; print(" ".join(json.loads(sys.argv[1])["kept"]))' "$line"); do
    kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
  done
  kill "$SAMPLER" 2>/dev/null || true
  echo "{\"row\":\"rss\",\"target\":\"controller\",\"phase\":\"peak-big\",\"kib\":$(tail -n +"$((rss_before_big + 1))" "$RAW/controller-rss.txt" | sort -n | tail -1)}" >>"$RAW/results.jsonl"
  echo "{\"row\":\"rss\",\"target\":\"controller\",\"phase\":\"after\",\"kib\":$(rss_kib "$PID_controller")}" >>"$RAW/results.jsonl"
fi

# ---------------------------------------------------------------------------
# row 8: heap bytes per gateway tenant (counted by a counting allocator, not timed): ClaudeKeys
# sharing the bench_controller policy and the full policy, and a distinct policy's own cost.
# ---------------------------------------------------------------------------
for policy in small full; do
  echo "{\"row\":\"tenant_heap\",\"policy\":\"$policy\",\"m\":$("$BIN/examples/bench_tenants" --policy "$policy" \
    --count "$([ "$SMOKE" = 1 ] && echo 50 || echo 2000)")}" >>"$RAW/results.jsonl"
done

# ---------------------------------------------------------------------------
# hot path: instructions and allocations per request (hack/hotpath.sh, under valgrind; counts,
# not times, so they hold on a noisy machine). Last, so valgrind slows no timed row.
# ---------------------------------------------------------------------------
if command -v valgrind >/dev/null && [ "${BENCH_PROFILE:-release}" = release ]; then
  HP_ARGS=(-n "$([ "$SMOKE" = 1 ] && echo 20 || echo 2000)" --warmup "$([ "$SMOKE" = 1 ] && echo 5 || echo 200)"
    --fake-upstream "$BIN/examples/fake_upstream" --json "$RAW/results.jsonl")
  log "hot path: instructions and allocations per request (valgrind)"
  hack/hotpath.sh --bin "$CK" --label claudekey "${HP_ARGS[@]}" || log "hot path: claudekey failed"
  if [ "$USE_NGINX" = 1 ]; then
    hack/hotpath.sh --nginx --label nginx "${HP_ARGS[@]}" || log "hot path: nginx failed"
  fi
  if [ -n "$BASELINE" ]; then
    hack/hotpath.sh --bin "$BASE_BIN" --label baseline "${HP_ARGS[@]}" || log "hot path: baseline failed"
  fi
else
  log "hot path row skipped (no valgrind, or a dev build)"
fi

# ---------------------------------------------------------------------------
# table
# ---------------------------------------------------------------------------
VERSIONS=$(
  echo "claudekey $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty'), $CK_BUILD, $(rustc --version)"
  echo "oha $OHA_VERSION; $(nginx -v 2>&1 | sed 's/.*: //' || true); $(
    if [ "$USE_LITELLM" = 1 ]; then echo "litellm $LITELLM_VERSION ($("$LITELLM_VENV/bin/python" --version 2>&1))"; else echo "litellm not run"; fi)"
  echo "peers: agentgateway $AGENTGATEWAY_VERSION$([ "$USE_AGENTGATEWAY" = 1 ] || echo ' (not run)') (built from source, quick-release profile, $(rustc --version | cut -d' ' -f1-2)); @portkey-ai/gateway $PORTKEY_VERSION$([ "$USE_PORTKEY" = 1 ] || echo ' (not run)') ($(node --version 2>/dev/null || echo 'node missing'), @hono/node-server $PORTKEY_HONO_NODE_SERVER_VERSION)"
  echo "$(uname -sr), $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')"
  echo "cpuidle: $(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo unknown)$(
    [ -r /sys/module/haltpoll/parameters/guest_halt_poll_ns ] &&
      echo ", guest_halt_poll_ns=$(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns)")"
)
if [ "$SMOKE" = 1 ]; then OUT=$WORK/benchmarks.md; fi
# A report that fails keeps the raw results, so a fixed report can be run on them again
# (the command is printed) rather than the whole run.
REPORT=(python3 hack/bench_report.py --raw "$RAW" --out "$OUT" --command "$COMMAND"
  --versions "$VERSIONS" ${BASELINE:+--baseline "$BASE_REV"} --reps "$REPS" --soak "$SOAK" --cell "$CELL")
if [ "$SMOKE" = 1 ]; then REPORT+=(--smoke); fi
if ! "${REPORT[@]}"; then
  KEEP_WORK=1
  log "the report failed; raw results kept in $RAW; after a fix: $(printf '%q ' "${REPORT[@]}")"
  exit 1
fi
log "done; table written to $OUT"
