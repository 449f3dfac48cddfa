"""worldpm-lite command line: score, serve, selfcheck, quantize, plan, fidelity, make-tiny, demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .chat import ConversationError
from .checkpoint import CheckpointError
from .tiny import TrainConfig

# The two conversations from WorldPM's README and the scores the bf16 base model gives them.
README_PAIR = [
    [{"role": "system", "content": ""},
     {"role": "user", "content": "Tips for better sleep?"},
     {"role": "assistant", "content": "Three key tips for better sleep:\n1. Set a consistent bedtime and wake-up "
      "schedule\n2. Avoid screens 1 hour before bed\n3. Keep your bedroom cool and dark\n\nStart with these habits "
      "and you should notice improvement within a week."}],
    [{"role": "system", "content": ""},
     {"role": "user", "content": "Tips for better sleep?"},
     {"role": "assistant", "content": "just try sleeping earlier or take some pills if u cant sleep lol. maybe watch "
      "tv until u get tired idk"}],
]
PUBLISHED_72B = [0.6298332214355469, -1.6425328254699707]



class UsageError(ValueError):
    pass


def _gpu_sizes(text: str, flag: str) -> dict[int, int]:
    """'24GiB,24GiB' -> {0: bytes, 1: bytes}."""
    from .plan import parse_size

    try:
        return dict(enumerate(parse_size(g) for g in text.split(",")))
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None


def _scorer_args(args, log: bool = True) -> dict:
    """Scorer.from_pretrained keyword arguments from the options of _add_compute (log: say where the
    layers go on stderr, with the device line, when the device is auto)."""
    from .devices import describe

    out = dict(device=args.device, dtype=args.dtype, backend=args.backend, token_budget=args.token_budget,
               max_memory=_gpu_sizes(args.max_memory, "--max-memory") if args.max_memory else None,
               truncation="left" if args.truncate else "error", packing=not args.no_packing,
               share_prompts=not args.no_shared_prompts, pipeline=not args.no_pipeline,
               offload={"auto": None, "on": True, "off": False}[args.offload], host_memory=_host_memory(args))
    if log and args.device == "auto":
        out["log"] = lambda summary: print(f"{describe('auto')}: {summary}", file=sys.stderr)
    return out


def _host_memory(args) -> int | None:
    from .plan import parse_size

    try:
        return parse_size(args.host_memory) if getattr(args, "host_memory", None) else None
    except ValueError as e:
        raise UsageError(f"--host-memory: {e}") from None


def _scorer(args):
    from .scorer import Scorer

    scorer = Scorer.from_pretrained(args.model, quant=args.quant, **_scorer_args(args))
    print(f"backend: {scorer.backend}", file=sys.stderr)
    return scorer


def _check_device(args) -> None:
    """Resolve --device (auto: the GPUs when any is visible, else the CPU) and say which, before any work
    (for a command that places layers on GPUs, the line comes with the placement, once it is planned)."""
    from .devices import check_device, describe

    args.device = check_device(args.device)
    if not (args.device == "auto" and hasattr(args, "offload")):
        print(describe(args.device), file=sys.stderr)


def cmd_score(args):
    from .stream import score_file, score_settings

    if args.ray:
        return _score_ray(args)
    if args.resume and not args.output:
        raise UsageError("--resume: needs --output (results on standard output cannot be resumed)")
    scorer = _scorer(args)
    n = score_file(scorer, args.input, args.output, score_settings(scorer, args.model), resume=args.resume,
                   log=lambda m: print(m, file=sys.stderr))
    if args.output:
        print(f"wrote {n} results to {args.output}", file=sys.stderr)


def cmd_serve(args):
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError(f"serve needs the [serve] extra ({e.name} is not installed): pip install "
                         "'worldpm-lite[serve]'") from None
    from .serve import bind, create_app, run_server

    for flag, value, low in (("--max-items", args.max_items, 1), ("--max-queue", args.max_queue, 1),
                             ("--max-wait-ms", args.max_wait_ms, 0), ("--max-body-mib", args.max_body_mib, 1)):
        if value < low:
            raise UsageError(f"{flag}: expected at least {low}, found {value}")
    api_key = args.api_key or os.environ.get("WORLDPM_LITE_API_KEY") or None
    args.api_key = None  # never echoed: nothing below prints args
    if args.replicas is not None:
        return _serve_replicas(args, api_key)
    try:
        sock = bind(args.host, args.port)  # before the model loads: a taken port fails at once
    except OSError as e:
        raise UsageError(str(e)) from None
    scorer = _scorer(args)
    app = create_app(scorer, model=args.model, **_app_args(args, api_key))
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    print(f"serving {args.model} on {url}: POST /get_reward (OpenRLHF), POST /classify, /v1/classify, /pooling, "
          "GET /v1/models (vLLM's pooling API), POST /v1/score, GET /health, GET /metrics"
          f"{'; API key required' if api_key else ''}. SIGTERM or Ctrl-C answers the requests in flight, then exits",
          file=sys.stderr, flush=True)
    run_server(app, sock, log_level=args.log_level, access_log=args.access_log)
    print("worldpm-lite serve: stopped after answering every request in flight", file=sys.stderr)


def _ray_scorer_args(args, cpus: float) -> dict:
    """Scorer arguments for a Ray worker or replica: it resolves its own device; its torch threads are
    its whole CPUs, if any (else torch's choice)."""
    return _scorer_args(args, log=False) | {"quant": args.quant} | ({"threads": int(cpus)} if cpus >= 1 else {})


def _app_args(args, api_key: str | None) -> dict:
    return {"max_items": args.max_items, "max_queue": args.max_queue, "max_wait": args.max_wait_ms / 1000,
            "max_body": int(args.max_body_mib * (1 << 20)), "api_key": api_key}


def _serve_replicas(args, api_key: str | None):
    from .ray_serve import serve_replicated

    if args.replicas < 1 or args.cpus_per_replica < 0 or args.gpus_per_replica < 0:
        raise UsageError("--replicas: expected at least 1; --cpus-per-replica, --gpus-per-replica: at least 0")
    scorer_args = _ray_scorer_args(args, args.cpus_per_replica)
    serve_replicated(args.model, args.replicas, scorer_args, _app_args(args, api_key), args.host, args.port,
                     args.gpus_per_replica, args.cpus_per_replica, args.ray_address,
                     log=lambda m: print(m, file=sys.stderr, flush=True))


def _score_ray(args):
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UsageError("--ray needs the [ray] extra (ray is not installed): pip install "
                         "'worldpm-lite[ray]'") from None
    from .ray import score_dataset

    if not args.output:
        raise UsageError("--ray: needs --output: a folder (ending in /) for part files, or one .jsonl or .parquet file")
    if args.workers < 1 or args.cpus_per_worker < 0 or args.gpus_per_worker < 0 or args.block_rows < 1:
        raise UsageError("--workers, --block-rows: expected at least 1; --cpus-per-worker, --gpus-per-worker: at "
                         "least 0")
    scorer_args = _ray_scorer_args(args, args.cpus_per_worker)
    n = score_dataset(args.input, args.output, args.model, args.workers, args.ray_address, args.gpus_per_worker,
                      args.cpus_per_worker, args.block_rows, args.resume, scorer_args=scorer_args,
                      log=lambda m: print(m, file=sys.stderr), progress=True)
    print(f"wrote {n} results to {args.output}", file=sys.stderr)


def cmd_selfcheck(args):

    scorer = _scorer(args)
    scores = scorer.score(README_PAIR)
    cfg = scorer.model.config
    print(f"README pair scores: [{scores[0]:.6f}, {scores[1]:.6f}]")
    from .plan import WORLDPM_72B

    shape = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
             "vocab_size")
    is_72b = all(getattr(cfg, k) == getattr(WORLDPM_72B, k) for k in shape)
    if not is_72b or args.no_reference:
        print("not WorldPM-72B-shaped: no published scores to compare with" if not is_72b else "comparison skipped")
        return 0
    ok, diffs = matches_published(scores, args.atol)
    print(f"published (WorldPM-72B, bf16): {PUBLISHED_72B}")
    print(f"abs difference: [{diffs[0]:.4f}, {diffs[1]:.4f}]  tolerance {args.atol}")
    if ok:
        print("selfcheck passed")
        return 0
    print("selfcheck FAILED: scores differ from the published WorldPM-72B values. A fine-tuned variant "
          "(WorldPM-72B-HelpSteer2, -UltraFeedback, -RLHFLow) scores differently: use --no-reference for those.")
    return 1


