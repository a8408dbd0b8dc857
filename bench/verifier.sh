#!/usr/bin/env bash
# Verifier throughput and latency against its ceilings, side by side in one run:
#   1. nginx answering a static 204 (the ceiling for an HTTP answer on this machine);
#   2. `keyward verifier` answering GET /v1/auth with a valid key (full path: format
#      check, SHA-256, index lookup, usage record, metrics);
#   3. bench/grpc_allow.rs, an Envoy ext_authz server answering every Check with OK on
#      the verifier's tonic stack (the ceiling for a gRPC answer);
#   4. `keyward verifier --grpc-listen` answering envoy.service.auth.v3.Authorization/Check
#      for the same valid key (`authorization: Bearer <key>` in the request's headers).
# HTTP rows: wrk (one request in flight per connection); gRPC rows: h2load -m1 (one
# stream in flight per connection), p50/p99 from its --log-file. Both from Debian (wrk,
# nghttp2-client); same connections, threads and duration. Row 4 is only measured once
# one Check comes back grpc-status 0 and counted VALID, and the script fails unless the
# verifier's VALID count grew by what h2load counts as succeeded.
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
command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; NGINX=/usr/sbin/nginx; }
cargo build --release --locked --quiet --bins --example grpc-allow
BIN=target/release/keyward
ALLOW=target/release/examples/grpc-allow
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
# A previous run deletes its namespace without waiting: its Secret, still there while the
# namespace terminates, would hand out a key that stops working mid-measurement.
for _ in $(seq 1 240); do
  [ "$(kubectl get namespace "$NS" -o jsonpath='{.status.phase}' 2>/dev/null)" = Terminating ] || break
  sleep 0.5
done
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
RUST_LOG=warn "$BIN" verifier --namespace "$NS" --listen 127.0.0.1:18181 --grpc-listen 127.0.0.1:18184 \
  >"$WORK/verifier.log" 2>&1 &
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
RUST_LOG=warn "$ALLOW" 127.0.0.1:18183 >"$WORK/grpc-allow.log" 2>&1 &
echo $! >"$WORK/grpc-allow.pid"

# The gRPC request body: 0 (not compressed), 4-byte big-endian length, the CheckRequest
# encoded by hand. Field numbers from envoy/service/auth/v3/{external_auth,attribute_context}.proto:
# CheckRequest.attributes=1, AttributeContext.request=4, Request.http=2,
# HttpRequest.method=2, .headers=3 (map entry: key=1, value=2), .path=4.
KEY="$KEY" python3 - "$WORK/check.bin" <<'PYTHON'
import os, sys
def varint(n):
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        out += bytes([low | (0x80 if n else 0)])
        if not n:
            return out
def field(number, payload):  # wire type 2: length-delimited
    payload = payload.encode() if isinstance(payload, str) else payload
    return varint(number << 3 | 2) + varint(len(payload)) + payload
entry = field(1, "authorization") + field(2, "Bearer " + os.environ["KEY"])
http = field(2, "GET") + field(3, entry) + field(4, "/bench")
check = field(1, field(4, field(2, http)))
open(sys.argv[1], "wb").write(b"\0" + len(check).to_bytes(4, "big") + check)
PYTHON
GRPC_HEADERS=(-H 'content-type: application/grpc' -H 'te: trailers')
CHECK_PATH=/envoy.service.auth.v3.Authorization/Check
grpc_status() { # port -> grpc-status of one Check with that body (nghttp, same package as h2load)
  nghttp -v -d "$WORK/check.bin" "${GRPC_HEADERS[@]}" "http://127.0.0.1:$1$CHECK_PATH" 2>&1 |
    sed -n 's/.* recv .*grpc-status: \([0-9]*\).*/\1/p' | tail -1
}
valid_grpc() { # the verifier's count of gRPC Checks answered VALID
  curl -fsS http://127.0.0.1:18181/metrics | awk '/^keyward_verify_requests_total\{/ && /protocol="grpc"/ &&
    /endpoint="check"/ && /code="VALID"/ { n += $NF } END { printf "%d\n", n }'
}
for _ in $(seq 1 50); do [ "$(grpc_status 18183)" = 0 ] && break; sleep 0.1; done
[ "$(grpc_status 18183)" = 0 ] || { echo "grpc-allow: Check did not answer grpc-status 0" >&2; exit 1; }
BEFORE=$(valid_grpc)
STATUS=$(grpc_status 18184)
AFTER=$(valid_grpc)
if [ "$STATUS" != 0 ] || [ "$AFTER" -ne $((BEFORE + 1)) ]; then
  echo "verifier gRPC: grpc-status '$STATUS', VALID $BEFORE -> $AFTER (want 0 and +1): bad request body?" >&2
  curl -fsS http://127.0.0.1:18181/metrics | grep '^keyward_verify_requests_total' >&2 || true
  exit 1
