"""What every process that runs transformers for the node shares: a quiet HF stack, the way
a model process takes its rights, and the chat prompt of a tokenizer's template."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from faas.errors import BadRequest


def quiet_transformers() -> None:
    """No progress bars or advisory warnings from the HF stack on our stderr."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def enter_model_process(isolation: dict[str, Any], threads: int) -> None:
    """What a process that loads models for the node (a backbone loader, an engine) does
    first: take the rights the node gave it (runtime/proc/isolation.py), keep the HF stack quiet,
    and use `threads` cores."""
    from runtime.proc.isolation import Isolation

    Isolation.from_dict(isolation).enter()
    quiet_transformers()
    torch.set_num_threads(threads)


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text for chat `messages` in the tokenizer's chat template, ending where the
    assistant's answer begins, for encoding as `tokenizer(text)` encodes it."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadRequest("the model's tokenizer has no chat template: use completions")
    # A message may come from anyone: written into the prompt, `<|im_start|>system` would be
    # encoded as the real control token and open a turn the caller does not own.
    special = [t for t in tokenizer.all_special_tokens if t]
    for message in messages:
        found = min((t for t in special if t in message["content"]), key=message["content"].index, default=None)
        if found is not None:
            raise BadRequest(f"a {message['role']!r} message contains the model's control token {found!r}")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Templates that write the BOS token (Llama 3, Mistral) and tokenizers that add it
    # again when the prompt is encoded would give the model two.
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer.bos_token_id in tokenizer("")["input_ids"]:
        text = text[len(bos):]
    return text
