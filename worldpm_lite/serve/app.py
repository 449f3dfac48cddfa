"""`worldpm-lite serve`: the scorer as an HTTP service for RL training loops (FastAPI + uvicorn, the
optional extra `[serve]`).

The parts (see ARCHITECTURE.md): routes.py is the route table; ours.py, openrlhf.py and vllm.py each
turn one protocol's request body into the scorer's groups and its scores back into the protocol's
answer; http.py reads bodies and shapes errors; auth.py checks the API key (a header, or a path
segment for clients that cannot send headers); batcher.py merges concurrent requests into the
scorer's batches, requests with the same prompt computing it once; metrics.py counts; this module
wires them into one app; replicas.py runs copies of the app on Ray Serve.

A served score is the number `Scorer.score` / `score_texts` gives for the same input (exactly, on the
CPU), whatever else shares its round. The queue is bounded by the tokens it holds (a memory budget
stated at start), with a request count as a backstop: past it, 503 with Retry-After. A request whose
client has gone before the model took it is never scored. Bad input gets a 4xx JSON error naming the
field; a failure of ours a 500 that says "internal error" and a request id (the details go to the log).
With an API key only /health and /metrics are open (the OpenAPI schema is behind the key, the
interactive docs off); no answer shows a path on disk. On SIGTERM or Ctrl-C the server stops
accepting connections, answers every request it has, then exits.
"""

import asyncio
import contextlib
import functools
import logging
import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ..options import QUEUE_BYTES_PER_TOKEN, QUEUE_MEMORY_SHARE, ServeOptions
from ..scorer import DoesNotFit, NonFiniteScore
from . import openrlhf, ours, vllm
from .auth import PathKey, authorized
from .batcher import Batcher, Closed, QueueFull, TooLarge
from .http import HTTPError, error_body, read_body
from .metrics import Metrics
from .routes import OPEN, PROTOCOLS, ROUTES, startup_line

UNAUTHORIZED = "missing or wrong API key: send 'Authorization: Bearer <key>', or put it in the path: /k/<key>/<route>"
CLIENT_GONE = 499  # what the metrics count for a request whose client left (nothing is sent)
log = logging.getLogger("worldpm_lite.serve")


def error_response(path: str, code: int, kind: str, message: str, headers: dict | None = None,
                   param: str | None = None) -> JSONResponse:
    """An error in the shape of the route at `path` (serve/http.py)."""
    status, body = error_body(code, kind, message, param, path)
    return JSONResponse(body, status, headers)


def default_queue_tokens() -> int:
    """A quarter of the host memory available now, at QUEUE_BYTES_PER_TOKEN a queued token."""
    from ..offload_plan import host_memory_available

    return int(host_memory_available() * QUEUE_MEMORY_SHARE) // QUEUE_BYTES_PER_TOKEN


def served_names(model: str, options: ServeOptions) -> tuple[str, ...]:
    """The names answers report (the first) and requests may give: --served-model-name, else the hub id
    as given (what vLLM reports), else the model folder's name; never a path on disk."""
    from ..hub import is_hub_id

    return options.served_model_names or ((model,) if is_hub_id(model) else (Path(model).name or "worldpm",))


