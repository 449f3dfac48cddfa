"""Scale-out with Ray (the optional extra `[ray]`): one data set scored by many workers, resumable, and
finished even when some blocks cannot be scored.

`worldpm-lite score --ray` (score_dataset) runs in four steps:
  1. Plan. The input (a JSONL or Parquet file, or a folder of them, on a filesystem every node
     mounts) is cut into blocks of about --block-rows rows (blocks.py), so one large file spreads
     over every worker.
  2. Check. A Ray task per block parses every row, counts and hashes them. A bad row is named by
     file and line (JSONL) or file and row (Parquet) before any scoring starts.
  3. Score. --workers Ray actors (ScoreParts, each loading the model once: give it GPUs with
     --gpus-per-worker) take one block at a time and write its results to one part file,
     `part-BLOCK-rows-FIRST-LAST.jsonl` (rows counted from 0 in input order), through a temporary
     file and a rename. The driver sees only each part's name and counts, never the rows, and
     appends a record per finished part to manifest.jsonl. Ray does not restart or retry anything
     by itself: when a worker dies with its block (a host OOM, a fatal CUDA error, a segfault) or a
     block raises, the driver starts a fresh worker and gives the block another try, at most
     --max-block-retries more. A block that fails every try is recorded as failed (file, lines or
     rows, the last error) and the other blocks go on; so does a block with a row the model cannot
     score (too long, a non-finite score), at its first try. The command then exits non-zero,
     listing the failed blocks; `--resume` after a fix scores only what is missing.
  4. Output. Before anything is called done, every planned block must have its part with the
     plan's row count. `--output DIR/`: the folder is the result (plan.json, manifest.jsonl ending
     in {"complete": ROWS}, the parts: the rows in input order when the parts are read in name
     order). `--output FILE.jsonl|.parquet`: the parts go to `.FILE.parts/` beside it, are streamed
     together into FILE at the end (for JSONL byte-identical to single-process `score`) and removed.
A killed driver loses only the blocks in flight: `--resume` with the same settings, model weights and
input skips every part the manifest holds. Other settings, replaced weights or a changed input are
refused, naming what changed.

`ScoreBatch` is the map_batches class for your own Ray Data pipelines: each Ray actor loads one
Scorer once and scores batches of rows in `score`'s request formats (a "text" column of JSONL lines,
as `ray.data.read_text` gives them, or request columns as `ray.data.read_parquet` gives them) into a
"result" column, each row's result as the JSON text `score` writes, id kept.

    ds = ray.data.read_parquet("s3://bucket/pairs/")
    scored = ds.map_batches(ScoreBatch, fn_constructor_kwargs={"model": "/models/WorldPM-72B-gptq4"},
                            batch_size=512, batch_format="pyarrow", num_gpus=2,
                            compute=ray.data.ActorPoolStrategy(size=8))
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .blocks import (
    BLOCK_ROWS,
    Manifest,
    block_requests,
    block_span,
    check_block,
    check_complete,
    checked,
    describe,
    destination,
    fingerprint,
    input_files,
    merge,
    part_name,
    plan_blocks,
)
from .checkpoint import model_identity, write_json_atomic
from .data import Request, RequestError, parse_request
from .errors import InputError, OutputExists
from .options import RuntimeOptions

MAX_BLOCK_RETRIES = 3
LISTED = 20  # failed blocks named in the error; the manifest holds them all
WAIT_LOG_S = 60  # how often the driver says it waits for workers the cluster cannot place yet


class BlocksFailed(InputError):
    """Some blocks failed every try: the others are done and kept for --resume."""


def load_scorer(model: str, options: RuntimeOptions):
    """Scorer.from_pretrained(model, options) in a Ray worker or replica, with options.threads torch threads."""
    import torch

    from .scorer import Scorer

    if options.threads:
        torch.set_num_threads(options.threads)
    return Scorer.from_pretrained(model, options)


def _score(scorer, requests: list[tuple[str, Request]]) -> tuple[list[str], int, int]:
    """Each (where, request)'s result as the JSON text `score` writes, with the batches and tokens it took;
    a row the model cannot score raises RequestError naming `where`."""
    from .scorer import DoesNotFit, NonFiniteScore
    from .stream import score_failure

    groups = []
    for where, r in requests:
        try:
            groups.append(scorer.group(r.conversations, r.prompt))
        except ValueError as e:  # ConversationTooLong
            raise RequestError(f"{where}: {e}") from None
    scores, batches, tokens = {}, 0, 0
    try:
        for step in scorer.run(iter(groups)):
            batches, tokens = batches + 1, tokens + step.tokens
            scores.update(step.results)
    except (NonFiniteScore, DoesNotFit) as e:
        raise score_failure(e, requests[e.group][0]) from None
    return [json.dumps(r.result(scores[i]), ensure_ascii=False) for i, (_, r) in enumerate(requests)], batches, tokens


class ScoreBatch:
    """map_batches class: model (a checkpoint directory) and how it runs: a RuntimeOptions or its fields
    as keywords (threads: torch threads per actor; default: torch's choice)."""

    def __init__(self, model: str, options: RuntimeOptions | None = None, **fields):
        self.scorer = load_scorer(model, RuntimeOptions.of(options, **fields))

    def __call__(self, batch):
        rows = batch.column("text").to_pylist() if "text" in batch.column_names else batch.to_pylist()
        requests = []
        for row in rows:
            where, obj = ("line" if isinstance(row, str) else "row"), None
            try:
                obj = json.loads(row) if isinstance(row, str) else {k: v for k, v in row.items() if v is not None}
                requests.append((describe(obj), parse_request(obj, where)))
            except ValueError as e:  # JSONDecodeError, ConversationError
                raise RequestError(f"{describe(row if obj is None else obj)}: {e}") from None
        return {"result": _score(self.scorer, requests)[0]}


class ScoreParts:
    """The actor of `score --ray`: loads the model once, then scores whole blocks of the plan, one part
    file each (see the module docstring). folder: where the parts go (every node must see it). A test
    or a pipeline of your own may subclass it and pass it as score_dataset's udf."""

    def __init__(self, model: str, folder: str, options: RuntimeOptions):
        self.scorer, self.folder = load_scorer(model, options), Path(folder)

    def ready(self) -> int:
        """Answers once the model is loaded: its process id."""
        return os.getpid()

    def score_block(self, block: dict) -> dict:
        """Score one block into its part file (a temporary file, then a rename); its manifest record."""
        t0 = time.perf_counter()
        results, batches, tokens = _score(self.scorer, list(block_requests(block)))
        name = part_name(block)
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(r + "\n" for r in results))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)
        return {"part": block["block"], "name": name, "rows": len(results), "batches": batches, "tokens": tokens,
                "seconds": round(time.perf_counter() - t0, 3), "worker": os.getpid()}


