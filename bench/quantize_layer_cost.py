"""Where the time of `quantize` goes on one WorldPM-72B decoder layer (issue 23), on any machine.

A random Qwen2 layer (WorldPM-72B's shape; --smoke: a reduced width), synthetic calibration
activations (sequences of --seq-len tokens), and the pipeline's per-layer work: read the layer
(bf16 safetensors, page cache dropped), four Hessian passes each stopped at its group's input,
GPTQ of the seven linears as four problems, one per group sharing an input (one factorization, the
column loop as one Triton launch per 128-column block for the group's stacked rows, the deferred
GEMMs), then the pass that makes the next layer's inputs. Reported per layer:
seconds by phase, torch ops + Triton launches counted with the torch profiler (that count does not
depend on the device; on a GPU an op is at most a few kernel launches, views none), FLOPs by phase
(formulas in `flops`), peak memory, and PASS/FAIL against issue 23's targets. On a GPU the first
size also pays Triton's compile of the block kernel (in column_loop) and is the one profiled.

"Before" is the loop issue 23 replaced: five whole passes per layer (a hook collects each group's
Hessian), one sequence at a time, and gptq()'s column loop in torch ops (kernel=False).

    python bench/quantize_layer_cost.py    # a GPU: the full-size layer at 8k, 64k and 128 x 2048 tokens
    TRITON_INTERPRET=1 python bench/quantize_layer_cost.py --smoke    # a CPU, well under a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from worldpm_lite.options import QuantConfig
from worldpm_lite.plan import WORLDPM_72B
from worldpm_lite.quantize.gptq import Clock, gptq, hessian_add, hessian_init, rtn
from worldpm_lite.quantize.pipeline import (
    BATCH_TOKENS,
    LAYER_GROUPS,
    keep_on_device,
    output_error,
    quantize_layer,
    run_layer,
)

SMOKE = dataclasses.replace(WORLDPM_72B, hidden_size=256, num_attention_heads=8, num_key_value_heads=1,
                            intermediate_size=384, head_dim=None)  # 8 query heads per KV head, as WorldPM-72B
TARGET_SECONDS, TARGET_GPU_GIB, TARGET_TOKENS = 7.5, 22.0, 128 * 2048  # on an H200 (issue 23)
TARGET_LAUNCH_RATIO = 20  # smoke: at least this many times fewer ops + launches per layer
LAUNCH = "triton::gptq_block"  # kernels/gptq_block.py's profiler event around each launch


def random_layer(config, device: str, seed: int = 0):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen2DecoderLayer(config.to_qwen2(), 0).eval(), Qwen2RotaryEmbedding(config.to_qwen2())


def synthetic_inputs(config, tokens: int, seq_len: int) -> list[torch.Tensor]:
    """[1, seq_len, h] fp32 on the host (where `quantize` embeds), as many as make `tokens`."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(1, seq_len, config.hidden_size, generator=gen) for _ in range(max(1, tokens // seq_len))]


def read_seconds(layer, device: str) -> float:
    """Read the layer back as load_layer does (bf16 safetensors -> fp32 -> device), from disk."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layer.safetensors"
        save_file({k: v.to(torch.bfloat16).cpu().contiguous() for k, v in layer.state_dict().items()}, path)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache: a read from disk
        os.close(fd)
        start = time.perf_counter()
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k).to(torch.float32).to(device) for k in f.keys()}
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        del tensors
        return time.perf_counter() - start


def after(layer, inputs, rope, cfg: QuantConfig, clock: Clock) -> dict:
    """The pipeline's per-layer work as `quantize` runs it now on a GPU (the block kernel: on a CPU in
    Triton's interpreter, where `quantize` itself keeps the torch loop)."""
    batch_tokens = BATCH_TOKENS.get(layer.input_layernorm.weight.device.type)
    inputs = keep_on_device(inputs, layer)
    clock.lap("activations_to_device")
    quantized, _ = quantize_layer(layer, inputs, rope, cfg, batch_tokens=batch_tokens, kernel=True, clock=clock)
    run_layer(layer, inputs, rope, batch_tokens, in_place=True)
    clock.lap("next_inputs")
    return quantized


