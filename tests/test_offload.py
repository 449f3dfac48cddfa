"""Streamed layers (offload.py): the executor on the CPU with real copies, its event orderings (the CUDA
runtime over a fake torch.cuda, replayed as a GPU would run it), the plan's arithmetic and refusals, and
the out-of-memory retry."""

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode

from worldpm_lite.checkpoint import Checkpoint, GPTQSpec
from worldpm_lite.cli import main
from worldpm_lite.model import meta_model
from worldpm_lite.offload import CudaRuntime, HostLayers, LayerStream, layer_layout, spread
from worldpm_lite.offload_plan import auto_placement, stream_plan, streamed_pass_seconds
from worldpm_lite.options import Offload
from worldpm_lite.plan import GIB, WORLDPM_72B, activation_reserve, placement_units
from worldpm_lite.scorer import Scorer
from worldpm_lite.tiny import tiny_quantized_dir

PROMPT = "How do I keep basil alive on a windowsill?"
REPLIES = ["Water it when the top inch of soil is dry and give it six hours of sun.", "Basil likes light.",
           "Pinch off the flower buds so the plant keeps making leaves, and turn the pot every few days."]
CONVS = [[{"role": "user", "content": f"Question {i}: {'why ' * i}?"},
          {"role": "assistant", "content": f"Answer {i}: {'because ' * (3 * i)}."}] for i in range(8)]


@pytest.fixture(scope="module")
def checkpoints(tiny_dir):
    """The small model dense (fp32) and as 4-bit GPTQ."""
    return {"dense": tiny_dir, "gptq4": tiny_quantized_dir(4)}


def results(scorer):
    """Everything a Scorer answers, through packed batches (with a shared prompt) and padded ones."""
    out = {"score": scorer.score(CONVS), "rank": scorer.rank(PROMPT, REPLIES).scores}
    scorer.packing = False
    out["padded"] = scorer.score(CONVS)
    scorer.packing = True
    return out


# (streamed layers, ring size) per checkpoint: every layer or some, rings of 1-3, larger and smaller than the count
SPLITS = {"dense": [((0, 1, 2, 3), 1), ((1, 3), 3)], "gptq4": [((0, 2, 3), 2), ((3,), 2)]}


@pytest.mark.parametrize("kind", ["dense", "gptq4"])
def test_streamed_layers_score_bit_for_bit_as_resident(checkpoints, kind):
    path = checkpoints[kind]
    want = results(Scorer.from_pretrained(path, device="cpu", token_budget=64))
    n = Checkpoint(path).config.num_hidden_layers
    for streamed, ring in SPLITS[kind]:
        assert max(streamed) < n
        scorer = Scorer.from_pretrained(path, device="cpu", token_budget=64, offload=Offload(streamed, ring))
        assert scorer.model.streamer.streamed == streamed
        for i in streamed:  # streamed layers hold no weights of their own: only the host allocation does
            assert all(p.device.type == "meta" for p in scorer.model.model.layers[i].parameters())
        assert results(scorer) == want, (streamed, ring)
        assert f"{len(streamed)} layers streamed" in scorer.backend
    if kind == "dense":
        every = Scorer.from_pretrained(path, device="cpu", token_budget=64, offload=True)  # --offload on, on a CPU
        assert every.model.streamer.streamed == tuple(range(n)) and results(every) == want


def test_mlp_chunks_change_no_score_beyond_rounding(checkpoints):
    whole = Scorer.from_pretrained(checkpoints["gptq4"], device="cpu", token_budget=512)
    chunked = Scorer.from_pretrained(checkpoints["gptq4"], device="cpu", token_budget=512, offload=Offload((1, 2)))
    chunked.model.mlp_chunk = whole.model.mlp_chunk = 40  # batches of up to 512 tokens in chunks of 40 rows
    a, b = whole.score(CONVS), chunked.score(CONVS)
    assert a == b  # streamed and resident, both chunked: the same bits
    whole.model.mlp_chunk = None
    assert max(abs(x - y) for x, y in zip(a, whole.score(CONVS))) < 1e-5


class FakeStream(torch.Stream):
    """A CUDA stream stand-in that logs what is queued on it (a torch.Stream, so Tensor.record_stream takes it)."""

    def __new__(cls, log, name):
        return super().__new__(cls, device="cpu")

    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait_event(self, event):
        self.log.append(("wait", self.name, event.id))

    def synchronize(self):
        self.log.append(("synchronize", self.name))


class FakeEvent:
    def __init__(self, id):
        self.id = id

    def record(self, stream):
        stream.log.append(("record", stream.name, self.id))


