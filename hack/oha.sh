# shellcheck shell=bash
# oha, the HTTP load generator of hack/bench.sh, hack/hotpath.sh and hack/pgo.sh, at the version
# hack/versions.env pins, installed from crates.io into the cache the first time it is needed.
# Sourced after versions.env; sets OHA.

OHA=${XDG_CACHE_HOME:-$HOME/.cache}/claudekey/oha-$OHA_VERSION/bin/oha

# ensure_oha — installs oha into the cache unless it is there.
ensure_oha() {
  [ -x "$OHA" ] && return 0
  printf 'installing oha %s (crates.io) into %s\n' "$OHA_VERSION" "$(dirname "$(dirname "$OHA")")" >&2
  if ! pkg-config --exists openssl 2>/dev/null; then apt-get install -y -q libssl-dev pkg-config >/dev/null; fi
  # native-tls (system OpenSSL) builds far faster than the default rustls/aws-lc; oha needs one TLS
  # backend to compile, the benchmarks only speak plain HTTP on loopback.
  nice cargo install oha --version "$OHA_VERSION" --locked --no-default-features --features native-tls \
    --root "$(dirname "$(dirname "$OHA")")"
}
