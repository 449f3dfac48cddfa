"""Scale-out with Ray Data (the optional extra `[ray]`): one data set scored by many workers.

`ScoreBatch` is the callable class for `Dataset.map_batches`: each Ray actor loads one Scorer once
(give it the GPUs it needs with `num_gpus`, e.g. 2 for 4-bit WorldPM-72B on 2 x 24 GB) and scores
batches of rows in `score`'s request formats:
  - a "text" column of JSONL lines, as `ray.data.read_text` gives them, or
  - request columns (`messages`; `prompt` with `chosen`/`rejected` or `responses`; optional `id`),
    as `ray.data.read_parquet` gives them.
It returns a "result" column: each row's result as the JSON text `score` writes, id kept.

    ds = ray.data.read_parquet("s3://bucket/pairs/")
    scored = ds.map_batches(ScoreBatch, fn_constructor_kwargs={"model": "/models/WorldPM-72B-gptq4"},
                            batch_size=512, batch_format="pyarrow", num_gpus=2,
                            compute=ray.data.ActorPoolStrategy(size=8))

`score_dataset` is `worldpm-lite score --ray`: it reads a JSONL or Parquet file with Ray Data, runs
ScoreBatch on N workers (a local cluster, or `address`), and streams the results, in input order,
into one JSONL or Parquet file (written beside it and renamed when complete). Ray restarts a worker
that dies and runs its batch again, so the output holds every row once.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from .data import RequestError, parse_request

PARQUET = (".parquet", ".pq")


class ScoreBatch:
    """map_batches class: model (a checkpoint directory) and Scorer.from_pretrained's keywords;
    threads: torch threads per actor (default: torch's choice)."""

    def __init__(self, model: str, threads: int | None = None, **scorer_args):
        import torch

        from .scorer import Scorer

        if threads:
            torch.set_num_threads(threads)
        self.scorer = Scorer.from_pretrained(model, **scorer_args)

    def __call__(self, batch):
        rows = batch.column("text").to_pylist() if "text" in batch.column_names else batch.to_pylist()
        requests, groups = [], []
        for row in rows:
            where, obj = ("line" if isinstance(row, str) else "row"), None
            try:
                obj = json.loads(row) if isinstance(row, str) else {k: v for k, v in row.items() if v is not None}
                r = parse_request(obj, where)
                requests.append(r)
                groups.append(self.scorer.group(r.conversations, r.prompt, f"{where} conversation"))
            except ValueError as e:  # JSONDecodeError, ConversationError, ConversationTooLong
                raise RequestError(f"{_describe(row if obj is None else obj)}: {e}") from None
        scores = self.scorer.score_groups(groups)
        return {"result": [json.dumps(r.result(s), ensure_ascii=False) for r, s in zip(requests, scores)]}


def _describe(row) -> str:
    if isinstance(row, dict) and row.get("id") is not None:
        return f"the row with id {row['id']!r}"
    text = row if isinstance(row, str) else json.dumps(row, ensure_ascii=False, default=str)
    return f"the row {text[:80]!r}{'...' if len(text) > 80 else ''}"


def score_dataset(input: str, output: str, model: str, workers: int, address: str | None = None,
                  gpus_per_worker: float = 0, cpus_per_worker: float = 1, batch_rows: int = 256,
                  scorer_args: dict | None = None, log: Callable[[str], None] = print,
                  udf: type = ScoreBatch) -> int:
    """Score every row of `input` (.jsonl, or .parquet / a folder of them) into `output` (.jsonl or
    .parquet) with `workers` Ray actors; returns the number of rows written."""
    import ray

    src, out = Path(input), Path(output)
    if not (src.exists() or "://" in input):
        raise RequestError(f"--input {input}: no such file or folder")
    if out.suffix not in (".jsonl", *PARQUET):
        raise RequestError(f"--output {output}: expected a .jsonl or .parquet file name")
    if not out.absolute().parent.is_dir():
        raise RequestError(f"--output {output}: folder {out.absolute().parent} does not exist")
    if out.exists():
        raise FileExistsError(f"--output {output}: already exists (delete it to score again)")
    if not ray.is_initialized():
        # A cluster started here exists only for this job: its workers run at our priority, not at
        # Ray's default nice 15, which starves them beside any other busy process on the machine
        local = address is None and not os.environ.get("RAY_ADDRESS")
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 **({"_system_config": {"worker_niceness": 0}} if local else {}))
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus_per_worker and workers * cpus_per_worker > cpus - 1:
        # Ray Data's file listing and reading need CPU slots too; workers holding every slot would wait forever
        cpus_per_worker = max(0.01, (cpus - 1) / workers)
        log(f"ray: {workers} workers on {cpus:g} CPUs: each reserves {cpus_per_worker:.2f} CPU so reading keeps one")
    log(f"ray: {ray.cluster_resources()}")
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # output in input order
    if src.suffix in PARQUET or src.is_dir():
        ds = ray.data.read_parquet(input)
    else:
        ds = ray.data.read_text(input, drop_empty_lines=True)
    scored = ds.map_batches(udf, fn_constructor_kwargs={"model": str(model), **(scorer_args or {})},
                            batch_size=batch_rows, batch_format="pyarrow", num_cpus=cpus_per_worker,
                            num_gpus=gpus_per_worker or None, compute=ray.data.ActorPoolStrategy(size=workers))
    tmp = out.with_name(f".{out.name}.partial")
    n = 0
    try:
        try:
            with _writer(tmp, out.suffix) as write:
                for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
                    results = batch.column("result").to_pylist()
                    write(results)
                    n += len(results)
        except ray.exceptions.RayTaskError as e:  # a bad row, raised in a worker: what it was, not Ray's trace
            found = re.search(r"RequestError: (.+)", str(e))
            if found is None:
                raise
            raise RequestError(f"{input}: {found.group(1)}") from None
        if not n:
            raise RequestError(f"{input}: no requests (the input is empty)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return n


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
