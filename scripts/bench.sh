#!/usr/bin/env bash
# Runs a benchmark with what it compares against installed first: `scripts/bench.sh proxy`
# (nginx and HAProxy beside the proxy), `store`, `operator`, `gateway` and `drain` (the test
# bed's Kubernetes control plane; the last two its real node too, and `drain` the Python SDK
# server's image), `webhook`. Extra arguments go to the benchmark (`-- --quick` for a short run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

bench="${1:?usage: scripts/bench.sh proxy|store|operator|webhook|gateway|drain [-- --quick]}"
shift
apt_install redis-server redis-tools
case "$bench" in
  proxy) apt_install nginx-light haproxy ;;
  operator | webhook | gateway | drain) MCP_TEST_KUBE_BIN="$(bash tests/cluster/build.sh)"; export MCP_TEST_KUBE_BIN ;;
esac
case "$bench" in
  gateway | drain) apt_install containerd runc containernetworking-plugins busybox-static binutils iproute2 ;;
esac
if [ "$bench" = drain ]; then
  apt_install python3-venv
  MCP_TEST_PYTHON="$(python_venv tests/requirements.txt)"
  export MCP_TEST_PYTHON
fi
# The packaged services stay off: the benchmark starts its own instances on free ports.
exec cargo bench --locked --bench "$bench" "$@"
