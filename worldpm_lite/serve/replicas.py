"""`serve --replicas N`: N copies of the scorer behind one HTTP address, on Ray Serve (the `[ray]`
extra, which includes Ray Serve).

    serve_replicated("WorldPM-72B-gptq4", replicas=4, scorer_args=RuntimeOptions(device="auto"),
                     app_args=ServeOptions(max_queue=1024), host="0.0.0.0", port=8000, gpus_per_replica=2)

Client -> Front (uvicorn in this process, on host:port) -> a Serve handle -> Replica x N (a Serve
deployment). Each Replica loads one Scorer and runs app.create_app in its own process, with its own
dynamic Batcher: routes, error shapes, limits and the API key are single-process `serve`'s. The Front
reads a request's body with the app's own reader (http.read_body: a body over max_body is answered
413 there, in the route's error shape) and hands it to a replica through the handle, whose router
takes the less loaded of two random replicas by requests in flight (power of two choices). A replica
takes 2 x max_queue + 64 requests at once (a round taken from a full queue, the full queue, requests
being read), so its Batcher merges as many as single-process `serve` does, and the router never holds
back a request that a full queue would answer with 503 + Retry-After.

The Front is this process, not Ray Serve's HTTP proxy: one hop less per request; the socket is bound
as single-process `serve` binds it (port 0, a taken port); and the proxy answers a request whose replica
died under it with a bare 500, where the Front sends it to another replica.

Per-replica metrics: GET /metrics gathers every live replica's Prometheus text (a Serve broadcast) and
answers all their series, each with a label replica="<Serve replica id>" (sum by endpoint for the
service), plus the Front's worldpm_replica_failovers_total. GET /health is a replica's answer with the
queue summed over replicas and "replicas": [{"replica", "pid", "queue"}, ...].

Failover: Serve restarts a replica that dies, and its router sends nothing more to it once it knows.
A request that a replica held when it died goes to another one (scoring is idempotent), up to
FAILOVERS times; only when every try met a dying replica does the caller get 503 with Retry-After.

SIGTERM or Ctrl-C: the Front stops accepting connections and answers every request it has (the
replicas still score them), then each replica's Batcher closes, then Serve (if no other application
uses it) and a Ray cluster started here stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
from collections.abc import Callable

from ..errors import InputError, require_extra
from ..options import RuntimeOptions, ServeOptions
from .app import CLIENT_GONE
from .auth import SCOPE_KEY, PathKey
from .http import HTTPError, error_body, read_body
from .routes import startup_line

REPLICA = "worldpm-replica"
FAILOVERS = 3  # tries after the first when the replica holding a request dies
FRONT_BYTES_PER_TOKEN = 8  # a queued token's share of its request's JSON body (text or ids), generously
SLACK = 64  # requests a replica takes beyond its Batcher's limits: those being read and tokenized
DRAIN_S = 3600.0  # how long a replica Serve stops may take for its requests (a 72B queue can take minutes)


class ServeError(InputError):
    """The replicas cannot start as asked: the message says why."""


class Replica:
    """One Scorer behind create_app's routes. The Front calls `request` for every HTTP request and
    broadcasts `report` for /metrics and /health."""

    async def __init__(self, model: str, options: RuntimeOptions, limits: ServeOptions):
        from ray import serve
        from uvicorn.config import Config
        from uvicorn.lifespan.on import LifespanOn

        from ..ray import load_scorer
        from .app import create_app

        self.scorer = load_scorer(model, options)
        self.app = create_app(self.scorer, model=model, options=limits)
        self.lifespan = LifespanOn(Config(self.app, lifespan="on", log_config=None))  # starts the Batcher
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            raise RuntimeError("the scoring app did not start (see the replica's log)")
        self.id = serve.get_replica_context().replica_tag

    async def request(self, method: str, path: str, query: bytes, headers: list, body: bytes):
        """One HTTP request through create_app's app, in this process: (status, headers, body)."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": query,
                 "headers": headers, "client": None, "server": None}
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        start, chunks = {}, []

        async def receive():  # the body; then nothing more: a client that leaves is the Front's to see
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # until this request is answered (or cancelled by the Front)

        async def send(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        return start["status"], start.get("headers", []), b"".join(chunks)

    async def report(self) -> dict:
        """Who this replica is, its /health answer and its /metrics text."""
        health = (await self.request("GET", "/health", b"", [], b""))[2]
        metrics = (await self.request("GET", "/metrics", b"", [], b""))[2]
        return {"replica": self.id, "pid": os.getpid(), "health": json.loads(health), "metrics": metrics.decode()}

    async def __del__(self):
        """Called by Serve once no request is in flight here: the Batcher stops."""
        if hasattr(self, "lifespan"):
            await self.lifespan.shutdown()


class Front:
    """The ASGI app on host:port: each request to a replica, /metrics and /health from all of them."""

    def __init__(self, replicas, max_body: int, max_bytes: int, api_key: str | None = None):
        """max_bytes: request bodies this front may hold at once (read, waiting for their replica)."""
        from prometheus_client import CollectorRegistry, Counter

        self.replicas, self.max_body, self.max_bytes, self.api_key = replicas, max_body, max_bytes, api_key
        self.holding = 0  # bytes of the bodies in flight to a replica
        self.registry = CollectorRegistry()
        self.failovers = Counter("worldpm_replica_failovers", "requests sent to another replica after the one "
                                 "scoring them died", registry=self.registry)
        self.refused = Counter("worldpm_front_refused", "requests the front answered 503 because the bodies it "
                               "held reached its bound", registry=self.registry)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":  # nothing to start or stop here
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["method"] == "GET" and scope["path"] == "/metrics":
            status, headers, body = await self.metrics()
        elif scope["method"] == "GET" and scope["path"] == "/health":
            status, headers, body = await self.health()
        else:
            try:
                body = await read_body(receive, dict(scope["headers"]).get(b"content-length"), self.max_body)
                if self.holding + len(body) > self.max_bytes:
                    self.refused.inc()
                    raise HTTPError(503, f"the front holds {self.holding:,} bytes of requests (at most "
                                    f"{self.max_bytes:,}: --max-queue-tokens); retry shortly", "overloaded",
                                    {"retry-after": "1"})
            except HTTPError as e:  # too large, or too much held: answered here
                status, headers, body = json_response(*error_body(e.code, e.kind, str(e), e.param, scope["path"]),
                                                      [(k.encode(), v.encode()) for k, v in (e.headers or {}).items()])
            else:
                self.holding += len(body)
                try:
                    status, headers, body = await self.forward(scope, body, receive)
                finally:
                    self.holding -= len(body)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def forward(self, scope, body: bytes, receive):
        """A replica's answer to the request; when its client leaves first, the replica's call is cancelled
        (a request still queued there is then never scored) and nothing is answered."""
        from ray.exceptions import RayActorError

        headers = list(scope["headers"])
        if scope.get(SCOPE_KEY) is True:  # the path carried the key (PathKey took it out): say so to the replica
            headers.append((b"authorization", f"Bearer {self.api_key}".encode()))
        request = (scope["method"], scope["path"], scope["query_string"], headers, body)
        for _ in range(FAILOVERS + 1):
            response = self.replicas.request.remote(*request)
            answer, gone = asyncio.ensure_future(response), asyncio.ensure_future(disconnected(receive))
            try:
                await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if not answer.done():
                response.cancel()
                answer.cancel()
                return CLIENT_GONE, [], b""
            try:
                return answer.result()
            except RayActorError:  # its replica died holding it: another one scores it
                self.failovers.inc()
        status, error = error_body(503, "replica_died", f"the replica scoring this request died {FAILOVERS + 1} "
                                   "times in a row; retry", path=scope["path"])
        return json_response(status, error, [(b"retry-after", b"5")])

    async def reports(self) -> list[dict]:
        """Every live replica's report, by replica id (one dying meanwhile is left out)."""
        results = await self.replicas.broadcast("report").results_async(timeout_s=60, return_exceptions=True)
        return sorted((r for r in results if isinstance(r, dict)), key=lambda r: r["replica"])

    async def metrics(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name: f for f in self.registry.collect()}
        for report in await self.reports():
            for family in text_string_to_metric_families(report["metrics"]):
                samples = [s._replace(labels={**s.labels, "replica": report["replica"]}) for s in family.samples]
                if family.name in families:
                    families[family.name].samples.extend(samples)
                else:
                    family.samples = samples
                    families[family.name] = family
        text = generate_latest(_Collected(list(families.values())))
        return 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], text

    async def health(self):
        reports = await self.reports()
        if not reports:
            return json_response(503, {"status": "starting", "loaded": False, "replicas": []}, [(b"retry-after", b"5")])
        queues = [r["health"]["queue"] for r in reports]
        queue = {k: sum(q[k] for q in queues) for k in ("depth", "max")}
        return json_response(200, {**reports[0]["health"], "queue": queue,
                                   "replicas": [{"replica": r["replica"], "pid": r["pid"], "queue": q}
                                                for r, q in zip(reports, queues)]})


