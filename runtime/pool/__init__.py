"""The pools: each function's sandboxes, and how far each is loaded.

- `levels`: the loading levels of a sandbox (cold, spawned, attached, staged, loaded) and
  what each step costs, measured per model (the pre-loader's profile);
- `leases`: a function's pool, which admits requests, leases them a sandbox (joining a
  running batch, or climbing one to loaded) and serves them within their deadline.
"""
