"""`faas gateway`: an OpenAI-compatible HTTP edge over NATS (Starlette on uvicorn).

It holds no model and no state of its own: every request becomes one invocation of
`faas.invoke.<function>` through `faas.Client`.

    POST /v1/completions, /v1/chat/completions   {"model": "<function>", ...}; "stream": true
                                                 gives server-sent events from the token stream
    GET  /v1/models                              the functions declared with openai=True
    POST /v1/functions/<function>                any function: a JSON event in, the reply
                                                 envelope ({"output", "metrics"} or {"error"}) out
    GET  /metrics                                Prometheus: requests, errors by code, TTFT
                                                 and latency histograms per function
    GET  /healthz                                200 while connected to NATS

Errors are OpenAI error objects with the matching status: 400 invalid request, 404 unknown
model, 503 overloaded (with Retry-After), 504 deadline, 500 the function failed. A client
that disconnects cancels its request (`faas.cancel.<id>`): its generation stops.

Longer than most modules: a small HTTP/1.1 server (no framework dependency) and the mapping of
OpenAI's API onto invocations, which share every request's limits.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from faas import openai_api, protocol
from faas.apikeys import ApiKey, ApiKeys, Forbidden
from faas.client import Client
from faas.connection import raise_if_cancelled
from faas.errors import BadRequest, FaasError, FunctionNotFound, HandlerError, Overloaded, PayloadTooLarge
from faas.logs import get_logger
from faas.top import served

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
          404: "invalid_request_error", 413: "invalid_request_error", 499: "cancelled",
          503: "server_error", 504: "timeout", 500: "server_error"}
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The gateway's Prometheus metrics (its own registry: several gateways in one process
    in tests, and a node's metrics apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("faas_gateway_requests", "HTTP requests answered",
                                ["function", "endpoint", "code"], registry=self.registry)
        self.latency = Histogram("faas_gateway_request_seconds", "time to the whole response",
                                 ["function", "endpoint"], buckets=_BUCKETS, registry=self.registry)
        self.ttft = Histogram("faas_gateway_ttft_seconds", "time to the first streamed token",
                              ["function", "endpoint"], buckets=_BUCKETS, registry=self.registry)


def error_response(err: FaasError, model: str | None = None) -> JSONResponse:
    """The OpenAI error object for a faas error, with its HTTP status."""
    code = 404 if isinstance(err, FunctionNotFound) else err.code
    body = {"error": {"message": err.message, "type": _TYPES.get(code, "server_error"),
                      "param": "model" if code == 404 else None,
                      "code": ("model_not_found" if code == 404 and model else
                               "invalid_api_key" if code == 401 else None)}}
    return JSONResponse(body, status_code=code, headers=_retry_after(err))


def _retry_after(err: FaasError) -> dict[str, str]:
    """`Retry-After` (whole seconds) for an error that says when trying again has a chance."""
    if err.retry_after_s is not None:
        return {"Retry-After": str(max(1, math.ceil(err.retry_after_s)))}
    return {"Retry-After": "1"} if err.code == 503 else {}


_END = object()


async def _next(stream: Any) -> Any:
    """The stream's next chunk, or _END once its reply came."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _END


async def _prepend(first: Any, rest: Any) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


