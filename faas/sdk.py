"""The function SDK: the `@function` decorator, the frozen `FunctionSpec` it records,
and the `Context` a handler receives. Importable without torch: generation is provided
by the runtime through the context."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

from faas.artifacts import declared_models_problem
from faas.errors import FaasError, SpecError
from faas.logs import get_logger
from faas.schedule import Cron
from faas.protocol import schedule_subject, valid_function_name, valid_subject
from faas.record import (DEFAULT_SLO_TTFT_S, ENGINES, FunctionRecord, count, positive_seconds, valid_env,
                         valid_name)

SPEC_ATTR = "__faas_spec__"


@dataclass(frozen=True)
class Generation:
    """The result of `ctx.generate`: decoded text and the generated token ids."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens reached)


class Generator(Protocol):
    """What the runtime plugs into a Context to make `ctx.generate` work."""

    def __call__(self, prompt: str, *, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int | None, stop: tuple[str, ...], ignore_eos: bool,
                 stream: bool) -> Generation: ...


@dataclass(frozen=True)
class EventInfo:
    """What `ctx.event_info` holds for an invocation triggered by a JetStream event: its
    subject, its stream sequence and `Nats-Msg-Id` (ids to de-duplicate by: delivery is at
    least once), and which delivery this is (1 the first time)."""

    subject: str
    sequence: int
    msg_id: str | None
    delivered: int


