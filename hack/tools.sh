#!/usr/bin/env bash
# Ensure every external tool the tests need is present in the tool cache,
# building only what is missing. Safe to run repeatedly: a second run with
# nothing to do finishes in seconds.
#
#   hack/tools.sh              build what is missing, print one line per tool (stderr)
#   hack/tools.sh --print-env  the same, then print `export CLAUDEKEY_...=<path>`
#                              lines on stdout (what hack/control-plane.sh uses)
#   hack/tools.sh --node       only kubelet, kube-scheduler and the Debian packages the
#                              real-node tier needs (containerd, runc, CNI plugins)
#
# Cache layout (${XDG_CACHE_HOME:-$HOME/.cache}/claudekey):
#   kubernetes-<ver>/bin/{kube-apiserver,kube-controller-manager,kubectl,kubelet,kube-scheduler}
#   etcd-<ver>/bin/etcd
#   helm-<ver>/bin/helm
#   prometheus-<ver>/bin/promtool
#   redis-<debian ver>/bin/redis-server          Debian 12 redis, unpacked (apt-get download)
#   openbao-<release>-<pseudo-ver>/bin/bao
#   python-<hash of pins>/                       virtualenv: moto[server], anthropic, pytest,
#                                                promql-parser, PyYAML
#   <tool>-<ver>/src/                            generated Go wrapper module (never in the repo)
#   logs/<tool>-<ver>.log                        build output
#   tools.env                                    the --print-env lines of the latest run
#
# Every directory name carries the pinned version, so bumping a pin in
# hack/versions.env makes the next run build the new version next to the old.
#
# KUBEBUILDER_ASSETS: if set and it holds etcd and kube-apiserver, those are
# used instead of building them (kube-controller-manager is still built, since
# envtest asset bundles do not ship it).
set -euo pipefail
# Keep errexit inside $(...) too, so a failing step in a build function that
# runs in a command substitution stops the script instead of being ignored.
shopt -s inherit_errexit

HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=versions.env
source "$HACK_DIR/versions.env"

CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/claudekey
LOG_DIR=$CACHE_DIR/logs

# Builds must be reproducible and must not try to fetch a newer Go toolchain
# (only the module proxy is reachable). Static binaries: no cgo.
export CGO_ENABLED=0
export GOTOOLCHAIN=local
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-trimpath"

log() { printf '%s\n' "$*" >&2; }
die() { log "tools.sh: ERROR: $*"; exit 1; }

# summary TOOL VERSION PATH STATUS — the one line printed per tool.
summary() { printf '%-24s %-40s %s (%s)\n' "$1" "$2" "$3" "$4" >&2; }

# run_logged LOGFILE CMD... — run a build step niced, appending to LOGFILE;
# on failure show the tail of the log so the cause is visible without digging.
run_logged() {
  local logfile=$1; shift
  printf '+ %s\n' "$*" >>"$logfile"
  if ! nice -n 10 "$@" >>"$logfile" 2>&1; then
    log "tools.sh: command failed: $*"
    log "---- last 30 lines of $logfile ----"
    tail -n 30 "$logfile" >&2
    exit 1
  fi
}

# gomod_file MODULE@VERSION — download a module's go.mod via the proxy and
# print the local path of that go.mod file.
gomod_file() {
  local json
  json=$(go mod download -json "$1") || die "go mod download $1 failed: $json"
  jq -r '.GoMod' <<<"$json"
}

# gomod_dir MODULE@VERSION — download a module's source via the proxy and
# print the directory it was extracted to.
gomod_dir() {
  local json
  json=$(go mod download -json "$1") || die "go mod download $1 failed: $json"
  jq -r '.Dir' <<<"$json"
}

# gomod_info_hash MODULE@VERSION — the upstream commit hash recorded by the
# proxy (for version ldflags); empty if the proxy did not record one.
gomod_info_hash() {
  local info
  info=$(go mod download -json "$1" | jq -r '.Info')
  jq -r '.Origin.Hash // empty' "$info" 2>/dev/null || true
}

