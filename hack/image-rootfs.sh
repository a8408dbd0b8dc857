#!/usr/bin/env bash
# Lay out the root filesystem of keyward's container image, the one thing both image
# builds share: the Dockerfile runs it in its build stage (and copies the result onto
# `scratch`), hack/image.sh runs it here (and packs the result with umoci).
#
#   hack/image-rootfs.sh <keyward binary> <rootfs dir>
#
# The rootfs holds exactly:
#   /usr/local/bin/keyward              the binary, its symbols stripped
#   every shared library `ldd` says the binary links, and the dynamic loader, at the
#   paths ldd prints (the loader at the binary's ELF interpreter path)
#   /etc/passwd, /etc/group             root and the non-root user nonroot (65532:65532)
#   /etc/nsswitch.conf                  `hosts: files dns`, so /etc/hosts comes first
#   /etc/ssl/certs/ca-certificates.crt  the CA bundle, for outgoing webhooks (rustls
#                                       with the platform's roots)
#   /tmp                                1777, for anything that wants a temp dir
# and nothing else (no shell, no home: nonroot's home is /nonexistent, as Debian does
# for users without one).
# Every mtime is SOURCE_DATE_EPOCH (default 0), so the same binary gives the same
# layer. The user, entrypoint and labels are declared once, in the Dockerfile; hack/
# image.sh reads them from there, and tests/image.rs checks both agree with this file.
set -euo pipefail

# Declarations that tests/image.rs compares with the Dockerfile's USER and ENTRYPOINT.
NONROOT_UID=65532
NONROOT_GID=65532
NONROOT_NAME=nonroot
BIN_PATH=/usr/local/bin/keyward
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

die() { printf 'image-rootfs: error: %s\n' "$*" >&2; exit 1; }

[ $# -eq 2 ] || die "usage: $0 <keyward binary> <rootfs dir>"
bin=$1
root=$2
if ! [ -f "$bin" ] || ! [ -x "$bin" ]; then die "$bin is not an executable file"; fi
if [ -e "$root" ] && [ -n "$(ls -A "$root")" ]; then die "$root exists and is not empty"; fi
command -v ldd >/dev/null || die "ldd is required (Debian: libc-bin)"
command -v strip >/dev/null || die "strip is required (Debian: binutils)"
[ -f "$CA_BUNDLE" ] || die "$CA_BUNDLE is missing (Debian: ca-certificates)"

mkdir -p "$root"
root=$(cd "$root" && pwd)

# `install_file SRC DEST MODE`: copy SRC (following symlinks) to $root/DEST.
install_file() {
  mkdir -p "$root$(dirname "$2")"
  cp -L "$1" "$root$2"
  chmod "$3" "$root$2"
}

# The binary.
install_file "$bin" "$BIN_PATH" 0755
strip --strip-all "$root$BIN_PATH"

# Its shared libraries, as ldd resolves them here: `name => /path (addr)` lines, plus
# the loader's own `/path (addr)` line; linux-vdso has no file. A statically linked
# binary prints "not a dynamic executable" / "statically linked" and needs none.
ldd_out=$(ldd "$bin" 2>&1) || ldd_out=""
if grep -q 'not found' <<<"$ldd_out"; then die "ldd: a library is missing: $ldd_out"; fi
while read -r lib; do
  [ -n "$lib" ] || continue
  install_file "$lib" "$lib" 0755
done < <(sed -n -e 's/^[[:space:]]*[^[:space:]]* => \(\/[^[:space:]]*\) (0x[0-9a-f]*)$/\1/p' \
                -e 's/^[[:space:]]*\(\/[^[:space:]]*\) (0x[0-9a-f]*)$/\1/p' <<<"$ldd_out" | sort -u)

# Users and groups: root, and the one the container runs as.
mkdir -p "$root/etc"
cat >"$root/etc/passwd" <<EOF
root:x:0:0:root:/root:/sbin/nologin
$NONROOT_NAME:x:$NONROOT_UID:$NONROOT_GID:$NONROOT_NAME:/nonexistent:/sbin/nologin
EOF
cat >"$root/etc/group" <<EOF
root:x:0:
$NONROOT_NAME:x:$NONROOT_GID:
EOF
# glibc without this file asks DNS before /etc/hosts.
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/nsswitch.conf"

install_file "$CA_BUNDLE" "$CA_BUNDLE" 0644

mkdir -p "$root/tmp"
chmod 1777 "$root/tmp"

# Directories 0755, and one timestamp for everything.
find "$root" -type d ! -path "$root/tmp" -exec chmod 0755 {} +
find "$root" -exec touch -h -d "@${SOURCE_DATE_EPOCH:-0}" {} +
