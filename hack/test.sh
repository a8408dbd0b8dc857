#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, the CRD drift check and the
# integration tests against a real Kubernetes API server.
#
# With KUBECONFIG unset, it brings up the local control plane (hack/cluster.sh; the
# first run builds it, about 10 minutes) on a fresh etcd and leaves it running for
# the next run; with KUBECONFIG set, the tests use that cluster (each test works in a
# namespace of its own and removes it afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."

local_plane=0
if [ -z "${KUBECONFIG:-}" ]; then
  local_plane=1
  # A fresh control plane unless one from an earlier run still answers.
  hack/cluster.sh status >/dev/null 2>&1 || hack/cluster.sh down --purge >/dev/null 2>&1 || true
  hack/cluster.sh up
  eval "$(hack/cluster.sh env)"
  # The demo installation of hack/run.sh reconciles every namespace, the tests' too: the
  # tests run their own controllers, so stop it first (hack/run.sh starts it again).
  pid="${KEYWARD_CLUSTER_DIR:-${KEYWARD_CACHE:-$HOME/.cache/keyward}/cluster}/keyward-controller.pid"
  if { [ -f "$pid" ] && kill -0 "$(cat "$pid")" 2>/dev/null; } || helm status keyward -n keyward-system >/dev/null 2>&1; then
    echo "== stopping the demo installation of hack/run.sh (the tests run their own controllers; hack/run.sh brings it back)"
    hack/run.sh stop
  fi
else
  export PATH="$(hack/cluster.sh tools):$PATH"
fi

# nginx and Caddy (the verifier's proxy tests) and wrk (its benchmark) from Debian.
need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v caddy >/dev/null || need+=(caddy)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]} from Debian"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Tests reach only this machine: no pod they create may make the node pull an image from
# a registry (the kubelet's log says when one tried; checked at the end).
kubelet_log="${KEYWARD_CLUSTER_DIR:-${KEYWARD_CACHE:-$HOME/.cache/keyward}/cluster}/logs/kubelet.log"
kubelet_log_at=$( [ $local_plane = 1 ] && [ -f "$kubelet_log" ] && wc -c <"$kubelet_log" || echo 0)

echo "== rustfmt, clippy"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo fmt --manifest-path fuzz/Cargo.toml -- --check

echo "== fuzzing the parsers (duration, key format, verifier requests), 20 s each"
hack/fuzz.sh 20

echo "== unit, drift and integration tests"
# Integration tests wait on real time (seconds-scale key lifetimes): run them side by side.
cargo test --all-targets --locked -- --test-threads 8

if [ $local_plane = 1 ]; then
  echo "== tests that kill the control plane or remove keyward's CRDs (local control plane only, alone)"
  cargo test --locked --test soak --test missing_crds -- --ignored --test-threads 1
fi

if [ $local_plane = 1 ] && hack/cluster.sh has-node >/dev/null 2>&1; then
  echo "== keyward in pods on the node: the image (hack/image.sh) twice, two digests to upgrade between"
  images=${KEYWARD_CACHE:-$HOME/.cache/keyward}/images
  hack/image.sh
  KEYWARD_TEST_IMAGE=$(cat "$images/keyward.ref")
  KEYWARD_IMAGE=docker.io/keyward/keyward:dev-next hack/image.sh --build-arg REVISION=test-upgrade
  KEYWARD_TEST_IMAGE_NEXT=docker.io/keyward/keyward:dev-next
  export KEYWARD_TEST_IMAGE KEYWARD_TEST_IMAGE_NEXT
  # --nocapture: the consumers test prints its table (docs/consuming-keys.md).
  cargo test --locked --test incluster -- --ignored --test-threads 1 --nocapture
else
  echo "== no node on this machine (hack/cluster.sh status says why): the in-cluster tests did not run"
fi

if [ $local_plane = 1 ]; then
  # The oldest Kubernetes minor keyward supports (hack/versions.sh), as an API server
  # without a node beside the first, on its own ports and directory.
  cache=${KEYWARD_CACHE:-$HOME/.cache/keyward}
  oldest=(env KEYWARD_K8S_VERSION=oldest KEYWARD_CLUSTER_DIR="$cache/cluster-oldest"
    KEYWARD_API_PORT=16543 KEYWARD_ETCD_PORT=23990)
  "${oldest[@]}" hack/cluster.sh down --purge >/dev/null 2>&1 || true
  "${oldest[@]}" hack/cluster.sh up --no-node
  echo "== integration tests on the oldest supported Kubernetes ($(. hack/versions.sh; echo "$K8S_OLDEST_VERSION"), API server only)"
  (
    eval "$("${oldest[@]}" hack/cluster.sh env)"
    cargo test --locked --tests -- --test-threads 8
  )
  "${oldest[@]}" hack/cluster.sh down --purge
fi

if [ $local_plane = 1 ] && [ -f "$kubelet_log" ]; then
  echo "== no image was pulled from a registry during the tests"
  # From where the log stood at the start (all of it, if it was started afresh since).
  size=$(wc -c <"$kubelet_log")
  [ "$size" -ge "$kubelet_log_at" ] || kubelet_log_at=0
  pulls=$(tail -c +"$((kubelet_log_at + 1))" "$kubelet_log" | grep -o 'Pull image "[^"]*"' | sort | uniq -c || true)
  if [ -n "$pulls" ]; then
    echo "the node tried to pull these images from a registry (tests must use images already on it, pullPolicy Never/IfNotPresent, or pods no node takes):" >&2
    echo "$pulls" >&2
    exit 1
  fi
fi
