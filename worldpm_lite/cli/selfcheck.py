"""`worldpm-lite selfcheck`: WorldPM's README pair scored, and checked against the published 72B scores."""

from __future__ import annotations

from ..reference import PUBLISHED_72B, README_PAIR, SELFCHECK_ATOL, matches_published
from .common import add_runtime, load_scorer, model_path, runtime_options


def add(sub) -> None:
    p = sub.add_parser("selfcheck", help="score WorldPM's README pair; compare with the published values for 72B")
    add_runtime(p)
    p.add_argument("--atol", type=float, default=SELFCHECK_ATOL,
                   help=f"allowed absolute difference (default: {SELFCHECK_ATOL}, for bf16)")
    p.add_argument("--no-reference", action="store_true", help="only print the scores (fine-tuned variants)")
    p.set_defaults(run=run)


def run(args) -> int:
    scorer = load_scorer(model_path(args), runtime_options(args))
    scores = scorer.score(README_PAIR)
    print(f"README pair scores: [{scores[0]:.6f}, {scores[1]:.6f}]")
    from ..plan import WORLDPM_72B

    cfg = scorer.model.config
    shape = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
             "vocab_size")
    is_72b = all(getattr(cfg, k) == getattr(WORLDPM_72B, k) for k in shape)
    if not is_72b or args.no_reference:
        print("not WorldPM-72B-shaped: no published scores to compare with" if not is_72b else "comparison skipped")
        return 0
    ok, diffs = matches_published(scores, args.atol)
    print(f"published (WorldPM-72B, bf16): {PUBLISHED_72B}")
    print(f"abs difference: [{diffs[0]:.4f}, {diffs[1]:.4f}]  tolerance {args.atol}")
    if ok:
        print("selfcheck passed")
        return 0
    print("selfcheck FAILED: scores differ from the published WorldPM-72B values. A fine-tuned variant "
          "(WorldPM-72B-HelpSteer2, -UltraFeedback, -RLHFLow) scores differently: use --no-reference for those.")
    return 1
