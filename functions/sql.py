"""Text-to-SQL from a LoRA adapter: the model continues a SELECT, cut at the first ';'."""

from faas import function
from faas.bundled import adapter_path, model_path


def prompt_for(event: dict) -> str:
    question = str(event.get("question", "")).strip()
    if not question:
        raise ValueError("event needs a non-empty 'question'")
    schema = str(event.get("schema", "")).strip()
    return f"-- Schema: {schema}\n-- Question: {question}\nSELECT"


def postprocess(text: str) -> str:
    return ("SELECT" + text.split(";")[0]).strip() + ";"


@function(name="sql", backbone=model_path(), adapter=adapter_path("sql"), timeout_s=60)
def sql(event: dict, ctx) -> dict:
    r = ctx.generate(prompt_for(event), max_new_tokens=int(event.get("max_new_tokens", 32)))
    return {"sql": postprocess(r.text), "token_ids": r.token_ids}
