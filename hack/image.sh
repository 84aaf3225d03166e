#!/usr/bin/env bash
# Container images built without a Docker daemon: each is one uncompressed layer written by
# hack/image.py into an archive that is at once an OCI image layout (oci-layout, index.json,
# blobs/) and a docker-archive (manifest.json), the format `docker save` writes since Docker 25.
# `docker load -i`, `skopeo copy docker-archive:F ...` / `skopeo copy oci-archive:F ...`,
# `podman load -i` and `ctr -n k8s.io images import F` all accept it.
#
#   hack/image.sh claudekey OUT.tar [BINARY] [REF]
#       the claudekey image: BINARY (default target/release/claudekey) at /usr/local/bin/claudekey
#       with the glibc libraries it links, CA certificates and a passwd/group naming the
#       distroless "nonroot" user; runs as 65532:65532 like the Dockerfile (the chart's
#       readOnlyRootFilesystem works: nothing in it is written). REF default
#       ghcr.io/claudekey/claudekey:<Cargo.toml version>.
#   hack/image.sh pause OUT.tar [REF]
#       the pod sandbox ("pause") image: a static C program that sleeps until signalled and
#       reaps orphans. REF default claudekey.local/pause:1.
#   hack/image.sh app OUT.tar [REF]
#       an app image with Debian's python3.11 (this Debian host's own package files and the
#       libraries they link) and the official `anthropic` SDK at ANTHROPIC_SDK_VERSION
#       (hack/versions.env) from PyPI. REF default claudekey.local/sdk-app:<sdk version>.
#
# Every input is taken from this machine, so nothing is pulled from a registry. The app image's
# SDK install is cached in ${XDG_CACHE_HOME:-$HOME/.cache}/claudekey/app-sdk-<version>.
set -euo pipefail
shopt -s inherit_errexit

HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HACK_DIR/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=versions.env
source "$HACK_DIR/versions.env"
CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/claudekey

die() { printf 'image.sh: %s\n' "$*" >&2; exit 1; }

# libs FILE... — the shared libraries FILE... load (ldd), one path a line, with the dynamic
# loader; static files contribute none.
libs() {
  local f
  for f in "$@"; do
    ldd "$f" 2>/dev/null | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' || true
  done | sort -u
}

# add_files SPEC_FILE PATH... — one "file" line per host file; image.py stores its content
# (symlinks followed) at the same path, which is the name ldd and the ELF interpreter ask for.
add_files() {
  local spec=$1 p; shift
  for p in "$@"; do
    printf 'file %s\n' "$p" >>"$spec"
  done
}

crate_version() { sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -1; }

build_claudekey() {
  local out=$1 bin=${2:-$ROOT/target/release/claudekey} ref=${3:-} version
  version=$(crate_version)
  ref=${ref:-ghcr.io/claudekey/claudekey:$version}
  [[ -x $bin ]] || die "no binary at $bin (cargo build --release --bin claudekey)"
  local spec
  spec=$(mktemp)
  {
    printf 'copy %s /usr/local/bin/claudekey 0755\n' "$bin"
    printf 'dir /home/nonroot 0700 65532\n'
    printf 'dir /tmp 1777 0\n'
    printf 'text /etc/passwd 0644 root:x:0:0:root:/root:/sbin/nologin\\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\\n\n'
    printf 'text /etc/group 0644 root:x:0:\\nnobody:x:65534:\\nnonroot:x:65532:\\n\n'
    printf 'text /etc/nsswitch.conf 0644 passwd: files\\ngroup: files\\nhosts: files dns\\n\n'
    printf 'file /etc/ssl/certs/ca-certificates.crt\n'
  } >"$spec"
  # shellcheck disable=SC2046
  add_files "$spec" $(libs "$bin")
  python3 "$HACK_DIR/image.py" --spec "$spec" --out "$out" --ref "$ref" \
    --user 65532:65532 --entrypoint /usr/local/bin/claudekey \
    --expose 8443,8080,8484,9484,9443 \
    --label org.opencontainers.image.title=claudekey \
    --label "org.opencontainers.image.description=Anthropic Claude API keys, safe in Kubernetes" \
    --label org.opencontainers.image.source=https://github.com/claudekey/claudekey \
    --label org.opencontainers.image.licenses=Apache-2.0 \
    --label "org.opencontainers.image.version=$version"
  rm -f "$spec"
}

