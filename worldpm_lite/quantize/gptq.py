"""GPTQ core as pure functions (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers"). Imports nothing of worldpm_lite, except the column loop's
Triton kernel (worldpm_lite.kernels.gptq_block), and that only when gptq() runs it.

Conventions: a weight is [out, in] (nn.Linear). Quantization is per output row and per group of
`group_size` input columns: w ~ (q - zero) * scale with q in [0, 2^bits - 1]. Scales and zeros
are [n_groups, out]; `g_idx[i]` is the group of input column i (not monotone under act-order).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 8)  # the checkpoint format packs 4 and 8; 2 and 3 serve as worse-quantizer controls


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 128  # -1: one group per row (per-channel)
    sym: bool = True
    act_order: bool = False  # desc_act: quantize columns in order of decreasing Hessian diagonal
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal (GPTQ section 4, "Cholesky Reformulation")
    block_size: int = 128  # columns per lazy batch (section 4, "Lazy Batch-Updates")

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits: expected one of {BITS}, found {self.bits}")
        if self.group_size != -1 and (self.group_size < 1 or self.group_size % 32):
            raise ValueError(f"group_size: expected -1 or a positive multiple of 32, found {self.group_size}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp: expected a fraction in (0, 1), found {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size: expected a positive integer, found {self.block_size}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def groups(self, in_features: int) -> int:
        g = in_features if self.group_size == -1 else self.group_size
        if in_features % g:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {g}")
        return in_features // g


@dataclass
class QuantizedWeight:
    q: torch.Tensor  # [out, in] int32 levels in [0, maxq], columns in original order
    scales: torch.Tensor  # [n_groups, out] fp32
    zeros: torch.Tensor  # [n_groups, out] int32 (the level that dequantizes to 0)
    g_idx: torch.Tensor  # [in] int32 group of each input column

    def dequantize(self) -> torch.Tensor:
        """[out, in] fp32."""
        return dequantize(self.q, self.scales[self.g_idx.long()].T, self.zeros[self.g_idx.long()].T)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Levels of w: clamp(round(w / scale) + zero, 0, maxq). Shapes broadcast; returns int32."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q - zero) * scale, in fp32. Mirrors `quantize`."""
    return (q.float() - zero.float()) * scale.float()


