"""The OpenAI completions and chat completions API, mapped onto faas functions.

The gateway (faas/gateway.py) checks an HTTP request body with `parse_request` and invokes
the function (`model`) with the event `{"openai": <the checked request>}`; a function
declared with `openai=True` answers such an event with `respond` in its sandbox: the prompt
(for chat: the messages through the tokenizer's chat template), one `ctx.generate` with the
request's sampling settings, streamed when the caller streams, and optionally the
function's `postprocess(text, request, ctx)` on the final text. The reply's output is
`{"text", "finish_reason", "prompt_tokens", "completion_tokens"}`, which the gateway shapes
into OpenAI response objects (`completion`, `chunk`).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from faas.errors import BadRequest

KEY = "openai"
COMPLETIONS = "completions"
CHAT = "chat.completions"
# OpenAI's own defaults: 16 tokens for a completion; a chat answer goes on until the model
# stops, which here is bounded.
_DEFAULT_MAX_TOKENS = {COMPLETIONS: 16, CHAT: 256}
_MAX_TOKENS = 32768
_ROLES = {"system", "developer", "user", "assistant", "tool"}


def is_request(event: Any) -> bool:
    """Whether an event is an OpenAI request made by `parse_request`."""
    return isinstance(event, dict) and set(event) == {KEY} and isinstance(event[KEY], dict)


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise BadRequest(f"'{key}' must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _text(content: Any) -> str:
    """A message's content: a string, a list of text parts, or null (an assistant turn
    that only called tools)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest("message content must be a string or a list of text parts")


def parse_request(endpoint: str, body: Any) -> dict[str, Any]:
    """The settings of an OpenAI request that faas honours, checked; BadRequest (an
    `invalid_request_error`) for anything it cannot do as asked."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}  # clients send null for "unset"
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("'model' (the function's name) is required")
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported")
    if body.get("echo") or body.get("logprobs") or body.get("best_of", 1) != 1:
        raise BadRequest("echo, logprobs and best_of are not supported")
    # Accepted but not done would leave a client sure of JSON or tool calls it never gets.
    unsupported = [k for k in ("tools", "functions", "tool_choice", "function_call") if body.get(k)]
    if unsupported or (body.get("response_format") or {"type": "text"}).get("type", "text") != "text":
        raise BadRequest(f"not supported: {', '.join(unsupported) or 'response_format other than text'}")
    if not isinstance(body.get("stream_options", {}), dict):
        raise BadRequest("'stream_options' must be an object")
    request: dict[str, Any] = {"endpoint": endpoint, "model": body["model"]}
    if endpoint == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        request["messages"] = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in _ROLES:
                raise BadRequest(f"each message needs a role among {sorted(_ROLES)}")
            request["messages"].append({"role": m["role"], "content": _text(m.get("content", ""))})
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string (one prompt per request)")
        request["prompt"] = prompt
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    request["max_tokens"] = int(_number({"max_tokens": limit}, "max_tokens",
                                        _DEFAULT_MAX_TOKENS[endpoint], 1, _MAX_TOKENS))
    request["temperature"] = _number(body, "temperature", 1.0, 0.0, 2.0)
    request["top_p"] = _number(body, "top_p", 1.0, 1e-9, 1.0)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("'seed' must be an integer")
    request["seed"] = seed
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("'stop' must be a string or a list of at most 4 non-empty strings")
    request["stop"] = stops
    request["stream"] = bool(body.get("stream", False))
    # vLLM's extension (benchmarks want exact lengths): go on past the end-of-sequence token.
    request["ignore_eos"] = bool(body.get("ignore_eos", False))
    request["include_usage"] = bool(body.get("stream_options", {}).get("include_usage"))
    return request


def respond(event: dict[str, Any], ctx: Any, chat_template: Callable[[list[dict[str, str]]], str],
            postprocess: Callable[[str, dict, Any], str] | None = None) -> dict[str, Any]:
    """The default handler of an `openai=True` function (runs in its sandbox)."""
    request = parse_request(event[KEY].get("endpoint", ""), event[KEY])
    prompt = chat_template(request["messages"]) if request["endpoint"] == CHAT else request["prompt"]
    generation = ctx.generate(prompt, max_new_tokens=request["max_tokens"],
                              temperature=request["temperature"], top_p=request["top_p"],
                              seed=request["seed"], stop=request["stop"] or None,
                              ignore_eos=request["ignore_eos"], stream=True)
    text = generation.text if postprocess is None else postprocess(generation.text, request, ctx)
    return {"text": text, "finish_reason": generation.finish_reason,
            "prompt_tokens": generation.prompt_tokens, "completion_tokens": len(generation.token_ids)}


def _usage(output: dict[str, Any]) -> dict[str, int]:
    return {"prompt_tokens": output["prompt_tokens"], "completion_tokens": output["completion_tokens"],
            "total_tokens": output["prompt_tokens"] + output["completion_tokens"]}


def completion(request: dict[str, Any], output: dict[str, Any], request_id: str) -> dict[str, Any]:
    """The response object for a finished request."""
    base = {"id": f"{'chatcmpl' if request['endpoint'] == CHAT else 'cmpl'}-{request_id}",
            "created": int(time.time()), "model": request["model"], "usage": _usage(output)}
    if request["endpoint"] == CHAT:
        return {**base, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": output["text"]},
            "finish_reason": output["finish_reason"], "logprobs": None}]}
    return {**base, "object": "text_completion", "choices": [{
        "index": 0, "text": output["text"], "finish_reason": output["finish_reason"], "logprobs": None}]}


def chunk(request: dict[str, Any], request_id: str, delta: str | None, *, first: bool = False,
          finish_reason: str | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """One server-sent event of a streamed response (`usage`: the closing one that
    `stream_options.include_usage` asks for, with no choices)."""
    chat = request["endpoint"] == CHAT
    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}", "created": int(time.time()),
            "model": request["model"], "object": "chat.completion.chunk" if chat else "text_completion"}
    if usage is not None:
        return {**base, "choices": [], "usage": _usage(usage)}
    if chat:
        content: dict[str, Any] = {"role": "assistant"} if first else {}
        if delta:
            content["content"] = delta
        choice = {"index": 0, "delta": content, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}
    return {**base, "choices": [choice]}
