"""The mixed-adapter LoRA step: every row of a batch through its own adapter at the cost of
two batched matmuls per LoRA layer, whatever number of adapters the batch holds (Punica's
SGMV idea in plain torch).

peft's mixed batches (`adapter_names`) loop, in every LoRA layer, over the batch's distinct
adapters: a matmul pair and a scatter each, which on a 2-core CPU cost up to 2x the bare
backbone's decode step in bf16 (`python -m bench.lora_step`). Here each LoRA layer keeps
its adapters' A as one [K + 1, in, r] tensor and B, scaling folded in, as [K + 1, r, out]
(index 0 is all zeros: a row without an adapter; ranks below the layer's largest are padded
with zeros, which add nothing), gathers them by a per-row index and runs two `bmm`.
Adapters are still added and removed with peft, which keeps the loading, naming and shape
checks; the stacks are rebuilt after each change. Where an adapter uses something the
stacked step does not compute (a LoRA variant such as DoRA, a bias on B, a layer other than
`Linear`), the model runs peft's mixed batches instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class StackedLora:
    """Routes a peft model's LoRA layers: `route(adapters)` before each forward names each
    row's adapter (None or an unknown name: the bare backbone) and returns the extra forward
    arguments (none when stacked; `adapter_names` where peft computes)."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}  # adapter name -> its place in every stack
        self.stacked = True  # False: some adapter needs peft's own forward
        self._rows: torch.Tensor | None = None

    def rebuild(self, model: nn.Module) -> None:
        """After an adapter was added or removed: stack every LoRA layer's adapters anew."""
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        names = list(getattr(model, "peft_config", {}))
        self.index = {name: i + 1 for i, name in enumerate(names)}
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self.stacked = all(type(m) is LoraLinear and not m.lora_variant
                           and all(b.bias is None for b in m.lora_B.values()) for m in layers)
        for layer in layers:
            if not self.stacked:
                layer.__dict__.pop("forward", None)  # peft's own forward again
                continue
            present = [n for n in names if n in layer.lora_A]
            rank = max(layer.lora_A[n].weight.shape[0] for n in present) if present else 1
            weight = layer.lora_A[present[0]].weight if present else layer.base_layer.weight
            a = torch.zeros(len(names) + 1, layer.in_features, rank, dtype=weight.dtype, device=weight.device)
            b = torch.zeros(len(names) + 1, rank, layer.out_features, dtype=weight.dtype, device=weight.device)
            for n in present:
                r = layer.lora_A[n].weight.shape[0]
                a[self.index[n], :, :r] = layer.lora_A[n].weight.T
                b[self.index[n], :r, :] = layer.lora_B[n].weight.T * layer.scaling[n]
            layer.stack_a, layer.stack_b = a, b
            layer.forward = _StackedForward(layer, self)

    def route(self, adapters: list[str | None], device: Any) -> dict[str, Any]:
        if not self.stacked:
            # A row whose adapter left the model is a cancelled one on its way out (peft
            # refuses unknown names for the whole batch): it runs on the bare backbone.
            return {"adapter_names": [a if a in self.index else "__base__" for a in adapters]}
        self._rows = torch.tensor([self.index.get(a, 0) if a is not None else 0 for a in adapters],
                                  device=device)
        return {}

    @property
    def rows(self) -> torch.Tensor:
        assert self._rows is not None, "route() the batch before its forward"
        return self._rows


class _StackedForward:
    """A LoRA layer's forward on the stacks: base(x) + x @ A[row] @ B[row]."""

    def __init__(self, layer: nn.Module, router: StackedLora) -> None:
        self.layer = layer
        self.router = router

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = self.layer
        result = layer.base_layer(x, *args, **kwargs)
        rows = self.router.rows
        flat = x.reshape(rows.shape[0], -1, x.shape[-1]).to(layer.stack_a.dtype)
        delta = torch.bmm(torch.bmm(flat, layer.stack_a[rows]), layer.stack_b[rows])
        return result + delta.reshape(result.shape).to(result.dtype)
