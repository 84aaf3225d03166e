#!/usr/bin/env bash
# A throwaway Kubernetes control plane plus the secret-store backends, for the
# integration tests. Everything listens on free loopback ports.
#
#   hack/control-plane.sh start   build missing tools (hack/tools.sh), then start
#                                 etcd, kube-apiserver, kube-controller-manager,
#                                 moto server (AWS Secrets Manager) and an OpenBao
#                                 dev server (Vault API); write $STATE/env
#   hack/control-plane.sh env     print $STATE/env (use: eval "$(hack/control-plane.sh env)")
#   CLAUDEKEY_NODE=1 hack/control-plane.sh start
#                                 the same, plus a real node (hack/node.sh: containerd, kubelet,
#                                 kube-scheduler, bridge CNI; root only): pods run
#   hack/control-plane.sh stop    stop every process `start` started (the node too, restoring
#                                 the host settings it changed), delete $STATE
#   hack/control-plane.sh status  show which components are running
#
# STATE is ${CLAUDEKEY_STATE_DIR:-/tmp/claudekey-cp}. Inside it:
#   env, kubeconfig        what tests consume (see write_env for the variables)
#   pki/                   CA, apiserver serving cert, admin client cert, SA keys
#   etcd-data/             etcd data
#   logs/<component>.log   process output
#   pids/<component>.pid   "<pid> <start time>" of each started process
#
# If any component fails to start, `start` prints the last 30 lines of its
# log, stops whatever it had started (keeping $STATE/logs for inspection) and
# exits non-zero.
#
# The apiserver is configured like controller-runtime's envtest (same
# service range, allow-privileged, ServiceAccount admission disabled, RBAC),
# with client-certificate auth, the admission webhooks enabled, and a real
# kube-controller-manager so garbage collection and Deployment -> ReplicaSet
# work. Without CLAUDEKEY_NODE=1 there is no kubelet or scheduler: pods stay Pending. With it,
# the apiserver also runs the Node authorizer and the ServiceAccount admission plugin (pods get
# their token volumes), and hack/node.sh adds the node.
set -euo pipefail
shopt -s inherit_errexit

HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${CLAUDEKEY_STATE_DIR:-/tmp/claudekey-cp}
PKI=$STATE/pki
LOGS=$STATE/logs
PIDS=$STATE/pids

# Components in start order; stop goes in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager moto openbao)
# Services live in the benchmarking range (198.18.0.0/15, see hack/node.sh): nothing sent to a
# ClusterIP can leave this machine.
SERVICE_CIDR=198.19.0.0/24
NODE_MODE=${CLAUDEKEY_NODE:-0}
START_TIMEOUT=${CLAUDEKEY_START_TIMEOUT:-120}  # seconds, per component
VAULT_TOKEN=root

log() { printf '[control-plane] %s\n' "$*" >&2; }

usage() {
  sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2
  exit 2
}

# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------

# proc_starttime PID — kernel start time of PID (field 22 of /proc/PID/stat).
# Stored with the pid so `stop` never signals an unrelated process that
# reused the pid. (No check of the state field: a Go program whose main
# thread has exited shows "Z" while its other threads are still shutting down.)
proc_starttime() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }  # drop "pid (comm) ", comm may contain spaces
  awk '{print $20}' <<<"$stat"  # field 20 after comm == field 22 overall
}

# is_running NAME — true if the recorded process of NAME is still alive.
is_running() {
  local f=$PIDS/$1.pid pid st
  [[ -f $f ]] || return 1
  read -r pid st <"$f"
  [[ -n $st && $(proc_starttime "$pid" 2>/dev/null) == "$st" ]]
}

# launch NAME CMD... — start CMD in the background in its own session
# (so it survives the calling shell and a terminal hangup), output to
# logs/NAME.log, and record its pid.
launch() {
  local name=$1; shift
  setsid "$@" </dev/null >"$LOGS/$name.log" 2>&1 &
  local pid=$!
  printf '%s %s\n' "$pid" "$(proc_starttime "$pid")" >"$PIDS/$name.pid"
}

