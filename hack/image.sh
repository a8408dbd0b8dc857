#!/usr/bin/env bash
# Build keyward's container image here, without a Docker daemon: the same image as the
# Dockerfile describes.
#
#   hack/image.sh                 build, then import into the local node's containerd
#   hack/image.sh --no-import     build only
#   hack/image.sh --print-digest  print the last build's manifest digest and exit
#   hack/image.sh --print-config  print the image config taken from the Dockerfile (as the
#                                 `umoci config` flags the build uses) and exit
#   hack/image.sh --check         also run `keyward --version` from the built image with
#                                 runc (as the image's user, read-only root) before importing
#   --build-arg NAME=VALUE        as `docker build --build-arg` (VERSION, REVISION)
#
# Steps: `cargo build --release --locked --bin keyward` (honours CARGO_TARGET_DIR; default
# the repository's target/), hack/image-rootfs.sh (the rootfs, shared with the
# Dockerfile), then umoci: a one-layer OCI image whose user, workdir, env, entrypoint and
# labels are read from the Dockerfile's final stage (so the two cannot drift; tests/
# image.rs checks). The result, under $KEYWARD_CACHE/images (~/.cache/keyward/images):
#   oci/             the OCI image layout (umoci/skopeo: oci:<dir>:<image name>)
#   keyward.tar      the same as an OCI archive (`ctr images import`, `skopeo copy
#                    oci-archive:...`), its index naming the full image name
#   keyward.digest   the manifest digest (sha256:...), keyward.ref the image name
# The image name is $KEYWARD_IMAGE, default docker.io/keyward/keyward:dev (fully
# qualified: containerd's CRI resolves only full names). When the node's containerd
# socket exists ($KEYWARD_CLUSTER_DIR/containerd/containerd.sock), the archive is
# imported into its k8s.io namespace. Same inputs give the same digest: file times and
# the config's `created` are SOURCE_DATE_EPOCH (default: the HEAD commit's time).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

