"""`worldpm-lite serve`: the HTTP service (serve/app.py), or with --replicas N copies of it on Ray Serve
(serve/replicas.py)."""

from __future__ import annotations

import argparse
import dataclasses
import os

from ..errors import UsageError, require_extra
from ..options import QUEUE_BYTES_PER_TOKEN
from ..options import ServeOptions as S
from ..serve.routes import help_text, startup_line
from .common import add_runtime, load_scorer, log, model_path, runtime_options
from .score import worker_threads

MIB = 1 << 20


def add(sub) -> None:
    p = sub.add_parser("serve", help="an HTTP scoring service for RL trainers (OpenRLHF, vLLM pooling API, TRL)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Serve the model over HTTP (needs the [serve] extra: pip install "
                       "'worldpm-lite[serve]').\n\n" + help_text() + "\n\n"
                       "Concurrent requests are merged into batches under the token budget; each caller gets\n"
                       "exactly the scores Scorer.score gives (on the CPU; within rounding on GPUs). Bad input\n"
                       "gets a 4xx JSON error naming the field; a full queue 503 with Retry-After. SIGTERM or\n"
                       "Ctrl-C: no new connections, every request in flight answered, then exit 0.\n\n"
                       "  worldpm-lite serve --model WorldPM-72B-gptq4 --host 0.0.0.0 --port 8000\n"
                       "  curl -d '{\"prompt\": \"Hi\", \"chosen\": \"Hello!\", \"rejected\": \"Go away.\"}' "
                       "localhost:8000/v1/score")
    add_runtime(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000 (0: any free port, printed at start)")
    p.add_argument("--max-items", type=int, default=S.max_items,
                   help=f"conversations or queries per request (default: {S.max_items})")
    p.add_argument("--max-queue-tokens", type=int, help="tokens the queue may hold (requests read and tokenized, "
                   "waiting for the model) before new ones get 503 + Retry-After; the start-up line says the memory "
                   f"it stands for (default: a quarter of the host memory available, at {QUEUE_BYTES_PER_TOKEN} B a "
                   "token)")
    p.add_argument("--max-queue", type=int, default=S.max_queue, help="requests the queue may hold, a backstop behind "
                   f"--max-queue-tokens (default: {S.max_queue})")
    p.add_argument("--max-wait-ms", type=float, default=S.max_wait * 1000, help="how long a batch below the token "
                   f"budget waits for more requests (default: {S.max_wait * 1000:g})")
    p.add_argument("--max-body-mib", type=float, default=S.max_body / MIB,
                   help=f"largest request body (default: {S.max_body / MIB:g} MiB)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level (default: warning)")
    p.add_argument("--access-log", action="store_true", help="log every request (default: off)")
    p.add_argument("--api-key", help="require the key on every route but /health and /metrics: 'Authorization: "
                   "Bearer KEY', or for clients that cannot send headers (OpenRLHF) in the path: "
                   "http://HOST:PORT/k/KEY/get_reward. The OpenAPI schema is then behind it and /docs off "
                   "(default: $WORLDPM_LITE_API_KEY; none: open). Never logged")
    p.add_argument("--served-model-name", nargs="+", help="the names a request's `model` may give, as vLLM's flag "
                   "(answers report the first); the --model argument is accepted too (default: the model folder's "
                   "name)")
    p.add_argument("--replicas", type=int, help="N replicas of the model on Ray Serve behind this one address (needs "
                   "the [ray] extra): each with its own batching, requests to the less loaded, a replica that dies "
                   "restarted and its requests sent to another; /metrics has series per replica (default: one "
                   "process, no Ray)")
    p.add_argument("--gpus-per-replica", type=float, default=0, help="with --replicas: GPUs per replica (2 for 4-bit "
                   "WorldPM-72B on 2 x 24 GB; default: 0, the CPU)")
    p.add_argument("--cpus-per-replica", type=float, default=1, help="with --replicas: CPUs per replica, also its "
                   "torch threads (default: 1)")
    p.add_argument("--ray-address", help="with --replicas: a running cluster (e.g. auto; default: $RAY_ADDRESS, "
                   "else a local one on this machine)")
    p.set_defaults(run=run)


def run(args) -> None:
    require_extra("serve", "fastapi", "prometheus_client", "uvicorn", what="serve")
    api_key = args.api_key or os.environ.get("WORLDPM_LITE_API_KEY") or None
    args.api_key = None  # never echoed: nothing below prints args
    limits = S(max_items=args.max_items, max_queue_tokens=args.max_queue_tokens, max_queue=args.max_queue,
               max_wait=args.max_wait_ms / 1000, max_body=int(args.max_body_mib * MIB),
               served_model_names=tuple(args.served_model_name or ()), api_key=api_key)
    if args.replicas is not None:
        return run_replicas(args, limits)
    from ..serve.app import bind, create_app, run_server

    try:
        sock = bind(args.host, args.port)  # before the model loads: a taken port fails at once
    except OSError as e:
        raise UsageError(str(e)) from None
    scorer = load_scorer(model_path(args), runtime_options(args))
    app = create_app(scorer, model=args.model, options=limits)
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    service = app.state.service
    log(f"serving {args.model} as {', '.join(service.names)} on {url}: {startup_line()}"
        f"{'; API key required (a header, or /k/KEY/ before the route)' if api_key else ''}; "
        f"{service.limits()}. SIGTERM or Ctrl-C answers the requests in flight, then exits")
    run_server(app, sock, log_level=args.log_level, access_log=args.access_log)
    log("worldpm-lite serve: stopped after answering every request in flight")


def run_replicas(args, limits: S) -> None:
    from ..serve.replicas import serve_replicated

    if args.replicas < 1 or args.cpus_per_replica < 0 or args.gpus_per_replica < 0:
        raise UsageError("--replicas: expected at least 1; --cpus-per-replica, --gpus-per-replica: at least 0")
    options = runtime_options(args, threads=worker_threads(args.cpus_per_replica))
    from ..serve.app import served_names

    limits = dataclasses.replace(limits, served_model_names=served_names(args.model, limits))  # not the folder's
    serve_replicated(model_path(args), args.replicas, options, limits, args.host, args.port, args.gpus_per_replica,
                     args.cpus_per_replica, args.ray_address, log=log)
