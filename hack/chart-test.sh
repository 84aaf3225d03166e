#!/usr/bin/env bash
# Tests the Helm chart and deploy/ against real tools and the test control plane:
#
#   1. the chart's CRDs (files/crds.yaml, rendered as templates) are exactly `claudekey crd`
#   2. helm lint --strict, once per scenario in charts/claudekey/ci/*-values.yaml
#   3. values.schema.json refuses bad values (each case must make `helm template` fail)
#   4. helm template per scenario, piped through `claudekey scan -` (the chart must pass its own
#      policy); deploy/samples/*.yaml scan clean and deploy/samples/bad/ is refused
#   5. helm install per scenario into the test control plane (RBAC on, real admission; pods stay
#      Pending without a kubelet), a few checks on what the apiserver stored, then uninstall;
#      for the default scenario also `kubectl auth can-i` for least privilege, the controller
#      binary run as its ServiceAccount (it must make a ClaudeKey Ready and never be refused), and
#      an upgrade that must keep the self-signed webhook and gateway certificates, and an upgrade
#      across a CRD change that must serve the new schema (CRDs are templates); CRDs are kept
#      on uninstall
#   6. deploy/samples accepted by the apiserver (--dry-run=server: CRD schema and CEL rules)
#   7. deploy/monitoring: every PromQL expression parsed (hack/check-promql.py), rules with
#      `promtool check rules` and `promtool test rules`
#
# Environment:
#   CLAUDEKEY_STATE_DIR   control-plane state dir; $CLAUDEKEY_STATE_DIR/env must exist (start it
#                         with hack/control-plane.sh start). Default /tmp/claudekey-cp.
#   CLAUDEKEY_BIN         the claudekey binary for `scan` (default target/debug/claudekey)
#   CLAUDEKEY_PROMTOOL    promtool (default: the one hack/tools.sh built, CLAUDEKEY_TEST_PROMTOOL
#                         from the env file). Step 7 fails without it.
#   CLAUDEKEY_PROMQL_PYTHON  a python with the PyPI packages promql-parser and PyYAML for the
#                         PromQL parse (default: the test venv, which has both).
#   CHART_TEST_NO_SCAN=1  skip step 4's scans, for branches where `claudekey scan` is not built;
#                         say so in any report. Never set in CI.
#   CHART_TEST_ONLY=name  run steps 2-5 for one scenario only (e.g. default)
#
# Exit status: 0 when everything passed, 1 on the first failure (with what failed).
set -euo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHART=$ROOT/charts/claudekey
STATE=${CLAUDEKEY_STATE_DIR:-/tmp/claudekey-cp}
ENV_FILE=$STATE/env
CLAUDEKEY_BIN=${CLAUDEKEY_BIN:-$ROOT/target/debug/claudekey}
RELEASE=claudekey

log() { printf '[chart-test] %s\n' "$*" >&2; }
die() { printf '[chart-test] FAIL: %s\n' "$*" >&2; exit 1; }

if [[ ! -f $ENV_FILE ]]; then
  die "no control plane env at $ENV_FILE: start one with
    CLAUDEKEY_STATE_DIR=$STATE bash hack/control-plane.sh start"
fi
# shellcheck source=/dev/null
source "$ENV_FILE"
HELM=${CLAUDEKEY_TEST_HELM:-}
[[ -n $HELM && -x $HELM ]] || die "helm not found (CLAUDEKEY_TEST_HELM='$HELM' from $ENV_FILE); run hack/tools.sh"
# The pinned kubectl that tools.sh builds, never whichever one the machine has.
KUBECTL=${CLAUDEKEY_TEST_KUBECTL:-}
[[ -n $KUBECTL && -x $KUBECTL ]] || die "kubectl not found (CLAUDEKEY_TEST_KUBECTL='$KUBECTL' from $ENV_FILE); run hack/tools.sh"
kubectl() { "$KUBECTL" "$@"; }
# A python with PyYAML (and promql-parser, for step 7): the test venv has both.
PROMQL_PYTHON=${CLAUDEKEY_PROMQL_PYTHON:-${CLAUDEKEY_TEST_PYTHON:-python3}}
[[ -n ${KUBECONFIG:-} && -f $KUBECONFIG ]] || die "KUBECONFIG from $ENV_FILE does not exist"
kubectl version >/dev/null 2>&1 || die "the control plane in $STATE does not answer (kubectl version)"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

