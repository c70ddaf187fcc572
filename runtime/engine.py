"""Generation for one LoRA function inside its sandbox: the backbone and the function's
adapter loaded with transformers + peft (unmerged), greedy or sampled decoding with a
KV cache, and the time of the first generated token for TTFT."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from faas.errors import FaasError
from faas.sdk import Generation


def quiet_transformers() -> None:
    """No progress bars or advisory warnings from the HF stack on our stderr."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


@dataclass
class UsageMeter:
    """What a request's generations used: token counts and the first token's time."""

    tokens_in: int = 0
    tokens_out: int = 0
    first_token_at: float | None = None  # time.monotonic() (system-wide on Linux)

    def reset(self) -> None:
        self.tokens_in = self.tokens_out = 0
        self.first_token_at = None


class FirstTokenClock(BaseStreamer):
    """Stamps `meter.first_token_at` when `generate` produces its first token (it calls
    put() with the prompt first, then with each new token)."""

    def __init__(self, meter: UsageMeter) -> None:
        self._meter = meter
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
        elif self._meter.first_token_at is None:
            self._meter.first_token_at = time.monotonic()

    def end(self) -> None:
        pass


class LoraEngine:
    """A backbone with (optionally) one peft LoRA adapter on top, never merged, built in the
    steps of runtime/levels.py: `attach` (the backbone), `stage` (the adapter's weights in
    host memory), `load` (adapter on the device, tokenizer). `load_engine` does all three.

    With `shared` (the backbone export the node passes to a sandbox), the weights are the
    backbone process's tensors, bound into a meta skeleton without a copy; without it the
    model is loaded privately (an isolated instance).
    """

    def __init__(self, backbone: str, adapter: str | None = None) -> None:
        quiet_transformers()
        self.backbone = backbone
        self.adapter = adapter
        self.meter = UsageMeter()
        self.device = "cpu"
        self.model: Any = None
        self.tokenizer: Any = None
        self._staged: tuple[Any, dict[str, torch.Tensor]] | None = None

    def attach(self, shared: dict[str, Any] | None = None) -> None:
        if shared is not None:
            from runtime.skeleton import bind_shared
            from runtime.weights import backend_for

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
        self._pad_id = self.tokenizer.pad_token_id
        if self._pad_id is None:
            self._pad_id = self.tokenizer.eos_token_id

    def warm_up(self) -> None:
        """One short generation so the first request does not pay first-call costs."""
        self.generate("hello", max_new_tokens=2, temperature=0.0, top_p=1.0, seed=None)
        self.meter.reset()

    @torch.inference_mode()
    def generate(self, prompt: str, *, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int | None) -> Generation:
        inputs = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        n_prompt = int(inputs["input_ids"].shape[1])
        if n_prompt == 0:
            raise FaasError("prompt encodes to no tokens")
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and n_prompt + max_new_tokens > limit:
            raise FaasError(f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) "
                            f"exceeds the model's context of {limit}")
        sampling: dict[str, object] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            if seed is not None:
                torch.manual_seed(seed)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens,
                                  pad_token_id=self._pad_id, streamer=FirstTokenClock(self.meter),
                                  **sampling)
        new_ids = out[0, n_prompt:].tolist()
        eos = self.tokenizer.eos_token_id
        finish = "stop" if eos is not None and new_ids and new_ids[-1] == eos else "length"
        self.meter.tokens_in += n_prompt
        self.meter.tokens_out += len(new_ids)
        return Generation(text=self.tokenizer.decode(new_ids, skip_special_tokens=True),
                          token_ids=new_ids, prompt_tokens=n_prompt, finish_reason=finish)


def load_engine(backbone: str, adapter: str | None = None,
                shared: dict[str, Any] | None = None) -> LoraEngine:
    """An engine with every step done."""
    engine = LoraEngine(backbone, adapter)
    engine.attach(shared)
    engine.stage()
    engine.load()
    return engine
