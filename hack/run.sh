#!/usr/bin/env bash
# The main job on a fresh machine: a real one-node Kubernetes (hack/cluster.sh), keyward's
# container image built here (hack/image.sh), keyward installed from its Helm chart as pods
# (controller and verifier), examples/ applied, and a demo consumer pod that prints the key
# ID it reads from its mounted Secret, so a rotation is seen reaching a pod.
#
#   hack/run.sh          start (or upgrade to the current build) and show status
#   hack/run.sh status   show status again
#   hack/run.sh stop     uninstall the release (CRDs, ApiKeys and their Secrets stay; the
#                        cluster keeps running: hack/cluster.sh down)
#
# When this machine cannot run containers (hack/cluster.sh says why), keyward runs as a
# process on the host instead, as before the node existed.
set -euo pipefail
cd "$(dirname "$0")/.."

RELEASE=keyward
NS=keyward-system
DEMO=keyward-demo
RUN=${KEYWARD_CLUSTER_DIR:-${KEYWARD_CACHE:-$HOME/.cache/keyward}/cluster}
PID=$RUN/keyward-controller.pid
LOG=$RUN/logs/keyward-controller.log
ADDR=${KEYWARD_METRICS_ADDR:-127.0.0.1:18080}

log() { printf '[run] %s\n' "$*" >&2; }
die() { printf '[run] error: %s\n' "$*" >&2; exit 1; }
host_running() { [ -f "$PID" ] && kill -0 "$(cat "$PID")" 2>/dev/null; }

show() {
  echo
  kubectl get nodes -o wide 2>/dev/null || true
  echo
  kubectl get keypolicies
  echo
  kubectl get apikeys -A
  if kubectl -n "$NS" get deploy "$RELEASE" >/dev/null 2>&1; then
    echo
    kubectl -n "$NS" get pods -o wide
  fi
  if kubectl -n "$DEMO" get pod checkout-consumer >/dev/null 2>&1; then
    echo
    echo "checkout-consumer (the demo pod reading the mounted Secret):"
    kubectl -n "$DEMO" logs checkout-consumer --tail 5 2>/dev/null || true
  fi
  echo
  kubectl get events -n "$DEMO" --sort-by=.metadata.creationTimestamp 2>/dev/null | tail -n 8
}

stop() {
  if host_running; then kill "$(cat "$PID")"; log "stopped the keyward process (log: $LOG)"; fi
  rm -f "$PID"
  if helm status "$RELEASE" -n "$NS" >/dev/null 2>&1; then
    helm uninstall "$RELEASE" -n "$NS" --wait >/dev/null
    log "uninstalled release $RELEASE (CRDs, ApiKeys and their Secrets stay)"
  fi
}

case "${1:-start}" in
  stop | status) eval "$(hack/cluster.sh env)" ;;
  start) hack/cluster.sh up; eval "$(hack/cluster.sh env)" ;;
  *) echo "usage: $0 [start|status|stop]" >&2; exit 2 ;;
esac
case "${1:-start}" in
  stop) stop; exit 0 ;;
  status) show; exit 0 ;;
esac

