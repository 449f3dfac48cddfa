"""Streaming GPTQ over a WorldPM checkpoint: one decoder layer in memory at a time.

For each layer: load only its tensors (mmap; the next layer's are read meanwhile), then for each
sequential group of linears (q/k/v -> o -> gate/up -> down) run the calibration activations
through the layer up to the group's input, collecting its Hessian, GPTQ the group and put the
quantized weights back, so each group sees the inputs the already-quantized groups before it
produce. One last pass with every weight quantized makes the next layer's inputs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from worldpm_lite.checkpoint import LAYER_GROUPS, Checkpoint, CheckpointError
from worldpm_lite.options import QuantConfig

from .gptq import Clock, QuantizedWeight, gptq_shared, hessian_add, hessian_init, rtn


@dataclass
class LinearReport:
    name: str
    gptq_error: float  # mean squared output error per element on the calibration inputs
    rtn_error: float  # the same for round-to-nearest on the same grid


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h_sum: torch.Tensor, rows: int) -> float:
    """Mean over calibration rows and outputs of (x.(w - w_hat))^2, from the sum 2 X^T X."""
    d = (w.float() - w_hat.float())
    return ((d @ h_sum) * d).sum().item() / (2 * w.shape[0] * max(rows, 1))


# Padded tokens per calibration batch, by device type. A CPU runs one sequence at a time: a sequence's
# bits then do not depend on its neighbours (CPU attention blocks its work by the padded length), and
# the CPU's output is byte for byte that of earlier versions. A GPU's GEMMs want more rows than one
# conversation has; 8192 tokens keep an MLP intermediate of WorldPM-72B at 1 GB in fp32.
BATCH_TOKENS = {"cuda": 8192}


class _Reached(Exception):
    """Raised by a forward pre-hook: the layer has computed the input that was asked for."""


def forward(layer, x: torch.Tensor, rope: Callable, until=None, compute_dtype: torch.dtype | None = None):
    """layer(x) for x [B, T, h] on the layer's device, causal; until: one of the layer's linears, whose
    input [B, T, in] is returned instead, the layer run only as far as that (q/k/v's input needs only the
    input norm, down's needs everything but down itself). The same modules and arithmetic either way.
    compute_dtype: autocast the layer's arithmetic to this dtype (None: as stored, fp32)."""
    pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    got = []

    def reached(_module, args):
        got.append(args[0])
        raise _Reached

    handle = None if until is None else until.register_forward_pre_hook(reached)
    try:
        with torch.autocast(x.device.type, dtype=compute_dtype, enabled=compute_dtype is not None):
            return layer(x, attention_mask=None, position_ids=pos, position_embeddings=rope(x, pos))
    except _Reached:
        return got[0]
    finally:
        if handle is not None:
            handle.remove()


def padded_batches(inputs: list[torch.Tensor], batch_tokens: int | None, dev):
    """(sequence indices, x [B, T, h] on `dev`, lengths) covering `inputs` (each [1, T_k, h]).
    batch_tokens None: each sequence alone, in order, unpadded (the arithmetic of a lone sequence).
    Else sequences sorted by length run together, zero-padded on the right to the longest, at most
    batch_tokens padded tokens a batch (one longer sequence alone): causal attention keeps the
    padding, which comes after every real token, out of every real token's result."""
    if batch_tokens is None:
        for k, x in enumerate(inputs):
            yield [k], x.to(dev), [x.shape[1]]
        return
    order = sorted(range(len(inputs)), key=lambda k: inputs[k].shape[1])
    while order:
        take = 1
        while take < len(order) and (take + 1) * inputs[order[take]].shape[1] <= batch_tokens:
            take += 1
        idx, order = order[:take], order[take:]
        lengths = [inputs[k].shape[1] for k in idx]
        x = inputs[idx[0]].new_zeros(len(idx), lengths[-1], inputs[idx[0]].shape[2], device=dev)
        for b, k in enumerate(idx):
            x[b, :lengths[b]] = inputs[k][0]
        yield idx, x, lengths


def run_layer(layer, inputs: list[torch.Tensor], rope: Callable, batch_tokens: int | None = None,
              compute_dtype: torch.dtype | None = None, in_place: bool = False) -> list[torch.Tensor]:
    """The layer's fp32 outputs for inputs (one [1, T, h] tensor per calibration sequence), each where
    its input is, computed on the layer's device (batches: padded_batches). in_place: the outputs
    replace the inputs in `inputs` as each batch finishes, so only one copy of the activations exists."""
    dev = layer.input_layernorm.weight.device
    outs = inputs if in_place else [None] * len(inputs)
    for idx, x, lengths in padded_batches(inputs, batch_tokens, dev):
        y = forward(layer, x, rope, compute_dtype=compute_dtype).float()
        for b, (k, n) in enumerate(zip(idx, lengths)):
            home = inputs[k].device
            outs[k] = y[b:b + 1, :n].to(home) if len(idx) == 1 else y[b:b + 1, :n].to(home, copy=True)
    return outs


def input_hessian(layer, linear, inputs: list[torch.Tensor], rope: Callable, batch_tokens: int | None = None,
                  compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, int]:
    """Hessian sum (fp32) of `linear`'s inputs over the calibration, and the row count; the layer runs
    only up to `linear`. Sequences alone (batch_tokens None) add in calibration order, one add each."""
    h_sum, rows = hessian_init(linear.in_features, device=linear.weight.device), 0
    for idx, x, lengths in padded_batches(inputs, batch_tokens, linear.weight.device):
        got = forward(layer, x, rope, until=linear, compute_dtype=compute_dtype)  # [B, T, in]
        rows += hessian_add(h_sum, got if len(idx) == 1 else torch.cat([got[b, :n] for b, n in enumerate(lengths)]))
    return h_sum, rows


def keep_on_device(hidden: list[torch.Tensor], layer) -> list[torch.Tensor]:
    """The calibration activations on the layer's GPU when they fit beside what the layer needs there
    (its weights once more and GPTQ's workspace, four n x n fp32 for its widest input n), else on the
    host: they then cross to the GPU one batch at a time in every pass. On a CPU: unchanged."""
    dev = layer.input_layernorm.weight.device
    if dev.type != "cuda":
        return hidden
    n = max(m.in_features for m in layer.modules() if isinstance(m, torch.nn.Linear))
    reserve = 16 * n * n + sum(p.numel() * p.element_size() for p in layer.parameters())
    moving = sum(x.numel() * x.element_size() for x in hidden if x.device != dev)
    home = dev if moving + reserve <= free_bytes(dev) else torch.device("cpu")
    return [x.to(home) for x in hidden]


def free_bytes(dev: torch.device) -> int:
    """What this process can still allocate on GPU `dev`: the driver's free memory plus the blocks
    PyTorch's caching allocator holds unused (mem_get_info counts those as taken: the last layer's
    activations, freed, stay cached, and would send activations that fit back to the host)."""
    return torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)


