#!/usr/bin/env bash
# The whole test suite, the README's second command and what CI runs:
#   unit tests, then integration tests against a real control plane (etcd, kube-apiserver,
#   kube-controller-manager), moto server, an OpenBao dev server, helm and the official
#   Anthropic Python SDK. Tools are built once into ~/.cache/claudekey by hack/tools.sh.
# Everything this script starts it stops again, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s\n' "$*" >&2; }

step "tools (built once into ${XDG_CACHE_HOME:-$HOME/.cache}/claudekey)"
bash hack/tools.sh

export CLAUDEKEY_STATE_DIR=${CLAUDEKEY_STATE_DIR:-$(mktemp -d /tmp/claudekey-test.XXXXXX)}
trap 'bash hack/control-plane.sh stop >/dev/null 2>&1 || true' EXIT
trap 'exit 130' INT TERM

step "build"
cargo build --all-targets --locked

step "control plane and backends"
bash hack/control-plane.sh start
# shellcheck disable=SC1091
source "$CLAUDEKEY_STATE_DIR/env"

step "cargo test (unit + integration)"
cargo_log=$CLAUDEKEY_STATE_DIR/cargo-test.log
cargo test --all-targets --locked --no-fail-fast 2>&1 | tee "$cargo_log"

if [ -f hack/chart-test.sh ]; then
  step "helm chart"
  CLAUDEKEY_BIN=target/debug/claudekey bash hack/chart-test.sh
fi
step "the README's first command (hack/demo.sh, non-interactive)"
demo_dir=$(mktemp -d /tmp/claudekey-demo-test.XXXXXX)
if ! CLAUDEKEY_DEMO_EXIT=1 CLAUDEKEY_DEMO_DIR=$demo_dir bash hack/demo.sh >"$demo_dir.log" 2>&1; then
  tail -40 "$demo_dir.log" >&2
  echo "hack/demo.sh failed (log: $demo_dir.log)" >&2
  exit 1
fi
grep -q "after grace:  new key -> HTTP 200, old key -> HTTP 401" "$demo_dir.log" \
  || { tail -40 "$demo_dir.log" >&2; echo "hack/demo.sh did not show the rotation" >&2; exit 1; }
echo "demo ok (log: $demo_dir.log)"

step "all tests passed"
# One closing line for the whole run (cargo prints one per test binary, the last of which may be
# a target with no tests).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' "$cargo_log"
