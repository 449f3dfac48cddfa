"""`score --ray`: rows through the driver (the path before issue 22) versus part files, on this machine;
and with --blocks, the driver's cost per block as the number of blocks grows.

    python bench/ray_scaling.py [--rows 200000] [--workers 2] [--model DIR] [--smoke]
    python bench/ray_scaling.py --blocks 10000 [--smoke]

Input: --rows short single-turn conversations (3-12 word questions, 5-40 word replies), one JSONL
file, so that the model's time per row is small and what the rows cost on their way out shows.
Model: a random checkpoint of the tests' small shape (2 layers, hidden 128, the real Qwen
tokenizer), built in a temporary folder (or --model); its weights do not matter here. A local Ray
cluster with every CPU of this machine, --workers actors of one torch thread each. Three ways, each
timed from the call to the finished output (planning, actors loading the model, scoring, writing):

  driver   read_text -> map_batches(ScoreBatch) -> every result row streamed, in order, through
           the driver into one JSONL file: what `score --ray` did before issue 22
  parts    `score_dataset(..., DIR/)`: each worker writes its blocks' part files; the driver
           records only names and counts in the manifest
  merged   `score_dataset(..., FILE.jsonl)`: the parts, then streamed together into one file

with the driver process's own CPU seconds for each (rows through the driver cost its CPU time).
Checks: `merged` and `driver` byte-identical; with --smoke (2,000 rows, about a minute), both also
byte-identical to single-process `score`. PASS when the outputs agree and `parts` is at least 0.9x
the rows/s of `driver`. Writes bench/results/ray_scaling[-smoke].json.

--blocks N: N/10 and then N blocks of one row (a Parquet file: blocks by row), each through
`score_dataset(..., DIR/)`. For each: the driver process's CPU seconds from one finished part to the
next (handing out blocks, recording parts) and the time of each manifest record (an append and an
fsync), medians of the first and last tenth of the run. Beside them, the manifest as it was recorded
before issue 31 (the whole manifest.json rewritten and fsynced for every part) at N/10 and N/5
parts: the baseline. PASS when every planned block has its part, the driver's CPU per block at N is
at most 1.5x that at N/10, and in the last tenth of the N run at most 1.5x its first tenth. Writes
bench/results/ray_blocks[-smoke].json (--smoke: N = 1,000, about 40 s).

What a 2-core machine can show: the driver's cost per row, and that part files take it away. What it
cannot: scaling with workers (both workers and the driver share the same two cores) or a shared
filesystem's latency.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from worldpm_lite.ray import ScoreBatch, score_dataset

WORDS = ("sleep tea walk early screen light dark cool room habit week rest quiet mind body read morning night "
         "coffee noon run water").split()


def write_input(path: Path, rows: int) -> None:
    rng = random.Random(0)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": i, "messages": [{"role": "user", "content": text(3, 12)},
                                                      {"role": "assistant", "content": text(5, 40)}]}) + "\n")


def small_model(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from helpers import SMALL, add_tokenizer, random_state

    from worldpm_lite.checkpoint import write_checkpoint

    write_checkpoint(folder, SMALL, random_state(SMALL))
    return add_tokenizer(folder)


def through_the_driver(src: Path, out: Path, model: str, workers: int) -> int:
    """The path before issue 22: results in input order through the driver into one file."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
    scored = ray.data.read_text(str(src)).map_batches(
        ScoreBatch, fn_constructor_kwargs={"model": model, "device": "cpu", "threads": 1}, batch_size=512,
        batch_format="pyarrow", num_cpus=0.5, compute=ray.data.ActorPoolStrategy(size=workers))
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            results = batch.column("result").to_pylist()
            f.write("".join(r + "\n" for r in results))
            n += len(results)
    ctx.execution_options.preserve_order = False
    return n


def timed(run) -> dict:
    cpu, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    rows = run()
    seconds, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "driver_cpu_s": after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime}


