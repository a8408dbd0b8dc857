#!/usr/bin/env bash
# Reconciles caused by a steady stream of uses (flush PT2S) on one ApiKey with two keys.
set -euo pipefail
# Needs a cluster: hack/cluster.sh up && eval "$(hack/cluster.sh env)"; cargo build first.
BIN=${KEYWARD_BIN:-$(dirname "$0")/../target/debug/keyward}
NS=meas-$RANDOM
kubectl create ns $NS >/dev/null
cat <<Y | kubectl apply -f - >/dev/null
apiVersion: keyward.dev/v1alpha1
kind: KeyPolicy
metadata: {name: $NS}
spec:
  expiry: {maxLifetime: PT30M, minLifetime: PT1S}
  rotation: {secondaryAt: PT5S}
---
apiVersion: keyward.dev/v1alpha1
kind: ApiKey
metadata: {name: svc, namespace: $NS}
spec: {owner: team, policy: $NS}
Y
$BIN controller --namespace $NS --metrics-addr 127.0.0.1:18180 --usage-flush-interval PT2S >ctl.log 2>&1 &
C=$!
$BIN verifier --namespace $NS --listen 127.0.0.1:18181 --usage-flush-interval PT2S >ver.log 2>&1 &
V=$!
trap 'kill $C $V; kubectl delete ns $NS --wait=false >/dev/null; kubectl delete keypolicy $NS >/dev/null' EXIT
until kubectl -n $NS get secret svc -o jsonpath='{.data.secondary}' 2>/dev/null | grep -q .; do sleep 0.5; done
sleep 3
P=$(kubectl -n $NS get secret svc -o jsonpath='{.data.primary}' | base64 -d)
S=$(kubectl -n $NS get secret svc -o jsonpath='{.data.secondary}' | base64 -d)
m() { curl -s 127.0.0.1:18180/metrics | awk -v n="$1" '$1==n {print $2}'; }
r0=$(m 'keyward_reconciles_total{kind="ApiKey"}'); w0=$(m 'keyward_api_writes_total{resource="apikeys/status"}')
end=$((SECONDS+60)); n=0
while [ $SECONDS -lt $end ]; do
  curl -s -o /dev/null -H "Authorization: Bearer $P" 127.0.0.1:18181/v1/auth
  curl -s -o /dev/null -H "Authorization: Bearer $S" 127.0.0.1:18181/v1/auth
  n=$((n+2)); sleep 0.2
done
sleep 2
r1=$(m 'keyward_reconciles_total{kind="ApiKey"}'); w1=$(m 'keyward_api_writes_total{resource="apikeys/status"}')
uw=$(curl -s 127.0.0.1:18181/metrics | awk '$1=="keyward_verifier_usage_writes_total" {print $2}')
echo "requests=$n verifier_usage_writes=$uw controller_reconciles=$((${r1%.*}-${r0%.*})) controller_status_writes=$(( ${w1:-0} - ${w0:-0} ))"
kubectl -n $NS get apikey svc -o jsonpath='{.status.conditions[?(@.type=="Handover")].reason}'; echo
