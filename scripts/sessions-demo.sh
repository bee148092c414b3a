#!/usr/bin/env bash
# The main job, for now: a throwaway redis-server holding sessions as the seed's Python backend
# writes them, inspected and managed with `mcp-session-operator sessions`. Needs no cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

apt_install redis-server redis-tools
log "building mcp-session-operator"
cargo build --locked --quiet
bin="$PWD/target/debug/mcp-session-operator"

workdir="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
redis-server --port "$port" --bind 127.0.0.1 --save "" --dir "$workdir" --daemonize yes \
  --pidfile "$workdir/redis.pid" --logfile "$workdir/redis.log" \
  --maxmemory 100mb --maxmemory-policy volatile-lru
cleanup() { redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$workdir"; }
trap cleanup EXIT
export MCP_SESSION_REDIS_URL="redis://127.0.0.1:$port/0"

log "a throwaway Redis on $MCP_SESSION_REDIS_URL, with sessions as the seed's backend writes them"
now="$(date -u +%Y-%m-%dT%H:%M:%S.000000)"
record() { # id user [extra JSON fields]
  printf '{"connection_id": "%s", "created_at": "%s", "last_activity_at": "%s", "metadata": {"user_id": "%s"}%s}' \
    "$1" "$now" "$now" "$2" "${3:-}"
}
redis-cli -p "$port" SET "mcp:session:a1b2c3d4-e5f6-7890-abcd-ef1234567890" "$(record a1b2c3d4-e5f6-7890-abcd-ef1234567890 user-123)" EX 86400 >/dev/null
redis-cli -p "$port" SET "mcp:session:test-session-123" "$(record test-session-123 user-456 ', "state": "active", "owner_pod": "intracker-backend-7d9f-abcde"')" EX 3600 >/dev/null
redis-cli -p "$port" SET "mcp:session:draining-1" "$(record draining-1 user-789 ', "state": "draining"')" EX 600 >/dev/null
redis-cli -p "$port" SET "mcp:session:corrupted" '{"connection_id": "corrupted", "created_at": ' >/dev/null

run() { printf '\n\033[1m$ mcp-session-operator %s\033[0m\n' "$*"; "$bin" "$@"; }
run sessions list
run sessions list --state draining -o json
run sessions get test-session-123
run sessions stats
run sessions delete draining-1
run sessions list
printf '\n\033[1m$ mcp-session-operator sessions get "bad id*"   # a hostile id is refused\033[0m\n'
"$bin" sessions get "bad id*" || echo "(exit code $?)"
