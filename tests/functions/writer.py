"""A LoRA function that passes the caller's decoding options straight to `ctx.generate` and
streams what it generates: the batching, streaming and cancellation tests drive it."""

from faas import function
from faas.bundled import adapter_path, model_path


@function(name="writer", backbone=model_path(), adapter=adapter_path("support"), timeout_s=60,
          max_batch=8, slo_ttft_s=2.0)
def writer(event: dict, ctx) -> dict:
    r = ctx.generate(event["prompt"], max_new_tokens=int(event.get("max_new_tokens", 16)),
                     temperature=float(event.get("temperature", 0.0)),
                     top_p=float(event.get("top_p", 1.0)), seed=event.get("seed"),
                     stop=event.get("stop"), ignore_eos=bool(event.get("ignore_eos")), stream=True)
    return {"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason}
