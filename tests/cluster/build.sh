#!/usr/bin/env bash
# Builds the test control plane from Debian's `kubernetes` source package (1.20, vendored Go
# dependencies, builds offline): kube-apiserver and kube-controller-manager, CGO_ENABLED=0.
# Installs what it needs (golang-go, rsync, etcd-server, dpkg-dev, the fixed reflect2), caches
# the binaries outside the checkout keyed by the source version, and prints their directory on
# stdout. A second run finds the cache and prints at once.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/../../scripts/lib.sh"

[ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null || die "run as root (or with sudo): it installs Debian packages"
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"

# 1. A deb-src entry, derived from the machine's own Debian source list.
ensure_deb_src() {
  if grep -rqsE '^(deb-src|Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    return 0
  fi
  log "adding deb-src entries derived from the Debian source list"
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed -E 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
      | $sudo tee /etc/apt/sources.list.d/debian-src.sources >/dev/null
  elif [ -f /etc/apt/sources.list ] && grep -qE '^deb ' /etc/apt/sources.list; then
    grep -E '^deb ' /etc/apt/sources.list | sed -E 's/^deb /deb-src /' \
      | $sudo tee /etc/apt/sources.list.d/debian-src.list >/dev/null
  else
    die "no Debian source list found to derive a deb-src entry from"
  fi
  $sudo apt-get update -qq || die "apt-get update failed after adding deb-src"
}

ensure_deb_src
apt_install golang-go rsync etcd-server dpkg-dev golang-github-modern-go-reflect2-dev ca-certificates

version="$(apt-cache showsrc kubernetes 2>/dev/null | sed -n 's/^Version: //p' | sort -V | tail -n 1)"
[ -n "$version" ] || die "Debian has no 'kubernetes' source package here (apt-cache showsrc kubernetes)"
cache="$CACHE_DIR/kubernetes/$version"
if [ -x "$cache/kube-apiserver" ] && [ -x "$cache/kube-controller-manager" ]; then
  echo "$cache"
  exit 0
fi

work="$CACHE_DIR/kubernetes/build-$version"
log "building kube-apiserver and kube-controller-manager $version in $work (a few minutes, once per machine)"
rm -rf "$work" && mkdir -p "$work"
(cd "$work" && apt-get source --download-only kubernetes="$version" >/dev/null 2>&1) \
  || die "apt-get source kubernetes=$version failed"
(cd "$work" && dpkg-source --no-check -x ./*.dsc src >/dev/null) || die "unpacking the kubernetes source failed"
tree="$work/src"

# Vendored reflect2 1.0.1 faults under Go >= 1.18 (fatal error in reflect.mapiterinit as soon as
# the apiserver encodes a map): replace it with Debian's fixed 1.0.2.
fixed=/usr/share/gocode/src/github.com/modern-go/reflect2
[ -d "$fixed" ] || die "golang-github-modern-go-reflect2-dev did not install $fixed"
rsync -a --delete --exclude '*_test.go' "$fixed/" "$tree/vendor/github.com/modern-go/reflect2/"

mkdir -p "$work/.go/src/k8s.io"
ln -sfn "$tree" "$work/.go/src/k8s.io/kubernetes"
log "make WHAT='cmd/kube-apiserver cmd/kube-controller-manager' (go $(go env GOVERSION))"
(
  cd "$work/.go/src/k8s.io/kubernetes"
  export GOPATH="$work/.go" GO111MODULE=off CGO_ENABLED=0 GOFLAGS=-mod=vendor GOCACHE="$work/.gocache"
  export KUBE_GIT_VERSION="v${version%%[-+]*}" KUBE_GIT_TREE_STATE=clean
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" 2>&1 \
    | while IFS= read -r line; do printf '  [make] %s\n' "$line" >&2; done
  exit "${PIPESTATUS[0]}"
) || die "building kubernetes failed (see the [make] lines above)"

out="$(find "$tree/_output" -type f -name kube-apiserver -path '*bin*' | head -n 1)"
[ -n "$out" ] || die "the build produced no kube-apiserver under $tree/_output"
mkdir -p "$cache"
cp "$(dirname "$out")/kube-apiserver" "$(dirname "$out")/kube-controller-manager" "$cache/"
rm -rf "$work"
log "cached in $cache"
echo "$cache"