class Service:
    """What the routes share: the scorer and its Batcher (started and stopped with the app), the limits,
    the API key, the served names and the metrics."""

    def __init__(self, scorer, model: str, options: ServeOptions):
        self.scorer, self.options = scorer, options
        self.names = served_names(model, options)
        self.accepted = self.names + ((model,) if model and model not in self.names else ())  # verl sends its path
        self.queue_tokens = options.max_queue_tokens or default_queue_tokens()
        self.batcher: Batcher | None = None
        self.tokenizing: ThreadPoolExecutor | None = None
        self.metrics = Metrics(lambda: self.batcher.queued if self.batcher else 0,
                               lambda: self.batcher.queued_tokens if self.batcher else 0,
                               lambda: self.batcher.oldest_wait() if self.batcher else 0.0)
        self.devices = sorted({str(p.device) for p in scorer.model.parameters() if p.device.type != "meta"})

    def limits(self) -> str:
        """The queue's bounds, in words (the start-up line)."""
        gib = self.queue_tokens * QUEUE_BYTES_PER_TOKEN / 2**30
        return (f"queue: up to {self.queue_tokens:,} tokens (~{gib:.1f} GiB of host memory at {QUEUE_BYTES_PER_TOKEN} "
                f"B a token{'' if self.options.max_queue_tokens else ': a quarter of what is available'}) and "
                f"{self.options.max_queue:,} requests")

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.batcher = Batcher(self.scorer, self.options.max_wait, self.options.max_queue, self.metrics.on_step,
                               self.queue_tokens, self.metrics.shared_tokens.inc)
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="worldpm-tokenize")  # one tokenizer user
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self.batcher.close)
            self.tokenizing.shutdown()

    def authorized(self, request: Request) -> bool:
        return request.url.path in OPEN or authorized(request.scope, request.headers, self.options.api_key)

    def unauthorized(self, request: Request) -> Response:
        return error_response(request.url.path, 401, "unauthorized", UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})

    async def answer(self, request: Request, prepare) -> Response:
        """A scoring route's answer: the key checked, the body read and prepared (off the event loop),
        scored through the Batcher, counted in the metrics."""
        path, t0 = request.url.path, time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            response = await self.score(request, prepare) if self.authorized(request) else self.unauthorized(request)
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
            scores = await self.unless_gone(request, future)
            return Response(status_code=CLIENT_GONE) if scores is None else JSONResponse(finish(scores))
        except HTTPError as e:
            return error_response(path, e.code, e.kind, str(e), e.headers, e.param)
        except QueueFull as e:
            self.metrics.refused.labels(e.reason).inc()
            return error_response(path, 503, "overloaded", str(e), {"Retry-After": str(e.retry_after)})
        except TooLarge as e:
            return error_response(path, 413, "too_large_for_the_queue", str(e))
        except Closed as e:
            return error_response(path, 503, "shutting_down", str(e), {"Retry-After": "5"})
        except NonFiniteScore as e:
            return error_response(path, 500, "model_error", str(e))
        except DoesNotFit as e:
            return error_response(path, 413, "too_large_for_the_gpu", str(e))
        except Exception:  # noqa: BLE001 - the caller gets a JSON 500 and an id, the log the traceback
            rid = uuid.uuid4().hex[:16]
            log.exception("%s failed (request %s)", path, rid)
            return error_response(path, 500, "internal_error", f"internal error (request {rid}); the server's log "
                                  "has the details", {"X-Request-Id": rid})

    async def unless_gone(self, request: Request, future):
        """The request's scores, or None when its client disconnects first (ASGI's receive channel says
        so): a request the worker has not taken yet is then taken out of the queue and never scored."""
        scores = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(self.disconnected(request))
        try:
            await asyncio.wait({scores, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the call itself was cancelled (a Ray Serve front whose client left)
            if self.batcher.abandon(future):
                self.metrics.abandoned.inc()
            raise
        finally:
            gone.cancel()
        if scores.done():
            return scores.result()
        if self.batcher.abandon(future):
            self.metrics.abandoned.inc()
        scores.cancel()
        return None

    @staticmethod
    async def disconnected(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":  # the body is read: only this comes
            pass

    def route(self, path: str):
        """The handler of one route of the table."""
        def scoring(prepare_for):
            async def handler(request: Request):
                return await self.answer(request, prepare_for(request))
            return handler

        def vllm_route(pooling: bool):
            return scoring(lambda request: functools.partial(vllm.prepare, names=self.accepted,
                                                              pooling=pooling,
                                                              request_id=request.headers.get("x-request-id")))

        return {"/get_reward": scoring(lambda request: openrlhf.prepare),
                "/v1/score": scoring(lambda request: ours.prepare),
                "/classify": vllm_route(False), "/v1/classify": vllm_route(False), "/pooling": vllm_route(True),
                "/v1/models": self.list_models, "/health": self.health, "/metrics": self.prometheus}[path]

    async def list_models(self, request: Request):
        return vllm.models(self.names, self.scorer.max_length) if self.authorized(request) else \
            self.unauthorized(request)

    async def health(self):
        b, o = self.batcher, self.options
        return {"status": "ok", "loaded": True, "model": self.names[0], "backend": self.scorer.backend,
                "devices": self.devices, "token_budget": self.scorer.token_budget, "max_length": self.scorer.max_length,
                "max_items": o.max_items, "queue": {"depth": b.queued if b else 0, "max": o.max_queue,
                                                    "tokens": b.queued_tokens if b else 0,
                                                    "max_tokens": self.queue_tokens}}

    async def prometheus(self):
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def http_error(self, request: Request, e: HTTPException):
        """404, 405: the same error object as the routes' (vLLM's on vLLM's paths)."""
        if not self.authorized(request):  # under a key, nothing but /health and /metrics says what exists
            return self.unauthorized(request)
        kinds = {404: "not_found", 405: "method_not_allowed"}
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(request.url.path, e.status_code, kinds.get(e.status_code, "http_error"), message,
                              getattr(e, "headers", None))


def create_app(scorer, model: str = "", options: ServeOptions | dict | None = None, **limits):
    """The app serving `scorer`. model: the --model argument (its folder's name is the served name unless
    options.served_model_names says otherwise; requests may give it as their `model`). options: a
    ServeOptions, a dict of its fields, or those fields as keywords (max_items=8, api_key="...", ...)."""
    options = ServeOptions.of(options, **limits)
    service = Service(scorer, model, options)
    closed = options.api_key is not None
    app = FastAPI(title="worldpm-lite", lifespan=service.lifespan, version="1",
                  description="WorldPM preference scores over HTTP. Routes: " + startup_line() + ".",
                  **({"openapi_url": None, "docs_url": None, "redoc_url": None} if closed else {}))
    for r in ROUTES:
        app.add_api_route(r.path, service.route(r.path), methods=[r.method], summary=r.summary,
                          **openapi_of(r, closed))
    if closed:  # the schema behind the key; the interactive pages, which fetch it without one, off
        async def schema(request: Request):
            return JSONResponse(app.openapi()) if service.authorized(request) else service.unauthorized(request)
        app.add_api_route("/openapi.json", schema, methods=["GET"], include_in_schema=False)
        app.add_middleware(PathKey, key=options.api_key)
    app.add_exception_handler(HTTPException, service.http_error)
    app.state.service = service
    return app


def openapi_of(route, closed: bool) -> dict:
    """What the OpenAPI schema says of a route: its request body and every status it answers."""
    from .openapi import describe

    return describe(route, PROTOCOLS[route.protocol], closed)


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
