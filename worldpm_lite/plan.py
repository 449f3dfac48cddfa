"""Where each part of a WorldPM goes on the GPUs, computed on the meta device (no weights read).

Whole decoder layers go in order onto as few GPUs as hold them under capacity minus an
activation reserve, balanced so the smallest headroom is as large as possible; this module sizes
the reserve, builds the meta model (GPTQ linears swapped in when quantized), places it and turns
the answer into a table and a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import GPTQSpec, WorldPMConfig
from .errors import UsageError
from .model import device_for, meta_model
from .options import gpu_sizes

WORLDPM_72B = WorldPMConfig(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                            intermediate_size=29568, vocab_size=152064, max_position_embeddings=32768,
                            rope_theta=1_000_000.0)
PRESETS = {"worldpm-72b": WORLDPM_72B}
GIB = 1 << 30
# CUDA context, compiled kernels and allocator slack per GPU (an H100 context alone is ~0.5 GiB)
RUNTIME_OVERHEAD = 1 * GIB
# setups offered when the asked one does not fit, smallest first
SETUPS = [(n, size) for size in (24, 48, 80) for n in (1, 2, 3, 4, 8)]
def activation_reserve(config: WorldPMConfig, batch_tokens: int, quantized: bool, dtype_bytes: int = 2,
                       mlp_chunk: int | None = None) -> int:
    """Bytes each GPU keeps free for one forward pass of `batch_tokens` padded tokens.

    Per layer the live tensors are at most the residual stream, the normed input, q, k, v, the
    attention output and o_proj's output (5 h + 2 kv per token) and the MLP's gate, up and their
    product (3 I per token, for at most `mlp_chunk` tokens at a time when the MLP runs in chunks).
    Attention is causal without a mask, so SDPA's flash / memory-efficient kernels need no T x T
    scores. A quantized model adds the dequantized scratch of its largest linear (the GEMM path), and
    every GPU the runtime overhead."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim
    mlp_tokens = batch_tokens if mlp_chunk is None else min(batch_tokens, mlp_chunk)
    scratch = h * i * dtype_bytes if quantized else 0
    return (batch_tokens * (5 * h + 2 * kv) + mlp_tokens * 3 * i) * dtype_bytes + scratch + RUNTIME_OVERHEAD


@dataclass
class DevicePlan:
    capacity: dict[int, int]  # GPU index -> bytes
    reserve: int  # bytes kept free on each GPU for activations
    device_map: dict[str, int | str]  # module name -> GPU index ("cpu"/"disk": did not fit)
    module_bytes: dict[str, int]
    num_layers: int

    @property
    def fits(self) -> bool:
        return all(isinstance(d, int) for d in self.device_map.values())

    def weights(self, gpu: int) -> int:
        return sum(self.module_bytes[m] for m, d in self.device_map.items() if d == gpu)

    def layers(self, gpu: int) -> list[int]:
        return [i for i in range(self.num_layers) if device_for(f"model.layers.{i}", self.device_map) == gpu]

    def unplaced(self) -> int:
        return sum(self.module_bytes[m] for m, d in self.device_map.items() if not isinstance(d, int))

    def table(self) -> str:
        rows = ["| GPU | capacity | layers | weights | activation reserve | headroom |",
                "| --- | --- | --- | --- | --- | --- |"]
        for gpu, cap in self.capacity.items():
            layers = self.layers(gpu)
            span = f"{min(layers)}-{max(layers)} ({len(layers)})" if layers else "none"
            extra = [m for m in ("embed_tokens", "norm") if device_for(f"model.{m}", self.device_map) == gpu]
            extra += ["score"] if device_for("score", self.device_map) == gpu else []
            if extra:
                span += " + " + ", ".join(extra)
            head = cap - self.weights(gpu) - self.reserve
            rows.append(f"| {gpu} | {cap / GIB:.1f} GiB | {span} | {self.weights(gpu) / GIB:.2f} GiB | "
                        f"{self.reserve / GIB:.2f} GiB | {head / GIB:.2f} GiB |")
        if not self.fits:
            rows.append(f"| does not fit | | | {self.unplaced() / GIB:.2f} GiB left over | | |")
        return "\n".join(rows)


def placement_units(model) -> tuple[list[tuple[list[str], int]], dict[str, int]]:
    """The model in forward order as the units that move together, each (module names, bytes) -
    the embeddings, each whole decoder layer, then the final norm with the head (the tail reads
    both) - and the bytes of each of those modules."""
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model)
    groups = [["model.embed_tokens", "model.rotary_emb"]]
    groups += [[f"model.layers.{i}"] for i in range(model.config.num_hidden_layers)]
    groups.append(["model.norm", "score"])
    return [(names, sum(sizes[n] for n in names)) for names in groups], {n: sizes[n] for g in groups for n in g}


def _fill(units, budgets: dict[int, int], headroom: int) -> tuple[dict[str, int | str], bool]:
    """Units in order onto GPUs in order, each GPU up to its budget minus `headroom`; what is left
    over goes to "cpu" (does not fit)."""
    device_map, gpus, k = {}, iter(budgets), 0
    gpu = next(gpus, None)
    used = 0
    while k < len(units):
        names, size = units[k]
        if gpu is not None and used + size <= budgets[gpu] - headroom:
            device_map.update(dict.fromkeys(names, gpu))
            used += size
            k += 1
        elif gpu is not None:
            gpu, used = next(gpus, None), 0
        else:
            device_map.update(dict.fromkeys(names, "cpu"))
            k += 1
    return device_map, all(isinstance(d, int) for d in device_map.values())