class FakeCuda:
    """torch.cuda as CudaRuntime uses it, logging in host order what each stream is given: ("wait",
    stream, event), ("record", stream, event), ("copy", stream, dst data_ptr, non_blocking),
    ("record_stream", data_ptr, stream), ("synchronize", stream) and ("new stream", device). Copies and
    record_stream are Tensor methods: they are logged while `queued()` is on."""

    def __init__(self):
        self.log, self.events, self.devices = [], 0, []
        self.compute = FakeStream(self.log, "compute")
        self.current = self.compute

    def Stream(self, device):  # torch.cuda's names
        self.log.append(("new stream", str(device)))
        return FakeStream(self.log, "side")

    def Event(self):
        self.events += 1
        return FakeEvent(self.events)

    @contextlib.contextmanager
    def stream(self, stream):
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before

    def current_stream(self, device=None):
        self.devices.append(device)
        return self.current

    def queued(self):
        return _Queued(self)


class _Queued(TorchFunctionMode):
    def __init__(self, cuda):
        super().__init__()
        self.cuda = cuda

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.record_stream:  # a CPU tensor has no CUDA allocator to tell
            self.cuda.log.append(("record_stream", args[0].data_ptr(), args[1].name))
            return None
        if func is torch.Tensor.copy_:
            self.cuda.log.append(("copy", self.cuda.current.name, args[0].data_ptr(), kwargs.get("non_blocking")))
        return func(*args, **kwargs)


class Dropped(CudaRuntime):
    """CudaRuntime without one of the calls that order the ring, as if its line in LayerStream were gone:
    "compute wait" (layer's runtime.wait(copied)), "done record" (layer's runtime.record(done)) or
    "copy wait" (the refill's `after`)."""

    def __init__(self, device, cuda, drop=None):
        super().__init__(device, cuda)
        self.drop = drop

    def wait(self, event):
        if self.drop != "compute wait":
            super().wait(event)

    def record(self, event):
        if self.drop != "done record":
            super().record(event)

    def copy(self, dst, src, after, done):
        super().copy(dst, src, None if self.drop == "copy wait" else after, done)


def ordering_violations(log: list, slot_of) -> list[str]:
    """Replays what the streams were given (FakeCuda's log, plus ("compute", stream, buffer data_ptr,
    layer) for each layer's kernels) as a GPU runs it: each stream runs its work in order; a wait orders
    what its stream runs next after the latest record of the event queued before the wait, and after
    nothing if the event was never recorded (cudaStreamWaitEvent on such an event is a no-op). Checks that
    every layer computes after the copy into its slot landed and that no copy overwrites a slot before
    the layer last computed from it is done. Returns what is violated (empty: nothing)."""
    last, recorded, before = {}, {}, {}  # stream -> its last op; event -> its latest record; op -> what precedes it
    problems, copied, computed = [], {}, {}  # slot -> its latest copy; slot -> its latest compute and layer
    for k, (kind, stream, *rest) in enumerate(log):
        if kind not in ("wait", "record", "copy", "compute"):
            continue
        deps = before[last[stream]] | {last[stream]} if stream in last else set()
        if kind == "wait" and rest[0] in recorded:
            deps |= before[recorded[rest[0]]] | {recorded[rest[0]]}
        before[k], last[stream] = deps, k
        if kind == "record":
            recorded[rest[0]] = k
        elif kind == "copy" and slot_of(rest[0]) is not None:
            slot = slot_of(rest[0])
            if slot in computed and computed[slot][0] not in deps:
                problems.append(f"copy at {k} overwrites slot {slot} before layer {computed[slot][1]} is done")
            copied[slot] = k
        elif kind == "compute":
            slot = slot_of(rest[0])
            if copied.get(slot) not in deps:
                problems.append(f"layer {rest[1]} computes at {k} before its copy into slot {slot} landed")
            computed[slot] = (k, rest[1])
    return problems


def run_ring(streamed, ring, passes, drop=None, cuda=None, host=None):
    """A ring over a tiny stand-in layer (one Linear) on CudaRuntime over FakeCuda (`drop`: see
    Dropped), driven pass after pass as the model drives it. Returns the log and the LayerStream."""
    cuda = cuda or FakeCuda()
    template = torch.nn.Sequential(torch.nn.Linear(4, 4))
    host = host or HostLayers(template, len(streamed), pinned=False)
    for j in range(len(streamed)):
        host.put(j, "0.weight", torch.full((4, 4), float(j)))
        host.put(j, "0.bias", torch.zeros(4))
    with cuda.queued():
        runtime = Dropped(torch.device("cpu"), cuda, drop)
        stream = LayerStream(host, template, streamed, ring, torch.device("cpu"), runtime=runtime)
        for order in passes:
            for i in order:
                with stream.layer(i) as module:
                    buf = stream.buffers[stream.modules.index(module)]
                    cuda.log.append(("compute", cuda.current_stream().name, buf.data_ptr(), i))
                    assert module[0].weight[0, 0].item() == streamed.index(i)  # the right layer's weights
    return cuda.log, stream


def violations(log, stream) -> list[str]:
    return ordering_violations(log, {buf.data_ptr(): s for s, buf in enumerate(stream.buffers)}.get)


STREAMED = (0, 2, 4, 5, 7)
PASSES = {"in order": [STREAMED] * 3, "out of order": [STREAMED[:2], STREAMED, STREAMED[3:], STREAMED]}


