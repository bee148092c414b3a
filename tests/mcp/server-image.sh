#!/usr/bin/env bash
# Builds the test bed's MCP server image, the Python SDK server (tests/mcp/server.py), as an OCI
# image archive: a root of the venv's interpreter, its standard library, the `mcp` SDK with
# what it requires, and the libraries they link (tests/mcp/image_root.py), run as 65532 on
# port 8000. Each NAME:TAG is one image of that root, CMD its server arguments as a JSON list.
# Cached per machine by the inputs' content; prints the archive's path.
#
#   MCP_TEST_PYTHON=... tests/mcp/server-image.sh NAME:TAG CMD [NAME:TAG CMD]...
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh

python="${MCP_TEST_PYTHON:?MCP_TEST_PYTHON names the venv python with the mcp SDK (scripts/test.sh)}"
archive="$({
  cat tests/mcp/image_root.py tests/mcp/server.py scripts/oci-archive.sh "$0"
  "$python" -c 'import sys, importlib.metadata as m; print(sys.version, sys.executable, m.version("mcp"))'
  printf '%s\n' "$@"
} | cached_archive mcp-server)"
if [ -s "$archive" ]; then
  echo "$archive"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log "building the Python MCP server image"
interpreter="$("$python" tests/mcp/image_root.py "$work/rootfs")"
images=()
while [ $# -gt 0 ]; do
  images+=("$(printf '{"User":"65532:65532","ExposedPorts":{"8000/tcp":{}},"Env":["PATH=/opt/python/bin","LD_LIBRARY_PATH=/opt/python/lib","PYTHONDONTWRITEBYTECODE=1","PYTHONUNBUFFERED=1","MCP_TEST_SICK_FILE=/tmp/sick"],"Entrypoint":["%s","/app/server.py"],"Cmd":%s,"WorkingDir":"/app"}' \
    "$interpreter" "$2")" "$1")
  shift 2
done
write_archive "$work/rootfs" "$archive" "${images[@]}"
