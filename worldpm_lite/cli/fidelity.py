"""`worldpm-lite fidelity`: how closely candidates' scores follow a reference's (fidelity.py)."""

from __future__ import annotations

from pathlib import Path

from ..errors import OutputExists, UsageError
from .common import add_compute, log, resolve_device, runtime_options


def add(sub) -> None:
    p = sub.add_parser("fidelity", help="how closely quantized models' scores follow a reference's",
                       description="Score one JSONL file (any format `score` reads) with a reference model and each "
                       "candidate, and write report.json, report.md, scatter.png and errors.png: pairwise agreement "
                       "(all compared pairs, and those with a clear reference margin), label accuracy for "
                       "chosen/rejected data, Spearman, Pearson, Kendall tau per ranking prompt, mean/max absolute "
                       "error and the linear fit of candidate on reference scores.")
    p.add_argument("--reference", required=True, help="the reference model (usually the bf16 one): a directory, or a "
                   "hub id such as Qwen/WorldPM-72B (at a revision: Qwen/WorldPM-72B@REV)")
    p.add_argument("--candidate", required=True, action="append", help="a model to compare (a directory or a hub "
                   "id); repeat for more. bnb-nf4:MODEL or bnb-int8:MODEL loads a bf16 one through bitsandbytes")
    p.add_argument("--data", required=True, help="JSONL: conversations, chosen/rejected pairs or rankings")
    p.add_argument("--report", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--margin", type=float, default=0.5,
                   help="also report agreement on pairs whose reference scores differ by more than this (default 0.5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (models already done are not "
                   "scored again; the one in progress continues from its last recorded line)")
    add_compute(p)
    p.set_defaults(run=run)


def run(args) -> None:
    from ..fidelity import Candidate, run_fidelity, staging_dir, write_report

    if Path(args.report).exists() and not args.overwrite:
        raise OutputExists(f"--report {args.report}: already exists (pass --overwrite to replace it)")
    if not Path(args.report).absolute().parent.is_dir():
        raise UsageError(f"--report {args.report}: folder {Path(args.report).absolute().parent} does not exist")
    options, placed = resolve_device(runtime_options(args))
    report, ref, scores = run_fidelity(args.reference, [Candidate.parse(c) for c in args.candidate], args.data,
                                       margin=args.margin, scorer_args=options, staging=staging_dir(args.report),
                                       resume=args.resume, log=log, placed=placed)
    out = write_report(report, ref, scores, args.report, overwrite=args.overwrite)
    print(f"wrote {out}/report.json, report.md, scatter.png, errors.png")
    print(f"{'candidate':<32} {'agreement':>9} {'Spearman':>9} {'mean|err|':>9} {'max|err|':>9}")
    for c in report["candidates"]:
        m = c["metrics"]
        agreement = "n/a" if m["pairwise_agreement"] is None else f"{m['pairwise_agreement']:.4f}"
        spearman = "n/a" if m["spearman"] is None else f"{m['spearman']:.4f}"
        print(f"{c['label'][:32]:<32} {agreement:>9} {spearman:>9} {m['mean_abs_error']:>9.4f} "
              f"{m['max_abs_error']:>9.4f}")
