"""A real MCP client (the `mcp` SDK's Client, handshake mode) that lists the tools, as every
client does, then calls `add` repeatedly and reports what it saw: a line per call (`ok N` or
`error ...`, an error ending with when its call was sent, `(sent at RFC3339)`), then a JSON
summary (with `ready_seconds`, the time its handshake and tool list took). MCP_TEST_TOOL_DELAY (seconds) makes each call take that long on the server. MCP_TEST_TOOL
names the tool (`add` by default; `add_read_only` is the same tool annotated read-only;
`count` keeps state per session in the server, so each answer must exceed the one before, or
the error is a `state reset`); a comma-separated list gives client i the i-th (cycling) of them.

    python client.py URL SECONDS [INTERVAL_SECONDS] [AUTHORIZATION]

A URL ending in /sse speaks the 2024-11-05 HTTP+SSE transport; any other, Streamable HTTP.

The per-call lines let a test restart the server between two calls.

MCP_TEST_CLIENTS=N runs N such clients at once, each a Client of its own with its own HTTP
connections, session and credential (AUTHORIZATION with `-i` appended); each reports only
`{"called": NAME}` after each call, then its JSON summary. With
MCP_TEST_STOP_FILE set, the clients stop as soon as that file exists (SECONDS still bounds the
run).
"""

import asyncio
import datetime
import json
import os
import sys
import time

import httpx2
from mcp.client.client import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client


def describe(error: BaseException) -> str:
    """The error, or the errors inside an exception group (what a TaskGroup raises)."""
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(describe(inner) for inner in error.exceptions)
    return f"{type(error).__name__}: {error}"


def stopped(deadline: float) -> bool:
    stop_file = os.environ.get("MCP_TEST_STOP_FILE")
    return time.monotonic() >= deadline or bool(stop_file and os.path.exists(stop_file))


async def run_client(url: str, seconds: float, interval: float, authorization: str | None, verbose: bool, tool: str = "add", name: str | None = None) -> dict:
    headers = {"Authorization": authorization} if authorization else {}
    delay = float(os.environ.get("MCP_TEST_TOOL_DELAY", "0"))
    calls, errors, session_ids, slowest, ready = 0, [], set(), 0.0, None
    counted = 0  # the last answer of `count`
    began = time.monotonic()

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
            ready = round(time.monotonic() - began, 3)
            deadline = time.monotonic() + seconds
            while not stopped(deadline):
                failure = None
                started = time.monotonic()
                sent_at = datetime.datetime.now(datetime.timezone.utc)
                try:
                    result = await client.call_tool(tool, {"a": calls, "b": 1, "delay": delay})
                    if result.is_error:
                        failure = f"tool error: {result.content}"
                    elif tool == "count":
                        # Each answer exceeds the last (by more where a failed call ran).
                        answer = int(result.content[0].text)
                        if answer <= counted:
                            failure = f"state reset: answered {answer} after {counted}"
                        counted = answer
                    elif str(calls + 1) not in json.dumps(result.model_dump(mode="json")):
                        failure = f"wrong result: {result}"
                except Exception as error:  # noqa: BLE001 - every failure is what the test counts
                    failure = describe(error)
                slowest = max(slowest, time.monotonic() - started)
                if failure:
                    failure = f"call {calls}: {failure} (sent at {sent_at.isoformat(timespec='milliseconds')})"
                calls += 1
                if name:
                    print(json.dumps({"called": name}), flush=True)
                if failure:
                    errors.append(failure)
                if verbose:
                    print(f"error {failure}" if failure else f"ok {calls}", flush=True)
                await asyncio.sleep(interval)
    except Exception as error:  # noqa: BLE001
        errors.append(f"client crashed: {describe(error)}")
    return {"tool": tool, "calls": calls, "errors": errors, "session_ids": sorted(session_ids), "slowest_call_seconds": round(slowest, 3), "ready_seconds": ready}


async def main() -> None:
    url, seconds = sys.argv[1], float(sys.argv[2])
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.05
    authorization = sys.argv[4] if len(sys.argv) > 4 else None
    clients = int(os.environ.get("MCP_TEST_CLIENTS", "1"))
    tools = os.environ.get("MCP_TEST_TOOL", "add").split(",")
    if clients == 1:
        print(json.dumps(await run_client(url, seconds, interval, authorization, verbose=True, tool=tools[0])))
        return
    summaries = await asyncio.gather(
        *(
            run_client(url, seconds, interval, authorization and f"{authorization}-{i}", verbose=False, tool=tools[i % len(tools)], name=f"python-{i}")
            for i in range(clients)
        )
    )
    for i, summary in enumerate(summaries):
        print(json.dumps({"client": f"python-{i}", **summary}), flush=True)


asyncio.run(main())