def matches_published(scores: list[float], atol: float) -> tuple[bool, list[float]]:
    """Both README scores within atol of WorldPM-72B's published ones, in the same order."""
    diffs = [abs(a - b) for a, b in zip(scores, PUBLISHED_72B)]
    return max(diffs) <= atol and scores[0] > scores[1], diffs


def cmd_make_tiny(args):
    from .tiny import make_tiny

    cfg = TrainConfig(seed=args.seed, steps=args.steps, pairs=args.pairs, heldout=args.heldout, lr=args.lr,
                      weight_decay=args.weight_decay)
    report = make_tiny(args.out, log=lambda m: print(m, file=sys.stderr), train_cfg=cfg)
    h = report["heldout"]
    print(f"wrote {args.out}: held-out pairwise accuracy {h['pairwise_accuracy']:.3f} on {report['heldout_pairs']} "
          f"pairs, score std {h['score_std']:.3f}, range [{h['score_min']:.2f}, {h['score_max']:.2f}], "
          f"trained in {report['train_seconds']:.0f}s")
    print("  accuracy by kind of rejected reply: "
          + ", ".join(f"{k} {v:.3f}" for k, v in h["accuracy_by_kind"].items()))


def cmd_quantize(args):
    from tqdm import tqdm

    from .quantize.run import QuantizeSettings, quantize_checkpoint

    settings = QuantizeSettings(bits=args.bits, group_size=args.group_size, sym=not args.asym, act_order=args.act_order,
                                method=args.method, samples=args.samples, seq_len=args.seq_len,
                                calibration=args.calibration, device=args.device)
    with tqdm(desc="quantizing layers", unit="layer", file=sys.stderr, dynamic_ncols=True, delay=1) as bar:
        summary = quantize_checkpoint(args.model, args.out, settings, resume=args.resume, overwrite=args.overwrite,
                                      log=lambda m: bar.write(m, file=sys.stderr), layer_bar=bar)
    gib = 1 << 30
    worst = max(summary["layers"], key=lambda r: r["output_rel_error"], default=None)
    print(f"wrote {args.out}: {args.bits}-bit {args.method.upper()}, group {args.group_size}, "
          f"{summary['calibration_sequences']} calibration sequences ({summary['calibration_tokens']} tokens)")
    print(f"  time {summary['seconds']:.1f} s, peak host memory {summary['peak_rss_mib'] / 1024:.2f} GiB")
    out_b, src_b = summary["output_weight_bytes"], summary["source_weight_bytes"]
    print(f"  weights {out_b / gib:.3f} GiB vs source {src_b / gib:.3f} GiB ({out_b / src_b:.1%})")
    if worst is not None:
        print(f"  largest layer output error (relative, calibration): {worst['output_rel_error']:.2e} "
              f"in layer {worst['layer']}; per-layer log in {Path(args.out) / 'quantize_log.json'}")


