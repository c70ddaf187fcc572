"""Text-to-SQL from a LoRA adapter: a question and a schema in, one SQLite query out."""

from faas import BadRequest, function
from faas.bundled import adapter_path, model_path

SYSTEM = "Translate the question into one SQLite query over the schema. Answer with the query only."


def messages_for(event: dict) -> list[dict[str, str]]:
    question = str(event.get("question", "")).strip()
    if not question:
        raise BadRequest("event needs a non-empty 'question'")
    schema = str(event.get("schema", "")).strip()
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Schema: {schema}\nQuestion: {question}"}]


def postprocess(text: str) -> str:
    """The first statement, ended by its ';'."""
    return text.strip().split(";")[0].strip() + ";"


@function(name="sql", backbone=model_path(), adapter=adapter_path("sql"), timeout_s=60)
def sql(event: dict, ctx) -> dict:
    r = ctx.generate(ctx.chat_prompt(messages_for(event)),
                     max_new_tokens=int(event.get("max_new_tokens", 64)))
    return {"sql": postprocess(r.text), "token_ids": r.token_ids}
