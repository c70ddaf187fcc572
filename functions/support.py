"""Customer-support replies from a LoRA adapter, grounded in a FAQ that `setup` loads once per
sandbox: the entries a message is about go into the prompt, and the reply uses them."""

from faas import BadRequest, function
from faas.bundled import adapter_path, model_path

# topic -> (words that show a message is about it, the answer the agent gives)
FAQ = {
    "refund": (("refund", "money back", "reimburse"),
               "Refunds reach your card within 5-7 business days after we receive the item."),
    "password": (("password", "log in", "login", "sign in"),
                 "You can reset your password from the sign-in page with 'Forgot password'."),
    "shipping": (("shipping", "deliver", "arrive", "package", "parcel", "where is my order"),
                 "Standard shipping takes 3-5 business days and every order has a tracking link."),
    "cancel": (("cancel",), "Orders can be cancelled free of charge until they ship."),
    "return": (("return", "send back", "exchange"),
               "Items can be returned within 30 days using the prepaid label in your account."),
    "invoice": (("invoice", "receipt", "bill"),
                "Invoices are in your account under Orders, and we can email a copy on request."),
    "warranty": (("warranty", "broken", "defect", "stopped working"),
                 "All products have a two-year warranty covering manufacturing defects."),
    "payment": (("pay", "credit card", "declined", "bank transfer"),
                "We accept credit cards, PayPal and bank transfer."),
}
SYSTEM = "You are a polite support agent for ACME. Answer the customer in two or three sentences."


def load_faq(ctx) -> None:
    ctx.state["faq"] = {topic: entry for topic, entry in FAQ.items()}


def facts_for(message: str, faq: dict) -> list[str]:
    text = message.lower()
    return [answer for words, answer in faq.values() if any(w in text for w in words)]


def messages_for(message: str, facts: list[str]) -> list[dict[str, str]]:
    if not message.strip():
        raise BadRequest("event needs a non-empty 'message'")
    known = " ".join(facts) if facts else "None: offer to pass the question to a colleague."
    return [{"role": "system", "content": f"{SYSTEM}\nFacts: {known}"},
            {"role": "user", "content": message.strip()}]


# openai=True: `faas gateway` also serves it as the OpenAI model "support" (completions and
# chat completions through the tokenizer's chat template); this handler serves the rest.
@function(name="support", backbone=model_path(), adapter=adapter_path("support"),
          timeout_s=60, max_queue=64, setup=load_faq, openai=True)
def support(event: dict, ctx) -> dict:
    message = str(event.get("message", ""))
    facts = facts_for(message, ctx.state["faq"])
    r = ctx.generate(ctx.chat_prompt(messages_for(message, facts)),
                     max_new_tokens=int(event.get("max_new_tokens", 64)), stream=True)
    return {"reply": r.text.strip(), "faq": facts, "token_ids": r.token_ids}
