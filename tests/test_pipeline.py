"""GPTQ through the trained small model's real activations, layer by layer."""

import threading
import weakref

import pytest
from worldpm_lite.quantize import pipeline
from worldpm_lite.quantize.gptq import QuantConfig
from worldpm_lite.quantize.pipeline import LAYER_GROUPS, LayerReader, load_layer, stream_layers

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


def test_layer_reader_reads_ahead_in_a_thread_and_holds_at_most_two_layers(tiny_dir, monkeypatch):
    ckpt = Checkpoint(tiny_dir)
    live, readers = weakref.WeakSet(), set()

    def counted_load(reader, i, **kw):
        layer = load_layer(reader, i, **kw)
        live.add(layer)
        readers.add(threading.current_thread())
        return layer

    monkeypatch.setattr(pipeline, "load_layer", counted_load)
    most = 0
    with LayerReader(ckpt) as layers:
        with pytest.raises(ValueError, match="expected layer 0"):
            layers.take(1)
        for i in range(ckpt.config.num_hidden_layers):
            layer = layers.take(i)
            if layers.ahead is not None:
                layers.ahead.result()  # the read of layer i + 1 is done while layer i is held
            most = max(most, len(live))
            want = load_layer(ckpt, i).state_dict()
            assert all(t.equal(want[k]) for k, t in layer.state_dict().items()) and len(want) == len(layer.state_dict())
            del layer
    assert most == 2 and threading.main_thread() not in readers
