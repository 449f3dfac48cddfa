"""GPTQ core as pure functions (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers"). The column loop of each lazy block is the kernel module's
(kernels/gptq_block.py): its torch reference on the CPU, its Triton launch on a GPU.

Conventions: a weight is [out, in] (nn.Linear). Quantization is per output row and per group of
`group_size` input columns: w ~ (q - zero) * scale with q in [0, 2^bits - 1]. Scales and zeros
are [n_groups, out]; `g_idx[i]` is the group of input column i (not monotone under act-order).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from worldpm_lite.kernels.gptq_block import gptq_block, gptq_block_ref, group_grid, spill_width
from worldpm_lite.options import QuantConfig


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
    return group_grid(w, cfg.maxq, cfg.sym)


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
    """Quantize w [out, in] with the Hessian sum of its inputs (h_sum over `rows` rows): gptq_shared
    for one linear."""
    return gptq_shared([w], h_sum, rows, cfg, [name], kernel, clock)[0]


def gptq_shared(ws: list[torch.Tensor], h_sum: torch.Tensor, rows: int, cfg: QuantConfig, names: list[str],
                kernel: bool | None = None, clock: Clock | None = None) -> list[QuantizedWeight]:
    """Quantize the weights `ws` ([out_k, in] each) of linears that read the same input (q, k and v;
    gate and up) as one GPTQ problem under the Hessian sum they share (h_sum over `rows` rows): their
    rows stacked, one factorization of H and one column loop per block for all of them. GPTQ treats
    rows independently given H, so each comes out as gptq() alone would give it: the deferred update
    of later columns is one GEMM per linear, the same products as alone.

    Falls back to RTN, with a warning naming the linears, when H is not positive definite even
    after damping. Works on the weights' device; they are not modified.

    kernel: run each block's column loop as one Triton launch (kernels/gptq_block.py's gptq_block)
    instead of its torch reference gptq_block_ref (~15 torch ops per column), the loop the kernel is
    tested against. None: on a CUDA device only; True on a CPU tensor needs Triton's interpreter
    (TRITON_INTERPRET=1 before the kernel's import).
    clock: charges the time to "factor" (damping, Cholesky, inverse), "column_loop" and "deferred_gemm".
    """
    clock = clock or Clock()
    n = ws[0].shape[1]
    cfg.groups(n)
    W = torch.cat([w.float() for w in ws]) if len(ws) > 1 else ws[0].float().clone()
    out = W.shape[0]
    ends = torch.tensor([w.shape[0] for w in ws]).cumsum(0).tolist()
    members = list(zip([0] + ends[:-1], ends))  # each linear's rows of W
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
        warnings.warn(f"{', '.join(names)}: Hessian not positive definite after damping; using round-to-nearest",
                      stacklevel=2)
        return [rtn(w, cfg) for w in ws]
    if torch.isnan(Hinv).any():
        warnings.warn(f"{', '.join(names)}: Hessian inverse has NaN; using round-to-nearest", stacklevel=2)
        return [rtn(w, cfg) for w in ws]

    clock.lap("factor")
    size = n if cfg.group_size == -1 else cfg.group_size
    groups = n // size
    Q = torch.zeros_like(W, dtype=torch.int32)
    scales = torch.zeros(groups, out, device=W.device)
    zeros = torch.zeros(groups, out, device=W.device)
    column_loop = gptq_block if (W.is_cuda if kernel is None else kernel) else gptq_block_ref
    for i1 in range(0, n, cfg.block_size):  # lazy batch of columns
        i2 = min(i1 + cfg.block_size, n)
        width = spill_width(i1, i2 - i1, size)  # the last group's columns past the block: its grid reads them
        # W[:, i1:i2] is updated in place (OBS within the block)
        Q[:, i1:i2], Err1 = column_loop(W[:, i1:i2], Hinv[i1:i2, i1:i2], scales, zeros, i1, size, cfg.maxq,
                                        cfg.sym, W[:, i2:i2 + width] if width else None)
        clock.lap("column_loop")
        for a, b in members:  # deferred update of all later columns
            W[a:b, i2:] -= Err1[a:b] @ Hinv[i1:i2, i2:]
        clock.lap("deferred_gemm")
    g_idx = _group_of_columns(cfg, n, perm).to(W.device)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    zeros = zeros.to(torch.int32)
    if len(members) == 1:
        return [QuantizedWeight(Q, scales, zeros, g_idx)]
    return [QuantizedWeight(Q[a:b].clone(), scales[:, a:b].contiguous(), zeros[:, a:b].contiguous(), g_idx.clone())
            for a, b in members]  # each its own memory: a checkpoint's tensors may not share any
