"""The fused WorldPM tail: last-token gather -> final RMSNorm -> Linear(h,h)+bias -> ReLU ->
Linear(h,1)+bias -> one fp32 score per sequence.

The job is reading score.0's [h, h] weight (134 MB in bf16 for WorldPM-72B) once per batch, so
the kernel is a memory-bound GEMV/skinny GEMM laid out for that:
  1. head: a grid of (output tile of BN features) x (block of up to BB sequences) x (split of
     the h inputs). Each program streams its [BN, BK] weight tiles along the contiguous input
     dimension, gathers its sequences' scoring rows straight from `hidden` (no separate gather),
     multiplies them by the norm gain and accumulates both the products and the rows' partial
     sums of squares. RMSNorm is a per-row scale, so it is applied after the reduction:
     W (x * g * r) = r * W (x * g) with r = 1 / rms(x). Partial results go to an fp32 scratch.
  2. finish: per output tile, the splits are added in a fixed order (deterministic), scaled by r,
     biased, ReLU'd and reduced against score.2's weights to one partial score per tile; the
     tiles are summed by torch.sum (fixed order as well).
Precision: on a GPU with a bf16/fp16 head, the normalized rows go to the tensor cores as two
bf16/fp16 halves (hi + lo, about 16 mantissa bits together) against the exact stored weights,
accumulated in fp32: within ~1e-5 relative of the fp32 reference (tests/test_kernels.py checks
this scheme's bound in torch; bench/gpu_check.py checks the kernel at 1e-4). An fp32 head, and
Triton's CPU interpreter, use fp32 products.

Arguments (both functions):
  hidden       [B, T, h] right-padded (index = position in each sequence) or [R, h] packed rows
               (index = row), fp16/bf16/fp32, last dimension contiguous
  index        [B] integer, the scoring position of each sequence (bounds-checked when it is on
               the CPU; a CUDA index is not, since checking it would wait for the GPU)
  norm_weight  [h], eps: the final RMSNorm
  w0 [h, h], b0 [h], w2 [1, h], b2 [1]: score.0 and score.2 (nn.Linear layout), any float dtype
  out          optional [B] fp32 tensor to write the scores into
Returns [B] fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import FLOATS, check_out

MAX_BB = 64  # sequences per head program: the head weight is read once per MAX_BB sequences
BN = 64  # output features per head program
TARGET_PROGRAMS = 512  # head programs to aim for (a few per SM on an H100/H200): splits h when needed


@triton.jit
def _head_kernel(hidden_ptr, index_ptr, norm_ptr, w0_ptr, part_ptr, sumsq_ptr, B, H, stride_b, stride_t, K_PER,
                 SPLIT_HALVES: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n, pid_b, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_b = pid_b * BB + tl.arange(0, BB)
    rows = offs_b.to(tl.int64) * stride_b + tl.load(index_ptr + offs_b, mask=offs_b < B, other=0) * stride_t
    acc = tl.zeros((BB, BN), dtype=tl.float32)
    sq = tl.zeros((BB,), dtype=tl.float32)
    k_start = pid_s * K_PER
    k_end = tl.minimum(k_start + K_PER, H)
    for k0 in range(k_start, k_end, BK):
        offs_k = k0 + tl.arange(0, BK)
        in_k = offs_k < k_end
        x = tl.load(hidden_ptr + rows[:, None] + offs_k[None, :], mask=(offs_b[:, None] < B) & in_k[None, :],
                    other=0.0).to(tl.float32)  # [BB, BK] raw rows
        sq += tl.sum(x * x, axis=1)
        g = tl.load(norm_ptr + offs_k, mask=in_k, other=0.0).to(tl.float32)
        xg = x * g[None, :]
        w = tl.load(w0_ptr + offs_n[:, None].to(tl.int64) * H + offs_k[None, :],
                    mask=(offs_n[:, None] < H) & in_k[None, :], other=0.0)  # [BN, BK], contiguous along k
        if SPLIT_HALVES:  # tensor cores: xg = hi + lo in w's 16-bit type, products exact, fp32 sums
            hi = xg.to(w.dtype)
            lo = (xg - hi.to(tl.float32)).to(w.dtype)
            acc += tl.dot(hi, tl.trans(w)) + tl.dot(lo, tl.trans(w))
        else:
            acc += tl.dot(xg, tl.trans(w.to(tl.float32)), input_precision="ieee")
    mask_b = offs_b < B
    tl.store(part_ptr + (pid_s * B + offs_b[:, None]) * H + offs_n[None, :], acc,
             mask=mask_b[:, None] & (offs_n[None, :] < H))
    if pid_n == 0:
        tl.store(sumsq_ptr + pid_s * B + offs_b, sq, mask=mask_b)


@triton.jit
def _finish_kernel(part_ptr, sumsq_ptr, b0_ptr, w2_ptr, b2_ptr, tile_ptr, B, H, S, eps,
                   BB: tl.constexpr, BN: tl.constexpr):
    pid_n, pid_b = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_b = pid_b * BB + tl.arange(0, BB)
    mask = (offs_b[:, None] < B) & (offs_n[None, :] < H)
    acc = tl.zeros((BB, BN), dtype=tl.float32)
    sq = tl.zeros((BB,), dtype=tl.float32)
    for s in range(S):  # fixed order: the same bits on every run
        acc += tl.load(part_ptr + (s * B + offs_b[:, None]) * H + offs_n[None, :], mask=mask, other=0.0)
        sq += tl.load(sumsq_ptr + s * B + offs_b, mask=offs_b < B, other=0.0)
    r = 1.0 / tl.sqrt(sq / H + eps)
    b0 = tl.load(b0_ptr + offs_n, mask=offs_n < H, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + offs_n, mask=offs_n < H, other=0.0).to(tl.float32)  # 0 outside h: no contribution
    act = tl.maximum(acc * r[:, None] + b0[None, :], 0.0)
    partial = tl.sum(act * w2[None, :], axis=1)
    if pid_n == 0:
        partial += tl.load(b2_ptr).to(tl.float32)
    tl.store(tile_ptr + pid_n * B + offs_b, partial, mask=offs_b < B)


def _positions(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """index validated against hidden, as int64 on hidden's device."""
    if hidden.dtype not in FLOATS or hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected a float tensor [B, T, h] or [R, h], found {hidden.dtype} "
                         f"{tuple(hidden.shape)}")
    if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"index: expected a 1-D integer tensor, found {index.dtype} {tuple(index.shape)}")
    if hidden.dim() == 3 and index.shape[0] != hidden.shape[0]:
        raise ValueError(f"index: expected {hidden.shape[0]} positions (one per sequence), found {index.shape[0]}")
    limit = hidden.shape[-2]
    if index.numel() and index.device.type == "cpu" and (int(index.min()) < 0 or int(index.max()) >= limit):
        raise ValueError(f"index: expected positions in [0, {limit}), found [{int(index.min())}, {int(index.max())}]")
    return index.to(device=hidden.device, dtype=torch.int64, non_blocking=True)


