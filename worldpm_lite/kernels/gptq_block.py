"""GPTQ's column loop over one lazy block of `B` (<= 256) columns (Frantar et al. 2022, section 4,
"Lazy Batch-Updates"): `gptq_block_ref` in torch, which quantize/gptq.py runs on the CPU, and
`gptq_block`, the same loop in one Triton launch, which it runs on a GPU and which is tested against
the reference. Imports only torch and triton.

Per column j of the block, in quantization order (col = col0 + j):
  - when a group starts there (col % group_size == 0): its min/max grid from the updated, not yet
    quantized weights of its columns (those past the block come in as `spill`), by `group_grid`'s
    rules: range widened to include 0, symmetric or not, dead rows (lo == hi == 0) -> [-1, 1], scale
    rounded to fp16; written to scales/zeros[col // group_size];
  - q = clamp(round(w / scale) + zero, 0, maxq), err = (w - (q - zero) * scale) / Hinv1[j, j];
  - OBS update of the rest of the block: W1[:, j:] -= err * Hinv1[j, j:]; Err1[:, j] = err.
The deferred update of the later columns, W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:], stays a GEMM
outside.

Rows are independent: each program keeps one tile of BLOCK_M rows x all block columns of W1 in
registers (fp32; the levels and errors go to memory column by column, so no second and third tile
has to live beside it: at B = 256 three [32, 256] tiles need 192 registers a thread for them alone)
and reads the block's Hinv rows once each. Every step is elementwise or a min/max, so the kernel
repeats the torch loop's arithmetic operation for operation: divisions are IEEE round-to-nearest
(`div_rn`, not Triton's approximate `/`), round() is half-to-even, and the launch disables mul+add
fusion into FMAs. On the torch side every division has a tensor on the same device as its divisor:
CUDA torch computes `tensor / python_number` as a multiplication by the reciprocal, which differs from
a division in about 60% of fp32 values (the CPU divides either way). Outputs are then bit-identical
to `gptq_block_ref` on both devices (tested on the CPU in the interpreter; bench/gpu_all.py checks
it on CUDA).

Arguments (both functions):
  W1      [out, B] fp32, unit column stride (a column slice of W works): the block's weights,
          already updated by earlier blocks. Updated in place (OBS), as the loop's W1.
  Hinv1   [B, B] fp32, any strides: the block's diagonal slice of Hinv (upper Cholesky factor of
          H^-1; torch.linalg.cholesky(upper=True) returns it column-major).
  scales, zeros  [groups, out] fp32, contiguous: rows of the groups that start in the block are
          written; the row of the group in force at col0 is read when none starts there.
  col0    the block's first column (quantization order); group_size: columns per group (resolved,
          never -1); maxq: 2^bits - 1; sym: symmetric grid.
  spill   [out, t] fp32: W's columns just past the block that belong to the group of the block's
          last column when that group starts inside the block and ends past it (W[:, i2:i2 + t]),
          else None.
Returns (Q1 [out, B] int32 levels, Err1 [out, B] fp32 scaled errors).

On a CPU tensor the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set before import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = {"cuda": 32, "cpu": 64}  # rows per program; the interpreter pays per operation, not per element
MAX_B = 256  # columns per block: the [BLOCK_M, B] tile lives in registers
LAUNCH_NAME = "triton::gptq_block"  # the profiler event around each launch


@triton.jit
def _gptq_block_kernel(w_ptr, hinv_ptr, scales_ptr, zeros_ptr, spill_lo_ptr, spill_hi_ptr, q_ptr, err_ptr,
                       M, B, col0, size, maxq, stride_w, stride_hr, stride_hc,
                       SYM: tl.constexpr, HAS_SPILL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK)
    in_rows = rows < M
    in_cols = cols < B
    c = cols[None, :]  # [1, BLOCK]
    tile_mask = in_rows[:, None] & in_cols[None, :]
    w_offs = rows.to(tl.int64)[:, None] * stride_w + c
    w = tl.load(w_ptr + w_offs, mask=tile_mask, other=0.0)  # [BLOCK_M, BLOCK]
    out_row = rows.to(tl.int64) * B  # Q1 and Err1 rows; column j is stored when it is done
    if HAS_SPILL:
        spill_lo = tl.load(spill_lo_ptr + rows, mask=in_rows, other=0.0)
        spill_hi = tl.load(spill_hi_ptr + rows, mask=in_rows, other=0.0)
    fmaxq = maxq * 1.0
    g = col0 // size  # the group in force at the block's first column (started in an earlier block)
    scale = tl.load(scales_ptr + g * M + rows, mask=in_rows, other=1.0)  # [BLOCK_M]
    zero = tl.load(zeros_ptr + g * M + rows, mask=in_rows, other=0.0)
    g = tl.cdiv(col0, size)  # the next group to start, at column next_j of the block
    next_j = g * size - col0
    h_ptrs = hinv_ptr + cols * stride_hc  # row j of Hinv1, then the next
    d_ptr = hinv_ptr  # Hinv1[j, j]
    for j in range(B):
        if j == next_j:  # a new group: its grid from the updated, not yet quantized weights
            in_group = (c >= j) & (c < j + size) & in_cols[None, :]
            lo = tl.min(tl.where(in_group, w, float("inf")), axis=1)
            hi = tl.max(tl.where(in_group, w, float("-inf")), axis=1)
            if HAS_SPILL:
                if j + size > B:  # the block's last group: its columns past the block
                    lo = tl.minimum(lo, spill_lo)
                    hi = tl.maximum(hi, spill_hi)
            lo = tl.minimum(lo, 0.0)
            hi = tl.maximum(hi, 0.0)
            if SYM:
                hi = tl.maximum(tl.abs(lo), hi)
                lo = -hi
            dead = (lo == 0.0) & (hi == 0.0)
            lo = tl.where(dead, -1.0, lo)
            hi = tl.where(dead, 1.0, hi)
            scale = tl.math.div_rn(hi - lo, tl.broadcast_to(fmaxq, (BLOCK_M,))).to(tl.float16).to(tl.float32)
            if SYM:
                zero = tl.broadcast_to((fmaxq + 1.0) * 0.5, (BLOCK_M,))
            else:  # round(-lo / scale) >= 0, half to even: below 2^23, z + 2^23 rounds z to an integer
                z = tl.math.div_rn(-lo, scale)
                zero = tl.where(z < 8388608.0, z + 8388608.0 - 8388608.0, z)
            tl.store(scales_ptr + g * M + rows, scale, mask=in_rows)
            tl.store(zeros_ptr + g * M + rows, zero, mask=in_rows)
            g += 1
            next_j += size
        at_j = c == j
        # column j, exactly; tl.max's own reduction, called without tl.max, a device function that costs
        # Triton's interpreter a third of this kernel's time per call
        x = tl.reduce(tl.where(at_j, w, float("-inf")), 1, tl.standard._elementwise_max)
        # clamp(round(x / scale) + zero, 0, maxq) with torch.round's half-to-even (libdevice.rint has no
        # interpreter version): past +-2^22 the level saturates anyway, and within, y + 1.5 * 2^23 lands
        # in [2^23, 2^24], where fp32 rounds to an integer, to even on a tie.
        y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -4194304.0), 4194304.0)
        q = tl.minimum(tl.maximum(y + 12582912.0 - 12582912.0 + zero, 0.0), fmaxq)
        h = tl.load(h_ptrs, mask=in_cols, other=0.0)  # Hinv1[j, :]
        d = tl.load(d_ptr)
        err = tl.math.div_rn(x - (q - zero) * scale, tl.broadcast_to(d, (BLOCK_M,)))
        w = tl.where(c >= j, w - err[:, None] * h[None, :], w)  # OBS update of the rest of the block
        tl.store(q_ptr + out_row + j, q.to(tl.int32), mask=in_rows)
        tl.store(err_ptr + out_row + j, err, mask=in_rows)
        h_ptrs += stride_hr
        d_ptr += stride_hr + stride_hc
    tl.store(w_ptr + w_offs, w, mask=tile_mask)


def group_grid(w: torch.Tensor, maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min/max grid for w [rows, cols] -> (scale [rows, 1] fp32, zero [rows, 1] fp32 integral):
    the range widened to include 0, symmetric (zero in the middle) or not, a dead row (all 0) given
    [-1, 1]. The scale is rounded to fp16 now: the checkpoint stores fp16 scales, so quantization uses
    exactly the grid that will be dequantized later."""
    w = w.float()
    lo = torch.minimum(w.min(dim=1, keepdim=True).values, torch.zeros(1, device=w.device))
    hi = torch.maximum(w.max(dim=1, keepdim=True).values, torch.zeros(1, device=w.device))
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    dead = (lo == 0) & (hi == 0)
    lo, hi = torch.where(dead, -1.0, lo), torch.where(dead, 1.0, hi)
    scale = ((hi - lo) / torch.full_like(hi, maxq)).half().float()  # a true division on CUDA too
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale)
    return scale, zero


