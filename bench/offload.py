"""Streamed layers on a GPU (offload.py), one command for a lent GPU (about 3-4 minutes on an H200):

    python bench/offload.py [--out bench/results/offload.json]
    python bench/offload.py --smoke      # tiny shapes on the CPU: checks the script runs

1. Host-to-device GB/s of a 1 GiB copy: from one registered (pinned) allocation, as the executor
   pins, and from pageable memory.
2. The 80-layer random WorldPM-72B-shaped 4-bit model (random packed tensors, Triton backend), all
   layers in one host allocation:
   a. resident: every layer on the GPU, no cap;
   b. streamed under a 24 GiB cap (torch.cuda.set_per_process_memory_fraction) with the auto plan
      (offload_plan.stream_plan with the bandwidth measured in 1 and the measured bf16 matmul rate),
      re-planned for each pass size;
   c. streamed with only 2 resident layers (78 through the ring);
   each at 8k, 32k and 64k tokens per pass (conversations of 2,048 tokens packed into one pass): tokens/s,
   the ratio to resident, peak reserved memory, and the scores against the resident model's.
Targets (PASS/FAIL): streamed with the auto plan >= 0.9x resident at the plan's own budget; peak reserved
memory within the cap in b and c. A score that differs from the resident model's is a correctness failure
(exit 1). Results go to --out as JSON.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from gpu_check import FAILURES, SMOKE, finish, random_head, random_like, target  # bench/ is this folder

from worldpm_lite.checkpoint import GPTQSpec
from worldpm_lite.model import meta_model
from worldpm_lite.offload import HostLayers, LayerStream, assign, views
from worldpm_lite.offload_plan import MLP_CHUNK, RING, host_memory_available, stream_plan
from worldpm_lite.packing import Group, pack_batches, run_batches
from worldpm_lite.plan import GIB, WORLDPM_72B, activation_reserve, placement_units
from worldpm_lite.qlinear import share_scratch

CAP = 24 * GIB


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def h2d_bandwidth(device) -> dict:
    """GB/s of a 1 GiB host-to-device copy, best of 5: pinned (registered as the executor does) and pageable."""
    from worldpm_lite.offload import CudaHost, pin

    if device.type != "cuda":
        return {"pinned_GB_per_s": 0.0, "pageable_GB_per_s": 0.0}
    dst = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    out = {}
    pinned = torch.ones(1 << 30, dtype=torch.uint8)
    if pin(pinned, pinned.numel(), CudaHost(), []) != 1:
        raise RuntimeError("h2d_bandwidth: cudaHostRegister of 1 GiB failed (see the warning above)")
    for name, src in (("pinned", pinned), ("pageable", torch.ones(1 << 30, dtype=torch.uint8))):
        best = float("inf")
        for _ in range(5):
            sync(device)
            start = time.perf_counter()
            dst.copy_(src, non_blocking=name == "pinned")
            sync(device)
            best = min(best, time.perf_counter() - start)
        out[f"{name}_GB_per_s"] = src.numel() / best / 1e9
    print(f"1. host-to-device: pinned {out['pinned_GB_per_s']:.1f} GB/s, pageable {out['pageable_GB_per_s']:.1f} GB/s")
    return out


def matmul_tflops(device) -> float:
    if device.type != "cuda":
        return 1.0
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    a @ a
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    sync(device)
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def random_host_model(config, device):
    """A random 4-bit model of `config` whose every layer lies in one host allocation (pinned for a GPU):
    (the meta model, the HostLayers, the embedding table on the host, the head on `device`)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meta = meta_model(config, GPTQSpec(4, 128), dtype)
    host = HostLayers(meta.model.layers[0], config.num_hidden_layers, pinned=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(3)
    for i in range(config.num_hidden_layers):  # made on the device (fast), kept on the host
        layer = torch.empty(host.stride, dtype=torch.uint8, device=device)
        for key, t in views(layer, host.layout).items():
            t.copy_(random_like(f"model.layers.{i}.{key}", t, device, gen))
        host.layer(i).copy_(layer)
    embed = (torch.randn(config.vocab_size, config.hidden_size, device=device, generator=gen, dtype=dtype)
             * 0.02).cpu()
    head = random_head(config.hidden_size, device, torch.Generator().manual_seed(4))
    return meta, host, embed, [t.to(dtype) if isinstance(t, torch.Tensor) else t for t in head]


def host_syncs(model, seqs: list[list[int]], budget: int, device) -> tuple[int, int]:
    """(host syncs, batches) of one pass, counted by torch.cuda's sync debug mode; reading each batch's
    scores is one. (0, batches) on a CPU."""
    import warnings

    groups = [Group(None, [s]) for s in seqs]
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            batches = 0
            for _, out in run_batches(model, pack_batches(groups, budget)):
                out.tolist()  # what the Scorer does with each batch
                batches += 1
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught), batches


