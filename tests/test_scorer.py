import random

import pytest

from worldpm_lite.chat import ConversationError
from worldpm_lite.scorer import Comparison, ConversationTooLong, Scorer, plan_batches

SHORT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]


def test_plan_batches_covers_every_index_once_within_budget():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 60))]
        budget = rng.randint(1, 2000)
        batches = plan_batches(lengths, budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            width = max(lengths[i] for i in b)
            assert len(b) == 1 or len(b) * width <= budget


@pytest.fixture(scope="module")
def scorer(small_dir):
    return Scorer.from_pretrained(small_dir, device="cpu")


def test_results_in_input_order(scorer):
    convs = [[{"role": "user", "content": "Q" * k}, {"role": "assistant", "content": "A " * (3 * k)}]
             for k in (5, 1, 9, 3)]
    singles = [scorer.score([c])[0] for c in convs]
    assert scorer.score(convs) == pytest.approx(singles, abs=1e-5)


def test_compare_and_rank(scorer):
    a, b, c = "Keep a fixed schedule.", "idk lol", "Avoid screens at night and keep the room dark."
    cmp = scorer.compare("Tips for better sleep?", a, b)
    assert isinstance(cmp, Comparison)
    direct = scorer.score([[{"role": "user", "content": "Tips for better sleep?"}, {"role": "assistant", "content": r}]
                           for r in (a, b, c)])
    assert (cmp.score_a, cmp.score_b) == pytest.approx(direct[:2], abs=1e-5)
    assert 0 < cmp.prob_a < 1 and (cmp.prob_a > 0.5) == (cmp.preferred == "a")
    ranking = scorer.rank("Tips for better sleep?", [a, b, c])
    assert ranking.scores == pytest.approx(direct, abs=1e-5)
    assert [ranking.scores[i] for i in ranking.order] == sorted(ranking.scores, reverse=True)
    prior = [{"role": "user", "content": "Tips for better sleep?"}]
    assert scorer.compare(prior, a, b).score_a == pytest.approx(cmp.score_a, abs=1e-5)


def test_too_long_is_an_error_unless_truncation_asked(small_dir, scorer):
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(ConversationTooLong, match=r"conversation 1 has \d+ tokens; the model reads at most 96"):
        scorer.score([SHORT, long])
    trunc = Scorer.from_pretrained(small_dir, truncation="left")
    ids = trunc.encode([long])[0]
    assert len(ids) == 96 and ids[-1] == 151643
    assert trunc.score([long])[0] == pytest.approx(trunc.score_ids([ids])[0], abs=1e-6)


def test_bad_arguments(small_dir, scorer):
    with pytest.raises(ValueError, match="truncation"):
        Scorer(scorer.model, scorer.tokenizer, truncation="right")
    with pytest.raises(ValueError, match="token_budget"):
        Scorer(scorer.model, scorer.tokenizer, token_budget=0)
    assert scorer.token_budget == 2048  # the CPU default (8192 on a GPU)
    with pytest.raises(ValueError, match="dtype: expected one of"):
        Scorer.from_pretrained(small_dir, dtype="int4")
    with pytest.raises(ConversationError, match="role"):
        scorer.score([[{"role": "robot", "content": "x"}]])
