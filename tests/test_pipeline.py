"""GPTQ through the trained small model's real activations, layer by layer."""

import pytest
from worldpm_lite.quantize.gptq import QuantConfig
from worldpm_lite.quantize.pipeline import LAYER_GROUPS, stream_layers

from worldpm_lite.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def calibration(tiny_heldout):
    return [p.chosen_ids for p in tiny_heldout[:24]]


def test_gptq_below_rtn_on_every_linear_and_8bit_far_below_4bit(tiny_dir, calibration):
    ckpt = Checkpoint(tiny_dir)
    four = [r for _, _, reports, _ in stream_layers(ckpt, calibration, QuantConfig(bits=4)) for r in reports]
    eight = [r for _, _, reports, _ in stream_layers(ckpt, calibration, QuantConfig(bits=8)) for r in reports]
    assert len(four) == ckpt.config.num_hidden_layers * sum(len(g) for g in LAYER_GROUPS)
    for r in four:
        assert r.gptq_error < r.rtn_error, r
    for r4, r8 in zip(four, eight):
        assert r8.gptq_error < r4.gptq_error / 50, (r4, r8)


def test_quantized_weights_are_on_the_grid(tiny_dir, calibration):
    ckpt = Checkpoint(tiny_dir)
    cfg = QuantConfig(bits=4, group_size=128, act_order=True)
    _, quantized, _, layer = next(stream_layers(ckpt, calibration[:4], cfg))
    for name, q in quantized.items():
        assert q.q.min() >= 0 and q.q.max() <= 15
        assert (layer.get_submodule(name).weight == q.dequantize()).all()  # the layer runs what was quantized
