#!/usr/bin/env bash
# A real single Kubernetes node next to the control plane of hack/control-plane.sh: containerd
# (Debian's 1.6, its own socket and state), kubelet and kube-scheduler at the pinned version, the
# bridge CNI plugin, and the locally built images (hack/image.sh): pods really run. Root only.
#
#   hack/node.sh start       (control plane already started in $CLAUDEKEY_STATE_DIR)
#   hack/node.sh stop        stop every pod and process, restore every host setting it changed
#   hack/node.sh host-state  print the host state start changes (stop must give the same output)
#   hack/node.sh mem-usage   KiB in use by the control plane, the node and its pods now
#   hack/node.sh service-dnat SERVICE_IP PORT POD_IP:PORT...
#                            route a Service's ClusterIP:PORT to its endpoints, as kube-proxy
#                            would (replaces that Service's earlier rules; stop removes them)
#
# Network (nothing is ever routed off this machine):
#   198.18.0.1/24  bridge ckbr0: the node's address and the pods' gateway; pods 198.18.0.10-254;
#                  a redis-server on 198.18.0.1:6379 (password in node.env) for shared limits
#   198.19.0.0/24  Services (blackhole route on the host); no kube-proxy: the one Service a pod
#                  uses, kubernetes (198.19.0.1:443), is DNATed to the loopback apiserver, and
#                  webhooks are reached through the apiserver's endpoint (aggregator) routing.
#                  Tests route other Services with service-dnat (random over the endpoints; the
#                  replies are un-DNATed because bridged traffic passes iptables,
#                  bridge-nf-call-iptables=1). Pods have no DNS: they name Services in hostAliases.
#   198.18.0.0/15  blackholed as a whole, so nothing addressed in it but the above leaves.
#
# Images are never pulled: the pause image is built locally and named in containerd's config,
# and the claudekey and app images are imported with `ctr images import`. State lives in
# $CLAUDEKEY_STATE_DIR/node (containerd root/state, kubelet root, CNI IPAM, logs).
set -euo pipefail
shopt -s inherit_errexit

HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HACK_DIR/.." && pwd)
STATE=${CLAUDEKEY_STATE_DIR:-/tmp/claudekey-cp}
NODE=$STATE/node
PIDS=$STATE/pids
LOGS=$STATE/logs
# shellcheck source-path=SCRIPTDIR source=versions.env
source "$HACK_DIR/versions.env"

NODE_NAME=claudekey-node
BRIDGE=ckbr0
NODE_IP=198.18.0.1
POD_SUBNET=198.18.0.0/24
SERVICE_CIDR=198.19.0.0/24
KUBERNETES_SERVICE_IP=198.19.0.1
WHOLE_RANGE=198.18.0.0/15
CGROUP_ROOT=claudekey-node
NAT_CHAIN=CLAUDEKEY-NODE
PAUSE_IMAGE=claudekey.local/pause:1
APP_IMAGE=claudekey.local/sdk-app:$ANTHROPIC_SDK_VERSION
CLAUDEKEY_IMAGE=claudekey.local/claudekey:test
# Host settings the kubelet or the CNI plugin change; stop puts back what start found.
SYSCTLS=(vm.overcommit_memory kernel.panic kernel.panic_on_oops net.ipv4.ip_forward
  net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables)
# Host directories the kubelet, containerd's shims or libcni write outside the state dir;
# stop removes those start found missing.
HOST_DIRS=(/run/containerd /var/lib/cni /var/log/containers /var/log/pods /var/lib/kubelet
  /etc/cni /opt/cni /var/run/netns /run/netns)
START_TIMEOUT=${CLAUDEKEY_START_TIMEOUT:-120}

