"""Predictive pre-loading (the paper's section on it): what each function's invocation
history predicts, and what the node therefore keeps warm.

- `history`: every invocation, on every node, in a JetStream stream the nodes share;
- `predict`: the predictors over those arrivals (hybrid histogram, rate), and how many
  instances a burst needs (`followers`);
- `plan`: the pure policy: which level each function's sandboxes and which backbones are
  worth their memory, a knapsack over expected seconds saved per GiB-second;
- `preloader`: the mechanism that re-plans and applies the plan to the pools.

The package imports nothing from the node, which imports it; it applies its plan to the
pools (runtime/pool/) within the node's budget (runtime/memory/).
"""