def spill_width(col0: int, B: int, group_size: int) -> int:
    """Columns past a block of B columns at col0 that belong to the group of its last column, when that
    group starts inside the block (the grid of a group is set where it starts); else 0."""
    start = (col0 + B - 1) // group_size * group_size
    return max(0, start + group_size - (col0 + B)) if start >= col0 else 0


def _check(W1, Hinv1, scales, zeros, col0: int, group_size: int, maxq: int, spill) -> tuple[int, int, int]:
    """(out, B, t): rows, block columns and the spill's width the call needs; ValueError naming the argument."""
    if W1.dtype != torch.float32 or W1.dim() != 2 or W1.stride(1) != 1:
        raise ValueError(f"W1: expected a 2-D fp32 tensor with unit column stride, found {W1.dtype} "
                         f"{tuple(W1.shape)} strides {W1.stride()}")
    M, B = W1.shape
    if not 1 <= B <= MAX_B:
        raise ValueError(f"W1: expected 1 to {MAX_B} columns, found {B}")
    if Hinv1.dtype != torch.float32 or tuple(Hinv1.shape) != (B, B):
        raise ValueError(f"Hinv1: expected fp32 [{B}, {B}], found {Hinv1.dtype} {tuple(Hinv1.shape)}")
    if group_size < 1 or col0 < 0:
        raise ValueError(f"group_size, col0: expected >= 1 and >= 0, found {group_size}, {col0}")
    if not 1 <= maxq <= 255:
        raise ValueError(f"maxq: expected 1 to 255, found {maxq}")
    last = (col0 + B - 1) // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != M or t.shape[0] <= last or not t.is_contiguous():
            raise ValueError(f"{name}: expected contiguous fp32 [groups > {last}, {M}], found {t.dtype} "
                             f"{tuple(t.shape)}")
    width = spill_width(col0, B, group_size)
    if width and (spill is None or spill.dtype != torch.float32 or tuple(spill.shape) != (M, width)):
        found = None if spill is None else f"{spill.dtype} {tuple(spill.shape)}"
        raise ValueError(f"spill: expected fp32 [{M}, {width}] (the last group's columns past the block), "
                         f"found {found}")
    if not width and spill is not None and spill.numel():
        raise ValueError(f"spill: expected None (no group of this block ends past it), found {tuple(spill.shape)}")
    devices = {t.device for t in (W1, Hinv1, scales, zeros) + ((spill,) if width else ())}
    if len(devices) != 1:
        raise ValueError(f"W1, Hinv1, scales, zeros, spill: expected one device, found {sorted(map(str, devices))}")
    return M, B, width