log() { printf '[node] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

proc_starttime() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  awk '{print $20}' <<<"$stat"
}
is_running() {
  local f=$PIDS/$1.pid pid st
  [[ -f $f ]] || return 1
  read -r pid st <"$f"
  [[ -n $st && $(proc_starttime "$pid" 2>/dev/null) == "$st" ]]
}
launch() {
  local name=$1; shift
  setsid "$@" </dev/null >"$LOGS/$name.log" 2>&1 &
  local pid=$!
  printf '%s %s\n' "$pid" "$(proc_starttime "$pid")" >"$PIDS/$name.pid"
}
stop_proc() {
  local name=$1 pid i
  is_running "$name" || { rm -f "$PIDS/$name.pid"; return 0; }
  pid=$(cut -d' ' -f1 "$PIDS/$name.pid")
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do is_running "$name" || break; sleep 0.1; done
  if is_running "$name"; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
  rm -f "$PIDS/$name.pid"
  log "stopped $name"
}
wait_until() {
  local name=$1 what=$2; shift 2
  local deadline=$((SECONDS + START_TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    is_running "$name" || { tail -30 "$LOGS/$name.log" >&2; die "$name exited while waiting for $what"; }
    ((SECONDS < deadline)) || { tail -30 "$LOGS/$name.log" >&2; die "$name: $what not ready after ${START_TIMEOUT}s"; }
    sleep 0.25
  done
  log "$name: $what ok"
}

ctr_() { ctr --address "$NODE/containerd.sock" -n k8s.io "$@"; }

# A Redis on the node's address for the chart's shared limits (controller, gateway and
# namespace sidecars; tests/node/shared_limits.rs): pods reach the node's address, and no
# Service name (no DNS). The password is random per node start and lives in a 0600 config file,
# never on a command line.
REDIS_PORT=6379
start_redis() {
  [[ -x ${CLAUDEKEY_TEST_REDIS_SERVER:-} ]] || die "redis-server missing: hack/tools.sh unpacks it"
  REDIS_PASSWORD=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
  mkdir -p "$NODE/redis"
  (
    umask 077
    printf 'bind %s\nport %s\nrequirepass %s\nsave ""\nappendonly no\ndir %s\n' \
      "$NODE_IP" "$REDIS_PORT" "$REDIS_PASSWORD" "$NODE/redis" >"$NODE/redis/redis.conf"
  )
  launch redis "$CLAUDEKEY_TEST_REDIS_SERVER" "$NODE/redis/redis.conf"
  wait_until redis "port $REDIS_PORT" python3 -c '
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)
s.sendall(b"PING\r\n")
sys.exit(0 if s.recv(64) else 1)' "$NODE_IP" "$REDIS_PORT"
}

# ---------------------------------------------------------------------------
# host state: what start changes and stop restores
# ---------------------------------------------------------------------------

cmd_host_state() {
  local s d t
  for s in "${SYSCTLS[@]}"; do printf 'sysctl %s=%s\n' "$s" "$(sysctl -n "$s" 2>/dev/null || echo absent)"; done
  for d in "${HOST_DIRS[@]}"; do [[ -e $d ]] && printf 'dir %s\n' "$d"; done
  ip -o link show | awk -F': ' '{print "link " $2}' | sed 's/@.*//' | sort
  ip route show table all | grep -v '^local\|^broadcast\|^multicast\|fe80::\|ff00::' | sed 's/^/route /' | sort
  for t in iptables ip6tables; do
    "$t-save" 2>/dev/null | grep -E '^(\*|:|-A)' | sed -E "s/\[[0-9]+:[0-9]+\]//; s/^/$t /" || true
  done
  findmnt -rn -o TARGET,FSTYPE | sed 's/^/mount /' | sort
  for d in /sys/fs/cgroup/*/; do [[ -d $d$CGROUP_ROOT ]] && printf 'cgroup %s\n' "$d$CGROUP_ROOT"; done
  return 0
}

# The memory this cluster uses now, in KiB: the resident memory of every process whose command
# line names the state directory (etcd, apiserver, controller manager, scheduler, kubelet,
# containerd and its shims) plus the resident memory of every pod (the kubelet's cgroup root).
cmd_mem_usage() {
  local p kb=0 v pods=0 stat=/sys/fs/cgroup/memory/$CGROUP_ROOT/memory.stat
  for p in /proc/[0-9]*; do
    if grep -qF "$STATE" 2>/dev/null "$p/cmdline"; then
      v=$(awk '/^VmRSS:/ {print $2}' 2>/dev/null "$p/status") || v=0
      kb=$((kb + ${v:-0}))
    fi
  done
  [[ ! -r $stat ]] || pods=$(awk '/^total_rss / {print int($2 / 1024)}' "$stat")
  echo $((kb + pods))
}

# ---------------------------------------------------------------------------
# start
# ---------------------------------------------------------------------------

record_host() {
  mkdir -p "$NODE/restore"
  local s d
  for s in "${SYSCTLS[@]}"; do
    sysctl -n "$s" >"$NODE/restore/sysctl.$s" 2>/dev/null || rm -f "$NODE/restore/sysctl.$s"
  done
  : >"$NODE/restore/missing-dirs"
  for d in "${HOST_DIRS[@]}"; do [[ -e $d ]] || printf '%s\n' "$d" >>"$NODE/restore/missing-dirs"; done
  { iptables-save; ip6tables-save; } 2>/dev/null | sed -n 's/^:\(KUBE-[^ ]*\).*/\1/p' | sort -u \
    >"$NODE/restore/kube-chains"
  # The netfilter tables themselves: iptables (nf_tables backend) creates filter/nat/mangle on
  # first use and never deletes them.
  nft list tables 2>/dev/null >"$NODE/restore/nft-tables" || true
}

gen_node_pki() {
  local pki=$STATE/pki
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$NODE/kubelet.key" 2>/dev/null
  openssl req -new -key "$NODE/kubelet.key" -subj "/O=system:nodes/CN=system:node:$NODE_NAME" \
    -out "$NODE/kubelet.csr"
  openssl x509 -req -in "$NODE/kubelet.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 30 -sha256 -out "$NODE/kubelet.crt" \
    -extfile <(printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n') 2>/dev/null
  rm -f "$NODE/kubelet.csr"
  cat >"$NODE/kubelet.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: { server: '$CLAUDEKEY_TEST_APISERVER', certificate-authority: '$pki/ca.crt' }
users:
- name: u
  user: { client-certificate: '$NODE/kubelet.crt', client-key: '$NODE/kubelet.key' }
contexts:
- name: c
  context: { cluster: c, user: u }
current-context: c
EOF
}

write_containerd_config() {
  cat >"$NODE/containerd.toml" <<EOF
version = 2
root = "$NODE/containerd/root"
state = "$NODE/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$NODE/containerd.sock"
[ttrpc]
  address = "$NODE/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # This VM's processes lack CAP_SYS_RESOURCE: without it runc fails every sandbox
  # ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$NODE/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE/cni/net.d"
    max_conf_num = 1
EOF
  mkdir -p "$NODE/cni/net.d" "$NODE/cni/ipam"
  cat >"$NODE/cni/net.d/10-claudekey.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "claudekey",
  "plugins": [{
    "type": "bridge", "bridge": "$BRIDGE",
    "isGateway": true, "isDefaultGateway": false, "ipMasq": false, "hairpinMode": true,
    "ipam": {
      "type": "host-local", "dataDir": "$NODE/cni/ipam",
      "ranges": [[{ "subnet": "$POD_SUBNET", "rangeStart": "198.18.0.10", "gateway": "$NODE_IP" }]],
      "routes": [{ "dst": "$SERVICE_CIDR" }]
    }
  }]
}
EOF
}

