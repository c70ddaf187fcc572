"""Sandboxes: the processes that run a function's code, and the node's handles on them.

- `zygote`: a process that has imported what sandboxes need and forks them on request
  (`python -m runtime.sandbox.zygote`; the light one without torch for engine functions);
- `server`: the sandbox process itself, climbing the levels and running the handler;
- `handles`: the node side, the zygote's and each sandbox's handle, and the checks on
  every frame a sandbox sends (it may be hostile);
- `outputs`: what functions print and log, published per function on NATS (`faas logs`).
"""
