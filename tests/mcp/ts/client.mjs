// A real MCP client (the TypeScript SDK's Client over Streamable HTTP) that lists the tools, as
// every client does, then calls `add` repeatedly: a line per call (`ok N` or `error ...`), then a
// JSON summary. MCP_TEST_TOOL_DELAY (seconds) makes each call take that long on the server.
//     node client.mjs URL SECONDS INTERVAL_SECONDS [AUTHORIZATION]
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, seconds, interval, authorization] = process.argv.slice(2);
const headers = authorization ? { Authorization: authorization } : {};
const errors = [];
const sessionIds = new Set();
const delay = Number(process.env.MCP_TEST_TOOL_DELAY ?? 0);
let calls = 0;
let slowest = 0;
try {
  const transport = new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers } });
  const client = new Client({ name: "ts-test-client", version: "1.0.0" });
  await client.connect(transport);
  await client.listTools();
  const deadline = Date.now() + Number(seconds) * 1000;
  while (Date.now() < deadline) {
    let failure;
    const started = Date.now();
    try {
      const result = await client.callTool({ name: "add", arguments: { a: calls, b: 1, delay } });
      if (result.isError) failure = `tool error: ${JSON.stringify(result.content)}`;
      else if (result.content?.[0]?.text !== String(calls + 1)) failure = `wrong result: ${JSON.stringify(result)}`;
    } catch (error) {
      const cause = error?.cause ? ` (${error.cause.code ?? ""} ${error.cause.message ?? error.cause})` : "";
      failure = `${error?.name}: ${error?.message}${cause} at ${new Date().toISOString()}`;
    }
    slowest = Math.max(slowest, (Date.now() - started) / 1000);
    calls += 1;
    if (transport.sessionId) sessionIds.add(transport.sessionId);
    if (failure) errors.push(failure);
    console.log(failure ? `error ${failure}` : `ok ${calls}`);
    await new Promise((resolve) => setTimeout(resolve, Number(interval) * 1000));
  }
  await client.close();
} catch (error) {
  errors.push(`client crashed: ${error?.name}: ${error?.message}`);
}
console.log(JSON.stringify({ calls, errors, session_ids: [...sessionIds], slowest_call_seconds: slowest }));
process.exit(0);