@torch.no_grad()
def quantize_layer(layer, inputs: list[torch.Tensor], rope: Callable, cfg: QuantConfig,
                   prefix: str = "", rtn_only: bool = False, hessian_transform: Callable | None = None,
                   batch_tokens: int | None = None, compute_dtype: torch.dtype | None = None,
                   kernel: bool | None = None,
                   clock: Clock | None = None) -> tuple[dict[str, QuantizedWeight], list[LinearReport]]:
    """GPTQ every linear of one decoder layer in place (weights replaced by their dequantized
    values) and return the quantized weights by name and a report per linear.
    hessian_transform: applied to each collected Hessian sum before GPTQ sees it (the tests feed a
    deliberately wrong one, a negative control); errors are always reported against the true one.
    batch_tokens, compute_dtype: how the calibration runs through the layer (run_layer).
    kernel: gptq()'s. clock: charges "hessian_passes", gptq()'s phases and "reports" (RTN, errors)."""
    quantized, reports = {}, []
    clock = clock or Clock()
    for group in LAYER_GROUPS:
        h_sum, rows = input_hessian(layer, layer.get_submodule(group[0]), inputs, rope, batch_tokens, compute_dtype)
        h_used = h_sum if hessian_transform is None else hessian_transform(h_sum)
        clock.lap("hessian_passes")
        linears = [layer.get_submodule(name) for name in group]
        ws = [lin.weight.data for lin in linears]
        bases = [rtn(w, cfg) for w in ws]
        qs = bases if rtn_only else gptq_shared(ws, h_used, rows, cfg, [prefix + name for name in group],
                                                kernel=kernel, clock=clock)  # one problem: the linears share H
        for name, lin, w, q, base in zip(group, linears, ws, qs, bases):
            w_hat = q.dequantize()
            reports.append(LinearReport(prefix + name, output_error(w, w_hat, h_sum, rows),
                                        output_error(w, base.dequantize(), h_sum, rows)))
            lin.weight.data = w_hat.to(w.dtype)
            quantized[name] = q
        clock.lap("reports")
    return quantized, reports