def before(layer, inputs, rope, cfg: QuantConfig, clock: Clock) -> dict:
    """The per-layer work before issue 23: whole passes with a hook, the column loop in torch ops."""
    quantized = {}
    for group in LAYER_GROUPS:
        first = layer.get_submodule(group[0])
        h_sum, rows = hessian_init(first.in_features, device=first.weight.device), [0]

        def collect(_module, args, h_sum=h_sum, rows=rows):
            rows[0] += hessian_add(h_sum, args[0])

        handle = first.register_forward_pre_hook(collect)
        run_layer(layer, inputs, rope)  # the whole layer, one sequence at a time
        handle.remove()
        clock.lap("hessian_passes")
        for name in group:
            lin = layer.get_submodule(name)
            w = lin.weight.data
            q = quantized[name] = gptq(w, h_sum, rows[0], cfg, kernel=False, clock=clock)
            w_hat = q.dequantize()
            output_error(w, w_hat, h_sum, rows[0]), output_error(w, rtn(w, cfg).dequantize(), h_sum, rows[0])
            lin.weight.data = w_hat
            clock.lap("reports")
    run_layer(layer, inputs, rope)
    clock.lap("next_inputs")
    return quantized


def count_launches(fn) -> dict:
    """Torch ops (outermost aten ops: what Python dispatches) and Triton launches while fn() runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    ops = launches = 0
    for e in prof.events():
        if e.name == LAUNCH:
            launches += 1
            continue
        up = e.cpu_parent
        while up is not None and not (up.name.startswith("aten::") or up.name == LAUNCH):
            up = up.cpu_parent
        ops += e.name.startswith("aten::") and up is None
    return {"torch_ops": ops, "triton_launches": launches, "total": ops + launches}


def flops(config, lengths: list[int], cfg: QuantConfig, passes: str = "after") -> dict:
    """FLOPs per phase (multiply-add = 2; causal attention half of T^2; Cholesky-type steps ~n^3/3).
    passes "after": each Hessian pass stops at its group's input; "before": four whole passes."""
    h, m, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    qkv = sum(2 * t * h * (h + 2 * kv) + 2 * t * t * h for t in lengths)  # projections + attention
    o, gate_up, down = (sum(lengths) * c for c in (2 * h * h, 4 * h * m, 2 * m * h))
    whole = qkv + o + gate_up + down
    upto = [0, qkv, qkv + o, qkv + o + gate_up] if passes == "after" else [whole] * 4  # to each group's input
    widths = [h, h, h, m]
    shapes = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (m, h), "up": (m, h), "down": (h, m)}
    b = cfg.block_size
    deferred = sum(2 * out * b * max(0, n - i2) for out, n in shapes.values() for i2 in range(b, n + 1, b))
    return {"hessian_passes": sum(upto) + sum(2 * sum(lengths) * n * n for n in widths),
            # "after" factors H once per group (its linears are one problem), "before" once per linear
            "factor": sum(5 * n ** 3 // 3 for n in (widths if passes == "after" else [n for _, n in shapes.values()])),
            "column_loop": sum(2 * out * n * b for out, n in shapes.values()) // 2,
            "deferred_gemm": deferred, "next_inputs": whole}


def run(config, device: str, tokens: int, seq_len: int, path: str, count: bool, io: bool = True) -> tuple[dict, dict]:
    """One layer through `before` or `after` on `device`: (seconds by phase, launches, FLOPs, memory;
    the quantized weights by linear)."""
    cfg = QuantConfig(bits=4)
    layer, rope = random_layer(config, device)
    inputs = synthetic_inputs(config, tokens, seq_len)
    cuda = device.startswith("cuda")
    result = {"path": path, "calibration_tokens": sum(x.shape[1] for x in inputs),
              "io": read_seconds(layer, device) if io else None}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, fn = {}, before if path == "before" else after
    clock = Clock(times, device)
    quantized = {}
    with torch.no_grad():
        go = lambda: quantized.update(fn(layer, inputs, rope, cfg, clock))  # noqa: E731
        result["launches"] = count_launches(go) if count else None
        if not count:
            go()
    result["seconds"] = {k: round(v, 3) for k, v in times.items()}
    result["seconds_per_layer"] = round(sum(times.values()), 3)  # reading overlaps these (LayerReader)
    result["flops"] = flops(config, [x.shape[1] for x in inputs], cfg, path)
    if cuda:
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result, quantized


def summary(r: dict) -> str:
    launches = f", {r['launches']['total']:,} ops + launches" if r["launches"] else ""
    phases = ", ".join(f"{k} {v:.2f}" for k, v in r["seconds"].items())
    memory = f", peak GPU {r['peak_gpu_gib']} GiB" if "peak_gpu_gib" in r else ""
    return (f"{r['path']:>6} {r['calibration_tokens']:>7} tokens: {r['seconds_per_layer']:.2f} s/layer ({phases}; "
            f"read {r['io'] or 0:.2f}){launches}{memory}")


def smoke(config=SMOKE, tokens: int = 512, seq_len: int = 128, io: bool = True) -> dict:
    """Before vs after on the CPU, both profiled: launches, seconds, and the same levels out of both."""
    (old, q_old), (new, q_new) = (run(config, "cpu", tokens, seq_len, path, True, io) for path in ("before", "after"))
    runs = [old, new]
    same = q_old.keys() == q_new.keys() and all(q_old[k].q.equal(q_new[k].q) and q_old[k].scales.equal(q_new[k].scales)
                                                for k in q_old)
    ratio = runs[0]["launches"]["total"] / runs[1]["launches"]["total"]
    return {"runs": runs, "launch_ratio": round(ratio, 1), "same_levels": same,
            "pass": ratio >= TARGET_LAUNCH_RATIO and same}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a reduced-width layer on the CPU, before vs after")
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 65536, TARGET_TOKENS])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--out", default=None, help="JSON result (default: bench/results/quantize_layer_cost[_smoke].json)")
    args = ap.parse_args()
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":  # Triton reads it when first imported
            ap.error("--smoke runs the kernel in Triton's interpreter: TRITON_INTERPRET=1 python ... --smoke")
        start = time.time()
        result = meta | {"config": dataclasses.asdict(SMOKE)} | smoke()
        for r in result["runs"]:
            print(summary(r))
        print(f"{'PASS' if result['pass'] else 'FAIL'}: {result['launch_ratio']}x fewer ops + launches per layer "
              f"(target >= {TARGET_LAUNCH_RATIO}x), levels {'identical' if result['same_levels'] else 'DIFFER'}; "
              f"{time.time() - start:.0f} s")
    else:
        if not torch.cuda.is_available():
            ap.error("the full-size layer needs a GPU (--smoke runs on a CPU)")
        runs = [run(WORLDPM_72B, "cuda", t, args.seq_len, "after", count=t == min(args.tokens))[0] for t in args.tokens]
        result = meta | {"device": torch.cuda.get_device_name(), "runs": runs}
        for r in runs:
            print(summary(r))
        target = [r for r in runs if r["calibration_tokens"] == TARGET_TOKENS]
        ok = bool(target) and target[0]["seconds_per_layer"] <= TARGET_SECONDS and \
            target[0]["peak_gpu_gib"] <= TARGET_GPU_GIB
        result["pass"] = ok
        print(f"{'PASS' if ok else 'FAIL'}: at {TARGET_TOKENS} tokens <= {TARGET_SECONDS} s per layer and "
              f"<= {TARGET_GPU_GIB} GiB peak GPU memory" + ("" if target else " (not run)"))
    out = Path(args.out or f"bench/results/quantize_layer_cost{'_smoke' if args.smoke else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    raise SystemExit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
