#!/usr/bin/env bash
# Regenerate the checked-in files that are derived from the code (tests fail when they drift).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --locked -- crds > crds/keyward-crds.yaml
cargo run --quiet --locked -- crds --kube-version 1.20 > crds/keyward-crds-pre-1.25.yaml
cp crds/keyward-crds.yaml charts/keyward/files/crds.yaml
cp crds/keyward-crds-pre-1.25.yaml charts/keyward/files/crds-pre-1.25.yaml
echo "regenerated crds/ and charts/keyward/files/"