def check_finite(ckpt, name: str, t: torch.Tensor) -> torch.Tensor:
    """`t` (tensor `name` as read from `ckpt`) unchanged, or CheckpointError when it holds NaN or inf:
    one inf in a weight turns every activation after it, and every score, into NaN without a word."""
    if not torch.isfinite(t).all():
        n_inf, n_nan = int(torch.isinf(t).sum()), int(torch.isnan(t).sum())
        raise CheckpointError(f"{ckpt.path / ckpt.weight_map[name]}: tensor '{name}' has non-finite values "
                              f"({n_inf} inf, {n_nan} NaN); the source checkpoint is damaged")
    return t


def load_layer(ckpt, index: int, dtype=torch.float32, device="cpu"):
    """Decoder layer `index` with only its own tensors read from the checkpoint."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    prefix = f"model.layers.{index}."
    with torch.device("meta"):
        layer = Qwen2DecoderLayer(ckpt.config.to_qwen2(), index)
    state = {n.removeprefix(prefix): check_finite(ckpt, n, ckpt.tensor(n).to(device=device, dtype=dtype))
             for n in ckpt.names() if n.startswith(prefix)}
    layer.load_state_dict(state, strict=True, assign=True)
    ckpt.release()  # the layer's pages would otherwise stay mapped: memory would grow with depth
    return layer.eval()


class LayerReader:
    """A checkpoint's decoder layers in order, layer i + 1 read from disk by a background thread while
    the caller works on layer i (issue 23: a full-size layer is 1.75 GB of bf16 to read and convert).

    The thread reads through its own Checkpoint (its own mmaps, released after each layer) into fp32
    on the host; take(i) waits for layer i, starts reading i + 1 and moves layer i to `device`, so the
    device never holds two layers. Host memory: the caller's layer and the one being read, provided
    the caller drops each layer before taking the next. A read's error (a damaged tensor) is raised
    by the take() of that layer, after the caller has finished the layers before it."""

    def __init__(self, ckpt, device="cpu"):
        self.reader, self.device = Checkpoint(ckpt.path), device
        self.count, self.next = ckpt.config.num_hidden_layers, 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-reader")
        self.ahead = self.pool.submit(load_layer, self.reader, 0)

    def take(self, i: int):
        if i != self.next:
            raise ValueError(f"LayerReader.take: expected layer {self.next} (layers come in order), asked for {i}")
        layer = self.ahead.result()
        self.next += 1
        self.ahead = self.pool.submit(load_layer, self.reader, self.next) if self.next < self.count else None
        return layer.to(self.device)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True, cancel_futures=True)  # a read in flight finishes before its pages go


def make_rope(ckpt, device="cpu") -> Callable:
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    with torch.device(device):
        rotary = Qwen2RotaryEmbedding(ckpt.config.to_qwen2())
    return rotary


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim). Between layers, the allocator
    otherwise keeps fragments of the last layer's activations, and peak RSS creeps up with depth."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def embed(ckpt, calibration: list[list[int]]) -> list[torch.Tensor]:
    """Calibration token ids -> one fp32 [1, T, h] tensor each, on the host."""
    emb = check_finite(ckpt, "model.embed_tokens.weight", ckpt.tensor("model.embed_tokens.weight"))
    out = [emb[torch.tensor(ids)].float().unsqueeze(0) for ids in calibration]
    ckpt.release()
    return out


@torch.no_grad()
def stream_layers(ckpt, calibration: list[list[int]], cfg: QuantConfig, device="cpu", rtn_only: bool = False,
                  hessian_transform: Callable | None = None, compute_dtype: torch.dtype | None = None):
    """Quantize the decoder of `ckpt` layer by layer on calibration token ids, in memory.

    Yields (layer index, {linear name: QuantizedWeight}, [LinearReport], the layer with its
    quantized weights in place). Holds one layer and the calibration activations at a time.
    """
    hidden = embed(ckpt, calibration)
    rope = make_rope(ckpt, device)
    batch_tokens = BATCH_TOKENS.get(torch.device(device).type)
    with LayerReader(ckpt, device) as layers:
        for i in range(ckpt.config.num_hidden_layers):
            layer = layers.take(i)
            hidden = keep_on_device(hidden, layer)
            quantized, reports = quantize_layer(layer, hidden, rope, cfg, prefix=f"model.layers.{i}.",
                                                rtn_only=rtn_only, hessian_transform=hessian_transform,
                                                batch_tokens=batch_tokens, compute_dtype=compute_dtype)
            run_layer(layer, hidden, rope, batch_tokens, compute_dtype, in_place=True)  # the next layer's inputs
            yield i, quantized, reports, layer
            del layer
            return_freed_memory()
