"""Scale-out with Ray Data (the optional extra `[ray]`): one data set scored by many workers, resumable.

`worldpm-lite score --ray` (score_dataset) runs in four steps:
  1. Plan. The input (a JSONL or Parquet file, or a folder of them, on a filesystem every node
     mounts) is cut into blocks of about --block-rows rows: JSONL files by byte range at line
     boundaries, Parquet files by row group and by row range inside one. One large file therefore
     spreads over every worker.
  2. Check. A Ray task per block parses every row, counts and hashes them. A bad row is named by
     file and line (JSONL) or file and row (Parquet) before any scoring starts.
  3. Score. Actors (ScoreParts, each loading the model once: give it GPUs with --gpus-per-worker)
     take one block at a time and write its results to one part file,
     `part-BLOCK-rows-FIRST-LAST.jsonl` (rows counted from 0 in input order), through a temporary
     file and a rename. The driver sees only each part's name and counts, never the rows, and
     records the finished parts in manifest.json as they come. Ray restarts a worker that dies
     and runs its block again.
  4. Output. `--output DIR/`: the folder is the result (plan.json, manifest.json with "complete",
     the parts: the rows in input order when the parts are read in name order). `--output
     FILE.jsonl|.parquet`: the parts go to `.FILE.parts/` beside it, are streamed together into
     FILE at the end (for JSONL byte-identical to single-process `score`) and removed.
A killed driver loses only the blocks in flight: `--resume` with the same settings and input skips
every part the manifest holds. Other settings or a changed input are refused, naming what changed.

`ScoreBatch` is the map_batches class for your own pipelines: each Ray actor loads one Scorer once
and scores batches of rows in `score`'s request formats (a "text" column of JSONL lines, as
`ray.data.read_text` gives them, or request columns as `ray.data.read_parquet` gives them) into a
"result" column, each row's result as the JSON text `score` writes, id kept.

    ds = ray.data.read_parquet("s3://bucket/pairs/")
    scored = ds.map_batches(ScoreBatch, fn_constructor_kwargs={"model": "/models/WorldPM-72B-gptq4"},
                            batch_size=512, batch_format="pyarrow", num_gpus=2,
                            compute=ray.data.ActorPoolStrategy(size=8))
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from .chat import ConversationError
from .checkpoint import file_sha256, write_json_atomic
from .data import Request, RequestError, parse_line, parse_request, read_lines
from .errors import InputError, OutputExists
from .options import RuntimeOptions

PARQUET = (".parquet", ".pq")
BLOCK_ROWS = 1000
SAMPLE_BYTES = 1 << 20  # of a JSONL file, to estimate its bytes per row


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
                requests.append((_describe(obj), parse_request(obj, where)))
            except ValueError as e:  # JSONDecodeError, ConversationError
                raise RequestError(f"{_describe(row if obj is None else obj)}: {e}") from None
        return {"result": _score(self.scorer, requests)[0]}


class ScoreParts:
    """The actor of `score --ray`: scores whole blocks of the plan, one part file each (see the module
    docstring). folder: where the parts go (every node must see it)."""

    def __init__(self, model: str, folder: str, options: RuntimeOptions):
        self.scorer, self.folder = load_scorer(model, options), Path(folder)

    def __call__(self, batch):
        out = {k: [] for k in ("block", "part", "rows", "batches", "tokens", "seconds", "worker")}
        for text in batch.column("block").to_pylist():
            for k, v in self.score_block(json.loads(text)).items():
                out[k].append(v)
        return out

    def score_block(self, block: dict) -> dict:
        t0 = time.perf_counter()
        results, batches, tokens = _score(self.scorer, list(block_requests(block)))
        name = part_name(block)
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(r + "\n" for r in results))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)
        return {"block": block["block"], "part": name, "rows": len(results), "batches": batches, "tokens": tokens,
                "seconds": time.perf_counter() - t0, "worker": os.getpid()}


def part_name(block: dict) -> str:
    return f"part-{block['block']:05d}-rows-{block['first_row']}-{block['first_row'] + block['rows'] - 1}.jsonl"


def _jsonl_lines(block: dict) -> Iterator[bytes]:
    """The raw lines of a JSONL block (its byte range starts and ends at line boundaries)."""
    with open(block["file"], "rb") as f:
        f.seek(block["start"])
        left = block["end"] - block["start"]
        while left > 0 and (raw := f.readline(left)):
            left -= len(raw)
            yield raw


def _parquet_rows(block: dict) -> Iterator[dict]:
    """A Parquet block's rows as request objects (null columns left out)."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(block["file"]).read_row_group(block["group"]).slice(block["offset"], block["length"])
    for row in table.to_pylist():
        yield {k: v for k, v in row.items() if v is not None}


