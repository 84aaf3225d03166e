#!/usr/bin/env bash
# Regenerates crds/ from the Rust types (`claudekey crd`), one file per CRD, and the chart's copy
# (charts/claudekey/files/crds.yaml, every CRD in one file).
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
# The chart renders its CRDs from this file (templates/crds.yaml), so upgrades upgrade them.
cp "$out/all.yaml" charts/claudekey/files/crds.yaml
ls crds
