"""`worldpm-lite make-tiny`: train the small WorldPM-architecture model (tiny.py)."""

from __future__ import annotations

from ..options import TrainConfig
from .common import log


def add(sub) -> None:
    p = sub.add_parser("make-tiny", help="train the small WorldPM-architecture model (about 3 minutes on 2 cores)")
    p.add_argument("out", help="new directory to write")
    p.add_argument("--seed", type=int, default=0, help="same seed, same data order and weights (default: 0)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps,
                   help=f"optimizer steps (default: {TrainConfig.steps})")
    p.add_argument("--pairs", type=int, default=TrainConfig.pairs,
                   help=f"preference pairs built from ShareGPT (default: {TrainConfig.pairs})")
    p.add_argument("--heldout", type=int, default=TrainConfig.heldout,
                   help=f"of those, held out for the accuracy report (default: {TrainConfig.heldout})")
    p.add_argument("--lr", type=float, default=TrainConfig.lr,
                   help=f"peak learning rate (default: {TrainConfig.lr}; 3e-3, recipe 2's, trains unreliably)")
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay,
                   help=f"AdamW weight decay on weight matrices (default: {TrainConfig.weight_decay})")
    p.set_defaults(run=run)


def run(args) -> None:
    from ..tiny import make_tiny

    cfg = TrainConfig(seed=args.seed, steps=args.steps, pairs=args.pairs, heldout=args.heldout, lr=args.lr,
                      weight_decay=args.weight_decay)
    report = make_tiny(args.out, log=log, train_cfg=cfg)
    h = report["heldout"]
    print(f"wrote {args.out}: held-out pairwise accuracy {h['pairwise_accuracy']:.3f} on {report['heldout_pairs']} "
          f"pairs, score std {h['score_std']:.3f}, range [{h['score_min']:.2f}, {h['score_max']:.2f}], "
          f"trained in {report['train_seconds']:.0f}s")
    print("  accuracy by kind of rejected reply: "
          + ", ".join(f"{k} {v:.3f}" for k, v in h["accuracy_by_kind"].items()))