class Subset:
    """The streamed layers' slices of a host allocation holding every layer (HostLayers' interface)."""

    def __init__(self, host: HostLayers, layers: tuple[int, ...]):
        self.host, self.layers, self.layout, self.stride, self.data = host, layers, host.layout, host.stride, host.data
        self.before_release, self.count = host.before_release, len(layers)
        self.pinned = len(layers) if host.pinned == host.count else 0  # the bench wants all or nothing

    def layer(self, j: int) -> torch.Tensor:
        return self.host.layer(self.layers[j])

    @property
    def nbytes(self) -> int:
        return len(self.layers) * self.stride


def build(config, host: HostLayers, embed: torch.Tensor, head: list, resident: list[int], streamed: tuple,
          device):
    """The model with `resident` layers copied to the device and `streamed` ones through a ring."""
    backend = "triton" if device.type == "cuda" else "torch"
    model = meta_model(config, GPTQSpec(4, 128), torch.bfloat16 if device.type == "cuda" else torch.float32,
                       backend)
    template = model.model.layers[0]
    for i in resident:
        buf = host.layer(i).to(device)  # one buffer per resident layer, its tensors views of it
        assign(model.model.layers[i], views(buf, host.layout))
    model.model.embed_tokens.weight = torch.nn.Parameter(embed, requires_grad=False)  # on the host
    norm, _, w0, b0, w2, b2 = head
    model.model.norm.weight = torch.nn.Parameter(norm, requires_grad=False)
    for mod, w, b in ((model.score[0], w0, b0), (model.score[2], w2, b2)):
        mod.weight, mod.bias = (torch.nn.Parameter(t, requires_grad=False) for t in (w, b))
    model.model.rotary_emb.to("cpu")
    if streamed:
        model.streamer = LayerStream(Subset(host, streamed), template, streamed, RING, device)
    model.tail_backend = backend
    model.mlp_chunk = MLP_CHUNK if device.type == "cuda" else 64
    share_scratch(model)
    return model.eval()


def timed_pass(model, seqs: list[list[int]], budget: int, device) -> tuple[float, list[float]]:
    groups = [Group(None, [s]) for s in seqs]
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        scores = [v for _, out in run_batches(model, pack_batches(groups, budget)) for v in out.tolist()]
    return time.perf_counter() - start, scores


