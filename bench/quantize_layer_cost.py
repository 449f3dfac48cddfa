"""Cost of GPTQ on one full-size WorldPM-72B decoder layer, and the 80-layer extrapolation.

A random Qwen2 layer with WorldPM-72B's dimensions (hidden 8192, MLP 29568, 64 heads, 8 KV heads),
synthetic calibration activations, and the same `quantize_layer` the pipeline runs: four Hessian
passes (one per sequential group), GPTQ of the seven linears, weights put back quantized.

    python bench/quantize_layer_cost.py [--device cpu|cuda] [--tokens 512] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch
from worldpm_lite.quantize.gptq import QuantConfig
from worldpm_lite.quantize.pipeline import quantize_layer

from worldpm_lite.plan import WORLDPM_72B


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens, as sequences of --seq-len")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--out", default="bench/results/quantize_layer_cost.json")
    args = ap.parse_args()
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    qcfg = WORLDPM_72B.to_qwen2()
    torch.manual_seed(0)
    with torch.device(args.device):
        layer = Qwen2DecoderLayer(qcfg, 0).eval()  # fp32, nn.Linear's default random init
        rope = Qwen2RotaryEmbedding(qcfg)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1, args.seq_len, WORLDPM_72B.hidden_size, generator=gen)
              for _ in range(max(1, args.tokens // args.seq_len))]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.time()
    with torch.no_grad():
        _, reports = quantize_layer(layer, inputs, rope, QuantConfig(bits=args.bits))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.time() - start
    result = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "bits": args.bits, "calibration_tokens": sum(x.shape[1] for x in inputs),
              "seconds_per_layer": round(seconds, 1), "extrapolated_80_layers_hours": round(80 * seconds / 3600, 2),
              "gptq_seconds_by_linear": {r.name: round(r.seconds, 1) for r in reports},
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if args.device.startswith("cuda"):
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
