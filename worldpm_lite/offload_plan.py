"""The streamed plan: one GPU too small for every decoder layer keeps as many resident as fit and
streams the rest from pinned host memory (offload.py runs it). The arithmetic that picks the split
and the pass size is a layer-by-layer simulation of the executor's queues, with the card's
host-to-device bandwidth and compute rate as inputs (defaults: an RTX 4090's, stated as assumptions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint import GPTQSpec, WorldPMConfig
from .errors import InputError
from .model import meta_model
from .offload import host_bytes, layer_layout, spread
from .options import BNB, Offload
from .plan import GIB, activation_reserve, check_visible, gpu_capacity, place, placement_units, setups_that_fit

# Streamed execution (one GPU too small for every layer). Assumed card: an RTX 4090 (inputs of `plan`).
H2D_GBPS = 24.0  # pinned host-to-device copies over PCIe 4.0 x16, others' measurements on 4090s
TFLOPS = 165.0  # the 4090's dense bf16 tensor-core peak
RING = 2  # GPU buffers streamed layers pass through
MLP_CHUNK = 4096  # tokens per MLP call in a streamed pass: a 64k-token pass fits a 24 GB card
STREAM_BUDGETS = (8192, 16384, 32768, 65536)  # tokens per pass the plan picks from, smallest first
HIDDEN = 0.97  # a budget "hides the copies" when the modelled speed is this share of compute-bound
HOST_SLACK = 1 * GIB  # host memory kept for the process itself beside the pinned layers


@dataclass
class StreamPlan:
    """One GPU holding `resident` layers (plus the head, the ring and one pass's activations) while
    `streamed` layers come from pinned host memory; the embedding table stays on the host."""

    capacity: int
    host_memory: int
    num_layers: int
    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    layer_bytes: int  # one layer's slice of the host allocation (and one ring buffer)
    head_bytes: int  # final norm + reward head, resident
    embed_bytes: int  # embedding table, on the host
    reserve: int
    token_budget: int
    ring: int
    h2d_gbps: float
    tflops: float
    flops_per_token_layer: float
    tokens_per_s: float
    chosen: str = "hides"  # why this pass size: "given", "hides" (the copies) or "fastest" (none hides them)

    @property
    def pinned(self) -> int:
        """The streamed layers' host allocation (offload.HostLayers), pinned where it lies: no second copy,
        and a layer CUDA cannot pin copies from it pageable, needing nothing more."""
        return host_bytes(len(self.streamed), self.layer_bytes) if self.streamed else 0

    @property
    def host_needed(self) -> int:
        return self.pinned + self.embed_bytes + HOST_SLACK

    @property
    def fits(self) -> bool:
        return self.host_needed <= self.host_memory and self.gpu_used <= self.capacity

    def refusal(self, what: str) -> str:
        """Why this plan cannot run (empty when it can)."""
        if self.gpu_used > self.capacity:
            return (f"{what}: a GPU of {self.capacity / GIB:.2f} GiB cannot even stream it: the ring ({self.ring} x "
                    f"{self.layer_bytes / GIB:.2f} GiB), the head and one pass's activations need "
                    f"{self.gpu_used / GIB:.2f} GiB")
        if self.host_needed > self.host_memory:
            return (f"{what}: streaming {len(self.streamed)} layers needs {self.host_needed / GIB:.2f} GiB of host "
                    f"memory ({self.pinned / GIB:.2f} GiB pinned layers, {self.embed_bytes / GIB:.2f} GiB embeddings, "
                    f"{HOST_SLACK / GIB:.0f} GiB slack; layers that cannot be pinned stream from where they lie, "
                    f"needing no more); {self.host_memory / GIB:.2f} GiB available")
        return ""

    def describe(self) -> str:
        n, t = self.num_layers, self.token_budget
        compute = t * self.flops_per_token_layer / (self.tflops * 1e12)
        copy = self.layer_bytes / (self.h2d_gbps * 1e9)
        bound = t / (n * compute)
        return "\n".join([
            f"resident: {len(self.resident)} of {n} layers ({len(self.resident) * self.layer_bytes / GIB:.2f} GiB) + "
            f"final norm and head ({self.head_bytes / GIB:.2f} GiB); ring {self.ring} x "
            f"{self.layer_bytes / GIB:.2f} GiB; activation reserve {self.reserve / GIB:.2f} GiB for {t} tokens per "
            f"pass (MLP in chunks of {MLP_CHUNK}); GPU total {self.gpu_used / GIB:.2f} of "
            f"{self.capacity / GIB:.1f} GiB",
            f"streamed: {len(self.streamed)} layers ({_spans(self.streamed)}) from pinned host memory: "
            f"{self.pinned / GIB:.2f} GiB pinned, plus the embedding table ({self.embed_bytes / GIB:.2f} GiB) in "
            f"host memory; {self.host_needed / GIB:.2f} GiB of host memory needed with {HOST_SLACK / GIB:.0f} GiB "
            f"slack, {self.host_memory / GIB:.1f} GiB available (a layer that cannot be pinned copies from pageable "
            "memory, slower but needing no more)",
            f"tokens per pass: {t} (" + {
                "given": "as given",
                "hides": f"the smallest of {', '.join(map(str, STREAM_BUDGETS))} whose modelled speed is >= "
                         f"{HIDDEN:.0%} of compute-bound; --token-budget / plan --batch-tokens overrides",
                "fastest": f"none of {', '.join(map(str, STREAM_BUDGETS))} hides the copies: the fastest; "
                           "--token-budget / plan --batch-tokens overrides"}[self.chosen] + ")",
            f"expected: {self.tokens_per_s:,.0f} tokens/s (modelled; compute-bound {bound:,.0f}): one layer computes "
            f"{t} tokens x {self.flops_per_token_layer / 1e9:.2f} GFLOP (linears) at {self.tflops:g} TFLOP/s = "
            f"{compute * 1e3:.1f} ms; one streamed layer copies {self.layer_bytes / 1e9:.2f} GB at "
            f"{self.h2d_gbps:g} GB/s = {copy * 1e3:.1f} ms on a side stream, {self.ring} buffers ahead; a pass "
            f"simulated layer by layer takes {t / self.tokens_per_s * 1e3:,.0f} ms",
            f"assumed: {self.h2d_gbps:g} GB/s host-to-device and {self.tflops:g} TFLOP/s (an RTX 4090's; "
            "--h2d-gbps and --tflops change them); attention's own FLOPs and kernel efficiency are not modelled"
            if (self.h2d_gbps, self.tflops) == (H2D_GBPS, TFLOPS) else
            f"assumed: {self.h2d_gbps:g} GB/s host-to-device and {self.tflops:g} TFLOP/s (given); attention's own "
            "FLOPs and kernel efficiency are not modelled"])

    @property
    def gpu_used(self) -> int:
        return (len(self.resident) + self.ring) * self.layer_bytes + self.head_bytes + self.reserve


def _spans(layers: tuple[int, ...]) -> str:
    if not layers:
        return "none"
    return f"{layers[0]}, {layers[1]}, ..., {layers[-1]}" if len(layers) > 3 else ", ".join(map(str, layers))


def streamed_pass_seconds(num_layers: int, streamed: tuple[int, ...], ring: int, compute: float,
                          copy: float, passes: int = 4) -> float:
    """Seconds per pass in steady state, simulated as the executor queues work (offload.LayerStream):
    the copy of streamed layer n + K starts once layer n has computed and the copy stream is free;
    a streamed layer computes once its copy has landed and the layer before it is done."""
    if not streamed:
        return num_layers * compute
    m, k = len(streamed), min(ring, len(streamed))
    is_streamed = set(streamed)
    copy_end = {n: (n + 1) * copy for n in range(k)}  # the first K copies start at once, back to back
    copy_free, now, n, ends = k * copy, 0.0, 0, []
    for _ in range(passes):
        for i in range(num_layers):
            if i in is_streamed:
                now = max(now, copy_end.pop(n)) + compute
                if m > k:  # this slot refills with the layer K ahead
                    copy_free = max(copy_free, now) + copy
                    copy_end[n + k] = copy_free
                else:  # every streamed layer stays in its own slot: later passes copy nothing
                    copy_end[n + k] = now
                n += 1
            else:
                now += compute
        ends.append(now)
    return ends[-1] - ends[-2]


def linear_flops_per_token(config: WorldPMConfig) -> float:
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim
    return 2.0 * (2 * h * h + 2 * h * kv + 3 * h * i)


def stream_plan(model, capacity: int, host_memory: int, token_budget: int | None = None, ring: int = RING,
                h2d_gbps: float = H2D_GBPS, tflops: float = TFLOPS, dtype_bytes: int = 2) -> StreamPlan:
    """As many whole layers resident on one GPU of `capacity` bytes as fit beside the head, `ring`
    buffers and one pass's activations, the rest spread evenly among them and streamed. The pass size
    is `token_budget`, or the smallest of STREAM_BUDGETS that hides the copies (the fastest if none
    does), never one whose activations leave no room for the ring."""
    config = model.config
    units, _ = placement_units(model)
    layer_bytes = layer_layout(model.model.layers[0])[1]
    embed_bytes, head_bytes = units[0][1], units[-1][1]
    quantized = any(n.endswith("qweight") for n, _ in model.model.layers[0].named_buffers())
    flops = linear_flops_per_token(config)
    candidates = []
    for t in (token_budget,) if token_budget else STREAM_BUDGETS:
        reserve = activation_reserve(config, t, quantized, dtype_bytes, MLP_CHUNK)
        room = capacity - reserve - head_bytes - ring * layer_bytes
        if room < 0 and candidates:
            break
        resident_count = max(0, min(config.num_hidden_layers, room // layer_bytes))
        streamed = spread(config.num_hidden_layers, config.num_hidden_layers - resident_count)
        compute, copy = t * flops / (tflops * 1e12), layer_bytes / (h2d_gbps * 1e9)
        speed = t / streamed_pass_seconds(config.num_hidden_layers, streamed, ring, compute, copy)
        resident = tuple(i for i in range(config.num_hidden_layers) if i not in set(streamed))
        candidates.append((speed, StreamPlan(capacity, host_memory, config.num_hidden_layers, resident,
                                             streamed, layer_bytes, head_bytes, embed_bytes, reserve, t,
                                             ring, h2d_gbps, tflops, flops, speed)))
        if room >= 0 and speed >= HIDDEN * t / (config.num_hidden_layers * compute) and not token_budget:
            return candidates[-1][1]
    best = max(candidates, key=lambda c: (c[1].gpu_used <= capacity, c[0]))[1]
    best.chosen = "given" if token_budget else "fastest"
    return best


def host_memory_available() -> int:
    """Bytes of host memory available now (MemAvailable from /proc/meminfo; total RAM elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class Placement:
    """Where a checkpoint's parts go: the device map, the streamed layers (None: all resident), the
    token budget the plan chose (None: the Scorer's default) and one line saying so."""

    device_map: dict | str
    offload: Offload | None = None
    token_budget: int | None = None
    summary: str = ""


def auto_placement(ckpt, dtype: torch.dtype, capacity: dict[int, int], token_budget: int | None,
                   quant: str | None = None, offload: bool | None = None, host_memory: int | None = None,
                   ring: int = RING) -> Placement:
    """Every layer resident on as few of the GPUs in `capacity` as hold them (unless offload is True);
    otherwise, unless offload is False, as many as fit resident on the first GPU and the rest
    streamed from host memory. ValueError, before any weight is read, when neither can run."""
    spec = GPTQSpec(BNB[quant], 64) if quant else ckpt.quant
    model = meta_model(ckpt.config, spec, dtype)
    budget = token_budget or 8192
    if offload is not True:
        reserve = activation_reserve(ckpt.config, budget, spec is not None, dtype.itemsize)
        result = place(model, capacity, reserve)
        if result.fits:
            used = sorted({d for d in result.device_map.values()})
            return Placement(dict(result.device_map), summary=f"all {ckpt.config.num_hidden_layers} layers resident "
                             f"on GPU {', '.join(map(str, used))}")
        if offload is False or quant is not None:
            fits = setups_that_fit(model, reserve)
            why = ("bitsandbytes models do not stream from host memory" if quant else "streaming is off")
            raise InputError(f"{ckpt.path}: does not fit these GPUs with {budget} tokens per batch\n"
                             f"{result.table()}\nsetups that would fit: {', '.join(fits) or 'none of the common ones'}"
                             f"; or use a smaller token_budget, or the 4-bit checkpoint ({why})")
    if quant is not None:
        raise InputError(f"offload: streams GPTQ and bf16 checkpoints, not {quant!r} (bitsandbytes)")
    gpu = next(iter(capacity))
    host = host_memory if host_memory is not None else host_memory_available()
    sp = stream_plan(model, capacity[gpu], host, token_budget, ring, dtype_bytes=dtype.itemsize)
    if not sp.fits:
        raise InputError(sp.refusal(str(ckpt.path)))
    summary = (f"{len(sp.resident)} of {sp.num_layers} layers resident on GPU {gpu}, {len(sp.streamed)} streamed "
               f"from pinned host memory ({sp.pinned / GIB:.2f} GiB) through {ring} buffers; embeddings on the "
               f"host; {token_budget or sp.token_budget} tokens per pass")
    return Placement({"": gpu, "model.embed_tokens": "cpu"}, Offload(sp.streamed, ring) if sp.streamed else None,
                     token_budget or sp.token_budget, summary)


def place_checkpoint(ckpt, device: str, dtype: torch.dtype, max_memory: dict | None, token_budget: int | None,
                     quant: str | None, offload, host_memory: int | None) -> Placement:
    """Where Scorer.from_pretrained puts `ckpt`: device (from devices.check_device) and offload as it takes
    them (None / True / False / an Offload)."""
    if isinstance(offload, Offload):
        return Placement(device if device == "cpu" else
                         {"": 0 if device == "auto" else device, "model.embed_tokens": "cpu"}, offload)
    if device == "auto" or (offload is True and device != "cpu"):
        if max_memory is not None:
            check_visible(gpu_capacity(max_memory))
        if device == "auto":
            capacity = gpu_capacity(max_memory)
        else:  # one named GPU, streamed
            index = torch.device(device).index or 0
            capacity = ({index: gpu_capacity(max_memory)[index]} if max_memory else
                        {index: torch.cuda.mem_get_info(index)[0]})
        return auto_placement(ckpt, dtype, capacity, token_budget, quant, offload, host_memory)
    if max_memory is not None:
        raise InputError("max_memory: only used with device='auto' on a machine with GPUs")
    if offload is True:  # the CPU: every layer streams through the ring (host and compute tier both the CPU)
        return Placement("cpu", Offload(tuple(range(ckpt.config.num_hidden_layers))))
    return Placement(device)


def plan_text(model: str, capacity: dict[int, int], bits: int | None, batch_tokens: int | None,
              host_memory: int | None, h2d_gbps: float = H2D_GBPS, tflops: float = TFLOPS) -> tuple[str, bool]:
    """What `worldpm-lite plan` prints, and whether the model can run: resident on the GPUs, or else
    streamed on the first one."""
    from .plan import plan_report

    text, fits, meta = plan_report(model, capacity, bits, batch_tokens or 8192)
    if fits:
        return text, True
    gpu = next(iter(capacity))
    host = host_memory if host_memory is not None else host_memory_available()
    sp = stream_plan(meta, capacity[gpu], host, batch_tokens, h2d_gbps=h2d_gbps, tflops=tflops)
    where = "" if host_memory is not None else " (available on this machine now; --host-memory plans for another)"
    lines = [text, "", f"streamed on GPU {gpu} ({capacity[gpu] / GIB:.1f} GiB) with {host / GIB:.1f} GiB of host "
             f"memory{where}" + (f"; the other {len(capacity) - 1} GPU(s) stay unused" if len(capacity) > 1 else ""),
             sp.describe()]
    lines.append(f"runs streamed: {len(sp.resident)} resident + {len(sp.streamed)} streamed layers"
                 if sp.fits else f"does NOT run streamed either: {sp.refusal('this model')}")
    return "\n".join(lines), sp.fits
