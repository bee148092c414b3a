#!/usr/bin/env bash
# Builds the test bed's Kubernetes from Go modules: kube-apiserver, kube-controller-manager,
# kube-scheduler, kube-proxy, kubelet and kubectl of one pinned release, etcd 3.6 and the helm
# CLI. Caches the binaries per machine, keyed by the versions, outside the checkout, and prints
# their directory on stdout; a second run finds the cache and prints at once.
#
# k8s.io/kubernetes replaces each of its staging modules (k8s.io/api, k8s.io/apiserver, ...)
# with `v0.0.0` and a path inside its own tree, so `go install k8s.io/kubernetes/cmd/...` is
# refused. A small wrapper module requires k8s.io/kubernetes and replaces each staging module
# with its released v0.X.Y; the list is derived from the release's own go.mod. etcd and helm get
# wrapper modules of their own: their dependencies and Kubernetes' need not agree on versions.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/../../scripts/lib.sh"

# The one place the versions are chosen. 1.35 is the newest minor that runs on containerd 1.x
# and cgroup v1 (docs/testing.md).
KUBERNETES_VERSION="${MCP_TEST_KUBERNETES_VERSION:-v1.35.4}"
ETCD_VERSION="${MCP_TEST_ETCD_VERSION:-v3.6.13}"
HELM_VERSION="${MCP_TEST_HELM_VERSION:-v4.3.2}"

cache="$CACHE_DIR/kubernetes/$KUBERNETES_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION"
binaries=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet kubectl etcd helm)
complete() { for b in "${binaries[@]}"; do [ -x "$cache/$b" ] || return 1; done; }
if complete; then
  echo "$cache"
  exit 0
fi

# The machine's Go (these machines keep it in /usr/local/go; a login shell puts it on PATH).
command -v go >/dev/null || [ ! -x /usr/local/go/bin/go ] || PATH="/usr/local/go/bin:$PATH"
command -v go >/dev/null || die "no Go toolchain on PATH: Kubernetes $KUBERNETES_VERSION needs Go 1.25 or newer"
go_minor="$(go env GOVERSION | sed -n 's/^go1\.\([0-9]*\).*/\1/p')"
[ "${go_minor:-0}" -ge 25 ] || die "$(go env GOVERSION) is too old: Kubernetes $KUBERNETES_VERSION needs Go 1.25 or newer"
# The module and build caches live beside the binaries' cache, outside the checkout.
export GOMODCACHE="$CACHE_DIR/go/mod" GOCACHE="$CACHE_DIR/go/build"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
work="$CACHE_DIR/kubernetes/build"
rm -rf "$work" && mkdir -p "$work" "$cache"

# wrapper DIR MODULE@VERSION : a module in DIR that requires MODULE@VERSION, with the godebug
# default and the replace directives of MODULE's own go.mod (staging modules mapped to their
# releases), and its dependencies resolved.
wrapper() {
  local dir="$1" module="${2%@*}" version="${2#*@}"
  mkdir -p "$dir"
  local gomod
  gomod="$(cd "$dir" && go mod download -json "$module@$version" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')"
  [ -f "$gomod" ] || die "go mod download $module@$version gave no go.mod"
  local go_line godebug
  go_line="$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod")"
  godebug="$(sed -n 's/^godebug \(default=.*\)$/\1/p' "$gomod")"
  {
    echo "module mcp-session-operator.test/$(basename "$dir")"
    echo
    echo "go ${go_line:-1.24}"
    [ -z "$godebug" ] || echo "godebug $godebug"
    echo
    echo "require $module $version"
    # A staging replacement `k8s.io/X => ./staging/src/k8s.io/X` becomes `k8s.io/X => k8s.io/X v0.M.P`.
    local staging_version="v0.${version#v1.}"
    sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => \./staging/src/k8s.io/[a-z0-9-]*$#\1#p' "$gomod" \
      | while read -r staged; do echo "replace $staged => $staged $staging_version"; done
  } >"$dir/go.mod"
  shift 2
  # Each package at the module's version: a bare `go get PACKAGE` would upgrade to the newest.
  (cd "$dir" && go get "${@/%/@$version}" >/dev/null 2>"$dir/get.log") || { cat "$dir/get.log" >&2; die "resolving $module's dependencies in $dir failed"; }
}

# build DIR LDFLAGS PACKAGE... : builds the packages' commands into the cache.
build() {
  local dir="$1" ldflags="$2"
  shift 2
  (cd "$dir" && go build -trimpath -tags selinux,notest -ldflags "$ldflags" -o "$cache/" "$@") 2>&1 \
    | while IFS= read -r line; do printf '  [go build] %s\n' "$line" >&2; done
  return "${PIPESTATUS[0]}"
}

started=$SECONDS
log "building Kubernetes $KUBERNETES_VERSION, etcd $ETCD_VERSION and helm $HELM_VERSION with $(go env GOVERSION) (once per machine)"
k8s_packages=()
for b in kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet kubectl; do
  k8s_packages+=("k8s.io/kubernetes/cmd/$b")
done
wrapper "$work/kubernetes" "k8s.io/kubernetes@$KUBERNETES_VERSION" "${k8s_packages[@]}"
minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
version_flags=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  version_flags+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  version_flags+=" -X $p.gitTreeState=clean"
done
build "$work/kubernetes" "-s -w$version_flags" "${k8s_packages[@]}" || die "building Kubernetes failed (see the [go build] lines above)"

wrapper "$work/etcd" "go.etcd.io/etcd/server/v3@$ETCD_VERSION" go.etcd.io/etcd/server/v3
build "$work/etcd" "-s -w" go.etcd.io/etcd/server/v3 || die "building etcd failed"
mv "$cache/server" "$cache/etcd"

wrapper "$work/helm" "helm.sh/helm/v4@$HELM_VERSION" helm.sh/helm/v4/cmd/helm
build "$work/helm" "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" helm.sh/helm/v4/cmd/helm \
  || die "building helm failed"

rm -rf "$work"
complete || die "the build left $cache without one of: ${binaries[*]}"
log "built in $((SECONDS - started)) s, cached in $cache"
echo "$cache"