def block_requests(block: dict) -> Iterator[tuple[str, Request]]:
    """(where, request) for each row of a checked block: where is FILE:LINE or FILE: row N."""
    if "start" in block:
        for line in read_lines(block["file"], block["start"], block["first_line"] - 1, end=block["end"]):
            yield f"{block['file']}:{line.number}", line.request
    else:
        for i, row in enumerate(_parquet_rows(block)):
            yield f"{block['file']}: row {block['row'] + i + 1}", parse_request(row, "row")


def check_block(block: dict) -> dict:
    """Parse every row of a block: its rows, lines (JSONL), sha256 of its content, and the first bad
    row as (its position in the block from 1, what is wrong) or None."""
    digest, rows, lines, bad = hashlib.sha256(), 0, 0, None
    if "start" in block:
        for raw in _jsonl_lines(block):
            lines += 1
            digest.update(raw)
            if raw.strip():
                try:
                    parse_line(raw)
                except ConversationError as e:
                    bad = (lines, str(e))
                    break
                rows += 1
    else:
        for row in _parquet_rows(block):
            digest.update(json.dumps(row, sort_keys=True, default=str).encode())
            try:
                parse_request(row, "row")
            except ConversationError as e:
                bad = (rows + 1, str(e).removeprefix("row: "))
                break
            rows += 1
    return {"rows": rows, "lines": lines, "sha256": digest.hexdigest(), "bad": bad}


def input_files(input: str) -> list[Path]:
    if "://" in input:
        raise RequestError(f"--input {input}: --ray reads files from a filesystem every node mounts (NFS, a shared "
                           "disk); copy the data there")
    src = Path(input)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix in (".jsonl", *PARQUET) and not p.name.startswith("."))
        if not files:
            raise RequestError(f"--input {input}: no .jsonl or .parquet files in this folder")
        return [f.resolve() for f in files]
    if not src.is_file():
        raise RequestError(f"--input {input}: no such file or folder")
    return [src.resolve()]


def plan_blocks(files: list[Path], block_rows: int) -> list[dict]:
    """Blocks of about block_rows rows, in input order (see the module docstring)."""
    import pyarrow.parquet as pq

    blocks = []
    for path in files:
        if path.suffix in PARQUET:
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as e:  # noqa: BLE001 - pyarrow's errors for a file that is not Parquet
                raise RequestError(f"{path}: not a readable Parquet file ({e})") from None
            row = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                for offset in range(0, n, block_rows):
                    length = min(block_rows, n - offset)
                    blocks.append({"file": str(path), "group": g, "offset": offset, "length": length, "row": row})
                    row += length
        else:
            blocks += [{"file": str(path), "start": a, "end": b} for a, b in _byte_ranges(path, block_rows)]
    return blocks