if hack/cluster.sh has-node; then
  # keyward as pods: the image built here, imported into the node, installed by the chart.
  host_running && { log "stopping the keyward process an earlier hack/run.sh started on the host"; kill "$(cat "$PID")"; rm -f "$PID"; }
  hack/image.sh
  image=$(cat "${KEYWARD_CACHE:-$HOME/.cache/keyward}/images/keyward.ref")
  digest=$(cat "${KEYWARD_CACHE:-$HOME/.cache/keyward}/images/keyward.digest")
  # pullPolicy Never: a missing image would only show as pods stuck in ErrImageNeverPull.
  ctr --address "$KEYWARD_CONTAINERD_SOCK" -n k8s.io images ls -q 2>/dev/null | grep -qxF "$image" ||
    die "image $image is not in the node's containerd (hack/image.sh builds and imports it)"
  # keyward's namespace enforces the restricted Pod Security Standard (docs/operations.md):
  # the chart's pods meet it, and nothing else there may run as root or privileged.
  kubectl get namespace "$NS" >/dev/null 2>&1 || kubectl create namespace "$NS" >/dev/null
  kubectl label namespace "$NS" pod-security.kubernetes.io/enforce=restricted --overwrite >/dev/null
  log "installing keyward $image ($digest) with the Helm chart into namespace $NS"
  # The digest as a pod annotation: a rebuilt image (same tag) rolls the pods. The CRDs
  # may have been applied by someone else (hack/test.sh, `keyward crds`): the release
  # takes them over (--take-ownership, --force-conflicts).
  helm upgrade --install "$RELEASE" charts/keyward -n "$NS" --take-ownership --force-conflicts \
    --set image.repository="${image%:*}" --set image.tag="${image##*:}" --set image.pullPolicy=Never \
    --set-string podAnnotations.keyward\\.dev/image-digest="$digest" \
    --wait --timeout 5m >/dev/null ||
    { kubectl -n "$NS" get pods -o wide >&2 || true; die "helm install failed (kubectl -n $NS describe pods)"; }
  # The example Deployment runs the local busybox image (never pulled): keyward rolls
  # it out at each flip.
  kubectl apply -f examples/ >/dev/null
  # A Pod's spec cannot be changed in place: start it afresh on every run.
  kubectl -n "$DEMO" delete pod checkout-consumer --ignore-not-found >/dev/null
  kubectl apply -f hack/demo-consumer.yaml >/dev/null
  kubectl -n "$DEMO" wait --for condition=Ready pod/checkout-consumer --timeout 120s >/dev/null ||
    die "the demo consumer pod is not Ready (kubectl -n $DEMO describe pod checkout-consumer)"
  show
  cat <<MSG

keyward runs as pods in namespace $NS (controller: deployment/$RELEASE, verifier:
deployment/$RELEASE-verifier), image $image.
  watch a rotation reach a pod:  kubectl -n $DEMO logs -f checkout-consumer
  watch the keys:                kubectl get apikeys -A -w
  controller logs:               kubectl -n $NS logs deploy/$RELEASE
  stop:                          hack/run.sh stop   (the cluster: hack/cluster.sh down)
MSG
  exit 0
fi

# No node on this machine: keyward as a process on the host.
log "no node here (see hack/cluster.sh status): running keyward as a process on the host"
BIN=target/debug/keyward
cargo build --locked --quiet
"$BIN" crds --kube-version "$(kubectl get --raw /version | grep gitVersion | cut -d'"' -f4)" | kubectl apply -f - >/dev/null
kubectl wait --for condition=established --timeout=60s crd/apikeys.keyward.dev crd/keypolicies.keyward.dev >/dev/null
kubectl apply -f examples/ >/dev/null
if host_running; then
  log "keyward already running (pid $(cat "$PID")); restarting with the current build"
  kill "$(cat "$PID")"; sleep 1
fi
mkdir -p "$(dirname "$LOG")"
setsid nohup "$BIN" controller --metrics-addr "$ADDR" >>"$LOG" 2>&1 </dev/null &
echo $! >"$PID"
for _ in $(seq 1 60); do
  curl -fsS "http://$ADDR/readyz" >/dev/null 2>&1 && break
  host_running || { tail -20 "$LOG"; die "keyward exited (log: $LOG)"; }
  sleep 0.5
done
for _ in $(seq 1 20); do
  [ -n "$(kubectl get apikeys -A -o jsonpath='{.items[*].status.conditions}' 2>/dev/null)" ] && break
  sleep 0.5
done
show
cat <<MSG

keyward controller is running on the host (pid $(cat "$PID")), metrics on http://$ADDR/metrics
  logs:    tail -f $LOG
  watch:   kubectl get apikeys -A -w
  stop:    hack/run.sh stop   (the cluster: hack/cluster.sh down)
MSG
