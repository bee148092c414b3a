"""A real MCP server (the `mcp` SDK's MCPServer, stateful) for the proxy tests.

    python server.py PORT [--json] [--sse]

Streamable HTTP at /mcp by default; `--sse` serves the 2024-11-05 HTTP+SSE transport instead
(`GET /sse`, `POST /messages/?session_id=...`). Tools:
- `add(a, b, delay=0)`: a pure function, annotated read-only, so a proxy may run it again if a
  restart loses its answer;
- `record(note, delay=0)`: has an effect (appends to a log, returns the log's length), carries no
  annotation, so a proxy must never run it twice;
- `notify()`: sends `notifications/resources/list_changed`, which travels on the session's
  listening (GET) stream.
"""

import asyncio
import sys

from mcp.server.mcpserver import Context, MCPServer
from mcp_types import ToolAnnotations

server = MCPServer("proxy-test-server", log_level="WARNING")
notes: list[str] = []


@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
async def add(a: int, b: int, delay: float = 0) -> int:
    """Adds two numbers, after `delay` seconds."""
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
async def notify(ctx: Context) -> str:
    """Tells the client the resource list changed (on its listening stream)."""
    await ctx.session.send_resource_list_changed()
    return "sent"


if __name__ == "__main__":
    port = int(sys.argv[1])
    if "--sse" in sys.argv:
        server.run(transport="sse", host="127.0.0.1", port=port)
    else:
        server.run(
            transport="streamable-http",
            host="127.0.0.1",
            port=port,
            json_response="--json" in sys.argv,
        )
