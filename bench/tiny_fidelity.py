"""The fidelity report for the small model: its 500 held-out ShareGPT preference pairs scored by
bf16 (reference), GPTQ 8-bit, GPTQ 4-bit, RTN 4-bit (the demo's variants and the quantizer's
baseline) and bitsandbytes int8 / NF4 loaded from bf16: one table answering "is GPTQ worth it here?".

    python bench/tiny_fidelity.py [--report bench/results/tiny_fidelity]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from worldpm_lite.cli import main as cli
from worldpm_lite.tiny import heldout_pairs, tiny_model_dir, tiny_quantized_dir


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", default="bench/results/tiny_fidelity")
    args = ap.parse_args()
    base = tiny_model_dir(0)
    candidates = [tiny_quantized_dir(8), tiny_quantized_dir(4), tiny_quantized_dir(4, method="rtn"),
                  f"bnb-int8:{base}", f"bnb-nf4:{base}"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "heldout.jsonl"
        data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                                for p in heldout_pairs(base)))
        return cli(["fidelity", "--reference", str(base), *(a for c in candidates for a in ("--candidate", str(c))),
                    "--data", str(data), "--report", args.report, "--overwrite"])


if __name__ == "__main__":
    raise SystemExit(main())
