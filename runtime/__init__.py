"""The per-node runtime: everything that serves functions on a node. One sub-package per
idea, each importing only those below it (tests/test_layout.py checks it; from the top:
node; preload; pool; engine, memory; sandbox; functions, batching, backbone, models; proc):

- `node`: the agent, the one invocation path, forwarding, cluster, deployments, events,
  NATS micro, stats and metrics, `faas up`;
- `functions`: discovery, loading and the catalog of what a node serves;
- `preload`: the invocation history, the predictors, the plan, the pre-loader;
- `pool`: each function's sandboxes as slots, leased to its requests;
- `memory`: the node's budget, the victim policy, the memory guard;
- `batching`: the contention-aware batch window and the continuous batcher;
- `engine`: one generation engine per backbone, batching every function's requests;
- `backbone`: the shared backbone (its process, registry, weights, skeleton);
- `sandbox`: the sandbox processes, their loading levels, their zygote and the node's
  handles on them;
- `proc`: frames, child processes, isolation and what a process holds;
- `models`: the HF helpers and the bundled models.
"""
