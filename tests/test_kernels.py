"""Each Triton kernel against its torch reference on fresh random inputs (TRITON_INTERPRET=1 on CPU)."""

import pytest
import torch

from worldpm_lite.kernels.dequant import dequantize, dequantize_ref, gptq_matmul, gptq_matmul_ref
from worldpm_lite.kernels.tail import fused_tail, fused_tail_ref
from worldpm_lite.quantize.gptq_format import dequantize_packed, pack

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def packed_weight(K, N, bits, group, act_order, seed):
    """Random GPTQ tensors for a K -> N linear, zero points anywhere in [0, maxq] (v1 stores zero 0 as -1)."""
    gen = torch.Generator().manual_seed(seed)
    maxq, groups = (1 << bits) - 1, 1 if group == -1 else K // group
    q = torch.randint(0, maxq + 1, (N, K), generator=gen)
    scales = torch.rand(groups, N, generator=gen) * 0.02 + 0.001
    zeros = torch.randint(0, maxq + 1, (groups, N), generator=gen)
    g_idx = torch.arange(K) // (K if group == -1 else group)
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    t = pack(q, scales, zeros, g_idx, bits)
    return [t[k].to(DEVICE) for k in ("qweight", "qzeros", "scales", "g_idx")]


SHAPES = [(32, 8, 32), (40, 24, 8), (96, 72, 32), (136, 16, -1), (160, 136, 32)]  # K, N, group; tile edges


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("K,N,group", SHAPES)
@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_matches_reference(bits, K, N, group, act_order):
    if group != -1 and K % group or K % (32 // bits) or N % (32 // bits):
        pytest.skip("not a packable shape")
    w = packed_weight(K, N, bits, group, act_order, seed=K * N + bits)
    want = dequantize_packed(*[t.cpu() for t in w], bits=bits).T  # [K, N], the quantizer's own definition
    assert torch.equal(dequantize_ref(*w, bits, torch.float32).cpu(), want)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = torch.full((K, N), float("nan"), dtype=dtype, device=DEVICE)
        got = dequantize(*w, bits, dtype, out=out)
        assert got.data_ptr() == out.data_ptr()
        want = dequantize_ref(*w, bits, dtype)
        if dtype == torch.bfloat16 and DEVICE == "cpu":  # the interpreter truncates to bf16: one ulp
            torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
        else:
            assert torch.equal(got, want)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 2, 3, 17, 65])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gptq_matmul_matches_reference(bits, M, dtype):
    K, N = 160, 72  # K spans five BK=32 tiles, N two BN=64 tiles (the second partly masked)
    w = packed_weight(K, N, bits, 32, act_order=M % 2 == 1, seed=M + bits)
    gen = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=gen).to(device=DEVICE, dtype=dtype)
    bias = torch.randn(N, generator=gen).to(device=DEVICE, dtype=dtype)
    for b in (None, bias):
        out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
        got = gptq_matmul(x, *w, bits, bias=b, out=out).float()
        want = gptq_matmul_ref(x, *w, bits, bias=b).float()
        assert not got.isnan().any()
        # relative to the largest output: the output dtype's rounding (on a GPU also that of the
        # fp16/bf16 tensor-core inputs)
        tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        assert (got - want).abs().max() <= tol * want.abs().max()


def test_gptq_matmul_reads_strided_rows():
    w = packed_weight(64, 16, 4, 32, False, seed=5)
    x = torch.randn(6, 128, device=DEVICE)[:, :64]  # row stride 128
    torch.testing.assert_close(gptq_matmul(x, *w, 4), gptq_matmul_ref(x, *w, 4), rtol=1e-4, atol=1e-4)