scenarios=()
for f in "$CHART"/ci/*-values.yaml; do
  name=$(basename "$f" -values.yaml)
  [[ -z ${CHART_TEST_ONLY:-} || $name == "$CHART_TEST_ONLY" ]] && scenarios+=("$name")
done
((${#scenarios[@]})) || die "no scenario matches CHART_TEST_ONLY=${CHART_TEST_ONLY:-}"

# ---------------------------------------------------------------------------
# 1. CRDs
# ---------------------------------------------------------------------------
# The chart renders every document of files/crds.yaml as a template (so `helm upgrade` updates
# them); that file must be exactly what the binary prints. A crds/ directory in the chart would
# make Helm install CRDs it never upgrades.
[[ -x $CLAUDEKEY_BIN ]] || die "claudekey binary not found at $CLAUDEKEY_BIN (cargo build, or set CLAUDEKEY_BIN)"
"$CLAUDEKEY_BIN" crd | cmp -s - "$CHART/files/crds.yaml" ||
  die "charts/claudekey/files/crds.yaml differs from \`claudekey crd\`: $CLAUDEKEY_BIN crd > charts/claudekey/files/crds.yaml"
[[ ! -e $CHART/crds ]] || die "charts/claudekey/crds/ exists: Helm would install those CRDs once and never upgrade them"
mapfile -t CRD_NAMES < <("$CLAUDEKEY_BIN" crd | sed -n 's/^  name: \(.*\.claudekey\.io\)$/\1/p')
((${#CRD_NAMES[@]})) || die "no CRD names in \`claudekey crd\`"
log "ok   chart CRDs are \`claudekey crd\` (${CRD_NAMES[*]})"

# ---------------------------------------------------------------------------
# 2. lint
# ---------------------------------------------------------------------------
for s in "${scenarios[@]}"; do
  out=$("$HELM" lint --strict "$CHART" -f "$CHART/ci/$s-values.yaml" 2>&1) ||
    die "helm lint --strict ($s):"$'\n'"$out"
  log "ok   helm lint --strict ($s)"
done

# ---------------------------------------------------------------------------
# 3. the schema refuses bad values
# ---------------------------------------------------------------------------
expect_refused() { # description, then helm --set arguments
  local what=$1; shift
  if "$HELM" template "$RELEASE" "$CHART" "$@" >"$WORK/refused.out" 2>&1; then
    die "values.schema.json accepted $what ($*)"
  fi
  log "ok   refused: $what"
}
expect_refused "an unknown webhook mode" --set webhook.mode=audit
expect_refused "a misspelt key" --set controller.replica=2
expect_refused "an unknown failurePolicy" --set webhook.failurePolicy.validate=Open
expect_refused "the removed single-ClaudeKey gateway value" --set gateway.claudeKey=x
expect_refused "two namespaces for namespaced RBAC" --set 'rbac.namespaces={a,b}'
expect_refused "a misspelt networkPolicy key" --set networkPolicy.enable=true
expect_refused "vault token auth without a token Secret" \
  --set backends.vault.address=http://vault:8200 --set backends.vault.auth.method=token
expect_refused "a non-URL upstream" --set upstreamURL=api.anthropic.com
expect_refused "a webhook timeout over 30s" --set webhook.timeoutSeconds=31
expect_refused "a negative replica count" --set controller.replicas=-1
expect_refused "an issuerRef without a name" --set certManager.enabled=true --set certManager.issuerRef.kind=Issuer

# ---------------------------------------------------------------------------
# 4. render and scan
# ---------------------------------------------------------------------------
SCANNED="| claudekey scan -"
if [[ ${CHART_TEST_NO_SCAN:-} == 1 ]]; then
  SCANNED="(NOT scanned)"
  log "SKIP claudekey scan: CHART_TEST_NO_SCAN=1, so neither the rendered chart nor deploy/samples is scanned"
elif [[ ! -x $CLAUDEKEY_BIN ]]; then
  die "claudekey binary not found at $CLAUDEKEY_BIN (cargo build, or set CLAUDEKEY_BIN)"
fi
scan() { # scan arguments; stdin passed through
  if [[ ${CHART_TEST_NO_SCAN:-} == 1 ]]; then
    cat >/dev/null
    return 0
  fi
  "$CLAUDEKEY_BIN" scan "$@"
}

for s in "${scenarios[@]}"; do
  "$HELM" template "$RELEASE" "$CHART" -n "ck-$s" -f "$CHART/ci/$s-values.yaml" >"$WORK/$s.yaml" ||
    die "helm template ($s)"
  rc=0
  scan - <"$WORK/$s.yaml" >"$WORK/$s.scan" 2>&1 || rc=$?
  ((rc == 0)) || die "claudekey scan - of the rendered chart ($s) exited $rc:"$'\n'"$(cat "$WORK/$s.scan")"
  log "ok   helm template ($s) $SCANNED"
done

rc=0
scan "$ROOT"/deploy/samples/*.yaml </dev/null >"$WORK/samples.scan" 2>&1 || rc=$?
((rc == 0)) || die "claudekey scan deploy/samples/*.yaml exited $rc (want 0):"$'\n'"$(cat "$WORK/samples.scan")"
if [[ ${CHART_TEST_NO_SCAN:-} != 1 ]]; then
  rc=0
  "$CLAUDEKEY_BIN" scan "$ROOT"/deploy/samples/bad/*.yaml >"$WORK/bad.scan" 2>&1 || rc=$?
  ((rc == 1)) || die "claudekey scan deploy/samples/bad/*.yaml exited $rc (want 1: findings):"$'\n'"$(cat "$WORK/bad.scan")"
  grep -q 'sk-ant-api03-XXXXXXXXXXXX' "$WORK/bad.scan" &&
    die "claudekey scan printed the key itself, not a masked hint:"$'\n'"$(cat "$WORK/bad.scan")"
  log "ok   claudekey scan: deploy/samples clean, deploy/samples/bad refused"
fi

# ---------------------------------------------------------------------------
# 5. install into the control plane
# ---------------------------------------------------------------------------
kubectl apply --server-side -f "$ROOT/hack/testdata/stub-cert-manager-crds.yaml" >/dev/null
kubectl apply --server-side -f "$ROOT/hack/testdata/stub-monitoring-crds.yaml" >/dev/null
kubectl wait --for=condition=Established --timeout=60s \
  crd/certificates.cert-manager.io crd/issuers.cert-manager.io crd/clusterissuers.cert-manager.io \
  crd/servicemonitors.monitoring.coreos.com crd/podmonitors.monitoring.coreos.com \
  crd/prometheusrules.monitoring.coreos.com >/dev/null

# jsonpath of an object, or fail with what was missing.
get() { kubectl get "$@" 2>&1 || die "kubectl get $*"; }

check_can_i() { # want (yes|no), service account, then can-i arguments
  local want=$1 sa=$2; shift 2
  local got
  got=$(kubectl auth can-i --as="system:serviceaccount:$sa" "$@" 2>/dev/null || true)
  [[ $got == "$want" ]] || die "RBAC: $sa can-i $* = '$got', want '$want'"
}

# CRDs are kept on uninstall (and the Rust tests apply them too): let the next release adopt them,
# as a user moving claudekey to another release or namespace does.
adopt_crds() { # namespace
  local crd
  for crd in "${CRD_NAMES[@]}"; do
    kubectl get crd "$crd" >/dev/null 2>&1 || continue
    kubectl label crd "$crd" app.kubernetes.io/managed-by=Helm --overwrite >/dev/null
    kubectl annotate crd "$crd" meta.helm.sh/release-name="$RELEASE" \
      meta.helm.sh/release-namespace="$1" --overwrite >/dev/null
  done
}

# A ClaudeKey named $2 in namespace $1 on the upstream Secret $3 of the release namespace $4.
apply_probe_claudekey() {
  local team=$1 name=$2 secret=$3 ns=$4
  kubectl -n "$ns" label secret "$secret" claudekey.io/upstream-key=true --overwrite >/dev/null
  kubectl apply -f - >/dev/null <<EOF
apiVersion: claudekey.io/v1alpha2
kind: ClusterClaudeKeySource
metadata: { name: $name }
spec:
  kubernetesSecret: { name: $secret, key: api-key }
  allowedNamespaces: { names: [$team] }
---
apiVersion: claudekey.io/v1alpha2
kind: ClaudeKey
metadata: { name: $name, namespace: $team }
spec:
  sourceRef: { kind: ClusterClaudeKeySource, name: $name }
  scope: { models: ["claude-haiku-*"] }
EOF
}

# helm upgrade with a chart whose ClaudeKey CRD gained a field: the apiserver must serve the new
# schema (CRDs are templates, not crds/), then the original chart puts the old one back.
check_crd_upgrade() { # namespace
  local ns=$1 v2=$WORK/chart-crd-v2 field
  local path='{.spec.versions[0].schema.openAPIV3Schema.properties.spec.properties.chartUpgradeProbe.type}'
  rm -rf "$v2" && cp -r "$CHART" "$v2"
  "$PROMQL_PYTHON" - "$v2/files/crds.yaml" <<'PY' || die "could not make the changed CRD"
import re, sys, yaml
# `claudekey crd` writes YAML 1.2: only true/false are booleans (PyYAML's 1.1 would turn off into false).
class Loader(yaml.SafeLoader):
    pass
Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|false)$"), list("tf"))
path = sys.argv[1]
docs = [d for d in yaml.load_all(open(path), Loader=Loader) if d]
for d in docs:
    if d["metadata"]["name"] == "claudekeys.claudekey.io":
        for v in d["spec"]["versions"]:
            props = v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            props["chartUpgradeProbe"] = {"type": "string", "description": "added by chart-test"}
open(path, "w").write("".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in docs))
PY
  "$HELM" upgrade "$RELEASE" "$v2" -n "$ns" -f "$CHART/ci/default-values.yaml" >/dev/null ||
    die "helm upgrade with a changed CRD"
  field=$(get crd claudekeys.claudekey.io -o "jsonpath=$path")
  [[ $field == string ]] || die "helm upgrade did not update the ClaudeKey CRD (new field type '$field')"
  "$HELM" upgrade "$RELEASE" "$CHART" -n "$ns" -f "$CHART/ci/default-values.yaml" >/dev/null ||
    die "helm upgrade back to the original CRD"
  field=$(get crd claudekeys.claudekey.io -o "jsonpath=$path")
  [[ -z $field ]] || die "helm upgrade back did not restore the ClaudeKey CRD"
  log "ok   helm upgrade across a CRD change serves the new schema (and back)"
  # YAML 1.2 strings that YAML 1.1 reads as booleans must reach the apiserver as strings.
  if "$CLAUDEKEY_BIN" crd | grep -q -- '- off$'; then
    kubectl get crd -o json "${CRD_NAMES[@]}" | grep -q '"off"' ||
      die "the installed CRDs lost the string \"off\" (a YAML 1.1 parser read it as false)"
    log "ok   the installed CRDs keep \"off\" a string"
  fi
}

check_default_install() { # namespace
  local ns=$1
  # Least privilege, as the apiserver's authorizer sees it.
  local ctl=$ns:$RELEASE-controller wh=$ns:$RELEASE-webhook gw=$ns:$RELEASE-gateway
  check_can_i yes "$ctl" watch claudekeys.claudekey.io --all-namespaces
  check_can_i yes "$ctl" watch clusterclaudekeysources.claudekey.io
  check_can_i yes "$ctl" watch claudekeysources.claudekey.io --all-namespaces
  check_can_i no "$ctl" create clusterclaudekeysources.claudekey.io
  check_can_i no "$ctl" patch clusterclaudekeysources.claudekey.io
  check_can_i yes "$ctl" patch clusterclaudekeysources.claudekey.io --subresource=status
  check_can_i yes "$ctl" patch claudekeys.claudekey.io -n team-x
  check_can_i yes "$ctl" list namespaces
  check_can_i no "$ctl" patch namespaces
  check_can_i yes "$ctl" create secrets -n "$ns"
  check_can_i yes "$ctl" delete secrets -n "$ns"
  check_can_i yes "$ctl" patch claudekeys.claudekey.io --subresource=status -n team-x
  check_can_i no "$ctl" update claudekeys.claudekey.io -n team-x
  check_can_i yes "$ctl" create secrets -n team-x
  check_can_i yes "$ctl" patch deployments.apps -n team-x
  check_can_i no "$ctl" create deployments.apps -n team-x
  check_can_i no "$ctl" create pods -n team-x
  check_can_i yes "$ctl" create events.events.k8s.io -n team-x
  check_can_i yes "$ctl" create leases.coordination.k8s.io -n "$ns"
  check_can_i yes "$ctl" update leases.coordination.k8s.io/claudekey-controller -n "$ns"
  check_can_i no "$ctl" update leases.coordination.k8s.io/someone-else -n "$ns"
  check_can_i no "$ctl" create leases.coordination.k8s.io -n team-x
  check_can_i yes "$wh" list claudekeys.claudekey.io --all-namespaces
  check_can_i no "$wh" get secrets -n "$ns"
  check_can_i no "$wh" get secrets -n team-x
  check_can_i no "$wh" patch claudekeys.claudekey.io -n team-x
  check_can_i yes "$gw" watch secrets -n "$ns"
  check_can_i no "$gw" create secrets -n "$ns"
  check_can_i no "$gw" get secrets -n team-x
  check_can_i no "$gw" list claudekeys.claudekey.io --all-namespaces
  log "ok   RBAC least privilege (kubectl auth can-i as the controller, webhook and gateway ServiceAccounts)"

  # The chart's RBAC is enough for the real controller: the binary runs as the controller's
  # ServiceAccount (a TokenRequest token), with leader election, and must make a ClaudeKey in
  # another namespace Ready from a source Secret in the release namespace, never refused.
  local team=ck-rbac-team kc=$WORK/controller-sa.kubeconfig ctl_pid
  kubectl create namespace "$team" >/dev/null
  kubectl -n "$ns" create secret generic rbac-upstream \
    --from-literal=api-key="sk-ant-api03-chart-rbac-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')AA" >/dev/null
  kubectl -n "$ns" label secret rbac-upstream claudekey.io/upstream-key=true >/dev/null
  kubectl config view --raw --minify >"$kc"
  KUBECONFIG=$kc kubectl config set-credentials controller-sa \
    --token="$(kubectl create token "$RELEASE-controller" -n "$ns")" >/dev/null
  KUBECONFIG=$kc kubectl config set-context --current --user=controller-sa >/dev/null
  # The flags the chart gives it (gateway URL and the gateway's CA from its TLS Secret), where
  # this branch's binary knows them.
  local gw_flags=()
  get secret -n "$ns" "$RELEASE-gateway-tls" -o 'jsonpath={.data.ca\.crt}' | base64 -d >"$WORK/gateway-ca.crt"
  gw_flags+=(--gateway-url "https://$RELEASE-gateway.$ns.svc:8443")
  gw_flags+=(--gateway-ca-file "$WORK/gateway-ca.crt")
  KUBECONFIG=$kc "$CLAUDEKEY_BIN" controller --namespace "$ns" --metrics-listen 127.0.0.1:0 \
    --usage-interval 0s "${gw_flags[@]}" >"$WORK/controller-sa.log" 2>&1 &
  ctl_pid=$!
  apply_probe_claudekey "$team" rbac-probe rbac-upstream "$ns"
  local ready=0
  kubectl -n "$team" wait claudekey/rbac-probe --for=condition=Ready --timeout=90s >/dev/null && ready=1
  kill "$ctl_pid" 2>/dev/null || true
  wait "$ctl_pid" 2>/dev/null || true
  if [[ $ready != 1 ]]; then
    tail -20 "$WORK/controller-sa.log" >&2
    die "the controller, as its ServiceAccount, did not make a ClaudeKey Ready"
  fi
  get secret -n "$team" rbac-probe-client >/dev/null
  # Placement gateway: the upstream key went to the release namespace only.
  [[ -n $(kubectl -n "$ns" get secret -l "claudekey.io/config=gateway,claudekey.io/namespace=$team" -o name) ]] \
    || die "no gateway config Secret in $ns for the probe"
  if kubectl -n "$team" get secret rbac-probe-proxy >/dev/null 2>&1; then
    die "placement gateway wrote a -proxy Secret into $team"
  fi
  kubectl delete clusterclaudekeysource rbac-probe --wait=false >/dev/null
  get lease -n "$ns" claudekey-controller >/dev/null
  if grep -qiE 'forbidden|cannot (get|list|watch|create|patch|update)' "$WORK/controller-sa.log"; then
    grep -iE 'forbidden|cannot' "$WORK/controller-sa.log" | head -5 >&2
    die "the controller, as its ServiceAccount, was refused something"
  fi
  ! grep -q 'sk-ant-' "$WORK/controller-sa.log" || die "the controller logged an upstream key"
  kubectl delete namespace "$team" --wait=false >/dev/null
  log "ok   the controller binary, as its ServiceAccount, makes a ClaudeKey Ready (leader election on)"

  # Coverage, as the apiserver applies it: no webhook pod can run here, so with failurePolicy
  # Fail a covered namespace refuses pods and Deployments, and an uncovered one admits them.
  local probe=ck-probe out
  kubectl create namespace "$probe" >/dev/null
  for what in "run probe --image=example.invalid/app" "create deployment probe --image=example.invalid/app"; do
    # shellcheck disable=SC2086 # $what is a kubectl subcommand with its arguments
    if out=$(kubectl -n "$probe" $what --dry-run=server -o name 2>&1); then
      die "the webhooks do not cover namespace $probe: '$what' was admitted"
    fi
    [[ $out == *'failed calling webhook "'*'.claudekey.io"'* ]] ||
      die "'$what' in $probe refused, but not by a claudekey webhook: $out"
    for uncovered in kube-system "$ns"; do
      # shellcheck disable=SC2086
      out=$(kubectl -n "$uncovered" $what --dry-run=server -o name 2>&1) ||
        die "the webhooks cover namespace $uncovered ('$what' refused): $out"
    done
  done
  kubectl delete namespace "$probe" --wait=false >/dev/null
  log "ok   webhooks cover other namespaces (fail closed) and never kube-system or $ns"

  # Self-signed TLS: the caBundle must verify the serving certificate, and survive an upgrade.
  local ca1 ca2
  ca1=$(get validatingwebhookconfiguration "$RELEASE-webhook" -o 'jsonpath={.webhooks[0].clientConfig.caBundle}')
  [[ -n $ca1 ]] || die "self-signed mode: empty caBundle"
  get secret -n "$ns" "$RELEASE-webhook-tls" -o 'jsonpath={.data.tls\.crt}' | base64 -d >"$WORK/tls.crt"
  printf '%s' "$ca1" | base64 -d >"$WORK/ca.crt"
  openssl verify -CAfile "$WORK/ca.crt" "$WORK/tls.crt" >/dev/null 2>&1 ||
    die "the webhook certificate does not verify against the caBundle"
  openssl x509 -in "$WORK/tls.crt" -noout -ext subjectAltName 2>/dev/null |
    grep -q "DNS:$RELEASE-webhook.$ns.svc" || die "webhook certificate lacks DNS:$RELEASE-webhook.$ns.svc"
  "$HELM" upgrade "$RELEASE" "$CHART" -n "$ns" -f "$CHART/ci/default-values.yaml" >/dev/null ||
    die "helm upgrade (default)"
  ca2=$(get mutatingwebhookconfiguration "$RELEASE-webhook" -o 'jsonpath={.webhooks[0].clientConfig.caBundle}')
  [[ $ca1 == "$ca2" ]] || die "helm upgrade replaced the self-signed webhook CA (lookup reuse broken)"
  log "ok   self-signed webhook TLS verifies and survives helm upgrade"

  # The gateway's certificate: its own CA (what <name>-client carries), its Service's name, kept
  # across upgrades.
  local gca1 gca2
  gca1=$(get secret -n "$ns" "$RELEASE-gateway-tls" -o 'jsonpath={.data.ca\.crt}')
  printf '%s' "$gca1" | base64 -d >"$WORK/gateway-ca.crt"
  get secret -n "$ns" "$RELEASE-gateway-tls" -o 'jsonpath={.data.tls\.crt}' | base64 -d >"$WORK/gateway.crt"
  openssl verify -CAfile "$WORK/gateway-ca.crt" "$WORK/gateway.crt" >/dev/null 2>&1 ||
    die "the gateway certificate does not verify against its CA"
  openssl x509 -in "$WORK/gateway.crt" -noout -ext subjectAltName 2>/dev/null |
    grep -q "DNS:$RELEASE-gateway.$ns.svc" || die "gateway certificate lacks DNS:$RELEASE-gateway.$ns.svc"
  if openssl verify -CAfile "$WORK/ca.crt" "$WORK/gateway.crt" >/dev/null 2>&1; then
    die "the gateway certificate verifies against the webhook CA: one CA for both"
  fi
  gca2=$(get secret -n "$ns" "$RELEASE-gateway-tls" -o 'jsonpath={.data.ca\.crt}')
  [[ $gca1 == "$gca2" ]] || die "helm upgrade replaced the gateway CA"
  log "ok   self-signed gateway TLS: own CA, Service DNS name, survives helm upgrade"

  check_crd_upgrade "$ns"
}

for s in "${scenarios[@]}"; do
  ns=ck-$s
  adopt_crds "$ns"
  # Namespaced RBAC puts Roles into the listed namespaces, which must exist (ci/namespaced-values.yaml).
  if [[ $s == namespaced ]]; then
    kubectl create namespace team-a --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  fi
  out=$("$HELM" install "$RELEASE" "$CHART" -n "$ns" --create-namespace \
    -f "$CHART/ci/$s-values.yaml" 2>&1) || die "helm install ($s):"$'\n'"$out"
  [[ $out == *"NOTES:"*"kind: ClaudeKey"*"claudekey.io/inject"* ]] ||
    die "($s) NOTES.txt does not tell the next steps (apply a ClaudeKey, annotate a pod):"$'\n'"$out"
  # What the apiserver stored: both webhooks, never covering kube-system or the release namespace.
  sel=$(get validatingwebhookconfiguration "$RELEASE-webhook" -o 'jsonpath={.webhooks[0].namespaceSelector.matchExpressions[0].values}')
  [[ $sel == *'"kube-system"'* && $sel == *"\"$ns\""* ]] ||
    die "($s) webhook namespaceSelector does not exclude kube-system and $ns: $sel"
  get mutatingwebhookconfiguration "$RELEASE-webhook" >/dev/null
  get deployment -n "$ns" "$RELEASE-controller" "$RELEASE-webhook" >/dev/null
  get pdb -n "$ns" "$RELEASE-webhook" >/dev/null
  if [[ $s == default ]]; then check_default_install "$ns"; fi
  if [[ $s == cert-manager* ]]; then
    get certificate -n "$ns" "$RELEASE-webhook" >/dev/null
    ann=$(get validatingwebhookconfiguration "$RELEASE-webhook" -o 'jsonpath={.metadata.annotations.cert-manager\.io/inject-ca-from}')
    [[ $ann == "$ns/$RELEASE-webhook" ]] || die "($s) inject-ca-from is '$ann'"
  fi
  if [[ $s == namespaced ]]; then
    get role -n team-a "$RELEASE-controller-workloads" >/dev/null
    check_can_i yes "$ns:$RELEASE-controller" create secrets -n team-a
    check_can_i no "$ns:$RELEASE-controller" create secrets -n team-b
    check_can_i no "$ns:$RELEASE-controller" list claudekeys.claudekey.io --all-namespaces
    check_can_i yes "$ns:$RELEASE-controller" list claudekeys.claudekey.io -n team-a
  fi
  if [[ $s == gateway ]]; then
    get service -n "$ns" "$RELEASE-gateway" >/dev/null
    get servicemonitor -n "$ns" "$RELEASE-controller" >/dev/null
    get prometheusrule -n "$ns" "$RELEASE" >/dev/null
    get configmap -n "$ns" "$RELEASE-dashboard" >/dev/null
    get networkpolicy -n "$ns" "$RELEASE-controller" "$RELEASE-webhook" "$RELEASE-gateway" >/dev/null
  fi
  crds_by_chart=$("$HELM" get manifest "$RELEASE" -n "$ns" | grep -c '^kind: CustomResourceDefinition$' || true)
  "$HELM" uninstall "$RELEASE" -n "$ns" --wait --timeout 2m >/dev/null || die "helm uninstall ($s)"
  if ((crds_by_chart > 0)); then
    for crd in "${CRD_NAMES[@]}"; do
      kubectl get crd "$crd" >/dev/null 2>&1 || die "($s) helm uninstall deleted CRD $crd (must be kept)"
    done
  fi
  # Cluster-scoped leftovers would break the next scenario (and a user's reinstall).
  if kubectl get clusterrole "$RELEASE-controller" >/dev/null 2>&1 ||
    kubectl get validatingwebhookconfiguration "$RELEASE-webhook" >/dev/null 2>&1; then
    die "($s) helm uninstall left cluster-scoped objects behind"
  fi
  kubectl delete namespace "$ns" --wait=false >/dev/null
  log "ok   helm install + uninstall ($s) in the control plane"
done

# ---------------------------------------------------------------------------
# 6. samples accepted by the apiserver (no webhook installed now: schema and CEL only)
# ---------------------------------------------------------------------------
# --force-conflicts: the Rust tests applied the same CRD before, under their own field manager.
kubectl apply --server-side --force-conflicts -f "$ROOT/crds/" >/dev/null
kubectl wait --for=condition=Established --timeout=60s "${CRD_NAMES[@]/#/crd/}" >/dev/null
kubectl get namespace claudekey-system >/dev/null 2>&1 || kubectl create namespace claudekey-system >/dev/null
kubectl apply -f "$ROOT/deploy/samples/00-namespace-team-a.yaml" >/dev/null
for f in "$ROOT"/deploy/samples/[1-9]*.yaml "$ROOT"/deploy/samples/backends/*.yaml "$ROOT"/deploy/samples/bad/*.yaml; do
  out=$(kubectl apply --dry-run=server -f "$f" 2>&1) || die "apiserver refused ${f#"$ROOT"/}:"$'\n'"$out"
done
kubectl delete -f "$ROOT/deploy/samples/00-namespace-team-a.yaml" --wait=false >/dev/null
log "ok   deploy/samples accepted by the apiserver (--dry-run=server)"

# ---------------------------------------------------------------------------
# 7. monitoring rules
# ---------------------------------------------------------------------------
# A real PromQL parse of every rule and dashboard query, then promtool's own check and the alert
# unit tests. Both tools come from hack/tools.sh; missing ones fail the step.
"$PROMQL_PYTHON" -c 'import promql_parser, yaml' 2>/dev/null \
  || die "no Python with promql-parser and PyYAML ($PROMQL_PYTHON); run hack/tools.sh"
out=$("$PROMQL_PYTHON" "$ROOT/hack/check-promql.py" 2>&1) || die "PromQL parse:"$'\n'"$out"
log "ok   $out (promql-parser)"
PROMTOOL=${CLAUDEKEY_PROMTOOL:-${CLAUDEKEY_TEST_PROMTOOL:-}}
[[ -n $PROMTOOL && -x $PROMTOOL ]] || die "promtool not found (CLAUDEKEY_TEST_PROMTOOL='$PROMTOOL'); run hack/tools.sh"
# The rule groups: the chart's rules file (deploy/monitoring/prometheusrule.yaml carries the same
# groups; tests/deploy_files.rs keeps them equal).
cp "$CHART/files/prometheus-rules.yaml" "$WORK/claudekey.rules.yaml"
cp "$ROOT/deploy/monitoring/alerts_test.yaml" "$WORK/"
out=$("$PROMTOOL" check rules "$WORK/claudekey.rules.yaml" 2>&1) || die "promtool check rules:"$'\n'"$out"
out=$(cd "$WORK" && "$PROMTOOL" test rules alerts_test.yaml 2>&1) || die "promtool test rules:"$'\n'"$out"
log "ok   promtool check rules + test rules (deploy/monitoring)"

log "PASS"