def record_times(run) -> tuple[object, list[float], list[float], list[float]]:
    """run(), with each manifest record's wall time (Manifest.add wrapped: the same append and fsync),
    the driver process's CPU time from one record to the next (its cost per block as the run goes on)
    and that of its main thread alone (the driver's Python: without Ray's own threads in the process)."""
    from worldpm_lite.blocks import Manifest

    add, wall, cpu, main = Manifest.add, [], [], []
    last = [None]

    def timed_add(self, record):
        t = time.perf_counter()
        add(self, record)
        wall.append(time.perf_counter() - t)
        now = time.process_time(), time.thread_time()
        if last[0] is not None:
            cpu.append(now[0] - last[0][0])
            main.append(now[1] - last[0][1])
        last[0] = now
    Manifest.add = timed_add
    try:
        return run(), wall, cpu, main
    finally:
        Manifest.add = add


def old_manifest(folder: Path, parts: int) -> list[float]:
    """Seconds per record of the manifest before issue 31: every part rewrote manifest.json whole."""
    from worldpm_lite.checkpoint import write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    manifest, done, times = {"complete": False, "rows": 0, "parts": {}}, {}, []
    for k in range(parts):
        t = time.perf_counter()
        done[k] = {"part": f"part-{k:05d}-rows-{k}-{k}.jsonl", "seconds": 0.01, "rows": 1, "batches": 1,
                   "tokens": 40, "worker": 12345}
        manifest["parts"] = {str(i): done[i] for i in sorted(done)}
        write_json_atomic(folder / "manifest.json", manifest)
        times.append(time.perf_counter() - t)
    return times