def cmd_plan(args):
    from .offload_plan import H2D_GBPS, TFLOPS, plan_text

    if (args.h2d_gbps or 1) <= 0 or (args.tflops or 1) <= 0:
        raise UsageError("--h2d-gbps, --tflops: expected positive numbers")
    text, fits = plan_text(args.model, _gpu_sizes(args.gpus, "--gpus"), args.bits, args.batch_tokens,
                           _host_memory(args), args.h2d_gbps or H2D_GBPS, args.tflops or TFLOPS)
    print(text)
    return 0 if fits else 1


def cmd_fidelity(args):
    from .fidelity import Candidate, run_fidelity, staging_dir, write_report

    if Path(args.report).exists() and not args.overwrite:
        raise UsageError(f"--report {args.report}: already exists (pass --overwrite to replace it)")
    if not Path(args.report).absolute().parent.is_dir():
        raise UsageError(f"--report {args.report}: folder {Path(args.report).absolute().parent} does not exist")
    report, ref, scores = run_fidelity(args.reference, [Candidate.parse(c) for c in args.candidate], args.data,
                                       margin=args.margin, scorer_args=_scorer_args(args),
                                       staging=staging_dir(args.report), resume=args.resume,
                                       log=lambda m: print(m, file=sys.stderr))
    out = write_report(report, ref, scores, args.report, overwrite=args.overwrite)
    print(f"wrote {out}/report.json, report.md, scatter.png, errors.png")
    print(f"{'candidate':<32} {'agreement':>9} {'Spearman':>9} {'mean|err|':>9} {'max|err|':>9}")
    for c in report["candidates"]:
        m = c["metrics"]
        agreement = "n/a" if m["pairwise_agreement"] is None else f"{m['pairwise_agreement']:.4f}"
        spearman = "n/a" if m["spearman"] is None else f"{m['spearman']:.4f}"
        print(f"{c['label'][:32]:<32} {agreement:>9} {spearman:>9} {m['mean_abs_error']:>9.4f} "
              f"{m['max_abs_error']:>9.4f}")


