#!/usr/bin/env bash
# Verifier throughput and latency against its ceiling, side by side in one run:
#   1. nginx answering a static 204 (the ceiling for an HTTP answer on this machine);
#   2. `keyward verifier` answering GET /v1/auth with a valid key (full path: format
#      check, SHA-256, index lookup, usage record, metrics).
# Same load generator (wrk from Debian), same connections, threads and duration.
#
#   bench/verifier.sh [seconds] [connections]     (defaults: 15 s, 32 connections)
#
# Needs the local control plane (hack/cluster.sh up) or KUBECONFIG; builds --release.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-15}
CONNS=${2:-32}
THREADS=2

if [ -z "${KUBECONFIG:-}" ]; then hack/cluster.sh up >/dev/null; eval "$(hack/cluster.sh env)"; fi
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; NGINX=/usr/sbin/nginx; }
cargo build --release --locked --quiet
BIN=target/release/keyward
WORK=$(mktemp -d)
NS=keyward-bench
cleanup() {
  for p in "$WORK"/*.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
  kubectl delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
  kubectl delete keypolicy keyward-bench >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" crds --kube-version "$(kubectl get --raw /version | grep gitVersion | cut -d'"' -f4)" | kubectl apply -f - >/dev/null
kubectl create namespace "$NS" >/dev/null 2>&1 || true
kubectl apply -f - >/dev/null <<YAML
apiVersion: keyward.dev/v1alpha1
kind: KeyPolicy
metadata: {name: keyward-bench}
spec: {expiry: {maxLifetime: P1D}}
---
apiVersion: keyward.dev/v1alpha1
kind: ApiKey
metadata: {name: bench, namespace: $NS}
spec: {policy: keyward-bench, owner: bench}
YAML
RUST_LOG=warn "$BIN" controller --namespace "$NS" --metrics-addr 127.0.0.1:18180 >"$WORK/controller.log" 2>&1 &
echo $! >"$WORK/controller.pid"
RUST_LOG=warn "$BIN" verifier --namespace "$NS" --listen 127.0.0.1:18181 >"$WORK/verifier.log" 2>&1 &
echo $! >"$WORK/verifier.pid"
for _ in $(seq 1 100); do
  KEY=$(kubectl get secret -n "$NS" bench -o jsonpath='{.data.api-key}' 2>/dev/null | base64 -d 2>/dev/null || true)
  [ -n "$KEY" ] && curl -fsS -o /dev/null -H "Authorization: Bearer $KEY" http://127.0.0.1:18181/v1/auth 2>/dev/null && break
  sleep 0.2
done
[ -n "$KEY" ] || { echo "no key" >&2; exit 1; }

mkdir -p "$WORK/nginx/tmp"
cat >"$WORK/nginx/nginx.conf" <<CONF
daemon off; worker_processes $THREADS; error_log $WORK/nginx/error.log; pid $WORK/nginx/nginx.pid;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $WORK/nginx/tmp; proxy_temp_path $WORK/nginx/tmp;
  fastcgi_temp_path $WORK/nginx/tmp; uwsgi_temp_path $WORK/nginx/tmp; scgi_temp_path $WORK/nginx/tmp;
  server { listen 127.0.0.1:18182; location / { return 204; } } }
CONF
"$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" &
echo $! >"$WORK/nginx-master.pid"
sleep 0.5

run() { # name url
  wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency -H "Authorization: Bearer $KEY" "$2" >"$WORK/$1.txt"
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/$1.txt")
  p50=$(awk '$1=="50%" {print $2}' "$WORK/$1.txt")
  p99=$(awk '$1=="99%" {print $2}' "$WORK/$1.txt")
  echo "$1 $rps $p50 $p99"
}
echo "wrk -t$THREADS -c$CONNS -d${DURATION}s on $(nproc) cores, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
CEIL=$(run nginx-204 http://127.0.0.1:18182/)
VER=$(run verifier http://127.0.0.1:18181/v1/auth)
CODES=$(curl -fsS http://127.0.0.1:18181/metrics | grep '^keyward_verify_requests_total' || true)
printf '| target | requests/s | p50 | p99 |\n|---|---|---|---|\n'
for r in "$CEIL" "$VER"; do set -- $r; printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4"; done
awk -v a="$(echo "$VER" | cut -d' ' -f2)" -v b="$(echo "$CEIL" | cut -d' ' -f2)" 'BEGIN { printf "verifier / ceiling = %.2f\n", a / b }'
echo "$CODES"
