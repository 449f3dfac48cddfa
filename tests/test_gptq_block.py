"""GPTQ's lazy block as one Triton launch (kernels/gptq_block.py) against its torch reference and
against gptq()'s own column loop, on fresh random weights and Hessians at tile edges. The kernel
repeats the loop's arithmetic operation for operation, so every comparison is exact.

Shapes stay small: in Triton's interpreter (the CPU) one column of one row tile costs ~1-2 ms."""

import pytest
import torch

from worldpm_lite.kernels.gptq_block import gptq_block, gptq_block_ref
from worldpm_lite.options import QuantConfig
from worldpm_lite.quantize.gptq import gptq, gptq_shared, hessian_add, hessian_init, rtn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(rows: int, n: int, seed: int) -> torch.Tensor:
    """Correlated calibration inputs X [rows, n] with uneven column importance (what GPTQ exploits)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n ** 0.5
    return (torch.randn(rows, n, generator=g) @ mix) * (torch.rand(n, generator=g) * 3 + 0.1)


def hinv_of(x: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Hinv as gptq() builds it: upper Cholesky factor of (2 X^T X / rows + damping)^-1 (column-major)."""
    h = hessian_init(x.shape[1])
    H = h / hessian_add(h, x)
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def spill_of(W: torch.Tensor, i1: int, i2: int, size: int):
    """The columns past the block of the group of its last column, when that group starts inside the block."""
    start = (i2 - 1) // size * size
    return W[:, i2:start + size] if i1 <= start and start + size > i2 else None


# out, in, block [i1, i2), group size, sym, bits: rows 72 = 64 + 8 and 40 (partial row tiles on the CPU,
# 64 rows per program; 32 on a GPU), blocks of 128, 96, 32 and 8 columns (padded to 128, 128, 32, 16)
BLOCKS = [
    (72, 136, 0, 128, 136, True, 4),  # per-channel: the group starts at column 0 and ends 8 columns past
    (72, 136, 128, 136, 136, False, 8),  # the same group carried into a partial block: its grid comes in
    (40, 160, 128, 160, 32, False, 3),  # the last block of 160 columns, one group inside it
    (40, 96, 0, 96, 32, True, 2),  # one partial block, three groups
    (40, 192, 0, 128, 96, False, 4),  # a group starting inside the block (column 96) and ending past it
]


@pytest.mark.parametrize("out, n, i1, i2, size, sym, bits", BLOCKS)
def test_block_matches_reference(out, n, i1, i2, size, sym, bits):
    maxq = (1 << bits) - 1
    g = torch.Generator().manual_seed(out + n + i1 + bits)
    Hinv = hinv_of(inputs(256, n, seed=n + bits)).to(DEVICE)
    W = (torch.randn(out, n, generator=g) * 0.5).to(DEVICE)
    groups = n // size
    scales = (torch.rand(groups, out, generator=g) * 0.2 + 0.05).half().float().to(DEVICE)  # earlier groups' grids
    zeros = (torch.full((groups, out), (maxq + 1) / 2) if sym else
             torch.randint(0, maxq + 1, (groups, out), generator=g).float()).to(DEVICE)
    spill = spill_of(W, i1, i2, size)
    got_w, want_w = W[:, i1:i2].clone(), W[:, i1:i2].clone()
    got_s, want_s, got_z, want_z = scales.clone(), scales.clone(), zeros.clone(), zeros.clone()
    got_q, got_e = gptq_block(got_w, Hinv[i1:i2, i1:i2], got_s, got_z, i1, size, maxq, sym, spill)
    want_q, want_e = gptq_block_ref(want_w, Hinv[i1:i2, i1:i2], want_s, want_z, i1, size, maxq, sym, spill)
    assert want_q.min() >= 0 and want_q.max() <= maxq and (want_e != 0).any()
    assert torch.equal(got_q, want_q)
    assert torch.equal(got_e, want_e)
    assert torch.equal(got_w, want_w)  # the OBS-updated block
    assert torch.equal(got_s, want_s) and torch.equal(got_z, want_z)
    started = [c // size for c in range(i1, i2) if c % size == 0]  # groups whose grid the block computes
    if started:
        assert not torch.equal(got_s[started], scales[started])
    else:
        assert torch.equal(got_s, scales)


def test_block_rounds_half_to_even():
    """Levels on exact ties (w / scale = k + 1/2) round to even as torch.round does; far outside the grid
    they saturate. A carried group (scale 0.25, zero 128) and Hinv1 = I keep every ratio exact."""
    ties = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 126.5, -127.5, 4194304.5, 3e38, -3e38, 0.0, -0.0,
                         0.49999997, 1e-45])
    W1 = torch.stack([ties * 0.25, -ties * 0.25]).to(DEVICE)  # [2, 16]
    scales, zeros = torch.full((1, 2), 0.25, device=DEVICE), torch.full((1, 2), 128.0, device=DEVICE)
    Hinv1 = torch.eye(16, device=DEVICE)
    got = gptq_block(W1.clone(), Hinv1, scales.clone(), zeros.clone(), 16, 32, 255, True)
    want = gptq_block_ref(W1.clone(), Hinv1, scales.clone(), zeros.clone(), 16, 32, 255, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0][0, :9].tolist() == [126, 126, 128, 128, 130, 130, 132, 254, 0]


