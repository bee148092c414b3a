#!/usr/bin/env bash
# Runs every check and test. Installs what they need first (Debian packages, a cached Python
# venv), so it works on a fresh Debian machine: this is the command CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

apt_install redis-server redis-tools python3-venv ca-certificates
MCP_TEST_PYTHON="$(python_venv tests/requirements.txt)"
export MCP_TEST_PYTHON

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
log "cargo test"
cargo test --locked
