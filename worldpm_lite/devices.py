"""Which device a command runs on: "auto" means the GPUs when any is visible, else the CPU; an
explicit CUDA device is checked against the GPUs this process can see before anything touches it."""

from __future__ import annotations

import torch

from .errors import UsageError

DEVICE_HELP = "auto (every visible GPU; the CPU when there is none), cpu, cuda or cuda:N"


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(device: str | torch.device) -> str:
    """'auto' resolved ('auto' when a GPU is visible, else 'cpu'), or the device checked:
    ValueError naming what is visible when a CUDA device is asked for that this machine lacks."""
    text = str(device)
    if text == "auto":
        return "auto" if visible_gpus() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UsageError(f"device {text!r}: expected {DEVICE_HELP}") from None
    if dev.type == "cuda":
        n = visible_gpus()
        if n == 0:
            raise UsageError(f"device {text!r}: no CUDA GPU is visible here (use cpu, or auto)")
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"device {text!r}: this machine has {n} visible GPU{'s' if n > 1 else ''} "
                             f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''}); check CUDA_VISIBLE_DEVICES")
    elif dev.type != "cpu":
        raise UsageError(f"device {text!r}: expected {DEVICE_HELP}")
    return text


def describe(device: str) -> str:
    """What `device` (as returned by check_device) means here, for the CLI's first line."""
    n = visible_gpus()
    if device == "auto":
        names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
        return f"device: {n} GPU{'s' if n > 1 else ''} ({', '.join(names)}), layers spread as planned"
    if device == "cpu":
        return "device: cpu" + (" (no GPU visible)" if n == 0 else f" ({n} GPU(s) visible but not used)")
    return f"device: {device} ({torch.cuda.get_device_name(torch.device(device))})"
