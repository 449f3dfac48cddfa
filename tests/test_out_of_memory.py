"""Out of GPU memory: a pass that does not fit runs again at half the token budget, packed or padded; the
budget grows back after passes that fit (so one oversized request does not slow a service for good);
a segment that cannot fit alone is named. The GPU is simulated: layers raise torch.OutOfMemoryError
on a pass longer than a limit, as a GPU would."""

import json
import logging

import pytest
import torch
from test_offload import CONVS, PROMPT, REPLIES

from worldpm_lite import packing
from worldpm_lite.cli import main
from worldpm_lite.model import WorldPM
from worldpm_lite.options import Offload
from worldpm_lite.scorer import DoesNotFit, Scorer
from worldpm_lite.tiny import tiny_quantized_dir


@pytest.fixture(scope="module")
def checkpoints():
    return {"gptq4": tiny_quantized_dir(4)}


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


def test_the_budget_grows_back_after_passes_that_fit(checkpoints, oom_over, caplog):
    """One oversized pass must not halve the budget for every later request (serve's clients): after
    grow_after passes that fit it doubles back to the planned budget; a regrown budget that runs out
    again waits twice as long before the next try."""
    limit, _ = oom_over
    scorer = Scorer.from_pretrained(checkpoints["gptq4"], device="cpu", token_budget=2048)
    want = scorer.score(CONVS)
    limit[0] = 200
    assert scorer.score(CONVS) == want and scorer.token_budget <= 200  # 8 conversations: fewer passes than 16
    scorer.grow_after = 2
    limit[0] = 10**9
    with caplog.at_level(logging.INFO, logger="worldpm_lite.scorer"):
        for _ in range(20):  # 8 conversations of 26-54 tokens a round: passes of at most the budget
            assert scorer.score(CONVS) == want
            if scorer.token_budget == 2048:
                break
    assert scorer.token_budget == scorer.planned_budget == 2048
    assert "token budget back to 2048 tokens per pass" in caplog.text
    limit[0] = 200  # the regrown budget runs out again: it shrinks, and the next regrowth waits longer
    assert scorer.score(CONVS) == want and scorer.token_budget <= 200 and scorer.grow_after == 4


@pytest.fixture
def padded_oom_over(monkeypatch):
    """The padded path's layers run out of memory on a batch of more than `limit[0]` padded tokens."""
    limit, passes = [10**9], []
    real = WorldPM._padded_layer

    def layer(self, layer, x, *args):
        passes.append(x.shape[0] * x.shape[1])
        if x.shape[0] * x.shape[1] > limit[0]:
            raise torch.OutOfMemoryError(f"injected: {x.shape[0] * x.shape[1]} tokens")
        return real(self, layer, x, *args)

    monkeypatch.setattr(WorldPM, "_padded_layer", layer)
    return limit, passes


def test_the_padded_path_splits_a_pass_that_runs_out_of_memory(checkpoints, padded_oom_over):
    limit, passes = padded_oom_over
    scorer = Scorer.from_pretrained(checkpoints["gptq4"], device="cpu", token_budget=2048, packing=False)
    want = scorer.score(CONVS)
    limit[0] = 120
    got = scorer.score(CONVS)  # padded, a score depends on its batch's width: only beyond rounding
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5
    assert scorer.token_budget == 128 and max(passes[-3:]) <= 120  # halved from 2048 until the passes fit
    limit[0] = 20
    with pytest.raises(DoesNotFit, match="a segment of 54 tokens"):
        scorer.score(CONVS)


def test_the_padded_path_runs_its_mlp_in_chunks_too(checkpoints):
    """A streamed plan's memory reserve assumes the MLP runs mlp_chunk rows at a time, padded or packed."""
    scorer = Scorer.from_pretrained(checkpoints["gptq4"], device="cpu", token_budget=512, packing=False)
    whole = scorer.score(CONVS)
    rows = []
    hooks = [layer.mlp.register_forward_hook(lambda m, args, out: rows.append(args[0].numel() // args[0].shape[-1]))
             for layer in scorer.model.model.layers]
    scorer.model.mlp_chunk = 40
    chunked = scorer.score(CONVS)
    for h in hooks:
        h.remove()
    assert rows and max(rows) <= 40  # every MLP call saw at most 40 rows
    assert max(abs(a - b) for a, b in zip(whole, chunked)) < 1e-5
