"""How the small model and its fidelity metrics move with the seed and with stand-ins for another
machine's arithmetic (1 vs 2 threads, 1e-6 jitter of the initial weights, another batch order).

For each training variant: train (make-tiny), then quantize with GPTQ and round-to-nearest at
8/4 bits, the negative controls (3-bit RTN; 4-bit GPTQ fed a permuted Hessian) and 4-bit GPTQ
calibrated on the last tokens of conversations (the earlier calibration), and measure every
candidate against the bf16 model on its held-out pairs. This is the evidence the CI gates in
worldpm_lite/instrument.py are set from.

    python bench/tiny_robustness.py --work /tmp/robust      # about 35 minutes on 2 cores
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from worldpm_lite.chat import load_tokenizer
from worldpm_lite.data import parse_request
from worldpm_lite.fidelity import compare, compared_pairs
from worldpm_lite.instrument import dense_variant, layer_errors, permuted_hessian
from worldpm_lite.quantize.calibration import builtin_calibration, last_tokens
from worldpm_lite.scorer import Scorer
from worldpm_lite.tiny import TINY_QUANT, TrainConfig, heldout_pairs, make_tiny

VARIANTS = {  # name: (training config, torch threads while training)
    "seed 0": (TrainConfig(seed=0), 2),
    "seed 1": (TrainConfig(seed=1), 2),
    "seed 2": (TrainConfig(seed=2), 2),
    "seed 0, 1 thread": (TrainConfig(seed=0), 1),
    "seed 0, init jitter 1e-6": (TrainConfig(seed=0, init_jitter=1e-6), 2),
    "seed 0, other batch order": (TrainConfig(seed=0, shuffle_seed=99), 2),
}
CANDIDATES = {  # name: dense_variant arguments (calibration "last": the last tokens of each conversation)
    "gptq8": dict(bits=8), "rtn8": dict(bits=8, method="rtn"),
    "gptq4": dict(bits=4), "rtn4": dict(bits=4, method="rtn"),
    "gptq4 last-token calibration": dict(bits=4, calibration="last"),
    "control: rtn3": dict(bits=3, method="rtn"), "control: gptq4 permuted Hessian": dict(bits=4, wrong_hessian=True),
}
FLOORS = (0.0, 0.05, 0.1, 0.2)  # agreement on pairs whose reference margin exceeds these x its std
LAYER_SEQS = 200  # held-out conversations for the per-layer errors


def measure(name: str, cfg: TrainConfig, threads: int, work: Path) -> dict:
    slug = name.replace(" ", "").replace(",", "_")
    model_dir = work / slug
    if not (model_dir / "config.json").exists():
        torch.set_num_threads(threads)
        make_tiny(model_dir, train_cfg=cfg, log=lambda m: None)
        torch.set_num_threads(2)
    report = json.loads((model_dir / "training_report.json").read_text())
    held = heldout_pairs(model_dir)
    requests = [parse_request({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) for p in held]
    seqs = [ids for p in held for ids in (p.chosen_ids, p.rejected_ids)]
    tok = load_tokenizer(model_dir)
    calib = {"whole": builtin_calibration(tok, **TINY_QUANT),
             "last": builtin_calibration(tok, **TINY_QUANT, cut=last_tokens)}
    reference = Scorer.from_pretrained(model_dir)
    ref = np.array(reference.score_ids(seqs))
    pairs = compared_pairs(requests)
    out = {"variant": name, "train_seconds": report["train_seconds"], "heldout": report["heldout"], "candidates": {}}
    for cname, args in CANDIDATES.items():
        args = dict(args)
        cal = calib[args.pop("calibration", "whole")]
        wrong = args.pop("wrong_hessian", False)
        cdir = work / f"{slug}-{cname.replace(' ', '_').replace(':', '')}"
        if not (cdir / "config.json").exists():
            dense_variant(model_dir, cdir, cal, hessian_transform=permuted_hessian() if wrong else None, **args)
        cand_scorer = Scorer.from_pretrained(cdir)
        cand = np.array(cand_scorer.score_ids(seqs))
        m = compare(ref, cand, requests, margin=0.5)
        d_ref, d_cand = (s[pairs[:, 0]] - s[pairs[:, 1]] for s in (ref, cand))
        for f in FLOORS:
            clear = np.abs(d_ref) > f * ref.std()
            m[f"agreement_floor_{f}"] = float((np.sign(d_ref) == np.sign(d_cand))[clear].mean())
        m["layer_errors"] = layer_errors(reference.model, cand_scorer.model, seqs[:LAYER_SEQS])
        out["candidates"][cname] = m
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="folder for the trained models and their variants (reused)")
    p.add_argument("--out", default="bench/results/tiny_robustness.json")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start, results = time.time(), []
    for name, (cfg, threads) in VARIANTS.items():
        results.append(measure(name, cfg, threads, work))
        r = results[-1]
        print(f"{name}: held-out accuracy {r['heldout']['pairwise_accuracy']:.3f} "
              f"({time.time() - start:.0f}s)", flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    acc = [r["heldout"]["pairwise_accuracy"] for r in results]
    print(f"held-out accuracy min / median / max: {min(acc):.3f} / {statistics.median(acc):.3f} / {max(acc):.3f}")


if __name__ == "__main__":
    main()