class Context:
    """Passed to every handler (and to `setup`).

    `ctx.generate(prompt, ...)` runs the function's LoRA model, `ctx.chat_prompt(messages)`
    writes chat messages as the prompt its model was tuned on; `ctx.log` is a structured
    logger bound to the function and request; `ctx.state` is a dict that lives as long as
    the sandbox, for what `setup` prepares and handlers reuse.
    """

    def __init__(self, function: str, request_id: str | None, state: dict[str, Any],
                 generator: Generator | None = None, event_info: EventInfo | None = None,
                 chat_template: Callable[[list[dict[str, str]]], str] | None = None) -> None:
        self.function = function
        self.request_id = request_id
        self.state = state
        self.event_info = event_info  # set when a JetStream event triggered the invocation
        self.log = get_logger(fn=function, req=request_id)
        self._generator = generator
        self._chat_template = chat_template

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt for chat `messages` (`{"role": ..., "content": ...}` dicts) in the
        model's own chat template, ending where the assistant's answer begins: pass it to
        `generate`. Instruct models (and adapters tuned on them) answer best this way."""
        if self._chat_template is None:
            raise FaasError(f"function {self.function!r} declares no backbone: it has no chat template")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise TypeError("messages must be a list of {'role': str, 'content': str} dicts")
        return self._chat_template(messages)

    def generate(self, prompt: str, max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: str | list[str] | None = None,
                 ignore_eos: bool = False, stream: bool = False) -> Generation:
        """Generate up to `max_new_tokens` after `prompt`: greedy when temperature is 0,
        sampled (nucleus `top_p`, reproducible with `seed`) otherwise. Generation ends at
        EOS (unless `ignore_eos`: benchmarks want exact lengths), at the token limit, or
        before the first of the `stop` strings (left out of the text). With `stream=True` and a caller that asked for a stream (`Faas-Stream`), the
        text is sent to the caller as it is produced; the deltas join to the text returned.
        The call runs in a batch with the other requests of this function (continuous
        batching); it raises `Cancelled` when the caller gives up."""
        if self._generator is None:
            raise FaasError(f"function {self.function!r} declares no backbone: it cannot generate")
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of them")
        return self._generator(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=seed, stop=stops, ignore_eos=ignore_eos,
                               stream=stream)


Handler = Callable[[dict, Context], Any]


@dataclass(frozen=True)
class FunctionSpec:
    """A deployed function, validated when declared.

    `backbone` is a model folder (or hub id) and `adapter` a peft LoRA folder; relative
    paths are resolved against the folder of the file that declares the function.
    Without a backbone the function is plain Python. `timeout_s` is the default budget of
    a request, `max_queue` how many requests may wait, `max_instances` how many sandboxes
    may serve it at once, `start_timeout_s` how long a sandbox may take to load (imports,
    model, adapter, `setup`) before it is killed and the waiting requests get a 500.
    `slo_ttft_s` is the time-to-first-token the function promises: under contention the
    node batches its requests only as long as that still holds. `max_batch` is how many
    requests one sandbox generates for at once (1: no batching); by default 32 for a
    function with a backbone and 1 for plain Python (threads would share one GIL).
    `triggers` are JetStream subjects (wildcards allowed) whose events invoke the function,
    at least once; a failing event is retried with a growing delay up to `max_deliver`
    attempts, then goes to the dead letters (`faas.dlq.<name>`). With `results`, each
    event's output is published on `faas.results.<name>`. With `openai` (True, or a
    `postprocess(text, request, ctx) -> str`), the function also answers OpenAI
    completions and chat completions (faas/openai_api.py), through `faas gateway`.
    `engine` says where its generations run: "shared" (the default), in the node's
    generation engine for its backbone, batched with every other function's requests, while
    the handler runs in the function's sandbox without the model; "sandbox", the paper's
    path, in the function's own sandbox with the backbone mapped into it, for code that
    needs the model itself (README: "Where generation runs"). `schedule`, a cron
    expression in UTC (faas/schedule.py), runs the function on time: once per tick however
    many nodes serve it, as an event on `events.schedule.<name>` (added to its triggers),
    with the events' retries and dead letters. `env` (settings) and `secrets` (names of
    secrets set with `faas secret set`) become environment variables of its sandboxes, and
    of no other process; `network=True` gives its sandboxes the network (the others stay
    without).
    """

    name: str
    handler: Handler = field(repr=False, compare=False)
    backbone: str | None = None
    adapter: str | None = None
    timeout_s: float = 60.0
    max_queue: int = 64
    max_instances: int = 1
    start_timeout_s: float = 120.0
    setup: Callable[[Context], Any] | None = field(default=None, repr=False, compare=False)
    slo_ttft_s: float = DEFAULT_SLO_TTFT_S
    max_batch: int | None = None
    triggers: tuple[str, ...] = ()
    max_deliver: int = 5
    results: bool = False
    openai: bool | Callable[[str, dict, Context], str] = field(default=False, compare=False)
    engine: str = "shared"
    schedule: str | None = None
    env: dict[str, str] = field(default_factory=dict, hash=False)
    secrets: tuple[str, ...] = ()
    network: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not valid_function_name(self.name):
            raise SpecError(f"invalid function name {self.name!r}: use lower-case letters, digits, "
                            "'_' and '-', starting with a letter (at most 63 characters)")
        if not callable(self.handler):
            raise SpecError(f"{self.name}: handler must be callable")
        if self.setup is not None and not callable(self.setup):
            raise SpecError(f"{self.name}: setup must be callable")
        for attr in ("timeout_s", "start_timeout_s", "slo_ttft_s"):
            value = getattr(self, attr)
            if not positive_seconds(value):
                raise SpecError(f"{self.name}: {attr} must be a positive number, got {value!r}")
        if self.max_batch is None:
            object.__setattr__(self, "max_batch", 32 if self.backbone is not None else 1)
        object.__setattr__(self, "triggers", tuple(self.triggers))
        object.__setattr__(self, "secrets", tuple(self.secrets))
        if not valid_env(self.env):
            raise SpecError(f"{self.name}: env must map names (upper-case letters, digits, '_') to "
                            "text, 64 KiB in all")
        bad = next((s for s in self.secrets if not valid_name(s)), None)
        if bad is not None or len(self.secrets) > 256:
            raise SpecError(f"{self.name}: secret name {str(bad)[:64]!r}: upper-case letters, digits "
                            "and '_', not a digit first")
        if set(self.env) & set(self.secrets):
            raise SpecError(f"{self.name}: {sorted(set(self.env) & set(self.secrets))[0]} is both a "
                            "setting (env) and a secret")
        if not isinstance(self.network, bool):
            raise SpecError(f"{self.name}: network must be True or False")
        if self.schedule is not None:
            try:
                Cron.parse(self.schedule).next_after(datetime.now(timezone.utc))
            except SpecError as err:
                raise SpecError(f"{self.name}: {err.message}") from None
            if schedule_subject(self.name) not in self.triggers:
                object.__setattr__(self, "triggers", (*self.triggers, schedule_subject(self.name)))
        for subject in self.triggers:
            if not valid_subject(subject):
                raise SpecError(f"{self.name}: trigger {subject!r} is not a NATS subject "
                                "(dot-separated tokens; '*' a token, '>' the last)")
        for attr in ("max_queue", "max_instances", "max_batch", "max_deliver"):
            value = getattr(self, attr)
            if not count(value):
                raise SpecError(f"{self.name}: {attr} must be an integer from 1 to 100000, got {value!r}")
        if self.adapter is not None and self.backbone is None:
            raise SpecError(f"{self.name}: an adapter needs a backbone")
        if self.engine not in ENGINES:
            raise SpecError(f"{self.name}: engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.openai is not False and not (self.openai is True or callable(self.openai)):
            raise SpecError(f"{self.name}: openai must be True or a postprocess(text, request, ctx)")
        if self.openai is not False and self.backbone is None and not _NODE_MODELS:
            raise SpecError(f"{self.name}: openai=... needs a backbone to generate with")
        problem = declared_models_problem(self.backbone, self.adapter) if _CHECK_MODELS else None
        if problem:
            raise SpecError(f"{self.name}: {problem}")

    @property
    def source_file(self) -> str:
        return _defining_file(self.handler)

    def record(self) -> FunctionRecord:
        """The function as plain data (what discovery reports, a deploy stores and the node
        serves)."""
        return FunctionRecord(
            name=self.name, source_file=self.source_file, handler=self.handler.__name__,
            has_setup=self.setup is not None, backbone=self.backbone, adapter=self.adapter,
            timeout_s=float(self.timeout_s), max_queue=self.max_queue, max_instances=self.max_instances,
            start_timeout_s=float(self.start_timeout_s), slo_ttft_s=float(self.slo_ttft_s),
            max_batch=self.max_batch, triggers=self.triggers, max_deliver=self.max_deliver,
            results=bool(self.results), openai=self.openai is not False, engine=self.engine,
            schedule=self.schedule, env=tuple(sorted(self.env.items())), secrets=self.secrets,
            network=self.network)


def _defining_file(fn: Callable[..., Any]) -> str:
    """The file a function was compiled from (also when that file is no longer readable)."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    return code.co_filename if code is not None else ""