build_pause() {
  local out=$1 ref=${2:-claudekey.local/pause:1} tmp
  tmp=$(mktemp -d)
  cat >"$tmp/pause.c" <<'EOF'
/* The pod sandbox's one process: holds the pod's namespaces, reaps orphans, exits on signal. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  signal(SIGINT, quit);
  signal(SIGTERM, quit);
  signal(SIGCHLD, reap);
  for (;;) pause();
}
EOF
  gcc -Os -static -o "$tmp/pause" "$tmp/pause.c" || die "gcc -static failed (libc6-dev needed)"
  printf 'copy %s /pause 0755\n' "$tmp/pause" >"$tmp/spec"
  python3 "$HACK_DIR/image.py" --spec "$tmp/spec" --out "$out" --ref "$ref" \
    --user 65535:65535 --entrypoint /pause
  rm -rf "$tmp"
}

# The SDK, installed once per pinned version for Debian's python3.11 (cp311 wheels).
app_sdk_dir() {
  local dir=$CACHE_DIR/app-sdk-$ANTHROPIC_SDK_VERSION
  if [[ ! -e $dir/.complete ]]; then
    rm -rf "$dir"
    mkdir -p "$dir"
    /usr/bin/python3.11 -m pip --version >/dev/null 2>&1 \
      && local pip=(/usr/bin/python3.11 -m pip) \
      || local pip=(python3 -m pip --python-version 3.11 --only-binary=:all:)
    "${pip[@]}" install --disable-pip-version-check --no-input --quiet --no-compile \
      --target "$dir/site" "anthropic==$ANTHROPIC_SDK_VERSION" >&2 \
      || die "pip install anthropic==$ANTHROPIC_SDK_VERSION failed"
    touch "$dir/.complete"
  fi
  printf '%s\n' "$dir/site"
}

build_app() {
  local out=$1 ref=${2:-claudekey.local/sdk-app:$ANTHROPIC_SDK_VERSION}
  local py=/usr/bin/python3.11 stdlib=/usr/lib/python3.11 site spec
  [[ -x $py && -d $stdlib ]] || die "Debian's python3.11 is missing (apt-get install python3.11)"
  site=$(app_sdk_dir)
  spec=$(mktemp)
  {
    printf 'copy %s /usr/bin/python3 0755\n' "$py"
    # The standard library minus tests and tooling the SDK never imports.
    printf 'tree %s %s test,idlelib,tkinter,turtledemo,ensurepip,lib2to3,pydoc_data,__pycache__,site-packages,dist-packages\n' \
      "$stdlib" "$stdlib"
    printf 'tree %s /opt/sdk __pycache__\n' "$site"
    printf 'dir /tmp 1777 0\n'
    printf 'file /etc/ssl/certs/ca-certificates.crt\n'
    printf 'text /etc/passwd 0644 root:x:0:0:root:/root:/sbin/nologin\\napp:x:1000:1000:app:/tmp:/sbin/nologin\\n\n'
    printf 'text /etc/group 0644 root:x:0:\\napp:x:1000:\\n\n'
  } >"$spec"
  # shellcheck disable=SC2046
  add_files "$spec" $(libs "$py" "$stdlib"/lib-dynload/*.so $(find "$site" -name '*.so'))
  python3 "$HACK_DIR/image.py" --spec "$spec" --out "$out" --ref "$ref" \
    --user 1000:1000 --entrypoint /usr/bin/python3 \
    --env PYTHONPATH=/opt/sdk --env PYTHONDONTWRITEBYTECODE=1 --env PYTHONUNBUFFERED=1
  rm -f "$spec"
}

case ${1:-} in
  claudekey) shift; [[ $# -ge 1 ]] || die "usage: $0 claudekey OUT.tar [BINARY] [REF]"; build_claudekey "$@" ;;
  pause) shift; [[ $# -ge 1 ]] || die "usage: $0 pause OUT.tar [REF]"; build_pause "$@" ;;
  app) shift; [[ $# -ge 1 ]] || die "usage: $0 app OUT.tar [REF]"; build_app "$@" ;;
  *) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2; exit 2 ;;
esac
