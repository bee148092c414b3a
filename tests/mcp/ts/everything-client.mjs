// A TypeScript SDK client of `server-everything`, as a user's client would use it: it subscribes
// to a resource, calls `echo` every INTERVAL seconds and, in each epoch, runs a long operation
// that reports progress. It prints a line per `echo` call (`ok N` or `error ...`), then one JSON
// line: calls, errors, the session ids it saw, the resource updates it got per epoch, and whether
// any progress went backwards.
//     node everything-client.mjs URL SECONDS INTERVAL_SECONDS
// With MCP_TEST_STOP_FILE set, it stops as soon as that file exists (SECONDS still bounds the run).
// MCP_TEST_EPOCH_FILE names a file the test rewrites after each server restart: a restarted
// server-everything has forgotten that this session asked for updates (the per-process toggle
// of its `toggle-subscriber-updates` tool), so the client asks again in each epoch; it is the
// subscription, replayed by the proxy, that decides which resources the updates are for.
import { existsSync, readFileSync } from "node:fs";

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { ResourceUpdatedNotificationSchema } from "@modelcontextprotocol/sdk/types.js";

const [url, seconds, interval] = process.argv.slice(2);
const epochFile = process.env.MCP_TEST_EPOCH_FILE;
const RESOURCE = "demo://resource/static/document/architecture.md";
const stopFile = process.env.MCP_TEST_STOP_FILE;
const stopped = (deadline) => Date.now() >= deadline || (stopFile !== undefined && existsSync(stopFile));
const epoch = () => (epochFile && existsSync(epochFile) ? Number(readFileSync(epochFile, "utf8")) || 0 : 0);
const describe = (error) => `${error?.name}: ${error?.message} at ${new Date().toISOString()}`;

const errors = [];
const sessionIds = new Set();
const updates = [];
const progress = { runs: 0, completed: 0, backwards: 0, notifications: 0 };
let calls = 0;
let current = -1;
const longRuns = [];

async function longRun(client) {
  progress.runs += 1;
  let last = 0;
  try {
    await client.callTool({ name: "trigger-long-running-operation", arguments: { duration: 1.5, steps: 6 } }, undefined, {
      onprogress: ({ progress: value }) => {
        progress.notifications += 1;
        if (value <= last) progress.backwards += 1;
        last = value;
      },
      timeout: 60_000,
    });
    progress.completed += 1;
  } catch (error) {
    errors.push(`long operation: ${describe(error)}`);
  }
}

try {
  const transport = new StreamableHTTPClientTransport(new URL(url));
  const client = new Client({ name: "everything-test-client", version: "1.0.0" });
  client.setNotificationHandler(ResourceUpdatedNotificationSchema, (note) => {
    if (note.params.uri === RESOURCE && current >= 0) updates[current] = (updates[current] ?? 0) + 1;
  });
  await client.connect(transport);
  await client.listTools();
  await client.subscribeResource({ uri: RESOURCE });
  const deadline = Date.now() + Number(seconds) * 1000;
  while (!stopped(deadline)) {
    if (epoch() !== current) {
      current = epoch();
      updates[current] = updates[current] ?? 0;
      try {
        await client.callTool({ name: "toggle-subscriber-updates", arguments: {} });
      } catch (error) {
        errors.push(`toggle: ${describe(error)}`);
      }
      longRuns.push(longRun(client));
    }
    let failure;
    try {
      const result = await client.callTool({ name: "echo", arguments: { message: `m${calls}` } });
      if (!JSON.stringify(result.content).includes(`m${calls}`)) failure = `wrong result: ${JSON.stringify(result)}`;
    } catch (error) {
      failure = describe(error);
    }
    calls += 1;
    if (failure) errors.push(failure);
    console.log(failure ? `error ${failure}` : `ok ${calls}`);
    if (transport.sessionId) sessionIds.add(transport.sessionId);
    await new Promise((resolve) => setTimeout(resolve, Number(interval) * 1000));
  }
  await Promise.all(longRuns);
  await client.close();
} catch (error) {
  errors.push(`client crashed: ${describe(error)}`);
}
const report = { calls, errors, session_ids: [...sessionIds], updates_per_epoch: updates, progress };
process.stdout.write(`${JSON.stringify(report)}\n`, () => process.exit(0));
