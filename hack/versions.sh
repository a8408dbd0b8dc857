# shellcheck shell=bash
# Every version the local cluster is built from, pinned here and nowhere else. Each is a
# Go module taken through the Go module proxy and built by hack/build.sh; a change here
# rebuilds that part on the next `hack/cluster.sh up` (the cache is keyed by version).

# The current release: the newest k8s.io/kubernetes whose modules the proxy serves and
# which builds here with this machine's Go (1.37: docs/development.md).
K8S_VERSION=1.37.2
# The oldest minor keyward supports: the oldest that k8s-openapi 0.29 (kube 5) targets
# (its `v1_33` feature, set in Cargo.toml). Tested as an API server without a node.
K8S_OLDEST_VERSION=1.33.13
ETCD_VERSION=3.6.16
CONTAINERD_VERSION=2.4.2
RUNC_VERSION=1.4.4
CNI_PLUGINS_VERSION=1.10.0
# The Go these modules need at least (containerd 2.4 and the CNI plugins 1.10 ask for it).
GO_MIN_VERSION=1.26.8
# Brought through the Go module proxy when the installed Go is older (Go >= 1.21 can).
GO_TOOLCHAIN_FALLBACK=go1.27.3