# pid_of NAME — the recorded pid of NAME.
pid_of() { cut -d' ' -f1 "$PIDS/$1.pid"; }

# stop_group NAME... — SIGTERM the running ones among NAME... at once, wait
# up to 15 s for all of them together, SIGKILL whatever is left.
stop_group() {
  local name i running=()
  for name in "$@"; do
    if is_running "$name"; then
      running+=("$name")
      kill -TERM "$(pid_of "$name")" 2>/dev/null || true
    fi
  done
  for ((i = 0; i < 150; i++)); do
    any_running "${running[@]}" || break
    sleep 0.1
  done
  for name in "${running[@]}"; do
    if is_running "$name"; then
      log "$name (pid $(pid_of "$name")) ignored SIGTERM for 15s; sending SIGKILL"
      kill -KILL "$(pid_of "$name")" 2>/dev/null || true
    fi
  done
  for ((i = 0; i < 50; i++)); do
    any_running "${running[@]}" || break
    sleep 0.1
  done
  for name in "${running[@]}"; do
    log "stopped $name (pid $(pid_of "$name"))"
    rm -f "$PIDS/$name.pid"
  done
}

# stop_all — stop everything that was started. Everything but etcd goes down
# in parallel (the data is throwaway, so no ordered shutdown is needed); etcd
# goes last, because kube-apiserver's graceful shutdown hangs for its full
# timeout when etcd disappears under it.
stop_all() {
  [[ -d $PIDS ]] || return 0
  if [[ -d $STATE/node ]]; then CLAUDEKEY_STATE_DIR=$STATE bash "$HACK_DIR/node.sh" stop || true; fi
  stop_group kube-controller-manager kube-apiserver moto openbao
  stop_group etcd
  rm -f "$PIDS"/*.pid
}

# any_running NAME... — true if any of the named components is alive.
any_running() {
  local name
  for name in "$@"; do is_running "$name" && return 0; done
  return 1
}

# fail NAME MESSAGE — report a component that did not come up, with its log
# tail, and exit non-zero; the EXIT trap set by cmd_start then stops
# everything started so far.
fail() {
  local name=$1 msg=$2
  log "ERROR: $name: $msg"
  if [[ -f $LOGS/$name.log ]]; then
    log "---- last 30 lines of $LOGS/$name.log ----"
    tail -n 30 "$LOGS/$name.log" >&2
    log "---- end of $name log ----"
  fi
  exit 1
}

# on_start_exit — EXIT trap while starting: unless start completed, stop
# whatever was started so no process outlives a failed start.
START_COMPLETE=false
on_start_exit() {
  local rc=$?
  $START_COMPLETE && return 0
  stop_all
  log "start failed (exit $rc); logs kept in $LOGS"
  exit $((rc == 0 ? 1 : rc))
}

# wait_until NAME WHAT CHECK_CMD... — poll CHECK_CMD until it succeeds; fail
# if the process dies or START_TIMEOUT passes. WHAT names the check in logs.
wait_until() {
  local name=$1 what=$2; shift 2
  local deadline=$((SECONDS + START_TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    is_running "$name" || fail "$name" "process exited during startup (waiting for $what)"
    ((SECONDS < deadline)) || fail "$name" "$what not ready after ${START_TIMEOUT}s"
    sleep 0.25
  done
  log "$name: $what ok"
}

# free_ports N — N distinct free loopback TCP ports. All sockets are held
# open until every port is chosen, so the N ports differ from each other.
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# ---------------------------------------------------------------------------
# certificates
# ---------------------------------------------------------------------------

# gen_cert NAME SUBJECT EXTENSIONS — key + cert signed by the test CA.
gen_cert() {
  local name=$1 subj=$2 ext=$3
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$PKI/$name.key" 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -CAcreateserial -days 30 -sha256 -extfile <(printf '%s\n' "$ext") -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr"
}

gen_pki() {
  mkdir -p "$PKI"
  chmod 700 "$PKI"
  # The CA signs the apiserver serving cert and the admin client cert, and is
  # the apiserver's --client-ca-file. Tests may also use it (CLAUDEKEY_TEST_CA,
  # CLAUDEKEY_TEST_CA_KEY) to sign webhook serving certs.
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" \
    -days 30 -sha256 -subj "/CN=claudekey-test-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
  gen_cert apiserver "/CN=kube-apiserver" "$(printf '%s\n' \
    "basicConstraints=CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:198.19.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local")"
  # system:masters is bound to cluster-admin by the apiserver's RBAC bootstrap.
  gen_cert admin "/O=system:masters/CN=admin" "$(printf '%s\n' \
    "basicConstraints=CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=clientAuth")"
  # Service-account token signing pair (apiserver signs and verifies,
  # kube-controller-manager signs legacy token secrets).
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$PKI/sa.key" 2>/dev/null
  openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub"
}

write_kubeconfig() {
  local server=$1 out=$2
  # Certificates are embedded so the file works when copied anywhere.
  cat >"$out" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: claudekey-test
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 <"$PKI/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(base64 -w0 <"$PKI/admin.crt")
    client-key-data: $(base64 -w0 <"$PKI/admin.key")
contexts:
- name: claudekey-test
  context:
    cluster: claudekey-test
    user: admin
current-context: claudekey-test
EOF
  chmod 600 "$out"
}

# ---------------------------------------------------------------------------
# components
# ---------------------------------------------------------------------------

start_etcd() {
  local url=http://127.0.0.1:$ETCD_PORT peer=http://127.0.0.1:$ETCD_PEER_PORT
  launch etcd "$CLAUDEKEY_ETCD" \
    --name=claudekey \
    --data-dir="$STATE/etcd-data" \
    --listen-client-urls="$url" --advertise-client-urls="$url" \
    --listen-peer-urls="$peer" --initial-advertise-peer-urls="$peer" \
    --initial-cluster="claudekey=$peer" \
    --unsafe-no-fsync=true
  # --unsafe-no-fsync: throwaway data, and fsync dominates apiserver latency.
  wait_until etcd /health curl -fsS "$url/health"
}

start_apiserver() {
  local admission=NamespaceLifecycle,LimitRanger,DefaultTolerationSeconds,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,ResourceQuota
  local node_flags=(--authorization-mode=RBAC --disable-admission-plugins=ServiceAccount)
  if [[ $NODE_MODE == 1 ]]; then
    # A real node: kubelet credentials authorized by the Node authorizer, pods given their
    # ServiceAccount token, and the apiserver's own client cert for logs/exec on the kubelet.
    admission+=,ServiceAccount,NodeRestriction
    node_flags=(--authorization-mode=Node,RBAC
      --kubelet-client-certificate="$PKI/admin.crt" --kubelet-client-key="$PKI/admin.key"
      --kubelet-preferred-address-types=InternalIP)
  fi
  launch kube-apiserver "$CLAUDEKEY_KUBE_APISERVER" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$APISERVER_PORT" \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --service-account-issuer="https://127.0.0.1:$APISERVER_PORT/" \
    --service-account-key-file="$PKI/sa.pub" \
    --service-account-signing-key-file="$PKI/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --allow-privileged=true \
    --enable-admission-plugins="$admission" \
    "${node_flags[@]}" \
    --enable-aggregator-routing=true \
    --profiling=false
  # --enable-aggregator-routing makes the apiserver reach webhook Services through their
  # endpoints instead of the ClusterIP. With no kubelet there are no endpoints, so a
  # Service-addressed webhook (the Helm chart's) fails closed at once, and no packet is ever
  # sent to the service range, which is not on this machine.
  # ServiceAccount admission is disabled as in envtest: it rejects pods until
  # the "default" ServiceAccount of a fresh namespace exists, which would make
  # tests race kube-controller-manager.
  wait_until kube-apiserver /readyz curl -fsS --cacert "$PKI/ca.crt" \
    --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://127.0.0.1:$APISERVER_PORT/readyz"
}

start_controller_manager() {
  # Controllers run with the admin credentials (--use-service-account-credentials
  # =false): no per-controller token round trips, and nothing depends on the
  # ServiceAccount admission plugin that is disabled above.
  # No cloud provider and no --allocate-node-cidrs, so the cloud/IPAM
  # controllers in "*" stay idle.
  # No --authentication/--authorization-kubeconfig: with them it looks up the
  # front-proxy (requestheader) CA, which this apiserver does not have, and
  # logs an error every few seconds; nothing here needs delegated auth on the
  # controller manager's own port.
  launch kube-controller-manager "$CLAUDEKEY_KUBE_CONTROLLER_MANAGER" \
    --kubeconfig="$STATE/kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$KCM_PORT" \
    --cert-dir="$STATE/kcm-certs" \
    --leader-elect=false \
    --controllers='*' \
    --use-service-account-credentials=false \
    --service-account-private-key-file="$PKI/sa.key" \
    --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --service-cluster-ip-range="$SERVICE_CIDR"
  # /healthz is always allowed without authentication on the secure port.
  wait_until kube-controller-manager /healthz curl -fsSk "https://127.0.0.1:$KCM_PORT/healthz"
}

start_moto() {
  launch moto "$CLAUDEKEY_MOTO_SERVER" -H 127.0.0.1 -p "$MOTO_PORT"
  wait_until moto /moto-api/data.json curl -fsS "http://127.0.0.1:$MOTO_PORT/moto-api/data.json"
}

start_openbao() {
  # Dev mode: in-memory, unsealed, root token "root", KV v2 mounted at secret/.
  # HOME is pointed into $STATE so the dev server's token helper never writes
  # ~/.vault-token-like files into the real home (-dev-no-store-token as well).
  mkdir -p "$STATE/openbao-home"
  launch openbao env HOME="$STATE/openbao-home" "$CLAUDEKEY_BAO" server -dev \
    -dev-root-token-id="$VAULT_TOKEN" \
    -dev-listen-address="127.0.0.1:$VAULT_PORT" \
    -dev-no-store-token
  wait_until openbao /v1/sys/health curl -fsS "http://127.0.0.1:$VAULT_PORT/v1/sys/health"
  # Dev mode mounts KV v2 at secret/ asynchronously; wait until it answers.
  wait_until openbao "KV v2 at secret/" curl -fsS -H "X-Vault-Token: $VAULT_TOKEN" \
    "http://127.0.0.1:$VAULT_PORT/v1/secret/config"
}

write_env() {
  cat >"$STATE/env.tmp" <<EOF
# Generated by hack/control-plane.sh start — source it, or
#   eval "\$(hack/control-plane.sh env)"
export CLAUDEKEY_STATE_DIR='$STATE'
export KUBECONFIG='$STATE/kubeconfig'
export CLAUDEKEY_TEST_KUBECONFIG='$STATE/kubeconfig'
export CLAUDEKEY_TEST_APISERVER='https://127.0.0.1:$APISERVER_PORT'
export CLAUDEKEY_TEST_CA='$PKI/ca.crt'
export CLAUDEKEY_TEST_CA_KEY='$PKI/ca.key'
export CLAUDEKEY_TEST_ETCD_PORT=$ETCD_PORT
export CLAUDEKEY_TEST_APISERVER_PORT=$APISERVER_PORT
export CLAUDEKEY_TEST_KCM_PORT=$KCM_PORT
export CLAUDEKEY_TEST_AWS_ENDPOINT='http://127.0.0.1:$MOTO_PORT'
export CLAUDEKEY_TEST_AWS_PORT=$MOTO_PORT
export CLAUDEKEY_TEST_AWS_REGION=us-east-1
export CLAUDEKEY_TEST_VAULT_ADDR='http://127.0.0.1:$VAULT_PORT'
export CLAUDEKEY_TEST_VAULT_PORT=$VAULT_PORT
export CLAUDEKEY_TEST_VAULT_TOKEN='$VAULT_TOKEN'
export CLAUDEKEY_TEST_PYTHON='$CLAUDEKEY_PYTHON'
export CLAUDEKEY_TEST_PYTHON_BIN='$(dirname "$CLAUDEKEY_PYTHON")'
export CLAUDEKEY_TEST_HELM='$CLAUDEKEY_HELM'
export CLAUDEKEY_TEST_PROMTOOL='$CLAUDEKEY_PROMTOOL'
export CLAUDEKEY_TEST_REDIS_SERVER='${CLAUDEKEY_REDIS_SERVER:-}'
export CLAUDEKEY_TEST_KUBECTL='$CLAUDEKEY_KUBECTL'
export CLAUDEKEY_KUBELET='${CLAUDEKEY_KUBELET:-}'
export CLAUDEKEY_KUBE_SCHEDULER='${CLAUDEKEY_KUBE_SCHEDULER:-}'
EOF
  mv -f "$STATE/env.tmp" "$STATE/env"
}

# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------

cmd_start() {
  local name
  for name in "${COMPONENTS[@]}"; do
    if is_running "$name"; then
      log "ERROR: $name from a previous start is still running (state: $STATE); run '$0 stop' first"
      exit 1
    fi
  done
  rm -rf "$STATE"
  mkdir -p "$STATE" "$LOGS" "$PIDS"

  # Build whatever is missing (a no-op in seconds once built); it prints the
  # CLAUDEKEY_<TOOL> binary paths as export lines.
  local tool_env
  tool_env=$("$HACK_DIR/tools.sh" --print-env)
  eval "$tool_env"

  read -r ETCD_PORT ETCD_PEER_PORT APISERVER_PORT KCM_PORT MOTO_PORT VAULT_PORT < <(free_ports 6)
  # From here on, any exit (failure, set -e, Ctrl-C) before the end must not
  # leave processes behind.
  trap on_start_exit EXIT
  trap 'log interrupted; exit 130' INT TERM

  gen_pki
  write_kubeconfig "https://127.0.0.1:$APISERVER_PORT" "$STATE/kubeconfig"

  start_etcd
  start_apiserver
  start_controller_manager
  # The node tier needs neither secret-store backend; its memory goes to pods instead.
  if [[ $NODE_MODE != 1 ]]; then
    start_moto
    start_openbao
  fi
  write_env
  if [[ $NODE_MODE == 1 ]]; then
    CLAUDEKEY_STATE_DIR=$STATE bash "$HACK_DIR/node.sh" start || exit 1
  fi
  START_COMPLETE=true
  trap - INT TERM

  log "all components running; environment in $STATE/env:"
  cat "$STATE/env"
}

cmd_stop() {
  stop_all
  rm -rf "$STATE"
  log "stopped; removed $STATE"
}

cmd_env() {
  [[ -f $STATE/env ]] || { log "ERROR: no $STATE/env; run '$0 start' first"; exit 1; }
  cat "$STATE/env"
}

cmd_status() {
  local name rc=0
  for name in "${COMPONENTS[@]}"; do
    if is_running "$name"; then
      printf '%-24s running (pid %s)\n' "$name" "$(pid_of "$name")"
    else
      printf '%-24s not running\n' "$name"; rc=1
    fi
  done
  return $rc
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  env) cmd_env ;;
  status) cmd_status ;;
  *) usage ;;
esac
