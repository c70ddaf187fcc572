"""The generation engine: one process per (base model, device) on a node that holds the
backbone, the adapters of every function it serves and one KV cache, and batches every
function's generations together, each row with its own LoRA adapter.

- `server`: the engine process (no user code; adapters arrive as data and are checked);
- `registry`: the node's handle on its engines (start, connect a sandbox, retire);
- `stacked`: the mixed-adapter LoRA step (every row through its own adapter).

A sandbox's side of the connection is runtime/sandbox/engine_client.py.

A sandbox reaches the engine only through the connection the node opened for it and bound
to its function: every adapter it stages, and every row it asks for, is that function's.
"""
