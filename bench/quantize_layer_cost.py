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


def measure(config=WORLDPM_72B, device: str = "cpu", tokens: int = 512, seq_len: int = 256, bits: int = 4) -> dict:
    """Quantize one random decoder layer of `config` on `device`; seconds, per-linear seconds, memory."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    qcfg = config.to_qwen2()
    torch.manual_seed(0)
    with torch.device(device):
        layer = Qwen2DecoderLayer(qcfg, 0).eval()  # fp32, nn.Linear's default random init
        rope = Qwen2RotaryEmbedding(qcfg)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1, seq_len, config.hidden_size, generator=gen) for _ in range(max(1, tokens // seq_len))]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    with torch.no_grad():
        _, reports = quantize_layer(layer, inputs, rope, QuantConfig(bits=bits))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.time() - start
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu",
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
              "bits": bits, "calibration_tokens": sum(x.shape[1] for x in inputs),
              "seconds_per_layer": round(seconds, 1),
              "extrapolated_80_layers_hours": round(80 * seconds / 3600, 2),
              "gptq_seconds_by_linear": {r.name: round(r.seconds, 1) for r in reports},
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if cuda:
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens, as sequences of --seq-len")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--out", default="bench/results/quantize_layer_cost.json")
    args = ap.parse_args()
    result = measure(WORLDPM_72B, args.device, args.tokens, args.seq_len, args.bits)
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
