"""Sandboxes: the processes that run a function's code, and the node's handles on them.

- `levels`: how far a sandbox is loaded (cold, spawned, attached, staged, loaded) and what
  each step costs, measured per model (the pre-loader's profile);
- `zygote`: a process that has imported what sandboxes need and forks them on request
  (`python -m runtime.sandbox.zygote`; the light one without torch for engine functions);
- `spawn`: the node's handle on the zygote, and forking a sandbox for a function;
- `server`: the sandbox process itself, climbing the levels and running the handler;
- `model`: the function's own model in a sandbox of the paper's path (the shared backbone
  mapped, its adapter on top with peft, its generations batched);
- `meter`: what one request's generations used (tokens, the first token's time);
- `engine_client`: a sandbox's connection to the generation engine (light: no torch), behind
  `ctx.generate` for functions that generate in the engine;
- `handles`: the node's handle on each sandbox, and the checks on every frame a sandbox
  sends (it may be hostile);
- `outputs`: what functions print and log, published per function on NATS (`faas logs`).
"""
