#!/usr/bin/env bash
# Runs a benchmark with what it compares against installed first: `scripts/bench.sh proxy`
# (nginx and HAProxy beside the proxy), `store`, `operator` and `gateway` (the test bed's Kubernetes
# control plane), `webhook`. Extra arguments go to the benchmark (`-- --quick` for a short run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

bench="${1:?usage: scripts/bench.sh proxy|store|operator|webhook|gateway [-- --quick]}"
shift
apt_install redis-server redis-tools
case "$bench" in
  proxy) apt_install nginx-light haproxy ;;
  operator | webhook | gateway) MCP_TEST_KUBE_BIN="$(bash tests/cluster/build.sh)"; export MCP_TEST_KUBE_BIN ;;
esac
# The packaged services stay off: the benchmark starts its own instances on free ports.
exec cargo bench --locked --bench "$bench" "$@"