fi

ms() { # wrk's 123.45us / 1.23ms / 1.02s -> milliseconds
  awk -v v="$1" 'BEGIN { u = v; sub(/^[0-9.]+/, "", u); n = v + 0
    printf "%.2f", u == "us" ? n / 1000 : u == "s" ? n * 1000 : n }'
}
run() { # name url -> name requests/s p50 p99
  wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency -H "Authorization: Bearer $KEY" "$2" >"$WORK/$1.txt"
  if grep -q 'Non-2xx' "$WORK/$1.txt"; then echo "$1: $(grep 'Non-2xx' "$WORK/$1.txt")" >&2; exit 1; fi
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' "$WORK/$1.txt")
  p50=$(ms "$(awk '$1=="50%" {print $2}' "$WORK/$1.txt")")
  p99=$(ms "$(awk '$1=="99%" {print $2}' "$WORK/$1.txt")")
  echo "$1 $rps $p50 $p99"
}
run_grpc() { # name port -> name requests/s p50 p99 succeeded
  h2load -t"$THREADS" -c"$CONNS" -m1 -D"$DURATION" -d "$WORK/check.bin" "${GRPC_HEADERS[@]}" \
    --log-file="$WORK/$1.log" "http://127.0.0.1:$2$CHECK_PATH" >"$WORK/$1.txt"
  local rps ok p50 p99
  rps=$(awk '/^finished in/ {printf "%.0f", $4}' "$WORK/$1.txt")
  ok=$(awk '/^requests:/ {print $8}' "$WORK/$1.txt")
  if ! awk '/^requests:/ && $6 == $8 && $8 > 0 {ok = 1} END {exit !ok}' "$WORK/$1.txt"; then
    echo "$1: not every request succeeded:" >&2; grep -E '^(requests|status codes):' "$WORK/$1.txt" >&2; exit 1
  fi
  # --log-file: start (us since epoch) TAB HTTP status TAB us until the end of the response
  read -r p50 p99 < <(awk -F'\t' '$2 == 200 {print $3}' "$WORK/$1.log" | sort -n | awk '{ v[NR] = $1 }
    END { i = int(NR * 0.50); if (i < NR * 0.50) i++; j = int(NR * 0.99); if (j < NR * 0.99) j++
      printf "%.2f %.2f\n", v[i] / 1000, v[j] / 1000 }')
  echo "$1 $rps $p50 $p99 $ok"
}
load() { cut -d' ' -f1-3 /proc/loadavg; }
echo "wrk -t$THREADS -c$CONNS -d${DURATION}s, h2load -t$THREADS -c$CONNS -m1 -D$DURATION, on $(nproc) cores, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "load average before: $(load)"
CEIL=$(run nginx-204 http://127.0.0.1:18182/)
VER=$(run verifier-http http://127.0.0.1:18181/v1/auth)
GCEIL=$(run_grpc grpc-allow 18183)
BEFORE=$(valid_grpc)
GVER=$(run_grpc verifier-grpc 18184)
AFTER=$(valid_grpc)
echo "load average after: $(load)"
OK=$(echo "$GVER" | cut -d' ' -f5)
# Every Check h2load counts must have been VALID; the verifier also answers the streams
# still in flight when h2load stops (at most one per connection).
if [ $((AFTER - BEFORE)) -lt $((OK * 99 / 100)) ] ||
  [ $((AFTER - BEFORE)) -gt $((OK * 101 / 100 + CONNS)) ]; then
  echo "verifier gRPC: h2load counts $OK succeeded but VALID grew by $((AFTER - BEFORE))" >&2
  cat "$WORK/verifier-grpc.txt" >&2
  curl -fsS http://127.0.0.1:18181/metrics | grep '^keyward_verify_requests_total' >&2 || true
  exit 1
fi
CODES=$(curl -fsS http://127.0.0.1:18181/metrics | grep '^keyward_verify_requests_total' || true)
printf '| target | requests/s | p50 | p99 |\n|---|---|---|---|\n'
for r in "$CEIL" "$VER" "$GCEIL" "$GVER"; do set -- $r; printf '| %s | %s | %s ms | %s ms |\n' "$1" "$2" "$3" "$4"; done
ratio() { # label row row
  awk -v t="$1" -v a="$(echo "$2" | cut -d' ' -f2)" -v b="$(echo "$3" | cut -d' ' -f2)" 'BEGIN { printf "%s = %.2f\n", t, a / b }'
}
ratio "verifier HTTP / nginx 204" "$VER" "$CEIL"
ratio "verifier gRPC / gRPC allow-all" "$GVER" "$GCEIL"
echo "verifier gRPC: h2load counts $OK succeeded, VALID grew by $((AFTER - BEFORE))"
echo "$CODES"
