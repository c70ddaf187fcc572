"""Batching: when a function's requests go to their model, and how they run together.

- `window`: the contention-aware batch window (the node decides when to hand requests
  over, from the measured prefill cost and the device's load);
- `batcher`: continuous batching, one batch and one KV cache for every generation
  submitted (a sandbox's own, or the generation engine's across functions).
"""
