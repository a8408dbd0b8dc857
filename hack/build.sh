# shellcheck shell=bash
# Builds the local cluster's parts from their Go modules, through the Go module proxy only
# (sourced by hack/cluster.sh; the caller defines `log` and `die`, and sources versions.sh).
#
# Each part is built in a small wrapper module of its own (a go.mod that requires the
# part's module at its pinned version, with `tool` lines for its commands), into
# $CACHE/opt/<part>-<version>/bin. A part is used only once its `.complete` stamp is
# there, written after every binary of it was built: a run interrupted half-way leaves a
# `.tmp` directory that the next run removes and rebuilds rather than trusts. Go's own
# module and build caches stay where `go env` puts them (a rebuild after a bump reuses
# what did not change).

OPT=$CACHE/opt

# Go, at least $GO_MIN_VERSION; an older Go >= 1.21 brings $GO_TOOLCHAIN_FALLBACK through
# the Go module proxy (GOTOOLCHAIN). Everything else ends in one line.
go_ready() {
  [ -z "${go_checked:-}" ] || return 0
  command -v go >/dev/null ||
    die "Go is missing: install Go >= $GO_MIN_VERSION (README: prerequisites); the local cluster is built from Go modules"
  local have
  have=$(timeout 60 go env GOVERSION 2>/dev/null) || die "\`go env GOVERSION\` failed: is Go (>= $GO_MIN_VERSION) installed correctly?"
  have=${have#go}
  if ! version_at_least "$have" "$GO_MIN_VERSION"; then
    version_at_least "$have" 1.21 ||
      die "Go $have is older than the $GO_MIN_VERSION these modules need, and too old (< 1.21) to bring a newer toolchain itself: install Go >= $GO_MIN_VERSION"
    log "Go $have is older than $GO_MIN_VERSION: using $GO_TOOLCHAIN_FALLBACK through the Go module proxy (GOTOOLCHAIN)"
    export GOTOOLCHAIN=$GO_TOOLCHAIN_FALLBACK
    have=$(timeout 300 go env GOVERSION 2>&1) ||
      die "Go $GO_TOOLCHAIN_FALLBACK could not be brought through the Go module proxy: $(tail -1 <<<"$have")"
  fi
  go_checked=1
}

version_at_least() { # have, want: whether have >= want (dotted numbers)
  [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -1)" = "$2" ]
}

# The last line of a Go log worth showing: the first `go: ` error or compiler error.
go_error() { # log
  grep -m1 -E '^(go: .*(error|not found|unknown|invalid|refused|cannot|no matching|410|404|timeout)|.*\.go:[0-9]+:[0-9]+: |# |.*: (undefined|cannot))' "$1" ||
    tail -1 "$1"
}

# Builds the commands ("$@", import paths) of module $2 at version $3 into $1/bin.
# GB_REPLACE (go.mod replace lines), GB_CGO (0/1), GB_TAGS, GB_LDFLAGS apply.
go_build_part() { # dir, module, version, packages...
  local out=$1 mod=$2 ver=$3; shift 3
  [ -f "$out/.complete" ] && return 0
  go_ready
  local tmp=$out.tmp name=${out##*/}
  if [ -e "$tmp" ] || [ -e "$out" ]; then log "$name: removing a build that did not complete"; fi
  rm -rf "$tmp" "$out"
  mkdir -p "$tmp/src" "$tmp/bin"
  {
    printf 'module keyward.local/build/%s\n\ngo 1.24\n\nrequire %s v%s\n' "${name%%-[0-9]*}" "$mod" "$ver"
    [ -z "${GB_REPLACE:-}" ] || printf '\nreplace (\n%s\n)\n' "$GB_REPLACE"
  } >"$tmp/src/go.mod"
  log "$name: resolving $mod@v$ver through the Go module proxy"
  # Each command at the pinned version: a bare `go get` would take the module's newest.
  (cd "$tmp/src" && GOFLAGS=-mod=mod timeout 1200 go get -tool "${@/%/@v$ver}") >"$tmp/get.log" 2>&1 ||
    die "$name: module $mod@v$ver does not resolve through the Go module proxy ($(go env GOPROXY)): $(go_error "$tmp/get.log")"
  log "$name: building $(printf '%s ' "${@##*/}")(once; the log is $tmp/build.log)"
  (cd "$tmp/src" && CGO_ENABLED=${GB_CGO:-0} timeout 5400 go build -trimpath -tags "${GB_TAGS:-}" \
    -ldflags "-s -w ${GB_LDFLAGS:-}" -o ../bin/ "$@") >"$tmp/build.log" 2>&1 ||
    die "$name: the build failed: $(go_error "$tmp/build.log") (log: $tmp/build.log)"
  touch "$tmp/.complete"
  mv "$tmp" "$out"
}

# k8s.io/kubernetes at version $1: its commands "${@:3}" (kube-apiserver, kubelet, ...) into
# $OPT/$2-$1 (kubectl is a part of its own, so `hack/cluster.sh tools` builds only it).
# k/k's go.mod points every k8s.io staging module at ./staging, which a dependency cannot
# use: the wrapper replaces each with the published v0.<minor>.<patch> of the same release.
# The version is stamped as k/k's hack/lib/version.sh does, so `kubectl version` and
# discovery say it.
build_kubernetes() { # version, part, commands...
  local v=$1 part=$2; shift 2
  local out=$OPT/$part-$v
  [ -f "$out/.complete" ] && return 0
  go_ready
  local gomod staging minor=${v#1.}
  minor=${minor%%.*}
  gomod=$(timeout 600 go mod download -json "k8s.io/kubernetes@v$v" 2>&1) ||
    die "$part-$v: module k8s.io/kubernetes@v$v does not resolve through the Go module proxy: $(grep -m1 -o '"Error": *"[^"]*' <<<"$gomod" | cut -d'"' -f4 | sed 's/\\n.*//')"
  gomod=$(sed -n 's/.*"GoMod": *"\([^"]*\)".*/\1/p' <<<"$gomod")
  staging=$(grep -o 'k8s.io/[a-z0-9-]* => ./staging' "$gomod" | awk -v v="v0.${v#1.}" '{ print "\t" $1 " => " $1 " " v }')
  [ -n "$staging" ] || die "$part-$v: no staging modules found in k8s.io/kubernetes@v$v's go.mod ($gomod)"
  local ld="" kv date
  date=$(sed -n 's/.*"Time": *"\([^"]*\)".*/\1/p' "${gomod%.mod}.info" 2>/dev/null)
  for kv in "gitVersion=v$v" "gitMajor=1" "gitMinor=$minor" "gitCommit=v$v" "gitTreeState=clean" \
    "buildDate=${date:-1970-01-01T00:00:00Z}"; do
    ld+=" -X k8s.io/client-go/pkg/version.$kv -X k8s.io/component-base/version.$kv"
  done
  GB_REPLACE=$staging GB_CGO=0 GB_TAGS="" GB_LDFLAGS=$ld \
    go_build_part "$out" k8s.io/kubernetes "$v" "${@/#/k8s.io/kubernetes/cmd/}"
}

build_etcd() {
  local out=$OPT/etcd-$ETCD_VERSION
  [ -f "$out/.complete" ] && return 0
  GB_REPLACE="" GB_CGO=0 GB_TAGS="" GB_LDFLAGS="-X go.etcd.io/etcd/api/v3/version.GitSHA=v$ETCD_VERSION" \
    go_build_part "$out" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3
  # `go build` names the server/v3 main package after "server".
  mv "$out/bin/server" "$out/bin/etcd"
}

build_containerd() {
  local p=github.com/containerd/containerd/v2
  GB_REPLACE="" GB_CGO=0 GB_TAGS="no_btrfs no_devmapper no_zfs urfave_cli_no_docs" \
    GB_LDFLAGS="-X $p/version.Version=v$CONTAINERD_VERSION -X $p/version.Revision=v$CONTAINERD_VERSION -X $p/version.Package=github.com/containerd/containerd/v2" \
    go_build_part "$OPT/containerd-$CONTAINERD_VERSION" "$p" "$CONTAINERD_VERSION" \
    "$p/cmd/containerd" "$p/cmd/containerd-shim-runc-v2" "$p/cmd/ctr"
}

build_runc() { # cgo, with libseccomp
  [ -f "$OPT/runc-$RUNC_VERSION/.complete" ] && return 0
  apt_install gcc libc6-dev pkg-config libseccomp-dev
  GB_REPLACE="" GB_CGO=1 GB_TAGS="seccomp urfave_cli_no_docs" \
    GB_LDFLAGS="-X main.version=$RUNC_VERSION -X main.gitCommit=v$RUNC_VERSION" \
    go_build_part "$OPT/runc-$RUNC_VERSION" github.com/opencontainers/runc "$RUNC_VERSION" github.com/opencontainers/runc
}

build_cni_plugins() {
  local p=github.com/containernetworking/plugins
  GB_REPLACE="" GB_CGO=0 GB_TAGS="" GB_LDFLAGS="-X $p/pkg/utils/buildversion.BuildVersion=v$CNI_PLUGINS_VERSION" \
    go_build_part "$OPT/cni-plugins-$CNI_PLUGINS_VERSION" "$p" "$CNI_PLUGINS_VERSION" \
    "$p/plugins/main/bridge" "$p/plugins/main/loopback" "$p/plugins/ipam/host-local" "$p/plugins/meta/portmap"
}

# The source of k8s.io/kubernetes at version $1 (the pause container's C file lives there).
kubernetes_source() { # version
  local dir
  dir=$(timeout 600 go mod download -json "k8s.io/kubernetes@v$1" 2>/dev/null | sed -n 's/.*"Dir": *"\([^"]*\)".*/\1/p')
  [ -d "$dir" ] || die "k8s.io/kubernetes@v$1 has no source directory in the Go module cache"
  printf '%s\n' "$dir"
}
