"""`worldpm-lite serve`: the scorer as an HTTP service for RL training loops (FastAPI + uvicorn, the
optional extra `[serve]`).

The parts (see ARCHITECTURE.md): routes.py is the route table; ours.py, openrlhf.py and vllm.py each
turn one protocol's request body into the scorer's groups and its scores back into the protocol's
answer; http.py reads bodies and shapes errors; batcher.py merges concurrent requests into the
scorer's batches; this module wires them into one app; replicas.py runs copies of the app on Ray Serve.

A served score is the number `Scorer.score` / `score_texts` gives for the same input (exactly, on the
CPU). Bad input gets a 4xx JSON error naming the field; a full queue gets 503 with Retry-After. With an
API key every route but /health and /metrics wants `Authorization: Bearer <key>` (401 otherwise). On
SIGTERM or Ctrl-C the server stops accepting connections, answers every request it has, then exits.
"""

import asyncio
import contextlib
import functools
import hmac
import logging
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ..options import ServeOptions
from ..scorer import DoesNotFit, NonFiniteScore
from . import openrlhf, ours, vllm
from .batcher import Batcher, Closed, QueueFull
from .http import HTTPError, error_body, read_body
from .routes import OPEN, ROUTES, startup_line

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
POWERS = tuple(2.0 ** k for k in range(17))
UNAUTHORIZED = "missing or wrong API key: send 'Authorization: Bearer <key>'"
log = logging.getLogger("worldpm_lite.serve")