def _resolve(path: str | None, base: Path) -> str | None:
    """Absolute path for a local reference (relative ones from the declaring file's folder);
    anything else (a hub id such as `org/model`) is returned as given."""
    if path is None:
        return None
    expanded = Path(path).expanduser()
    if expanded.is_absolute():
        return str(expanded)
    candidate = base / expanded
    # A link counts even when its target is hidden (discovery's namespace may hide it).
    if path.startswith(".") or candidate.exists() or candidate.is_symlink():
        return str(candidate.resolve())
    return path


def function(name: str, *, backbone: str | None = None, adapter: str | None = None,
             timeout_s: float = 60.0, max_queue: int = 64, max_instances: int = 1,
             start_timeout_s: float = 120.0, setup: Callable[[Context], Any] | None = None,
             slo_ttft_s: float = DEFAULT_SLO_TTFT_S, max_batch: int | None = None,
             triggers: list[str] | tuple[str, ...] = (), max_deliver: int = 5,
             results: bool = False,
             openai: bool | Callable[[str, dict, Context], str] = False,
             engine: str = "shared", schedule: str | None = None,
             env: dict[str, str] | None = None, secrets: list[str] | tuple[str, ...] = (),
             network: bool = False) -> Callable[[Handler], Handler]:
    """Declare a function served by faas.

    ```python
    @function(name="support", backbone="models/base", adapter="adapters/support")
    def support(event: dict, ctx) -> dict:
        return {"reply": ctx.generate(event["prompt"], max_new_tokens=32).text}
    ```
    The spec is validated here, when the module is imported: a bad name, a negative
    timeout or a missing adapter folder raise `SpecError` at declaration. The handler is
    returned unchanged (callable in tests), with its spec attached as `__faas_spec__`.
    """

    def decorate(handler: Handler) -> Handler:
        base = Path(_defining_file(handler) or ".").resolve().parent
        if _NODE_MODELS:  # in a sandbox: the node resolved the models of the one it serves;
            # the others declared beside it are not served by this process
            models = _NODE_MODELS.get(name, (None, None))
        else:
            models = (_resolve(backbone, base), _resolve(adapter, base))
        spec = FunctionSpec(name=name, handler=handler, backbone=models[0],
                            adapter=models[1], timeout_s=timeout_s,
                            max_queue=max_queue, max_instances=max_instances,
                            start_timeout_s=start_timeout_s, setup=setup,
                            slo_ttft_s=slo_ttft_s, max_batch=max_batch,
                            triggers=tuple(triggers), max_deliver=max_deliver, results=results,
                            openai=openai, engine=engine, schedule=schedule, env=dict(env or {}),
                            secrets=tuple(secrets), network=network)
        setattr(handler, SPEC_ATTR, spec)
        return handler

    return decorate


# Discovery runs in a namespace that may hide the model folders (a private /tmp, closed
# folders covered): the node checks them itself, from outside, and makes them readable.
_CHECK_MODELS = True


def defer_model_checks() -> None:
    """Skip the checks of model folders at declaration (in the node's discovery, which
    checks them from outside the namespace that runs it)."""
    global _CHECK_MODELS
    _CHECK_MODELS = False


# In a sandbox the node's models are used, not the paths written in the code: a deployed
# function's backbone is found by fingerprint and its adapter comes from the deploy, and a
# declared folder the sandbox's uid may not read is served from a staged copy.
_NODE_MODELS: dict[str, tuple[str | None, str | None]] = {}


def use_node_models(name: str, backbone: str | None, adapter: str | None) -> None:
    """Make the declaration of `name` use these model folders (set by the runtime before a
    sandbox imports its function's file)."""
    _NODE_MODELS[name] = (backbone, adapter)


def spec_of(obj: Any) -> FunctionSpec | None:
    """The FunctionSpec attached to a decorated handler, if any."""
    spec = getattr(obj, SPEC_ATTR, None)
    return spec if isinstance(spec, FunctionSpec) else None
