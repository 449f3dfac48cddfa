"""How closely the small model's 8-bit and 4-bit GPTQ variants (as `demo` builds them) follow bf16
on its 500 held-out preference pairs: pairwise agreement, Spearman correlation of scores, error.

    python bench/tiny_fidelity.py [--out bench/results/tiny_fidelity.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from worldpm_lite.scorer import Scorer
from worldpm_lite.tiny import heldout_pairs, tiny_model_dir, tiny_quantized_dir


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (torch.argsort(torch.argsort(x)).double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/tiny_fidelity.json")
    args = ap.parse_args()
    base_dir = tiny_model_dir(0)
    pairs = heldout_pairs(base_dir)
    seqs = [ids for p in pairs for ids in (p.chosen_ids, p.rejected_ids)]
    variants = {"bf16": base_dir, "gptq8": tiny_quantized_dir(8), "gptq4": tiny_quantized_dir(4)}
    scores = {n: torch.tensor(Scorer.from_pretrained(d).score_ids(seqs)) for n, d in variants.items()}
    ref = scores["bf16"]
    ref_pref = ref[0::2] > ref[1::2]
    rows = {}
    for n, s in scores.items():
        pref = s[0::2] > s[1::2]
        rows[n] = {"heldout_accuracy": pref.float().mean().item(),
                   "pairwise_agreement_with_bf16": (pref == ref_pref).float().mean().item(),
                   "spearman_with_bf16": spearman(s, ref), "mean_abs_error": (s - ref).abs().mean().item(),
                   "max_abs_error": (s - ref).abs().max().item()}
        r = rows[n]
        print(f"{n:>6}: accuracy {r['heldout_accuracy']:.3f}  agreement {r['pairwise_agreement_with_bf16']:.4f}  "
              f"spearman {r['spearman_with_bf16']:.4f}  mean|err| {r['mean_abs_error']:.4f}  "
              f"max|err| {r['max_abs_error']:.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"pairs": len(pairs), "variants": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