def _byte_ranges(path: Path, block_rows: int) -> list[tuple[int, int]]:
    """A JSONL file cut after the first newline at or past every `step` bytes, step being block_rows
    lines of the file's first MiB."""
    size = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        sample = f.read(SAMPLE_BYTES)
        step = max(1, len(sample) * block_rows // max(1, sample.count(b"\n")))
        while cuts[-1] + step < size:
            f.seek(cuts[-1] + step - 1)
            f.readline()
            if f.tell() >= size:
                break
            cuts.append(f.tell())
    return list(zip(cuts, cuts[1:] + [size]))


def _checked(blocks: list[dict], checks: list[dict]) -> list[dict]:
    """The blocks with their rows, first line (JSONL), first output row and hash; the first bad row in
    input order is raised, named by file and line or row. Blocks without rows are left out."""
    lines: dict[str, int] = {}
    out, row = [], 0
    for b, c in zip(blocks, checks):
        first_line = lines.get(b["file"], 0) + 1
        if c["bad"] is not None:
            at, why = c["bad"]
            where = f"{b['file']}:{first_line + at - 1}" if "start" in b else f"{b['file']}: row {b['row'] + at}"
            raise RequestError(f"{where}: {why}")
        lines[b["file"]] = first_line - 1 + c["lines"]
        if c["rows"]:
            out.append(b | {"block": len(out), "rows": c["rows"], "first_row": row, "sha256": c["sha256"]}
                       | ({"first_line": first_line, "lines": c["lines"]} if "start" in b else {}))
            row += c["rows"]
    if not out:
        raise RequestError(f"{', '.join(sorted(lines)) or 'the input'}: no requests (the input is empty)")
    return out


def _fingerprint(files: list[Path]) -> list[dict]:
    return [{"file": str(f), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]


def _destination(output: str) -> tuple[Path, Path | None]:
    """(the parts folder, the single output file or None)."""
    out = Path(output)
    if output.endswith(("/", os.sep)) or out.is_dir():
        if not out.absolute().parent.is_dir():
            raise RequestError(f"--output {output}: folder {out.absolute().parent} does not exist")
        return out, None
    if out.suffix not in (".jsonl", *PARQUET):
        raise RequestError(f"--output {output}: expected a .jsonl or .parquet file name, or a folder (ending in /) "
                           "for part files")
    if not out.absolute().parent.is_dir():
        raise RequestError(f"--output {output}: folder {out.absolute().parent} does not exist")
    return out.with_name(f".{out.name}.parts"), out


def score_dataset(input: str, output: str, model: str, workers: int, address: str | None = None,
                  gpus_per_worker: float = 0, cpus_per_worker: float = 1, block_rows: int = BLOCK_ROWS,
                  resume: bool = False, scorer_args: RuntimeOptions | dict | None = None,
                  log: Callable[[str], None] = print,
                  progress: bool = False, udf: type = ScoreParts) -> int:
    """Score every row of `input` into `output` (a folder, or one .jsonl / .parquet file) with `workers`
    Ray actors, each running the model as scorer_args say (RuntimeOptions, or a dict of its fields);
    returns the number of rows. See the module docstring."""
    import ray

    files = input_files(input)
    folder, final = _destination(output)
    options = RuntimeOptions.of(scorer_args)
    if not (Path(model) / "config.json").is_file():
        raise RequestError(f"--model {model}: no config.json there (expected a checkpoint folder)")
    settings = json.loads(json.dumps({"model": str(Path(model).resolve()), "config_sha256": file_sha256(
        Path(model) / "config.json"), **{k: v for k, v in asdict(options).items() if k != "threads"}}))
    if final is not None and final.exists():
        if resume and not folder.exists():
            log(f"--resume: {final} is complete and no interrupted run is there; nothing to do (delete it to score "
                "again)")
            return 0
        raise OutputExists(f"--output {output}: already exists (delete it to score again)")
    plan_file, manifest_file = folder / "plan.json", folder / "manifest.json"
    interrupted = plan_file.exists()
    if interrupted and not resume:
        raise OutputExists(f"--output {output}: an interrupted run's parts are in {folder} (pass --resume to "
                              "continue it, or delete it)" if final or not _manifest(manifest_file)["complete"]
                              else f"--output {output}: already complete (delete it to score again)")
    if not interrupted and folder.exists() and any(folder.iterdir()):
        raise OutputExists(f"--output {output}: {folder} holds files but no plan.json: not a worldpm-lite parts "
                              "folder (choose an empty or new folder)")
    init_ray(address)
    log(f"ray: {ray.cluster_resources()}")
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus_per_worker and workers * cpus_per_worker > cpus - 1:
        # Ray Data needs a CPU slot beside the workers; workers holding every slot would wait forever
        cpus_per_worker = max(0.01, (cpus - 1) / workers)
        log(f"ray: {workers} workers on {cpus:g} CPUs: each reserves {cpus_per_worker:.2f} CPU so Ray Data keeps one")
    if interrupted:
        plan = _resumable(plan_file, settings, files, ray)
        log(f"--resume: {len(plan['blocks'])} blocks of up to {plan['block_rows']} rows, as planned by the "
            f"interrupted run{'' if block_rows == plan['block_rows'] else f' (--block-rows {block_rows} is not used)'}")
    else:
        if resume:
            log(f"--resume: no interrupted run in {folder}; starting from the first row")
        plan = _plan(files, block_rows, settings, ray, log)
        folder.mkdir(exist_ok=True)
        write_json_atomic(plan_file, plan)
        write_json_atomic(manifest_file, {"complete": False, "rows": 0, "parts": {}})
    blocks = plan["blocks"]
    manifest = _manifest(manifest_file)
    parts = {int(k): v for k, v in manifest["parts"].items() if (folder / v["part"]).exists()}
    for stale in folder.glob(".part-*.tmp"):  # a worker's unfinished part from a killed run
        stale.unlink()
    todo = [b for b in blocks if b["block"] not in parts]
    total = sum(b["rows"] for b in blocks)
    if parts:
        log(f"--resume: {len(parts)} of {len(blocks)} parts ({sum(p['rows'] for p in parts.values())} rows) are done; "
            f"scoring the other {len(todo)}")
    if todo:
        _run(ray, todo, folder, model, workers, cpus_per_worker, gpus_per_worker, options, udf, manifest,
             manifest_file, parts, total, progress)
    manifest.update(complete=True, rows=total)
    write_json_atomic(manifest_file, manifest)
    if final is not None:
        _merge(folder, [parts[b["block"]]["part"] for b in blocks], final)
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
    blocks = _checked(blocks, ray.get([_check_task(ray).remote(b) for b in blocks]))
    log(f"ray: checked {sum(b['rows'] for b in blocks)} rows of {len(files)} file(s) in {time.perf_counter() - t0:.1f} "
        f"s: {len(blocks)} blocks of up to {block_rows} rows")
    return {"settings": settings, "input": _fingerprint(files), "block_rows": block_rows, "blocks": blocks}


def _check_task(ray):
    return ray.remote(num_cpus=1, max_retries=3)(check_block)


def _manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"complete": False, "rows": 0, "parts": {}}  # killed before its first record: nothing is done


def _resumable(plan_file: Path, settings: dict, files: list[Path], ray) -> dict:
    """The interrupted run's plan, after checking that its settings and input are those of this run."""
    plan = json.loads(plan_file.read_text())
    saved = plan["settings"]
    changed = sorted(k for k in set(settings) | set(saved) if settings.get(k) != saved.get(k))
    if changed:
        raise InputError(f"{plan_file}: the interrupted run used other settings ({', '.join(changed)}: "
                         f"{[saved.get(k) for k in changed]}, now {[settings.get(k) for k in changed]}); rerun with "
                         f"those, or delete {plan_file.parent} to start over")
    was = {f["file"]: f for f in plan["input"]}
    now = {f["file"]: f for f in _fingerprint(files)}
    if set(was) != set(now):
        raise InputError(f"{plan_file}: the input's files changed since the interrupted run (then: "
                         f"{sorted(was)}; now: {sorted(now)}); delete {plan_file.parent} to start over")
    for name, f in now.items():
        if f["size"] != was[name]["size"]:
            raise InputError(f"{name}: changed since the interrupted run ({was[name]['size']} bytes then, {f['size']} "
                             f"now); delete {plan_file.parent} to start over")
    touched = [b for b in plan["blocks"] if now[b["file"]]["mtime_ns"] != was[b["file"]]["mtime_ns"]]
    for b, c in zip(touched, ray.get([_check_task(ray).remote(b) for b in touched])):
        if c["bad"] is not None or (c["rows"], c["sha256"]) != (b["rows"], b["sha256"]):
            where = (f"lines {b['first_line']}-{b['first_line'] + b['lines'] - 1}" if "start" in b
                     else f"rows {b['row'] + 1}-{b['row'] + b['length']}")
            raise InputError(f"{b['file']}: its content changed since the interrupted run (block {b['block']}, "
                             f"{where}); delete {plan_file.parent} to start over")
    if touched:
        plan["input"] = list(now.values())  # same content, newer times: checked once
        write_json_atomic(plan_file, plan)
    return plan


def _run(ray, todo, folder, model, workers, cpus_per_worker, gpus_per_worker, options, udf, manifest,
         manifest_file, parts, total, progress) -> None:
    """Score the blocks in `todo` on the actor pool, recording each finished part in the manifest."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts rows
    ds = ray.data.from_items([{"block": json.dumps(b)} for b in todo], override_num_blocks=len(todo))
    scored = ds.map_batches(udf, fn_constructor_kwargs={"model": str(model), "folder": str(folder.resolve()),
                                                        "options": options},
                            batch_size=1, batch_format="pyarrow", num_cpus=cpus_per_worker,
                            num_gpus=gpus_per_worker or None,
                            compute=ray.data.ActorPoolStrategy(size=min(workers, len(todo)),
                                                               max_tasks_in_flight_per_actor=1))
    from .stream import progress_bar

    bar = progress_bar(total, sum(p["rows"] for p in parts.values())) if progress else None
    try:
        for row in scored.iter_rows():
            parts[int(row["block"])] = {"part": str(row["part"]), "seconds": float(row["seconds"]),
                                        **{k: int(row[k]) for k in ("rows", "batches", "tokens", "worker")}}
            manifest["parts"] = {str(k): parts[k] for k in sorted(parts)}
            write_json_atomic(manifest_file, manifest)
            if bar is not None:
                bar.update(int(row["rows"]))
    except ray.exceptions.RayTaskError as e:  # a bad row, raised in a worker: what it was, not Ray's trace
        found = re.search(r"RequestError: (.+)", str(e))
        if found is None:
            raise
        raise RequestError(f"{found.group(1)} (the parts before it are kept for --resume)") from None
    finally:
        if bar is not None:
            bar.close()


def _merge(folder: Path, names: list[str], final: Path) -> None:
    """The parts, in order, streamed into `final` through a temporary file: JSONL byte for byte,
    Parquet through _writer, 1024 rows at a time."""
    tmp = final.with_name(f".{final.name}.partial")
    try:
        if final.suffix not in PARQUET:
            with open(tmp, "wb") as out:
                for name in names:
                    with open(folder / name, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 22)
                out.flush()
                os.fsync(out.fileno())
        else:
            with _writer(tmp, final.suffix) as write:
                for name in names:
                    with open(folder / name, encoding="utf-8") as f:
                        while chunk := [line.rstrip("\n") for _, line in zip(range(1024), f)]:
                            write(chunk)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _describe(row) -> str:
    if isinstance(row, dict) and row.get("id") is not None:
        return f"the row with id {row['id']!r}"
    text = row if isinstance(row, str) else json.dumps(row, ensure_ascii=False, default=str)
    return f"the row {text[:80]!r}{'...' if len(text) > 80 else ''}"


class _writer:
    """Appends JSON result texts to a JSONL file, or their fields to a Parquet file (`preferred` as
    text: "chosen"/"rejected" for pairs, the index for rankings; the id column's type from the first
    batch)."""

    def __init__(self, path: Path, suffix: str):
        self.path, self.parquet = path, suffix in PARQUET
        self.file = self.writer = None

    def __enter__(self):
        if not self.parquet:
            self.file = open(self.path, "w", encoding="utf-8")
        return self.write

    def write(self, results: list[str]) -> None:
        if not self.parquet:
            self.file.write("".join(r + "\n" for r in results))
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [json.loads(r) for r in results]
        for r in rows:
            if "preferred" in r:
                r["preferred"] = str(r["preferred"])
        if self.writer is None:
            fields = [("score", pa.float64()), ("chosen_score", pa.float64()), ("rejected_score", pa.float64()),
                      ("scores", pa.list_(pa.float64())), ("preferred", pa.string())]
            ids = [r["id"] for r in rows if "id" in r]
            if ids:
                fields.insert(0, ("id", pa.array(ids).type))
            self.schema = pa.schema(fields)
            self.writer = pq.ParquetWriter(self.path, self.schema)
        self.writer.write_table(pa.Table.from_pylist(rows, schema=self.schema))

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        if self.writer is not None:
            self.writer.close()
        return False
