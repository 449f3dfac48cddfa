"""One command for a lent GPU (under 5 minutes): every kernel against its reference, then timings.

    python bench/gpu_check.py [--out bench/results/gpu_check.json]
    TRITON_INTERPRET=1 python bench/gpu_check.py --smoke     # tiny shapes on the CPU: checks the script runs

1. Correctness on the GPU, fresh random inputs: GPTQ dequantize (4/8-bit, act-order), the fused
   dequant-matmul (fp16/bf16, M at tile edges), the fused tail (B = 1, 3, 17, 65; h = 8192 and 1000).
2. Dequant-matmul vs a bf16 matmul and vs dequantize + GEMM at M = 1, 16, 256, 4096 for
   (K, N) = (8192, 8192) and (8192, 29568), 4-bit group 128: where the fused kernel stops paying.
3. The tail kernel vs its torch reference at B = 1, 16, 64, h = 8192, in GB/s against the card's
   copy bandwidth measured here.
4. End to end: a WorldPM-shaped model with a few full-width layers (random weights), scoring
   tokens/s in bf16 and in 4-bit (RTN-packed GPTQ tensors) with the torch and Triton backends.
5. GPTQ of one full-size WorldPM-72B layer on the GPU (bench/quantize_layer_cost.py), and the
   80-layer extrapolation (--no-quantize skips it).
A short table comes last; everything goes to --out as JSON. Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from worldpm_lite.kernels.gptq import dequantize, dequantize_ref, gptq_matmul, gptq_matmul_ref
from worldpm_lite.kernels.tail import fused_tail, fused_tail_ref
from worldpm_lite.quantize.gptq import QuantConfig, rtn
from worldpm_lite.quantize.pack import pack

from worldpm_lite.checkpoint import GPTQSpec, WorldPMConfig
from worldpm_lite.model import WorldPM, cast_parameters, meta_model
from worldpm_lite.plan import WORLDPM_72B
from worldpm_lite.qlinear import GPTQLinear

FAILURES: list[str] = []


def check(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()
    ok = err <= rtol and not got.isnan().any()
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: max error {err:.2e} of max |ref| (limit {rtol:.0e})")
    if not ok:
        FAILURES.append(name)


def timed(device, fn, *args) -> float:
    """Median milliseconds of fn(*args) (triton's do_bench on a GPU; a few wall-clock runs elsewhere)."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(lambda: fn(*args), warmup=10, rep=50)
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn(*args)
        runs.append((time.perf_counter() - start) * 1e3)
    return sorted(runs)[1]


def packed(K: int, N: int, bits: int, group: int, act_order: bool, device, gen) -> tuple[torch.Tensor, ...]:
    maxq, groups = (1 << bits) - 1, K // group
    q = torch.randint(0, maxq + 1, (N, K), generator=gen)
    scales = torch.rand(groups, N, generator=gen) * 0.002 + 1e-4
    zeros = torch.randint(0, maxq + 1, (groups, N), generator=gen)
    g_idx = torch.arange(K) // group
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    t = pack(q, scales, zeros, g_idx, bits)
    return tuple(t[k].to(device) for k in ("qweight", "qzeros", "scales", "g_idx"))


def correctness(device, smoke: bool) -> None:
    print("1. kernels vs references")
    gen = torch.Generator().manual_seed(0)
    K, N = (256, 96) if smoke else (4096, 1536)
    for bits in (4, 8):
        for act in (False, True):
            w = packed(K, N, bits, 128, act, device, gen)
            check(f"dequantize {bits}-bit act_order={act}", dequantize(*w, bits, torch.float16),
                  dequantize_ref(*w, bits, torch.float16), 1e-3)
            for dtype in (torch.float16, torch.bfloat16):
                for M in (1, 7, 33) if smoke else (1, 7, 33, 300):
                    x = torch.randn(M, K, generator=gen).to(device, dtype)
                    bias = torch.randn(N, generator=gen).to(device, dtype)
                    check(f"gptq_matmul {bits}-bit act={act} {dtype} M={M}", gptq_matmul(x, *w, bits, bias=bias),
                          gptq_matmul_ref(x, *w, bits, bias=bias), 2e-2 if dtype == torch.bfloat16 else 4e-3)
    for h in (40, 129) if smoke else (8192, 1000):
        for B in (1, 3, 17, 65):
            hidden = torch.randn(B, 9, h, generator=gen).to(device, torch.bfloat16)
            index = torch.randint(0, 9, (B,), generator=gen)
            head = [torch.rand(h, generator=gen).to(device, torch.bfloat16) + 0.5, 1e-6,
                    (torch.randn(h, h, generator=gen) / h**0.5).to(device, torch.bfloat16),
                    torch.randn(h, generator=gen).to(device, torch.bfloat16),
                    (torch.randn(1, h, generator=gen) / h**0.5).to(device, torch.bfloat16),
                    torch.randn(1, generator=gen).to(device, torch.bfloat16)]
            check(f"fused_tail B={B} h={h}", fused_tail(hidden, index, *head), fused_tail_ref(hidden, index, *head),
                  1e-4)


def dequant_gemm(x, w):
    return x @ dequantize(*w, 4, x.dtype)


def matmul_timings(device, smoke: bool) -> list[dict]:
    print("2. dequant-matmul vs bf16 matmul vs dequantize + GEMM (4-bit, group 128), ms")
    gen = torch.Generator().manual_seed(1)
    rows = []
    shapes = [(256, 256), (256, 768)] if smoke else [(8192, 8192), (8192, 29568)]
    for K, N in shapes:
        w = packed(K, N, 4, 128, False, device, gen)
        dense = dequantize_ref(*w, 4, torch.bfloat16)
        for M in (1, 16) if smoke else (1, 16, 256, 4096):
            x = torch.randn(M, K, generator=gen).to(device, torch.bfloat16)
            row = {"K": K, "N": N, "M": M,
                   "bf16_matmul_ms": timed(device, torch.matmul, x, dense),
                   "fused_ms": timed(device, gptq_matmul, x, *w, 4),
                   "dequant_gemm_ms": timed(device, dequant_gemm, x, w)}
            row["fused_wins"] = row["fused_ms"] < row["dequant_gemm_ms"]
            print(f"  K={K} N={N} M={M}: bf16 {row['bf16_matmul_ms']:.3f}, fused {row['fused_ms']:.3f}, "
                  f"dequant+GEMM {row['dequant_gemm_ms']:.3f}")
            rows.append(row)
    return rows


def tail_timings(device, smoke: bool, bandwidth: float) -> list[dict]:
    print("3. fused tail vs reference")
    gen = torch.Generator().manual_seed(2)
    h = 256 if smoke else 8192
    head = [torch.rand(h, generator=gen).to(device, torch.bfloat16) + 0.5, 1e-6,
            torch.randn(h, h, generator=gen).to(device, torch.bfloat16), torch.randn(h, generator=gen).to(device),
            torch.randn(1, h, generator=gen).to(device, torch.bfloat16), torch.randn(1, generator=gen).to(device)]
    rows = []
    for B in (1, 16, 64):
        hidden = torch.randn(B, 512, h, generator=gen).to(device, torch.bfloat16)
        index = torch.randint(0, 512, (B,), generator=gen)
        ms = timed(device, fused_tail, hidden, index, *head)
        ref_ms = timed(device, fused_tail_ref, hidden, index, *head)
        moved = h * h * 2 + B * h * 2  # the head weight once, plus the gathered rows
        gbs = moved / ms / 1e6
        rows.append({"B": B, "h": h, "kernel_ms": ms, "reference_ms": ref_ms, "GB_per_s": gbs,
                     "fraction_of_copy_bandwidth": gbs / bandwidth if bandwidth else None})
        print(f"  B={B} h={h}: kernel {ms:.3f} ms ({gbs:.0f} GB/s, {gbs / bandwidth:.0%} of copy bandwidth), "
              f"reference {ref_ms:.3f} ms")
    return rows


def copy_bandwidth(device) -> float:
    """GB/s of a device-to-device copy, bytes read plus written."""
    if device != "cuda":
        return 0.0
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = timed(device, b.copy_, a)
    return 2 * a.numel() / ms / 1e6


def build(config: WorldPMConfig, device, bits: int | None, backend: str) -> WorldPM:
    """Random WorldPM in bf16 on `device`; with bits, its decoder linears RTN-quantized into GPTQ tensors."""
    torch.manual_seed(3)
    with torch.device(device):
        dense = cast_parameters(WorldPM(config), torch.bfloat16)
    dense.model.rotary_emb.to(device)
    if bits is None:
        return dense.eval()
    model = meta_model(config, GPTQSpec(bits, 128), torch.bfloat16, backend)
    state = {k: v for k, v in dense.state_dict().items()}
    for name, mod in model.named_modules():
        if isinstance(mod, GPTQLinear):
            w = state.pop(f"{name}.weight")
            q = rtn(w.float(), QuantConfig(bits=bits))
            state.update({f"{name}.{k}": v for k, v in pack(q.q, q.scales, q.zeros, q.g_idx, bits).items()})
    del dense
    model.load_state_dict(state, assign=True)
    model.model.rotary_emb.to(device)
    model.tail_backend = "triton" if backend == "triton" else "torch"
    return model.eval()


def end_to_end(device, smoke: bool, layers: int) -> list[dict]:
    print(f"4. scoring tokens/s, WorldPM-72B width, {layers} layers, random weights")
    config = dataclasses.replace(WORLDPM_72B, num_hidden_layers=layers) if not smoke else WorldPMConfig(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
        vocab_size=1000, max_position_embeddings=512)
    batch, seq = (2, 32) if smoke else (16, 512)  # 8192 tokens: the default token budget
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    last = torch.full((batch,), seq - 1, device=device)
    rows, scores = [], {}
    for name, bits, backend in (("bf16", None, "torch"), ("gptq4-torch", 4, "torch"), ("gptq4-triton", 4, "triton")):
        model = build(config, device, bits, backend)
        with torch.inference_mode():
            scores[name] = model(ids, last)
            ms = timed(device, model, ids, last)
        tps = batch * seq / ms * 1e3
        rows.append({"variant": name, "tokens_per_s": tps, "ms_per_batch": ms, "batch": batch, "seq": seq})
        print(f"  {name}: {tps:,.0f} tokens/s ({ms:.1f} ms per {batch}x{seq} batch)")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    check("4-bit triton vs torch backend scores", scores["gptq4-triton"], scores["gptq4-torch"], 2e-2)
    return rows


def summary(result: dict) -> None:
    """The short table printed last."""
    print("\nsummary (" + result["device"] + ")")
    for r in result["matmul"]:
        print(f"  matmul K={r['K']} N={r['N']} M={r['M']}: fused {r['fused_ms'] / r['bf16_matmul_ms']:.2f}x bf16 time, "
              f"dequant+GEMM {r['dequant_gemm_ms'] / r['bf16_matmul_ms']:.2f}x")
    wins = sorted({r["M"] for r in result["matmul"] if r["fused_wins"]})
    print(f"  fused dequant-matmul beats dequantize + GEMM at M in {wins} (runtime default: fused up to 16 tokens)")
    for r in result["tail"]:
        frac = r["fraction_of_copy_bandwidth"]
        print(f"  tail B={r['B']}: {r['GB_per_s']:.0f} GB/s" + (f" ({frac:.0%} of copy bandwidth)" if frac else ""))
    e2e = {r["variant"]: r["tokens_per_s"] for r in result["end_to_end"]}
    print("  scoring tokens/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in e2e.items()))
    if "quantize_layer" in result:
        q = result["quantize_layer"]
        print(f"  GPTQ of one layer (hidden {q['hidden_size']}): {q['seconds_per_layer']} s, "
              f"80 layers {q['extrapolated_80_layers_hours']} h")
    print(f"  {len(result['failures'])} failed checks; {result['seconds']:.0f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, for the CPU with TRITON_INTERPRET=1")
    ap.add_argument("--layers", type=int, default=4, help="full-width decoder layers in the end-to-end model")
    ap.add_argument("--no-quantize", action="store_true", help="skip step 5 (GPTQ of one full-size layer)")
    ap.add_argument("--out", default="bench/results/gpu_check.json")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("gpu_check: no CUDA device; use --smoke (with TRITON_INTERPRET=1) to check the script on a CPU")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    print(f"device: {name}, torch {torch.__version__}")
    start = time.time()
    correctness(device, args.smoke)
    bandwidth = copy_bandwidth(device)
    result = {"device": name, "torch": torch.__version__, "copy_bandwidth_GB_per_s": bandwidth,
              "matmul": matmul_timings(device, args.smoke), "tail": tail_timings(device, args.smoke, bandwidth or 1),
              "end_to_end": end_to_end(device, args.smoke, args.layers)}
    if not args.no_quantize:
        print("5. GPTQ of one decoder layer (4-bit g128, 512 calibration tokens)")
        from quantize_layer_cost import measure  # bench/ is this script's folder

        config = WORLDPM_72B if not args.smoke else dataclasses.replace(WORLDPM_72B, hidden_size=256,
                                                                        intermediate_size=512, num_attention_heads=4,
                                                                        num_key_value_heads=2)
        result["quantize_layer"] = measure(config, device, tokens=512, seq_len=256)
    result["failures"] = FAILURES
    result["seconds"] = time.time() - start
    summary(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
