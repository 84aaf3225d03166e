#!/usr/bin/env bash
# The whole test suite, the README's second command and what CI runs:
#   unit tests, then integration tests against a real control plane (etcd, kube-apiserver,
#   kube-controller-manager), moto server, an OpenBao dev server, helm and the official
#   Anthropic Python SDK. Tools are built once into ~/.cache/claudekey by hack/tools.sh.
#   Then the node tier: a second control plane with a real node (hack/node.sh: containerd,
#   kubelet, bridge CNI; root only), the chart installed with `helm install --wait` from the image
#   hack/image.sh builds, and the end-to-end tests on real pods (tests/node, run with --ignored);
#   afterwards the host must be exactly as before (hack/node.sh host-state, compared).
#   CLAUDEKEY_SKIP_NODE=1 leaves the node tier out (say so when you report a run);
#   `hack/test.sh --node` runs only the node tier (after tools and build).
# Everything this script starts it stops again, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s\n' "$*" >&2; }

step "tools (built once into ${XDG_CACHE_HOME:-$HOME/.cache}/claudekey)"
bash hack/tools.sh

export CLAUDEKEY_STATE_DIR=${CLAUDEKEY_STATE_DIR:-$(mktemp -d /tmp/claudekey-test.XXXXXX)}
NODE_STATE=$(mktemp -d /tmp/claudekey-node.XXXXXX)
cleanup() {
  bash hack/control-plane.sh stop >/dev/null 2>&1 || true
  CLAUDEKEY_STATE_DIR=$NODE_STATE/cp bash hack/control-plane.sh stop >/dev/null 2>&1 || true
  [[ -z ${MEM_SAMPLER:-} ]] || kill "$MEM_SAMPLER" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cargo_log=$(mktemp /tmp/claudekey-cargo.XXXXXX.log)
node_tier() {
  step "node tier: a real node, the chart installed from the built image, tests on real pods"
  [[ $(id -u) == 0 ]] || { echo "the node tier needs root (CLAUDEKEY_SKIP_NODE=1 to leave it out)" >&2; return 1; }
  bash hack/control-plane.sh stop >/dev/null 2>&1 || true  # the first tier's; frees its memory
  bash hack/node.sh host-state >"$NODE_STATE/host-before"
  local start=$SECONDS
  # Memory peak of the tier: the control plane, node and pods (hack/node.sh mem-usage), sampled
  # every second.
  ( peak=0; while :; do
      u=$(CLAUDEKEY_STATE_DIR=$NODE_STATE/cp bash hack/node.sh mem-usage 2>/dev/null || echo 0)
      if ((u > peak)); then peak=$u; echo "$peak" >"$NODE_STATE/mem-peak"; fi
      sleep 1
    done ) &
  MEM_SAMPLER=$!
  CLAUDEKEY_STATE_DIR=$NODE_STATE/cp CLAUDEKEY_NODE=1 CLAUDEKEY_BIN=target/debug/claudekey \
    bash hack/control-plane.sh start >"$NODE_STATE/start.log" 2>&1 \
    || { tail -40 "$NODE_STATE/start.log" >&2; return 1; }
  local rc=0
  ( # shellcheck disable=SC1091
    source "$NODE_STATE/cp/env"
    cargo test --test webhook_e2e --locked -- --ignored --test-threads=1 node:: 2>&1 ) \
    | tee -a "$cargo_log" || rc=1
  CLAUDEKEY_STATE_DIR=$NODE_STATE/cp bash hack/control-plane.sh stop >/dev/null 2>&1 || rc=1
  kill "$MEM_SAMPLER" 2>/dev/null || true
  bash hack/node.sh host-state >"$NODE_STATE/host-after"
  if ! diff -u "$NODE_STATE/host-before" "$NODE_STATE/host-after" >&2; then
    echo "hack/node.sh stop did not restore the host (diff above)" >&2
    rc=1
  fi
  printf 'node tier: %ds wall, memory peak %d MiB (control plane + node + pods)\n' \
    $((SECONDS - start)) $(($(cat "$NODE_STATE/mem-peak" 2>/dev/null || echo 0) / 1024)) >&2
  return $rc
}

step "build"
cargo build --all-targets --locked

if [[ ${1:-} == --node ]]; then
  node_tier
  awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' "$cargo_log"
  exit 0
fi

step "control plane and backends"
bash hack/control-plane.sh start
# shellcheck disable=SC1091
source "$CLAUDEKEY_STATE_DIR/env"

step "cargo test (unit + integration)"
cargo test --all-targets --locked --no-fail-fast 2>&1 | tee "$cargo_log"

if [ -f hack/chart-test.sh ]; then
  step "helm chart"
  CLAUDEKEY_BIN=target/debug/claudekey bash hack/chart-test.sh
fi
step "the README's first command (hack/demo.sh, non-interactive)"
demo_dir=$(mktemp -d /tmp/claudekey-demo-test.XXXXXX)
demo_node=1
[[ ${CLAUDEKEY_SKIP_NODE:-0} == 1 ]] && demo_node=0
if ! CLAUDEKEY_DEMO_EXIT=1 CLAUDEKEY_DEMO_DIR=$demo_dir CLAUDEKEY_DEMO_NODE=$demo_node bash hack/demo.sh >"$demo_dir.log" 2>&1; then
  tail -40 "$demo_dir.log" >&2
  echo "hack/demo.sh failed (log: $demo_dir.log)" >&2
  exit 1
fi
grep -q "after grace:  new key -> HTTP 200, old key -> HTTP 401" "$demo_dir.log" \
  || { tail -40 "$demo_dir.log" >&2; echo "hack/demo.sh did not show the rotation" >&2; exit 1; }
# As root the demo also starts a real node and runs an app pod through its sidecar.
if [[ $(id -u) == 0 && ${CLAUDEKEY_SKIP_NODE:-0} != 1 ]]; then
  grep -q "ANSWER Hello from the fake Anthropic API." "$demo_dir.log" \
    || { tail -40 "$demo_dir.log" >&2; echo "hack/demo.sh did not run the app pod through its sidecar" >&2; exit 1; }
fi
echo "demo ok (log: $demo_dir.log)"

if [[ ${CLAUDEKEY_SKIP_NODE:-0} == 1 ]]; then
  step "node tier SKIPPED (CLAUDEKEY_SKIP_NODE=1)"
else
  node_tier
fi

step "all tests passed"
# One closing line for the whole run (cargo prints one per test binary, the last of which may be
# a target with no tests).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' "$cargo_log"