def gptq_block_ref(W1, Hinv1, scales, zeros, col0: int, group_size: int, maxq: int, sym: bool,
                   spill=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The column loop of one block in torch: (Q1 [out, B] int32, Err1 [out, B] fp32); W1, scales, zeros
    updated in place. What quantize/gptq.py runs on the CPU."""
    M, B, _ = _check(W1, Hinv1, scales, zeros, col0, group_size, maxq, spill)
    size = group_size
    Q1 = torch.zeros(M, B, dtype=torch.int32, device=W1.device)
    Err1 = torch.zeros(M, B, device=W1.device)
    g = col0 // size
    scale, zero = scales[g].unsqueeze(1).clone(), zeros[g].unsqueeze(1).clone()  # [out, 1]
    for j in range(B):
        col = col0 + j
        if col % size == 0:  # a new group: its grid from the updated, not yet quantized weights
            group_w = W1[:, j:j + size] if j + size <= B else torch.cat([W1[:, j:], spill], dim=1)
            scale, zero = group_grid(group_w, maxq, sym)
            scales[col // size], zeros[col // size] = scale[:, 0], zero[:, 0]
        wcol = W1[:, j]
        q = torch.clamp(torch.round(wcol.unsqueeze(1) / scale) + zero, 0, maxq).to(torch.int32)
        Q1[:, j] = q[:, 0]
        err = (wcol - ((q.float() - zero) * scale)[:, 0]) / Hinv1[j, j]
        W1[:, j:] -= err.unsqueeze(1) * Hinv1[j, j:].unsqueeze(0)  # OBS update of the rest of the block
        Err1[:, j] = err
    return Q1, Err1


def gptq_block(W1, Hinv1, scales, zeros, col0: int, group_size: int, maxq: int, sym: bool,
               spill=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The column loop of one block in one launch (plus a min/max over `spill` when there is one):
    (Q1 [out, B] int32, Err1 [out, B] fp32); W1, scales, zeros updated in place, bit-identical to
    gptq_block_ref."""
    M, B, width = _check(W1, Hinv1, scales, zeros, col0, group_size, maxq, spill)
    Q1 = torch.empty(M, B, dtype=torch.int32, device=W1.device)
    Err1 = torch.empty(M, B, device=W1.device)
    spill_lo, spill_hi = spill.aminmax(dim=1) if width else (Err1, Err1)  # columns the block does not change
    block_m = BLOCK_M.get(W1.device.type, 32)
    with torch.profiler.record_function(LAUNCH_NAME):  # a profile counts the launch (bench/quantize_layer_cost.py)
        _gptq_block_kernel[(triton.cdiv(M, block_m),)](
            W1, Hinv1, scales, zeros, spill_lo, spill_hi, Q1, Err1, M, B, col0, group_size, maxq,
            W1.stride(0), Hinv1.stride(0), Hinv1.stride(1), SYM=sym, HAS_SPILL=width > 0, BLOCK_M=block_m,
            BLOCK=max(16, triton.next_power_of_2(B)), enable_fp_fusion=False)
    return Q1, Err1
