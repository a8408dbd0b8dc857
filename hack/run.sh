#!/usr/bin/env bash
# The main job on a fresh machine: bring up the local control plane, install the CRDs,
# apply examples/, run the keyward controller against it, and show the keys' status.
#
#   hack/run.sh          start (or reuse) everything and show status
#   hack/run.sh status   show status again
#   hack/run.sh stop     stop keyward (the control plane keeps running: hack/cluster.sh down)
set -euo pipefail
cd "$(dirname "$0")/.."

hack/cluster.sh up
eval "$(hack/cluster.sh env)"
RUN=${KEYWARD_CLUSTER_DIR:-${KEYWARD_CACHE:-$HOME/.cache/keyward}/cluster}
PID=$RUN/keyward-controller.pid
LOG=$RUN/logs/keyward-controller.log
ADDR=${KEYWARD_METRICS_ADDR:-127.0.0.1:18080}
BIN=target/debug/keyward

running() { [ -f "$PID" ] && kill -0 "$(cat "$PID")" 2>/dev/null; }

show() {
  echo
  kubectl get keypolicies
  echo
  kubectl get apikeys -A
  echo
  kubectl get events -n keyward-demo --sort-by=.metadata.creationTimestamp 2>/dev/null | tail -n 10
}

case "${1:-start}" in
  stop)
    if running; then kill "$(cat "$PID")"; echo "stopped keyward (log: $LOG)"; fi
    rm -f "$PID"; exit 0 ;;
  status) show; exit 0 ;;
  start) ;;
  *) echo "usage: $0 [start|status|stop]" >&2; exit 2 ;;
esac

cargo build --locked --quiet
"$BIN" crds --kube-version "$(kubectl get --raw /version | grep gitVersion | cut -d'"' -f4)" | kubectl apply -f -
kubectl wait --for condition=established --timeout=60s crd/apikeys.keyward.dev crd/keypolicies.keyward.dev >/dev/null
kubectl apply -f examples/

if running; then
  echo "keyward controller already running (pid $(cat "$PID")); restarting with the current build"
  kill "$(cat "$PID")"; sleep 1
fi
mkdir -p "$(dirname "$LOG")"
setsid nohup "$BIN" controller --metrics-addr "$ADDR" >>"$LOG" 2>&1 </dev/null &
echo $! >"$PID"
for _ in $(seq 1 60); do
  curl -fsS "http://$ADDR/readyz" >/dev/null 2>&1 && break
  running || { tail -20 "$LOG"; echo "keyward exited (log: $LOG)" >&2; exit 1; }
  sleep 0.5
done
# Give the first reconciles a moment, then show what keyward did.
for _ in $(seq 1 20); do
  [ -n "$(kubectl get apikeys -A -o jsonpath='{.items[*].status.conditions}' 2>/dev/null)" ] && break
  sleep 0.5
done
show
cat <<MSG

keyward controller is running (pid $(cat "$PID")), metrics on http://$ADDR/metrics
  logs:    tail -f $LOG
  watch:   KUBECONFIG=$KUBECONFIG kubectl get apikeys -A -w
  stop:    hack/run.sh stop   (control plane: hack/cluster.sh down)
MSG