def head(h, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    norm, w0 = torch.rand(h, generator=gen) + 0.5, torch.randn(h, h, generator=gen) / h**0.5
    b0 = torch.randn(h, generator=gen)
    w2, b2 = torch.randn(1, h, generator=gen) / h**0.5, torch.randn(1, generator=gen)
    return [norm.to(DEVICE, dtype), 1e-6, *(t.to(DEVICE, dtype) for t in (w0, b0, w2, b2))]


DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# h off the 64/128 tiles; 129 and 520 split the inputs (2 and 5 ways). Every (B, h) in every dtype, except
# the widest h, whose cases cost the interpreter 1-9 s each: there each B runs in one dtype, all three in turn.
TAIL_CASES = [(B, h, dtype) for B in (1, 2, 3, 16, 17, 65, 130) for h in (40, 129) for dtype in DTYPES] + [
    (B, 520, DTYPES[k % 3]) for k, B in enumerate((1, 2, 3, 16, 17, 65, 130))]


@pytest.mark.parametrize("B, h, dtype", TAIL_CASES)
def test_fused_tail_matches_reference(B, h, dtype):
    gen = torch.Generator().manual_seed(B * h)
    T = 5
    hidden = (torch.randn(B, T, h, generator=gen) * 3).to(DEVICE, dtype)
    index = torch.randint(0, T, (B,), generator=gen)
    params = head(h, seed=B + h, dtype=dtype if dtype != torch.float32 else torch.bfloat16)
    want = fused_tail_ref(hidden, index, *params)
    out = torch.full((B,), float("nan"), device=DEVICE)
    got = fused_tail(hidden, index, *params, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the same rows as a packed [R, h] layout
    packed = hidden.reshape(B * T, h)
    torch.testing.assert_close(fused_tail(packed, torch.arange(B) * T + index, *params), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tail_split_halves_scheme_is_within_1e_5_of_fp32(dtype):
    """What the GPU kernel does with a 16-bit head (the interpreter cannot run 16-bit dots): the
    normalized rows as hi + lo halves in the weights' dtype times the exact stored weights, fp32
    sums. Products of two 16-bit floats are exact in fp32, as on the tensor cores."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 2048, generator=gen) * 3
    w = (torch.randn(512, 2048, generator=gen) / 2048**0.5).to(dtype)
    hi = x.to(dtype)
    lo = (x - hi.float()).to(dtype)
    got = hi.float() @ w.float().T + lo.float() @ w.float().T
    want = x.double() @ w.double().T
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    one_half = x.to(dtype).float() @ w.float().T  # plain 16-bit inputs would not be
    assert (one_half.double() - want).abs().max() > 1e-4 * want.abs().max()


def test_tail_grid_fills_a_large_gpu():
    from worldpm_lite.kernels.tail import BN, tail_grid

    for B in (1, 16, 64):
        BB, BK, splits, k_per = tail_grid(B, 8192, on_gpu=True)
        assert 256 <= (8192 // BN) * splits <= 1024 and splits * k_per >= 8192 > (splits - 1) * k_per


def test_fused_tail_ignores_every_other_row():
    hidden = torch.randn(3, 6, 40, device=DEVICE)
    index = torch.tensor([5, 0, 2])
    params = head(40, seed=1)
    before = fused_tail(hidden, index, *params)
    noisy = torch.randn_like(hidden) * 100
    noisy[torch.arange(3), index] = hidden[torch.arange(3), index]
    assert torch.equal(fused_tail(noisy, index, *params), before)


def test_bad_inputs_are_value_errors():
    w = packed_weight(64, 16, 4, 32, False, seed=1)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="x: expected"):
        gptq_matmul(torch.randn(2, 63, device=DEVICE), *w, 4)
    with pytest.raises(ValueError, match="x: expected"):
        gptq_matmul(x.to(torch.int32), *w, 4)
    with pytest.raises(ValueError, match="bits"):
        gptq_matmul(x, *w, 3)
    with pytest.raises(ValueError, match="qweight"):
        dequantize(w[0].float(), *w[1:], 4)
    with pytest.raises(ValueError, match="g_idx"):
        dequantize(*w[:3], w[3][:-1], 4)
    with pytest.raises(ValueError, match="bias"):
        gptq_matmul(x, *w, 4, bias=torch.zeros(15, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        gptq_matmul(x, *w, 4, out=torch.empty(2, 15, device=DEVICE))
    params = head(40, seed=1)
    hidden = torch.randn(2, 4, 40, device=DEVICE)
    with pytest.raises(ValueError, match="index: expected positions"):
        fused_tail(hidden, torch.tensor([0, 4]), *params)
    with pytest.raises(ValueError, match="index: expected 2 positions"):
        fused_tail(hidden, torch.tensor([0]), *params)
    with pytest.raises(ValueError, match="index: expected a 1-D integer"):
        fused_tail(hidden, torch.tensor([0.0, 1.0]), *params)
    with pytest.raises(ValueError, match="w0"):
        fused_tail(hidden, torch.tensor([0, 1]), params[0], params[1], params[2][:, :39], *params[3:])
    with pytest.raises(ValueError, match="hidden"):
        fused_tail(hidden.to(torch.int64), torch.tensor([0, 1]), *params)
