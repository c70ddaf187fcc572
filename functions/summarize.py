"""One-sentence summaries from a LoRA adapter, trimmed to a word budget."""

from faas import function
from faas.bundled import adapter_path, model_path


def prompt_for(event: dict) -> str:
    text = str(event.get("text", "")).strip()
    if not text:
        raise ValueError("event needs a non-empty 'text'")
    return f"Summarize the following text in one sentence.\n\nText: {text}\n\nSummary:"


def postprocess(text: str, max_words: int) -> str:
    first_line = text.strip().split("\n")[0]
    return " ".join(first_line.split()[:max_words])


# Also triggered by events: each review posted on `events.reviews.>` is summarized once, and
# the summary published on faas.results.summarize.
@function(name="summarize", backbone=model_path(), adapter=adapter_path("summarize"), timeout_s=60,
          triggers=["events.reviews.>"], results=True)
def summarize(event: dict, ctx) -> dict:
    max_words = int(event.get("max_words", 20))
    r = ctx.generate(prompt_for(event), max_new_tokens=int(event.get("max_new_tokens", 32)))
    return {"summary": postprocess(r.text, max_words), "token_ids": r.token_ids}
