"""Scoring throughput on this CPU: our Scorer vs a plain transformers pipeline as users write it.

    pip install -e '.[bench]' && python -m pytest bench/test_throughput.py --benchmark-group-by=group -s

Same model (the small WorldPM, fp32 compute), same few hundred real ShareGPT conversations of mixed
length, same tokens. Baselines, both transformers' Qwen2Model + the reward head from the safetensors:
  one-at-a-time  WorldPM's README recipe: apply_chat_template, encode, one forward per conversation
  padded-batch   batches of 16 in input order, right-padded with an attention mask, final norm and
                 head over every token, the last real token's score picked
Ours: length-sorted batches under a token budget, causal attention without a mask, the norm and the
head on the scoring rows only. The last test prints tokens/s of each and the ratios and writes
bench/results/throughput.json. Target: >= 2x the padded-batch baseline.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from worldpm_lite.chat import encode_conversation, load_tokenizer
from worldpm_lite.data import sharegpt_conversations
from worldpm_lite.scorer import Scorer
from worldpm_lite.tiny import tiny_model_dir

CONVERSATIONS = 300
MAX_TOKENS = 1024  # mixed lengths up to this, so the CPU run stays a few minutes
BATCH = 16
SECONDS: dict[str, float] = {}
SCORES: dict[str, list[float]] = {}


@pytest.fixture(scope="module")
def setup():
    path = tiny_model_dir(0)
    tokenizer = load_tokenizer(path)
    convs, encoded = [], []
    for conv in sharegpt_conversations():
        ids = encode_conversation(tokenizer, conv)
        if len(ids) <= MAX_TOKENS:
            convs.append(conv)
            encoded.append(ids)
        if len(convs) == CONVERSATIONS:
            break
    return path, tokenizer, convs, encoded


def transformers_model(path):
    """What a user writes without our package: Qwen2Model from the folder, the head by hand."""
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    h = backbone.config.hidden_size
    head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))
    files = sorted(Path(path).glob("*.safetensors"))
    state = {}
    for f in files:
        with safe_open(f, "pt") as sf:
            state |= {k.removeprefix("score."): sf.get_tensor(k).float() for k in sf.keys() if k.startswith("score.")}
    head.load_state_dict(state)
    return backbone, head.eval()


def run(name, benchmark, fn, tokens):
    out = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)
    SECONDS[name] = benchmark.stats.stats.median
    SCORES[name] = out
    benchmark.extra_info["tokens_per_s"] = tokens / SECONDS[name]


@pytest.mark.benchmark(group="scoring")
def test_ours(benchmark, setup):
    path, _, convs, encoded = setup
    scorer = Scorer.from_pretrained(path)
    run("worldpm-lite Scorer", benchmark, lambda: scorer.score_ids(encoded), sum(map(len, encoded)))


@pytest.mark.benchmark(group="scoring")
def test_transformers_padded_batch(benchmark, setup):
    path, tokenizer, convs, encoded = setup
    backbone, head = transformers_model(path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 151643

    @torch.inference_mode()
    def score():
        out = []
        for k in range(0, len(encoded), BATCH):
            chunk = encoded[k: k + BATCH]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), pad)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, s in enumerate(chunk):
                ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, h], normed
            rewards = head(hidden).squeeze(-1)  # [B, T]: the head over every token
            out += rewards[torch.arange(len(chunk)), mask.sum(1) - 1].tolist()
        return out

    run("transformers padded batch", benchmark, score, sum(map(len, encoded)))


@pytest.mark.benchmark(group="scoring")
def test_transformers_one_at_a_time(benchmark, setup):
    path, tokenizer, convs, encoded = setup
    backbone, head = transformers_model(path)

    @torch.inference_mode()
    def score():
        out = []
        for ids in encoded:  # the README recipe's tokens (chat template, no extra special tokens)
            hidden = backbone(input_ids=torch.tensor([ids])).last_hidden_state
            out.append(head(hidden[:, -1]).item())
        return out

    run("transformers one at a time", benchmark, score, sum(map(len, encoded)))


def test_report(setup):
    _, _, convs, encoded = setup
    tokens = sum(map(len, encoded))
    names = ["worldpm-lite Scorer", "transformers padded batch", "transformers one at a time"]
    assert all(n in SECONDS for n in names), "run the whole file"
    ours = torch.tensor(SCORES[names[0]])
    for n in names[1:]:  # same model, same tokens: same scores
        torch.testing.assert_close(torch.tensor(SCORES[n]), ours, rtol=1e-4, atol=1e-4)
    rows = {n: {"seconds": SECONDS[n], "tokens_per_s": tokens / SECONDS[n]} for n in names}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "conversations": len(encoded), "tokens": tokens, "lengths": [min(map(len, encoded)),
                                                                           max(map(len, encoded))],
              "variants": rows,
              "speedup_vs_padded_batch": SECONDS[names[1]] / SECONDS[names[0]],
              "speedup_vs_one_at_a_time": SECONDS[names[2]] / SECONDS[names[0]]}
    for n, r in rows.items():
        print(f"{n:>28}: {r['tokens_per_s']:8.0f} tokens/s ({r['seconds']:.2f} s)")
    print(f"speed-up vs padded batch {result['speedup_vs_padded_batch']:.2f}x, vs one at a time "
          f"{result['speedup_vs_one_at_a_time']:.2f}x ({len(encoded)} conversations, {tokens} tokens)")
    out = Path(__file__).parent / "results" / "throughput.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
