"""Packed batches against the padded reference: same scores, shared prompts run once, the
two-stage schedule, and how `pack_batches` cuts a stream of requests into batches."""

import random

import pytest
import torch

from worldpm_lite.chat import ConversationError
from worldpm_lite.checkpoint import Checkpoint
from worldpm_lite.data import sharegpt_conversations
from worldpm_lite.model import load_model
from worldpm_lite.packing import Group, pack_batches, run_batches
from worldpm_lite.scorer import Scorer


def random_groups(rng, n):
    groups = []
    for _ in range(n):
        parts = [[rng.randrange(100)] * rng.randint(1, 40) for _ in range(rng.randint(1, 5))]
        groups.append(Group([7] * rng.randint(1, 60) if rng.random() < 0.5 else None, parts))
    return groups


def test_pack_covers_every_part_once_in_order_within_budget():
    rng = random.Random(0)
    for _ in range(200):
        groups, budget = random_groups(rng, rng.randint(1, 12)), rng.randint(1, 200)
        batches = list(pack_batches(groups, budget))
        owners = [o for b in batches for o in b.owners]
        assert owners == [(g, j) for g, grp in enumerate(groups) for j in range(len(grp.parts))]
        assert [b.done for b in batches] == sorted(b.done for b in batches) and batches[-1].done == len(groups)
        assert sum(b.tokens for b in batches) == sum(g.tokens for g in groups)
        stored, freed = set(), []
        for b in batches:
            assert len(b.ids) <= budget or len(b.segments) == 1
            assert len(b.ids) == sum(s.length for s in b.segments)
            here = {s.key for s in b.segments if s.key is not None}
            stored |= {s.key for s in b.segments if s.keep}
            for s in b.segments:  # a response reads its prompt from this batch or from a kept one
                assert s.prompt is None or s.prompt in here or s.prompt in stored
            freed += b.free
        assert sorted(freed) == sorted(stored)  # every kept prompt is released


def test_pack_starts_every_batch_at_a_request_unless_one_overflows():
    """What makes resuming reproduce the batches: a batch starts where a request starts, except
    inside a request too big for one batch, which itself started a fresh batch."""
    rng = random.Random(1)
    for _ in range(200):
        groups, budget = random_groups(rng, rng.randint(1, 12)), rng.randint(20, 200)
        batches = list(pack_batches(groups, budget))
        for b in batches[1:]:
            first = b.segments[0]
            if first.prompt is not None or first.key is None and b.owners[0][1] > 0:  # continues a request
                assert groups[b.owners[0][0]].work > budget
        # and packing from any completed request on gives the same batches as the full run did
        for k, b in enumerate(batches[:-1]):
            nxt = batches[k + 1]
            if nxt.owners and nxt.owners[0][1] == 0 and nxt.segments[0].prompt is None:
                rest = list(pack_batches(groups[b.done:], budget))
                assert [r.ids for r in rest] == [r.ids for r in batches[k + 1:]]


@pytest.fixture(scope="module")
def convs():
    return [c[:2] for c in sharegpt_conversations(40)]


def test_packed_equals_padded_and_is_batch_invariant(small_dir, convs):
    padded = Scorer.from_pretrained(small_dir, packing=False, truncation="left").score(convs)
    assert max(padded) - min(padded) > 0.1  # the conversations are told apart
    runs = []
    for budget in (1, 64, 300, 2048):  # one conversation per batch .. all in one
        runs.append(Scorer.from_pretrained(small_dir, token_budget=budget, truncation="left").score(convs))
        assert max(abs(a - b) for a, b in zip(runs[-1], padded)) < 1e-5
    # on the CPU, exactly: a conversation's bits do not depend on its batch (what `serve` relies on)
    assert all(run == runs[0] for run in runs)


@pytest.mark.parametrize("budget", [2048, 60, 1])
def test_shared_prompt_equals_independent_scoring(small_dir, budget):
    """The prompt runs once (in the same batch, or in an earlier one and kept) and each response
    attends to its keys/values: same scores as each conversation alone."""
    shared = Scorer.from_pretrained(small_dir, token_budget=budget)
    alone = Scorer.from_pretrained(small_dir, share_prompts=False)
    prompt = [{"role": "user", "content": "Tips for better sleep? I wake up at 3am every night."}]
    responses = ["Keep a fixed schedule.", "idk lol", "Avoid screens and caffeine after noon.", "Sleep."]
    g = shared.group([prompt + [{"role": "assistant", "content": r}] for r in responses], prompt)
    assert g.prompt is not None and len(g.prompt) > 20 and g.work < g.tokens
    assert shared.rank(prompt, responses).scores == pytest.approx(alone.rank(prompt, responses).scores, abs=1e-5)
    cmp, ref = shared.compare(prompt, *responses[:2]), alone.compare(prompt, *responses[:2])
    assert (cmp.score_a, cmp.score_b) == pytest.approx((ref.score_a, ref.score_b), abs=1e-5)


def test_prompt_that_is_not_a_prefix_falls_back_to_independent_scoring(small_dir):
    scorer = Scorer.from_pretrained(small_dir)
    prompt = [{"role": "user", "content": "Name a prime."}]
    convs = [prompt + [{"role": "assistant", "content": r}] for r in ("7", "11")]
    assert scorer.group(convs, prompt).prompt is not None
    # a template that renders the number of messages first: the prompt alone renders differently
    scorer.tokenizer.chat_template = "{{ messages|length }}" + scorer.tokenizer.chat_template
    g = scorer.group(convs, prompt)
    assert g.prompt is None and g.parts == scorer.encode(convs)
    assert scorer.rank(prompt, ["7", "11"]).scores == pytest.approx(scorer.score(convs), abs=1e-6)


def test_two_stage_pipeline_same_scores_and_interleaved(small_dir, convs):
    """A two-entry device map, both on the CPU, run as two stages: stage 0 of batch k+1 is
    queued before batch k's scores are read, and the scores are those of one stage."""
    one = Scorer.from_pretrained(small_dir, token_budget=200, truncation="left")
    model = load_model(Checkpoint(small_dir), torch.float32, {"": "cpu", "model.layers.1": "cpu"})
    model.stage_ends = [1, 2]
    two = Scorer(model, one.tokenizer, token_budget=200, truncation="left")
    assert two.score(convs) == one.score(convs)
    batches = list(pack_batches([Group(None, [ids]) for ids in one.encode(convs)], 200))
    assert len(batches) >= 3
    trace, seen = [], []
    for k, (batch, _) in enumerate(run_batches(model, iter(batches), trace=trace)):
        assert batch is batches[k]
        seen.append(list(trace))
    assert trace[:5] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    for k in range(len(batches) - 1):
        assert (k + 1, 0) in seen[k]  # the next batch was on stage 0 when this one's scores were read


def test_last_message_must_be_the_reply(small_dir):
    scorer = Scorer.from_pretrained(small_dir)
    with pytest.raises(ConversationError, match="conversation 1: the last message must be the assistant's reply"):
        scorer.score([[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                      [{"role": "user", "content": "a"}]])
