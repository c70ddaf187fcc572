"""Customer-support replies from a LoRA adapter, with a FAQ table prepared once per sandbox."""

from faas import function
from faas.bundled import adapter_path, model_path

FAQ = {
    "refund": "Refunds reach your card within 5-7 business days.",
    "password": "Reset your password from the sign-in page.",
    "shipping": "Standard shipping takes 3-5 business days.",
}


def prompt_for(event: dict) -> str:
    message = str(event.get("message", "")).strip()
    if not message:
        raise ValueError("event needs a non-empty 'message'")
    return ("### System: You are a helpful support agent for ACME. Answer briefly.\n"
            f"### Customer: {message}\n### Agent:")


def postprocess(text: str) -> str:
    reply = text.split("###")[0].strip()
    return reply[:1].upper() + reply[1:]


def load_faq(ctx) -> None:
    ctx.state["faq"] = {topic: answer for topic, answer in FAQ.items()}


# openai=True: `faas gateway` also serves it as the OpenAI model "support" (completions and
# chat completions through the tokenizer's chat template); this handler serves the rest.
@function(name="support", backbone=model_path(), adapter=adapter_path("support"),
          timeout_s=60, max_queue=64, setup=load_faq, openai=True)
def support(event: dict, ctx) -> dict:
    message = str(event.get("message", "")).lower()
    related = [answer for topic, answer in ctx.state["faq"].items() if topic in message]
    r = ctx.generate(prompt_for(event), max_new_tokens=int(event.get("max_new_tokens", 24)),
                     stream=True)
    return {"reply": postprocess(r.text), "faq": related, "token_ids": r.token_ids}
