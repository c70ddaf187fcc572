"""The per-node runtime: everything that serves functions on a node. One sub-package per
idea, imports going one way (tests/test_layout.py checks it):

- `node`: the agent, the one invocation path, forwarding, cluster, deployments, events,
  NATS micro, stats and metrics, `faas up`;
- `functions`: discovery, loading and the catalog of what a node serves;
- `preload`: the invocation history, the predictors, the plan, the pre-loader;
- `pool`: each function's sandboxes, their levels and leases;
- `memory`: the node's budget, the victim policy, the memory guard;
- `batching`: the contention-aware batch window and the continuous batcher;
- `engine`: one generation engine per backbone, batching every function's requests;
- `backbone`: the shared backbone (its process, registry, weights, skeleton);
- `sandbox`: the sandbox processes, their zygote and the node's handles on them;
- `proc`: frames, child processes and isolation;
- `models`: the HF helpers and the bundled models.
"""
