#!/usr/bin/env bash
# Install or build the peer gateways hack/bench.sh compares claudekey against, into the tool
# cache (never into the repo). Safe to run repeatedly: what is cached is not rebuilt.
#
#   hack/peers.sh                      install/build what is missing, one line per peer (stderr)
#   hack/peers.sh --print-env          the same, then `export CLAUDEKEY_...=<path>` lines (stdout)
#   hack/peers.sh --only portkey|agentgateway [--print-env]
#
# Cache layout (${XDG_CACHE_HOME:-$HOME/.cache}/claudekey):
#   portkey-<ver>/node_modules/@portkey-ai/gateway/   npm install of @portkey-ai/gateway
#   agentgateway-<ver>/src/                           its source at the tag, patched
#   agentgateway-<ver>/deps/                          the public repos/crates replacing its git forks
#   agentgateway-<ver>/target/                        cargo's target dir (kept: a retry resumes)
#   agentgateway-<ver>/bin/agentgateway               the built binary
#   logs/{portkey,agentgateway}-<ver>.log             install/build output
#
# Sources of agentgateway and its replacement dependencies (public GitHub repositories):
#   CLAUDEKEY_PEER_MIRROR=DIR   take them from local bare git mirrors DIR/<owner>+<name>/repo
#                               (needed where github.com is unreachable, as on the machines
#                               this project is built on); otherwise GitHub's tarball URLs.
set -euo pipefail
shopt -s inherit_errexit

HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=versions.env
source "$HACK_DIR/versions.env"

CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/claudekey
LOG_DIR=$CACHE_DIR/logs
CARGO_HOME_DIR=${CARGO_HOME:-$HOME/.cargo}

log() { printf '%s\n' "$*" >&2; }
die() { log "peers.sh: ERROR: $*"; exit 1; }
summary() { printf '%-24s %-40s %s (%s)\n' "$1" "$2" "$3" "$4" >&2; }

# run_logged LOGFILE CMD... — run a step niced, appending to LOGFILE; on failure show its tail.
run_logged() {
  local logfile=$1; shift
  printf '+ %s\n' "$*" >>"$logfile"
  if ! nice -n 10 "$@" >>"$logfile" 2>&1; then
    log "peers.sh: command failed: $*"
    log "---- last 30 lines of $logfile ----"
    tail -n 30 "$logfile" >&2
    exit 1
  fi
}

# ---------------------------------------------------------------------------
# Portkey gateway (npm)
# ---------------------------------------------------------------------------
portkey_dir() { printf '%s' "$CACHE_DIR/portkey-$PORTKEY_VERSION"; }
portkey_entry() { printf '%s' "$(portkey_dir)/node_modules/@portkey-ai/gateway/build/start-server.js"; }
# portkey_cached — installed, with the pinned @hono/node-server (a changed pin reinstalls).
portkey_cached() {
  [[ -f $(portkey_entry) ]] && grep -q "\"version\": \"$PORTKEY_HONO_NODE_SERVER_VERSION\"" \
    "$(portkey_dir)/node_modules/@hono/node-server/package.json" 2>/dev/null
}

# npm install into a temp prefix, moved into place when complete; --ignore-scripts because the
# server needs no install step (its build/ is in the package) and nothing should run at install.
build_portkey() {
  local dir logfile=$LOG_DIR/portkey-$PORTKEY_VERSION.log
  dir=$(portkey_dir)
  { command -v node && command -v npm; } >/dev/null || die "portkey needs node and npm"
  : >"$logfile"
  rm -rf "$dir.tmp"
  mkdir -p "$dir.tmp"
  # @hono/node-server is pinned below what the gateway's "^1.3.3" resolves to: from 1.14.3 on,
  # a streamed upstream response keeps fetch's immutable headers and the gateway's header update
  # throws ("TypeError: immutable", Portkey-AI/gateway#1389): every streamed Messages request 500s.
  printf '{"private":true,"overrides":{"@hono/node-server":"%s"}}\n' "$PORTKEY_HONO_NODE_SERVER_VERSION" \
    >"$dir.tmp/package.json"
  run_logged "$logfile" npm install --prefix "$dir.tmp" --no-audit --no-fund --ignore-scripts \
    --save-exact "@portkey-ai/gateway@$PORTKEY_VERSION"
  [[ -f $dir.tmp/node_modules/@portkey-ai/gateway/build/start-server.js ]] ||
    die "npm installed no build/start-server.js; see $logfile"
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
}