def cmd_demo(args):
    from .demo import run_demo

    if args.pairs is not None and args.pairs < 1:
        raise UsageError(f"--pairs: expected at least 1, found {args.pairs}")
    run_demo(seed=args.seed, log=lambda m: print(m, file=sys.stderr), fidelity_pairs=args.pairs)


def _add_runtime(p):
    p.add_argument("--model", required=True, help="model directory (config.json, *.safetensors, tokenizer files)")
    p.add_argument("--quant", choices=["bnb-nf4", "bnb-int8"], help="quantize a bf16 checkpoint with bitsandbytes "
                   "while loading (the no-calibration baseline)")
    _add_compute(p)


def _add_compute(p):
    """Where and how models run: the options every scoring command shares."""
    p.add_argument("--device", default="auto", help="auto: whole layers spread over the visible GPUs (as few as hold "
                   "them, balanced), the CPU when there is none; or cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--max-memory", help="with --device auto: memory to use on each GPU, e.g. 22GiB,22GiB "
                   "(default: what is free on each)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="GPTQ linears and the tail: torch reference or Triton kernels (default: auto = Triton on "
                   "GPUs, torch on CPU)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--token-budget", type=int, default=None,
                   help="tokens per forward pass (with --no-packing: batch size x longest sequence, "
                   "length-sorted) (default: 8192 on GPUs, 2048 on the CPU)")
    p.add_argument("--truncate", action="store_true",
                   help="drop the oldest tokens of a conversation longer than the model's positions "
                        "(default: refuse it with an error)")
    p.add_argument("--no-packing", action="store_true", help="right-padded, length-sorted batches instead of "
                   "packed token streams (the reference path; also turns off shared prompts)")
    p.add_argument("--no-shared-prompts", action="store_true", help="run a pair's or a ranking's prompt once per "
                   "response instead of once (for comparisons)")
    p.add_argument("--no-pipeline", action="store_true", help="with layers on several GPUs, run one batch at a "
                   "time instead of feeding the next GPU's stage while the last one finishes (for comparisons)")
    p.add_argument("--offload", choices=["auto", "on", "off"], default="auto",
                   help="stream decoder layers from pinned host memory behind compute: auto (only when the layers "
                   "do not all fit the GPU; as many as fit stay resident), on (plan a streamed split on the first "
                   "GPU even if all would fit, e.g. with --max-memory 24GiB to try a 24 GB card's plan on a larger "
                   "one; on the CPU every layer streams), off (refuse what does not fit) (default: auto)")
    p.add_argument("--host-memory", help="host memory the streamed layers may pin, e.g. 64GiB (default: what is "
                   "available now)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worldpm-lite",
        description="Run the WorldPM-72B preference model (and checkpoints of its architecture) on the hardware "
                    "you have. A score says how much humans would prefer the final assistant reply.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score conversations, pairs or rankings from a JSONL file",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score each line of a JSONL file. Line formats (an optional \"id\" is echoed):\n"
                       '  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}\n'
                       '  {"prompt": "...", "chosen": "...", "rejected": "..."}\n'
                       '  {"prompt": "...", "responses": ["...", "..."]}\n'
                       "A prompt may also be a list of messages; a messages list must end with the assistant's reply. "
                       "Output: one JSON line per input line, in order.\n\n"
                       "Every line is checked before scoring starts. Input is read lazily and results are written as "
                       "they come, so memory does not grow with the file; a killed run continues with --resume. "
                       "A pair's or ranking's prompt runs once for all its responses; conversations are packed into "
                       "batches without padding. A NaN/inf score stops the run with its line number.")
    _add_runtime(p)
    p.add_argument("--input", required=True, help="JSONL file of requests")
    p.add_argument("--output", help="where to write the JSONL results (default: standard output). They are written "
                   "as they come to .OUTPUT.partial, renamed to OUTPUT when every line is scored. With --ray: a "
                   "folder DIR/ for part files, or one .jsonl or .parquet file")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last recorded line, "
                   "or with --ray from its finished parts (same model, options and input; ends byte-identical to an "
                   "uninterrupted run)")
    p.add_argument("--ray", action="store_true", help="score with Ray Data on --workers actors, each holding the "
                   "model (needs the [ray] extra). --input: JSONL or Parquet, a file or a folder of them, on a "
                   "filesystem every node mounts; split into blocks of --block-rows rows. --output DIR/: one part file "
                   "per block plus manifest.json; --output FILE.jsonl|.parquet: the parts joined in input order, ids "
                   "kept. A lost driver continues with --resume, skipping the finished parts")
    p.add_argument("--ray-address", help="with --ray: a running cluster (e.g. ray://head:10001 or auto; default: "
                   "start a local one on this machine)")
    p.add_argument("--workers", type=int, default=1, help="with --ray: actors, each loading the model (default: 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0, help="with --ray: GPUs per actor (2 for 4-bit "
                   "WorldPM-72B on 2 x 24 GB; default: 0, the CPU)")
    p.add_argument("--cpus-per-worker", type=float, default=1, help="with --ray: CPUs per actor, also its torch "
                   "threads (default: 1)")
    p.add_argument("--block-rows", type=int, default=1000, help="with --ray: rows per block, the unit a worker "
                   "takes and --resume skips (default: 1000)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("serve", help="an HTTP scoring service for RL trainers (OpenRLHF, vLLM pooling API, TRL)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Serve the model over HTTP (needs the [serve] extra: pip install "
                       "'worldpm-lite[serve]').\n\n"
                       '  POST /get_reward  {"query": [text], "prompts": [..], "labels": [..]}\n'
                       '                    -> {"rewards": [...], "scores": [...], "extra_logs": {}}\n'
                       "                    OpenRLHF's remote reward model (--remote_rm_url URL/get_reward): each\n"
                       "                    query is the whole conversation as the chat template renders it (not\n"
                       "                    templated again; <|endoftext|> padding at either end dropped, one\n"
                       "                    appended); queries with equal prompts share their common prefix\n"
                       "  POST /classify    vLLM's pooling API (also /v1/classify, /pooling, GET /v1/models),\n"
                       "                    what verl's reward loop sends: {\"input\": text | [text] | ids,\n"
                       '                    "use_activation": false} or {"messages": [...]} -> data[i].probs =\n'
                       "                    [reward]; with the activation on (vLLM's default): sigmoid(reward)\n"
                       "  POST /v1/score    score's request objects, one or a list -> its result objects\n"
                       "  GET  /health      model, backend, devices, limits, queue (never needs the API key)\n"
                       "  GET  /metrics     Prometheus text (never needs the API key)\n\n"
                       "Concurrent requests are merged into batches under the token budget; each caller gets\n"
                       "exactly the scores Scorer.score gives (on the CPU; within rounding on GPUs). Bad input\n"
                       "gets a 4xx JSON error naming the field; a full queue 503 with Retry-After. SIGTERM or\n"
                       "Ctrl-C: no new connections, every request in flight answered, then exit 0.\n\n"
                       "  worldpm-lite serve --model WorldPM-72B-gptq4 --host 0.0.0.0 --port 8000\n"
                       "  curl -d '{\"prompt\": \"Hi\", \"chosen\": \"Hello!\", \"rejected\": \"Go away.\"}' "
                       "localhost:8000/v1/score")
    _add_runtime(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000 (0: any free port, printed at start)")
    p.add_argument("--max-items", type=int, default=512, help="conversations or queries per request (default: 512)")
    p.add_argument("--max-queue", type=int, default=1024, help="requests waiting for the model before new ones get "
                   "503 + Retry-After (default: 1024)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch below the token budget waits "
                   "for more requests (default: 5)")
    p.add_argument("--max-body-mib", type=float, default=64, help="largest request body (default: 64 MiB)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level (default: warning)")
    p.add_argument("--access-log", action="store_true", help="log every request (default: off)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every scoring route and /v1/models "
                   "(default: $WORLDPM_LITE_API_KEY; none: open). Never logged")
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
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("selfcheck", help="score WorldPM's README pair; compare with the published values for 72B")
    _add_runtime(p)
    p.add_argument("--atol", type=float, default=0.06, help="allowed absolute difference (default: 0.06, for bf16)")
    p.add_argument("--no-reference", action="store_true", help="only print the scores (fine-tuned variants)")
    p.set_defaults(func=cmd_selfcheck)

    from .quantize.run import QuantizeSettings as Q

    p = sub.add_parser("quantize", help="GPTQ a WorldPM checkpoint to 4 or 8 bits, one layer in memory at a time",
                       description="Quantize every decoder linear of a bf16 WorldPM checkpoint with GPTQ and write a "
                       "standard GPTQ checkpoint (qweight/qzeros/scales/g_idx; embeddings, norms and the reward head "
                       "stay unquantized). Peak memory is one layer plus the calibration activations, whatever the "
                       "depth. An interrupted run continues with --resume.")
    p.add_argument("--model", required=True, help="source checkpoint directory (never modified)")
    p.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    p.add_argument("--bits", type=int, choices=[4, 8], default=Q.bits, help=f"default: {Q.bits}")
    p.add_argument("--group-size", type=int, default=Q.group_size,
                   help=f"input columns per scale; -1 for one per output row (default: {Q.group_size})")
    p.add_argument("--act-order", action="store_true", help="quantize columns by decreasing activation energy "
                   "(desc_act; usually more accurate, g_idx then permutes groups)")
    p.add_argument("--asym", action="store_true", help="asymmetric grid with a zero point (default: symmetric)")
    p.add_argument("--method", choices=["gptq", "rtn"], default=Q.method,
                   help="gptq, or rtn: round-to-nearest on the same grid, the baseline (default: gptq)")
    p.add_argument("--calibration", help="JSONL conversations in any format `score` reads (default: built-in "
                   "ShareGPT conversations)")
    p.add_argument("--samples", type=int, default=Q.samples, help=f"calibration conversations (default: {Q.samples})")
    p.add_argument("--seq-len", type=int, default=Q.seq_len,
                   help=f"keep at most the last N tokens of each (default: {Q.seq_len})")
    p.add_argument("--device", default=Q.device, help="where the GPTQ math runs: auto (GPU 0 when a GPU is visible, "
                   "else the CPU: a 72B layer takes ~25 s on an H200, ~28 min on 2 CPU cores), cpu, cuda, cuda:N "
                   f"(default: {Q.device})")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished layer")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory when done")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("fidelity", help="how closely quantized models' scores follow a reference's",
                       description="Score one JSONL file (any format `score` reads) with a reference model and each "
                       "candidate, and write report.json, report.md, scatter.png and errors.png: pairwise agreement "
                       "(all compared pairs, and those with a clear reference margin), label accuracy for "
                       "chosen/rejected data, Spearman, Pearson, Kendall tau per ranking prompt, mean/max absolute "
                       "error and the linear fit of candidate on reference scores.")
    p.add_argument("--reference", required=True, help="the reference model directory (usually the bf16 one)")
    p.add_argument("--candidate", required=True, action="append", help="a model directory to compare; repeat for "
                   "more. bnb-nf4:DIR or bnb-int8:DIR loads a bf16 directory through bitsandbytes")
    p.add_argument("--data", required=True, help="JSONL: conversations, chosen/rejected pairs or rankings")
    p.add_argument("--report", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--margin", type=float, default=0.5,
                   help="also report agreement on pairs whose reference scores differ by more than this (default 0.5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (models already done are not "
                   "scored again; the one in progress continues from its last recorded line)")
    _add_compute(p)
    p.set_defaults(func=cmd_fidelity)

    p = sub.add_parser("plan", help="will a model fit these GPUs? which layers go where?",
                       description="Place whole decoder layers, in order, on each GPU under its memory minus a "
                       "reserve for the activations of one batch, computed on the meta device from config.json "
                       "alone (no weights read). When they do not all fit, plan the streamed split on the first "
                       "GPU: as many layers resident as fit beside a ring of buffers and one pass's activations, "
                       "the rest streamed from pinned host memory behind compute, with the expected tokens/s and "
                       "its arithmetic. Exits 1 when it can run neither way, naming setups that would.",
                       epilog="example: worldpm-lite plan --model worldpm-72b --gpus 24GiB --host-memory 64GiB")
    p.add_argument("--model", required=True, help="a model directory, or the preset worldpm-72b (WorldPM-72B's "
                   "real dimensions; no files needed)")
    p.add_argument("--gpus", required=True, help="memory of each GPU, comma-separated, e.g. 24GiB,24GiB")
    p.add_argument("--bits", type=int, choices=[4, 8, 16], help="plan for GPTQ 4/8-bit or bf16 (default: the "
                   "checkpoint's own; 4 for a preset)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per forward pass, as score's --token-budget (default: 8192 resident; streamed, "
                   "the smallest pass that hides the copies behind compute)")
    p.add_argument("--host-memory", help="when the layers do not all fit: host memory for the streamed ones, e.g. "
                   "64GiB (default: what is available on this machine now)")
    p.add_argument("--h2d-gbps", type=float, help="assumed pinned host-to-device GB/s for the streamed plan's "
                   "arithmetic (default: an RTX 4090's on PCIe 4.0 x16, printed with the plan)")
    p.add_argument("--tflops", type=float, help="assumed dense bf16 TFLOP/s of the GPU (default: an RTX 4090's, "
                   "printed with the plan)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("make-tiny", help="train the small WorldPM-architecture model (about 3 minutes on 2 cores)")
    p.add_argument("out", help="new directory to write")
    p.add_argument("--seed", type=int, default=0, help="same seed, same data order and weights (default: 0)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps,
                   help=f"optimizer steps (default: {TrainConfig.steps})")
    p.add_argument("--pairs", type=int, default=TrainConfig.pairs,
                   help=f"preference pairs built from ShareGPT (default: {TrainConfig.pairs})")
    p.add_argument("--heldout", type=int, default=TrainConfig.heldout,
                   help=f"of those, held out for the accuracy report (default: {TrainConfig.heldout})")
    p.add_argument("--lr", type=float, default=TrainConfig.lr,
                   help=f"peak learning rate (default: {TrainConfig.lr}; 3e-3, recipe 2's, trains unreliably)")
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay,
                   help=f"AdamW weight decay on weight matrices (default: {TrainConfig.weight_decay})")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("demo", help="the whole path on the built-in small model, offline, on the CPU")
    p.add_argument("--seed", type=int, default=0, help="which small model (built once and cached)")
    p.add_argument("--pairs", type=int, help="held-out pairs in the closing fidelity summary (default: all 500)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("token_budget", "batch_tokens"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            print(f"worldpm-lite: error: --{flag.replace('_', '-')} must be a positive integer", file=sys.stderr)
            return 2
    try:
        if hasattr(args, "device") and not (getattr(args, "ray", False) or getattr(args, "replicas", None)):
            # --ray, --replicas: each worker or replica resolves its own
            _check_device(args)
        return args.func(args) or 0
    except (CheckpointError, ConversationError, UsageError, FileExistsError, FileNotFoundError,
            NotADirectoryError, ValueError) as e:
        print(f"worldpm-lite: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("worldpm-lite: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
