// A real MCP server (the TypeScript SDK's McpServer over Streamable HTTP, stateful, one
// transport per session as the SDK's examples do) for the proxy tests.
//     node server.mjs PORT
import { randomUUID } from "node:crypto";
import { appendFileSync } from "node:fs";

import { createMcpExpressApp } from "@modelcontextprotocol/sdk/server/express.js";
import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { isInitializeRequest } from "@modelcontextprotocol/sdk/types.js";
import { z } from "zod";

const port = Number(process.argv[2]);

// With MCP_TEST_CALL_LOG set, the `add` calls this server (any of its processes) received in a
// session it knew (`received A`) and began to run (`began A`), for tests that ask which calls
// reached it.
const logCall = (what, a) => {
  if (process.env.MCP_TEST_CALL_LOG) appendFileSync(process.env.MCP_TEST_CALL_LOG, `${what} ${a}\n`);
};
const transports = {};

const notes = [];
const sleep = (seconds) => new Promise((resolve) => setTimeout(resolve, seconds * 1000));

// The same tools as ../server.py: `add` pure and unannotated (as most real tools are),
// `add_read_only` the same but annotated read-only, `record` with an effect and no annotation,
// `notify` sending on the listening stream.
function mcpServer() {
  const server = new McpServer({ name: "ts-test-server", version: "1.0.0" });
  const add = async ({ a, b, delay }) => {
    logCall("began", a);
    if (delay) await sleep(delay);
    return { content: [{ type: "text", text: String(a + b) }] };
  };
  const addSchema = { a: z.number(), b: z.number(), delay: z.number().optional() };
  server.registerTool("add", { description: "Adds two numbers, after `delay` seconds.", inputSchema: addSchema }, add);
  server.registerTool(
    "add_read_only",
    {
      description: "Adds two numbers, after `delay` seconds; declared read-only.",
      inputSchema: addSchema,
      annotations: { readOnlyHint: true },
    },
    add,
  );
  server.registerTool(
    "record",
    {
      description: "Appends a note to this process's log; returns how many notes it holds.",
      inputSchema: { note: z.string(), delay: z.number().optional() },
    },
    async ({ note, delay }) => {
      if (delay) await sleep(delay);
      notes.push(note);
      return { content: [{ type: "text", text: String(notes.length) }] };
    },
  );
  server.registerTool("notify", { description: "Tells the client the resource list changed." }, async () => {
    server.sendResourceListChanged();
    return { content: [{ type: "text", text: "sent" }] };
  });
  return server;
}

// An unknown session is answered as the SDK's own example servers answer it (400), not with the
// spec's 404: the proxy must recognise what servers in the field say.
const notFound = (res) =>
  res.status(400).json({ jsonrpc: "2.0", error: { code: -32000, message: "Bad Request: No valid session ID provided" }, id: null });

const app = createMcpExpressApp();
app.post("/mcp", async (req, res) => {
  const id = req.headers["mcp-session-id"];
  let transport = id ? transports[id] : undefined;
  // Received in a session this process knows (an unknown session's call is refused unrun).
  if (transport && req.body?.method === "tools/call" && req.body.params?.name === "add") {
    logCall("received", req.body.params.arguments?.a);
  }
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
