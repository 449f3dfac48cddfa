"""GPTQ weights on the GPU: dequantize to a dense matrix, and a fused dequantize-matmul.

The packed layout is the standard "gptq" checkpoint format (v1 zeros), for bits b in {4, 8} and
p = 32 / b values per int32, lowest bits first:
  qweight int32 [K / p, N]   levels along the input dimension K
  qzeros  int32 [G, N / p]   zero point minus one, packed along the output dimension N
  scales  fp16/bf16/fp32 [G, N]
  g_idx   int32 [K]          group of each input row (act-order makes it a permutation of groups)
Weight row k of the dense [K, N] matrix W (so y = x @ W) is (level - (zero + 1)) * scale.

Each launcher has a `*_ref` beside it with the same signature: the plain torch definition every
kernel is tested against. On a CPU tensor the kernels run in Triton's interpreter
(TRITON_INTERPRET=1), which computes in fp32 (its bf16 arithmetic is broken).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, K, N,
                  BITS: tl.constexpr):
    """fp32 tile [BK, BN] of W for input rows offs_k and output columns offs_n (0 outside)."""
    PER: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    packed = tl.load(qweight_ptr + (offs_k // PER)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    level = (packed >> ((offs_k % PER) * BITS)[:, None]) & MAXQ
    g = tl.load(g_idx_ptr + offs_k, mask=offs_k < K, other=0)
    zp = tl.load(qzeros_ptr + g[:, None] * (N // PER) + (offs_n // PER)[None, :], mask=mask, other=0)
    zero = ((zp >> ((offs_n % PER) * BITS)[None, :]) & MAXQ) + 1
    scale = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    return (level - zero).to(tl.float32) * scale


@triton.jit
def _dequantize_kernel(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, K, N,
                       BITS: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    offs_k = tl.program_id(0) * BK + tl.arange(0, BK)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    w = _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, K, N, BITS)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _matmul_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, bias_ptr, out_ptr, M, K, N,
                   stride_xm, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, K, N, BITS)
        if DOT_F32:  # fp32 input, or the interpreter: exact fp32 products
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:  # fp16/bf16 tensor cores, fp32 accumulation
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def check_packed(qweight, qzeros, scales, g_idx, bits: int) -> tuple[int, int]:
    """(K, N) of a packed GPTQ weight; ValueError naming the argument that does not fit."""
    if bits not in (4, 8):
        raise ValueError(f"bits: expected 4 or 8, found {bits}")
    per = 32 // bits
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight: expected a 2-D int32 tensor, found {qweight.dtype} {tuple(qweight.shape)}")
    K, N = qweight.shape[0] * per, qweight.shape[1]
    if scales.dtype not in FLOATS or scales.dim() != 2 or scales.shape[1] != N:
        raise ValueError(f"scales: expected a float tensor [groups, {N}], found {scales.dtype} {tuple(scales.shape)}")
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (scales.shape[0], N // per) or N % per:
        raise ValueError(f"qzeros: expected int32 [{scales.shape[0]}, {N // per}], found "
                         f"{qzeros.dtype} {tuple(qzeros.shape)}")
    if g_idx.dtype != torch.int32 or tuple(g_idx.shape) != (K,):
        raise ValueError(f"g_idx: expected int32 [{K}], found {g_idx.dtype} {tuple(g_idx.shape)}")
    devices = {t.device for t in (qweight, qzeros, scales, g_idx)}
    if len(devices) != 1:
        raise ValueError(f"qweight, qzeros, scales, g_idx: expected one device, found {sorted(map(str, devices))}")
    return K, N


def check_out(out, shape: tuple[int, int], dtype: torch.dtype, device) -> torch.Tensor:
    """`out` checked against what the call writes, or a new tensor."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {dtype} tensor {list(shape)} on {device}, found "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def dequantize_ref(qweight, qzeros, scales, g_idx, bits: int, dtype: torch.dtype = torch.float16,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense W [K, N] in `dtype` (computed in fp32)."""
    K, N = check_packed(qweight, qzeros, scales, g_idx, bits)
    per, maxq = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(per, device=qweight.device, dtype=torch.int32) * bits
    levels = (qweight.unsqueeze(1) >> shifts.view(1, per, 1)) & maxq  # [K / p, p, N]
    levels = levels.reshape(-1, qweight.shape[1])  # [K, N]
    zeros = ((qzeros.unsqueeze(2) >> shifts.view(1, 1, per)) & maxq).reshape(qzeros.shape[0], -1) + 1  # [G, N]
    g = g_idx.long()
    w = (levels - zeros[g]).float() * scales[g].float()
    return w.to(dtype) if out is None else check_out(out, (K, N), dtype, qweight.device).copy_(w)


def dequantize(qweight, qzeros, scales, g_idx, bits: int, dtype: torch.dtype = torch.float16,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense W [K, N] in `dtype` (fp16, bf16 or fp32): the scratch matrix for the vendor GEMM.
    out: a contiguous [K, N] tensor of `dtype` to reuse, or None."""
    K, N = check_packed(qweight, qzeros, scales, g_idx, bits)
    if dtype not in FLOATS:
        raise ValueError(f"dtype: expected one of {FLOATS}, found {dtype}")
    out = check_out(out, (K, N), dtype, qweight.device)
    BK, BN = 32, 64
    _dequantize_kernel[(triton.cdiv(K, BK), triton.cdiv(N, BN))](
        qweight, qzeros, scales, g_idx, out, K, N, BITS=bits, BK=BK, BN=BN)
    return out


def _check_x(x: torch.Tensor, K: int, bias, N: int, device) -> None:
    if x.dtype not in FLOATS or x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"x: expected a float tensor [M, {K}], found {x.dtype} {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"x: expected device {device}, found {x.device}")
    if bias is not None and (bias.shape != (N,) or bias.dtype not in FLOATS or bias.device != device):
        raise ValueError(f"bias: expected a float tensor [{N}] on {device}, found {bias.dtype} {tuple(bias.shape)}")


def gptq_matmul_ref(x, qweight, qzeros, scales, g_idx, bits: int, bias=None, out=None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W + bias, computed in fp32, returned in x's dtype."""
    K, N = check_packed(qweight, qzeros, scales, g_idx, bits)
    _check_x(x, K, bias, N, qweight.device)
    y = x.float() @ dequantize_ref(qweight, qzeros, scales, g_idx, bits, torch.float32)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype) if out is None else check_out(out, tuple(y.shape), x.dtype, x.device).copy_(y)


def gptq_matmul(x, qweight, qzeros, scales, g_idx, bits: int, bias=None, out=None) -> torch.Tensor:
    """Fused y [M, N] = x [M, K] @ W + bias: W is dequantized tile by tile in registers, never
    written out. For small M (few tokens), where reading the 4-bit weights is the cost.

    x: [M, K] fp16/bf16/fp32, unit stride along K. bias: [N] or None. out: [M, N] in x's dtype,
    contiguous, or None. Returns [M, N] in x's dtype, accumulated in fp32."""
    K, N = check_packed(qweight, qzeros, scales, g_idx, bits)
    _check_x(x, K, bias, N, qweight.device)
    if x.stride(1) != 1:
        x = x.contiguous()
    M = x.shape[0]
    out = check_out(out, (M, N), x.dtype, x.device)
    BM = 16 if M <= 16 else 32 if M <= 32 else 64
    BN, BK = 64, 32
    dot_f32 = x.dtype == torch.float32 or x.device.type == "cpu"
    _matmul_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        x, qweight, qzeros, scales, g_idx, bias if bias is not None else out, out, M, K, N, x.stride(0),
        BITS=bits, HAS_BIAS=bias is not None, DOT_F32=dot_f32, BM=BM, BN=BN, BK=BK)
    return out
