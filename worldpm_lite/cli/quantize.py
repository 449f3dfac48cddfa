"""`worldpm-lite quantize`: GPTQ a bf16 WorldPM checkpoint to 4 or 8 bits (quantize/run.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..options import QuantizeSettings as Q
from .common import add_model, log, model_path


def add(sub) -> None:
    p = sub.add_parser("quantize", help="GPTQ a WorldPM checkpoint to 4 or 8 bits, one layer in memory at a time",
                       description="Quantize every decoder linear of a bf16 WorldPM checkpoint with GPTQ and write a "
                       "standard GPTQ checkpoint (qweight/qzeros/scales/g_idx; embeddings, norms and the reward head "
                       "stay unquantized). Peak memory is one layer plus the calibration activations, whatever the "
                       "depth. An interrupted run continues with --resume.")
    add_model(p, "the bf16 source: a hub id such as Qwen/WorldPM-72B (downloaded once into the Hugging Face cache) "
              "or a checkpoint directory (never modified)")
    p.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    p.add_argument("--bits", type=int, choices=[4, 8], default=Q.bits, help=f"default: {Q.bits}")
    p.add_argument("--group-size", type=int, default=Q.group_size,
                   help=f"input columns per scale; -1 for one per output row (default: {Q.group_size})")
    p.add_argument("--act-order", action="store_true", help="quantize columns by decreasing activation energy "
                   "(desc_act; usually more accurate, g_idx then permutes groups)")
    p.add_argument("--asym", action="store_true", help="asymmetric grid with a zero point (default: symmetric)")
    p.add_argument("--method", choices=["gptq", "rtn"], default=Q.method,
                   help="gptq, or rtn: round-to-nearest on the same grid, the baseline (default: gptq)")
    p.add_argument("--calibration", help="JSONL conversations in any format `score` reads (default: built-in "
                   "ShareGPT conversations)")
    p.add_argument("--samples", type=int, default=Q.samples, help=f"calibration conversations (default: {Q.samples})")
    p.add_argument("--seq-len", type=int, default=Q.seq_len,
                   help=f"keep at most the last N tokens of each (default: {Q.seq_len})")
    p.add_argument("--device", default=Q.device, help="where the GPTQ math runs: auto (GPU 0 when a GPU is visible, "
                   "else the CPU: a 72B layer takes ~25 s on an H200, ~28 min on 2 CPU cores), cpu, cuda, cuda:N "
                   f"(default: {Q.device})")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished layer")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory when done")
    p.set_defaults(run=run)


def run(args) -> None:
    from tqdm import tqdm

    from ..devices import check_device, describe
    from ..quantize.run import quantize_checkpoint

    settings = Q(bits=args.bits, group_size=args.group_size, sym=not args.asym, act_order=args.act_order,
                 method=args.method, samples=args.samples, seq_len=args.seq_len, calibration=args.calibration,
                 device=args.device)
    log(describe(check_device(args.device)))
    source = model_path(args)  # a hub id is downloaded first, with its own progress bars
    with tqdm(desc="quantizing layers", unit="layer", file=sys.stderr, dynamic_ncols=True, delay=1) as bar:
        summary = quantize_checkpoint(source, args.out, settings, resume=args.resume, overwrite=args.overwrite,
                                      log=lambda m: bar.write(m, file=sys.stderr), layer_bar=bar)
    gib = 1 << 30
    worst = max(summary["layers"], key=lambda r: r["output_rel_error"], default=None)
    print(f"wrote {args.out}: {args.bits}-bit {args.method.upper()}, group {args.group_size}, "
          f"{summary['calibration_sequences']} calibration sequences ({summary['calibration_tokens']} tokens)")
    print(f"  time {summary['seconds']:.1f} s, peak host memory {summary['peak_rss_mib'] / 1024:.2f} GiB")
    out_b, src_b = summary["output_weight_bytes"], summary["source_weight_bytes"]
    print(f"  weights {out_b / gib:.3f} GiB vs source {src_b / gib:.3f} GiB ({out_b / src_b:.1%})")
    if worst is not None:
        print(f"  largest layer output error (relative, calibration): {worst['output_rel_error']:.2e} "
              f"in layer {worst['layer']}; per-layer log in {Path(args.out) / 'quantize_log.json'}")
