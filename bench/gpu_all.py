"""Every GPU check in one command, for the next lent GPU: at most 9 minutes on one H100 or H200.

    python bench/gpu_all.py                  # on the GPU: every check, then the table
    python bench/gpu_all.py --smoke          # every check's logic on the CPU (tiny shapes, Triton's interpreter)
    python bench/gpu_all.py --only kernels,tail --again

Each check runs in a subprocess of its own with its own time limit (the rest of --budget-s when less
is left). As each finishes, its record (the card, the code it ran, its status, seconds, its targets
and its numbers) is appended to bench/results/gpu_all.json (gpu_all-smoke.json with --smoke) and its
PASS/FAIL rows are printed, so a run that is cut short keeps what it measured. A second call skips
each check already measured on the same card and the same code (a sha256 of worldpm_lite/ and
bench/*.py; --again measures again). Nothing here changes the card's settings (clocks, power limits,
MIG, persistence, ECC): only this process's allocator cap and TF32 switch, which end with it.

The checks, in the order they run (what matters most first):
  kernels     every kernel against its torch reference on fresh random inputs: dequantize, the fused
              dequant-matmul, the fused tail; the GPTQ block kernel bit-identical to the torch loop
              (gptq(kernel=True) == gptq(kernel=False), 4 and 8 bits, act-order) and the compiler's
              register and spill count for it (target: no spills)
  tail        the fused tail's GB/s against the card's copy bandwidth (target >= 70%)
  w4a16       4-bit dequantize + GEMM vs bf16 at M = 1024 and 4096 (target >= 0.95x), the fused
              kernel at M <= 64
  model80     80-layer WorldPM-72B-shaped 4-bit model (random packed tensors): tokens/s, MFU, allocator
              slack; packed vs padded; GRPO-shaped traffic (a 1,500-token prompt, 8 answers of 300)
              with the prompt shared vs each answer alone (target >= 2x)
  gpu0_share  GPU 0's part of the 2 x 24 GiB plan under a 24 GiB allocator cap, worst-case batches
  h2d         host-to-device GB/s from pinned (registered as the executor pins) and pageable memory
  streamed    the streamed executor under a 24 GiB cap vs every layer resident (target >= 0.9x at the
              plan's budget), peak memory within the cap, and the host syncs per streamed batch
              (target <= 1: reading the scores)
  cuda1       a model placed on cuda:1, resident and streamed, scores equal to cuda:0's (two GPUs only)
  gptq_layer  GPTQ of one full-size decoder layer: seconds by phase, peak memory
  tf32        GPTQ's held-out output error with the calibration passes in TF32 vs fp32, on full-size
              q/k/v and o with 16k calibration tokens (target: within 1%)
Exit status: 1 when a correctness check failed or a check could not run, else 0 (a missed performance
target is reported, not an error).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUDGET_S = 540  # 9 minutes of checks; the device tool's 15 minutes also pay the start and a rerun
MIN_S = 20  # a check is not started with less time than this left
# name -> (seconds allowed on a GPU, seconds allowed with --smoke)
LIMITS = {"kernels": (120, 120), "tail": (45, 60), "w4a16": (60, 60), "model80": (120, 90), "gpu0_share": (60, 60),
          "h2d": (30, 30), "streamed": (150, 90), "cuda1": (60, 60), "gptq_layer": (90, 90), "tf32": (90, 90)}


def code_id() -> str:
    """sha256 of the code a check runs: the package and the benches (results and notes excluded)."""
    digest = hashlib.sha256()
    for path in sorted([*(ROOT / "worldpm_lite").rglob("*.py"), *BENCH.glob("*.py")]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def card() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu (interpreter)"
    n = torch.cuda.device_count()
    return f"{n} x {torch.cuda.get_device_name(0)}" if n > 1 else torch.cuda.get_device_name(0)


def load(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def append(path: Path, record: dict) -> None:
    """One more record, written whole through a temporary file (a run killed mid-write keeps the last)."""
    records = load(path) + [record]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(tmp, path)


def rows(record: dict) -> list[str]:
    out = []
    for t in record.get("targets", []):
        sign = ">=" if t.get("higher_is_better", True) else "<="
        out.append(f"  {'PASS' if t['pass'] else 'FAIL'}  {record['check']}: {t['target']}: {t['value']:.3g} "
                   f"{t['unit']} (target {sign} {t['goal']:.3g})".rstrip())
    out += [f"  FAILED {record['check']}: {f}" for f in record.get("failures", [])]
    if record["status"] not in ("ok", "fail"):
        out.append(f"  {record['status'].upper():<5} {record['check']}: {record.get('why', '')}")
    return out


def run_check(name: str, smoke: bool, limit: float) -> dict:
    """The check in a subprocess of its own: its record (status ok, fail, error or timeout)."""
    out = BENCH / "results" / f".gpu_all-{name}-{os.getpid()}.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if smoke:
        env["TRITON_INTERPRET"] = "1"  # read when Triton is first imported: set before the child starts
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--result", str(out)]
    cmd += ["--smoke"] if smoke else []
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=limit)
        status = None if proc.returncode == 0 else f"error (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        status = "timeout"
    seconds = round(time.monotonic() - start, 1)
    try:
        child = json.loads(out.read_text())
        out.unlink()
    except (FileNotFoundError, json.JSONDecodeError):
        child = {}
    record = {"check": name, "seconds": seconds, "limit_s": round(limit), **child}
    if status == "timeout":
        record |= {"status": "timeout", "why": f"not done within {limit:.0f} s"}
    elif not child:
        record |= {"status": "error", "why": f"{status or 'no result'}: see its output above"}
    else:
        record["status"] = "fail" if child["failures"] else "ok"
    return record


def orchestrate(args) -> int:
    import torch

    names = list(LIMITS) if not args.only else args.only.split(",")
    unknown = [n for n in names if n not in LIMITS]
    if unknown:
        sys.exit(f"--only: unknown checks {unknown}; known: {', '.join(LIMITS)}")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_all: no CUDA device visible; --smoke runs every check's logic on the CPU")
    path = Path(args.out or BENCH / "results" / f"gpu_all{'-smoke' * args.smoke}.json")
    where, code = card(), code_id()
    head = {"card": where, "code": code, "smoke": args.smoke, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    same = (where, code, args.smoke)
    done = {r["check"]: r for r in load(path)  # the last complete record of each check on this card and code
            if (r.get("card"), r.get("code"), r.get("smoke")) == same and r.get("status") in ("ok", "fail")}
    print(f"gpu_all on {where}, code {code}, torch {torch.__version__}; results in {path}", flush=True)
    start, records = time.monotonic(), []
    for name in names:
        if name in done and not args.again:
            print(f"== {name}: measured already on this card and code (--again measures again)", flush=True)
            records.append(done[name])
            continue
        left = args.budget_s - (time.monotonic() - start)
        limit = min(LIMITS[name][args.smoke], left, args.limit_s or left)
        if left < MIN_S:
            record = head | {"check": name, "status": "not run", "why": f"{left:.0f} s of --budget-s left"}
        else:
            print(f"== {name} (at most {limit:.0f} s)", flush=True)
            record = head | run_check(name, args.smoke, limit)
        append(path, record)
        records.append(record)
        print("\n".join(rows(record)), flush=True)
    print(f"\ngpu_all on {where} ({time.monotonic() - start:.0f} s):")
    for record in records:
        print(f"  {record['check']:<11} {record['status']:<8} {record.get('seconds', 0):>6.1f} s")
    table = [line for record in records for line in rows(record)]
    print("\n".join(table) or "  (no targets)")
    return 1 if any(r["status"] not in ("ok",) for r in records) else 0


def child(name: str, smoke: bool, result_path: str) -> None:
    """Run one check here and write {"result", "targets", "failures"} to result_path."""
    sys.path.insert(0, str(BENCH))
    import gpu_checks
    from gpu_check import FAILURES, TARGETS

    result = getattr(gpu_checks, name)(smoke)
    Path(result_path).write_text(json.dumps({"result": result, "targets": TARGETS, "failures": FAILURES},
                                            default=str) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every check's logic on the CPU, tiny shapes")
    ap.add_argument("--only", help=f"comma-separated checks (default: all: {', '.join(LIMITS)})")
    ap.add_argument("--again", action="store_true", help="measure again what this card and code already measured")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"seconds for all checks (default {BUDGET_S})")
    ap.add_argument("--limit-s", type=float, help="no check runs longer than this (default: each its own limit)")
    ap.add_argument("--out", help="default: bench/results/gpu_all.json (gpu_all-smoke.json with --smoke)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.smoke, args.result)
    sys.exit(orchestrate(args))


if __name__ == "__main__":
    main()