async def _disconnected(request: Request) -> None:
    """Returns when the HTTP client goes away (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Gateway:
    def __init__(self, client: Client, timeout_s: float = 120.0, models_every_s: float = 2.0,
                 api_keys: ApiKeys | None = None, adapter_backbone: Path | None = None) -> None:
        self.client = client
        self.adapter_backbone = adapter_backbone  # what adapters loaded at run time adapt
        self.api_keys = api_keys  # None: open (only on a loopback address, see `bind`)
        self.timeout_s = timeout_s
        self.models_every_s = models_every_s
        self.models: set[str] = set()  # functions with openai=True on some node
        self.functions: set[str] = set()  # every function some node serves
        self._nodes: dict[str, tuple[float, set[str], set[str]]] = {}  # service id -> (seen, openai, all)
        self._refreshing = asyncio.Lock()
        self._models_at = 0.0
        self._models_task: asyncio.Task[None] | None = None
        self.metrics = Metrics()
        self.log = get_logger(component="gateway")
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model}", self.get_model, methods=["GET"]),
            Route("/v1/functions/{function}", self.function, methods=["POST"]),
            Route("/v1/load_lora_adapter", self.load_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.unload_adapter, methods=["POST"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/healthz", self.health, methods=["GET"]),
        ], exception_handlers={Exception: self._internal_error})

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        """A bug of ours still answers with an OpenAI error object (and is logged)."""
        self.log.error("gateway_error", path=request.url.path, error=f"{type(exc).__name__}: {exc}")
        return error_response(HandlerError("internal error in the gateway"))

    # --- the functions that speak OpenAI --------------------------------------------

    async def refresh_models(self) -> None:
        """From every node's NATS micro INFO metadata (`openai`: its functions that accept
        OpenAI requests; `functions`: all it serves). A node's entry lasts three rounds, so
        one late answer does not make its models vanish. One refresh at a time."""
        async with self._refreshing:
            now = time.monotonic()
            for service, openai, functions in await served(self.client.nc, 0.25):
                self._nodes[service] = (now, openai, functions)
            live = [entry for entry in self._nodes.values() if now - entry[0] < 3 * self.models_every_s + 1]
            self._nodes = {k: v for k, v in self._nodes.items() if v in live}
            self.models = set().union(*(e[1] for e in live))
            self.functions = set().union(*(e[2] for e in live))
            self._models_at = time.monotonic()

    async def _follow_models(self) -> None:
        while not self.client.nc.is_closed:
            try:
                await self.refresh_models()
            except Exception as exc:  # the next round tries again
                raise_if_cancelled()
                self.log.warning("models_refresh_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.models_every_s)

    async def start(self) -> None:
        await self.refresh_models()
        self._models_task = asyncio.create_task(self._follow_models(), name="gateway-models")

    async def close(self) -> None:
        if self._models_task is not None:
            self._models_task.cancel()
            await asyncio.gather(self._models_task, return_exceptions=True)

    async def _known(self, model: str | None = None) -> bool:
        """Whether some node serves `model` with openai=True; Overloaded when no node
        answered at all (a 503 to retry, not a 404 or an empty list that clients take as
        final)."""
        if (not self._nodes or model is not None and model not in self.models) \
                and time.monotonic() - self._models_at > 0.5:
            await self.refresh_models()  # deployed, or started, a moment ago?
        if not self._nodes:
            raise Overloaded("no faas node answered: try again", retry_after_s=1.0)
        return model in self.models

    # --- routes ---------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        ok = self.client.nc.is_connected
        return JSONResponse({"nats": "connected" if ok else "disconnected"}, status_code=200 if ok else 503)

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _caller(self, request: Request, function: str | None = None) -> ApiKey | None:
        """The caller's key (None when the gateway is open); Unauthorized without a known
        one, Forbidden when it may not call `function`."""
        if self.api_keys is None:
            return None
        key = self.api_keys.check(request.headers.get("authorization"))
        if function is not None and not key.may_call(function):
            raise Forbidden(f"this API key ({key.name}) may not call {function!r}")
        return key

    async def list_models(self, request: Request) -> Response:
        try:
            key = self._caller(request)
            await self._known()
        except FaasError as err:
            return error_response(err)
        return JSONResponse({"object": "list", "data": [_model(name) for name in sorted(self.models)
                                                         if key is None or key.may_call(name)]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        try:
            self._caller(request, name)
            if not await self._known(name):
                return error_response(FunctionNotFound(f"The model '{name}' does not exist"), name)
        except FaasError as err:
            return error_response(err, name)
        return JSONResponse(_model(name))

    async def completions(self, request: Request) -> Response:
        return await self._openai(request, openai_api.COMPLETIONS)

    async def chat_completions(self, request: Request) -> Response:
        return await self._openai(request, openai_api.CHAT)

    async def _body(self, request: Request) -> Any:
        """The JSON body, read up to the largest a NATS message may carry (a larger one
        could never become an invocation): PayloadTooLarge beyond, BadRequest when it is
        not JSON (nesting too deep included)."""
        limit = self.client.nc.max_payload
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the body takes {declared} bytes, over the {limit} a request may carry")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise PayloadTooLarge(f"the body takes more than the {limit} bytes a request may carry")
        try:
            return json.loads(bytes(body) or b"{}")
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"the request body is not JSON: {type(exc).__name__}: {str(exc)[:200]}") from None

    async def _openai(self, request: Request, endpoint: str) -> Response:
        started = time.monotonic()
        model = None
        try:
            self._caller(request)  # before reading a body: a caller without a key gets nothing
            body = await self._body(request)
            model = body.get("model") if isinstance(body, dict) else None
            parsed = openai_api.parse_request(endpoint, body)
            self._caller(request, parsed["model"])
            if not await self._known(parsed["model"]):
                raise FunctionNotFound(f"The model '{parsed['model']}' does not exist (no function "
                                       "declared with openai=True has that name)")
        except FaasError as err:
            return self._done(error_response(err, model), model, endpoint, started)
        request_id = protocol.new_request_id()
        event = {openai_api.KEY: parsed}
        if parsed["stream"]:
            return await self._stream(request, parsed, event, request_id, started)
        try:
            result = await self._unless_gone(request, self.client.invoke(
                parsed["model"], event, timeout_s=self.timeout_s, request_id=request_id), request_id)
        except FaasError as err:
            return self._done(error_response(err, model), model, endpoint, started)
        if result is None:  # the client went away: its request was cancelled
            return self._done(Response(status_code=499), model, endpoint, started)
        response = JSONResponse(openai_api.completion(parsed, result.output, request_id),
                                headers={"X-Request-Id": request_id})
        return self._done(response, model, endpoint, started)

    async def _stream(self, request: Request, parsed: dict[str, Any], event: dict[str, Any],
                      request_id: str, started: float) -> Response:
        """Wait for the first message before answering, so an error before the first token
        (overloaded, deadline, no node) gets its own HTTP status and Retry-After; then
        server-sent events."""
        model, endpoint = parsed["model"], parsed["endpoint"]
        stream = self.client.stream(model, event, timeout_s=self.timeout_s, request_id=request_id)
        try:
            await stream.__aenter__()
        except FaasError as err:  # never sent: too large, say
            return self._done(error_response(err, model), model, endpoint, started)
        try:
            first: Any = await self._unless_gone(request, _next(stream), request_id)
        except BaseException as err:
            await stream.__aexit__(None, None, None)
            if isinstance(err, FaasError):
                return self._done(error_response(err, model), model, endpoint, started)
            raise
        if first is None:  # the client left while waiting
            await stream.__aexit__(None, None, None)
            return self._done(Response(status_code=499), model, endpoint, started)
        if first is _END:
            first = None  # the reply came without a chunk (an empty answer)
        return StreamingResponse(self._sse(request, parsed, stream, first, request_id,
                                           parsed["include_usage"], started),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})

    async def _sse(self, request: Request, parsed: dict[str, Any], stream: Any, first: Any,
                   request_id: str, include_usage: bool, started: float) -> AsyncIterator[bytes]:
        """A chunk per delta, a closing chunk with the finish reason (and usage when
        asked), then `[DONE]`. An error after the first token comes as an error object in
        the stream, as OpenAI's API sends them."""
        model, endpoint = parsed["model"], parsed["endpoint"]
        watcher = asyncio.create_task(_disconnected(request))
        code, opening = 200, True
        try:
            chunks = stream if first is None else _prepend(first, stream)
            async for chunk in chunks:
                if watcher.done():
                    code = 499
                    return  # leaving cancels the request
                if chunk.delta:
                    if opening:
                        self.metrics.ttft.labels(self._label(model, endpoint), endpoint).observe(
                            time.monotonic() - started)
                    yield _event(openai_api.chunk(parsed, request_id, chunk.delta, first=opening))
                    opening = False
            output = stream.result.output if stream.result else {}
            yield _event(openai_api.chunk(parsed, request_id, None, first=opening,
                                          finish_reason=output.get("finish_reason", "stop")))
            if include_usage:
                yield _event(openai_api.chunk(parsed, request_id, None, usage=output))
            yield b"data: [DONE]\n\n"
        except FaasError as err:
            code = err.code
            yield _event(json.loads(error_response(err, model).body))
            yield b"data: [DONE]\n\n"
        except asyncio.CancelledError:  # the client went away mid-stream
            code = 499
            raise
        finally:
            watcher.cancel()
            await stream.__aexit__(None, None, None)  # cancels the request unless it ended
            self._count(model, endpoint, code, started)

    async def function(self, request: Request) -> Response:
        """Any function: the JSON event in, the reply envelope out (status: its code)."""
        started = time.monotonic()
        name = request.path_params["function"]
        request_id = protocol.new_request_id()
        try:
            if not protocol.valid_function_name(name):
                raise FunctionNotFound(f"no function named {name!r}")
            self._caller(request, name)
            event = await self._body(request)
            if not isinstance(event, dict):
                raise BadRequest("the event must be a JSON object")
            result = await self._unless_gone(request, self.client.invoke(
                name, event, timeout_s=self.timeout_s, request_id=request_id), request_id)
        except FaasError as err:  # the envelope a NATS caller gets, with the code as status
            body, _ = protocol.error_reply(err, protocol.Encoding.JSON, request_id)
            return self._done(Response(body, status_code=err.code, media_type="application/json",
                                       headers=_retry_after(err)), name, "functions", started)
        if result is None:
            return self._done(Response(status_code=499), name, "functions", started)
        return self._done(JSONResponse({"output": result.output, "metrics": result.metrics}),
                          name, "functions", started)

    # --- vLLM's dynamic LoRA API: adapters deployed as data -------------------------

    async def _adapter_request(self, request: Request) -> tuple[str, dict[str, Any]]:
        """The `lora_name` and body of a load/unload request from a key that may."""
        if self.api_keys is None:
            raise Forbidden("this gateway has no API keys: it loads no adapters (give it --api-keys)")
        key = self._caller(request)
        if key is None or not key.adapters:
            raise Forbidden(f"this API key ({key.name if key else '-'}) may not load or unload adapters")
        if self.adapter_backbone is None:
            raise BadRequest("this gateway loads no adapters: start it with --adapter-backbone MODEL")
        body = await self._body(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not protocol.valid_function_name(name):
            raise BadRequest("'lora_name' must be a function name (lower-case letters, digits, '_', '-')")
        return name, body

    async def load_adapter(self, request: Request) -> Response:
        """Deploy `lora_path` (a folder on this gateway's machine) as the model `lora_name`,
        served by every node with the default handler (`faas deploy --adapter --openai`)."""
        from faas import deploy

        try:
            name, body = await self._adapter_request(request)
            path = body.get("lora_path")
            if not isinstance(path, str) or not path:
                raise BadRequest("'lora_path' must be the adapter's folder")
            records = await asyncio.to_thread(_adapter_records, name, Path(path), self.adapter_backbone)
            await deploy.deploy(self.client.nc, records, deploy.deployer(None))
        except FaasError as err:
            return error_response(err)
        self.log.info("adapter_loaded", fn=name, path=path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(self, request: Request) -> Response:
        """Stop serving the adapter `lora_name` everywhere (`faas rm`)."""
        from faas import deploy

        try:
            name, _ = await self._adapter_request(request)
            await deploy.remove(self.client.nc, name)
        except FaasError as err:
            return error_response(err, None)
        self.log.info("adapter_unloaded", fn=name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    # --- plumbing -------------------------------------------------------------------

    async def _unless_gone(self, request: Request, call: Any, request_id: str) -> Any:
        """The call's result, or None (and the request cancelled) if the client leaves."""
        task = asyncio.ensure_future(call)
        watcher = asyncio.create_task(_disconnected(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            task.cancel()  # an invocation cancelled cancels its request
            await asyncio.gather(task, return_exceptions=True)
            self.log.info("client_disconnected", req=request_id)
            return None
        finally:
            watcher.cancel()

    def _label(self, model: str | None, endpoint: str) -> str:
        # Only names some node serves: a label per made-up name would grow without bound.
        return model if model in self.models or endpoint == "functions" and self._served(model) else "-"

    def _count(self, model: str | None, endpoint: str, code: int, started: float) -> None:
        label = self._label(model, endpoint)
        self.metrics.requests.labels(label, endpoint, str(code)).inc()
        self.metrics.latency.labels(label, endpoint).observe(time.monotonic() - started)

    def _served(self, name: str | None) -> bool:
        return isinstance(name, str) and name in self.functions

    def _done(self, response: Response, model: str | None, endpoint: str, started: float) -> Response:
        self._count(model, endpoint, response.status_code, started)
        return response


def _adapter_records(name: str, adapter: Path, backbone: Path) -> list[tuple[dict[str, Any], dict[str, bytes]]]:
    """What `faas deploy --adapter ADAPTER --name NAME --backbone BACKBONE --openai` stores.
    The handler is faas's own (faas/deploy.py), so its file is read here, not in isolation."""
    import tempfile

    from faas import deploy
    from faas.sdk import spec_of

    with tempfile.TemporaryDirectory(prefix="faas-adapter-") as scratch:
        folder = deploy.adapter_function(name, adapter, backbone, True, Path(scratch))
        source = next(folder.glob("*.py"))
        # Not runtime's loader: that keeps the module and puts its (temporary) folder on
        # sys.path for good; this file is faas's template and imports nothing beside it.
        namespace: dict[str, Any] = {"__file__": str(source), "__name__": f"faas_adapter_{name}"}
        exec(compile(source.read_text(), str(source), "exec"), namespace)
        spec = spec_of(namespace["handler"])
        if spec is None:
            raise HandlerError("the adapter's handler declared no function")
        return [deploy.package(spec.record())]


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "faas"}


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def bind(host: str, port: int, api_keys: ApiKeys | None = None) -> socket.socket:
    """The gateway's listening socket, bound before anything else starts (a port in use is
    a clear error at once; port 0 picks a free one: `sock.getsockname()`). Without API keys
    only a loopback address: an open gateway lets anyone who reaches it call every function."""
    if api_keys is None and not ipaddress.ip_address(socket.gethostbyname(host) if ":" not in host
                                                     else host).is_loopback:
        raise FaasError(f"the gateway would listen on {host} without API keys, open to anyone who "
                        "reaches it: give it --api-keys FILE, or listen on 127.0.0.1")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without, a small response waits ~40 ms for the
    # client's delayed ACK (Nagle).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise FaasError(f"the gateway cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)  # connections wait in the backlog until the server accepts them
    return sock


async def serve_gateway(client: Client, sock: socket.socket, timeout_s: float, stop: asyncio.Event,
                        grace_s: float = 10.0, api_keys: ApiKeys | None = None,
                        adapter_backbone: Path | None = None) -> None:
    """Serve HTTP on the bound `sock` until `stop` is set (the caller owns signals and the
    NATS connection); streams still open get `grace_s` to end."""
    import contextlib

    import uvicorn

    class EmbeddedServer(uvicorn.Server):
        """Signals stay with the process that runs it (`faas up --http` drains its node)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    gateway = Gateway(client, timeout_s, api_keys=api_keys, adapter_backbone=adapter_backbone)
    host, port = sock.getsockname()[:2]
    try:
        await gateway.start()
        config = uvicorn.Config(gateway.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=grace_s)
        server = EmbeddedServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        get_logger(component="gateway").info(
            "gateway_started", url=f"http://{host}:{port}",
            api_keys=f"{len(api_keys.keys)} keys" if api_keys else
            "none: open to every local user of this machine (give --api-keys FILE to require keys)")
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        server.should_exit = True
        await task
    finally:
        await gateway.close()
        sock.close()


async def run_gateway(url: str, credentials: dict[str, Any], host: str, port: int, timeout_s: float,
                      connect_s: float = 15.0, api_keys: ApiKeys | None = None,
                      adapter_backbone: Path | None = None) -> int:
    """`faas gateway`: until SIGINT/SIGTERM."""
    import signal

    from faas.logs import configure_logging

    configure_logging()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sock = bind(host, port, api_keys)
    client = Client(url, max_reconnect_attempts=-1, **credentials)
    try:
        await asyncio.wait_for(client.connect(), connect_s)
    except TimeoutError:
        sock.close()
        raise FaasError(f"cannot reach NATS at {url} within {connect_s:.0f}s") from None
    try:
        print(f"gateway http://{host}:{sock.getsockname()[1]} nats={url}", flush=True)
        await serve_gateway(client, sock, timeout_s, stop, api_keys=api_keys, adapter_backbone=adapter_backbone)
    finally:
        await client.close()
    return 0