def check_same(a, b):
    assert torch.equal(a.q, b.q)
    assert torch.equal(a.scales, b.scales)
    assert torch.equal(a.zeros, b.zeros)
    assert torch.equal(a.g_idx, b.g_idx)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [-1, 32, 64, 128])
@pytest.mark.parametrize("act", [False, True])
def test_gptq_kernel_equals_loop(act, group, sym, bits):
    """gptq(kernel=True) == gptq(kernel=False) bit for bit. Blocks of 48 columns over 64 (128) inputs:
    a partial last block, groups ending past their block (a spill) and groups carried into the next."""
    n = 128 if group == 128 else 64
    x = inputs(256, n, seed=n + bits)
    h = hessian_init(n)
    rows = hessian_add(h, x)
    w = torch.randn(40, n, generator=torch.Generator().manual_seed(group + 2 * sym + bits + act))
    w, h = w.to(DEVICE), h.to(DEVICE)
    cfg = QuantConfig(bits=bits, group_size=group, sym=sym, act_order=act, block_size=48)
    check_same(gptq(w, h, rows, cfg, kernel=True), gptq(w, h, rows, cfg, kernel=False))


@pytest.mark.parametrize("out, n, group, act, sym, bits", [(72, 136, -1, True, False, 4), (40, 160, 32, False, True, 3),
                                                           (40, 192, 96, True, False, 2)])
def test_gptq_kernel_equals_loop_default_blocks(out, n, group, act, sym, bits):
    """The same at the default 128-column blocks, inputs not a multiple of them, and 3 and 2 bits."""
    x = inputs(256, n, seed=n)
    h = hessian_init(n)
    rows = hessian_add(h, x)
    w = torch.randn(out, n, generator=torch.Generator().manual_seed(n)).to(DEVICE)
    cfg = QuantConfig(bits=bits, group_size=group, sym=sym, act_order=act)
    check_same(gptq(w, h.to(DEVICE), rows, cfg, kernel=True), gptq(w, h.to(DEVICE), rows, cfg, kernel=False))


def test_kernel_obs_update_beats_rtn():
    """One 128-column block, so no deferred update: without the kernel's own OBS update each column
    would be rounded on its own, which is RTN, error ratio 1."""
    x = inputs(1024, 128, seed=7)
    h = hessian_init(128)
    rows = hessian_add(h, x)
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(8))
    cfg = QuantConfig(bits=4, group_size=128)
    qk = gptq(w.to(DEVICE), h.to(DEVICE), rows, cfg, kernel=True)
    e_kernel = ((x @ w.T - x @ qk.dequantize().cpu().T) ** 2).mean()
    e_rtn = ((x @ w.T - x @ rtn(w, cfg).dequantize().T) ** 2).mean()
    assert e_kernel < 0.8 * e_rtn, (e_kernel, e_rtn)