# ---------------------------------------------------------------------------
# agentgateway (built from source)
# ---------------------------------------------------------------------------
agentgateway_dir() { printf '%s' "$CACHE_DIR/agentgateway-$AGENTGATEWAY_VERSION"; }

# fetch_tree OWNER/NAME REF DEST — the tree of a public GitHub repository at REF into DEST.
# From a mirror: `git archive`, leaving out blobs the mirror lacks (a stored snapshot may miss a
# few, e.g. agentgateway's schema/config.md, none of which the build reads); they are logged.
fetch_tree() {
  local repo=$1 ref=$2 dest=$3 logfile=$4
  rm -rf "$dest"
  mkdir -p "$dest"
  if [[ -n ${CLAUDEKEY_PEER_MIRROR:-} ]]; then
    local gd=$CLAUDEKEY_PEER_MIRROR/${repo/\//+}/repo tree missing excludes=()
    [[ -d $gd ]] || die "no mirror of $repo at $gd"
    tree=$(git --git-dir="$gd" ls-tree -r --full-tree "$ref" | awk -F'\t' '$1 ~ / blob /')
    missing=$(awk '{print $3}' <<<"$tree" | git --git-dir="$gd" cat-file --batch-check |
      awk 'NR == FNR {if ($2 == "missing") m[$1] = 1; next} {split($0, t, "\t"); if ($3 in m) print t[2]}' \
        - <(printf '%s\n' "$tree"))
    if [[ -n $missing ]]; then
      printf 'mirror of %s lacks (left out):\n%s\n' "$repo" "$missing" >>"$logfile"
      while IFS= read -r path; do excludes+=(":(exclude,literal)$path"); done <<<"$missing"
    fi
    # git archive still names the left-out blobs on stderr (and exits 0).
    git --git-dir="$gd" archive --format=tar "$ref" -- . "${excludes[@]}" 2>>"$logfile" | tar -x -C "$dest"
  else
    curl -fsSL --retry 3 "https://github.com/$repo/archive/$ref.tar.gz" |
      tar -xz -C "$dest" --strip-components=1
  fi
}

# crate_tree NAME VERSION DEST — a crates.io release unpacked into DEST. Fetched by cargo itself
# (a scratch crate depending on it, `cargo fetch`), so it comes checksum-verified through
# whatever registry cargo is configured with.
crate_tree() {
  local name=$1 version=$2 dest=$3 logfile=$4 scratch crate
  scratch=$(dirname "$dest")/scratch-$name
  rm -rf "$scratch" "$dest"
  mkdir -p "$scratch/src" "$dest"
  printf '[package]\nname = "scratch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\n%s = "=%s"\n' \
    "$name" "$version" >"$scratch/Cargo.toml"
  : >"$scratch/src/lib.rs"
  run_logged "$logfile" cargo fetch --manifest-path "$scratch/Cargo.toml"
  crate=$(find "$CARGO_HOME_DIR/registry/cache" -name "$name-$version.crate" | head -1)
  [[ -n $crate ]] || die "cargo fetch left no $name-$version.crate in $CARGO_HOME_DIR/registry/cache"
  tar -xzf "$crate" -C "$dest" --strip-components=1
  rm -rf "$scratch"
}

# The stages leave stamps, so a build that failed or was stopped resumes at the compile.
build_agentgateway() {
  local dir logfile=$LOG_DIR/agentgateway-$AGENTGATEWAY_VERSION.log patches=$HACK_DIR/peers/agentgateway
  dir=$(agentgateway_dir)
  command -v cargo >/dev/null || die "agentgateway needs cargo"
  mkdir -p "$dir"
  if [[ ! -e $dir/.prepared ]]; then
    : >"$logfile"
    fetch_tree agentgateway/agentgateway "$AGENTGATEWAY_VERSION" "$dir/src" "$logfile"
    fetch_tree googleapis/google-cloud-rust "$AGENTGATEWAY_GOOGLE_CLOUD_RUST_REV" \
      "$dir/deps/google-cloud-rust" "$logfile"
    fetch_tree 64bit/async-openai "$AGENTGATEWAY_ASYNC_OPENAI_REV" "$dir/deps/async-openai" "$logfile"
    crate_tree http-serde "$AGENTGATEWAY_HTTP_SERDE_VERSION" "$dir/deps/http-serde" "$logfile"
    # It pins a newer toolchain than the machine's stable (its rust-version says 1.90).
    rm -f "$dir/src/rust-toolchain.toml"
    (cd "$dir" && run_logged "$logfile" patch -p0 --forward -i "$patches/patches.diff")
    (cd "$dir/deps/http-serde" && run_logged "$logfile" patch -p1 --forward -i "$patches/http-serde.diff")
    touch "$dir/.prepared"
  fi
  # `quick-release` is the release profile without fat LTO (about 21 minutes on 2 cores). Run from
  # the source tree: cargo reads its .cargo/config.toml (rustflags `--cfg tokio_unstable`) from
  # the working directory, not from --manifest-path.
  (cd "$dir/src" && CARGO_TARGET_DIR=$dir/target run_logged "$logfile" \
    cargo build -j "${PEERS_BUILD_JOBS:-2}" --profile quick-release -p agentgateway-app)
  mkdir -p "$dir/bin"
  cp "$dir/target/quick-release/agentgateway" "$dir/bin/agentgateway.tmp"
  mv -f "$dir/bin/agentgateway.tmp" "$dir/bin/agentgateway"
}

# timed FUNC ARGS... — run a build function; print how long it took.
timed() {
  local start=$SECONDS
  "$@"
  printf '%s' "built in $((SECONDS - start))s"
}

main() {
  local print_env=false only=""
  while (($#)); do
    case $1 in
      --print-env) print_env=true ;;
      --only) only=${2:?--only needs portkey or agentgateway}; shift ;;
      *) die "usage: $0 [--only portkey|agentgateway] [--print-env]" ;;
    esac
    shift
  done
  mkdir -p "$CACHE_DIR" "$LOG_DIR"
  # One build per peer at a time (a lock each, so Portkey installs while agentgateway compiles).
  local portkey_lock agw_lock
  exec {portkey_lock}>"$CACHE_DIR/.peers-portkey.lock" {agw_lock}>"$CACHE_DIR/.peers-agentgateway.lock"

  local status env="# Generated by hack/peers.sh — the peer gateways."
  if [[ -z $only || $only == portkey ]]; then
    flock "$portkey_lock"
    status=cached; portkey_cached || status=$(timed build_portkey)
    summary portkey "@portkey-ai/gateway $PORTKEY_VERSION" "$(portkey_entry)" "$status, node $(node --version)"
    env+=$'\n'"export CLAUDEKEY_PORTKEY='$(portkey_entry)'"
  fi
  if [[ -z $only || $only == agentgateway ]]; then
    local agw
    agw=$(agentgateway_dir)/bin/agentgateway
    flock "$agw_lock"
    status=cached; [[ -x $agw ]] || status=$(timed build_agentgateway)
    summary agentgateway "$AGENTGATEWAY_VERSION" "$agw" "$status"
    env+=$'\n'"export CLAUDEKEY_AGENTGATEWAY='$agw'"
  fi
  if $print_env; then printf '%s\n' "$env"; fi
}

main "$@"
