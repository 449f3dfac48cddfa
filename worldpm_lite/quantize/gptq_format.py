"""Packing to and from the standard GPTQ checkpoint layout ("gptq" format, v1 zeros).

Per quantized linear with in -> out features and bits b (32 / b values per int32, lowest bits first):
  qweight int32 [in * b / 32, out]   levels packed along the input dimension
  qzeros  int32 [n_groups, out * b / 32]   zero points minus one (the v1 convention), packed along out
  scales  fp16  [n_groups, out]
  g_idx   int32 [in]   group of each input column
"""

from __future__ import annotations

import torch


def _pack_rows(v: torch.Tensor, bits: int) -> torch.Tensor:
    """v [n, m] ints in [0, 2^bits) -> [n * bits / 32, m] int32, value k of a word in bits k*b.."""
    per = 32 // bits
    if v.shape[0] % per:
        raise ValueError(f"dimension {v.shape[0]} is not a multiple of {per} ({bits}-bit packing)")
    v = v.to(torch.int64).reshape(v.shape[0] // per, per, v.shape[1])
    shifts = (torch.arange(per, device=v.device) * bits).view(1, per, 1)
    words = (v << shifts).sum(dim=1)  # [n / per, m], < 2^32
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret as signed int32


def _unpack_rows(p: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    shifts = (torch.arange(per, device=p.device) * bits).view(1, per, 1)
    v = (p.to(torch.int64).unsqueeze(1) >> shifts) & ((1 << bits) - 1)  # [n / per, per, m]
    return v.reshape(p.shape[0] * per, p.shape[1]).to(torch.int32)


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
         bits: int) -> dict[str, torch.Tensor]:
    """q [out, in] levels, scales/zeros [n_groups, out], g_idx [in] -> GPTQ tensors."""
    if bits not in (4, 8):
        raise ValueError(f"bits: expected 4 or 8, found {bits}")
    return {
        "qweight": _pack_rows(q.T.contiguous(), bits),
        "qzeros": _pack_rows((zeros.to(torch.int64) - 1).T.contiguous() & ((1 << bits) - 1), bits).T.contiguous(),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ qweight/qzeros -> (q [out, in] levels, zeros [n_groups, out]) with the v1 +1 undone."""
    q = _unpack_rows(qweight, bits).T.contiguous()
    zeros = _unpack_rows(qzeros.T.contiguous(), bits).T + 1
    return q, zeros.contiguous()


def dequantize_packed(qweight, qzeros, scales, g_idx, bits: int) -> torch.Tensor:
    """The fp32 weight [out, in] a GPTQ module holds (the reference every kernel is checked against)."""
    q, zeros = unpack(qweight, qzeros, bits)
    g = g_idx.long()
    return (q.float() - zeros[g].T.float()) * scales[g].T.float()