def test_events_order_copy_then_compute_then_reuse():
    for ring in (1, 2, 3):
        for passes in PASSES.values():
            assert violations(*run_ring(STREAMED, ring, passes)) == []


@pytest.mark.parametrize("drop, says", [("compute wait", "computes at"), ("done record", "overwrites slot"),
                                        ("copy wait", "overwrites slot")])
def test_the_checker_sees_each_ordering_call_left_out(drop, says):
    for ring in (1, 2, 3):
        for name, passes in PASSES.items():
            found = violations(*run_ring(STREAMED, ring, passes, drop))
            assert found and all(says in p for p in found), (drop, ring, name, found)


def test_plan_arithmetic():
    # compute-bound: a copy shorter than a layer's compute hides entirely, with even one resident layer between
    assert streamed_pass_seconds(10, spread(10, 5), 2, 1.0, 0.9) == pytest.approx(10.0)
    # copy-bound: every layer streamed, copies twice as long as compute: one pass is its copies
    assert streamed_pass_seconds(10, spread(10, 10), 2, 1.0, 2.0) == pytest.approx(20.0)
    # streamed layers that all fit the ring are copied once, then stay
    assert streamed_pass_seconds(10, (3, 7), 2, 1.0, 5.0) == pytest.approx(10.0)
    assert spread(80, 33) == tuple(sorted(set(spread(80, 33)))) and len(spread(80, 33)) == 33
    meta = meta_model(WORLDPM_72B, GPTQSpec(4, 128))
    p = stream_plan(meta, 24 * GIB, 64 * GIB)
    assert p.fits and len(p.resident) + len(p.streamed) == 80 and p.streamed and p.gpu_used <= 24 * GIB
    assert p.tokens_per_s == pytest.approx(p.token_budget / (80 * p.token_budget * p.flops_per_token_layer / 165e12))
    big = stream_plan(meta, 24 * GIB, 64 * GIB, token_budget=65536)
    assert len(big.resident) < len(p.resident)  # a larger pass's activations take room from resident layers
    slower = stream_plan(meta, 24 * GIB, 64 * GIB, h2d_gbps=1.0)  # a larger pass hides slower copies
    assert slower.token_budget > p.token_budget and slower.tokens_per_s == pytest.approx(p.tokens_per_s)
    slow = stream_plan(meta, 24 * GIB, 64 * GIB, h2d_gbps=0.1)  # none hides them: the fastest, the largest pass
    assert slow.token_budget == 65536 and slow.tokens_per_s < 0.5 * p.tokens_per_s


def test_plan_places_72b_on_one_24gb_gpu_and_refuses_too_little_host_memory(capsys):
    assert main(["plan", "--model", "worldpm-72b", "--gpus", "24GiB", "--host-memory", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit resident" in out and "runs streamed: 47 resident + 33 streamed layers" in out
    assert "14.02 GiB pinned" in out and "tokens per pass: 8192" in out and "expected: 1,175 tokens/s" in out
    assert "assumed: 24 GB/s host-to-device and 165 TFLOP/s" in out
    assert main(["plan", "--model", "worldpm-72b", "--gpus", "24GiB", "--host-memory", "8GiB"]) == 1
    out = capsys.readouterr().out
    assert "does NOT run streamed either" in out and "needs 17.35 GiB of host memory" in out
    assert main(["plan", "--model", "worldpm-72b", "--gpus", "24GiB", "--host-memory", "lots"]) == 2


def test_auto_placement_streams_or_refuses_before_reading_weights(checkpoints, monkeypatch):
    ckpt = Checkpoint(checkpoints["gptq4"])
    monkeypatch.setattr(Checkpoint, "tensor", lambda *a: pytest.fail("a weight was read"))
    meta = meta_model(ckpt.config, ckpt.quant)
    layer = layer_layout(meta.model.layers[0])[1]
    head = placement_units(meta)[0][-1][1]
    reserve = activation_reserve(ckpt.config, 512, True, 2, 4096)
    cap = reserve + head + (2 + 1) * layer + layer // 2  # the ring of 2 and one resident layer
    p = auto_placement(ckpt, torch.bfloat16, {0: cap}, 512, host_memory=64 * GIB)
    assert p.offload == Offload(spread(4, 3)) and p.token_budget == 512
    assert p.device_map == {"": 0, "model.embed_tokens": "cpu"} and "streamed from pinned host memory" in p.summary
    with pytest.raises(ValueError, match="needs .* GiB of host memory"):
        auto_placement(ckpt, torch.bfloat16, {0: cap}, 512, host_memory=1 << 20)
    with pytest.raises(ValueError, match="does not fit these GPUs"):
        auto_placement(ckpt, torch.bfloat16, {0: cap}, 512, offload=False)
    with pytest.raises(ValueError, match="cannot even stream it"):
        auto_placement(ckpt, torch.bfloat16, {0: reserve // 2}, 512, host_memory=64 * GIB)
    resident = auto_placement(ckpt, torch.bfloat16, {0: 64 * GIB}, 512)
    assert resident.offload is None and "all 4 layers resident" in resident.summary
