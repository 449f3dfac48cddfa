"""`worldpm-lite plan`: does a model fit these GPUs, which layers go where, and what streams (plan.py,
offload_plan.py), from config.json alone."""

from __future__ import annotations

from ..errors import UsageError
from .common import add_model, flag_gpus, flag_size, model_path


def add(sub) -> None:
    p = sub.add_parser("plan", help="will a model fit these GPUs? which layers go where?",
                       description="Place whole decoder layers, in order, on each GPU under its memory minus a "
                       "reserve for the activations of one batch, computed on the meta device from config.json "
                       "alone (no weights read). When they do not all fit, plan the streamed split on the first "
                       "GPU: as many layers resident as fit beside a ring of buffers and one pass's activations, "
                       "the rest streamed from pinned host memory behind compute, with the expected tokens/s and "
                       "its arithmetic. Exits 1 when it can run neither way, naming setups that would.",
                       epilog="example: worldpm-lite plan --model worldpm-72b --gpus 24GiB --host-memory 64GiB")
    add_model(p, "a hub id (only its config.json is downloaded), a model directory, or the preset worldpm-72b "
              "(WorldPM-72B's real dimensions; no files needed)")
    p.add_argument("--gpus", required=True, help="memory of each GPU, comma-separated, e.g. 24GiB,24GiB")
    p.add_argument("--bits", type=int, choices=[4, 8, 16], help="plan for GPTQ 4/8-bit or bf16 (default: the "
                   "checkpoint's own; 4 for a preset)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per forward pass, as score's --token-budget (default: 8192 resident; streamed, "
                   "the smallest pass that hides the copies behind compute)")
    p.add_argument("--host-memory", help="when the layers do not all fit: host memory for the streamed ones, e.g. "
                   "64GiB (default: what is available on this machine now)")
    p.add_argument("--h2d-gbps", type=float, help="assumed pinned host-to-device GB/s for the streamed plan's "
                   "arithmetic (default: an RTX 4090's on PCIe 4.0 x16, printed with the plan)")
    p.add_argument("--tflops", type=float, help="assumed dense bf16 TFLOP/s of the GPU (default: an RTX 4090's, "
                   "printed with the plan)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..offload_plan import H2D_GBPS, TFLOPS, plan_text

    if args.batch_tokens is not None and args.batch_tokens < 1:
        raise UsageError(f"--batch-tokens: expected a positive integer, found {args.batch_tokens}")
    if (args.h2d_gbps or 1) <= 0 or (args.tflops or 1) <= 0:
        raise UsageError("--h2d-gbps, --tflops: expected positive numbers")
    from ..plan import PRESETS

    if args.model.lower() in PRESETS and args.revision:
        raise UsageError(f"--revision {args.revision}: only for a hub id; {args.model} is a preset")
    model = args.model if args.model.lower() in PRESETS else model_path(args, config_only=True)
    text, fits = plan_text(model, flag_gpus(args.gpus, "--gpus"), args.bits, args.batch_tokens,
                           flag_size(args.host_memory, "--host-memory"), args.h2d_gbps or H2D_GBPS,
                           args.tflops or TFLOPS)
    print(text)
    return 0 if fits else 1
