"""`worldpm-lite serve`: the scorer as an HTTP service for RL training loops (FastAPI + uvicorn,
the optional extra `[serve]`).

  POST /get_reward  OpenRLHF's remote reward model protocol: {"query": [text, ...], "prompts": [...],
                    "labels": [...]} -> {"rewards": [...], "scores": [...], "extra_logs": {}}. Each query
                    is the whole conversation as the chat template renders it and is not templated
                    again; <|endoftext|> padding at either end is dropped and one <|endoftext|> ends it
                    (chat.encode_text). Queries with the same `prompts` entry share their common
                    leading tokens' computation; labels are ignored.
  POST /classify, /v1/classify, /pooling, GET /v1/models
                    vLLM's pooling API in vLLM's shapes (vllm_api.py): what verl's reward loop sends.
  POST /v1/score    `score`'s request objects (one, or a list) -> its result objects.
  GET  /health      loaded, backend, devices, limits.
  GET  /metrics     Prometheus text: requests, conversations, tokens, batch sizes, latency, queue depth.

With an API key every route but /health and /metrics wants `Authorization: Bearer <key>` (401 otherwise).

Concurrent requests are merged into the scorer's batches (batcher.py). A served score is the number
`Scorer.score` / `score_texts` gives for the same input (exactly, on the CPU). Bad input gets a 4xx
JSON error {"error": {"code", "type", "message"}} naming the field (vLLM's error object on vLLM's
routes); a full queue gets 503 with Retry-After. On SIGTERM or Ctrl-C the server stops accepting
connections, answers every request it has, then exits.
"""

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from .batcher import Batcher, Closed, QueueFull
from .chat import ConversationError
from .data import parse_request
from .scorer import ConversationTooLong, DoesNotFit, NonFiniteScore, in_text_order

MAX_ITEMS = 512  # conversations (or queries) per HTTP request
MAX_BODY = 64 << 20  # bytes
MAX_QUEUE = 1024  # requests waiting for the model
MAX_WAIT_MS = 5.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
POWERS = tuple(2.0 ** k for k in range(17))
VLLM_ROUTES = ("/classify", "/v1/classify", "/pooling", "/v1/models")  # errors in vLLM's shape there
log = logging.getLogger("worldpm_lite.serve")


