"""The fused WorldPM tail: last-token gather -> final RMSNorm -> Linear(h,h)+bias -> ReLU ->
Linear(h,1)+bias -> one fp32 score per sequence.

Only one row per sequence reaches the norm and the head. Two launches:
  1. gather + RMSNorm: one program per sequence writes its normalized row [h] in fp32;
  2. head: one program per tile of BN output features of Linear(h,h) (and per block of up to BB
     sequences) reads that weight tile once for all the sequences of the block, applies bias and
     ReLU, and reduces its BN features against the second linear's weights to one partial sum per
     sequence. The partial sums over tiles [h / BN, B] are added in a fixed order (deterministic).

Arguments (both functions):
  hidden       [B, T, h] right-padded (index = position in each sequence) or [R, h] packed rows
               (index = row), fp16/bf16/fp32, last dimension contiguous
  index        [B] integer, the scoring position of each sequence
  norm_weight  [h], eps: the final RMSNorm
  w0 [h, h], b0 [h], w2 [1, h], b2 [1]: score.0 and score.2 (nn.Linear layout), any float dtype
  out          optional [B] fp32 tensor to write the scores into
Returns [B] fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gptq import FLOATS, check_out

MAX_BB = 64  # sequences per head program: the head weights are read once per MAX_BB sequences


@triton.jit
def _gather_norm_kernel(hidden_ptr, offsets_ptr, norm_ptr, out_ptr, H, eps, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    src = hidden_ptr + tl.load(offsets_ptr + b)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK):
        offs = h0 + tl.arange(0, BLOCK)
        x = tl.load(src + offs, mask=offs < H, other=0.0).to(tl.float32)
        acc += x * x
    inv = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / H + eps)
    for h0 in range(0, H, BLOCK):
        offs = h0 + tl.arange(0, BLOCK)
        x = tl.load(src + offs, mask=offs < H, other=0.0).to(tl.float32)
        w = tl.load(norm_ptr + offs, mask=offs < H, other=0.0).to(tl.float32)
        tl.store(out_ptr + b * H + offs, x * inv * w, mask=offs < H)


@triton.jit
def _head_kernel(x_ptr, w0_ptr, b0_ptr, w2_ptr, part_ptr, B, H, BB: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr):
    pid_n, pid_b = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_b = pid_b * BB + tl.arange(0, BB)
    acc = tl.zeros((BB, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        offs_k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + offs_b[:, None] * H + offs_k[None, :],
                    mask=(offs_b[:, None] < B) & (offs_k[None, :] < H), other=0.0)  # [BB, BK] fp32
        w = tl.load(w0_ptr + offs_n[None, :] * H + offs_k[:, None],
                    mask=(offs_n[None, :] < H) & (offs_k[:, None] < H), other=0.0).to(tl.float32)  # [BK, BN]
        acc += tl.dot(x, w, input_precision="ieee")
    b0 = tl.load(b0_ptr + offs_n, mask=offs_n < H, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + offs_n, mask=offs_n < H, other=0.0).to(tl.float32)  # 0 outside h: no contribution
    act = tl.maximum(acc + b0[None, :], 0.0)
    tl.store(part_ptr + pid_n * B + offs_b, tl.sum(act * w2[None, :], axis=1), mask=offs_b < B)


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
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= limit):
        raise ValueError(f"index: expected positions in [0, {limit}), found [{int(index.min())}, {int(index.max())}]")
    return index.to(device=hidden.device, dtype=torch.int64)


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
    x = torch.full((B, H), float("nan"), dtype=torch.float32, device=hidden.device)  # [B, h] normalized rows
    offsets = index * hidden.stride(-2)  # [B] element offset of each scoring row
    if hidden.dim() == 3:
        offsets += torch.arange(B, device=hidden.device) * hidden.stride(0)
    _gather_norm_kernel[(B,)](hidden, offsets, norm_weight, x, H, float(eps), BLOCK=1024)
    BB = min(MAX_BB, max(16, triton.next_power_of_2(B)))  # tl.dot needs >= 16 rows
    BN, BK = 32, 64
    parts = torch.full((triton.cdiv(H, BN), B), float("nan"), dtype=torch.float32, device=hidden.device)
    _head_kernel[(triton.cdiv(H, BN), triton.cdiv(B, BB))](x, w0, b0, w2, parts, B, H, BB=BB, BN=BN, BK=BK)
    return torch.sum(parts, 0, out=out).add_(b2.float())
