"""Streamed layers (offload.py): the executor on the CPU with real copies, its event orderings, the
plan's arithmetic and refusals, and the out-of-memory retry."""

import json
import logging

import pytest
import torch

from worldpm_lite import packing
from worldpm_lite.checkpoint import Checkpoint, GPTQSpec
from worldpm_lite.cli import main
from worldpm_lite.model import meta_model
from worldpm_lite.offload import CpuRuntime, LayerStream, layer_layout, spread
from worldpm_lite.offload_plan import auto_placement, stream_plan, streamed_pass_seconds
from worldpm_lite.options import Offload
from worldpm_lite.plan import GIB, WORLDPM_72B, activation_reserve, placement_units
from worldpm_lite.scorer import DoesNotFit, Scorer
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


class Recorder(CpuRuntime):
    """CPU copies, with every queue operation logged in host order: ("copy", queue, slot, layer,
    waited event, recorded event), ("wait", "compute", event) and ("record", "compute", event)."""

    def __init__(self, drop_copy_wait=False):
        self.log, self.events, self.drop = [], 0, drop_copy_wait

    def event(self):
        self.events += 1
        return self.events

    def copy(self, dst, src, after, done):
        super().copy(dst, src, after, done)
        self.log.append(("copy", None if self.drop else after, done, dst.data_ptr()))

    def wait(self, event):
        self.log.append(("wait", event))

    def record(self, event):
        self.log.append(("record", event))


def ordering_violations(log: list, computes: list[tuple[int, int]], slot_of) -> list[str]:
    """Replays the two queues as a GPU would: the copy queue runs copies in order, each after the last
    record of the event it waits for; the compute queue runs layers in order, each after the event it
    waited for. Checks that every layer computes after its copy landed and that no copy overwrites a
    slot before the layer computing from it is done. Returns what is violated (empty: nothing)."""
    # happens-before as positions: op -> set of ops known to precede it (transitively)
    copy_q, compute_q, records, before = [], [], {}, {}
    for k, op in enumerate(log):
        if op[0] == "copy":
            prev = copy_q[-1] if copy_q else None
            deps = set() if prev is None else before[prev] | {prev}
            if op[1] is not None and op[1] in records:
                deps |= before[records[op[1]]] | {records[op[1]]}
            before[k] = deps
            copy_q.append(k)
            records[op[2]] = k
        else:
            prev = compute_q[-1] if compute_q else None
            deps = set() if prev is None else before[prev] | {prev}
            if op[0] == "wait" and op[1] in records:
                deps |= before[records[op[1]]] | {records[op[1]]}
            before[k] = deps
            compute_q.append(k)
            if op[0] == "record":
                records[op[1]] = k
    problems, last_copy, last_done = [], {}, {}
    compute_iter = iter(computes)
    for k, op in enumerate(log):
        if op[0] == "copy":
            slot = slot_of(op[3])
            if slot in last_done and last_done[slot] not in before[k]:
                problems.append(f"copy at {k} overwrites slot {slot} before its layer finished")
            last_copy[slot] = k
        elif op[0] == "wait":
            layer, slot = next(compute_iter)
            if last_copy[slot] not in before[k]:
                problems.append(f"layer {layer} computes before its copy into slot {slot} landed")
        elif op[0] == "record":
            last_done[slot] = k
    return problems


def run_ring(streamed, ring, passes, recorder):
    """A ring over a tiny stand-in layer (one Linear), driven pass after pass as the model drives it."""
    from worldpm_lite.offload import HostLayers

    template = torch.nn.Sequential(torch.nn.Linear(4, 4))
    host = HostLayers(template, len(streamed), pinned=False)
    for j in range(len(streamed)):
        host.put(j, "0.weight", torch.full((4, 4), float(j)))
        host.put(j, "0.bias", torch.zeros(4))
    stream = LayerStream(host, template, streamed, ring, torch.device("cpu"), runtime=recorder)
    slot_of = {buf.data_ptr(): s for s, buf in enumerate(stream.buffers)}.__getitem__
    computes = []
    for order in passes:
        for i in order:
            with stream.layer(i) as module:
                slot = stream.modules.index(module)
                computes.append((i, slot))
                assert module[0].weight[0, 0].item() == streamed.index(i)  # the right layer's weights
    return ordering_violations(recorder.log, computes, slot_of)


def test_events_order_copy_then_compute_then_reuse():
    streamed = (0, 2, 4, 5, 7)
    full = [streamed] * 3
    for ring in (1, 2, 3):
        assert run_ring(streamed, ring, full, Recorder()) == []
        assert run_ring(streamed, ring, [streamed[:2], streamed, streamed[3:], streamed], Recorder()) == []
    broken = run_ring(streamed, 2, full, Recorder(drop_copy_wait=True))  # a copy that does not wait for `done`
    assert broken and all("overwrites slot" in p for p in broken)


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


@pytest.fixture
def oom_over(monkeypatch):
    """packed_layer runs out of memory on any pass longer than `limit[0]` tokens, as a GPU would."""
    limit, passes = [10**9], []
    real = packing.packed_layer

    def layer(layer, x, *args, **kwargs):
        passes.append(x.shape[0])
        if x.shape[0] > limit[0]:
            raise torch.OutOfMemoryError(f"injected: {x.shape[0]} tokens")
        return real(layer, x, *args, **kwargs)

    monkeypatch.setattr(packing, "packed_layer", layer)
    return limit, passes


def test_out_of_memory_splits_the_pass_and_keeps_the_smaller_budget(checkpoints, oom_over, caplog):
    limit, passes = oom_over
    path = checkpoints["gptq4"]
    want = Scorer.from_pretrained(path, device="cpu", token_budget=2048).score(CONVS)
    scorer = Scorer.from_pretrained(path, device="cpu", token_budget=2048, offload=Offload((0, 2)))
    limit[0] = 200
    with caplog.at_level(logging.WARNING, logger="worldpm_lite.scorer"):
        got = scorer.score(CONVS)
        ranked = scorer.rank(PROMPT, REPLIES).scores
    assert got == want  # nothing lost, nothing changed (a conversation's bits do not depend on its batch)
    assert scorer.token_budget <= 200 and max(passes[-5:]) <= 200
    assert "out of GPU memory with 2048 tokens per pass" in caplog.text and "with 1024 tokens" in caplog.text
    limit[0] = 10**9
    assert ranked == Scorer.from_pretrained(path, device="cpu").rank(PROMPT, REPLIES).scores
    limit[0] = 20  # shorter than one conversation: that one cannot fit at all
    with pytest.raises(DoesNotFit, match="request 0: a segment of"):
        scorer.score(CONVS)


def test_score_names_the_line_that_cannot_fit_and_keeps_what_was_done(checkpoints, oom_over, tmp_path, capsys):
    limit, _ = oom_over
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"messages": c} for c in CONVS[:3]] + [{"messages": CONVS[7]}]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    limit[0] = 50  # the short conversations (26-34 tokens) fit one at a time, the last (54) does not
    args = ["score", "--model", str(checkpoints["gptq4"]), "--input", str(src), "--output", str(out),
            "--offload", "on", "--token-budget", "256"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{src}:4: " in err and "ran out of GPU memory alone" in err and "Traceback" not in err
    assert not out.exists()
    limit[0] = 10**9
    assert main([*args, "--resume"]) == 0
    want = Scorer.from_pretrained(checkpoints["gptq4"], device="cpu").score(CONVS[:3] + [CONVS[7]])
    assert [json.loads(line)["score"] for line in out.read_text().splitlines()] == want
