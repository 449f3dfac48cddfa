"""Our WorldPM against an independent computation: transformers' Qwen2Model + the head at the last token."""

import torch
from transformers import Qwen2Model

from worldpm_lite.chat import encode_conversation
from worldpm_lite.checkpoint import Checkpoint
from worldpm_lite.scorer import Scorer

CONVS = [
    [{"role": "user", "content": "Tips for better sleep?"},
     {"role": "assistant", "content": "Keep a fixed schedule, avoid screens before bed, keep the room cool."}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "7"}, {"role": "user", "content": "Another, larger one?"},
     {"role": "assistant", "content": "Sure: 1000003 is prime, and so is 999983."}],
]


def reference_scores(model_dir, tokenizer, conversations):
    ckpt = Checkpoint(model_dir)
    qwen = Qwen2Model(ckpt.config.to_qwen2()).eval()
    state = {k.removeprefix("model."): ckpt.tensor(k).float() for k in ckpt.names() if k.startswith("model.")}
    qwen.load_state_dict(state, strict=True)
    head = ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")
    w0, b0, w2, b2 = (ckpt.tensor(n).float() for n in head)
    out = []
    with torch.no_grad():
        for conv in conversations:
            ids = torch.tensor([encode_conversation(tokenizer, conv)])
            h = qwen(input_ids=ids).last_hidden_state[0, -1]  # after the final norm
            out.append((w2 @ torch.relu(w0 @ h + b0) + b2).item())
    return out


def test_scores_equal_transformers_qwen2_plus_head(small_dir, tokenizer):
    scorer = Scorer.from_pretrained(small_dir, device="cpu", dtype=torch.float32)
    ours = scorer.score(CONVS)
    ref = reference_scores(small_dir, tokenizer, CONVS)
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-5, (ours, ref)
    assert max(ref) - min(ref) > 1e-2  # the conversations are told apart: the check is not vacuous


def test_batch_invariance(small_dir):
    scorer = Scorer.from_pretrained(small_dir, device="cpu", token_budget=1 << 20)
    alone = [scorer.score([c])[0] for c in CONVS]
    together = scorer.score(CONVS * 3)
    for k, s in enumerate(together):
        assert abs(s - alone[k % 3]) < 1e-5
    tight = Scorer.from_pretrained(small_dir, device="cpu", token_budget=40)  # several small batches
    assert max(abs(a - b) for a, b in zip(tight.score(CONVS), alone)) < 1e-5


def test_padding_never_reaches_the_score(small_dir):
    """Right padding + causal attention: the same sequence padded with anything scores the same."""
    scorer = Scorer.from_pretrained(small_dir, device="cpu")
    ids = scorer.encode(CONVS[:1])[0]
    n = len(ids)
    x = torch.tensor([ids + [0] * 7, ids + list(range(100, 107))])
    s = scorer.model(x, torch.tensor([n - 1, n - 1]))
    plain = scorer.model(torch.tensor([ids]), torch.tensor([n - 1]))
    assert torch.allclose(s, plain.expand(2), atol=1e-5)


def test_bf16_close_to_fp32(small_dir):
    fp32 = Scorer.from_pretrained(small_dir, dtype="float32").score(CONVS)
    bf16 = Scorer.from_pretrained(small_dir, dtype="bfloat16").score(CONVS)
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.1
