import pytest
import torch

from worldpm_lite.options import QuantConfig
from worldpm_lite.quantize.gptq import (
    Clock,
    dequantize,
    find_params,
    gptq,
    hessian_add,
    hessian_init,
    quantize,
    rtn,
)
from worldpm_lite.quantize.gptq_format import dequantize_packed, pack, unpack


def correlated_inputs(rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n ** 0.5
    scale = torch.rand(n, generator=g) * 3 + 0.1  # uneven column importance: what GPTQ exploits
    return (torch.randn(rows, n, generator=g) @ mix) * scale


def layer_error(w, w_hat, x):
    return ((x @ w.T - x @ w_hat.T) ** 2).mean().item()


def test_hessian_incremental_equals_one_shot():
    x = correlated_inputs(300, 64, 0)
    h_inc, rows = hessian_init(64), 0
    for chunk in (x[:7], x[7:100].reshape(3, 31, 64), x[100:]):
        rows += hessian_add(h_inc, chunk)
    h_one = hessian_init(64)
    assert hessian_add(h_one, x) == rows == 300
    torch.testing.assert_close(h_inc, h_one, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h_one / rows, 2 * x.T @ x / 300, rtol=1e-5, atol=1e-5)


def test_quantize_dequantize_mirror():
    for seed in range(20):
        w = torch.randn(16, 64, generator=torch.Generator().manual_seed(seed))
        for sym in (True, False):
            cfg = QuantConfig(bits=4, sym=sym)
            scale, zero = find_params(w, cfg)
            q = quantize(w, scale, zero, cfg.maxq)
            assert q.min() >= 0 and q.max() <= 15
            # half a step, plus what rounding the scale to fp16 (2^-11 relative) costs at the 7.5-step edge
            assert ((dequantize(q, scale, zero) - w).abs() <= scale / 2 * (1 + 16 * 2**-11) + 1e-6).all()
        assert torch.equal(quantize(dequantize(q, scale, zero), scale, zero, cfg.maxq), q)


@pytest.mark.parametrize("bits, group, sym, act", [(4, 128, True, False), (4, 64, False, True),
                                                  (8, 128, True, True), (4, -1, True, False)])
def test_gptq_beats_rtn(bits, group, sym, act):
    torch.manual_seed(1)
    w = torch.randn(96, 256)
    x = correlated_inputs(2048, 256, 2)
    h, rows = hessian_init(256), 0
    rows += hessian_add(h, x)
    cfg = QuantConfig(bits=bits, group_size=group, sym=sym, act_order=act)
    qg, qr = gptq(w, h, rows, cfg), rtn(w, cfg)
    e_gptq, e_rtn = layer_error(w, qg.dequantize(), x), layer_error(w, qr.dequantize(), x)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    assert qg.q.min() >= 0 and qg.q.max() <= cfg.maxq
    if act:
        assert not torch.equal(qg.g_idx, torch.sort(qg.g_idx).values)  # act-order really permutes groups
    sizes = torch.bincount(qg.g_idx.long())
    assert torch.all(sizes == (256 if group == -1 else group))


def test_eight_bit_error_far_below_four_bit():
    torch.manual_seed(3)
    w, x = torch.randn(64, 128), correlated_inputs(1024, 128, 4)
    h = hessian_init(128)
    rows = hessian_add(h, x)
    e4 = layer_error(w, gptq(w, h, rows, QuantConfig(bits=4)).dequantize(), x)
    e8 = layer_error(w, gptq(w, h, rows, QuantConfig(bits=8)).dequantize(), x)
    assert e8 < e4 / 50


def test_a_clock_charges_each_phase_and_changes_nothing():
    x, w = correlated_inputs(400, 256, 5), torch.randn(48, 256, generator=torch.Generator().manual_seed(6))
    h = hessian_init(256)
    rows = hessian_add(h, x)
    times = {}
    timed, plain = gptq(w, h, rows, QuantConfig(), clock=Clock(times)), gptq(w, h, rows, QuantConfig())
    assert timed.q.equal(plain.q) and timed.scales.equal(plain.scales)
    assert set(times) == {"factor", "column_loop", "deferred_gemm"} and all(t > 0 for t in times.values())
    Clock().lap("factor")  # without a dict: nothing to charge, nothing waited for


def test_fallback_to_rtn_names_the_layer():
    w = torch.randn(32, 128)
    h = torch.full((128, 128), float("nan"))
    with pytest.warns(UserWarning, match="model.layers.3.mlp.up_proj"):
        q = gptq(w, h, 10, QuantConfig(), name="model.layers.3.mlp.up_proj")
    torch.testing.assert_close(q.dequantize(), rtn(w, QuantConfig()).dequantize())


def test_bad_config():
    for kwargs, field in [({"bits": 5}, "bits"), ({"group_size": 100}, "group_size"), ({"damp": 0}, "damp")]:
        with pytest.raises(ValueError, match=field):
            QuantConfig(**kwargs)
    with pytest.raises(ValueError, match="multiple of group_size"):
        rtn(torch.randn(4, 96), QuantConfig(group_size=64))
    from worldpm_lite.options import QuantizeSettings

    with pytest.raises(ValueError, match="4 or 8"):  # 3 bits is for the negative controls only: no checkpoint format
        QuantizeSettings(bits=3)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_pack_round_trip_exact(bits, act, sym):
    """On-grid weights survive quantize -> pack -> unpack -> dequantize bit for bit."""
    g = torch.Generator().manual_seed(bits + 2 * act + 4 * sym)
    out, n, size = 64, 256, 64
    cfg = QuantConfig(bits=bits, group_size=size, sym=sym, act_order=act)
    q = torch.randint(0, cfg.maxq + 1, (out, n), generator=g, dtype=torch.int32)
    groups = n // size
    scales = (torch.rand(groups, out, generator=g) + 0.01).half().float()  # representable in fp16
    zeros = (torch.full((groups, out), (cfg.maxq + 1) // 2, dtype=torch.int32) if sym else
             torch.randint(1, cfg.maxq + 1, (groups, out), generator=g, dtype=torch.int32))
    g_idx = torch.arange(n, dtype=torch.int32) // size
    if act:
        g_idx = g_idx[torch.randperm(n, generator=g)]
    t = pack(q, scales, zeros, g_idx, bits)
    assert t["qweight"].shape == (n * bits // 32, out) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (groups, out * bits // 32) and t["qzeros"].dtype == torch.int32
    assert t["scales"].dtype == torch.float16 and t["g_idx"].dtype == torch.int32
    q2, z2 = unpack(t["qweight"], t["qzeros"], bits)
    assert torch.equal(q2, q) and torch.equal(z2, zeros)
    w = (q.float() - zeros[g_idx.long()].T.float()) * scales[g_idx.long()].T
    assert torch.equal(dequantize_packed(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits), w)


def test_packed_gptq_layer_matches_its_dequantized_weight():
    torch.manual_seed(5)
    w, x = torch.randn(64, 256), correlated_inputs(512, 256, 6)
    h = hessian_init(256)
    rows = hessian_add(h, x)
    qw = gptq(w, h, rows, QuantConfig(bits=4, group_size=128, act_order=True))
    assert torch.equal(qw.scales, qw.scales.half().float())  # the grid is the one the checkpoint stores
    t = pack(qw.q, qw.scales, qw.zeros, qw.g_idx, 4)
    assert torch.equal(dequantize_packed(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4), qw.dequantize())


def test_known_word_layout():
    """Level k of a 4-bit word sits in bits 4k..4k+3: levels 1..8 -> 0x87654321."""
    q = torch.arange(1, 9, dtype=torch.int32).repeat(8, 1)  # 8 output rows, 8 inputs each 1..8
    t = pack(q, torch.ones(1, 8), torch.full((1, 8), 8, dtype=torch.int32), torch.zeros(8, dtype=torch.int32), 4)
    assert t["qweight"].shape == (1, 8) and torch.all(t["qweight"] == 0x87654321 - (1 << 32))
    assert t["qzeros"].shape == (1, 1) and t["qzeros"].item() == 0x77777777  # zero 8 stored minus one (v1)
