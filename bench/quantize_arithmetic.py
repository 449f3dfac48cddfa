"""Would faster calibration arithmetic cost GPTQ accuracy? (issue 23, item 2)

The small model (worldpm_lite.tiny) is quantized to 4 bits by the pipeline three ways: the layer's
calibration passes in fp32 (what `quantize` does), under bf16 autocast, and with every linear's
inputs and weights rounded to TF32 (10 mantissa bits, fp32 accumulation: a CPU stand-in for a GPU's
TF32 tensor cores). Hessian sums stay fp32 throughout. For each, the held-out output error of every
decoder layer (instrument.layer_errors, 100 held-out pairs) is measured, over several calibration
orders: reordering only changes the order of the Hessian sums, a rounding-level perturbation that
shows the metric's own spread. The faster arithmetic passes when its mean error per layer is within
1% of fp32's mean.

    python bench/quantize_arithmetic.py [--orders 4] [--out bench/results/quantize_arithmetic.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from worldpm_lite.checkpoint import Checkpoint
from worldpm_lite.instrument import layer_errors
from worldpm_lite.options import QuantConfig
from worldpm_lite.quantize import pipeline
from worldpm_lite.quantize.calibration import builtin_calibration
from worldpm_lite.quantize.pipeline import LayerReader, stream_layers
from worldpm_lite.scorer import Scorer
from worldpm_lite.tiny import TINY_QUANT, heldout_pairs, tiny_model_dir

LIMIT = 1.01  # mean held-out error per layer, faster arithmetic over fp32


def tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to TF32's 10 mantissa bits, to nearest even."""
    i = t.float().contiguous().view(torch.int32)
    return ((i + 0x0FFF + ((i >> 13) & 1)) & ~0x1FFF).view(torch.float32)


class TF32Reader(LayerReader):
    """Layers whose linears compute F.linear(tf32(x), tf32(w)) + b; their hooks still see fp32 x."""

    def take(self, i: int):
        layer = super().take(i)
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_hook(lambda m, args, out: F.linear(tf32(args[0]), tf32(m.weight), m.bias))
        return layer


def errors(src, ckpt, calibration, seqs, reference, mode: str) -> list[float]:
    """Held-out error per layer of the small model GPTQ'd with calibration passes in `mode`."""
    candidate = Scorer.from_pretrained(src, device="cpu")
    state = candidate.model.state_dict()
    pipeline.LayerReader = TF32Reader if mode == "tf32" else LayerReader  # what stream_layers reads with
    try:
        dtype = torch.bfloat16 if mode == "bf16" else None
        for i, quantized, _, _ in stream_layers(ckpt, calibration, QuantConfig(bits=4), compute_dtype=dtype):
            for name, q in quantized.items():
                state[f"model.layers.{i}.{name}.weight"].copy_(q.dequantize())
    finally:
        pipeline.LayerReader = LayerReader
    return layer_errors(reference.model, candidate.model, seqs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orders", type=int, default=4, help="calibration orders (seeds 1..N)")
    ap.add_argument("--out", default="bench/results/quantize_arithmetic.json")
    args = ap.parse_args()
    src = tiny_model_dir(0)
    reference, ckpt = Scorer.from_pretrained(src, device="cpu"), Checkpoint(src)
    seqs = [ids for p in heldout_pairs(src)[:100] for ids in (p.chosen_ids, p.rejected_ids)]
    base = builtin_calibration(reference.tokenizer, **TINY_QUANT)
    start, runs = time.time(), {"fp32": [], "bf16": [], "tf32": []}
    for seed in range(1, args.orders + 1):
        calibration = list(base)
        random.Random(seed).shuffle(calibration)
        for mode, out in runs.items():
            out.append(errors(src, ckpt, calibration, seqs, reference, mode))
            print(f"order {seed} {mode}: " + ", ".join(f"{e:.4e}" for e in out[-1]), flush=True)
    mean = {k: np.mean(v, axis=0) for k, v in runs.items()}
    spread = np.max(runs["fp32"], axis=0) / np.min(runs["fp32"], axis=0)
    print("fp32's own spread over orders (max / min per layer): " + ", ".join(f"{x:.3f}" for x in spread))
    verdict = {}
    for mode in ("bf16", "tf32"):
        ratio = mean[mode] / mean["fp32"]
        verdict[mode] = bool((ratio <= LIMIT).all())
        print(f"{'PASS' if verdict[mode] else 'FAIL'} {mode}: mean error per layer / fp32's = "
              + ", ".join(f"{x:.4f}" for x in ratio) + f" (limit {LIMIT})")
    print(f"{time.time() - start:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": runs, "fp32_spread": spread.tolist(), "pass": verdict,
                                          "limit": LIMIT}, indent=2) + "\n")


if __name__ == "__main__":
    main()
