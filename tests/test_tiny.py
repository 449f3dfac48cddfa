"""The trained small model: the instrument of later fidelity measurements must really discriminate."""

import json
import re

from worldpm_lite.cli import main
from worldpm_lite.scorer import Scorer


def test_tiny_model_beats_chance_with_spread(tiny_dir, ci_notes):
    """Recipe 3 reached 0.830-0.868 on six variants (seeds, threads, jitter, batch order: bench/RESULTS.md)."""
    report = json.loads((tiny_dir / "training_report.json").read_text())
    h = report["heldout"]
    ci_notes.append(f"small model {tiny_dir.name}: held-out pairwise accuracy {h['pairwise_accuracy']:.3f} "
                    f"({', '.join(f'{k} {v:.3f}' for k, v in h['accuracy_by_kind'].items())}), score std "
                    f"{h['score_std']:.3f}, trained in {report['train_seconds']:.0f} s")
    assert h["pairwise_accuracy"] >= 0.74
    assert h["score_std"] >= 0.5


def test_saved_model_reproduces_reported_heldout_accuracy(tiny_dir, tiny_heldout):
    """Score the held-out pairs through the public Scorer: same accuracy as the training report."""
    report = json.loads((tiny_dir / "training_report.json").read_text())
    held = tiny_heldout
    assert len(held) == report["heldout_pairs"]
    scorer = Scorer.from_pretrained(tiny_dir)
    # the pairs come from the cache (heldout_pairs): their ids are what the checkpoint's tokenizer gives now
    assert [ids for p in held for ids in (p.chosen_ids, p.rejected_ids)] == scorer.encode(
        [[{"role": "user", "content": p.prompt}, {"role": "assistant", "content": r}]
         for p in held for r in (p.chosen, p.rejected)])
    scores = scorer.score_ids([ids for p in held for ids in (p.chosen_ids, p.rejected_ids)])
    acc = sum(scores[2 * k] > scores[2 * k + 1] for k in range(len(held))) / len(held)
    assert abs(acc - report["heldout"]["pairwise_accuracy"]) < 0.01


def test_demo_runs_offline(tiny_dir, capsys):
    assert main(["demo", "--pairs", "100"]) == 0  # the gates measure all 500 (test_fidelity)
    out = capsys.readouterr().out
    assert "WorldPM README pair" in out and "real reply preferred in" in out
    assert "GPTQ 4-bit linears, torch reference" in out  # which backend ran
    summary = out.split("fidelity on the first 100 of 500 held-out pairs")[1]
    summary = re.search(r"4-bit\s+([01]\.\d+)\s+([01]\.\d+)", summary)
    assert float(summary.group(1)) >= 0.97 and float(summary.group(2)) >= 0.98


def test_make_tiny_cli_is_deterministic_and_refuses_existing(tmp_path, capsys):
    args = ["--seed", "3", "--steps", "3", "--pairs", "96", "--heldout", "32"]
    for name in ("a", "b"):
        assert main(["make-tiny", str(tmp_path / name), *args]) == 0
    assert "held-out pairwise accuracy" in capsys.readouterr().out
    a, b = (tmp_path / n / "model.safetensors" for n in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    report = json.loads((tmp_path / "a" / "training_report.json").read_text())
    assert report["train_config"]["steps"] == 3 and report["heldout_pairs"] == 32
    Scorer.from_pretrained(tmp_path / "a")  # a complete, loadable checkpoint with its tokenizer
    assert main(["make-tiny", str(tmp_path / "a"), *args]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["make-tiny", str(tmp_path / "c"), "--pairs", "10", "--heldout", "20"]) == 2
    assert "heldout (20) must be smaller than pairs (10)" in capsys.readouterr().err
    assert main(["make-tiny", str(tmp_path / "d"), "--lr", "0"]) == 2
    assert "lr in (0, 1)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no half-written directories
