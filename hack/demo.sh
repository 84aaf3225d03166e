#!/usr/bin/env bash
# The README's first command: claudekey end to end on this machine.
#
# Starts a local control plane (etcd, kube-apiserver, kube-controller-manager), the fake Anthropic
# upstream, `claudekey controller` on the embedded default backend (a Kubernetes Secret) and
# `claudekey webhook` (registered with the apiserver), then walks through what a user sees:
# the synced Secrets (fingerprints only), a Deployment with a raw key refused, a Pod admitted
# with the proxy sidecar injected, a request through a locally run proxy with its audit line,
# and a rotation with the grace overlap. Ctrl-C stops everything it started.
#
# As root on Linux it also starts a real node (hack/node.sh: containerd, kubelet, bridge CNI) and
# runs an app pod with the official Python SDK through its injected sidecar.
#
#   CLAUDEKEY_DEMO_EXIT=1   end after the walk-through instead of waiting for Ctrl-C (CI)
#   CLAUDEKEY_DEMO_DIR      working directory (default /tmp/claudekey-demo)
#   CLAUDEKEY_DEMO_NODE=0   no real node even as root (the pod is then only shown admitted)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

DEMO=${CLAUDEKEY_DEMO_DIR:-/tmp/claudekey-demo}
export CLAUDEKEY_STATE_DIR=$DEMO/control-plane
OPERATOR_NS=claudekey-system
NS=team-a
GRACE=20s

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
note() { printf '   %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

children=()
cleanup() {
  local pid
  for pid in "${children[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  bash hack/control-plane.sh stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD... — runs CMD in the background with its output in $DEMO/NAME.log.
start() {
  local name=$1; shift
  "$@" >"$DEMO/$name.log" 2>&1 &
  children+=($!)
}

# wait_for WHAT SECONDS CMD... — retries CMD until it succeeds.
wait_for() {
  local what=$1 seconds=$2 i; shift 2
  for ((i = 0; i < seconds * 5; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "timed out waiting for $what"
}

# The real node's part: a ClaudeKey with placement namespace (the proxy sidecar itself, talking to
# the fake upstream on the bridge address), and the official SDK in an app pod, unchanged.
demo_pod_on_the_node() {
  say "On the real node: the official Python SDK in an app pod, through its injected sidecar"
  kubectl apply -f - >/dev/null <<EOF
apiVersion: claudekey.io/v1alpha2
kind: ClusterClaudeKeySource
metadata: { name: support-sidecar }
spec:
  kubernetesSecret: { name: anthropic-support, key: api-key }
  allowedNamespaces: { names: [$NS] }
  placement: namespace
---
apiVersion: claudekey.io/v1alpha2
kind: ClaudeKey
metadata: { name: sidecar-bot, namespace: $NS }
spec:
  sourceRef: { kind: ClusterClaudeKeySource, name: support-sidecar }
  scope: { models: ["claude-haiku-*"] }
EOF
  kubectl -n "$NS" wait ck/sidecar-bot --for=condition=Ready --timeout=60s >/dev/null
  kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: sdk-app
  namespace: $NS
  annotations: { claudekey.io/inject: sidecar-bot }
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  securityContext: { runAsNonRoot: true, runAsUser: 1000, seccompProfile: { type: RuntimeDefault } }
  containers:
    - name: app
      image: $CLAUDEKEY_TEST_APP_IMAGE
      imagePullPolicy: Never
      securityContext: { allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: { drop: [ALL] } }
      args:
        - -c
        - |
          import anthropic, os
          print("the app's base URL:", os.environ["ANTHROPIC_BASE_URL"], "and key:", os.environ["ANTHROPIC_API_KEY"])
          msg = anthropic.Anthropic(max_retries=0).messages.create(model="claude-haiku-4-5", max_tokens=32,
              messages=[{"role": "user", "content": "Say hello."}])
          print("ANSWER", msg.content[0].text)
EOF
  wait_for "the app pod to finish" 90 bash -c "'$CLAUDEKEY_TEST_KUBECTL' -n $NS get pod sdk-app -o jsonpath='{.status.phase}' | grep -qx Succeeded"
  note "pod sdk-app: init container $(kubectl -n "$NS" get pod sdk-app -o jsonpath='{.status.initContainerStatuses[0].name} (a native sidecar) started {.status.initContainerStatuses[0].state.*.startedAt}')"
  note "             app container started $(kubectl -n "$NS" get pod sdk-app -o jsonpath='{.status.containerStatuses[0].state.terminated.startedAt}'), pod $(kubectl -n "$NS" get pod sdk-app -o jsonpath='{.status.phase}')"
  note "app output (the SDK unchanged, with the placeholder key; the sidecar sends the real one):"
  kubectl -n "$NS" logs sdk-app -c app | sed 's/^/     /'
}

say "Building claudekey and the test tools (cached after the first run)"
bash hack/tools.sh >/dev/null
cargo build --quiet --bin claudekey --example fake_upstream
CK=$ROOT/target/debug/claudekey
FAKE=$ROOT/target/debug/examples/fake_upstream

rm -rf "$DEMO" && mkdir -p "$DEMO"
NODE=0
[[ $(id -u) == 0 && $(uname -s) == Linux && ${CLAUDEKEY_DEMO_NODE:-1} != 0 ]] && NODE=1
if [[ $NODE == 1 ]]; then
  say "Starting a local control plane and a real node (root: containerd, kubelet, bridge CNI)"
else
  say "Starting a local control plane"
fi
CLAUDEKEY_NODE=$NODE CLAUDEKEY_BIN=$CK bash hack/control-plane.sh start >"$DEMO/control-plane.log" 2>&1 \
  || { tail -30 "$DEMO/control-plane.log"; die "control plane did not start (CLAUDEKEY_DEMO_NODE=0: without the node)"; }
# shellcheck disable=SC1091
source "$CLAUDEKEY_STATE_DIR/env"
kubectl() { "$CLAUDEKEY_TEST_KUBECTL" "$@"; }
note "kube-apiserver at $CLAUDEKEY_TEST_APISERVER (kubeconfig: $KUBECONFIG)"

say "Installing the CRDs (ClaudeKey, ClusterClaudeKeySource, ClaudeKeySource) and the namespaces"
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for=condition=Established crd/claudekeys.claudekey.io \
  crd/clusterclaudekeysources.claudekey.io crd/claudekeysources.claudekey.io --timeout=60s >/dev/null
kubectl create namespace "$OPERATOR_NS" >/dev/null
kubectl apply -f deploy/samples/00-namespace-team-a.yaml >/dev/null
note "$(kubectl get crd -o name | grep claudekey.io | tr '\n' ' ')established"

# A made-up upstream key that only the fake upstream knows. It never leaves this machine and the
# demo never prints it: everything below shows fingerprints.
UPSTREAM_KEY="sk-ant-api03-demo-$(openssl rand -hex 24)-AA"
UPSTREAM_PORT=$(free_port)
# On the node, pods reach this machine only at the bridge address.
UPSTREAM_HOST=127.0.0.1
[[ $NODE == 1 ]] && UPSTREAM_HOST=$CLAUDEKEY_TEST_NODE_IP
start fake-upstream "$FAKE" --listen "$UPSTREAM_HOST:$UPSTREAM_PORT" --key "$UPSTREAM_KEY"
UPSTREAM=http://$UPSTREAM_HOST:$UPSTREAM_PORT
wait_for "the fake Anthropic upstream" 30 curl -s -o /dev/null "$UPSTREAM/"
note "fake Anthropic API at $UPSTREAM"

say "Storing the upstream key in the embedded default backend: Secret $OPERATOR_NS/anthropic-support"
note "labelled claudekey.io/upstream-key=true: the controller reads no other Secret of $OPERATOR_NS"
kubectl -n "$OPERATOR_NS" create secret generic anthropic-support \
  --from-literal=api-key="$UPSTREAM_KEY" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n "$OPERATOR_NS" label secret anthropic-support claudekey.io/upstream-key=true >/dev/null

GATEWAY_PORT=$(free_port)
CONTROLLER_METRICS=$(free_port)
start controller "$CK" controller --namespace "$OPERATOR_NS" --leader-election=false \
  --metrics-listen "127.0.0.1:$CONTROLLER_METRICS" --gateway-url "http://127.0.0.1:$GATEWAY_PORT"
wait_for "the controller" 60 curl -sf "http://127.0.0.1:$CONTROLLER_METRICS/healthz"
note "controller running (metrics on 127.0.0.1:$CONTROLLER_METRICS/metrics)"

say "Starting the admission webhook and registering it with the apiserver"
PKI=$DEMO/webhook-pki && mkdir -p "$PKI"
openssl req -new -newkey rsa:2048 -nodes -subj "/CN=claudekey-webhook" \
  -keyout "$PKI/tls.key" -out "$PKI/tls.csr" 2>/dev/null
openssl x509 -req -in "$PKI/tls.csr" -CA "$CLAUDEKEY_TEST_CA" -CAkey "$CLAUDEKEY_TEST_CA_KEY" \
  -CAcreateserial -days 1 -out "$PKI/tls.crt" \
  -extfile <(printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n') 2>/dev/null
WEBHOOK_PORT=$(free_port)
start webhook "$CK" webhook --listen "127.0.0.1:$WEBHOOK_PORT" \
  --tls-cert-file "$PKI/tls.crt" --tls-key-file "$PKI/tls.key" --mode enforce \
  --proxy-image "${CLAUDEKEY_TEST_IMAGE:-ghcr.io/claudekey/claudekey:0.1.0}" --proxy-upstream "$UPSTREAM"
wait_for "the webhook" 60 curl -sfk "https://127.0.0.1:$WEBHOOK_PORT/healthz"
CA_BUNDLE=$(base64 -w0 <"$CLAUDEKEY_TEST_CA")
kubectl apply -f - >/dev/null <<EOF
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: { name: claudekey-demo }
webhooks:
  - name: validate.claudekey.io
    clientConfig: { url: "https://127.0.0.1:$WEBHOOK_PORT/validate", caBundle: "$CA_BUNDLE" }
    rules:
      - { apiGroups: [""], apiVersions: [v1], operations: [CREATE, UPDATE], resources: [pods] }
      - { apiGroups: [apps], apiVersions: [v1], operations: [CREATE, UPDATE], resources: [deployments, statefulsets, daemonsets, replicasets] }
      - { apiGroups: [batch], apiVersions: [v1], operations: [CREATE, UPDATE], resources: [jobs, cronjobs] }
    namespaceSelector: { matchLabels: { kubernetes.io/metadata.name: $NS } }
    failurePolicy: Fail
    sideEffects: None
    admissionReviewVersions: [v1]
    timeoutSeconds: 5
---
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: { name: claudekey-demo }
webhooks:
  - name: inject.claudekey.io
    clientConfig: { url: "https://127.0.0.1:$WEBHOOK_PORT/mutate", caBundle: "$CA_BUNDLE" }
    rules:
      - { apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods] }
    namespaceSelector: { matchLabels: { kubernetes.io/metadata.name: $NS } }
    failurePolicy: Fail
    sideEffects: None
    reinvocationPolicy: IfNeeded
    admissionReviewVersions: [v1]
    timeoutSeconds: 5
EOF
note "webhook serving https://127.0.0.1:$WEBHOOK_PORT (/validate, /mutate) for namespace $NS"

say "The platform grants the source to $NS: ClusterClaudeKeySource support (placement gateway)"
kubectl apply -f deploy/samples/15-cluster-source.yaml >/dev/null
kubectl get ccks support
note ""
say "Applying the sample ClaudeKey $NS/support-bot (grace period shortened to $GRACE for the demo)"
sed "s/gracePeriod: 15m/gracePeriod: $GRACE/" deploy/samples/20-claudekey.yaml | kubectl apply -f - >/dev/null
kubectl -n "$NS" wait ck/support-bot --for=condition=Ready --timeout=60s >/dev/null
kubectl -n "$NS" get ck support-bot -o wide
note ""
note "Secrets the controller wrote (keys never shown, only their fingerprints). In $NS, only the"
note "workload key; the upstream key stays in $OPERATOR_NS, in the gateway's config Secret:"
kubectl -n "$NS" get secrets -l app.kubernetes.io/managed-by=claudekey
kubectl -n "$OPERATOR_NS" get secrets -l claudekey.io/config=gateway
note "status.workloadKey: $(kubectl -n "$NS" get ck support-bot -o jsonpath='{.status.workloadKey}')"
note "status.upstream:    $(kubectl -n "$NS" get ck support-bot -o jsonpath='{.status.upstream}')"

say "A Deployment with a raw Anthropic key in its env is refused"
if kubectl apply -f deploy/samples/bad/deployment-raw-key.yaml 2>"$DEMO/refused.txt"; then
  die "the webhook admitted a raw key"
fi
sed 's/^/   /' "$DEMO/refused.txt"

say "A Pod annotated claudekey.io/inject: support-bot gets the proxy sidecar"
kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: support-bot-demo
  namespace: $NS
  annotations: { claudekey.io/inject: support-bot }
spec:
  containers:
    - name: app
      image: python:3.13-slim
      command: ["sleep", "infinity"]
EOF
note "init containers (native sidecars): $(kubectl -n "$NS" get pod support-bot-demo -o jsonpath='{range .spec.initContainers[*]}{.name} restartPolicy={.restartPolicy} {end}')"
note "sidecar args: $(kubectl -n "$NS" get pod support-bot-demo -o jsonpath='{.spec.initContainers[0].args}')"
note "app env: $(kubectl -n "$NS" get pod support-bot-demo -o jsonpath='{range .spec.containers[0].env[*]}{.name}={.value} {end}')"
if [[ $NODE == 1 ]]; then
  kubectl -n "$NS" delete pod support-bot-demo --wait=false >/dev/null
  demo_pod_on_the_node
else
  note "(no kubelet here, so the pod stays Pending; on a real cluster it starts with the sidecar;"
  note " as root, hack/demo.sh starts a real node and runs an app pod through its sidecar)"
fi

say "Sending a request through the claudekey gateway with the workload key"
note "the gateway reads the config Secrets of $OPERATOR_NS through the API (--config-secrets)"
PROXY_METRICS=$(free_port)
start proxy "$CK" proxy --config-secrets "$OPERATOR_NS" --listen "127.0.0.1:$GATEWAY_PORT" \
  --upstream "$UPSTREAM" --audit-log "$DEMO/audit.log" --metrics-listen "127.0.0.1:$PROXY_METRICS" --mode gateway
wait_for "the proxy" 30 curl -sf "http://127.0.0.1:$PROXY_METRICS/readyz"
client_key() { kubectl -n "$NS" get secret support-bot-client -o jsonpath='{.data.ANTHROPIC_API_KEY}' | base64 -d; }
ask() { # ask KEY TEXT — prints the HTTP status of one Messages call through the proxy
  curl -s -o "$DEMO/last-response.json" -w '%{http_code}' "http://127.0.0.1:$GATEWAY_PORT/v1/messages" \
    -H "x-api-key: $1" -H 'anthropic-version: 2023-06-01' -H 'content-type: application/json' \
    -d "{\"model\":\"claude-haiku-4-5\",\"max_tokens\":64,\"metadata\":{\"user_id\":\"demo-user\"},\"messages\":[{\"role\":\"user\",\"content\":\"$2\"}]}"
}
OLD_KEY=$(client_key)
note "POST /v1/messages (prompt mentions jane@example.com) -> HTTP $(ask "$OLD_KEY" 'Summarise the ticket from jane@example.com')"
note "an out-of-scope model -> HTTP $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$GATEWAY_PORT/v1/messages" \
  -H "x-api-key: $OLD_KEY" -H 'anthropic-version: 2023-06-01' -H 'content-type: application/json' \
  -d '{"model":"claude-opus-4-1","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}')"
note "audit lines (metadata only: no prompt, no key):"
sed 's/^/     /' "$DEMO/audit.log"

say "Rotating the workload key: annotate claudekey.io/rotate (old and new both valid for $GRACE)"
OLD_FP=$(kubectl -n "$NS" get ck support-bot -o jsonpath='{.status.workloadKey.fingerprint}')
kubectl -n "$NS" annotate ck support-bot "claudekey.io/rotate=$(date +%s)" --overwrite >/dev/null
wait_for "the rotation" 60 bash -c "[ \"\$('$CLAUDEKEY_TEST_KUBECTL' -n $NS get ck support-bot -o jsonpath='{.status.workloadKey.fingerprint}')\" != '$OLD_FP' ]"
note "status.workloadKey: $(kubectl -n "$NS" get ck support-bot -o jsonpath='{.status.workloadKey}')"
sleep 1 # the gateway sees the changed config Secret through its watch
NEW_KEY=$(client_key)
note "during grace: new key -> HTTP $(ask "$NEW_KEY" 'hello'), old key -> HTTP $(ask "$OLD_KEY" 'hello')"
note "waiting for the grace period to end..."
wait_for "the end of grace" 90 bash -c "[ -z \"\$('$CLAUDEKEY_TEST_KUBECTL' -n $NS get ck support-bot -o jsonpath='{.status.workloadKey.previousFingerprint}')\" ]"
sleep 2
note "after grace:  new key -> HTTP $(ask "$NEW_KEY" 'hello'), old key -> HTTP $(ask "$OLD_KEY" 'hello')"
kubectl -n "$NS" get ck support-bot

say "Done. Next steps"
note "On a real cluster: helm install claudekey charts/claudekey -n claudekey-system --create-namespace"
note "then grant a source (ClusterClaudeKeySource), apply a ClaudeKey (deploy/samples/) and"
note "annotate pods with claudekey.io/inject: <name>."
note "Check manifests offline: helm template ... | claudekey scan -"
note "Logs of this run: $DEMO/*.log; kubeconfig: $KUBECONFIG"
if [[ ${CLAUDEKEY_DEMO_EXIT:-0} == 1 ]]; then exit 0; fi
note "Everything keeps running; press Ctrl-C to stop it all."
while sleep 3600; do :; done