def tenths(times: list[float]) -> dict:
    """Medians of the first and the last tenth, and of each tenth in order, in ms."""
    n = max(1, len(times) // 10)
    each = [round(1e3 * statistics.median(times[i:i + n]), 3) for i in range(0, n * 10, n)]
    return {"first_ms": 1e3 * statistics.median(times[:n]), "last_ms": 1e3 * statistics.median(times[-n:]),
            "tenths_ms": each}


def blocks_run(args) -> int:
    """--blocks: the driver's cost per block at N/10 and N one-row blocks (see the module docstring)."""
    n = 1000 if args.smoke else args.blocks
    work = Path(tempfile.mkdtemp(prefix="ray-blocks-"))
    model = args.model or str(small_model(work / "model"))
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
             _system_config={"worker_niceness": 0})
    cpu = {"device": "cpu", "threads": 1}
    runs = {}
    for blocks in (n // 10, n):
        src = work / f"in-{blocks}.parquet"  # one row a block, exactly (JSONL blocks are cut by bytes)
        write_input(work / "rows.jsonl", blocks)
        pq.write_table(pa.Table.from_pylist([json.loads(line) for line in open(work / "rows.jsonl")]), src)
        run, wall, cpu_per_block, main_per_block = record_times(
            lambda src=src, blocks=blocks: timed(lambda: score_dataset(
                str(src), f"{work}/out-{blocks}/", model, args.workers, cpus_per_worker=0.5, block_rows=1,
                scorer_args=cpu, log=lambda m: None)))
        parts = len(list((work / f"out-{blocks}").glob("part-*.jsonl")))
        planned = len(json.loads((work / f"out-{blocks}" / "plan.json").read_text())["blocks"])
        runs[blocks] = run | {"planned": planned, "parts": parts, "records": len(wall), "record": tenths(wall),
                              "driver_cpu_per_block": tenths(cpu_per_block),
                              "main_thread_cpu_per_block": tenths(main_per_block),
                              "driver_cpu_ms_per_block_median": 1e3 * statistics.median(cpu_per_block)}
        r = runs[blocks]
        print(f"{planned:6d} blocks  {r['seconds']:7.1f} s (driver CPU {r['driver_cpu_s']:.1f} s in all)  driver CPU "
              f"per block {r['driver_cpu_per_block']['first_ms']:.2f} ms first tenth, "
              f"{r['driver_cpu_per_block']['last_ms']:.2f} ms last tenth; a record {r['record']['first_ms']:.2f} ms "
              f"first tenth, {r['record']['last_ms']:.2f} ms last tenth (medians); driver CPU per block by tenth: "
              f"{r['driver_cpu_per_block']['tenths_ms']} ms, its main thread's "
              f"{r['main_thread_cpu_per_block']['tenths_ms']} ms", flush=True)
    old = {parts: tenths(old_manifest(work / f"old-{parts}", parts)) for parts in (n // 10, n // 5)}
    for parts, t in old.items():
        print(f"before issue 31, {parts} parts: record {t['first_ms']:.2f} ms first tenth, {t['last_ms']:.2f} ms last "
              "tenth", flush=True)
    small, large = runs[n // 10], runs[n]
    cpu_growth = large["driver_cpu_ms_per_block_median"] / small["driver_cpu_ms_per_block_median"]
    record_growth = large["driver_cpu_per_block"]["last_ms"] / large["driver_cpu_per_block"]["first_ms"]
    ok = all(r["parts"] == r["planned"] for r in runs.values()) and cpu_growth <= 1.5 and record_growth <= 1.5
    print(f"driver CPU per block (median) at {n} vs {n // 10} blocks: {cpu_growth:.2f}x; at {n}, last vs first "
          f"tenth: {record_growth:.2f}x -> {'PASS' if ok else 'FAIL'}")
    out = Path(args.out or Path(__file__).parent / "results" / f"ray_blocks{'-smoke' if args.smoke else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"blocks": n, "workers": args.workers, "cores": os.cpu_count(), "runs": runs,
                               "before_issue_31": old, "cpu_growth": cpu_growth, "record_growth": record_growth,
                               "pass": ok}, indent=1))
    print(f"wrote {out}")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--block-rows", type=int, default=5000, help="rows per part (default: 5000)")
    ap.add_argument("--model", help="default: a random checkpoint of the tests' small shape")
    ap.add_argument("--smoke", action="store_true", help="2,000 rows, also checked against single-process score "
                    "(with --blocks: 1,000 blocks)")
    ap.add_argument("--blocks", type=int, help="measure the driver's cost per block at N/10 and N one-row blocks")
    ap.add_argument("--out", help="default: bench/results/ray_scaling[-smoke].json (ray_blocks with --blocks)")
    args = ap.parse_args()
    if args.blocks:
        return blocks_run(args)
    if args.smoke:
        args.rows, args.block_rows = 2000, 250
    work = Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    model = args.model or str(small_model(work / "model"))
    src = work / "in.jsonl"
    write_input(src, args.rows)
    print(f"{args.rows} rows ({src.stat().st_size / 2**20:.1f} MiB), {args.workers} workers, blocks of "
          f"{args.block_rows} rows; work folder {work}", flush=True)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
             _system_config={"worker_niceness": 0})
    cpu = {"device": "cpu", "threads": 1}
    runs = {
        "driver": timed(lambda: through_the_driver(src, work / "driver.jsonl", model, args.workers)),
        "parts": timed(lambda: score_dataset(str(src), f"{work}/parts/", model, args.workers, cpus_per_worker=0.5,
                                             block_rows=args.block_rows, scorer_args=cpu, log=lambda m: None)),
        "merged": timed(lambda: score_dataset(str(src), str(work / "merged.jsonl"), model, args.workers,
                                              cpus_per_worker=0.5, block_rows=args.block_rows, scorer_args=cpu,
                                              log=lambda m: None)),
    }
    for name, r in runs.items():
        print(f"{name:7s} {r['seconds']:7.1f} s  {r['rows_per_s']:8,.0f} rows/s  driver CPU {r['driver_cpu_s']:6.1f} s",
              flush=True)
    same = (work / "merged.jsonl").read_bytes() == (work / "driver.jsonl").read_bytes()
    if args.smoke:
        from worldpm_lite.scorer import Scorer
        from worldpm_lite.stream import score_file, score_settings

        scorer = Scorer.from_pretrained(model, device="cpu")
        score_file(scorer, str(src), str(work / "single.jsonl"), score_settings(scorer, model), progress=False,
                   log=lambda m: None)
        same = same and (work / "single.jsonl").read_bytes() == (work / "merged.jsonl").read_bytes()
    ratio = runs["parts"]["rows_per_s"] / runs["driver"]["rows_per_s"]
    ok = same and ratio >= 0.9
    print(f"outputs byte-identical{' (and to single-process score)' if args.smoke else ''}: {same}; parts vs driver "
          f"rows/s: {ratio:.2f}x -> {'PASS' if ok else 'FAIL'}")
    out = Path(args.out or Path(__file__).parent / "results" / f"ray_scaling{'-smoke' if args.smoke else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": args.rows, "workers": args.workers, "block_rows": args.block_rows,
                               "cpus": ray.cluster_resources().get("CPU"), "cores": os.cpu_count(), "runs": runs,
                               "identical": same, "parts_vs_driver": ratio, "pass": ok}, indent=1))
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
