"""LoRA functions that pass the caller's decoding options straight to `ctx.generate` and
stream what they generate: the batching, streaming and cancellation tests drive them."""

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


def _on_own_sandbox(adapter: str):
    """`writer` for `adapter`, generating in its own sandbox (the paper's path)."""
    def handler(event: dict, ctx) -> dict:
        return writer(event, ctx)

    name = "writer-sandbox" if adapter == "support" else f"writer-sandbox-{adapter}"
    return function(name=name, backbone=model_path(), adapter=adapter_path(adapter), timeout_s=60,
                    max_batch=8, slo_ttft_s=2.0, engine="sandbox")(handler)


writer_sandbox = _on_own_sandbox("support")
writer_sandbox_sql = _on_own_sandbox("sql")
writer_sandbox_summarize = _on_own_sandbox("summarize")
