"""GPTQ linear layers at run time, with explicit backends.

Backends (one per model, chosen when loading and reported by `Scorer.backend`):
  torch   the reference: dequantize the whole weight (torch ops), then a dense matmul. Any
          device; on the CPU the only choice. Used as the ground truth in tests.
  triton  GPUs: the Triton dequantize kernel into the scratch matrix, then the vendor GEMM.
          Scoring is prefill (thousands of tokens per batch): compute-bound, where this ran at
          1.08-1.14x the bf16 matmul's time on an H200. The fused dequant-matmul kernel for few
          rows (`fused_max_tokens`) is off by default: on the H200 it was slower than dequantize +
          GEMM at every size measured (M = 1: 1.07 ms vs 0.13 ms); bench/gpu_check.py keeps timing
          it against the target (2.5x the bf16 matmul's speed at M <= 64).

Both backends dequantize into one scratch matrix per device and dtype (`Scratch`), sized for the
largest linear on that device and shared by all of them - the planner reserves exactly that - so a
forward pass allocates no weight-sized temporaries (one per linear left the allocator holding 6 GiB
reserved beyond allocated over an 80-layer run). A model therefore runs one forward pass at a time.

bitsandbytes NF4 / LLM.int8 linears (`--quant bnb-nf4|bnb-int8`) are the no-calibration baseline:
a bf16 checkpoint quantized as it loads, as reward-bench loads reward models.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .checkpoint import LINEARS, GPTQSpec
from .errors import UsageError, require_extra
from .kernels.dequant import dequantize, dequantize_ref, gptq_matmul
from .options import BNB

BACKENDS = ("torch", "triton")
# Rows up to which the fused kernel runs instead of dequantize + GEMM: 0 (never) until
# bench/gpu_check.py measures it beating dequantize + GEMM (it did not, at any M, on an H200).
FUSED_MAX_TOKENS = 0
PACKED_DTYPES = {"I32": torch.int32, "F16": torch.float16}


def pick_backend(backend: str, device: torch.device) -> str:
    """"auto" -> triton on a CUDA device, torch elsewhere; an explicit choice is checked."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise UsageError(f"backend: expected auto or one of {BACKENDS}, found {backend!r}")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError(f"backend 'triton' needs a CUDA device, found {device} (TRITON_INTERPRET=1 runs the "
                         "kernels in Triton's interpreter, for testing)")
    return backend


class Scratch:
    """Dense [in, out] matrices to dequantize into: one flat buffer per (device, dtype), made once at
    the size of the largest linear that uses it and handed out as views."""

    def __init__(self):
        self.sizes: dict[torch.device, int] = {}  # elements of the largest linear per device
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def matrix(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        need = rows * cols
        buf = self.buffers.get((device, dtype))
        if buf is None or buf.numel() < need:
            self.sizes[device] = max(need, self.sizes.get(device, 0))
            buf = self.buffers[(device, dtype)] = torch.empty(self.sizes[device], dtype=dtype, device=device)
        return buf[:need].view(rows, cols)


def share_scratch(model) -> Scratch:
    """Give every GPTQLinear of `model` (and of its streamed layers' ring modules) one Scratch,
    pre-sized per device for its largest linear."""
    scratch = Scratch()
    ring = model.streamer.modules if getattr(model, "streamer", None) is not None else []
    for m in [*model.modules(), *(m for r in ring for m in r.modules())]:
        if isinstance(m, GPTQLinear):
            dev = m.qweight.device
            scratch.sizes[dev] = max(scratch.sizes.get(dev, 0), m.in_features * m.out_features)
            m.scratch = scratch
    return scratch


class GPTQLinear(nn.Module):
    """y = x @ W + bias for a GPTQ-packed W (the standard checkpoint tensors, as buffers)."""

    def __init__(self, in_features: int, out_features: int, spec: GPTQSpec, bias: bool,
                 backend: str = "torch", fused_max_tokens: int = FUSED_MAX_TOKENS, bias_dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, spec.bits
        self.backend, self.fused_max_tokens = backend, fused_max_tokens
        self.scratch = Scratch()  # replaced by one shared per model (share_scratch) when loaded
        for name, (shape, dtype) in spec.packed_shapes(in_features, out_features).items():
            self.register_buffer(name, torch.empty(shape, dtype=PACKED_DTYPES[dtype]))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)  # [M, in]
        packed = (self.qweight, self.qzeros, self.scales, self.g_idx)
        if self.backend == "triton" and x.shape[0] <= self.fused_max_tokens:
            return gptq_matmul(x, *packed, self.bits, bias=self.bias).reshape(*shape[:-1], self.out_features)
        w = self.scratch.matrix(self.in_features, self.out_features, x.dtype, x.device)  # [in, out]
        (dequantize if self.backend == "triton" else dequantize_ref)(*packed, self.bits, x.dtype, out=w)
        y = x @ w if self.bias is None else torch.addmm(self.bias.to(x.dtype), x, w)
        return y.reshape(*shape[:-1], self.out_features)

    def describe(self) -> str:
        if self.backend == "torch":
            return f"GPTQ {self.bits}-bit linears, torch reference (dequantize + matmul)"
        fused = f"fused dequant-matmul up to {self.fused_max_tokens} tokens, " if self.fused_max_tokens else ""
        return f"GPTQ {self.bits}-bit linears, Triton ({fused}dequantize + GEMM)"

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, backend={self.backend}"


def swap_in_gptq_linears(model, spec: GPTQSpec, backend: str, bias_dtype=torch.float32) -> None:
    """Replace every decoder linear of a WorldPM (built on the meta device) by a GPTQLinear."""
    for parent, attr, old in _linear_slots(model):
        setattr(parent, attr, GPTQLinear(old.in_features, old.out_features, spec, old.bias is not None, backend,
                                         bias_dtype=bias_dtype))


def _linear_slots(model):
    """(parent module, attribute, linear) for every decoder linear."""
    for layer in model.model.layers:
        for name in LINEARS:
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name)
            yield parent, attr, getattr(parent, attr)


def swap_in_bnb_linears(model, kind: str, compute_dtype: torch.dtype) -> None:
    """Replace every decoder linear of a meta-device WorldPM by a bitsandbytes NF4 or int8 linear."""
    require_extra("bnb", "bitsandbytes", what=f"quant {kind!r}")
    import bitsandbytes as bnb

    for parent, attr, old in _linear_slots(model):
        args = (old.in_features, old.out_features, old.bias is not None)
        if kind == "bnb-nf4":
            new = bnb.nn.Linear4bit(*args, compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        else:
            new = bnb.nn.Linear8bitLt(*args, has_fp16_weights=False, threshold=6.0, device="meta")
        setattr(parent, attr, new)


def bnb_weight(w: torch.Tensor, kind: str, device: torch.device):
    """A bitsandbytes parameter holding w [out, in], quantized as it moves to `device`."""
    import bitsandbytes as bnb

    if kind == "bnb-nf4":
        return bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4").to(device)
    return bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to(device)


def check_quant(quant: str | None) -> None:
    if quant is not None and quant not in BNB:
        raise UsageError(f"quant: expected one of {sorted(BNB)} or None, found {quant!r}")
