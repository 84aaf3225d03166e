#!/usr/bin/env bash
# The end-to-end tests on real pods (tests/node/, what hack/test.sh's node tier runs on its own
# local node) against any cluster given by a kubeconfig: kind, k3d, a test cluster. For machines
# where the local node cannot run (not root, not Linux). Needs no root and no Docker daemon.
#
#   CLAUDEKEY_E2E_KUBECONFIG=~/.kube/kind-ck \
#   CLAUDEKEY_E2E_HOST_IP=172.18.0.1 \
#   CLAUDEKEY_E2E_LOAD='kind load image-archive --name ck' \
#     hack/e2e-cluster.sh [TEST-FILTER]
#
#   CLAUDEKEY_E2E_KUBECONFIG  the cluster (cluster-admin: the tests install the chart into
#                             namespace ck-node and create namespaces, CRDs and webhooks)
#   CLAUDEKEY_E2E_HOST_IP     an address of this machine the cluster's pods can reach: the tests
#                             serve the fake Anthropic API there (kind: the gateway of its Docker
#                             network, `docker network inspect kind`; k3d: its network's gateway)
#   CLAUDEKEY_E2E_LOAD        a command that puts an image archive on every node, given the file
#                             (kind: `kind load image-archive --name C`; k3d: `k3d image import -c C`;
#                             containerd: `ctr -n k8s.io images import`)
#
# It builds the claudekey image from target/debug/claudekey and the SDK app image (hack/image.sh,
# no Docker daemon), loads both with CLAUDEKEY_E2E_LOAD, packages the chart, and runs
# `cargo test --test webhook_e2e -- --ignored node::` with the environment the tests read.
# Pod addresses must be reachable from this machine for the probe test (kind on Linux: they are
# through the node container's route, `ip route add <podCIDR> via <kind node IP>`). The cluster
# needs working Service routing (kube-proxy); DNS is not needed (the tests use hostAliases).
# Uninstall afterwards with `helm uninstall claudekey -n ck-node` and delete the ck-node namespace
# (the tests' namespaces carry a random suffix and are deleted by the tests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { printf 'e2e-cluster.sh: %s\n' "$*" >&2; exit 1; }
[[ -n ${CLAUDEKEY_E2E_KUBECONFIG:-} ]] || die "set CLAUDEKEY_E2E_KUBECONFIG (see the header)"
[[ -n ${CLAUDEKEY_E2E_HOST_IP:-} ]] || die "set CLAUDEKEY_E2E_HOST_IP (see the header)"
[[ -n ${CLAUDEKEY_E2E_LOAD:-} ]] || die "set CLAUDEKEY_E2E_LOAD (see the header)"
# shellcheck source=versions.env
source hack/versions.env

bash hack/tools.sh >/dev/null
# shellcheck disable=SC1091
source "${XDG_CACHE_HOME:-$HOME/.cache}/claudekey/tools.env"
cargo build --locked --bin claudekey --test webhook_e2e

dist=$(mktemp -d /tmp/claudekey-e2e.XXXXXX)
trap 'rm -rf "$dist"' EXIT
image=claudekey.local/claudekey:e2e
app=claudekey.local/sdk-app:$ANTHROPIC_SDK_VERSION
bash hack/image.sh claudekey "$dist/claudekey.tar" target/debug/claudekey "$image"
bash hack/image.sh app "$dist/app.tar" "$app"
for f in claudekey app; do
  # shellcheck disable=SC2086 # the command and its arguments, as the user wrote them
  $CLAUDEKEY_E2E_LOAD "$dist/$f.tar"
done
"$CLAUDEKEY_HELM" package charts/claudekey -d "$dist" >/dev/null

export CLAUDEKEY_TEST_KUBECONFIG=$CLAUDEKEY_E2E_KUBECONFIG
export CLAUDEKEY_TEST_NODE_IP=$CLAUDEKEY_E2E_HOST_IP
export CLAUDEKEY_TEST_IMAGE=$image CLAUDEKEY_TEST_APP_IMAGE=$app
CLAUDEKEY_TEST_CHART=$(ls "$dist"/claudekey-*.tgz)
export CLAUDEKEY_TEST_CHART
export CLAUDEKEY_TEST_HELM=$CLAUDEKEY_HELM CLAUDEKEY_TEST_KUBECTL=$CLAUDEKEY_KUBECTL
export CLAUDEKEY_TEST_PYTHON=$CLAUDEKEY_PYTHON
cargo test --locked --test webhook_e2e -- --ignored --test-threads=1 "node::${1:-}"
