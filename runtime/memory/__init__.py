"""Memory: what the node holds, and keeping it within the node's budget.

- `usage`: what a process holds (private pages, device memory) and the machine's budgets;
- `victims`: whom to offload to make room, a pure policy over plain data;
- `guard`: the memory guard, admission and offloading over every pool of the node (it
  measures, asks `victims`, and moves sandboxes down).
"""
