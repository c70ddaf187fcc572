"""A model whose weights are someone else's tensors: the skeleton is built with its
parameters on the `meta` device (buffers real, so non-persistent ones such as rotary
`inv_freq` / `original_inv_freq` are computed as usual), then every parameter and persistent
buffer is bound to a shared tensor, without copying."""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from faas.errors import FaasError


def bind_shared(model_dir: str, tensors: dict[str, torch.Tensor], device: str = "cpu") -> PreTrainedModel:
    """Build the architecture of `model_dir` and bind `tensors` (a full state dict, tied
    names included) as its weights. Raises FaasError if any weight is left unbound."""
    config = AutoConfig.from_pretrained(model_dir)
    floating = [t.dtype for t in tensors.values() if t.is_floating_point()]
    # The dtype the weights were exported in (the checkpoint's own): the most common one.
    dtype = max(set(floating), key=floating.count) if floating else torch.float32
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if device != "cpu":
        # Buffers computed at init (rotary frequencies) follow the weights to the device.
        for module in model.modules():
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.device.type != "meta":
                    module._buffers[name] = buf.to(device)
    for name, tensor in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            raise FaasError(f"backbone tensor {name!r} has no place in {type(model).__name__}") from None
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[leaf] = tensor
    unbound = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    if unbound:
        raise FaasError(f"backbone export lacks {len(unbound)} weights, e.g. {unbound[:3]}")
    return model.eval()