class _Collected:
    """What generate_latest reads: metric families already gathered."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


async def disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":  # the body is read: only this comes
        pass


def json_response(status: int, obj, headers: list | None = None) -> tuple[int, list, bytes]:
    """(status, ASGI headers, body) of a JSON answer."""
    return status, [(b"content-type", b"application/json"), *(headers or [])], json.dumps(obj).encode()


def _interrupt(*_):
    raise KeyboardInterrupt


def serve_replicated(model: str, replicas: int, scorer_args: RuntimeOptions | dict | None,
                     app_args: ServeOptions | dict | None, host: str, port: int, gpus_per_replica: float = 0,
                     cpus_per_replica: float = 1, ray_address: str | None = None, log: Callable[[str], None] = print,
                     ready: Callable[[str], None] | None = None) -> None:
    """Serve `model` from `replicas` Ray Serve replicas on host:port (0: any free port) until SIGTERM or
    SIGINT, then answer every request in flight and return. scorer_args: how each replica runs the model
    (RuntimeOptions, or a dict of its fields; `threads` sets the replica's torch threads); app_args: the
    service's limits and key (ServeOptions, or a dict of its fields). Uses the Ray of this process when
    initialized, else joins ray_address ($RAY_ADDRESS), else starts a local cluster for its own lifetime.
    The URL goes to ready(url) and to log as "serving <model> on <url> ...". A signal while the replicas
    start raises KeyboardInterrupt."""
    if replicas < 1:
        raise ServeError(f"--replicas: expected at least 1, found {replicas}")
    require_extra("ray", "ray", "ray.serve", what="--replicas", error=ServeError)
    import ray
    from ray import serve

    from ..ray import init_ray
    from .app import bind, default_queue_tokens, run_server

    options, limits = RuntimeOptions.of(scorer_args), ServeOptions.of(app_args)
    if limits.max_queue_tokens is None:  # this host's default shared by the replicas (on one host, they share it)
        limits = dataclasses.replace(limits, max_queue_tokens=max(1, default_queue_tokens() // replicas))
    started_ray = not ray.is_initialized()
    local = started_ray and ray_address is None and not os.environ.get("RAY_ADDRESS")  # a cluster of our own
    if local:  # the replicas read our files: a wrong path fails now, not after Serve retried every replica
        from ..checkpoint import Checkpoint

        Checkpoint(model)
    try:
        sock = bind(host, port)  # before anything starts: a taken port fails at once
    except OSError as e:
        raise ServeError(str(e)) from None
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    app = f"worldpm-lite-{port}"  # one Serve application per address: several can share a cluster
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if init_ray(ray_address):  # a local cluster of our own
            _check_room(ray.cluster_resources(), replicas, cpus_per_replica, gpus_per_replica)
        for s in previous:  # after ray.init, whose SIGTERM handler kills the process: stop starting instead
            signal.signal(s, _interrupt)
        if app in serve.status().applications:
            raise ServeError(f"this Ray cluster's Serve already runs {app}: is another serve --replicas on port "
                             f"{port} of another host?")
        handle = _deploy(serve, app, str(model), replicas, options, limits, gpus_per_replica, cpus_per_replica,
                         2 * limits.max_queue + SLACK)
        front = Front(handle, limits.max_body, limits.max_queue_tokens * replicas * FRONT_BYTES_PER_TOKEN,
                      limits.api_key)
        log(f"serving {model} on {url} with {replicas} replicas (Ray Serve): {startup_line()} (/metrics: series "
            f"per replica){'; API key required' if limits.api_key else ''}. SIGTERM or Ctrl-C answers the requests "
            "in flight, then exits")
        if ready is not None:
            ready(url)
        run_server(front if limits.api_key is None else PathKey(front, limits.api_key), sock)  # until a signal, then
        # until every request in flight is answered
        serve.delete(app)  # each replica's Batcher closes
    finally:
        sock.close()
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if ray.is_initialized():
            if app in serve.status().applications:  # a failed start or an interrupt
                serve.delete(app)
            if not local and not serve.status().applications:
                serve.shutdown()  # a cluster that outlives us keeps no idle Serve
        if started_ray:
            ray.shutdown()
    log("stopped after answering every request in flight")


def _check_room(resources: dict, replicas: int, cpus: float, gpus: float) -> None:
    """On a cluster of this machine alone, replicas that cannot all be placed would wait forever."""
    for what, each, flag in (("CPU", cpus, "--cpus-per-replica"), ("GPU", gpus, "--gpus-per-replica")):
        have = resources.get(what, 0)
        if replicas * each > have:
            raise ServeError(f"--replicas {replicas} x {flag} {each:g} needs {replicas * each:g} {what}s; this "
                             f"machine has {have:g}")


def _deploy(serve, app, model, replicas, options, limits, gpus, cpus, per_replica):
    """The replicas as a Serve application (no HTTP proxy: the Front is ours); their handle. A replica
    that cannot start is a ServeError saying why."""
    serve.start(proxy_location="Disabled")
    # health checks every second, not Serve's default 10 s: the router took a restarted replica only
    # after its first one (measured: 19 s from the kill to the first request there, 11.5 s with this)
    deployment = serve.deployment(Replica, name=REPLICA, num_replicas=replicas, max_ongoing_requests=per_replica,
                                  graceful_shutdown_timeout_s=DRAIN_S, graceful_shutdown_wait_loop_s=0.1,
                                  health_check_period_s=1, ray_actor_options={"num_cpus": cpus, "num_gpus": gpus})
    try:
        return serve.run(deployment.bind(model, options, limits), name=app, route_prefix=None)
    except RuntimeError as e:  # it names the deployment; the deployment's status ends with the replica's error
        status = serve.status().applications.get(app)
        message = status.deployments[REPLICA].message if status and REPLICA in status.deployments else str(e)
        last = [line.strip() for line in message.splitlines() if line.strip()][-1]
        kind, _, why = last.partition(": ")  # e.g. worldpm_lite.checkpoint.CheckpointError: /x: not a directory
        raise ServeError(f"the replicas did not start: {kind.rsplit('.', 1)[-1]}: {why}" if why else last) from None
