"""`worldpm-lite score`: a JSONL file scored line by line (stream.py), or with --ray many files on many
workers (ray.py)."""

from __future__ import annotations

import argparse

from ..errors import UsageError, require_extra
from .common import add_runtime, load_scorer, log, model_path, runtime_options


def add(sub) -> None:
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
    add_runtime(p)
    p.add_argument("--input", required=True, help="JSONL file of requests")
    p.add_argument("--output", help="where to write the JSONL results (default: standard output). They are written "
                   "as they come to .OUTPUT.partial, renamed to OUTPUT when every line is scored. With --ray: a "
                   "folder DIR/ for part files, or one .jsonl or .parquet file")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last recorded line, "
                   "or with --ray from its finished parts (same model, options and input; ends byte-identical to an "
                   "uninterrupted run)")
    p.add_argument("--ray", action="store_true", help="score with Ray on --workers actors, each holding the "
                   "model (needs the [ray] extra). --input: JSONL or Parquet, a file or a folder of them, on a "
                   "filesystem every node mounts (so must --model be, or a hub id's HF_HUB_CACHE); split into blocks "
                   "of --block-rows rows. --output DIR/: one part file per block plus manifest.jsonl; --output "
                   "FILE.jsonl|.parquet: the parts joined in input order, ids kept. A lost driver continues with "
                   "--resume, skipping the finished parts; blocks that failed every try are listed, the run exits 2, "
                   "and --resume after a fix scores only them")
    p.add_argument("--ray-address", help="with --ray: a running cluster (e.g. ray://head:10001 or auto; default: "
                   "start a local one on this machine)")
    p.add_argument("--workers", type=int, default=1, help="with --ray: actors, each loading the model (default: 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0, help="with --ray: GPUs per actor (2 for 4-bit "
                   "WorldPM-72B on 2 x 24 GB; default: 0, the CPU)")
    p.add_argument("--cpus-per-worker", type=float, default=1, help="with --ray: CPUs per actor, also its torch "
                   "threads (default: 1)")
    p.add_argument("--block-rows", type=int, default=1000, help="with --ray: rows per block, the unit a worker "
                   "takes and --resume skips (default: 1000)")
    p.add_argument("--max-block-retries", type=int, default=3, help="with --ray: tries after the first for a block "
                   "whose worker dies (a host OOM, a fatal CUDA error) or that raises, each on a fresh worker; then "
                   "the block is recorded as failed and the others go on (default: 3)")
    p.set_defaults(run=run)


def run(args) -> None:
    if args.ray:
        return run_ray(args)
    from ..stream import score_file, score_settings

    if args.resume and not args.output:
        raise UsageError("--resume: needs --output (results on standard output cannot be resumed)")
    model = model_path(args)
    scorer = load_scorer(model, runtime_options(args))
    n = score_file(scorer, args.input, args.output, score_settings(scorer, model), resume=args.resume, log=log)
    if args.output:
        log(f"wrote {n} results to {args.output}")


def run_ray(args) -> None:
    require_extra("ray", "ray", what="--ray")
    from ..ray import score_dataset

    if not args.output:
        raise UsageError("--ray: needs --output: a folder (ending in /) for part files, or one .jsonl or .parquet file")
    if args.workers < 1 or args.block_rows < 1 or min(args.cpus_per_worker, args.gpus_per_worker,
                                                        args.max_block_retries) < 0:
        raise UsageError("--workers, --block-rows: expected at least 1; --cpus-per-worker, --gpus-per-worker, "
                         "--max-block-retries: at least 0")
    options = runtime_options(args, threads=worker_threads(args.cpus_per_worker))
    n = score_dataset(args.input, args.output, model_path(args), args.workers, args.ray_address, args.gpus_per_worker,
                      args.cpus_per_worker, args.block_rows, args.resume, scorer_args=options, log=log, progress=True,
                      max_block_retries=args.max_block_retries)
    log(f"wrote {n} results to {args.output}")


def worker_threads(cpus: float) -> int | None:
    """A Ray worker's or replica's torch threads: its whole CPUs, if any (else torch's choice)."""
    return int(cpus) if cpus >= 1 else None
