"""A second architecture: tiny Qwen2 with tied input/output embeddings, plus its adapter."""

from faas import function
from faas.bundled import TINY_QWEN2, adapter_path, model_path


@function(name="qwen-chat", backbone=model_path(TINY_QWEN2), adapter=adapter_path("chat", TINY_QWEN2))
def qwen_chat(event: dict, ctx) -> dict:
    r = ctx.generate(event["prompt"], max_new_tokens=int(event.get("max_new_tokens", 16)))
    return {"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason}