def _check_head(h: int, norm_weight, w0, b0, w2, b2) -> None:
    want = {"norm_weight": (norm_weight, (h,)), "w0": (w0, (h, h)), "b0": (b0, (h,)), "w2": (w2, (1, h)),
            "b2": (b2, (1,))}
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape or t.dtype not in FLOATS:
            raise ValueError(f"{name}: expected a float tensor {list(shape)}, found {t.dtype} {tuple(t.shape)}")


def fused_tail_ref(hidden, index, norm_weight, eps: float, w0, b0, w2, b2, out=None) -> torch.Tensor:
    index = _positions(hidden, index)
    rows = hidden[torch.arange(len(index), device=hidden.device), index] if hidden.dim() == 3 else hidden[index]
    _check_head(hidden.shape[-1], norm_weight, w0, b0, w2, b2)
    x = rows.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    x = torch.relu(x @ w0.float().T + b0.float())  # [B, h]
    scores = (x @ w2.float().T + b2.float()).squeeze(-1)  # [B]
    return scores if out is None else check_out(out, (len(index),), torch.float32, hidden.device).copy_(scores)


def tail_grid(B: int, H: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BB, BK, splits, inputs per split) for B sequences and width H."""
    BB = min(MAX_BB, max(16, triton.next_power_of_2(B)))  # tl.dot needs >= 16 rows
    BK = 128 if BB <= 16 or not on_gpu else 64  # keeps the [BB, BK] row tile in registers
    tiles = triton.cdiv(H, BN) * triton.cdiv(B, BB)
    splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, tiles), triton.cdiv(H, BK)))
    k_per = triton.cdiv(triton.cdiv(H, splits), BK) * BK
    return BB, BK, triton.cdiv(H, k_per), k_per


def fused_tail(hidden, index, norm_weight, eps: float, w0, b0, w2, b2, out=None) -> torch.Tensor:
    index = _positions(hidden, index)
    H = hidden.shape[-1]
    _check_head(H, norm_weight, w0, b0, w2, b2)
    devices = {t.device for t in (hidden, norm_weight, w0, b0, w2, b2)}
    if len(devices) != 1:
        raise ValueError(f"hidden and the head weights: expected one device, found {sorted(map(str, devices))}")
    if hidden.stride(-1) != 1:
        raise ValueError("hidden: expected a contiguous last dimension")
    w0, w2 = w0.contiguous(), w2.contiguous()
    B = index.shape[0]
    out = check_out(out, (B,), torch.float32, hidden.device)
    if B == 0:
        return out
    on_gpu = hidden.device.type == "cuda"
    BB, BK, S, k_per = tail_grid(B, H, on_gpu)
    stride_b = hidden.stride(0) if hidden.dim() == 3 else 0
    parts = torch.empty((S, B, H), dtype=torch.float32, device=hidden.device)
    sumsq = torch.empty((S, B), dtype=torch.float32, device=hidden.device)
    n_tiles, b_tiles = triton.cdiv(H, BN), triton.cdiv(B, BB)
    _head_kernel[(n_tiles, b_tiles, S)](
        hidden, index, norm_weight, w0, parts, sumsq, B, H, stride_b, hidden.stride(-2), k_per,
        SPLIT_HALVES=on_gpu and w0.dtype != torch.float32, BB=BB, BN=BN, BK=BK)
    tiles = torch.empty((n_tiles, B), dtype=torch.float32, device=hidden.device)
    _finish_kernel[(n_tiles, b_tiles)](parts, sumsq, b0, w2, b2, tiles, B, H, S, float(eps), BB=BB, BN=BN)
    return torch.sum(tiles, 0, out=out)
