#!/usr/bin/env bash
# Regenerates crds/ from the Rust types (`claudekey crd`), one file per CRD, and the chart's copy.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo run --quiet -- crd >"$out/all.yaml"
# Each document starts with a `---` line; its plural name picks the file.
awk -v dir="$out" '
  /^---$/ { n++; file = dir "/doc" n ".yaml" }
  { print > file }
' "$out/all.yaml"
for doc in "$out"/doc*.yaml; do
  plural=$(awk '/^    plural:/ { print $2; exit }' "$doc")
  cp "$doc" "crds/claudekey.io_${plural}.yaml"
done
if [ -d charts/claudekey/crds ]; then
  rm -f charts/claudekey/crds/*.yaml
  cp crds/*.yaml charts/claudekey/crds/
fi
ls crds
