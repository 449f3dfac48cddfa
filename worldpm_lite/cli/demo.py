"""`worldpm-lite demo`: the whole path on the built-in small model, offline, on the CPU (demo.py)."""

from __future__ import annotations

from ..errors import UsageError
from .common import log


def add(sub) -> None:
    p = sub.add_parser("demo", help="the whole path on the built-in small model, offline, on the CPU")
    p.add_argument("--seed", type=int, default=0, help="which small model (built once and cached)")
    p.add_argument("--pairs", type=int, help="held-out pairs in the closing fidelity summary (default: all 500)")
    p.set_defaults(run=run)


def run(args) -> None:
    from ..demo import run_demo

    if args.pairs is not None and args.pairs < 1:
        raise UsageError(f"--pairs: expected at least 1, found {args.pairs}")
    run_demo(seed=args.seed, log=log, fidelity_pairs=args.pairs)
