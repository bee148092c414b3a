#!/usr/bin/env bash
# The main job: a developer edits an MCP server twice while a real MCP client (the Python SDK's,
# as Cursor or Claude would be) calls its tool every 50 ms. The tool has no annotations, as most
# real tools do. First the server runs on its own and the edits restart it the usual way (stop,
# start); then it runs under `mcp-session-operator dev`, which restarts it on each edit behind
# its session proxy (embedded store: no cluster, no Redis). Prints what the client saw each time.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

apt_install python3-venv ca-certificates
PYTHON="$(python_venv tests/requirements.txt)"
log "building mcp-session-operator"
cargo build --locked --quiet
bin="$PWD/target/debug/mcp-session-operator"

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
server_port="$(free_port)"; dev_port="$(free_port)"
work="$(mktemp -d)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# The developer's server: a copy they edit.
cp tests/mcp/server.py "$work/server.py"
edit() { printf '\n# edited at %s\n' "$(date +%T.%N)" >>"$work/server.py"; }

start_server() {
  "$PYTHON" "$work/server.py" "$server_port" >"$work/server.log" 2>&1 &
  server_pid=$!
  pids+=("$server_pid")
}
# What a reload tool does on an edit: stop the old process, start the new one.
reload_server() {
  edit
  kill -TERM "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  start_server
}
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; die "nothing listens on port $1"; }

# run LABEL URL ON_EDIT: 10 s of calls every 50 ms, each taking 20 ms in the server; the source
# is edited after calls 40 and 80 (ON_EDIT is what follows an edit).
run() {
  local label="$1" url="$2" on_edit="$3" line summary=""
  printf '\n\033[1m%s\033[0m\n' "$label" >&2
  while IFS= read -r line; do
    case "$line" in
      "ok 40" | "ok 80") printf '\r  %-60s\n' "after call ${line#ok }: server.py edited" >&2; "$on_edit" ;;
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
run "1. The Python MCP SDK client talks to the server; each edit restarts it" \
  "http://127.0.0.1:$server_port/mcp" reload_server >"$work/direct.json"
kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true

"$bin" dev --listen "127.0.0.1:$dev_port" --watch "$work/server.py" -- \
  "$PYTHON" "$work/server.py" '{port}' >"$work/dev.log" 2>&1 &
pids+=("$!")
wait_port "$dev_port"
run "2. The same client and server under mcp-session-operator dev" \
  "http://127.0.0.1:$dev_port/mcp" edit >"$work/dev.json"
sleep 1

"$PYTHON" - "$(cat "$work/direct.json")" "$(cat "$work/dev.json")" "$work/dev.log" <<'PY'
import json, re, sys
rows = [("restarted directly", json.loads(sys.argv[1])), ("under dev", json.loads(sys.argv[2]))]
print("\nserver.py edited twice while the client called an unannotated tool every 50 ms:\n")
print(f"  {'':<20}{'calls':>7}{'errors':>8}{'session ids':>13}{'slowest call':>14}")
for label, run in rows:
    print(f"  {label:<20}{run['calls']:>7}{len(run['errors']):>8}{len(run['session_ids']):>13}{run['slowest_call_seconds']:>12.2f} s")
direct = rows[0][1]
if direct["errors"]:
    print(f"\n  restarted directly, the client saw: {direct['errors'][0][:110]}")
restarts = [line for line in open(sys.argv[3], encoding="utf-8") if "MCP server restarted" in line]
print(f"\n  under dev, {len(restarts)} restarts:")
for line in restarts:
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    print(f"    restart {fields.get('restart')}: the server answered again after {fields.get('total_seconds')} s,"
          f" {fields.get('held')} requests held meanwhile")
print("  each quiesced first (calls in progress finished, new ones held), then the session's")
print("  handshake replayed to the new process: the client noticed nothing.")
PY
