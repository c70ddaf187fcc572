"""The per-node runtime: node agent, sandboxes, engine and the embedded NATS server."""
