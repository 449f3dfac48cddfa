"""GPTQ through the trained small model's real activations, layer by layer."""

import threading
import weakref

import pytest
import torch
from helpers import SMALL

from worldpm_lite.checkpoint import Checkpoint
from worldpm_lite.options import QuantConfig
from worldpm_lite.quantize import pipeline
from worldpm_lite.quantize.pipeline import (
    LAYER_GROUPS,
    LayerReader,
    forward,
    input_hessian,
    load_layer,
    padded_batches,
    run_layer,
    stream_layers,
)


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


def random_layer(seed: int):
    """A Qwen2 decoder layer of the small test shape with random weights and biases, and its rotary table."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    torch.manual_seed(seed)
    layer = Qwen2DecoderLayer(SMALL.to_qwen2(), 0).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.1)
    return layer, Qwen2RotaryEmbedding(SMALL.to_qwen2())


def calibration_like(seed: int, lengths) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, SMALL.hidden_size, generator=g) for n in lengths]


@torch.no_grad()
def test_each_hessian_pass_stops_at_its_group_input_with_the_same_bits():
    layer, rope = random_layer(1)
    x = calibration_like(2, [37])[0]
    for name in [g[0] for g in LAYER_GROUPS]:
        linear, seen = layer.get_submodule(name), []
        handle = linear.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0].clone()))
        full = forward(layer, x, rope)  # the whole layer, as every pass ran before
        handle.remove()
        got = forward(layer, x, rope, until=linear)
        assert got.shape == seen[0].shape and got.equal(seen[0]), name
        assert not got.equal(full[..., :got.shape[-1]])  # an input inside the layer, not its output
    ran = []
    handles = [layer.get_submodule(n).register_forward_pre_hook(lambda m, _a: ran.append(m)) for g in LAYER_GROUPS
               for n in g]
    forward(layer, x, rope, until=layer.self_attn.q_proj)
    assert ran == [layer.self_attn.q_proj]  # nothing after q/k/v's input ran
    for h in handles:
        h.remove()


@torch.no_grad()
def test_batched_calibration_matches_one_sequence_at_a_time():
    """Padded batches (the GPU's path) against sequences alone (the CPU's, the reference) on fresh random
    layers and lengths: the same outputs and Hessian sums up to fp32 rounding, every row counted once."""
    for seed in range(3):
        layer, rope = random_layer(10 + seed)
        lengths = torch.randint(16, 90, (9,), generator=torch.Generator().manual_seed(seed)).tolist()
        inputs = calibration_like(20 + seed, lengths)
        batches = list(padded_batches(inputs, 200, "cpu"))
        assert sorted(k for idx, _, _ in batches for k in idx) == list(range(9))
        assert max(len(idx) for idx, _, _ in batches) > 1
        assert all(len(idx) == 1 or x.shape[0] * x.shape[1] <= 200 for idx, x, _ in batches)
        alone = run_layer(layer, inputs, rope)
        together = run_layer(layer, list(inputs), rope, batch_tokens=200)
        for a, b in zip(alone, together):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            linear = layer.get_submodule(name)
            h1, rows1 = input_hessian(layer, linear, inputs, rope)
            h2, rows2 = input_hessian(layer, linear, inputs, rope, batch_tokens=200)
            assert rows1 == rows2 == sum(lengths)
            assert (h1 - h2).abs().max() <= 1e-5 * h1.abs().max(), name
        copy = list(inputs)
        assert run_layer(layer, copy, rope, batch_tokens=200, in_place=True) is copy
        assert all(a.equal(b) for a, b in zip(copy, together))
        low = run_layer(layer, inputs, rope, compute_dtype=torch.bfloat16)  # bench/quantize_arithmetic.py's bf16
        rel = [((a - b).norm() / a.norm()).item() for a, b in zip(alone, low)]
        assert all(1e-4 < r < 3e-2 for r in rel) and all(b.dtype == torch.float32 for b in low), rel


class Moves(torch.overrides.TorchFunctionMode):
    """Records where Tensor.to sends each tensor, and leaves it where it is (there is no GPU here)."""

    def __init__(self):
        super().__init__()
        self.targets = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            self.targets.append(torch.device(args[1]))
            return args[0]
        return func(*args, **(kwargs or {}))


def test_activations_stay_on_the_gpu_when_the_allocators_cache_has_room(monkeypatch):
    """mem_get_info counts PyTorch's cached, unused blocks as taken: with the last layer's activations
    freed into the cache, activations that fit were sent back to the host between layers."""
    gpu = torch.device("cuda", 0)

    class Layer(torch.nn.Module):  # a layer that says it is on cuda:0
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(128, 128, device="meta")
            self.input_layernorm = type("Norm", (), {"weight": type("W", (), {"device": gpu})()})()

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (1 << 20, 80 << 30))  # the driver: 1 MiB free
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 3 << 30)  # the cache holds 3 GiB
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 1 << 30)  # of which 1 GiB is in use
    hidden = [torch.zeros(1, 1000, 128) for _ in range(4)]  # 2 MB of activations, a 1 MiB layer reserve
    with Moves() as moves:
        pipeline.keep_on_device(hidden, Layer())
    assert moves.targets == [gpu] * 4
    assert pipeline.free_bytes(gpu) == (1 << 20) + (2 << 30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 1 << 30)  # nothing cached: to the host
    with Moves() as moves:
        pipeline.keep_on_device(hidden, Layer())
    assert moves.targets == [torch.device("cpu")] * 4