# local_replaces GOMOD — print the module paths that GOMOD both requires and
# replaces with a local directory (./staging/..., ../api, ...). Those replace
# directives are ignored when the module is a dependency, so a wrapper module
# has to pin each of them to a published version itself.
local_replaces() {
  go mod edit -json "$1" | jq -r '
    [.Require[]?.Path] as $req
    | .Replace[]?
    | select(.New.Path | startswith("."))
    | select(.Old.Path as $p | $req | index($p))
    | .Old.Path'
}

# go_directive GOMOD — the `go` line of a go.mod, so the wrapper module gets the
# same language version (and therefore the same GODEBUG defaults) as upstream.
go_directive() { go mod edit -json "$1" | jq -r '.Go'; }

# godebug_lines GOMOD — upstream `godebug` directives, copied for the same reason.
godebug_lines() { go mod edit -json "$1" | jq -r '.GoDebug[]? | "godebug \(.Key)=\(.Value)"'; }

# write_wrapper DIR MODULE@VERSION MODULE_NAME GO_VERSION REPLACE_LINES GODEBUG_LINES
# Generate a fresh wrapper module in DIR that requires MODULE@VERSION (old
# go.mod/go.sum are discarded so a changed pin never inherits stale
# requirements).
#
# go.sum is seeded with the upstream module's own go.sum. The upstream zip was
# itself verified against the checksum database, so its go.sum is trusted
# transitively; and the module proxy reachable here does not answer checksum
# database lookups for every dependency (e.g. OpenBao's go-kms-wrapping
# modules: "verifying module: ... 404 Not Found"), which without the seed
# would stop the build.
write_wrapper() {
  local dir=$1 modver=$2 name=$3 gover=$4 replaces=$5 godebug=$6 upstream
  mkdir -p "$dir"
  rm -f "$dir/go.mod" "$dir/go.sum"
  upstream=$(gomod_dir "$modver")
  if [[ -f $upstream/go.sum ]]; then cp "$upstream/go.sum" "$dir/go.sum"; chmod u+w "$dir/go.sum"; fi
  {
    printf '// Generated by claudekey hack/tools.sh; do not edit.\n'
    printf 'module %s\n\ngo %s\n\n' "$name" "$gover"
    if [[ -n $godebug ]]; then printf '%s\n\n' "$godebug"; fi
    printf 'require %s %s\n\n' "${modver%@*}" "${modver#*@}"
    printf 'replace (\n%s\n)\n' "$replaces"
  } >"$dir/go.mod"
}

# install_bin SRC DEST — atomically move a freshly built binary into place,
# so an interrupted build never leaves a half-written binary that later runs
# would mistake for a finished one.
install_bin() { chmod +x "$1"; mv -f "$1" "$2"; }