class Metrics:
    """Prometheus metrics in their own registry (none global)."""

    def __init__(self, queue_depth):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("worldpm_requests", "HTTP requests answered", ["endpoint", "code"], registry=r)
        self.latency = Histogram("worldpm_request_seconds", "time from request to response", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.conversations = Counter("worldpm_conversations", "conversations scored", registry=r)
        self.tokens = Counter("worldpm_tokens", "tokens of the conversations scored", registry=r)
        self.batch_tokens = Histogram("worldpm_batch_tokens", "tokens completed per model batch", buckets=POWERS,
                                      registry=r)
        self.batch_conversations = Histogram("worldpm_batch_conversations", "conversations completed per model "
                                             "batch", buckets=POWERS, registry=r)
        self.round_requests = Histogram("worldpm_batched_requests", "HTTP requests merged into one round of "
                                        "batches", buckets=POWERS, registry=r)
        self.in_flight = Gauge("worldpm_in_flight_requests", "HTTP requests being answered", registry=r)
        Gauge("worldpm_queue_depth", "requests waiting for the model", registry=r).set_function(queue_depth)

    def on_step(self, step, requests: int) -> None:
        n = sum(len(s) for _, s in step.results)
        self.conversations.inc(n)
        self.tokens.inc(step.tokens)
        self.batch_tokens.observe(step.tokens)
        self.batch_conversations.observe(n)
        self.round_requests.observe(requests)


def error_response(path: str, code: int, kind: str, message: str, headers: dict | None = None,
                   param: str | None = None) -> JSONResponse:
    """An error in the shape of the route at `path` (serve/http.py)."""
    status, body = error_body(code, kind, message, param, path)
    return JSONResponse(body, status, headers)


class Service:
    """What the routes share: the scorer and its Batcher (started and stopped with the app), the limits,
    the API key and the metrics."""

    def __init__(self, scorer, model: str, options: ServeOptions):
        self.scorer, self.model, self.options = scorer, model, options
        self.batcher: Batcher | None = None
        self.tokenizing: ThreadPoolExecutor | None = None
        self.metrics = Metrics(lambda: self.batcher.queued if self.batcher else 0)
        self.devices = sorted({str(p.device) for p in scorer.model.parameters() if p.device.type != "meta"})

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.batcher = Batcher(self.scorer, self.options.max_wait, self.options.max_queue, self.metrics.on_step)
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="worldpm-tokenize")  # one tokenizer user
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self.batcher.close)
            self.tokenizing.shutdown()

    def authorized(self, request: Request) -> bool:
        key = self.options.api_key
        if key is None or request.url.path in OPEN:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    async def answer(self, request: Request, prepare) -> Response:
        """A scoring route's answer: the key checked, the body read and prepared (off the event loop),
        scored through the Batcher, counted in the metrics."""
        path, t0 = request.url.path, time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            if self.authorized(request):
                response = await self.score(request, prepare)
            else:
                response = error_response(path, 401, "unauthorized", UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
        finally:
            self.metrics.in_flight.dec()
        self.metrics.requests.labels(path, str(response.status_code)).inc()
        self.metrics.latency.labels(path).observe(time.perf_counter() - t0)
        return response

    async def score(self, request: Request, prepare) -> Response:
        path, batcher = request.url.path, self.batcher
        try:
            with batcher.coming():
                body = await read_body(request.receive, request.headers.get("content-length"), self.options.max_body)
                loop = asyncio.get_running_loop()
                groups, finish = await loop.run_in_executor(self.tokenizing, prepare, self.scorer, body,
                                                            self.options.max_items)
                future = batcher.submit(groups)
            return JSONResponse(finish(await asyncio.wrap_future(future)))
        except HTTPError as e:
            return error_response(path, e.code, e.kind, str(e), e.headers, e.param)
        except QueueFull as e:
            return error_response(path, 503, "overloaded", str(e), {"Retry-After": str(e.retry_after)})
        except Closed as e:
            return error_response(path, 503, "shutting_down", str(e), {"Retry-After": "5"})
        except NonFiniteScore as e:
            return error_response(path, 500, "model_error", str(e))
        except DoesNotFit as e:
            return error_response(path, 413, "too_large_for_the_gpu", str(e))
        except Exception as e:  # noqa: BLE001 - the caller gets a JSON 500, the log gets the traceback
            log.exception("%s failed", path)
            return error_response(path, 500, "internal_error", f"{type(e).__name__}: {e}")

    def route(self, path: str):
        """The handler of one route of the table."""
        def scoring(prepare_for):
            async def handler(request: Request):
                return await self.answer(request, prepare_for(request))
            return handler

        def vllm_route(pooling: bool):
            return scoring(lambda request: functools.partial(vllm.prepare, model=self.model, pooling=pooling,
                                                              request_id=request.headers.get("x-request-id")))

        return {"/get_reward": scoring(lambda request: openrlhf.prepare),
                "/v1/score": scoring(lambda request: ours.prepare),
                "/classify": vllm_route(False), "/v1/classify": vllm_route(False), "/pooling": vllm_route(True),
                "/v1/models": self.list_models, "/health": self.health, "/metrics": self.prometheus}[path]

    async def list_models(self, request: Request):
        if not self.authorized(request):
            return error_response(request.url.path, 401, "unauthorized", UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
        return vllm.models(self.model, self.model, self.scorer.max_length)

    async def health(self):
        b, o = self.batcher, self.options
        return {"status": "ok", "loaded": True, "model": self.model, "backend": self.scorer.backend,
                "devices": self.devices, "token_budget": self.scorer.token_budget, "max_length": self.scorer.max_length,
                "max_items": o.max_items, "queue": {"depth": b.queued if b else 0, "max": o.max_queue}}

    async def prometheus(self):
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def http_error(self, request: Request, e: HTTPException):
        """404, 405: the same error object as the routes' (vLLM's on vLLM's paths)."""
        kinds = {404: "not_found", 405: "method_not_allowed"}
        message = {404: f"no route {request.url.path}; see GET /docs", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(request.url.path, e.status_code, kinds.get(e.status_code, "http_error"), message,
                              getattr(e, "headers", None))


def create_app(scorer, model: str = "", options: ServeOptions | dict | None = None, **limits):
    """The app serving `scorer` as `model` (the name its answers give). options: a ServeOptions, a dict
    of its fields, or those fields as keywords (max_items=8, api_key="...", ...)."""
    service = Service(scorer, model, ServeOptions.of(options, **limits))
    app = FastAPI(title="worldpm-lite", lifespan=service.lifespan,
                  description="WorldPM preference scores over HTTP. Routes: " + startup_line() + ".")
    for r in ROUTES:
        app.add_api_route(r.path, service.route(r.path), methods=[r.method], summary=r.summary)
    app.add_exception_handler(HTTPException, service.http_error)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), with a clear error when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # every keep-alive response waits ~40 ms for the client's delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.listen(2048)
    return sock


def run_server(app, sock: socket.socket, log_level: str = "warning", access_log: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, then answer the requests in flight and return."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=access_log,
                                           timeout_keep_alive=30))
    # uvicorn re-raises the signal it drained for after shutting down; a handler that ignores it
    # lets a drained server exit 0 instead of dying by the signal it already handled
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