def score_dataset(input: str, output: str, model: str, workers: int, address: str | None = None,
                  gpus_per_worker: float = 0, cpus_per_worker: float = 1, block_rows: int = BLOCK_ROWS,
                  resume: bool = False, scorer_args: RuntimeOptions | dict | None = None,
                  log: Callable[[str], None] = print, progress: bool = False, udf: type = ScoreParts,
                  max_block_retries: int = MAX_BLOCK_RETRIES) -> int:
    """Score every row of `input` into `output` (a folder, or one .jsonl / .parquet file) with `workers`
    Ray actors, each running the model (a local folder) as scorer_args say (RuntimeOptions, or a dict
    of its fields); returns the number of rows. BlocksFailed when some blocks failed every try. See
    the module docstring."""
    import ray

    files = input_files(input)
    folder, final = destination(output)
    options = RuntimeOptions.of(scorer_args)
    if not (Path(model) / "config.json").is_file():
        raise RequestError(f"--model {model}: no config.json there (expected a checkpoint folder)")
    settings = json.loads(json.dumps({**model_identity(model),
                                      **{k: v for k, v in asdict(options).items() if k != "threads"}}))
    if final is not None and final.exists():
        if resume and not folder.exists():
            log(f"--resume: {final} is complete and no interrupted run is there; nothing to do (delete it to score "
                "again)")
            return 0
        raise OutputExists(f"--output {output}: already exists (delete it to score again)")
    plan_file = folder / "plan.json"
    interrupted = plan_file.exists()
    if interrupted and not resume:
        raise OutputExists(f"--output {output}: an interrupted run's parts are in {folder} (pass --resume to "
                           "continue it, or delete it)" if final or _manifest(folder).complete is None
                           else f"--output {output}: already complete (delete it to score again)")
    if not interrupted and folder.exists() and any(folder.iterdir()):
        raise OutputExists(f"--output {output}: {folder} holds files but no plan.json: not a worldpm-lite parts "
                           "folder (choose an empty or new folder)")
    init_ray(address)
    log(f"ray: {ray.cluster_resources()}")
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus_per_worker and workers * cpus_per_worker > cpus:
        cpus_per_worker = cpus / workers  # more than the cluster holds: some workers would wait for ever
        log(f"ray: {workers} workers on {cpus:g} CPUs: each reserves {cpus_per_worker:.2f} CPU")
    if interrupted:
        plan = _resumable(plan_file, settings, files, ray, log)
        log(f"--resume: {len(plan['blocks'])} blocks of up to {plan['block_rows']} rows, as planned by the "
            f"interrupted run{'' if block_rows == plan['block_rows'] else f' (--block-rows {block_rows} is not used)'}")
    else:
        if resume:
            log(f"--resume: no interrupted run in {folder}; starting from the first row")
        plan = _plan(files, block_rows, settings, ray, log)
        folder.mkdir(exist_ok=True)
        write_json_atomic(plan_file, plan)
    blocks = plan["blocks"]
    manifest = _manifest(folder)
    try:
        parts = {k: v for k, v in manifest.parts.items() if (folder / v["name"]).exists()}
        for stale in folder.glob(".part-*.tmp"):  # a worker's unfinished part from a killed run
            stale.unlink()
        todo = [b for b in blocks if b["block"] not in parts]
        total = sum(b["rows"] for b in blocks)
        if parts or manifest.failed:
            log(f"--resume: {len(parts)} of {len(blocks)} parts ({sum(p['rows'] for p in parts.values())} rows) are "
                f"done; scoring the other {len(todo)}"
                + (f", {len(manifest.failed)} of them failed before" if manifest.failed else ""))
        if todo:
            failed = _run(ray, todo, folder, model, workers, cpus_per_worker, gpus_per_worker, options, udf,
                          manifest, total - sum(b["rows"] for b in todo), total, progress, max_block_retries, log)
            if failed:
                raise _failures(failed, len(blocks), output)
        check_complete(folder, blocks, manifest.parts)
        if manifest.complete is None:
            manifest.add({"complete": total})
    finally:
        manifest.close()
    if final is not None:
        merge(folder, [part_name(b) for b in blocks], final)
        shutil.rmtree(folder)
    return total