def find_params(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min/max grid for w [rows, cols] -> (scale [rows, 1] fp32, zero [rows, 1] fp32 integral)."""
    w = w.float()
    lo = torch.minimum(w.min(dim=1, keepdim=True).values, torch.zeros(1, device=w.device))
    hi = torch.maximum(w.max(dim=1, keepdim=True).values, torch.zeros(1, device=w.device))
    if cfg.sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    dead = (lo == 0) & (hi == 0)
    lo, hi = torch.where(dead, -1.0, lo), torch.where(dead, 1.0, hi)
    # Rounded to fp16 now: the checkpoint stores fp16 scales, so quantization uses exactly the grid
    # that will be dequantized later.
    scale = ((hi - lo) / cfg.maxq).half().float()
    zero = torch.full_like(scale, (cfg.maxq + 1) / 2) if cfg.sym else torch.round(-lo / scale)
    return scale, zero


def hessian_init(in_features: int, device=None) -> torch.Tensor:
    """Empty fp32 Hessian sum [in, in]."""
    return torch.zeros(in_features, in_features, dtype=torch.float32, device=device)


def hessian_add(h_sum: torch.Tensor, x: torch.Tensor) -> int:
    """Add the inputs x [..., in] of a linear layer into h_sum in place: H += 2 X^T X (fp32).
    Returns the number of rows added; H = h_sum / rows over all calls."""
    x = x.reshape(-1, x.shape[-1]).float()
    h_sum.addmm_(x.T, x, alpha=2.0)
    return x.shape[0]


class Clock:
    """Wall seconds by phase: lap(name) adds the time since the previous lap to times[name]. It waits for
    the GPU's queue at each lap (so each phase is charged its own kernels), hence does nothing at all
    unless `times` is given: bench/quantize_layer_cost.py passes one, the pipeline does not."""

    def __init__(self, times: dict | None = None, device="cpu"):
        self.times, self.cuda, self.last = times, torch.device(device).type == "cuda", time.perf_counter()

    def lap(self, name: str) -> None:
        if self.times is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self.last
        self.last = now


def _group_of_columns(cfg: QuantConfig, in_features: int, perm: torch.Tensor | None) -> torch.Tensor:
    """g_idx: group of each input column. Under act-order, groups follow the quantization order."""
    size = in_features if cfg.group_size == -1 else cfg.group_size
    order_group = torch.arange(in_features, dtype=torch.int32) // size
    if perm is None:
        return order_group
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[perm.cpu()] = order_group
    return g_idx


def rtn(w: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    """Round-to-nearest on the same grid as GPTQ (no Hessian): the baseline and the fallback."""
    out, n = w.shape
    groups = cfg.groups(n)
    wg = w.float().reshape(out, groups, n // groups).transpose(0, 1).reshape(groups * out, n // groups)
    scale, zero = find_params(wg, cfg)  # [groups*out, 1]
    q = quantize(wg, scale, zero, cfg.maxq).reshape(groups, out, n // groups).transpose(0, 1).reshape(out, n)
    return QuantizedWeight(q, scale.reshape(groups, out), zero.reshape(groups, out).to(torch.int32),
                           _group_of_columns(cfg, n, None).to(w.device))


def gptq(w: torch.Tensor, h_sum: torch.Tensor, rows: int, cfg: QuantConfig, name: str = "layer",
         kernel: bool | None = None, clock: Clock | None = None) -> QuantizedWeight:
    """Quantize w [out, in] with the Hessian sum of its inputs (h_sum over `rows` rows).

    Falls back to RTN, with a warning naming the layer, when H is not positive definite even
    after damping. Works on w's device; w is not modified.

    kernel: run each block's column loop as one Triton launch (kernels/gptq_block.py, the same
    arithmetic, bit for bit) instead of ~15 torch ops per column. None: on a CUDA device only;
    True on a CPU tensor needs Triton's interpreter (TRITON_INTERPRET=1 before the kernel's import).
    clock: charges the time to "factor" (damping, Cholesky, inverse), "column_loop" and "deferred_gemm".
    """
    clock = clock or Clock()
    out, n = w.shape
    cfg.groups(n)
    W = w.float().clone()
    H = h_sum.float() / max(rows, 1)
    dead = torch.diag(H) == 0  # inputs that were always zero: any value works, fix them to 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = None
    if cfg.act_order:  # section 4 / reference implementation: largest diag(H) first
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(cfg.damp * torch.mean(torch.diag(H)))
    try:  # Hinv's upper Cholesky factor: the rows needed by the column loop (section 4).
        # Reassigning one name frees each n x n intermediate as soon as the next exists: for
        # WorldPM-72B's down_proj (n = 29568) each is 3.5 GB.
        Hinv = torch.linalg.cholesky(H)
        del H
        Hinv = torch.cholesky_inverse(Hinv)
        Hinv = torch.linalg.cholesky(Hinv, upper=True)
    except torch.linalg.LinAlgError:
        warnings.warn(f"{name}: Hessian not positive definite after damping; using round-to-nearest",
                      stacklevel=2)
        return rtn(w, cfg)
    if torch.isnan(Hinv).any():
        warnings.warn(f"{name}: Hessian inverse has NaN; using round-to-nearest", stacklevel=2)
        return rtn(w, cfg)

    clock.lap("factor")
    size = n if cfg.group_size == -1 else cfg.group_size
    groups = n // size
    Q = torch.zeros_like(W, dtype=torch.int32)
    scales = torch.zeros(groups, out, device=W.device)
    zeros = torch.zeros(groups, out, device=W.device)
    scale = zero = None
    use_kernel = W.is_cuda if kernel is None else kernel
    if use_kernel:
        from worldpm_lite.kernels.gptq_block import gptq_block  # imports Triton: only when used
    for i1 in range(0, n, cfg.block_size):  # lazy batch of columns
        i2 = min(i1 + cfg.block_size, n)
        if use_kernel:  # the loop below in one launch; W[:, i1:i2] is updated in place
            start = (i2 - 1) // size * size  # the group of the block's last column: its columns past the block
            tail = W[:, i2:start + size] if i1 <= start and start + size > i2 else None
            Q[:, i1:i2], Err1 = gptq_block(W[:, i1:i2], Hinv[i1:i2, i1:i2], scales, zeros, i1, size, cfg.maxq,
                                           cfg.sym, tail)
        else:
            W1, Err1 = W[:, i1:i2].clone(), torch.zeros(out, i2 - i1, device=W.device)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for j in range(i2 - i1):
                col = i1 + j
                if col % size == 0:  # a new group: its grid comes from the updated, not yet quantized weights
                    # only the group's own columns: copying all later ones made a full-size layer take >25 min
                    group_w = torch.cat([W1[:, j:j + size], W[:, i2:i2 + max(0, size - (i2 - i1 - j))]], dim=1)
                    scale, zero = find_params(group_w, cfg)
                    scales[col // size], zeros[col // size] = scale[:, 0], zero[:, 0]
                wcol = W1[:, j]
                q = quantize(wcol.unsqueeze(1), scale, zero, cfg.maxq)
                Q[:, col] = q[:, 0]
                err = (wcol - dequantize(q, scale, zero)[:, 0]) / Hinv1[j, j]
                W1[:, j:] -= err.unsqueeze(1) * Hinv1[j, j:].unsqueeze(0)  # OBS update of the rest of the block
                Err1[:, j] = err
            W[:, i1:i2] = W1
        clock.lap("column_loop")
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # deferred update of all later columns
        clock.lap("deferred_gemm")
    g_idx = _group_of_columns(cfg, n, perm).to(W.device)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return QuantizedWeight(Q, scales, zeros.to(torch.int32), g_idx)
