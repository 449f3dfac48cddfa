"""Peak host memory of `worldpm-lite quantize` does not grow with depth.

Builds two random WorldPM checkpoints of the same width (hidden 2048, MLP 5632, Qwen vocabulary),
one with N and one with 4N layers, quantizes each in a fresh process and reports both peak RSS
values (from quantize_log.json, ru_maxrss of the quantizing process).

    python bench/quantize_memory.py [--layers 2] [--out bench/results/quantize_memory.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from worldpm_lite.checkpoint import WorldPMConfig, write_checkpoint
from worldpm_lite.tiny import cached_tokenizer_dir

WIDTH = WorldPMConfig(hidden_size=2048, num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=2,
                      intermediate_size=5632, vocab_size=152064, max_position_embeddings=4096)


def random_checkpoint(path: Path, layers: int) -> Path:
    cfg = dataclasses.replace(WIDTH, num_hidden_layers=layers)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in cfg.expected_shapes().items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    write_checkpoint(path, cfg, tensors, max_shard_bytes=1 << 30)
    for f in cached_tokenizer_dir().iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="N (the deep model has 4N)")
    ap.add_argument("--out", default="bench/results/quantize_memory.json")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.layers, 4 * args.layers):
            src = random_checkpoint(Path(tmp) / f"src{n}", n)
            out = Path(tmp) / f"q{n}"
            cmd = [sys.executable, "-m", "worldpm_lite", "quantize", "--model", str(src), "--out", str(out),
                   "--samples", "8", "--seq-len", "256"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            log = json.loads((out / "quantize_log.json").read_text())
            results[n] = {"layers": n, "peak_rss_mib": log["peak_rss_mib"], "seconds": log["seconds"],
                          "source_weight_bytes": log["source_weight_bytes"]}
            print(f"{n:>3} layers: peak RSS {log['peak_rss_mib']:.0f} MiB, {log['seconds']:.1f} s, "
                  f"source weights {log['source_weight_bytes'] / 2**20:.0f} MiB")
    a, b = results[args.layers]["peak_rss_mib"], results[4 * args.layers]["peak_rss_mib"]
    print(f"peak RSS {4 * args.layers} layers / {args.layers} layers = {b / a:.3f} (target: within 1.15)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"width": dataclasses.asdict(WIDTH), "runs": list(results.values()),
                                          "ratio": b / a}, indent=2) + "\n")


if __name__ == "__main__":
    main()
