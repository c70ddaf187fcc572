"""Memory: what the node holds, and keeping it within the node's budget.

- `budget`: what the node may hold on the host and its device (by default shares of the
  machine's memory);
- `victims`: whom to offload to make room, a pure policy over plain data;
- `guard`: the memory guard, admission and offloading over every pool of the node (it
  measures, asks `victims`, and moves sandboxes down).
"""