def init_ray(address: str | None) -> bool:
    """Join the cluster at `address` ($RAY_ADDRESS), or start a local one, unless Ray is already
    initialized in this process; True when a local cluster was started here."""
    import ray

    if ray.is_initialized():
        return False
    # A cluster started here exists only for this job: its workers run at our priority, not at
    # Ray's default nice 15, which starves them beside any other busy process on the machine
    local = address is None and not os.environ.get("RAY_ADDRESS")
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
             **({"_system_config": {"worker_niceness": 0}} if local else {}))
    return local


def _plan(files: list[Path], block_rows: int, settings: dict, ray, log) -> dict:
    t0 = time.perf_counter()
    blocks = plan_blocks(files, block_rows)
    blocks = checked(blocks, _check_all(ray, blocks))
    log(f"ray: checked {sum(b['rows'] for b in blocks)} rows of {len(files)} file(s) in {time.perf_counter() - t0:.1f} "
        f"s: {len(blocks)} blocks of up to {block_rows} rows")
    return {"settings": settings, "input": fingerprint(files), "block_rows": block_rows, "blocks": blocks}


def _check_all(ray, blocks: list[dict]) -> list[dict]:
    """check_block of every block, as Ray tasks of one remote function (a function made remote per
    block is exported per block: planning 3,000 blocks took 89 s, 10,000 now take 15 s)."""
    task = ray.remote(num_cpus=1, max_retries=3)(check_block)
    return ray.get([task.remote(b) for b in blocks])


