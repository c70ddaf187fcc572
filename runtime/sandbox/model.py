"""One LoRA function's model inside its sandbox: the backbone and the function's adapter
loaded with transformers + peft (unmerged) one level at a time, and its generations run by
the continuous batcher (runtime/batching/batcher.py)."""

from __future__ import annotations

import gc
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from faas.errors import BadRequest, FaasError
from faas.sdk import Generation
from runtime.batching.batcher import Batcher, DeltaSink, GenRequest, Prefill
from runtime.models.hf import quiet_transformers
from runtime.sandbox.meter import UsageMeter


class LoraModel:
    """A backbone with (optionally) one peft LoRA adapter on top, never merged, built in the
    steps of runtime/sandbox/levels.py: `attach` (the backbone), `stage` (the adapter's weights in
    host memory), `load` (adapter on the device, tokenizer). `load_lora_model` does all three.

    With `shared` (the backbone export the node passes to a sandbox), the weights are the
    backbone process's tensors, bound into a meta skeleton without a copy; without it the
    model is loaded privately (an isolated instance).
    """

    def __init__(self, backbone: str, adapter: str | None = None, max_batch: int = 1,
                 on_prefill: Callable[[Prefill], None] = lambda p: None,
                 prefill_budget_s: float | None = None) -> None:
        quiet_transformers()
        self.backbone = backbone
        self.adapter = adapter
        self.max_batch = max_batch
        self._on_prefill = on_prefill
        self.prefill_budget_s = prefill_budget_s
        self.batcher: Batcher | None = None
        self.device = "cpu"
        self.model: Any = None
        self.tokenizer: Any = None
        self._staged: tuple[Any, dict[str, torch.Tensor]] | None = None

    def attach(self, shared: dict[str, Any] | None = None) -> None:
        if shared is not None:
            from runtime.backbone.skeleton import bind_shared
            from runtime.backbone.weights import backend_for

            self.device = shared["device"]
            tensors = backend_for(self.device).attach(shared["manifest"], shared["fds"])
            self.model = bind_shared(self.backbone, tensors, self.device)
        else:
            # dtype "auto": serve in the checkpoint's own dtype (no converted private copy).
            self.model = AutoModelForCausalLM.from_pretrained(self.backbone, dtype="auto")

    def stage(self) -> None:
        """Read the adapter's config and weights into host memory (nothing on the device)."""
        if self.adapter is not None:
            from peft import PeftConfig
            from peft.utils import load_peft_weights

            config = PeftConfig.from_pretrained(self.adapter)
            config.inference_mode = True
            self._staged = (config, load_peft_weights(self.adapter, device="cpu"))

    def load(self) -> None:
        """Put the staged adapter on the backbone (as `PeftModel.from_pretrained` does, from
        the weights already in memory) and load the tokenizer."""
        if self.adapter is not None:
            from peft import PeftModel
            from peft.utils import set_peft_model_state_dict

            if self._staged is None:
                self.stage()
            assert self._staged is not None
            config, weights = self._staged
            self._staged = None
            model = PeftModel(self.model, config)
            result = set_peft_model_state_dict(model, weights)
            missing = [k for k in result.missing_keys if "lora_" in k]
            if missing:
                raise FaasError(f"adapter {self.adapter} lacks weights for {missing[:3]}")
            self.model = model
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.backbone)
        self.batcher = Batcher(self.model, self.tokenizer, self.device, self.max_batch,
                               self._on_prefill, prefill_budget_s=self.prefill_budget_s)

    def unload(self) -> None:
        """Back to `staged`: the adapter leaves the device (its weights kept in host memory,
        from where `load` puts it back), the batcher and tokenizer go."""
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None
        if self.adapter is not None:
            from peft.utils import get_peft_model_state_dict

            weights = {k: v.to("cpu") for k, v in get_peft_model_state_dict(self.model).items()}
            config = self.model.peft_config["default"]
            self.model = self.model.unload()  # the backbone's modules, LoRA layers removed
            self._staged = (config, weights)
        self.tokenizer = None
        gc.collect()
        if self.device != "cpu":  # hand the freed blocks back: what the node counts is reserved
            # cuBLAS keeps a workspace per handle (32 MiB on Hopper), more than a small adapter.
            clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear_workspaces is not None:
                clear_workspaces()
            torch.cuda.empty_cache()

    def warm_up(self) -> None:
        """One short generation so the first request does not pay first-call costs."""
        self.generate("hello", UsageMeter(), max_new_tokens=2)

    def generate(self, prompt: str, meter: UsageMeter, *, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: tuple[str, ...] = (), ignore_eos: bool = False,
                 on_delta: DeltaSink | None = None,
                 on_first: Callable[[], None] | None = None) -> Generation:
        """Generate in the batch with every other request of this sandbox (any thread)."""
        assert self.batcher is not None, "the engine is not loaded"
        input_ids = self.batcher.encode(prompt)
        if not input_ids:
            raise BadRequest("prompt encodes to no tokens")
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and len(input_ids) + max_new_tokens > limit:
            raise BadRequest(f"prompt ({len(input_ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                            f"exceeds the model's context of {limit}")
        request = GenRequest(input_ids, max_new_tokens, temperature, top_p, seed, stop, ignore_eos,
                             on_delta, meter.cancelled,
                             on_first=on_first if meter.first_token_at is None else None)
        generation = self.batcher.submit(request).result()
        meter.tokens_in += generation.prompt_tokens
        meter.tokens_out += len(generation.token_ids)
        if meter.first_token_at is None:
            meter.first_token_at = request.first_token_at
            meter.prefill_batch = request.prefill_batch
        return generation


def load_lora_model(backbone: str, adapter: str | None = None,
                    shared: dict[str, Any] | None = None, max_batch: int = 1) -> LoraModel:
    """A function's model with every step done."""
    model = LoraModel(backbone, adapter, max_batch)
    model.attach(shared)
    model.stage()
    model.load()
    return model
