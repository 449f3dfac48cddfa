"""`worldpm-lite demo`: the scoring path on the built-in small model, offline, on the CPU."""

from __future__ import annotations

import json
import random

from .cli import README_PAIR
from .data import sharegpt_conversations
from .scorer import Scorer
from .tiny import tiny_model_dir

DEMO_SKIP = 9000  # conversations this far into ShareGPT are past those the small model trained on


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def demo_rows(seed: int = 0, count: int = 4) -> list[tuple[str, list[dict], list[dict]]]:
    """(label, real conversation, same conversation with the reply's words shuffled) from held-out ShareGPT."""
    rng = random.Random(seed)
    rows = []
    for i, conv in enumerate(sharegpt_conversations()):
        if i < DEMO_SKIP:
            continue
        prompt, reply = conv[0]["content"], conv[1]["content"]
        if not 40 <= len(reply) <= 500 or len(prompt) > 300:
            continue
        words = reply.split()
        rng.shuffle(words)
        rows.append((prompt, conv[:2], [conv[0], {"role": "assistant", "content": " ".join(words)}]))
        if len(rows) == count:
            break
    return rows


def run_demo(seed: int = 0, log=print):
    path = tiny_model_dir(seed, log=log)
    report = json.loads((path / "training_report.json").read_text())
    scorer = Scorer.from_pretrained(path, device="cpu")
    h = report["heldout"]
    print(f"model: {path}")
    print(f"  small WorldPM ({scorer.model.config.num_hidden_layers} layers, hidden {scorer.model.config.hidden_size}, "
          f"vocab {scorer.model.config.vocab_size}); held-out pairwise accuracy {h['pairwise_accuracy']:.3f}, "
          f"score std {h['score_std']:.2f}")
    print("  backend: torch reference, float32 on CPU\n")

    readme = scorer.score(README_PAIR)
    print("WorldPM README pair (WorldPM-72B gives 0.630 vs -1.643):")
    print(f"  {readme[0]:+.3f}  helpful three-tip answer")
    print(f"  {readme[1]:+.3f}  'just try sleeping earlier or take some pills...'\n")

    rows = demo_rows(seed)
    scores = scorer.score([c for _, real, shuffled in rows for c in (real, shuffled)])
    print(f"{'real reply':>10} {'shuffled':>9}  prompt (held-out ShareGPT)")
    for k, (prompt, _, _) in enumerate(rows):
        real, shuffled = scores[2 * k], scores[2 * k + 1]
        mark = "ok" if real > shuffled else "  "
        print(f"{real:>+10.3f} {shuffled:>+9.3f}  {mark} {_clip(prompt, 60)}")
    wins = sum(scores[2 * k] > scores[2 * k + 1] for k in range(len(rows)))
    print(f"\nreal reply preferred in {wins} of {len(rows)} pairs")