write_kubelet_config() {
  cat >"$NODE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication:
  anonymous: { enabled: false }
  webhook: { enabled: false }
  x509: { clientCAFile: $STATE/pki/ca.crt }
authorization: { mode: AlwaysAllow }
containerRuntimeEndpoint: unix://$NODE/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP_ROOT
failCgroupV1: false
failSwapOn: false
protectKernelDefaults: false
podLogsDir: $NODE/pod-logs
resolvConf: ""
# Secret volume updates (the proxy's ..data swap) reach containers within about this long.
syncFrequency: 5s
fileCheckFrequency: 5s
nodeStatusUpdateFrequency: 5s
imageMinimumGCAge: 24h
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: { memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%" }
maxPods: 40
serializeImagePulls: false
shutdownGracePeriod: 0s
EOF
}

setup_network() {
  ip link add "$BRIDGE" type bridge
  ip addr add "$NODE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  ip route add blackhole "$SERVICE_CIDR"
  ip route add blackhole "$WHOLE_RANGE"
  # In-cluster API access without kube-proxy: kubernetes.default's ClusterIP to the loopback
  # apiserver, which needs route_localnet on the bridge the packets arrive on.
  sysctl -qw "net.ipv4.conf.$BRIDGE.route_localnet=1"
  iptables -t nat -N "$NAT_CHAIN"
  iptables -t nat -A "$NAT_CHAIN" -i "$BRIDGE" -d "$KUBERNETES_SERVICE_IP" -p tcp --dport 443 \
    -j DNAT --to-destination "127.0.0.1:$CLAUDEKEY_TEST_APISERVER_PORT"
  iptables -t nat -A PREROUTING -j "$NAT_CHAIN"
}

import_images() {
  local dir=$NODE/images bin=${CLAUDEKEY_BIN:-$ROOT/target/debug/claudekey}
  mkdir -p "$dir"
  bash "$HACK_DIR/image.sh" pause "$dir/pause.tar" "$PAUSE_IMAGE" >&2
  bash "$HACK_DIR/image.sh" app "$dir/app.tar" "$APP_IMAGE" >&2
  bash "$HACK_DIR/image.sh" claudekey "$dir/claudekey.tar" "$bin" "$CLAUDEKEY_IMAGE" >&2
  # The archive is both formats it claims to be: skopeo reads it as an OCI archive and as a
  # docker-archive (what `docker load` reads), and sees the Dockerfile's non-root user.
  local f t
  for t in oci-archive docker-archive; do
    skopeo inspect --config "$t:$dir/claudekey.tar" | jq -e '.config.User == "65532:65532"' >/dev/null \
      || die "skopeo does not read $dir/claudekey.tar as $t with user 65532:65532"
  done
  for f in pause app claudekey; do ctr_ images import "$dir/$f.tar" >/dev/null; done
  # The archives are no longer needed once imported; they are large.
  rm -f "$dir"/*.tar
  log "images imported: $PAUSE_IMAGE $APP_IMAGE $CLAUDEKEY_IMAGE"
}

node_ready() {
  curl -fsS --cacert "$STATE/pki/ca.crt" --cert "$STATE/pki/admin.crt" --key "$STATE/pki/admin.key" \
    "$CLAUDEKEY_TEST_APISERVER/api/v1/nodes/$NODE_NAME" |
    jq -e '.status.conditions[] | select(.type == "Ready" and .status == "True")' >/dev/null
}

cmd_start() {
  [[ $(id -u) == 0 ]] || die "the node needs root"
  [[ -f $STATE/env ]] || die "no control plane in $STATE (hack/control-plane.sh start first)"
  # shellcheck disable=SC1091
  source "$STATE/env"
  [[ -n ${CLAUDEKEY_KUBELET:-} ]] || die "CLAUDEKEY_KUBELET unset: hack/tools.sh builds it"
  command -v containerd >/dev/null || die "containerd missing: hack/tools.sh installs it"
  command -v skopeo >/dev/null || die "skopeo missing: hack/tools.sh installs it"
  [[ ! -e $NODE ]] || die "$NODE exists: hack/node.sh stop first"
  # One node per machine: its bridge, routes and cgroup root have fixed names, and stop removes
  # them, so a second start must not touch the first one's.
  if ip link show "$BRIDGE" >/dev/null 2>&1 || [[ -d /sys/fs/cgroup/memory/$CGROUP_ROOT ]]; then
    die "a node is already running on this machine (bridge $BRIDGE or cgroup $CGROUP_ROOT exists)"
  fi
  mkdir -p "$NODE"
  record_host
  trap 'rc=$?; if ((rc)); then log "start failed; stopping"; cmd_stop; fi' EXIT

  read -r KUBELET_PORT KUBELET_HEALTHZ_PORT SCHED_PORT < <(python3 -c '
import socket; s=[socket.socket() for _ in range(3)]
[x.bind(("127.0.0.1",0)) for x in s]; print(*[x.getsockname()[1] for x in s])')
  local d
  for d in /sys/fs/cgroup/*/; do
    [[ -L ${d%/} ]] && continue
    mkdir -p "$d$CGROUP_ROOT"
  done
  setup_network
  start_redis
  gen_node_pki
  write_containerd_config
  write_kubelet_config

  launch containerd containerd --config "$NODE/containerd.toml"
  wait_until containerd "CRI socket" ctr --address "$NODE/containerd.sock" version
  import_images

  launch kube-scheduler "$CLAUDEKEY_KUBE_SCHEDULER" --kubeconfig "$STATE/kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --secure-port="$SCHED_PORT"
  wait_until kube-scheduler /healthz curl -fsSk "https://127.0.0.1:$SCHED_PORT/healthz"

  launch kubelet "$CLAUDEKEY_KUBELET" --config "$NODE/kubelet.yaml" \
    --kubeconfig "$NODE/kubelet.kubeconfig" --root-dir "$NODE/kubelet" --cert-dir "$NODE/kubelet-pki" \
    --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --v=1
  wait_until kubelet "node Ready" node_ready

  # The tests install the packaged chart, as a user of a chart repository would.
  local chart
  mkdir -p "$NODE/chart"
  "$CLAUDEKEY_TEST_HELM" package "$ROOT/charts/claudekey" -d "$NODE/chart" >/dev/null
  chart=$(ls "$NODE"/chart/claudekey-*.tgz)
  cat >"$STATE/node.env" <<EOF
# Generated by hack/node.sh start
export CLAUDEKEY_TEST_NODE='$NODE_NAME'
export CLAUDEKEY_TEST_NODE_IP='$NODE_IP'
export CLAUDEKEY_TEST_KUBELET_DIR='$NODE/kubelet'
export CLAUDEKEY_TEST_IMAGE='$CLAUDEKEY_IMAGE'
export CLAUDEKEY_TEST_APP_IMAGE='$APP_IMAGE'
export CLAUDEKEY_TEST_CHART='$chart'
export CLAUDEKEY_TEST_NODE_REDIS_URL='redis://$NODE_IP:$REDIS_PORT/0'
export CLAUDEKEY_TEST_NODE_REDIS_PASSWORD='$REDIS_PASSWORD'
EOF
  grep -q node.env "$STATE/env" || printf "source '%s'\n" "$STATE/node.env" >>"$STATE/env"
  trap - EXIT
  log "node $NODE_NAME Ready at $NODE_IP"
}

# ---------------------------------------------------------------------------
# stop
# ---------------------------------------------------------------------------

# Every container and sandbox goes, then containerd, then whatever shim outlived it (found by
# our socket path in its command line, so no other containerd's shims are touched).
stop_containers() {
  if is_running containerd; then
    local ids id
    ids=$(ctr_ tasks ls -q 2>/dev/null || true)
    for id in $ids; do ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    sleep 0.5
    for id in $ids; do ctr_ tasks delete -f "$id" >/dev/null 2>&1 || true; done
    for id in $(ctr_ containers ls -q 2>/dev/null || true); do ctr_ containers delete "$id" >/dev/null 2>&1 || true; done
  fi
  stop_proc containerd
  local p
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -q -- "-address $NODE/containerd.sock "; then
      kill -KILL "${p#/proc/}" 2>/dev/null || true
    fi
  done
}

unmount_all() {
  local m
  # Deepest first; lazily, since a pod's mount may still be busy for a moment.
  findmnt -rn -o TARGET | grep -F "$NODE/" | awk '{print length, $0}' | sort -rn | cut -d' ' -f2- |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done || true
  if mountpoint -q "$NODE" 2>/dev/null; then umount -l "$NODE" || true; fi
}

remove_cgroups() {
  local d
  for d in /sys/fs/cgroup/*/"$CGROUP_ROOT"; do
    [[ -d $d ]] || continue
    find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [[ ! -d $d ]] || log "WARNING: could not remove $d"
  done
}

restore_iptables() {
  local t tbl chain chains rule known
  known=$(cat "$NODE/restore/kube-chains" 2>/dev/null || true)
  for t in iptables ip6tables; do
    for tbl in filter nat mangle; do
      # Rules in any chain that jump to a chain start did not find, then the chains.
      "$t" -t "$tbl" -S 2>/dev/null | grep -E -- "-j (KUBE-[^ ]*|$NAT_CHAIN)( |$)" | while read -r rule; do
        chain=$(sed -E 's/.*-j ([^ ]+).*/\1/' <<<"$rule")
        grep -qx "$chain" <<<"$known" && continue
        eval "$t -t $tbl ${rule/-A /-D }" 2>/dev/null || true
      done || true
      # All flushed before any is deleted: a chain still referenced cannot be deleted.
      chains=$("$t" -t "$tbl" -S 2>/dev/null | sed -n -E "s/^-N (KUBE-[^ ]*|$NAT_CHAIN)$/\1/p" |
        grep -vxF -f <(printf '%s\n' "$known" "") || true)
      for chain in $chains; do "$t" -t "$tbl" -F "$chain" 2>/dev/null || true; done
      for chain in $chains; do "$t" -t "$tbl" -X "$chain" 2>/dev/null || true; done
    done
  done
  # Tables start did not find go again when nothing but their built-in chains is left in them.
  local family table
  command -v nft >/dev/null || return 0
  nft list tables 2>/dev/null | while read -r _ family table; do
    grep -qx "table $family $table" "$NODE/restore/nft-tables" 2>/dev/null && continue
    [[ $family == ip ]] && t=iptables || { [[ $family == ip6 ]] && t=ip6tables; } || continue
    if ! "$t" -t "$table" -S 2>/dev/null | grep -qv '^-P [A-Z]* ACCEPT$'; then
      nft delete table "$family" "$table" 2>/dev/null || true
    fi
  done || true
}

cmd_stop() {
  [[ -d $NODE ]] || return 0
  stop_proc kubelet
  stop_proc kube-scheduler
  stop_containers
  stop_proc redis
  unmount_all
  remove_cgroups
  restore_iptables
  ip route del blackhole "$SERVICE_CIDR" 2>/dev/null || true
  ip route del blackhole "$WHOLE_RANGE" 2>/dev/null || true
  # Deleting the bridge also drops its route_localnet and any veth left on it.
  ip link del "$BRIDGE" 2>/dev/null || true
  local f s d
  for f in "$NODE"/restore/sysctl.*; do
    [[ -f $f ]] || continue
    s=${f##*/sysctl.}
    [[ $(sysctl -n "$s" 2>/dev/null) == "$(cat "$f")" ]] || sysctl -qw "$s=$(cat "$f")" || true
  done
  while read -r d; do
    [[ -n $d && -e $d ]] || continue
    findmnt -rn -o TARGET | grep -F "$d/" | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done || true
    rm -rf "$d"
  done <"$NODE/restore/missing-dirs"
  rm -rf "$NODE" "$STATE/node.env"
  log "node stopped; host restored"
}

# Packets from pods to SERVICE_IP:PORT go to one of the endpoints, each equally likely: rule i
# of n matches with probability 1/(n-i), the last always. Only inside this node's NAT chain, which
# stop removes with everything in it.
cmd_service_dnat() {
  local ip=${1:?service IP} port=${2:?port} rule n i
  shift 2
  (($# > 0)) || die "service-dnat: no endpoints"
  [[ $ip =~ ^198\.19\.0\.[0-9]+$ ]] || die "service-dnat: $ip is not in the service range $SERVICE_CIDR"
  iptables -t nat -S "$NAT_CHAIN" >/dev/null 2>&1 || die "service-dnat: no node running (chain $NAT_CHAIN missing)"
  iptables -t nat -S "$NAT_CHAIN" | grep -E -- "-d $ip/32 .*--dport $port " | while read -r rule; do
    eval "iptables -t nat ${rule/-A /-D }"
  done || true
  n=$#
  i=0
  for target in "$@"; do
    [[ $target =~ ^198\.18\.0\.[0-9]+:[0-9]+$ ]] || die "service-dnat: $target is not a pod address on $POD_SUBNET"
    local odds=()
    ((i < n - 1)) && odds=(-m statistic --mode random --probability "$(awk "BEGIN { printf \"%.5f\", 1 / ($n - $i) }")")
    iptables -t nat -A "$NAT_CHAIN" -i "$BRIDGE" -d "$ip/32" -p tcp -m tcp --dport "$port" "${odds[@]}" \
      -j DNAT --to-destination "$target"
    i=$((i + 1))
  done
  log "service $ip:$port -> $*"
}

# Sourcing defines the functions only (for debugging single steps).
[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0
case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  host-state) cmd_host_state ;;
  mem-usage) cmd_mem_usage ;;
  service-dnat) shift; cmd_service_dnat "$@" ;;
  *) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2; exit 2 ;;
esac
