"""The node agent: the process that holds the NATS connection and runs no user code.

- `agent`: the node, which wires everything below together, serves `faas ls` and drains;
- `invocation`: the one path every invocation takes (a request, a peer's forward, an
  event): admit, record, window, lease, serve, answer, with the hooks that see each;
- `forwarding`: sending a request that would start cold here to a peer where it is warm;
- `inflight`, `replies`: the requests held by id, and the one way to publish to a caller;
- `events`: JetStream events as invocations (at least once, dead letters);
- `cluster`: what the other nodes hold warm (forwarding, shared pre-loading);
- `deployments`: what is deployed in NATS, made real and served live;
- `service`, `stats`, `metrics`: NATS micro (`$SRV.*`), per-function statistics and
  Prometheus;
- `up`, `natsd`: `faas up` and the embedded nats-server.
"""
