"""What several commands share: the model and compute flags, the RuntimeOptions they make, and the
line that says where the model runs. Imports no torch at module level (`--help` stays fast)."""

from __future__ import annotations

import sys

from ..errors import UsageError
from ..options import BNB, RuntimeOptions, gpu_sizes, parse_size

OFFLOAD = {"auto": None, "on": True, "off": False}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


MODEL_HELP = ("a hub id such as Qwen/WorldPM-72B (downloaded once into the Hugging Face cache: HF_HUB_CACHE, "
              "HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE apply) or a model directory (config.json, *.safetensors, "
              "tokenizer files); a directory of that name wins")


def add_model(p, help: str = MODEL_HELP) -> None:
    p.add_argument("--model", required=True, help=help)
    p.add_argument("--revision", help="with a hub id: the branch, tag or commit (default: main)")


def model_path(args, config_only: bool = False) -> str:
    """--model as a local folder: a directory as given, a hub id resolved (downloaded when not cached)."""
    from ..hub import resolve

    return str(resolve(args.model, args.revision, config_only=config_only, log=log))


def add_runtime(p) -> None:
    """--model, --revision and --quant, then the compute flags: every command that scores with one model."""
    add_model(p)
    p.add_argument("--quant", choices=list(BNB), help="quantize a bf16 checkpoint with bitsandbytes "
                   "while loading (the no-calibration baseline)")
    add_compute(p)


def add_compute(p) -> None:
    """Where and how models run: the options every scoring command shares (RuntimeOptions' fields)."""
    p.add_argument("--device", default=RuntimeOptions.device, help="auto: whole layers spread over the visible GPUs "
                   "(as few as hold them, balanced), the CPU when there is none; or cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--max-memory", help="with --device auto: memory to use on each GPU, e.g. 22GiB,22GiB "
                   "(default: what is free on each)")
    p.add_argument("--backend", default=RuntimeOptions.backend, choices=["auto", "torch", "triton"],
                   help="GPTQ linears and the tail: torch reference or Triton kernels (default: auto = Triton on "
                   "GPUs, torch on CPU)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--token-budget", type=int, default=None,
                   help="tokens per forward pass (with --no-packing: batch size x longest sequence, "
                   "length-sorted) (default: 8192 on GPUs, 2048 on the CPU)")
    p.add_argument("--truncate", action="store_true",
                   help="drop the oldest tokens of a conversation longer than the model's positions "
                        "(default: refuse it with an error)")
    p.add_argument("--no-packing", action="store_true", help="right-padded, length-sorted batches instead of "
                   "packed token streams (the reference path; also turns off shared prompts)")
    p.add_argument("--no-shared-prompts", action="store_true", help="run a pair's or a ranking's prompt once per "
                   "response instead of once (for comparisons)")
    p.add_argument("--no-pipeline", action="store_true", help="with layers on several GPUs, run one batch at a "
                   "time instead of feeding the next GPU's stage while the last one finishes (for comparisons)")
    p.add_argument("--offload", choices=list(OFFLOAD), default="auto",
                   help="stream decoder layers from pinned host memory behind compute: auto (only when the layers "
                   "do not all fit the GPU; as many as fit stay resident), on (plan a streamed split on the first "
                   "GPU even if all would fit, e.g. with --max-memory 24GiB to try a 24 GB card's plan on a larger "
                   "one; on the CPU every layer streams), off (refuse what does not fit) (default: auto)")
    p.add_argument("--host-memory", help="host memory the streamed layers may pin, e.g. 64GiB (default: what is "
                   "available now)")


def flag_size(text: str | None, flag: str) -> int | None:
    """A --flag's memory size ('64GiB') in bytes, or None; a UsageError naming the flag."""
    try:
        return None if text is None else parse_size(text)
    except UsageError as e:
        raise UsageError(f"{flag}: {e}") from None


def flag_gpus(text: str, flag: str) -> dict[int, int]:
    """'24GiB,24GiB' -> {0: bytes, 1: bytes}; a UsageError naming the flag."""
    try:
        return gpu_sizes(text)
    except UsageError as e:
        raise UsageError(f"{flag}: {e}") from None


def runtime_options(args, **extra) -> RuntimeOptions:
    """The RuntimeOptions of add_compute's (and add_runtime's) flags; `extra` sets more fields."""
    return RuntimeOptions(
        device=args.device, dtype=args.dtype, backend=args.backend, quant=getattr(args, "quant", None),
        token_budget=args.token_budget,
        max_memory=flag_gpus(args.max_memory, "--max-memory") if args.max_memory else None,
        truncation="left" if args.truncate else "error", packing=not args.no_packing,
        share_prompts=not args.no_shared_prompts, pipeline=not args.no_pipeline, offload=OFFLOAD[args.offload],
        host_memory=flag_size(args.host_memory, "--host-memory"), **extra)


def resolve_device(options: RuntimeOptions) -> tuple[RuntimeOptions, object]:
    """The options with their device checked against this machine (auto: the GPUs when any is visible,
    else the CPU), and the `log` for Scorer.from_pretrained: with the GPUs, the device line comes with
    the placement once it is planned; otherwise it is printed now, before any work."""
    import dataclasses

    from ..devices import check_device, describe

    device = check_device(options.device)
    if device == "auto":
        return options, lambda summary: log(f"{describe('auto')}: {summary}")
    log(describe(device))
    return dataclasses.replace(options, device=device), None


def load_scorer(model: str, options: RuntimeOptions):
    """The scorer of `model` on this machine, saying where it runs and what runs it."""
    from ..scorer import Scorer

    options, placed = resolve_device(options)
    scorer = Scorer.from_pretrained(model, options, log=placed)
    log(f"backend: {scorer.backend}")
    return scorer