class HTTPError(Exception):
    def __init__(self, code: int, message: str, kind: str = "invalid_request", headers: dict | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.code, self.kind, self.headers, self.param = code, kind, headers, param


def _json(body: bytes):
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise HTTPError(400, f"body: not UTF-8 text ({e.reason} at byte {e.start})", "malformed_json") from None
    except json.JSONDecodeError as e:
        raise HTTPError(400, f"body: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                        "malformed_json") from None


def error_body(code: int, kind: str, message: str, param: str | None = None, vllm: bool = False) -> dict:
    """Our JSON error {"error": {"code", "type", "message"}}, or with vllm (on VLLM_ROUTES) vLLM's
    error object, whose "code" is the HTTP status to answer with (vLLM has no 422)."""
    if vllm:
        from . import vllm_api

        return vllm_api.error_body(code, message, param)
    return {"error": {"code": code, "type": kind, "message": message}}


def _too_many(n: int, what: str, max_items: int) -> HTTPError:
    return HTTPError(413, f"body: {n} {what}; this server takes at most {max_items} per request (--max-items); "
                     "split them over several requests", "too_many_items")


def prepare_score(scorer, body: bytes, max_items: int):
    """/v1/score: (groups, finish) where finish(scores per group) is the response's JSON."""
    data = _json(body)
    single = isinstance(data, dict)
    objs = [data] if single else data
    if not isinstance(objs, list) or not objs:
        raise HTTPError(422, "body: expected a request object ({\"messages\": ...}, {\"prompt\", \"chosen\", "
                        "\"rejected\"} or {\"prompt\", \"responses\"}) or a non-empty list of them")
    requests = []
    for i, obj in enumerate(objs):
        where = "request" if single else f"request[{i}]"
        try:
            requests.append(parse_request(obj, where))
        except ConversationError as e:
            raise HTTPError(422, str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    n = sum(len(r.conversations) for r in requests)
    if n > max_items:
        raise _too_many(n, "conversations", max_items)
    groups = []
    for i, r in enumerate(requests):
        where = "request" if single else f"request[{i}]"
        try:
            groups.append(scorer.group(r.conversations, r.prompt, f"{where} conversation"))
        except (ConversationError, ConversationTooLong) as e:
            raise HTTPError(422, str(e)) from None

    def finish(scores):
        results = [r.result(s) for r, s in zip(requests, scores)]
        return results[0] if single else results

    return groups, finish


def prepare_reward(scorer, body: bytes, max_items: int):
    """/get_reward (OpenRLHF): (groups, finish)."""
    data = _json(body)
    if not isinstance(data, dict):
        raise HTTPError(422, f"body: expected an object {{\"query\": [text, ...]}}, found {type(data).__name__}")
    queries = data.get("query")
    if not isinstance(queries, list) or not queries:
        raise HTTPError(422, "query: expected a non-empty list of strings (each a whole conversation as the chat "
                        f"template renders it), found {'nothing' if queries is None else type(queries).__name__}")
    if len(queries) > max_items:
        raise _too_many(len(queries), "queries", max_items)
    labels = data.get("labels")
    if labels is not None and not isinstance(labels, list):  # OpenRLHF sends them; a reward model ignores them
        raise HTTPError(422, f"labels: expected a list (any JSON values, ignored), found {type(labels).__name__}")
    try:
        groups, order = scorer.text_groups(queries, data.get("prompts"))
    except (ConversationError, ConversationTooLong) as e:
        raise HTTPError(422, str(e)) from None

    def finish(scores):
        # OpenRLHF's client reads "rewards", then "scores" (falling back to the rewards), then "extra_logs"
        rewards = in_text_order(order, scores)
        return {"rewards": rewards, "scores": rewards, "extra_logs": {}}

    return groups, finish


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


def create_app(scorer, model: str = "", max_items: int = MAX_ITEMS, max_queue: int = MAX_QUEUE,
               max_wait: float = MAX_WAIT_MS / 1000, max_body: int = MAX_BODY, api_key: str | None = None):
    """api_key: when set, every scoring route (and /v1/models) wants `Authorization: Bearer <api_key>`;
    /health and /metrics stay open."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException

    from . import vllm_api

    state: dict = {}
    metrics = Metrics(lambda: state["batcher"].queued if "batcher" in state else 0)
    devices = sorted({str(p.device) for p in scorer.model.parameters() if p.device.type != "meta"})
    backend = scorer.backend

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["batcher"] = Batcher(scorer, max_wait, max_queue, metrics.on_step)
        state["prepare"] = ThreadPoolExecutor(1, thread_name_prefix="worldpm-tokenize")  # one tokenizer user
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state["batcher"].close)
            state["prepare"].shutdown()

    app = FastAPI(title="worldpm-lite", lifespan=lifespan,
                  description="WorldPM preference scores over HTTP. POST /get_reward (OpenRLHF), POST /classify "
                  "and /pooling (vLLM's pooling API, as verl calls it), POST /v1/score.")

    def ours(code: int, kind: str, message: str, headers: dict | None = None, param: str | None = None):
        return JSONResponse(error_body(code, kind, message), code, headers)

    def vllm(code: int, kind: str, message: str, headers: dict | None = None, param: str | None = None):
        body = error_body(code, kind, message, param, vllm=True)
        return JSONResponse(body, body["error"]["code"], headers)

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())

    async def answer(endpoint: str, request: Request, prepare, error=ours):
        t0 = time.perf_counter()
        metrics.in_flight.inc()
        try:
            if authorized(request):
                response = await _respond(request, prepare, error)
            else:
                response = error(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                 {"WWW-Authenticate": "Bearer"})
        finally:
            metrics.in_flight.dec()
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    async def _respond(request: Request, prepare, error):
        batcher = state["batcher"]
        try:
            with batcher.coming():
                body = await _read(request, max_body)
                loop = asyncio.get_running_loop()
                groups, finish = await loop.run_in_executor(state["prepare"], prepare, scorer, body, max_items)
                future = batcher.submit(groups)
            return JSONResponse(finish(await asyncio.wrap_future(future)))
        except HTTPError as e:
            return error(e.code, e.kind, str(e), e.headers, e.param)
        except QueueFull as e:
            return error(503, "overloaded", str(e), {"Retry-After": str(e.retry_after)})
        except Closed as e:
            return error(503, "shutting_down", str(e), {"Retry-After": "5"})
        except NonFiniteScore as e:
            return error(500, "model_error", str(e))
        except DoesNotFit as e:
            return error(413, "too_large_for_the_gpu", str(e))
        except Exception as e:  # noqa: BLE001 - the caller gets a JSON 500, the log gets the traceback
            log.exception("%s failed", request.url.path)
            return error(500, "internal_error", f"{type(e).__name__}: {e}")

    @app.post("/get_reward", summary="OpenRLHF remote reward model: {\"query\": [text, ...]} -> {\"rewards\": [...]}")
    async def get_reward(request: Request):
        return await answer("/get_reward", request, prepare_reward)

    @app.post("/v1/score", summary="score's request objects (one or a list) -> its result objects")
    async def score(request: Request):
        return await answer("/v1/score", request, prepare_score)

    async def classify(request: Request, endpoint: str, pooling: bool = False):
        prepare = functools.partial(vllm_api.prepare, model=model, pooling=pooling,
                                    request_id=request.headers.get("x-request-id"))
        return await answer(endpoint, request, prepare, vllm)

    @app.post("/classify", summary="vLLM's classify API: {\"input\" | \"messages\", \"use_activation\"} -> "
              "data[i].probs = [value]")
    async def classify_route(request: Request):
        return await classify(request, "/classify")

    @app.post("/v1/classify", summary="the same as /classify")
    async def classify_v1(request: Request):
        return await classify(request, "/v1/classify")

    @app.post("/pooling", summary="vLLM's pooling API (task classify): data[i].data = [value]")
    async def pooling_route(request: Request):
        return await classify(request, "/pooling", pooling=True)

    @app.get("/v1/models", summary="vLLM's model list: the one model served")
    async def list_models(request: Request):
        if not authorized(request):
            return vllm(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                        {"WWW-Authenticate": "Bearer"})
        return vllm_api.models(model, model, scorer.max_length)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # 404, 405: the same error object as the routes'
        kinds = {404: "not_found", 405: "method_not_allowed"}
        message = {404: f"no route {request.url.path}; see GET /docs", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(e.status_code, str(e.detail))
        shape = vllm if request.url.path in VLLM_ROUTES else ours
        return shape(e.status_code, kinds.get(e.status_code, "http_error"), message, getattr(e, "headers", None))

    @app.get("/health")
    async def health():
        b = state.get("batcher")
        return {"status": "ok", "loaded": True, "model": model, "backend": backend, "devices": devices,
                "token_budget": scorer.token_budget, "max_length": scorer.max_length, "max_items": max_items,
                "queue": {"depth": b.queued if b else 0, "max": max_queue}}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _read(request, limit: int) -> bytes:
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise HTTPError(413, f"body: {int(size)} bytes; this server takes at most {limit}", "body_too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise HTTPError(413, f"body: more than {limit} bytes; this server takes at most {limit}",
                            "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


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
