"""One-sentence summaries from a LoRA adapter."""

from faas import BadRequest, function
from faas.bundled import adapter_path, model_path

SYSTEM = "Summarize the text in one short sentence."


def messages_for(event: dict) -> list[dict[str, str]]:
    text = str(event.get("text", "")).strip()
    if not text:
        raise BadRequest("event needs a non-empty 'text'")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def postprocess(text: str) -> str:
    return " ".join(text.strip().split("\n")[0].split())


# Also triggered by events: each review posted on `events.reviews.>` is summarized once, and
# the summary published on faas.results.summarize.
@function(name="summarize", backbone=model_path(), adapter=adapter_path("summarize"), timeout_s=60,
          triggers=["events.reviews.>"], results=True)
def summarize(event: dict, ctx) -> dict:
    r = ctx.generate(ctx.chat_prompt(messages_for(event)),
                     max_new_tokens=int(event.get("max_new_tokens", 48)))
    return {"summary": postprocess(r.text), "token_ids": r.token_ids}