CACHE=${KEYWARD_CACHE:-$HOME/.cache/keyward}
# ctr and runc: the ones hack/cluster.sh builds (links in its bin directory).
export PATH="$CACHE/bin:$PATH"
OUT=$CACHE/images
CLUSTER=${KEYWARD_CLUSTER_DIR:-$CACHE/cluster}
SOCK=$CLUSTER/containerd/containerd.sock
IMAGE=${KEYWARD_IMAGE:-docker.io/keyward/keyward:dev}
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
case $TARGET in /*) ;; *) TARGET=$REPO/$TARGET ;; esac
DOCKERFILE=${KEYWARD_DOCKERFILE:-$REPO/Dockerfile}   # another one: for tests/image.rs

log() { printf '[image] %s\n' "$*" >&2; }
die() { printf '[image] error: %s\n' "$*" >&2; exit 1; }

# shellcheck source=hack/lib.sh
source "$REPO/hack/lib.sh"

# --- the Dockerfile's final stage ----------------------------------------------
# Reads the subset of Dockerfile syntax the Dockerfile's header allows and prints one
# line per setting: `user U`, `workdir D`, `env K=V`, `entrypoint ARG`, `cmd ARG`,
# `label K=V`, in the file's order. Anything else in the final stage is an error. The
# helpers return their result in REPLY (no subshells, so `die` ends the script).
declare -A build_args=() global_args=() stage_args=()
dockerfile_config() {
  local line="" raw n=0 start=0 stage=-1 final_from inst rest name value kv
  final_from=$(grep -n -i '^[[:space:]]*FROM[[:space:]]' "$DOCKERFILE" | tail -1 | cut -d: -f1)
  [ -n "$final_from" ] || die "no FROM in $DOCKERFILE"
  while IFS= read -r raw || [ -n "$raw" ]; do
    n=$((n + 1))
    if [ -z "$line" ]; then
      # Comments and blank lines (between instructions, or inside a continued one).
      [[ $raw =~ ^[[:space:]]*(#|$) ]] && continue
      start=$n
    elif [[ $raw =~ ^[[:space:]]*(#|$) ]]; then
      continue
    fi
    if [[ $raw =~ ^(.*)\\[[:space:]]*$ ]]; then line+="${BASH_REMATCH[1]} "; continue; fi
    line+=$raw
    [[ $line =~ ^[[:space:]]*([A-Za-z]+)[[:space:]]*(.*[^[:space:]])?[[:space:]]*$ ]] || die "cannot read: $line"
    inst=${BASH_REMATCH[1]^^} rest=${BASH_REMATCH[2]}
    line=""
    if [ "$inst" = FROM ]; then stage=$((stage + 1)); fi
    if [ "$start" -lt "$final_from" ]; then
      # Before the final stage only the global ARGs (their defaults) matter.
      if [ $stage = -1 ] && [ "$inst" = ARG ]; then
        name=${rest%%=*} value=""
        if [[ $rest == *=* ]]; then unquote "${rest#*=}"; value=$REPLY; fi
        global_args[$name]=$value
      fi
      continue
    fi
    case $inst in
      FROM) [ "$rest" = scratch ] || die "the final stage must be FROM scratch (hack/image.sh builds only that), not: FROM $rest" ;;
      ARG)
        name=${rest%%=*} value=""
        if [[ $rest == *=* ]]; then unquote "${rest#*=}"; value=$REPLY
        elif [ -n "${global_args[$name]+x}" ]; then value=${global_args[$name]}; fi
        if [ -n "${build_args[$name]+x}" ]; then value=${build_args[$name]}; fi
        stage_args[$name]=$value ;;
      COPY) [ "$rest" = "--from=build /rootfs /" ] || die "the final stage may only COPY --from=build /rootfs /, not: COPY $rest" ;;
      USER | WORKDIR) unquote "$rest"; expand "$REPLY"; echo "${inst,,} $REPLY" ;;
      ENV | LABEL) pairs "$rest"; for kv in "${PAIRS[@]}"; do echo "${inst,,} $kv"; done ;;
      ENTRYPOINT | CMD) json_array "$rest"; for kv in "${PAIRS[@]}"; do echo "${inst,,} $kv"; done ;;
      *) die "hack/image.sh does not understand '$inst' in the Dockerfile's final stage" ;;
    esac
  done <"$DOCKERFILE"
}
unquote() { if [[ $1 =~ ^\"([^\"\\]*)\"$ ]]; then REPLY=${BASH_REMATCH[1]}; else REPLY=$1; fi; }
# ${NAME} and $NAME from the final stage's ARGs.
expand() {
  local s=$1 out="" name
  while [[ $s =~ ^([^\$]*)\$(\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))(.*)$ ]]; do
    name=${BASH_REMATCH[3]:-${BASH_REMATCH[4]}}
    [ -n "${stage_args[$name]+x}" ] || die "\$$name in the Dockerfile's final stage is not an ARG of that stage"
    out+=${BASH_REMATCH[1]}${stage_args[$name]}
    s=${BASH_REMATCH[5]}
  done
  [[ $s != *\$* ]] || die "cannot expand: $1"
  REPLY=$out$s
}
# `K="V" K2="V2"` (or unquoted values without spaces) -> PAIRS=(K=V K2=V2), expanded.
pairs() {
  local s=$1 key rest
  PAIRS=()
  while [ -n "$s" ]; do
    if [[ $s =~ ^([A-Za-z0-9._-]+)=\"([^\"\\]*)\"[[:space:]]*(.*)$ ]] ||
       [[ $s =~ ^([A-Za-z0-9._-]+)=([^\"[:space:]]*)[[:space:]]*(.*)$ ]]; then
      key=${BASH_REMATCH[1]} rest=${BASH_REMATCH[3]}
      expand "${BASH_REMATCH[2]}"
      PAIRS+=("$key=$REPLY")
      s=$rest
    else
      die "cannot read key=\"value\" pairs at: $s"
    fi
  done
}
# `["a", "b"]` -> PAIRS=(a b) (no escapes, no variables: exec form expands none).
json_array() {
  local s
  PAIRS=()
  [[ $1 =~ ^\[(.*)\]$ ]] || die "ENTRYPOINT and CMD must be in JSON form: $1"
  s=${BASH_REMATCH[1]}
  while [[ $s =~ ^[[:space:]]*\"([^\"\\]*)\"[[:space:]]*(,(.*))?$ ]]; do
    PAIRS+=("${BASH_REMATCH[1]}")
    s=${BASH_REMATCH[3]}
  done
  [[ $s =~ ^[[:space:]]*$ ]] || die "cannot read the JSON array $1"
}

# --- options ----------------------------------------------------------------------
mode=build
import=1
while [ $# -gt 0 ]; do
  case $1 in
    --no-import) import=0 ;;
    --check) mode=check ;;
    --print-digest) mode=digest ;;
    --print-config) mode=config ;;
    --build-arg) [ $# -ge 2 ] || die "--build-arg needs NAME=VALUE"; shift
      [[ $1 == ?*=* ]] || die "--build-arg needs NAME=VALUE"; build_args[${1%%=*}]=${1#*=} ;;
    --build-arg=?*=*) a=${1#--build-arg=}; build_args[${a%%=*}]=${a#*=} ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

if [ $mode = digest ]; then
  [ -f "$OUT/keyward.digest" ] || die "no image built yet ($OUT/keyward.digest)"
  cat "$OUT/keyward.digest"
  exit 0
fi

if [ -z "${build_args[REVISION]+x}" ]; then build_args[REVISION]=$(git rev-parse HEAD 2>/dev/null || true); fi
# The image config as `umoci config` flags (what --print-config shows and the build uses).
config=$(dockerfile_config)
cfg=()
while IFS= read -r kv; do
  value=${kv#* }
  case ${kv%% *} in
    user) cfg+=(--config.user="$value") ;;
    workdir) cfg+=(--config.workingdir="$value") ;;
    env) cfg+=(--config.env="$value") ;;
    entrypoint) cfg+=(--config.entrypoint="$value") ;;
    cmd) cfg+=(--config.cmd="$value") ;;
    label) cfg+=(--config.label="$value") ;;
    *) die "unexpected config line: $kv" ;;
  esac
done <<<"$config"
if [ $mode = config ]; then printf '%s\n' "${cfg[@]}"; exit 0; fi

# --- build ---------------------------------------------------------------------------
# A full name (registry host, path, tag): containerd's CRI does not expand short names.
if ! [[ $IMAGE == */* && ${IMAGE##*/} == ?*:?* && $IMAGE != *@* &&
        ( ${IMAGE%%/*} == *.* || ${IMAGE%%/*} == *:* || ${IMAGE%%/*} == localhost ) ]]; then
  die "KEYWARD_IMAGE=$IMAGE is not a full name with a tag, like docker.io/keyward/keyward:dev"
fi

command -v umoci >/dev/null || apt_install umoci
start=$SECONDS
log "cargo build --release --locked --bin keyward (target: $TARGET)"
CARGO_TARGET_DIR=$TARGET cargo build --release --locked --bin keyward
bin=$TARGET/release/keyward

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)

mkdir -p "$OUT"
# One build at a time writes $OUT.
exec 9>"$OUT/.lock"
flock 9
work=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
hack/image-rootfs.sh "$bin" "$work/rootfs"

layout=$work/oci

# One layer: unpack the empty image, fill its rootfs, repack (the diff is the whole
# rootfs). umoci 0.4's `insert` of a directory at / writes a truncated layer.
rootless=()
if [ "$(id -u)" != 0 ]; then rootless=(--rootless); fi
umoci init --layout "$layout"
umoci new --image "$layout:$IMAGE"
umoci unpack "${rootless[@]}" --image "$layout:$IMAGE" "$work/bundle" >/dev/null
cp -a "$work/rootfs/." "$work/bundle/rootfs/"
umoci repack --image "$layout:$IMAGE" --history.created="$created" \
  --history.created_by="hack/image-rootfs.sh target/release/keyward /rootfs" "$work/bundle"
rm -rf "$work/bundle"
case $(uname -m) in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; *) arch=$(uname -m) ;; esac
umoci config --image "$layout:$IMAGE" --created="$created" --os=linux --architecture="$arch" \
  --no-history "${cfg[@]}"
umoci gc --layout "$layout"

# The OCI archive: the layout as a tar, its index annotated with the full image name
# (org.opencontainers.image.ref.name, set by umoci's tag), which ctr import uses.
tar -C "$layout" --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
  -cf "$work/keyward.tar" oci-layout index.json blobs
digest=$(grep -o '"digest":"sha256:[0-9a-f]*"' "$layout/index.json" | cut -d'"' -f4)
[ "$(grep -c . <<<"$digest")" = 1 ] || die "expected one manifest in $layout/index.json"
rm -rf "$OUT/oci"
mv "$layout" "$OUT/oci"
mv "$work/keyward.tar" "$OUT/keyward.tar"
printf '%s\n' "$IMAGE" >"$OUT/keyward.ref"
printf '%s\n' "$digest" >"$OUT/keyward.digest"
size=$(stat -c %s "$OUT/keyward.tar")
log "built $IMAGE ($((size / 1048576)).$((size % 1048576 * 10 / 1048576)) MiB archive, $((SECONDS - start)) s): $OUT/keyward.tar"

# --- smoke test: run it with runc -------------------------------------------------------
if [ $mode = check ]; then
  [ "$(id -u)" = 0 ] || die "--check needs root (runc)"
  command -v runc >/dev/null || die "no runc on PATH: hack/cluster.sh up builds it (eval \"\$(hack/cluster.sh env)\" puts it on PATH)"
  command -v jq >/dev/null || apt_install jq
  bundle=$work/bundle
  umoci unpack --image "$OUT/oci:$IMAGE" "$bundle" >/dev/null
  # The image's own process (user, entrypoint, env, cwd) + `--version`, on a read-only
  # root, without a terminal, and without oom_score_adj (lowering it needs
  # CAP_SYS_RESOURCE, which root in a container may lack).
  jq '.process.terminal = false | .root.readonly = true | .process.args += ["--version"]
      | del(.process.oomScoreAdj)' "$bundle/config.json" >"$bundle/config.json.new"
  mv "$bundle/config.json.new" "$bundle/config.json"
  log "runc: $(jq -c '{user: .process.user, args: .process.args, readonly: .root.readonly}' "$bundle/config.json")"
  id=keyward-image-check-$$
  if ! check_out=$(cd "$bundle" && runc run --bundle "$bundle" "$id" </dev/null 2>&1); then
    runc delete --force "$id" >/dev/null 2>&1 || true
    die "runc run failed: $check_out"
  fi
  [[ $check_out =~ ^keyward\ [0-9] ]] ||
    die "unexpected output from the image: $check_out"
  log "runc: the image says '$check_out'"
fi

# --- import into the node's containerd -----------------------------------------------
if [ $import = 1 ]; then
  if [ -S "$SOCK" ]; then
    command -v ctr >/dev/null || die "no ctr on PATH: hack/cluster.sh up builds it (eval \"\$(hack/cluster.sh env)\" puts it on PATH)"
    log "importing into containerd ($SOCK, namespace k8s.io)"
    # Unpacked for the default snapshotter (overlayfs, the CRI's default); set
    # CONTAINERD_SNAPSHOTTER if the node's CRI uses another. The OCI manifest is kept
    # as it is, so containerd lists the same digest.
    ctr --address "$SOCK" -n k8s.io images import "$OUT/keyward.tar" >/dev/null
    listed=$(ctr --address "$SOCK" -n k8s.io images ls "name==$IMAGE" | awk 'NR > 1 { print $3 }')
    [ "$listed" = "$digest" ] || die "containerd lists $IMAGE as '${listed:-nothing}', not $digest"
    log "containerd has $IMAGE"
  else
    log "no node is running ($SOCK absent): not imported; the archive is $OUT/keyward.tar"
  fi
fi
echo "$digest"