def test_bad_arguments():
    W1, Hinv1 = torch.randn(8, 32), torch.eye(32)
    scales, zeros = torch.ones(1, 8), torch.zeros(1, 8)
    with pytest.raises(ValueError, match="W1"):
        gptq_block(W1.half(), Hinv1, scales, zeros, 0, 32, 15, True)
    with pytest.raises(ValueError, match="Hinv1"):
        gptq_block(W1, torch.eye(16), scales, zeros, 0, 32, 15, True)
    with pytest.raises(ValueError, match="scales"):
        gptq_block(W1, Hinv1, torch.ones(1, 4), zeros, 0, 32, 15, True)
    with pytest.raises(ValueError, match="spill"):  # a 64-column group starting here needs its other 32 columns
        gptq_block(W1, Hinv1, scales, zeros, 0, 64, 15, True)
    with pytest.raises(ValueError, match="spill"):
        gptq_block(W1, Hinv1, scales, zeros, 0, 64, 15, True, spill=torch.randn(8, 16))
    with pytest.raises(ValueError, match="W1"):
        gptq_block(torch.randn(8, 300), torch.eye(300), scales, zeros, 0, 300, 15, True)


class ScalarDivisions(torch.overrides.TorchFunctionMode):
    """Records each division whose divisor is a Python number: CUDA torch computes tensor / number as a
    multiplication by the reciprocal (the CPU divides), which differs from the kernel's div_rn."""

    DIVISIONS = {torch.Tensor.__truediv__, torch.Tensor.__itruediv__, torch.Tensor.div, torch.Tensor.div_, torch.div,
                 torch.true_divide}

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.DIVISIONS and len(args) > 1 and isinstance(args[1], (int, float)):
            self.found.append(args[1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sym", [True, False])
def test_the_torch_loop_divides_as_the_kernel_does_on_cuda_too(sym):
    """The reference loop (what the CPU runs, what the kernel is checked against) never divides by a
    Python number, so on CUDA it rounds every quotient as the kernel's div_rn does."""
    W1, Hinv1 = torch.randn(8, 64), hinv_of(inputs(256, 64, seed=3))
    scales, zeros = torch.ones(2, 8), torch.zeros(2, 8)
    with ScalarDivisions() as mode:
        gptq_block_ref(W1, Hinv1, scales, zeros, 0, 32, 15, sym)
    assert mode.found == []
    with ScalarDivisions() as mode:  # the mode sees such a division
        _ = W1 / 15
    assert mode.found == [15]


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("act, group, sym", [(False, 32, True), (True, 64, False), (True, -1, True)])
def test_linears_sharing_an_input_quantize_as_one_problem_exactly_as_alone(kernel, act, group, sym):
    """q, k and v (rows of three sizes) stacked under their one Hessian: one factorization, one column
    loop per block, and each linear's levels, scales and zeros exactly what gptq() gives it alone."""
    x = inputs(256, 128, seed=11)
    h = hessian_init(128)
    rows = hessian_add(h, x)
    g = torch.Generator().manual_seed(12)
    ws = [torch.randn(out, 128, generator=g).to(DEVICE) for out in (48, 16, 24)]
    cfg = QuantConfig(bits=4, group_size=group, sym=sym, act_order=act, block_size=48)
    together = gptq_shared(ws, h.to(DEVICE), rows, cfg, ["q", "k", "v"], kernel=kernel)
    for w, q in zip(ws, together):
        check_same(q, gptq(w, h.to(DEVICE), rows, cfg, kernel=kernel))
