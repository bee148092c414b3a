#!/usr/bin/env bash
# Runs every check and test. Installs what they need first (Debian packages, a cached Python
# venv), so it works on a fresh Debian machine: this is the command CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

# Commit messages as CONTRIBUTING.md asks for them, in a checkout of this repository.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git config core.hooksPath scripts/hooks
fi
apt_install redis-server redis-tools python3-venv ca-certificates
# The real node (tests/support/node.rs): containerd, runc, the CNI plugins, busybox-static for
# the sandbox image, binutils to strip the image's binary, iproute2 for the pod bridge.
apt_install containerd runc containernetworking-plugins busybox-static binutils iproute2
MCP_TEST_PYTHON="$(python_venv tests/requirements.txt)"
# The TypeScript SDK peers, installed beside their scripts (node resolves imports from there).
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
log "npm ci (tests/mcp/ts: @modelcontextprotocol/sdk)"
npm ci --prefix tests/mcp/ts --no-audit --no-fund --loglevel=error >/dev/null || die "npm ci in tests/mcp/ts failed"
# Kubernetes 1.35 (control plane, kubelet, kubectl), etcd 3.6 and helm v4, built once per machine
# from Go modules with the machine's Go (cached outside the checkout).
MCP_TEST_KUBE_BIN="$(bash tests/cluster/build.sh)"
export MCP_TEST_PYTHON MCP_TEST_KUBE_BIN

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
log "cargo test"
cargo test --locked
