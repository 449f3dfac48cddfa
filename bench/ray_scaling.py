"""`worldpm-lite score --ray` from 1 to 2 workers on this machine, beside single-process `score`.

    python bench/ray_scaling.py [--conversations 1000] [--model DIR]

The first N ShareGPT conversations of at most 1024 tokens (whole), one JSONL file, the small model
(default: the trained one of `make-tiny`, seed 0) on the CPU. A local Ray cluster with every CPU of
this machine; each configuration is timed from the call to the renamed output (Ray Data planning,
actors loading the model, scoring, writing), and every output is checked byte-identical to the
single-process one. Writes bench/results/ray_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray

from worldpm_lite.chat import encode_conversation
from worldpm_lite.data import sharegpt_conversations
from worldpm_lite.ray import score_dataset
from worldpm_lite.scorer import Scorer
from worldpm_lite.stream import score_file, score_settings
from worldpm_lite.tiny import tiny_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=1000)
    ap.add_argument("--model", help="default: the small trained model, seed 0")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ray_scaling.json"))
    args = ap.parse_args()
    model = args.model or str(tiny_model_dir(0))
    scorer = Scorer.from_pretrained(model, device="cpu")
    work = Path(tempfile.mkdtemp())
    src, tokens, n = work / "in.jsonl", 0, 0
    with open(src, "w") as f:
        for conv in sharegpt_conversations():
            conv = conv if conv[-1]["role"] == "assistant" else conv[:-1]
            ids = encode_conversation(scorer.tokenizer, conv)
            if len(ids) <= 1024:
                f.write(json.dumps({"id": n, "messages": conv}) + "\n")
                tokens, n = tokens + len(ids), n + 1
            if n == args.conversations:
                break
    t = time.perf_counter()
    score_file(scorer, str(src), str(work / "single.jsonl"), score_settings(scorer, model), progress=False,
               log=lambda m: None)
    single = time.perf_counter() - t
    want = (work / "single.jsonl").read_bytes()
    del scorer
    print(f"{n} conversations, {tokens} tokens; single-process score: {single:.1f} s ({tokens / single:,.0f} tok/s)")
    t = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"ray.init: {time.perf_counter() - t:.1f} s, {ray.cluster_resources().get('CPU')} CPUs")
    cpus = int(ray.cluster_resources()["CPU"])
    runs = []
    for workers in (1, 2, 1, 2):
        out = work / f"ray-{workers}-{len(runs)}.jsonl"
        t = time.perf_counter()
        score_dataset(str(src), str(out), model, workers, cpus_per_worker=cpus // workers,
                      scorer_args={"device": "cpu", "threads": cpus // workers}, log=lambda m: None)
        seconds = time.perf_counter() - t
        assert out.read_bytes() == want, "Ray output differs from single-process score"
        runs.append({"workers": workers, "threads_per_worker": cpus // workers, "seconds": seconds,
                     "tokens_per_s": tokens / seconds})
        print(f"ray, {workers} worker(s) x {cpus // workers} thread(s): {seconds:.1f} s "
              f"({tokens / seconds:,.0f} tok/s)", flush=True)
    best = {w: min(r["seconds"] for r in runs if r["workers"] == w) for w in (1, 2)}
    print(f"2 workers vs 1 (best of 2 each): {best[1] / best[2]:.2f}x; single-process score {single:.1f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"conversations": n, "tokens": tokens, "cpus": cpus, "cores": os.cpu_count(),
                                          "single_process_seconds": single, "runs": runs,
                                          "speedup_2_vs_1": best[1] / best[2]}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
