"""A real MCP client (the `mcp` SDK's Client, handshake mode) that lists the tools, as every
client does, then calls `add` repeatedly and reports what it saw: a line per call (`ok N` or
`error ...`), then a JSON summary. MCP_TEST_TOOL_DELAY (seconds) makes each call take that long
on the server.

    python client.py URL SECONDS [INTERVAL_SECONDS] [AUTHORIZATION]

A URL ending in /sse speaks the 2024-11-05 HTTP+SSE transport; any other, Streamable HTTP.

The per-call lines let a test restart the server between two calls.
"""

import asyncio
import json
import os
import sys
import time

import httpx2
from mcp.client.client import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client


async def main() -> None:
    url, seconds = sys.argv[1], float(sys.argv[2])
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.05
    headers = {"Authorization": sys.argv[4]} if len(sys.argv) > 4 else {}
    delay = float(os.environ.get("MCP_TEST_TOOL_DELAY", "0"))
    calls, errors, session_ids, slowest = 0, [], set(), 0.0

    async def record_session(response: httpx2.Response) -> None:
        if sid := response.headers.get("mcp-session-id"):
            session_ids.add(sid)

    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(60.0), event_hooks={"response": [record_session]})
    try:
        if url.endswith("/sse"):
            transport = sse_client(url, headers=headers, on_session_created=session_ids.add)
        else:
            transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode="legacy") as client:
            await client.list_tools()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                failure = None
                started = time.monotonic()
                try:
                    result = await client.call_tool("add", {"a": calls, "b": 1, "delay": delay})
                    if result.is_error:
                        failure = f"tool error: {result.content}"
                    elif str(calls + 1) not in json.dumps(result.model_dump(mode="json")):
                        failure = f"wrong result: {result}"
                except Exception as error:  # noqa: BLE001 - every failure is what the test counts
                    failure = f"{type(error).__name__}: {error}"
                slowest = max(slowest, time.monotonic() - started)
                calls += 1
                if failure:
                    errors.append(failure)
                print(f"error {failure}" if failure else f"ok {calls}", flush=True)
                await asyncio.sleep(interval)
    except Exception as error:  # noqa: BLE001
        errors.append(f"client crashed: {type(error).__name__}: {error}")
    print(json.dumps({"calls": calls, "errors": errors, "session_ids": sorted(session_ids), "slowest_call_seconds": round(slowest, 3)}))


asyncio.run(main())