def run(model, name: str, budgets: list[int], seq_len: int, vocab: int, device, reference: dict | None,
        plan_budget: int | None = None) -> dict:
    gen = torch.Generator().manual_seed(5)
    rows = {}
    timed_pass(model, [torch.randint(0, vocab, (seq_len,), generator=gen).tolist()], seq_len, device)  # warm-up
    for t in budgets:
        seqs = [torch.randint(0, vocab, (seq_len,), generator=torch.Generator().manual_seed(t + k)).tolist()
                for k in range(t // seq_len)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec, scores = timed_pass(model, seqs, t, device)
        row = {"tokens": t, "seconds": sec, "tokens_per_s": t / sec, "scores": scores}
        if device.type == "cuda":
            row["peak_reserved_GiB"] = torch.cuda.max_memory_reserved() / GIB
        if reference is not None:
            ref = reference[t]
            row["ratio_to_resident"] = row["tokens_per_s"] / ref["tokens_per_s"]
            row["max_score_difference"] = max(abs(a - b) for a, b in zip(scores, ref["scores"]))
            if not row["max_score_difference"] <= 1e-3 * max(1.0, max(abs(v) for v in ref["scores"])):
                FAILURES.append(f"{name} at {t} tokens: scores differ from resident by {row['max_score_difference']}")
        if not all(v == v and abs(v) != float("inf") for v in scores):
            FAILURES.append(f"{name} at {t} tokens: non-finite scores")
        rows[t] = row
        extra = (f", {row['ratio_to_resident']:.3f}x resident, max |score diff| {row['max_score_difference']:.1e}"
                 if reference else "") + (f", peak reserved {row['peak_reserved_GiB']:.2f} GiB"
                                          if "peak_reserved_GiB" in row else "")
        print(f"  {name} {t:>6} tokens/pass{' (the plan budget)' if t == plan_budget else ''}: "
              f"{row['tokens_per_s']:,.0f} tokens/s{extra}")
    return rows


def streamed_vs_resident(device, smoke: bool) -> dict:
    """Parts 1 and 2 of the module docstring: the H2D bandwidths, resident vs streamed (auto plan, and 2
    resident layers) under the 24 GiB cap, with each target recorded (gpu_check.target / FAILURES)."""
    config = SMOKE if smoke else WORLDPM_72B
    budgets, seq_len = ([64, 128, 256], 32) if smoke else ([8192, 32768, 65536], 2048)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    result = {"device": name, "torch": torch.__version__, "h2d": h2d_bandwidth(device)}
    tflops = matmul_tflops(device)
    result["bf16_matmul_tflops"] = tflops
    print(f"2. {config.num_hidden_layers}-layer WorldPM-72B-shaped 4-bit model, every layer in one host allocation")
    meta, host, embed, head = random_host_model(config, device)
    print(f"  host allocation {host.nbytes / GIB:.2f} GiB ({host.stride / 2**20:.1f} MiB per layer), "
          f"{'pinned' if host.data.is_pinned() else 'not pinned'}")

    cap = CAP
    if smoke:  # room for the ring and 2 resident layers beside 128 tokens' activations: some layers stream
        cap = (activation_reserve(config, 128, True, 2, MLP_CHUNK) + placement_units(meta)[0][-1][1]
               + (RING + 2) * host.stride)
    every = list(range(config.num_hidden_layers))
    model = build(config, host, embed, head, every, (), device)
    resident = run(model, "resident", budgets, seq_len, config.vocab_size, device, None)
    result["resident"] = resident
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP / torch.cuda.get_device_properties(0).total_memory))
    try:
        h2d = result["h2d"]["pinned_GB_per_s"] or 24.0
        auto = stream_plan(meta, cap, host_memory_available(), token_budget=budgets[1] if smoke else None,
                           h2d_gbps=h2d, tflops=tflops)
        print(f"  the auto plan under {cap / GIB:.2f} GiB ({h2d:.1f} GB/s, {tflops:.0f} TFLOP/s measured):\n    "
              + auto.describe().replace("\n", "\n    "))
        result["auto_plan"] = {"token_budget": auto.token_budget, "resident": len(auto.resident),
                               "streamed": len(auto.streamed), "modelled_tokens_per_s": auto.tokens_per_s}
        result["streamed_auto"] = {}
        for t in budgets:  # re-planned per pass size: a larger pass leaves room for fewer resident layers
            p = stream_plan(meta, cap, host_memory_available(), token_budget=t, h2d_gbps=h2d, tflops=tflops)
            print(f"  plan for {t} tokens: {len(p.resident)} resident, {len(p.streamed)} streamed")
            model = build(config, host, embed, head, list(p.resident), p.streamed, device)
            result["streamed_auto"] |= run(model, "streamed (auto plan)", [t], seq_len, config.vocab_size, device,
                                           resident, auto.token_budget)
            if t == auto.token_budget:
                seqs = [torch.randint(0, config.vocab_size, (seq_len,)).tolist() for _ in range(t // seq_len)] * 3
                syncs, batches = host_syncs(model, seqs, t, device)
                result["host_syncs_per_batch"] = syncs / batches
                print(f"  host syncs: {syncs} in {batches} streamed batches")
                target("streamed: host syncs per batch (reading the scores is one)", syncs / batches, 1.0, "",
                       higher_is_better=False)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        two = [0, config.num_hidden_layers // 2]
        model = build(config, host, embed, head, two, tuple(i for i in every if i not in two), device)
        result["streamed_2_resident"] = run(model, "streamed (2 resident)", budgets, seq_len, config.vocab_size,
                                            device, resident)
        del model
    except torch.OutOfMemoryError as e:
        FAILURES.append(f"out of memory under the {CAP / GIB:.0f} GiB cap: {str(e).splitlines()[0]}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0)
    plan_row = result.get("streamed_auto", {}).get(result.get("auto_plan", {}).get("token_budget"))
    if plan_row:
        target("streamed (auto plan) vs resident at the plan's budget", plan_row["ratio_to_resident"], 0.9, "x")
    if device.type == "cuda":
        for key in ("streamed_auto", "streamed_2_resident"):
            peak = max((r["peak_reserved_GiB"] for r in result.get(key, {}).values()), default=0.0)
            target(f"{key}: peak reserved within the cap", peak, CAP / GIB, "GiB", higher_is_better=False)
    for rows in (result.get(k, {}) for k in ("resident", "streamed_auto", "streamed_2_resident")):
        for row in rows.values():
            row.pop("scores", None)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script runs)")
    ap.add_argument("--out", help="default: bench/results/offload.json (offload-smoke.json with --smoke)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        sys.exit("offload bench: no CUDA device; use --smoke to check the script on a CPU")
    start = time.time()
    result = streamed_vs_resident(device, args.smoke)
    finish(result, result["device"], args.out or f"bench/results/offload{'-smoke' * args.smoke}.json", start)


if __name__ == "__main__":
    main()
