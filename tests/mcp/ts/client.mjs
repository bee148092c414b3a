// A real MCP client (the TypeScript SDK's Client over Streamable HTTP) that lists the tools, as
// every client does, then calls `add` repeatedly: a line per call (`ok N` or `error ...`), then a
// JSON summary (with `ready_seconds`, the time its handshake and tool list took).
// MCP_TEST_TOOL_DELAY (seconds) makes each call take that long on the server.
// MCP_TEST_TOOL names the tool (`add` by default; `add_read_only` is the same tool annotated
// read-only); a comma-separated list gives client i the i-th (cycling) of them.
//     node client.mjs URL SECONDS INTERVAL_SECONDS [AUTHORIZATION]
// MCP_TEST_CLIENTS=N runs N such clients at once, each a Client and transport of its own with its
// own session and credential (AUTHORIZATION with `-i` appended); each reports only
// `{"called": NAME}` after each call, then its JSON summary. With
// MCP_TEST_STOP_FILE set, the clients stop as soon as that file exists (SECONDS still bounds the
// run).
import { existsSync } from "node:fs";

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, seconds, interval, authorization] = process.argv.slice(2);
const delay = Number(process.env.MCP_TEST_TOOL_DELAY ?? 0);
const stopFile = process.env.MCP_TEST_STOP_FILE;
const clients = Number(process.env.MCP_TEST_CLIENTS ?? 1);
const tools = (process.env.MCP_TEST_TOOL ?? "add").split(",");

const stopped = (deadline) => Date.now() >= deadline || (stopFile !== undefined && existsSync(stopFile));

async function runClient(authorization, verbose, tool, name) {
  const headers = authorization ? { Authorization: authorization } : {};
  const errors = [];
  const sessionIds = new Set();
  let calls = 0;
  let counted = 0; // the last answer of `count`
  let slowest = 0;
  let ready = null;
  const began = Date.now();
  try {
    const transport = new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers } });
    const client = new Client({ name: "ts-test-client", version: "1.0.0" });
    await client.connect(transport);
    await client.listTools();
    ready = (Date.now() - began) / 1000;
    const deadline = Date.now() + Number(seconds) * 1000;
    while (!stopped(deadline)) {
      let failure;
      const started = Date.now();
      const sentAt = new Date(started).toISOString();
      try {
        const result = await client.callTool({ name: tool, arguments: { a: calls, b: 1, delay } });
        if (result.isError) failure = `tool error: ${JSON.stringify(result.content)}`;
        else if (tool === "count") {
          // Each answer exceeds the last (by more where a failed call ran).
          const answer = Number(result.content?.[0]?.text);
          if (!(answer > counted)) failure = `state reset: answered ${answer} after ${counted}`;
          counted = answer;
        } else if (result.content?.[0]?.text !== String(calls + 1)) failure = `wrong result: ${JSON.stringify(result)}`;
      } catch (error) {
        const cause = error?.cause ? ` (${error.cause.code ?? ""} ${error.cause.message ?? error.cause})` : "";
        failure = `${error?.name}: ${error?.message}${cause}`;
      }
      slowest = Math.max(slowest, (Date.now() - started) / 1000);
      if (failure) failure = `call ${calls}: ${failure} (sent at ${sentAt})`;
      calls += 1;
      if (name) console.log(JSON.stringify({ called: name }));
      if (transport.sessionId) sessionIds.add(transport.sessionId);
      if (failure) errors.push(failure);
      if (verbose) console.log(failure ? `error ${failure}` : `ok ${calls}`);
      await new Promise((resolve) => setTimeout(resolve, Number(interval) * 1000));
    }
    // A client that is done ends its session (the Python SDK's does so on its own), which is
    // what lets a pod that keeps sessions until they end (drain strategy Wait) go.
    await transport.terminateSession().catch(() => {});
    await client.close();
  } catch (error) {
    errors.push(`client crashed: ${error?.name}: ${error?.message}`);
  }
  return { tool, calls, errors, session_ids: [...sessionIds], slowest_call_seconds: slowest, ready_seconds: ready };
}

let report;
if (clients === 1) {
  report = JSON.stringify(await runClient(authorization, true, tools[0]));
} else {
  const summaries = await Promise.all(
    Array.from({ length: clients }, (_, i) =>
      runClient(authorization && `${authorization}-${i}`, false, tools[i % tools.length], `typescript-${i}`),
    ),
  );
  report = summaries.map((summary, i) => JSON.stringify({ client: `typescript-${i}`, ...summary })).join("\n");
}
// Writes to a pipe are asynchronous: exit (pooled connections would keep node alive) only once
// the report is out, or its tail is lost.
process.stdout.write(`${report}\n`, () => process.exit(0));
