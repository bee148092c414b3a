"""A Python SDK client of `server-everything`, the twin of ts/everything-client.mjs: it subscribes
to a resource, calls `echo` every INTERVAL seconds and, in each epoch, runs a long operation
that reports progress. It prints a line per `echo` call (`ok N` or `error ...`), then one JSON
line that reports calls, errors, session ids, resource updates per epoch and whether any progress
went backwards.

    python everything_client.py URL SECONDS INTERVAL_SECONDS

With MCP_TEST_STOP_FILE set, it stops as soon as that file exists (SECONDS still bounds the run).

MCP_TEST_EPOCH_FILE: see ts/everything-client.mjs (a restarted server-everything forgets its
per-process update toggle, so the client asks again each epoch; the subscription is the proxy's
to replay).
"""

import asyncio
import json
import os
import sys
import time

import httpx2
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client

RESOURCE = "demo://resource/static/document/architecture.md"


def describe(error: BaseException) -> str:
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(describe(inner) for inner in error.exceptions)
    return f"{type(error).__name__}: {error}"


def stopped(deadline: float) -> bool:
    stop_file = os.environ.get("MCP_TEST_STOP_FILE")
    return time.monotonic() >= deadline or bool(stop_file and os.path.exists(stop_file))


def epoch() -> int:
    path = os.environ.get("MCP_TEST_EPOCH_FILE")
    try:
        with open(path or "", encoding="utf-8") as file:
            return int(file.read().strip() or 0)
    except (OSError, ValueError):
        return 0


async def main() -> None:
    url, seconds, interval = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    calls, errors, session_ids = 0, [], set()
    updates: dict[int, int] = {}
    progress = {"runs": 0, "completed": 0, "backwards": 0, "notifications": 0}
    current = -1

    async def on_message(message) -> None:
        inner = getattr(message, "root", message)
        if getattr(inner, "method", None) == "notifications/resources/updated":
            params = getattr(inner, "params", None)
            if getattr(params, "uri", None) == RESOURCE and current >= 0:
                updates[current] = updates.get(current, 0) + 1

    async def record_session(response: httpx2.Response) -> None:
        if sid := response.headers.get("mcp-session-id"):
            session_ids.add(sid)

    async def long_run(client: Client) -> None:
        progress["runs"] += 1
        last = 0.0

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            nonlocal last
            progress["notifications"] += 1
            if value <= last:
                progress["backwards"] += 1
            last = value

        try:
            await client.call_tool(
                "trigger-long-running-operation", {"duration": 1.5, "steps": 6}, progress_callback=on_progress
            )
            progress["completed"] += 1
        except Exception as error:  # noqa: BLE001 - every failure is what the test counts
            errors.append(f"long operation: {describe(error)}")

    http = httpx2.AsyncClient(timeout=httpx2.Timeout(60.0), event_hooks={"response": [record_session]})
    long_runs = []
    try:
        async with Client(streamable_http_client(url, http_client=http), mode="legacy", message_handler=on_message) as client:
            await client.list_tools()
            await client.subscribe_resource(RESOURCE)
            deadline = time.monotonic() + seconds
            while not stopped(deadline):
                if epoch() != current:
                    current = epoch()
                    updates.setdefault(current, 0)
                    try:
                        await client.call_tool("toggle-subscriber-updates", {})
                    except Exception as error:  # noqa: BLE001
                        errors.append(f"toggle: {describe(error)}")
                    long_runs.append(asyncio.create_task(long_run(client)))
                failure = None
                try:
                    result = await client.call_tool("echo", {"message": f"m{calls}"})
                    if f"m{calls}" not in json.dumps(result.model_dump(mode="json")):
                        failure = f"wrong result: {result}"
                except Exception as error:  # noqa: BLE001
                    failure = describe(error)
                calls += 1
                if failure:
                    errors.append(failure)
                print(f"error {failure}" if failure else f"ok {calls}", flush=True)
                await asyncio.sleep(interval)
            await asyncio.gather(*long_runs)
    except Exception as error:  # noqa: BLE001
        errors.append(f"client crashed: {describe(error)}")
    per_epoch = [updates.get(n, 0) for n in range(max(updates, default=-1) + 1)]
    report = {"calls": calls, "errors": errors, "session_ids": sorted(session_ids), "updates_per_epoch": per_epoch, "progress": progress}
    print(json.dumps(report), flush=True)


asyncio.run(main())