def place(model, capacity: dict[int, int], reserve: int) -> DevicePlan:
    """Whole decoder layers, in order, on as few GPUs (0, 1, ...) as hold the model under capacity
    minus `reserve` each, split so that the smallest headroom is as large as possible.

    accelerate's `infer_auto_device_map` fills each GPU to the brim before the next (72B 4-bit
    on 2 x 24 GiB: 0.79 vs 3.84 GiB headroom), and answers {"": 0} when all fits on one; here
    the same sizes (accelerate's `compute_module_sizes`) go through a search for the largest
    headroom every used GPU can keep (greedy fill per candidate headroom, binary search)."""
    units, sizes = placement_units(model)
    budgets = {gpu: max(0, cap - reserve) for gpu, cap in capacity.items()}
    gpus = list(budgets)
    for count in range(1, len(gpus) + 1):
        use = {g: budgets[g] for g in gpus[:count]}
        device_map, fits = _fill(units, use, 0)
        if fits:
            lo, hi = 0, max(use.values())  # fits at lo; search the largest headroom that still fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if _fill(units, use, mid)[1]:
                    lo = mid
                else:
                    hi = mid - 1
            device_map = _fill(units, use, lo)[0]
            break
    return DevicePlan(dict(capacity), reserve, device_map, sizes, model.config.num_hidden_layers)


def plan(config: WorldPMConfig, spec: GPTQSpec | None, capacity: list[int], batch_tokens: int,
         dtype: torch.dtype = torch.bfloat16) -> DevicePlan:
    return place(meta_model(config, spec, dtype), dict(enumerate(capacity)),
                 activation_reserve(config, batch_tokens, spec is not None, dtype.itemsize))


def setups_that_fit(model, reserve: int, limit: int = 3) -> list[str]:
    """Common GPU setups (n x 24/48/80 GiB) under which the model fits with `reserve` bytes kept free
    on each GPU, least total memory first."""
    total = sum(p.numel() * p.element_size() for p in [*model.parameters(), *model.buffers()])
    found = []
    for n, size in sorted(SETUPS, key=lambda s: (s[0] * s[1], s[0])):
        if n * (size * GIB - reserve) < total:  # cannot fit even if packed perfectly
            continue
        if place(model, dict.fromkeys(range(n), size * GIB), reserve).fits:
            found.append(f"{n}x{size}GiB")
        if len(found) == limit:
            break
    return found


def gpu_capacity(max_memory: dict | None) -> dict[int, int]:
    """GPU index -> bytes to plan with: `max_memory` ({0: "22GiB", ...}, read by options.gpu_sizes) or
    each GPU's free memory now."""
    if max_memory is None:
        return {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
    return gpu_sizes(max_memory)


def check_visible(capacity: dict[int, int]) -> None:
    """Every GPU index of a plan that will load weights must be one this process can see."""
    from .devices import visible_gpus

    n = visible_gpus()
    missing = sorted(g for g in capacity if g >= n)
    if missing:
        raise UsageError(f"max_memory: GPU {', '.join(map(str, missing))} is not visible here ({n} GPU(s) visible: "
                         f"indices 0 to {n - 1}); check CUDA_VISIBLE_DEVICES")


def plan_report(model: str, capacity: dict[int, int], bits: int | None, batch_tokens: int) -> tuple[str, bool, object]:
    """The resident plan as `worldpm-lite plan` prints it, whether it fits, and the meta model it placed.
    model: a directory or a preset name; bits: 4, 8, 16 (bf16) or None for the checkpoint's own (4 for
    a preset)."""
    from .checkpoint import CheckpointError, read_config

    if model.lower() in PRESETS:
        config, spec, name = PRESETS[model.lower()], None, model.lower()
    else:
        if not Path(model).is_dir():
            raise CheckpointError(f"{model}: not a directory (expected a model directory with config.json)")
        _, config, spec = read_config(Path(model))
        name = model
    bits = bits or (spec.bits if spec else 4 if model.lower() in PRESETS else 16)
    spec = None if bits == 16 else GPTQSpec(bits, spec.group_size if spec else 128)
    meta = meta_model(config, spec, torch.bfloat16)
    reserve = activation_reserve(config, batch_tokens, spec is not None)
    result = place(meta, capacity, reserve)
    what = f"GPTQ {bits}-bit, group {spec.group_size}" if spec else "bf16"
    lines = [f"{name}: {config.num_hidden_layers} layers, hidden {config.hidden_size}; {what}; weights "
             f"{sum(result.module_bytes.values()) / GIB:.2f} GiB; activation reserve {reserve / GIB:.2f} GiB per GPU "
             f"for {batch_tokens} tokens per batch\n", result.table() + "\n"]
    if result.fits:
        head = min(c - result.weights(g) - reserve for g, c in capacity.items())
        lines.append(f"fits: {len(capacity)} GPU(s), smallest headroom {head / GIB:.2f} GiB")
    else:
        fits = setups_that_fit(meta, reserve)
        lines.append(f"does NOT fit resident: {result.unplaced() / GIB:.2f} GiB of weights have no GPU. Setups that "
                     f"would fit {what}: {', '.join(fits) or 'none of 1-8 x 24/48/80 GiB'}"
                     + ("" if bits == 4 else "; or quantize to 4 bits (--bits 4)"))
    return "\n".join(lines), result.fits, meta

