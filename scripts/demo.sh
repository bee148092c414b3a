#!/usr/bin/env bash
# The main job: an MCP server restarted twice while a real MCP client calls a tool, once talking
# to the server directly and once through mcp-session-operator's proxy (embedded store: no
# cluster, no Redis). Prints what the client saw each time.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

apt_install python3-venv ca-certificates
PYTHON="$(python_venv tests/requirements.txt)"
log "building mcp-session-operator"
cargo build --locked --quiet
bin="$PWD/target/debug/mcp-session-operator"

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
server_port="$(free_port)"; proxy_port="$(free_port)"; admin_port="$(free_port)"
work="$(mktemp -d)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

start_server() {
  "$PYTHON" tests/mcp/server.py "$server_port" >"$work/server.log" 2>&1 &
  server_pid=$!
  pids+=("$server_pid")
}
restart_server() {
  kill "-$1" "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  start_server
}
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; die "nothing listens on port $1"; }

# run LABEL URL: 10 s of calls every 50 ms, each taking 20 ms in the server; the server is
# stopped (SIGTERM after call 40, SIGKILL after call 80: calls in flight die with it) and
# started again at once.
run() {
  local label="$1" url="$2" line summary=""
  printf '\n\033[1m%s\033[0m\n' "$label" >&2
  while IFS= read -r line; do
    case "$line" in
      "ok 40") printf '\r  %-60s\n' "after call 40: SIGTERM to the MCP server, started again" >&2; restart_server TERM ;;
      "ok 80") printf '\r  %-60s\n' "after call 80: SIGKILL to the MCP server, started again" >&2; restart_server KILL ;;
      ok\ *) printf '\r  %s calls ok' "${line#ok }" >&2 ;;
      error\ *) printf '\r  \033[31m%s\033[0m\n' "${line:0:100}" >&2 ;;
      \{*) summary="$line" ;;
    esac
  done < <(MCP_TEST_TOOL_DELAY=0.02 "$PYTHON" tests/mcp/client.py "$url" 10 0.05)
  printf '\r%-70s\r' '' >&2
  echo "$summary"
}

start_server; wait_port "$server_port"
# Not in $(...): a subshell would restart servers the script then loses track of.
run "1. The Python MCP SDK client talks to the server directly" "http://127.0.0.1:$server_port/mcp" >"$work/direct.json"

"$bin" proxy --listen "127.0.0.1:$proxy_port" --upstream "http://127.0.0.1:$server_port" \
  --admin-addr "127.0.0.1:$admin_port" >"$work/proxy.log" 2>&1 &
pids+=("$!")
wait_port "$server_port"; wait_port "$proxy_port"
run "2. The same client through mcp-session-operator proxy" "http://127.0.0.1:$proxy_port/mcp" >"$work/proxied.json"

metrics="$("$PYTHON" -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())' "http://127.0.0.1:$admin_port/metrics")"
"$PYTHON" - "$(cat "$work/direct.json")" "$(cat "$work/proxied.json")" "$metrics" <<'PY'
import json, sys
rows = [("directly", json.loads(sys.argv[1])), ("through the proxy", json.loads(sys.argv[2]))]
def metric(name):
    return sum(float(line.split()[-1]) for line in sys.argv[3].splitlines() if line.startswith(name))
print("\nMCP server restarted twice while the client called a tool every 50 ms:\n")
print(f"  {'':<20}{'calls':>7}{'errors':>8}{'session ids':>13}{'slowest call':>14}")
for label, run in rows:
    print(f"  {label:<20}{run['calls']:>7}{len(run['errors']):>8}{len(run['session_ids']):>13}{run['slowest_call_seconds']:>12.2f} s")
direct = rows[0][1]
if direct["errors"]:
    print(f"\n  without the proxy the client saw: {direct['errors'][0][:110]}")
held, replays = metric("mcp_proxy_held_requests_total"), metric('mcp_proxy_replays_total{outcome="replayed"}')
resent = metric('mcp_proxy_unanswered_requests_total{outcome="resent"}')
print(f"\n  through the proxy: {held:.0f} requests held while the server was down, {resent:.0f} lost with it and")
print(f"  sent again (the tool is read-only), the session's handshake replayed {replays:.0f} times to the")
print(f"  new server process; the client noticed nothing.")
PY
