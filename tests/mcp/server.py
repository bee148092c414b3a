"""A real MCP server (the `mcp` SDK's MCPServer, Streamable HTTP, stateful) for the proxy tests.

    python server.py PORT [--json]
"""

import sys

from mcp.server.mcpserver import MCPServer

server = MCPServer("proxy-test-server", log_level="WARNING")


@server.tool()
def add(a: int, b: int) -> int:
    """Adds two numbers."""
    return a + b


if __name__ == "__main__":
    port = int(sys.argv[1])
    server.run(
        transport="streamable-http",
        host="127.0.0.1",
        port=port,
        json_response="--json" in sys.argv,
    )