def _manifest(folder: Path) -> Manifest:
    """The parts folder's manifest.jsonl; a manifest.json of a run started by worldpm-lite before the
    log of records (wave 3) is taken into it first."""
    manifest, old = Manifest(folder / "manifest.jsonl"), folder / "manifest.json"
    if old.exists():
        saved = json.loads(old.read_text())
        for k, v in saved.get("parts", {}).items():
            manifest.add({"part": int(k), "name": v["part"], **{f: x for f, x in v.items() if f != "part"}})
        if saved.get("complete"):
            manifest.add({"complete": saved["rows"]})
        old.unlink()
    return manifest


def _resumable(plan_file: Path, settings: dict, files: list[Path], ray, log) -> dict:
    """The interrupted run's plan, after checking that its settings, model and input are those of this run."""
    from .stream import refuse_other_settings

    plan = json.loads(plan_file.read_text())
    refuse_other_settings(plan["settings"], settings, plan_file, str(plan_file.parent), log)
    was = {f["file"]: f for f in plan["input"]}
    now = {f["file"]: f for f in fingerprint(files)}
    if set(was) != set(now):
        raise InputError(f"{plan_file}: the input's files changed since the interrupted run (then: "
                         f"{sorted(was)}; now: {sorted(now)}); delete {plan_file.parent} to start over")
    for name, f in now.items():
        if f["size"] != was[name]["size"]:
            raise InputError(f"{name}: changed since the interrupted run ({was[name]['size']} bytes then, {f['size']} "
                             f"now); delete {plan_file.parent} to start over")
    touched = [b for b in plan["blocks"] if now[b["file"]]["mtime_ns"] != was[b["file"]]["mtime_ns"]]
    for b, c in zip(touched, _check_all(ray, touched)):
        if c["bad"] is not None or (c["rows"], c["sha256"]) != (b["rows"], b["sha256"]):
            raise InputError(f"{b['file']}: its content changed since the interrupted run (block {b['block']}, "
                             f"{block_span(b)}); delete {plan_file.parent} to start over")
    if touched or "weights" not in plan["settings"]:
        plan["input"], plan["settings"] = list(now.values()), settings  # same content, newer times: checked once
        write_json_atomic(plan_file, plan)
    return plan


