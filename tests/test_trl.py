"""worldpm_lite.trl.WorldPMReward: one real GRPOTrainer step on the CPU with a tiny random policy, in
TRL's plain-text and conversational formats, and the same rewards through a running `serve`."""

import httpx
import pytest
import torch
from test_serve import running

from worldpm_lite.data import with_response
from worldpm_lite.scorer import Scorer
from worldpm_lite.serve.app import create_app
from worldpm_lite.tiny import cached_tokenizer_dir
from worldpm_lite.trl import WorldPMReward

trl = pytest.importorskip("trl")  # the [trl] extra, part of [test]

PROMPTS = ["Tips for better sleep?", "How do I keep basil alive?"]


@pytest.fixture(scope="module")
def scorer(small_dir):
    return Scorer.from_pretrained(small_dir, device="cpu")


def grpo_step(reward, conversational: bool):
    """One GRPOTrainer step: 2 prompts x 2 generations of at most 8 tokens from a random 1-layer Qwen2."""
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(cached_tokenizer_dir()))
    policy = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                          max_position_embeddings=256, tie_word_embeddings=True,
                                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS] if conversational else PROMPTS
    args = trl.GRPOConfig(output_dir="grpo", max_steps=1, per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=8, logging_steps=1, report_to="none", save_strategy="no",
                          use_cpu=True, bf16=False, seed=0)
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=[reward], args=args, processing_class=tok,
                              train_dataset=Dataset.from_dict({"prompt": prompts, "topic": ["sleep", "basil"]}))
    trainer.train()
    return trainer


def conversation(prompt, completion) -> list[dict]:
    if isinstance(prompt, str):
        return with_response(prompt, completion, "completion")
    return prompt + completion


@pytest.mark.parametrize("conversational", [False, True], ids=["plain", "conversational"])
def test_a_grpo_step_sees_the_scorers_rewards(scorer, conversational, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # TRL writes its output folder here
    reward = WorldPMReward(scorer)
    trainer = grpo_step(reward, conversational)
    seen = list(trainer._logs["rewards"]["worldpm"])  # what TRL logged as this function's rewards
    convs = [conversation(p, c) for p, c in zip(trainer._logs["prompt"], trainer._logs["completion"])]
    assert len(seen) == len(convs) == 4
    # each prompt's completions as one ranking (the prompt run once), as WorldPMReward sends them
    texts = [c if isinstance(c, str) else c[0]["content"] for c in trainer._logs["completion"]]
    want = [0.0] * 4
    for p in {str(p): p for p in trainer._logs["prompt"]}.values():
        ns = [n for n, q in enumerate(trainer._logs["prompt"]) if q == p]
        for n, s in zip(ns, scorer.rank(p, [texts[n] for n in ns]).scores):
            want[n] = s
    assert seen == torch.tensor(want, dtype=torch.float32).tolist()  # TRL keeps rewards as float32
    assert max(abs(a - b) for a, b in zip(want, scorer.score(convs))) < 1e-5  # = scoring each alone
    assert trainer.state.log_history[0]["rewards/worldpm/mean"] == pytest.approx(sum(want) / 4, abs=1e-5)


def test_remote_rewards_equal_in_process_with_retries(scorer):
    prompts = ["a question", [{"role": "user", "content": "another"}], "a question"]
    completions = ["one answer", [{"role": "assistant", "content": "two"}], "three more words"]
    local = WorldPMReward(scorer)(prompts=prompts, completions=completions, trainer_state=None)
    alone = scorer.score([conversation(p, c) for p, c in zip(prompts, completions)])
    assert max(abs(a - b) for a, b in zip(local, alone)) < 1e-5
    with running(create_app(scorer, api_key="k1")) as url:
        calls, sleeps = [], []

        class Flaky(httpx.HTTPTransport):  # the first try meets a restarting service
            def handle_request(self, request):
                calls.append(request.url)
                if len(calls) == 1:
                    raise httpx.ConnectError("connection refused")
                return super().handle_request(request)
        remote = WorldPMReward(url, api_key="k1", max_items=1,  # one conversation per post: several posts
                               transport=Flaky(), sleep=sleeps.append)
        assert remote(prompts=prompts, completions=completions) == local
        assert sleeps == [1.0] and len(calls) == 1 + 2  # one retry, then one post per prompt
        with pytest.raises(ValueError, match="answered 401: missing or wrong API key"):
            WorldPMReward(url, api_key="wrong")(prompts=prompts, completions=completions)
    calls.clear()
    gone = WorldPMReward(url, retries=3, sleep=sleeps.append)  # the server is gone: three tries, then a clear error
    with pytest.raises(RuntimeError, match=r"/v1/score: gave up after 3 tries \(3 s of waits between them\); "
                                           r"the last: ConnectError"):
        gone(prompts=prompts, completions=completions)
    assert sleeps[1:] == [1.0, 2.0]
    assert WorldPMReward(scorer, name="rm").__name__ == "rm"
    with pytest.raises(ValueError, match="expected a checkpoint directory"):
        WorldPMReward("no/such/dir")
    with pytest.raises(ValueError, match=r"completions\[0\]: expected a string or a list of messages"):
        WorldPMReward(scorer)(prompts=["x"], completions=[42])


def test_a_served_non_finite_score_fails_at_once(small_dir):
    poisoned = Scorer.from_pretrained(small_dir, device="cpu")  # as in test_serve: one token's embedding is inf
    token = poisoned.tokenizer.encode(" habit", add_special_tokens=False)
    assert len(token) == 1
    with torch.no_grad():
        poisoned.model.model.embed_tokens.weight[token[0]] = float("inf")
    posts, sleeps = [], []

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request):
            posts.append(request)
            return super().handle_request(request)
    with running(create_app(poisoned)) as url:
        reward = WorldPMReward(url, transport=Counting(), sleep=sleeps.append)
        with pytest.raises(RuntimeError, match=r"/v1/score answered 500: request 0, conversation 0: the score is "):
            reward(prompts=["tips"], completions=["one habit"])
    assert len(posts) == 1 and sleeps == []  # the same request would fail the same way: no retry
