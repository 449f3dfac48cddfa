"""`worldpm-lite demo`: the scoring path on the built-in small model, offline, on the CPU."""

from __future__ import annotations

import json

from .cli import README_PAIR
from .scorer import Scorer
from .tiny import REJECTION_KINDS, heldout_pairs, tiny_model_dir

ROWS_PER_KIND = 3


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def run_demo(seed: int = 0, log=print):
    path = tiny_model_dir(seed, log=log)
    report = json.loads((path / "training_report.json").read_text())
    scorer = Scorer.from_pretrained(path, device="cpu")
    cfg, h = scorer.model.config, report["heldout"]
    print(f"model: {path}")
    print(f"  small WorldPM: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; "
          f"held-out pairwise accuracy {h['pairwise_accuracy']:.3f}, score std {h['score_std']:.2f}")
    print("  backend: torch reference, float32 on CPU\n")

    readme = scorer.score(README_PAIR)
    print("WorldPM README pair (WorldPM-72B gives +0.630 vs -1.643):")
    print(f"  {readme[0]:+.3f}  helpful three-tip answer")
    print(f"  {readme[1]:+.3f}  'just try sleeping earlier or take some pills...'\n")

    readable = [p for p in heldout_pairs(path) if 25 <= len(p.prompt) <= 120 and p.prompt.isascii()]
    pairs = [p for kind in REJECTION_KINDS for p in [q for q in readable if q.kind == kind][:ROWS_PER_KIND]]
    scores = scorer.score([[{"role": "user", "content": p.prompt}, {"role": "assistant", "content": r}]
                           for p in pairs for r in (p.chosen, p.rejected)])
    print("held-out ShareGPT pairs: the real reply vs a worse one")
    print(f"  {'real':>7} {'worse':>7}  {'worse reply is':<12} prompt")
    for k, p in enumerate(pairs):
        real, worse = scores[2 * k], scores[2 * k + 1]
        print(f"  {real:+7.3f} {worse:+7.3f}  {p.kind:<12} {'ok' if real > worse else '  '} {_clip(p.prompt, 50)}")
    wins = sum(scores[2 * k] > scores[2 * k + 1] for k in range(len(pairs)))
    print(f"\nreal reply preferred in {wins} of {len(pairs)} pairs shown "
          f"(by kind over all {report['heldout_pairs']} held-out pairs: "
          + ", ".join(f"{k} {v:.2f}" for k, v in h["accuracy_by_kind"].items()) + ")")