def _run(ray, todo, folder, model, workers, cpus_per_worker, gpus_per_worker, options, udf, manifest, done, total,
         progress, retries, log) -> list[dict]:
    """Score the blocks in `todo` on `workers` actors, one block in flight on each, appending each part's
    record to the manifest; returns the failed blocks' records. A worker that dies is replaced by a
    fresh one; a worker that cannot load the model stops the run (InputError)."""
    from .stream import progress_bar

    actor = ray.remote(udf).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None, max_restarts=0,
                                    max_task_retries=0)
    args = (str(model), str(folder.resolve()), options)
    queue, tries, failed = deque(todo), {}, []
    pending = {}  # object ref -> (the actor, its block, or None for the actor's ready call)

    def start() -> None:
        a = actor.remote(*args)
        pending[a.ready.remote()] = (a, None)

    def give(a) -> None:
        if queue:
            b = queue.popleft()
            pending[a.score_block.remote(b)] = (a, b)
        else:
            ray.kill(a)

    for _ in range(min(workers, len(todo))):
        start()
    bar = progress_bar(total, done) if progress else None
    waited = time.monotonic()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_LOG_S)
            if not ready:
                _say_waiting(ray, pending, cpus_per_worker, gpus_per_worker, waited, log)
                continue
            a, block = pending.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                error, fresh, cause = _block_error(ray, e, block, model)
            else:
                if block is not None:
                    manifest.add(record)
                    if bar is not None:
                        bar.update(record["rows"])
                give(a)
                continue
            n = tries[block["block"]] = tries.get(block["block"], 0) + 1
            span = block_span(block)
            if n > retries or isinstance(cause, RequestError):  # a row the model cannot score: no try will
                failed.append({"failed": block["block"], "file": block["file"], "where": span, "attempts": n,
                               "error": error})
                manifest.add(failed[-1])
            else:
                log(f"ray: block {block['block']} ({block['file']} {span}), try {n} of {retries + 1} failed: {error}; "
                    "trying again")
                queue.appendleft(block)
            if fresh:
                ray.kill(a)
                if queue:
                    start()
            else:
                give(a)
    finally:
        if bar is not None:
            bar.close()
        for a, _ in pending.values():
            ray.kill(a)
    return failed


def _block_error(ray, e: Exception, block: dict | None, model: str) -> tuple[str, bool, Exception | None]:
    """A failed call's error in words, whether its worker is gone (a fresh one is needed) and the
    exception the block raised, if it raised one. A worker that could not load the model (`block`
    None: its ready call) stops the run: InputError."""
    if isinstance(e, ray.exceptions.RayActorError):  # the worker's process is gone
        if block is None:
            raise InputError(f"a Ray worker died while loading {model}: {_ray_error(e)}") from None
        return f"the worker died: {_ray_error(e)}", True, None
    cause = getattr(e, "cause", None)  # raised by the block (or the constructor)
    error = (str(cause) if isinstance(cause, InputError) else f"{type(cause).__name__}: {cause}" if cause
             else _ray_error(e))
    if block is None:
        raise InputError(f"a Ray worker could not load {model}: {error}") from None
    return error, False, cause


def _say_waiting(ray, pending, cpus, gpus, since, log) -> None:
    """A line saying the driver waits for workers the cluster has not placed (and what they need)."""
    starting = sum(b is None for _, b in pending.values())
    if starting == len(pending):
        log(f"ray: waiting {time.monotonic() - since:.0f} s for {starting} worker(s) to start and load the model "
            f"(each needs {cpus:g} CPU{f', {gpus:g} GPU' if gpus else ''}; the cluster has "
            f"{ray.available_resources()} free)")


def _ray_error(e: Exception) -> str:
    """Ray's error in one line: for a worker that failed in its constructor, the exception its traceback
    ends with; for a dead worker, why Ray says it died (its pid, the exit type and detail)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line and not line.startswith(("class_name:", "actor_id:", "namespace:"))]
    if getattr(e, "actor_init_failed", False) and lines:
        return lines[-1]
    text = " ".join(lines)
    return text[:400] + ("..." if len(text) > 400 else "")


def _failures(failed: list[dict], blocks: int, output: str) -> BlocksFailed:
    lines = [f"  block {f['failed']}: {f['file']} {f['where']} ({f['attempts']} "
             f"{'try' if f['attempts'] == 1 else 'tries'}): {f['error']}" for f in failed[:LISTED]]
    more = f"\n  ... and {len(failed) - LISTED} more" if len(failed) > LISTED else ""
    return BlocksFailed(f"--output {output}: {len(failed)} of {blocks} blocks failed; the other parts are kept. Fix "
                        "the cause, then rerun with --resume to score only what is missing (manifest.jsonl lists "
                        "every failed block):\n" + "\n".join(lines) + more)
