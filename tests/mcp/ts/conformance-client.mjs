// An MCP client for the official conformance suite's client scenarios, built on the TypeScript
// SDK's Client: `conformance client --command "node conformance-client.mjs" --scenario NAME`
// runs it with the scenario's server URL as its last argument and the scenario's name in
// MCP_CONFORMANCE_SCENARIO.
//
// With MCP_CONFORMANCE_PROXY set to the mcp-session-operator binary, the client talks to the
// scenario's server through a session proxy of its own (embedded store, free ports), so the
// same scenario runs directly and through the proxy.
import { spawn } from "node:child_process";
import { connect, createServer } from "node:net";

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { ElicitRequestSchema } from "@modelcontextprotocol/sdk/types.js";

const scenario = process.env.MCP_CONFORMANCE_SCENARIO ?? "";
const serverUrl = new URL(process.argv.at(-1));

function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function waitListening(port) {
  const deadline = Date.now() + 20_000;
  while (Date.now() < deadline) {
    const open = await new Promise((resolve) => {
      const socket = connect(port, "127.0.0.1");
      socket.once("connect", () => {
        socket.destroy();
        resolve(true);
      });
      socket.once("error", () => resolve(false));
    });
    if (open) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`the proxy never listened on ${port}`);
}

/// The URL to talk to: the scenario's server, or a proxy in front of it.
async function target() {
  const binary = process.env.MCP_CONFORMANCE_PROXY;
  if (!binary) return { url: serverUrl, stop: () => {} };
  const [listen, admin] = [await freePort(), await freePort()];
  const upstream = `${serverUrl.protocol}//${serverUrl.host}`;
  const env = { ...process.env };
  delete env.MCP_SESSION_REDIS_URL;
  const proxy = spawn(
    binary,
    ["proxy", "--listen", `127.0.0.1:${listen}`, "--upstream", upstream, "--admin-addr", `127.0.0.1:${admin}`],
    { stdio: ["ignore", "ignore", "inherit"], env },
  );
  await waitListening(listen);
  const url = new URL(serverUrl);
  url.host = `127.0.0.1:${listen}`;
  return { url, stop: () => proxy.kill("SIGKILL") };
}

/// The answer a user who accepts every default gives to an elicitation.
function acceptDefaults(request) {
  const content = {};
  for (const [name, field] of Object.entries(request.params.requestedSchema?.properties ?? {})) {
    if (field.default !== undefined) content[name] = field.default;
  }
  return { action: "accept", content };
}

const { url, stop } = await target();
let failed = false;
try {
  const client = new Client(
    { name: "mcp-session-operator-conformance-client", version: "1.0.0" },
    { capabilities: { elicitation: {}, sampling: {} } },
  );
  client.setRequestHandler(ElicitRequestSchema, async (request) => acceptDefaults(request));
  await client.connect(new StreamableHTTPClientTransport(url));
  const { tools } = await client.listTools();
  const call = async (name, args = {}) => {
    if (tools.some((tool) => tool.name === name)) await client.callTool({ name, arguments: args });
  };
  if (scenario === "tools_call") await call("add_numbers", { a: 5, b: 3 });
  if (scenario === "sse-retry") await call("test_reconnection");
  if (scenario.startsWith("elicitation")) await call("test_client_elicitation_defaults");
  await client.close();
} catch (error) {
  console.error(`client failed: ${error?.stack ?? error}`);
  failed = true;
} finally {
  stop();
}
process.exit(failed ? 1 : 0);