# ---------------------------------------------------------------------------
# kube-apiserver + kube-controller-manager
# ---------------------------------------------------------------------------
# `go install k8s.io/kubernetes/cmd/...@v1.x` is refused because k8s.io/kubernetes
# replaces its k8s.io/* staging modules with ./staging/src/... . The wrapper
# requires k8s.io/kubernetes and replaces each staging module with its published
# v0.<minor>.<patch>; the list comes from that version's own go.mod.
build_kubernetes() {
  # binaries to build: any of kube-apiserver, kube-controller-manager, kubectl, kubelet,
  # kube-scheduler
  local want=("$@")
  local base=$CACHE_DIR/kubernetes-$KUBERNETES_VERSION
  # KUBE_WRAPPER_SUFFIX: a second wrapper module next to the first, so a standalone build
  # (`tools.sh --node`) never rewrites the go.mod another run is building from.
  local src=$base/src${KUBE_WRAPPER_SUFFIX:-} bin=$base/bin
  local logfile=$LOG_DIR/kubernetes-$KUBERNETES_VERSION${KUBE_WRAPPER_SUFFIX:-}.log
  local staging_version=v0.${KUBERNETES_VERSION#v1.}
  local gomod replaces commit major minor rest ldflags b

  mkdir -p "$bin"
  : >"$logfile"
  gomod=$(gomod_file "k8s.io/kubernetes@$KUBERNETES_VERSION")
  replaces=$(local_replaces "$gomod" | sed "s|.*|\t& => & $staging_version|")
  [[ -n $replaces ]] || die "found no staging replace directives in $gomod"
  write_wrapper "$src" "k8s.io/kubernetes@$KUBERNETES_VERSION" claudekey.local/tools/kubernetes \
    "$(go_directive "$gomod")" "$replaces" "$(godebug_lines "$gomod")"

  # Version stamping, as kubernetes' hack/lib/version.sh does, so that
  # /version reports the real release instead of v0.0.0-master.
  commit=$(gomod_info_hash "k8s.io/kubernetes@$KUBERNETES_VERSION")
  major=${KUBERNETES_VERSION#v}; major=${major%%.*}
  rest=${KUBERNETES_VERSION#v*.}; minor=${rest%%.*}
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    # Empty when the proxy recorded no commit: better than the
    # "$Format:%H$" placeholder the source carries.
    ldflags+=" -X $pkg.gitCommit=$commit"
  done

  local pkgs=()
  for b in "${want[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b@$KUBERNETES_VERSION"); done
  (cd "$src" && run_logged "$logfile" go get "${pkgs[@]}")
  for b in "${want[@]}"; do
    (cd "$src" && run_logged "$logfile" go build -ldflags "$ldflags" -o "$bin/$b.tmp" "k8s.io/kubernetes/cmd/$b")
    install_bin "$bin/$b.tmp" "$bin/$b"
  done
}

# ---------------------------------------------------------------------------
# etcd
# ---------------------------------------------------------------------------
# go.etcd.io/etcd/server/v3 is itself a main package (server/main.go); its go.mod
# replaces the sibling etcd modules (api, client/pkg, client/v3, pkg) with ../...,
# so the wrapper pins each to the same release.
build_etcd() {
  local base=$CACHE_DIR/etcd-$ETCD_VERSION
  local src=$base/src bin=$base/bin logfile=$LOG_DIR/etcd-$ETCD_VERSION.log
  local gomod replaces commit ldflags
  mkdir -p "$bin"
  : >"$logfile"
  gomod=$(gomod_file "go.etcd.io/etcd/server/v3@$ETCD_VERSION")
  replaces=$(local_replaces "$gomod" | sed "s|.*|\t& => & $ETCD_VERSION|")
  [[ -n $replaces ]] || die "found no sibling replace directives in $gomod"
  write_wrapper "$src" "go.etcd.io/etcd/server/v3@$ETCD_VERSION" claudekey.local/tools/etcd \
    "$(go_directive "$gomod")" "$replaces" "$(godebug_lines "$gomod")"
  commit=$(gomod_info_hash "go.etcd.io/etcd/server/v3@$ETCD_VERSION")
  ldflags="-s -w"
  if [[ -n $commit ]]; then ldflags+=" -X go.etcd.io/etcd/api/v3/version.GitSHA=${commit:0:9}"; fi
  (cd "$src" && run_logged "$logfile" go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION")
  (cd "$src" && run_logged "$logfile" go build -ldflags "$ldflags" -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3)
  install_bin "$bin/etcd.tmp" "$bin/etcd"
}

# ---------------------------------------------------------------------------
# helm
# ---------------------------------------------------------------------------
# helm.sh/helm/v3 has no replace directives, so `go install pkg@version` works.
# ldflags mirror helm's Makefile: real version string, and the default
# Kubernetes version used by `helm template`/`lint` taken from its client-go.
build_helm() {
  local base=$CACHE_DIR/helm-$HELM_VERSION
  local bin=$base/bin logfile=$LOG_DIR/helm-$HELM_VERSION.log
  local gomod clientgo kminor ldflags
  mkdir -p "$bin"
  : >"$logfile"
  gomod=$(gomod_file "helm.sh/helm/v3@$HELM_VERSION")
  clientgo=$(go mod edit -json "$gomod" | jq -r '.Require[] | select(.Path=="k8s.io/client-go") | .Version')
  kminor=$(cut -d. -f2 <<<"${clientgo#v}")
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  ldflags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$kminor"
  ldflags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kminor"
  # go install has no -o; install into a scratch GOBIN and move atomically.
  local tmpbin=$base/gobin.tmp
  rm -rf "$tmpbin"
  run_logged "$logfile" env GOBIN="$tmpbin" go install -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  install_bin "$tmpbin/helm" "$bin/helm"
  rm -rf "$tmpbin"
}

# ---------------------------------------------------------------------------
# promtool
# ---------------------------------------------------------------------------
# github.com/prometheus/prometheus has no replace directives either. About 5 minutes on 2 idle
# cores.
build_promtool() {
  local base=$CACHE_DIR/prometheus-$PROMETHEUS_VERSION
  local bin=$base/bin logfile=$LOG_DIR/prometheus-$PROMETHEUS_VERSION.log
  mkdir -p "$bin"
  : >"$logfile"
  local tmpbin=$base/gobin.tmp
  rm -rf "$tmpbin"
  run_logged "$logfile" env GOBIN="$tmpbin" go install -ldflags "-s -w" \
    "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
  install_bin "$tmpbin/promtool" "$bin/promtool"
  rm -rf "$tmpbin"
}

# ---------------------------------------------------------------------------
# OpenBao (bao)
# ---------------------------------------------------------------------------
# The root package of github.com/openbao/openbao is the bao binary. Its go.mod
# replaces api/v2, api/auth/*/v2 and sdk/v2 with local directories; the wrapper
# pins them to published versions from versions.env. An unknown local replace
# (after a version bump) stops the build instead of being guessed.
build_openbao() {
  local base=$CACHE_DIR/openbao-$OPENBAO_RELEASE-$OPENBAO_VERSION
  local src=$base/src bin=$base/bin logfile=$LOG_DIR/openbao-$OPENBAO_RELEASE.log
  local gomod mod ver replaces="" commit ldflags
  mkdir -p "$bin"
  : >"$logfile"
  gomod=$(gomod_file "github.com/openbao/openbao@$OPENBAO_VERSION")
  while read -r mod; do
    case $mod in
      github.com/openbao/openbao/api/v2) ver=$OPENBAO_API_VERSION ;;
      github.com/openbao/openbao/sdk/v2) ver=$OPENBAO_SDK_VERSION ;;
      github.com/openbao/openbao/api/auth/*/v2) ver=$OPENBAO_API_AUTH_VERSION ;;
      *) die "OpenBao $OPENBAO_RELEASE replaces $mod locally; add a pin for it to hack/versions.env and tools.sh" ;;
    esac
    replaces+=$'\t'"$mod => $mod $ver"$'\n'
  done < <(local_replaces "$gomod")
  write_wrapper "$src" "github.com/openbao/openbao@$OPENBAO_VERSION" claudekey.local/tools/openbao \
    "$(go_directive "$gomod")" "${replaces%$'\n'}" "$(godebug_lines "$gomod")"
  commit=$(gomod_info_hash "github.com/openbao/openbao@$OPENBAO_VERSION")
  ldflags="-s -w -X github.com/openbao/openbao/version.fullVersion=${OPENBAO_RELEASE#v}"
  if [[ -n $commit ]]; then ldflags+=" -X github.com/openbao/openbao/version.GitCommit=$commit"; fi
  (cd "$src" && run_logged "$logfile" go get "github.com/openbao/openbao@$OPENBAO_VERSION")
  (cd "$src" && run_logged "$logfile" go build -ldflags "$ldflags" -o "$bin/bao.tmp" github.com/openbao/openbao)
  install_bin "$bin/bao.tmp" "$bin/bao"
}

# ---------------------------------------------------------------------------
# Python virtualenv (moto server, anthropic SDK, pytest)
# ---------------------------------------------------------------------------
python_requirements() {
  printf '%s\n' "moto[server]==$MOTO_VERSION" "anthropic==$ANTHROPIC_SDK_VERSION" "pytest==$PYTEST_VERSION" \
    "promql-parser==$PROMQL_PARSER_VERSION" "PyYAML==$PYYAML_VERSION"
}

python_venv_dir() {
  # Hash of the pins (and of the interpreter's minor version): any change
  # yields a new directory, so a bump never mixes old and new packages.
  local key
  key=$( { python_requirements; python3 -c 'import sys; print(sys.version_info[:2])'; } | sha256sum | cut -c1-12)
  printf '%s/python-%s\n' "$CACHE_DIR" "$key"
}

build_python() {
  local venv=$1 logfile reqs
  logfile=$LOG_DIR/$(basename "$venv").log
  mapfile -t reqs < <(python_requirements)
  : >"$logfile"
  rm -rf "$venv"
  run_logged "$logfile" python3 -m venv "$venv"
  run_logged "$logfile" "$venv/bin/python" -m pip install --disable-pip-version-check --no-input \
    "${reqs[@]}"
  python_requirements >"$venv/claudekey-requirements.txt"
  # Stamp written last: a venv without it is treated as incomplete and rebuilt.
  touch "$venv/.claudekey-complete"
}

# ---------------------------------------------------------------------------

# timed FUNC ARGS... — run a build function; print how long it took.
timed() {
  local start=$SECONDS
  "$@"
  printf '%s' "built in $((SECONDS - start))s"
}

# ---------------------------------------------------------------------------
# containerd, runc, CNI plugins, nftables, python3.11, skopeo (Debian packages): real-node tier
# ---------------------------------------------------------------------------
# Debian's containerd 1.6 + runc + the reference CNI plugins are what hack/node.sh runs pods
# with; nft lets its stop delete the netfilter tables the kubelet's iptables calls created;
# python3.11 is what hack/image.sh puts into the app image with the SDK; skopeo checks that the
# image archive reads as both OCI and docker-archive.
# Installed only as root (the node tier needs root anyway); policy-rc.d keeps apt from starting a
# system containerd, since hack/node.sh runs its own with all state in its directory.
NODE_PACKAGES=(containerd runc containernetworking-plugins nftables python3.11 skopeo)
install_node_packages() {
  local missing=() p
  for p in "${NODE_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    summary node-packages "$(dpkg-query -W -f='${Package}=${Version} ' containerd runc)" /usr/bin/containerd cached
    return 0
  fi
  if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    summary node-packages "${missing[*]}" "-" "missing: not root or no apt; the node tier cannot run"
    return 0
  fi
  local logfile=$LOG_DIR/node-packages.log start=$SECONDS
  : >"$logfile"
  run_logged "$logfile" apt-get update -qq
  run_logged "$logfile" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}"
  summary node-packages "${missing[*]}" /usr/bin/containerd "installed in $((SECONDS - start))s"
}

# ---------------------------------------------------------------------------
# redis-server (Debian 12 package): the shared-limits tests run a real one
# ---------------------------------------------------------------------------
# `apt-get download` needs no root; the .debs are unpacked into the cache with `dpkg -x` and a
# wrapper puts the two libraries Debian's build links (jemalloc, lzf) on LD_LIBRARY_PATH. Debian's
# redis-server is a symlink to the redis-check-rdb binary (which serves under that name).
redis_version() {
  local v
  v=$(apt-cache policy redis-tools 2>/dev/null | awk '/Candidate:/ {print $2}')
  # shellcheck disable=SC2053 # a glob on purpose: any Debian security update of the pin
  [[ -n $v && $v != "(none)" && $v == $REDIS_DEBIAN_VERSION ]] ||
    die "apt offers redis-tools '${v:-none}', not $REDIS_DEBIAN_VERSION (run apt-get update on Debian 12)"
  printf '%s' "$v"
}
build_redis() {
  local version=$1 dir=$2 logfile=$LOG_DIR/redis.log
  : >"$logfile"
  command -v apt-get >/dev/null && command -v dpkg >/dev/null || die "redis-server needs apt-get and dpkg (Debian 12)"
  rm -rf "$dir.tmp"
  mkdir -p "$dir.tmp/debs" "$dir.tmp/root" "$dir.tmp/bin"
  (cd "$dir.tmp/debs" && run_logged "$logfile" apt-get download "redis-tools=$version" libjemalloc2 liblzf1)
  local deb lib
  for deb in "$dir.tmp"/debs/*.deb; do run_logged "$logfile" dpkg -x "$deb" "$dir.tmp/root"; done
  # What Debian's redis-server package adds: the name under which the binary serves.
  ln -s redis-check-rdb "$dir.tmp/root/usr/bin/redis-server"
  lib=$(dirname "$(find "$dir.tmp/root" -name 'libjemalloc.so.2' | head -1)")
  lib=${lib#"$dir.tmp/"}
  {
    printf '#!/bin/sh\n# Generated by hack/tools.sh: Debian redis-tools %s, unpacked from debs/.\n' "$version"
    printf 'export LD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"\n' "$dir/$lib"
    printf 'exec "%s" "$@"\n' "$dir/root/usr/bin/redis-server"
  } >"$dir.tmp/bin/redis-server"
  chmod +x "$dir.tmp/bin/redis-server"
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
  if ! "$dir/bin/redis-server" --version >>"$logfile" 2>&1; then
    rm -rf "$dir"
    die "redis-server does not start; see $logfile"
  fi
}

main() {
  local print_env=false
  case ${1:-} in
    "") ;;
    --print-env) print_env=true ;;
    --node)
      # Only the real-node pieces (kubelet, kube-scheduler, Debian packages), in a wrapper
      # module of their own so this can run while a full run holds the lock.
      mkdir -p "$CACHE_DIR" "$LOG_DIR"
      local kdir=$CACHE_DIR/kubernetes-$KUBERNETES_VERSION/bin want=() b
      for b in kubelet kube-scheduler; do [[ -x $kdir/$b ]] || want+=("$b"); done
      if ((${#want[@]})); then KUBE_WRAPPER_SUFFIX=-node build_kubernetes "${want[@]}"; fi
      install_node_packages
      return 0
      ;;
    *) die "usage: $0 [--print-env | --node]" ;;
  esac
  command -v go >/dev/null || die "go is required"
  command -v jq >/dev/null || die "jq is required"
  command -v python3 >/dev/null || die "python3 is required"
  mkdir -p "$CACHE_DIR" "$LOG_DIR"

  # One tools.sh at a time: concurrent runs would race on the same wrapper
  # modules and binaries.
  exec 9>"$CACHE_DIR/.tools.lock"
  flock 9

  local kdir=$CACHE_DIR/kubernetes-$KUBERNETES_VERSION/bin
  local etcd=$CACHE_DIR/etcd-$ETCD_VERSION/bin/etcd
  local apiserver=$kdir/kube-apiserver kcm=$kdir/kube-controller-manager
  local from_assets=false status kube_missing=()

  # etcd + kube-apiserver: taken from KUBEBUILDER_ASSETS when it has both.
  if [[ -n ${KUBEBUILDER_ASSETS:-} ]]; then
    if [[ -x $KUBEBUILDER_ASSETS/etcd && -x $KUBEBUILDER_ASSETS/kube-apiserver ]]; then
      from_assets=true
      etcd=$KUBEBUILDER_ASSETS/etcd
      apiserver=$KUBEBUILDER_ASSETS/kube-apiserver
    else
      log "tools.sh: KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks etcd or kube-apiserver; building them"
    fi
  fi

  if $from_assets; then
    summary etcd "(from KUBEBUILDER_ASSETS)" "$etcd" "not built"
  else
    status=cached; [[ -x $etcd ]] || status=$(timed build_etcd)
    summary etcd "$ETCD_VERSION" "$etcd" "$status"
    [[ -x $apiserver ]] || kube_missing+=(kube-apiserver)
  fi
  [[ -x $kcm ]] || kube_missing+=(kube-controller-manager)
  # kubectl at the cluster's own version, so the demo and chart tests never depend on
  # whichever kubectl the machine happens to have.
  local kubectl=$kdir/kubectl
  [[ -x $kubectl ]] || kube_missing+=(kubectl)
  # kubelet and kube-scheduler: the real-node tier (hack/node.sh).
  local kubelet=$kdir/kubelet scheduler=$kdir/kube-scheduler
  [[ -x $kubelet ]] || kube_missing+=(kubelet)
  [[ -x $scheduler ]] || kube_missing+=(kube-scheduler)
  status=cached
  ((${#kube_missing[@]} == 0)) || status=$(timed build_kubernetes "${kube_missing[@]}")
  if $from_assets; then
    summary kube-apiserver "(from KUBEBUILDER_ASSETS)" "$apiserver" "not built"
  else
    summary kube-apiserver "$KUBERNETES_VERSION" "$apiserver" "$status"
  fi
  summary kube-controller-manager "$KUBERNETES_VERSION" "$kcm" "$status"
  summary kubectl "$KUBERNETES_VERSION" "$kubectl" "$status"
  summary kubelet "$KUBERNETES_VERSION" "$kubelet" "$status"
  summary kube-scheduler "$KUBERNETES_VERSION" "$scheduler" "$status"
  install_node_packages

  local helm=$CACHE_DIR/helm-$HELM_VERSION/bin/helm
  status=cached; [[ -x $helm ]] || status=$(timed build_helm)
  summary helm "$HELM_VERSION" "$helm" "$status"

  local promtool=$CACHE_DIR/prometheus-$PROMETHEUS_VERSION/bin/promtool
  status=cached; [[ -x $promtool ]] || status=$(timed build_promtool)
  summary promtool "$PROMETHEUS_VERSION" "$promtool" "$status"

  local redis_version redis
  redis_version=$(redis_version)
  redis=$CACHE_DIR/redis-${redis_version//[:~]/_}/bin/redis-server
  status=cached; [[ -x $redis ]] || status=$(timed build_redis "$redis_version" "${redis%/bin/redis-server}")
  summary redis-server "$redis_version" "$redis" "$status"

  local bao=$CACHE_DIR/openbao-$OPENBAO_RELEASE-$OPENBAO_VERSION/bin/bao
  status=cached; [[ -x $bao ]] || status=$(timed build_openbao)
  summary bao "openbao $OPENBAO_RELEASE" "$bao" "$status"

  local venv
  venv=$(python_venv_dir)
  status=cached; [[ -e $venv/.claudekey-complete ]] || status=$(timed build_python "$venv")
  summary python-venv "moto $MOTO_VERSION, anthropic $ANTHROPIC_SDK_VERSION" "$venv" "$status"

  # Machine-readable result. control-plane.sh takes it from stdout rather
  # than from tools.env, because tools.env is shared by every caller and
  # another run (e.g. with a different KUBEBUILDER_ASSETS) may rewrite it.
  local env
  env=$(cat <<EOF
# Generated by hack/tools.sh — absolute paths of the test tools.
export CLAUDEKEY_ETCD='$etcd'
export CLAUDEKEY_KUBE_APISERVER='$apiserver'
export CLAUDEKEY_KUBE_CONTROLLER_MANAGER='$kcm'
export CLAUDEKEY_KUBECTL='$kubectl'
export CLAUDEKEY_KUBELET='$kubelet'
export CLAUDEKEY_KUBE_SCHEDULER='$scheduler'
export CLAUDEKEY_HELM='$helm'
export CLAUDEKEY_PROMTOOL='$promtool'
export CLAUDEKEY_BAO='$bao'
export CLAUDEKEY_REDIS_SERVER='$redis'
export CLAUDEKEY_PYTHON_VENV='$venv'
export CLAUDEKEY_PYTHON='$venv/bin/python'
export CLAUDEKEY_MOTO_SERVER='$venv/bin/moto_server'
EOF
  )
  printf '%s\n' "$env" >"$CACHE_DIR/tools.env.tmp"
  mv -f "$CACHE_DIR/tools.env.tmp" "$CACHE_DIR/tools.env"
  log "paths: $CACHE_DIR/tools.env"
  if $print_env; then printf '%s\n' "$env"; fi
}

main "$@"
