"""The trained small model: the instrument of later fidelity measurements must really discriminate."""

import json

from worldpm_lite.cli import main
from worldpm_lite.scorer import Scorer
from worldpm_lite.tiny import heldout_pairs


def test_tiny_model_beats_chance_with_spread(tiny_dir):
    report = json.loads((tiny_dir / "training_report.json").read_text())
    assert report["heldout"]["pairwise_accuracy"] >= 0.7
    assert report["heldout"]["score_std"] >= 0.5


def test_saved_model_reproduces_reported_heldout_accuracy(tiny_dir):
    """Score the held-out pairs through the public Scorer: same accuracy as the training report."""
    report = json.loads((tiny_dir / "training_report.json").read_text())
    held = heldout_pairs(tiny_dir)
    assert len(held) == report["heldout_pairs"]
    scorer = Scorer.from_pretrained(tiny_dir)
    assert [p.chosen_ids for p in held[:5]] == scorer.encode([[{"role": "user", "content": p.prompt},
                                                                {"role": "assistant", "content": p.chosen}]
                                                               for p in held[:5]])
    scores = scorer.score_ids([ids for p in held for ids in (p.chosen_ids, p.rejected_ids)])
    acc = sum(scores[2 * k] > scores[2 * k + 1] for k in range(len(held))) / len(held)
    assert abs(acc - report["heldout"]["pairwise_accuracy"]) < 0.01


def test_demo_runs_offline(tiny_dir, capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "WorldPM README pair" in out and "real reply preferred in" in out
