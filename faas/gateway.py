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
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any, AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from faas import openai_api, protocol
from faas.client import Client, gather
from faas.errors import BadRequest, FaasError, FunctionNotFound
from faas.logs import get_logger

_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 499: "cancelled",
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
                      "code": "model_not_found" if code == 404 and model else None}}
    headers = {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    elif code == 503:
        headers["Retry-After"] = "1"
    return JSONResponse(body, status_code=code, headers=headers)


async def _disconnected(request: Request) -> None:
    """Returns when the HTTP client goes away (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Gateway:
    def __init__(self, client: Client, timeout_s: float = 120.0, models_every_s: float = 2.0) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.models_every_s = models_every_s
        self.models: set[str] = set()  # functions with openai=True on some node
        self.functions: set[str] = set()  # every function some node serves
        self._models_at = 0.0
        self._models_task: asyncio.Task[None] | None = None
        self.metrics = Metrics()
        self.log = get_logger(component="gateway")
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/functions/{function}", self.function, methods=["POST"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/healthz", self.health, methods=["GET"]),
        ])

    # --- the functions that speak OpenAI --------------------------------------------

    async def refresh_models(self) -> None:
        """From every node's NATS micro INFO metadata (`openai`: its functions that
        accept OpenAI requests)."""
        found: set[str] = set()
        served: set[str] = set()
        for msg in await gather(self.client.nc, f"$SRV.INFO.{protocol.SERVICE_NAME}", 0.25):
            metadata = json.loads(msg.data).get("metadata") or {}
            found.update(n for n in metadata.get("openai", "").split(",") if n)
            served.update(n for n in metadata.get("functions", "").split(",") if n)
        self.models, self.functions = found, served
        self._models_at = time.monotonic()

    async def _follow_models(self) -> None:
        while True:
            try:
                await self.refresh_models()
            except Exception as exc:  # the next round tries again
                self.log.warning("models_refresh_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.models_every_s)

    async def start(self) -> None:
        await self.refresh_models()
        self._models_task = asyncio.create_task(self._follow_models(), name="gateway-models")

    async def close(self) -> None:
        if self._models_task is not None:
            self._models_task.cancel()
            await asyncio.gather(self._models_task, return_exceptions=True)

    async def _known(self, model: str) -> bool:
        if model not in self.models and time.monotonic() - self._models_at > 0.5:
            await self.refresh_models()  # deployed a moment ago?
        return model in self.models

    # --- routes ---------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        ok = self.client.nc.is_connected
        return JSONResponse({"nats": "connected" if ok else "disconnected"}, status_code=200 if ok else 503)

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def list_models(self, request: Request) -> Response:
        await self.refresh_models()
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "faas"} for name in sorted(self.models)]})

    async def completions(self, request: Request) -> Response:
        return await self._openai(request, openai_api.COMPLETIONS)

    async def chat_completions(self, request: Request) -> Response:
        return await self._openai(request, openai_api.CHAT)

    async def _body(self, request: Request) -> Any:
        try:
            return json.loads(await request.body() or b"{}")
        except ValueError as exc:
            raise BadRequest(f"the request body is not JSON: {exc}") from None

    async def _openai(self, request: Request, endpoint: str) -> Response:
        started = time.monotonic()
        model = None
        try:
            body = await self._body(request)
            model = body.get("model") if isinstance(body, dict) else None
            parsed = openai_api.parse_request(endpoint, body)
            if not await self._known(parsed["model"]):
                raise FunctionNotFound(f"The model '{parsed['model']}' does not exist (no function "
                                       "declared with openai=True has that name)")
        except FaasError as err:
            return self._done(error_response(err, model), model, endpoint, started)
        request_id = protocol.new_request_id()
        event = {openai_api.KEY: parsed}
        if parsed["stream"]:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._sse(request, parsed, event, request_id, include_usage, started),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})
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

    async def _sse(self, request: Request, parsed: dict[str, Any], event: dict[str, Any],
                   request_id: str, include_usage: bool, started: float) -> AsyncIterator[bytes]:
        """Server-sent events: a chunk per delta, a closing chunk with the finish reason
        (and usage when asked), then `[DONE]`. Errors after the stream began come as an
        error object in the stream, as OpenAI's API sends them."""
        model, endpoint = parsed["model"], parsed["endpoint"]
        watcher = asyncio.create_task(_disconnected(request))
        code, first = 200, True
        try:
            async with self.client.stream(model, event, timeout_s=self.timeout_s,
                                          request_id=request_id) as stream:
                async for chunk in stream:
                    if watcher.done():
                        code = 499
                        return  # leaving the block cancels the request
                    if chunk.delta:
                        if first:
                            self.metrics.ttft.labels(model, endpoint).observe(time.monotonic() - started)
                        yield _event(openai_api.chunk(parsed, request_id, chunk.delta, first=first))
                        first = False
                output = stream.result.output if stream.result else {}
            yield _event(openai_api.chunk(parsed, request_id, None, first=first,
                                          finish_reason=output.get("finish_reason", "stop")))
            if include_usage:
                yield _event(openai_api.chunk(parsed, request_id, None, usage=output))
            yield b"data: [DONE]\n\n"
        except FaasError as err:
            code = err.code
            yield _event(json.loads(error_response(err, model).body))
            yield b"data: [DONE]\n\n"
        finally:
            watcher.cancel()
            self._count(model, endpoint, code, started)

    async def function(self, request: Request) -> Response:
        """Any function: the JSON event in, the reply envelope out (status: its code)."""
        started = time.monotonic()
        name = request.path_params["function"]
        request_id = protocol.new_request_id()
        try:
            event = await self._body(request)
            if not isinstance(event, dict):
                raise BadRequest("the event must be a JSON object")
            result = await self._unless_gone(request, self.client.invoke(
                name, event, timeout_s=self.timeout_s, request_id=request_id), request_id)
        except FaasError as err:
            body: dict[str, Any] = {"error": {"code": err.code, "message": err.message}}
            headers = {}
            if err.retry_after_s is not None:
                body["error"]["retry_after_ms"] = round(err.retry_after_s * 1000)
                headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
            return self._done(JSONResponse(body, status_code=err.code, headers=headers),
                              name, "functions", started)
        if result is None:
            return self._done(Response(status_code=499), name, "functions", started)
        return self._done(JSONResponse({"output": result.output, "metrics": result.metrics}),
                          name, "functions", started)

    # --- plumbing -------------------------------------------------------------------

    async def _unless_gone(self, request: Request, call: Any, request_id: str) -> Any:
        """The call's result, or None (and the request cancelled) if the client leaves."""
        task = asyncio.ensure_future(call)
        watcher = asyncio.create_task(_disconnected(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            task.cancel()
            await self.client.cancel(request_id)
            self.log.info("client_disconnected", req=request_id)
            return None
        finally:
            watcher.cancel()

    def _count(self, model: str | None, endpoint: str, code: int, started: float) -> None:
        # Only names some node serves: a label per made-up name would grow without bound.
        label = model if model in self.models or endpoint == "functions" and self._served(model) else "-"
        self.metrics.requests.labels(label, endpoint, str(code)).inc()
        self.metrics.latency.labels(label, endpoint).observe(time.monotonic() - started)

    def _served(self, name: str | None) -> bool:
        return isinstance(name, str) and name in self.functions

    def _done(self, response: Response, model: str | None, endpoint: str, started: float) -> Response:
        self._count(model, endpoint, response.status_code, started)
        return response


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def serve_gateway(client: Client, host: str, port: int, timeout_s: float,
                        stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    """Serve HTTP on host:port until `stop` is set (the caller owns signals and NATS)."""
    import contextlib

    import uvicorn

    class EmbeddedServer(uvicorn.Server):
        """Signals stay with the process that runs it (`faas up --http` drains its node)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    gateway = Gateway(client, timeout_s)
    await gateway.start()
    config = uvicorn.Config(gateway.app, host=host, port=port, log_level="warning", access_log=False,
                            lifespan="off")
    server = EmbeddedServer(config)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if task.done():
        try:
            await task
        except SystemExit:  # uvicorn's answer to a port it cannot bind
            pass
        raise FaasError(f"the gateway cannot listen on {host}:{port} (see the log)")
    if ready is not None:
        ready.set()
    get_logger(component="gateway").info("gateway_started", url=f"http://{host}:{port}")
    try:
        await stop.wait()
    finally:
        server.should_exit = True
        await task
        await gateway.close()


async def run_gateway(url: str, credentials: dict[str, Any], host: str, port: int, timeout_s: float) -> int:
    """`faas gateway`: until SIGINT/SIGTERM."""
    import signal

    from faas.logs import configure_logging

    configure_logging()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ready = asyncio.Event()
    async with Client(url, max_reconnect_attempts=-1, **credentials) as client:
        serving = asyncio.create_task(serve_gateway(client, host, port, timeout_s, stop, ready))
        await asyncio.wait({serving, asyncio.create_task(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            print(f"gateway http://{host}:{port} nats={url}", flush=True)
        await serving
    return 0
