#!/usr/bin/env bash
# Regenerate the checked-in files that are derived from the code (tests fail when they drift).
# The CRDs come in three renderings (src/api/mod.rs, CrdRendering): 1.28+ (CEL rules with
# reason and fieldPath), 1.25-1.27 (CEL rules without them), before 1.25 (no CEL rules).
# The chart's templates/crds.yaml picks one of its files/ copies by the cluster's version.
# docs/api-reference.md is the API reference generated from the same CRD schemas.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
for pair in "1.28:keyward-crds.yaml" "1.27:keyward-crds-1.25-1.27.yaml" "1.20:keyward-crds-pre-1.25.yaml"; do
  version=${pair%%:*} file=${pair#*:}
  # Into a temporary file first: a failed build leaves the checked-in files as they were.
  cargo run --quiet --locked -- crds --kube-version "$version" > "$tmp"
  cp "$tmp" "crds/$file"
  cp "$tmp" "charts/keyward/files/${file#keyward-}"
done
cargo run --quiet --locked -- api-reference > "$tmp"
cp "$tmp" docs/api-reference.md
echo "regenerated crds/, charts/keyward/files/ and docs/api-reference.md"
