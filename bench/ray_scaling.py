"""`score --ray`: rows through the driver (the path before issue 22) versus part files, on this machine.

    python bench/ray_scaling.py [--rows 200000] [--workers 2] [--model DIR] [--smoke]

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
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--block-rows", type=int, default=5000, help="rows per part (default: 5000)")
    ap.add_argument("--model", help="default: a random checkpoint of the tests' small shape")
    ap.add_argument("--smoke", action="store_true", help="2,000 rows, also checked against single-process score")
    ap.add_argument("--out", help="default: bench/results/ray_scaling[-smoke].json")
    args = ap.parse_args()
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
