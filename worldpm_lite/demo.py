"""`worldpm-lite demo`: the whole path on the built-in small model, offline, on the CPU:
train (once), quantize to 8 and 4 bits (once), score with all three side by side, and end with
how faithful the quantized variants are on the held-out pairs."""

from __future__ import annotations

import json

import numpy as np

from .data import parse_request
from .fidelity import compare
from .reference import README_LABELS, README_PAIR, published_text
from .scorer import Scorer
from .tiny import REJECTION_KINDS, heldout_pairs, tiny_model_dir, tiny_quantized_dir

ROWS_PER_KIND = 3


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def run_demo(seed: int = 0, log=print, fidelity_pairs: int | None = None):
    """fidelity_pairs: how many held-out pairs the closing fidelity summary scores (default: all)."""
    path = tiny_model_dir(seed, log=log)
    variants = {"bf16": path, "8-bit": tiny_quantized_dir(8, seed, log=log),
                "4-bit": tiny_quantized_dir(4, seed, log=log)}
    scorers = {name: Scorer.from_pretrained(d, device="cpu") for name, d in variants.items()}
    report = json.loads((path / "training_report.json").read_text())
    cfg, h = scorers["bf16"].model.config, report["heldout"]
    print(f"model: {path}")
    print(f"  small WorldPM: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; "
          f"held-out pairwise accuracy {h['pairwise_accuracy']:.3f}, score std {h['score_std']:.2f}")
    print("  variants: bf16 weights; 8-bit and 4-bit GPTQ (group 128, sym) of the same model; what runs each:")
    for name, scorer in scorers.items():
        print(f"  {name:>6}: {scorer.backend}")
    print()

    heads = "".join(f"{n:>8}" for n in variants)
    readme = {n: s.score(README_PAIR) for n, s in scorers.items()}
    print(f"WorldPM README pair (WorldPM-72B gives {published_text()})\n  {heads}")
    for k, label in enumerate(README_LABELS):
        print("  " + "".join(f"{readme[n][k]:+8.3f}" for n in variants) + f"  {label}")

    all_pairs = heldout_pairs(path)
    readable = [p for p in all_pairs if 25 <= len(p.prompt) <= 120 and p.prompt.isascii()]
    pairs = [p for kind in REJECTION_KINDS for p in [q for q in readable if q.kind == kind][:ROWS_PER_KIND]]
    convs = [[{"role": "user", "content": p.prompt}, {"role": "assistant", "content": r}]
             for p in pairs for r in (p.chosen, p.rejected)]
    scores = {n: s.score(convs) for n, s in scorers.items()}
    print("\nheld-out ShareGPT pairs: score of the real reply minus the worse one (>0: real reply preferred)")
    print(f"  {heads}  {'worse reply is':<12} prompt")
    for k, p in enumerate(pairs):
        margins = "".join(f"{scores[n][2 * k] - scores[n][2 * k + 1]:+8.3f}" for n in variants)
        print(f"  {margins}  {p.kind:<12} {_clip(p.prompt, 50)}")
    print()
    for n in variants:
        wins = sum(scores[n][2 * k] > scores[n][2 * k + 1] for k in range(len(pairs)))
        drift = max(abs(a - b) for a, b in zip(scores[n], scores["bf16"]))
        agree = sum((scores[n][2 * k] > scores[n][2 * k + 1]) == (scores["bf16"][2 * k] > scores["bf16"][2 * k + 1])
                    for k in range(len(pairs)))
        print(f"  {n:>5}: real reply preferred in {wins}/{len(pairs)}; same choice as bf16 in {agree}/{len(pairs)}; "
              f"largest score change vs bf16 {drift:.3f}")

    some = all_pairs[:fidelity_pairs]
    requests = [parse_request({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) for p in some]
    seqs = [ids for p in some for ids in (p.chosen_ids, p.rejected_ids)]
    held = {n: np.array(s.score_ids(seqs)) for n, s in scorers.items()}
    which = f"all {len(all_pairs)}" if len(some) == len(all_pairs) else f"the first {len(some)} of {len(all_pairs)}"
    print(f"\nfidelity on {which} held-out pairs ({len(seqs)} conversations), vs bf16 "
          "(worldpm-lite fidelity writes the full report)")
    print(f"  {'':>5}  {'agreement':>9}  {'Spearman':>8}  {'mean|err|':>9}  {'max|err|':>8}  {'accuracy':>8}")
    for n in ("8-bit", "4-bit"):
        m = compare(held["bf16"], held[n], requests, margin=0.5)
        print(f"  {n:>5}  {m['pairwise_agreement']:9.4f}  {m['spearman']:8.4f}  {m['mean_abs_error']:9.4f}  "
              f"{m['max_abs_error']:8.4f}  {m['label_accuracy']:8.3f}")
    print(f"  (bf16 held-out accuracy {compare(held['bf16'], held['bf16'], requests, 0.5)['label_accuracy']:.3f})")
