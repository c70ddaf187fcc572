"""Sandboxes: the processes that run a function's code, and the node's handles on them.

- `zygote`: a process that has imported what sandboxes need and forks them on request
  (`python -m runtime.sandbox.zygote`; the light one without torch for engine functions);
- `server`: the sandbox process itself, climbing the levels and running the handler;
- `model`: the function's own model in a sandbox of the paper's path (the shared backbone
  mapped, its adapter on top with peft, its generations batched);
- `meter`: what one request's generations used (tokens, the first token's time);
- `handles`: the node side, the zygote's and each sandbox's handle, and the checks on
  every frame a sandbox sends (it may be hostile);
- `outputs`: what functions print and log, published per function on NATS (`faas logs`).
"""
