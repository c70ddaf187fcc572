"""The pools: each function's sandboxes, leased to its requests.

- `slots`: a function's sandboxes as a state machine (climbing, parked, offloaded, stopped);
- `leases`: a function's pool, which admits requests, leases them a sandbox (joining a
  running batch, or climbing one to loaded) and serves them within their deadline;
- `racing`: a request's work against its deadline and its caller's cancel.
"""
