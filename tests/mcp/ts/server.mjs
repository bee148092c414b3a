// A real MCP server (the TypeScript SDK's McpServer over Streamable HTTP, stateful, one
// transport per session as the SDK's examples do) for the proxy tests.
//     node server.mjs PORT
import { randomUUID } from "node:crypto";

import { createMcpExpressApp } from "@modelcontextprotocol/sdk/server/express.js";
import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { isInitializeRequest } from "@modelcontextprotocol/sdk/types.js";
import { z } from "zod";

const port = Number(process.argv[2]);
const transports = {};

function mcpServer() {
  const server = new McpServer({ name: "ts-test-server", version: "1.0.0" });
  server.registerTool(
    "add",
    { description: "Adds two numbers.", inputSchema: { a: z.number(), b: z.number() } },
    async ({ a, b }) => ({ content: [{ type: "text", text: String(a + b) }] }),
  );
  return server;
}

const notFound = (res) =>
  res.status(404).json({ jsonrpc: "2.0", error: { code: -32001, message: "Session not found" }, id: null });

const app = createMcpExpressApp();
app.post("/mcp", async (req, res) => {
  const id = req.headers["mcp-session-id"];
  let transport = id ? transports[id] : undefined;
  if (!transport) {
    if (id || !isInitializeRequest(req.body)) return notFound(res);
    transport = new StreamableHTTPServerTransport({
      sessionIdGenerator: () => randomUUID(),
      onsessioninitialized: (sessionId) => {
        transports[sessionId] = transport;
      },
    });
    transport.onclose = () => {
      if (transport.sessionId) delete transports[transport.sessionId];
    };
    await mcpServer().connect(transport);
  }
  await transport.handleRequest(req, res, req.body);
});
const bySession = async (req, res) => {
  const transport = transports[req.headers["mcp-session-id"]];
  if (!transport) return notFound(res);
  await transport.handleRequest(req, res);
};
app.get("/mcp", bySession);
app.delete("/mcp", bySession);

const listener = app.listen(port, "127.0.0.1");
process.on("SIGTERM", () => {
  listener.close();
  process.exit(0);
});
