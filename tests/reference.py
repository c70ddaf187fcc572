"""The reference: plain transformers + peft in this process, greedy, for the same model,
adapter and prompt the system served."""

from __future__ import annotations

import functools

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


@functools.cache
def _load(backbone: str, adapter: str):
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(backbone), adapter)
    return tokenizer, model.eval()


@torch.inference_mode()
def greedy_token_ids(backbone: str, adapter: str, prompt: str, max_new_tokens: int) -> list[int]:
    tokenizer, model = _load(backbone, adapter)
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def decode(backbone: str, adapter: str, token_ids: list[int]) -> str:
    tokenizer, _ = _load(backbone, adapter)
    return tokenizer.decode(token_ids, skip_special_tokens=True)


def example_prompt(name: str, event: dict, backbone: str) -> str:
    """The prompt the example function `name` sends for `event`: its chat messages in the
    backbone's chat template, as `ctx.chat_prompt` writes them."""
    from runtime.models.hf import chat_prompt
    from training.functions import messages

    return chat_prompt(AutoTokenizer.from_pretrained(backbone), messages(name, event))


@torch.inference_mode()
def sampled_token_ids(backbone: str, adapter: str, prompt: str, max_new_tokens: int,
                      temperature: float, top_p: float, seed: int) -> list[int]:
    """Sampled tokens (EOS ignored), drawn as the runtime documents its sampling: from
    softmax(logits / temperature) cut to the smallest head of mass `top_p`, one multinomial
    draw per token from a generator seeded with `seed`."""
    tokenizer, model = _load(backbone, adapter)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    generator = torch.Generator().manual_seed(seed)
    out, past = [], None
    for _ in range(max_new_tokens):
        step = model(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
        past = step.past_key_values
        probs = torch.softmax(step.logits[0, -1].float() / temperature, dim=-1)
        if top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            ordered[ordered.cumsum(-1) - ordered >= top_p] = 0
            probs = torch.zeros_like(probs).scatter_(-1, order, ordered)
        token = int(torch.multinomial(probs, 1, generator=generator))
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out
