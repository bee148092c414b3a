"""A real MCP server (the `mcp` SDK's MCPServer, stateful) for the proxy tests.

    python server.py PORT [--json] [--sse] [--host HOST] [--refuse-initialize]

Streamable HTTP at /mcp by default; `--sse` serves the 2024-11-05 HTTP+SSE transport instead
(`GET /sse`, `POST /messages/?session_id=...`). `--host` binds another address than 127.0.0.1
(a test pod's IP). `--refuse-initialize` makes a broken new version: every `initialize` is
answered with a JSON-RPC error, so sessions stored by the previous version cannot be replayed
to it. With MCP_TEST_SICK_FILE set, `GET /livez` answers 503 once that file exists (a
liveness probe to fail). Tools:
- `add(a, b, delay=0)`: the main tool, without annotations, as most real tools are: a proxy
  may never run it twice, so a restart costs no call only if it is signalled (quiesced) first;
- `add_read_only(a, b, delay=0)`: the same, annotated read-only, the special case a proxy may
  run again if a restart loses its answer;
- `record(note, delay=0)`: has an effect (appends to a log, returns the log's length), carries no
  annotation, so a proxy must never run it twice;
- `repeat(text, times)`: returns `text` repeated: a large result, as a file-reading tool gives;
- `notify()`: sends `notifications/resources/list_changed`, which travels on the session's
  listening (GET) stream;
- `count(a=0, b=0, delay=0)`: state kept in memory per session, as a browser, a kernel or a
  shell keeps it: returns how many times this session has called it, here. A session replayed
  to another process starts again at 1.
"""

import asyncio
import json
import os
import sys

import uvicorn

from mcp.server.mcpserver import Context, MCPServer
from mcp_types import ToolAnnotations

server = MCPServer("proxy-test-server", log_level="WARNING")
notes: list[str] = []
# `count`'s state: calls per session (by the id this process gave it), in this process only.
counts: dict[str, int] = {}


def log_call(what: str, a) -> None:
    """Appends `WHAT A` to MCP_TEST_CALL_LOG, if set: the `add` calls this server (any of its
    processes) received (`received`) and began to run (`began`)."""
    path = os.environ.get("MCP_TEST_CALL_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{what} {a}\n")


@server.tool()
async def add(a: int, b: int, delay: float = 0) -> int:
    """Adds two numbers, after `delay` seconds."""
    log_call("began", a)
    if delay:
        await asyncio.sleep(delay)
    return a + b


@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
async def add_read_only(a: int, b: int, delay: float = 0) -> int:
    """Adds two numbers, after `delay` seconds; declared read-only."""
    if delay:
        await asyncio.sleep(delay)
    return a + b


@server.tool()
async def record(note: str, delay: float = 0) -> int:
    """Appends a note to this process's log; returns how many notes it holds."""
    if delay:
        await asyncio.sleep(delay)
    notes.append(note)
    return len(notes)


@server.tool()
async def count(ctx: Context, a: int = 0, b: int = 0, delay: float = 0) -> int:
    """Counts this session's calls of this tool; `a` and `b` are ignored (clients that call
    `add` call this the same way, and expect `a + b`: the count, while the state lives)."""
    if delay:
        await asyncio.sleep(delay)
    request = ctx.request_context.request
    key = request.headers.get("mcp-session-id", "") if request is not None else ""
    counts[key] = counts.get(key, 0) + 1
    return counts[key]


@server.tool()
async def repeat(text: str, times: int) -> str:
    """Returns `text` repeated `times` times."""
    return text * times


@server.tool()
async def notify(ctx: Context) -> str:
    """Tells the client the resource list changed (on its listening stream)."""
    await ctx.session.send_resource_list_changed()
    return "sent"


async def read_json(receive):
    """The JSON body of a request (or None), and a `receive` that hands the app the body again."""
    messages, body, more = [], b"", True
    while more:
        message = await receive()
        messages.append(message)
        body += message.get("body", b"")
        more = message.get("more_body", False)
    try:
        request = json.loads(body)
    except ValueError:
        request = None
    pending = iter(messages)

    async def replayed():
        return next(pending, None) or await receive()

    return (request if isinstance(request, dict) else None), replayed


def refusing_initialize(app):
    """Wraps an ASGI app so that it answers every `initialize` with a JSON-RPC error."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await app(scope, receive, send)
        request, replayed = await read_json(receive)
        if request and request.get("method") == "initialize":
            error = {"code": -32602, "message": "this server version refuses these initialize params"}
            answer = json.dumps({"jsonrpc": "2.0", "id": request.get("id"), "error": error}).encode()
            await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": answer})
            return None
        return await app(scope, replayed, send)

    return wrapped


def logging_calls(app):
    """Wraps an ASGI app so that each `add` call is logged as it arrives (`received A`), and
    again if the server refuses it without running it (`refused A`: an unknown session)."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await app(scope, receive, send)
        request, replayed = await read_json(receive)
        params = (request or {}).get("params") or {}
        call = None
        if request and request.get("method") == "tools/call" and params.get("name") == "add":
            call = (params.get("arguments") or {}).get("a")
            log_call("received", call)

        async def watched(message):
            if call is not None and message["type"] == "http.response.start" and message["status"] in (400, 404):
                log_call("refused", call)
            await send(message)

        return await app(scope, replayed, watched)

    return wrapped


def liveness(app, sick_file: str):
    """Wraps an ASGI app with a liveness endpoint, `GET /livez`: 200 until `sick_file` exists,
    then 503, so that a test fails the server's liveness probe from inside its container."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/livez":
            return await app(scope, receive, send)
        status = 503 if os.path.exists(sick_file) else 200
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"sick\n" if status == 503 else b"ok\n"})
        return None

    return wrapped


def option(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


if __name__ == "__main__":
    port = int(sys.argv[1])
    host = option("--host", "127.0.0.1")
    if "--sse" in sys.argv:
        server.run(transport="sse", host=host, port=port)
    else:
        app = server.streamable_http_app(host=host, json_response="--json" in sys.argv)
        if "--refuse-initialize" in sys.argv:
            app = refusing_initialize(app)
        if os.environ.get("MCP_TEST_CALL_LOG"):
            app = logging_calls(app)
        if os.environ.get("MCP_TEST_SICK_FILE"):
            app = liveness(app, os.environ["MCP_TEST_SICK_FILE"])
        uvicorn.run(app, host=host, port=port, log_level="warning")
